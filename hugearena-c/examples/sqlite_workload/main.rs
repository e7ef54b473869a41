//! Runs the SQLite workload with SQLite's default page cache or with the
//! hugearena page cache, and prints its timings (what `bench_report`
//! compares) and a digest of every result.
//!
//! ```sh
//! cargo run --release -p hugearena-c --example sqlite_workload -- \
//!     --cache hugearena --cache-percent 25 --accounts 200000 --operations 200000
//! ```
//!
//! Output, one line: `RESULT cache=... db_pages=... cache_pages=... load_s=...
//! mix_s=... ops_per_s=... digest=... integrity=...`.

mod workload;

use std::time::Instant;

fn main() {
    let mut cache = "default".to_string();
    let mut size = workload::Size {
        accounts: 100_000,
        operations: 100_000,
        cache_percent: 25,
    };
    let mut log_to = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--cache" => cache = value(),
            "--accounts" => size.accounts = value().parse().expect("--accounts N"),
            "--operations" => size.operations = value().parse().expect("--operations N"),
            "--cache-percent" => size.cache_percent = value().parse().expect("--cache-percent N"),
            "--log" => log_to = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    match cache.as_str() {
        "default" => {}
        "hugearena" => {
            if let Err(e) = hugearena_c::sqlite::install(&Default::default()) {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        other => panic!("--cache default|hugearena, not {other}"),
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let started = Instant::now();
    let out = workload::run(&dir.path().join("bank.db"), size).expect("the workload");
    let mut digest = 0u64;
    for line in &out.log {
        for b in line.bytes().chain([b'\n']) {
            digest = (digest ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    if let Some(path) = log_to {
        std::fs::write(path, out.log.join("\n")).expect("write the log");
    }
    let stats = hugearena_c::sqlite::stats();
    println!(
        "RESULT cache={cache} db_pages={} cache_pages={} load_s={:.3} mix_s={:.3} ops_per_s={:.0} total_s={:.3} digest={digest:016x} integrity={} caches={} arena_chunks={} heap_chunks={} backend={}",
        out.db_pages,
        out.cache_pages,
        out.load.as_secs_f64(),
        out.mix.as_secs_f64(),
        size.operations as f64 / out.mix.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        out.log
            .last()
            .map(String::as_str)
            .unwrap_or("")
            .trim_start_matches("integrity "),
        stats.caches,
        stats.arena_chunks,
        stats.heap_chunks,
        stats.backend,
    );
}
