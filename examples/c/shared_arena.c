/* Two processes share one hugearena arena; a third restores it from a
 * snapshot.
 *
 *   cc shared_arena.c $(pkg-config --cflags --libs hugearena) -o shared_arena
 *   ./shared_arena
 *
 * The first process creates the arena and builds a linked list of records
 * in it, published through root word 0. It starts a second process, which
 * opens the same arena by path, checks every record, and appends its own.
 * The first then checks the second's records, snapshots the arena to a
 * file, and starts a third process, which restores the snapshot (pages are
 * read from the file on first touch) and checks the whole list again.
 * Locations (hugearena_ptr) are offsets: the same in every process.
 * Exits 0 if every check passed. */
#include <hugearena.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define RECORDS 1000

struct record {
    hugearena_ptr next;  /* the next record, 0 at the end */
    uint64_t key;
    char text[48];
};

static void check(int status, const char *what) {
    if (status != HUGEARENA_OK) {
        fprintf(stderr, "%s: %s (%s)\n", what, hugearena_last_error(),
                hugearena_status_name(status));
        exit(1);
    }
}

static struct record *at(hugearena_arena *a, hugearena_ptr p) {
    struct record *r = hugearena_local(a, p);
    if (r == NULL) {
        fprintf(stderr, "hugearena_local: %s\n", hugearena_last_error());
        exit(1);
    }
    return r;
}

/* Prepends `count` records with keys first.. to the list at root 0. */
static void prepend(hugearena_arena *a, uint64_t first, uint64_t count) {
    uint64_t *roots = hugearena_roots(a, NULL);
    for (uint64_t k = first; k < first + count; k++) {
        hugearena_ptr p;
        check(hugearena_alloc(a, sizeof(struct record), 0, &p), "hugearena_alloc");
        struct record *r = at(a, p);
        r->key = k;
        snprintf(r->text, sizeof r->text, "record %llu", (unsigned long long)k);
        r->next = __atomic_load_n(&roots[0], __ATOMIC_ACQUIRE);
        __atomic_store_n(&roots[0], p, __ATOMIC_RELEASE);
    }
}

/* Walks the list: every key below `expect` exactly once, text intact. */
static void verify(hugearena_arena *a, uint64_t expect, const char *who) {
    uint64_t *roots = hugearena_roots(a, NULL);
    char *seen = calloc(expect, 1);
    uint64_t n = 0;
    for (hugearena_ptr p = __atomic_load_n(&roots[0], __ATOMIC_ACQUIRE); p != 0;) {
        struct record *r = at(a, p);
        char want[48];
        snprintf(want, sizeof want, "record %llu", (unsigned long long)r->key);
        if (r->key >= expect || seen[r->key] || strcmp(r->text, want) != 0) {
            fprintf(stderr, "%s: record %llu is damaged or repeated\n", who,
                    (unsigned long long)r->key);
            exit(1);
        }
        seen[r->key] = 1;
        n++;
        p = r->next;
    }
    free(seen);
    if (n != expect) {
        fprintf(stderr, "%s: %llu records, expected %llu\n", who,
                (unsigned long long)n, (unsigned long long)expect);
        exit(1);
    }
    printf("%s: %llu records checked\n", who, (unsigned long long)n);
}

static void run(const char *self, const char *mode, const char *arg) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(1);
    }
    if (pid == 0) {
        execl(self, self, mode, arg, (char *)NULL);
        perror("execl");
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "the %s process failed\n", mode);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "open") == 0) {
        hugearena_arena *a;
        check(hugearena_arena_open(argv[2], NULL, &a), "hugearena_arena_open");
        verify(a, RECORDS, "second process");
        prepend(a, RECORDS, RECORDS);
        hugearena_arena_close(a);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "restore") == 0) {
        hugearena_arena *a;
        check(hugearena_arena_restore(argv[2], NULL, &a), "hugearena_arena_restore");
        verify(a, 2 * RECORDS, "restored process");
        struct hugearena_arena_stats stats;
        check(hugearena_arena_audit(a, &stats), "hugearena_arena_audit");
        printf("restored process: audit clean, %llu small objects\n",
               (unsigned long long)stats.small_objects);
        hugearena_arena_close(a);
        return 0;
    }

    printf("hugearena %s\n", hugearena_version());
    struct hugearena_region_options opts = {.size = 64 << 20, .huge_pages = HUGEARENA_HUGE_PAGES_TRY};
    hugearena_arena *a;
    check(hugearena_arena_create(&opts, NULL, &a), "hugearena_arena_create");
    char reason[512];
    struct hugearena_backend_info backend;
    check(hugearena_region_backend(hugearena_arena_region(a), &backend), "hugearena_region_backend");
    hugearena_region_choice(hugearena_arena_region(a), reason, sizeof reason);
    printf("backend %d (granule %llu bytes): %s\n", backend.backend,
           (unsigned long long)backend.granule, reason);

    prepend(a, 0, RECORDS);
    verify(a, RECORDS, "first process");

    /* What a bad free gets: an error, and nothing changes. */
    hugearena_ptr extra;
    check(hugearena_alloc(a, 100, 0, &extra), "hugearena_alloc");
    check(hugearena_free(a, extra), "hugearena_free");
    int status = hugearena_free(a, extra);
    if (status != HUGEARENA_E_INVALID_POINTER) {
        fprintf(stderr, "a double free returned %d\n", status);
        return 1;
    }
    printf("double free refused: %s\n", hugearena_last_error());

    char path[4096];
    if (hugearena_arena_shareable_path(a, path, sizeof path) >= sizeof path) {
        fprintf(stderr, "path too long\n");
        return 1;
    }
    run(argv[0], "open", path);
    verify(a, 2 * RECORDS, "first process, after the second");

    char snapshot[] = "/tmp/hugearena-c-example-XXXXXX";
    int fd = mkstemp(snapshot);
    if (fd < 0) {
        perror("mkstemp");
        return 1;
    }
    close(fd);
    struct hugearena_snapshot_info info;
    check(hugearena_arena_snapshot(a, snapshot, &info), "hugearena_arena_snapshot");
    printf("snapshot: %llu of %llu granules present, %llu bytes\n",
           (unsigned long long)info.present, (unsigned long long)info.granules,
           (unsigned long long)info.file_len);
    hugearena_arena_close(a);

    run(argv[0], "restore", snapshot);
    unlink(snapshot);
    printf("ok\n");
    return 0;
}
