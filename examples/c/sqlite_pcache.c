/* SQLite's page cache on hugearena: one call before sqlite3_initialize.
 *
 *   cc sqlite_pcache.c $(pkg-config --cflags --libs hugearena) -lsqlite3 -o sqlite_pcache
 *   ./sqlite_pcache
 *
 * Fills a temporary database larger than the cache, reads it back through an index,
 * and prints what the cache did. Exits 0 if every row read back. */
#include <hugearena.h>
#include <sqlite3.h>

#include <stdio.h>
#include <stdlib.h>

static void ok(int rc, sqlite3 *db, const char *what) {
    if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
        fprintf(stderr, "%s: %s\n", what, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        exit(1);
    }
}

int main(void) {
    /* NULL: an anonymous region sized by default, huge pages if possible. */
    if (hugearena_sqlite_pcache_install(NULL) != HUGEARENA_OK) {
        fprintf(stderr, "%s\n", hugearena_last_error());
        return 1;
    }
    sqlite3 *db;
    ok(sqlite3_open("", &db), NULL, "open");
    ok(sqlite3_exec(db,
                    "PRAGMA cache_size = 100;"
                    "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);"
                    "CREATE INDEX t_v ON t(v);",
                    NULL, NULL, NULL),
       db, "create");
    ok(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), db, "begin");
    sqlite3_stmt *ins;
    ok(sqlite3_prepare_v2(db, "INSERT INTO t(k, v) VALUES (?, printf('value %08d', ?))", -1, &ins, NULL), db, "prepare");
    for (int i = 0; i < 20000; i++) {
        sqlite3_bind_int(ins, 1, i);
        sqlite3_bind_int(ins, 2, i);
        ok(sqlite3_step(ins), db, "insert");
        sqlite3_reset(ins);
    }
    sqlite3_finalize(ins);
    ok(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), db, "commit");

    sqlite3_stmt *sel;
    ok(sqlite3_prepare_v2(db, "SELECT k FROM t WHERE v = printf('value %08d', ?)", -1, &sel, NULL), db, "prepare");
    for (int i = 0; i < 20000; i += 7) {
        sqlite3_bind_int(sel, 1, i);
        if (sqlite3_step(sel) != SQLITE_ROW || sqlite3_column_int(sel, 0) != i) {
            fprintf(stderr, "row %d did not read back\n", i);
            return 1;
        }
        sqlite3_reset(sel);
    }
    sqlite3_finalize(sel);
    sqlite3_close(db);

    struct hugearena_sqlite_stats s;
    hugearena_sqlite_get_stats(&s);
    printf("page cache: %llu caches, %llu hits, %llu misses, %llu recycled, "
           "%llu chunks in the arena, %llu on the heap, backend %d\n",
           (unsigned long long)s.caches, (unsigned long long)s.hits,
           (unsigned long long)s.misses, (unsigned long long)s.recycled,
           (unsigned long long)s.arena_chunks, (unsigned long long)s.heap_chunks, s.backend);
    if (s.caches == 0 || s.hits == 0) {
        fprintf(stderr, "SQLite did not use the hugearena page cache\n");
        return 1;
    }
    printf("ok\n");
    return 0;
}
