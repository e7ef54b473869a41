//! SQLite (the system's libsqlite3) with its page cache on hugearena gives
//! exactly the results of SQLite's default cache, on a database larger than
//! the cache and on one smaller. The page cache is process-wide and set
//! before SQLite initializes, so each run is a process of its own: this
//! binary again, running only `child` with the run's parameters.

#[path = "../examples/sqlite_workload/workload.rs"]
#[allow(dead_code)]
mod workload;

use std::process::Command;

const CHILD: &str = "HUGEARENA_SQLITE_TEST_CHILD";

/// One run, in a child: `CACHE PERCENT LOG_PATH`.
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let [cache, percent, log] = parts[..] else {
        panic!("bad child spec {spec}")
    };
    if cache == "hugearena" {
        // A small region, so the caches outgrow it and some chunks come
        // from the heap.
        let options = hugearena_c::sqlite::PcacheOptions {
            region_bytes: 8 << 20,
            ..Default::default()
        };
        hugearena_c::sqlite::install(&options).expect("install the page cache");
    }
    let dir = tempfile::tempdir().unwrap();
    let size = workload::Size {
        accounts: 30_000,
        operations: 6_000,
        cache_percent: percent.parse().unwrap(),
    };
    let out = workload::run(&dir.path().join("bank.db"), size).expect("the workload");
    std::fs::write(log, out.log.join("\n")).unwrap();
    let stats = hugearena_c::sqlite::stats();
    println!(
        "CHILD-STATS caches={} hits={} misses={} recycled={} arena_chunks={} heap_chunks={} db_pages={}",
        stats.caches,
        stats.hits,
        stats.misses,
        stats.recycled,
        stats.arena_chunks,
        stats.heap_chunks,
        out.db_pages
    );
}

/// Runs this binary's test `test` alone in a child process with the child
/// variable set to `spec`; returns what it printed, failing if it failed.
fn run_child(test: &str, spec: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, spec)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{test} ({spec}) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `child` with `cache` and `percent`; returns its log and stats line.
fn run(cache: &str, percent: u64, dir: &std::path::Path) -> (Vec<String>, String) {
    let log = dir.join(format!("{cache}-{percent}.log"));
    let stdout = run_child("child", &format!("{cache} {percent} {}", log.display()));
    // The harness may print "test child ... " on the same line first.
    let stats = stdout
        .lines()
        .find_map(|l| l.find("CHILD-STATS").map(|at| l[at..].to_string()))
        .unwrap_or_else(|| panic!("no stats from the {cache} run:\n{stdout}"));
    let lines = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (lines, stats)
}

fn stat(line: &str, name: &str) -> u64 {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

fn compare(percent: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (default, _) = run("default", percent, dir.path());
    let (ours, stats) = run("hugearena", percent, dir.path());
    eprintln!("cache at {percent} % of the database: {stats}");
    assert!(default.len() > 6_000, "{} results", default.len());
    for (i, (a, b)) in default.iter().zip(&ours).enumerate() {
        assert_eq!(
            a, b,
            "result {i} differs between the default cache and hugearena's"
        );
    }
    assert_eq!(default.len(), ours.len());
    assert_eq!(ours.last().unwrap(), "integrity ok");
    // The hugearena cache did the work, from the arena (and the heap once
    // the 8 MiB region was full).
    assert!(
        stat(&stats, "caches") >= 3,
        "the main, temp and in-memory databases: {stats}"
    );
    assert!(stat(&stats, "hits") > 10_000, "{stats}");
    assert!(stat(&stats, "arena_chunks") > 0, "{stats}");
    if percent < 100 {
        assert!(
            stat(&stats, "recycled") > 0,
            "a cache smaller than the database recycles: {stats}"
        );
    }
}

#[test]
fn results_match_the_default_cache_with_the_cache_at_a_quarter_of_the_database() {
    if std::env::var_os(CHILD).is_none() {
        compare(25);
    }
}

#[test]
fn results_match_the_default_cache_with_the_cache_twice_the_database() {
    if std::env::var_os(CHILD).is_none() {
        compare(200);
    }
}

#[test]
fn installing_after_sqlite_started_is_refused_with_the_reason() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let stdout = run_child("late_install", "late");
    assert!(stdout.contains("LATE-INSTALL-REFUSED"), "{stdout}");
}

#[test]
fn late_install() {
    if std::env::var(CHILD).as_deref() != Ok("late") {
        return;
    }
    let db = rusqlite::Connection::open_in_memory().unwrap();
    let e = hugearena_c::sqlite::install(&Default::default()).expect_err("SQLite is initialized");
    assert!(e.message.contains("before sqlite3_initialize"), "{e}");
    assert_eq!(e.code, hugearena_c::HUGEARENA_E_INVALID_ARGUMENT);
    // SQLite still works with its own cache.
    let one: i64 = db.query_row("SELECT 1", [], |r| r.get(0)).unwrap();
    assert_eq!(one, 1);
    println!("LATE-INSTALL-REFUSED: {e}");
}

#[test]
fn a_program_can_pass_the_methods_to_sqlite3_config_itself() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let stdout = run_child("methods_by_hand", "methods");
    assert!(stdout.contains("METHODS-USED"), "{stdout}");
}

#[test]
fn methods_by_hand() {
    if std::env::var(CHILD).as_deref() != Ok("methods") {
        return;
    }
    // Room for a `sqlite3_pcache_methods2` (13 pointer-sized fields).
    let mut methods = [0usize; 16];
    // SAFETY: NULL options; `methods` is large enough and aligned.
    let rc = unsafe {
        hugearena_c::sqlite::hugearena_sqlite_pcache_methods(
            std::ptr::null(),
            methods.as_mut_ptr().cast(),
        )
    };
    assert_eq!(rc, hugearena_c::HUGEARENA_OK);
    // SAFETY: SQLite's documented call, before it initializes, with the
    // methods the library filled in.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_PCACHE2, methods.as_ptr())
    };
    assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
    let db = rusqlite::Connection::open_in_memory().unwrap();
    db.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);")
        .unwrap();
    let n: i64 = db
        .query_row("SELECT sum(x) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 6);
    // Closing destroys the caches, which adds their last counts.
    drop(db);
    let stats = hugearena_c::sqlite::stats();
    assert!(stats.caches > 0 && stats.hits > 0, "{stats:?}");
    println!("METHODS-USED {stats:?}");
}
