//! Runs every benchmark scenario on this machine and writes
//! `docs/BENCHMARKS.md` (tables, the command, the machine) and SVG charts
//! under `docs/plots/` that the document links.
//!
//! ```text
//! cargo run --release --example bench_report [-- --quick] [--only-kv | --only-bufferpool | --only-sqlite]
//! ```
//!
//! Needs root (userfaultfd; as `.ci/run` does, it reserves 1024 × 2 MiB
//! huge pages and mounts hugetlbfs on `/dev/hugepages` when they are
//! missing) and, for the Redis comparison, `redis-server` and
//! `redis-benchmark` (`apt-get install redis-server redis-tools`), for
//! the emulated HGM section QEMU and cpio (`apt-get install
//! qemu-system-x86 cpio`); a missing tool skips that section and says so
//! in the report. `--quick` runs every scenario at a smaller size in a
//! few minutes; `--only-kv`, `--only-bufferpool` and `--only-sqlite` run
//! section 6, 9 or 10 alone and print it (10 needs `libsqlite3-dev`).
//! Nothing here passes or fails on speed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)] // only its hugetlbfs mount
#[path = "support/huge_tmpfs.rs"]
mod huge_tmpfs;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cargo(args: &[&str]) -> String {
    run(Command::new(env!("CARGO")).current_dir(root()).args(args))
}

fn example(name: &str) -> PathBuf {
    root().join("target/release/examples").join(name)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = read("/proc/sys/kernel/osrelease");
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib >> 20);
    format!(
        "{cpu}, {} cores, {mem_gib} GiB, Linux {kernel}; 2 MiB huge pages reserved: {}; shmem THP: {}; THP: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        read("/proc/sys/vm/nr_hugepages"),
        read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        read("/sys/kernel/mm/transparent_hugepage/enabled"),
    )
}

/// Markdown table lines of a benchmark's output.
fn tables(out: &str) -> String {
    out.lines()
        .filter(|l| {
            l.starts_with('|') || l.starts_with("###") || l.starts_with("memcpy") || l.is_empty()
        })
        .map(|l| format!("{}\n", l.replace("## ", "### ")))
        .collect()
}

/// `key=value` fields of a `RESULT` line.
fn fields(line: &str) -> Vec<(String, String)> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|f| {
            f.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn get<'a>(f: &'a [(String, String)], k: &str) -> &'a str {
    f.iter()
        .find(|(key, _)| key == k)
        .map_or("?", |(_, v)| v.as_str())
}

/// A horizontal bar chart as SVG.
fn bar_chart(path: &Path, title: &str, unit: &str, bars: &[(String, f64)]) {
    let (w, row, left) = (760.0, 22.0, 300.0);
    let h = 50.0 + row * bars.len() as f64;
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{title}</text>\n"
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 35.0 + row * i as f64;
        let len = (w - left - 90.0) * v / max;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{left}\" y=\"{}\" width=\"{len:.1}\" height=\"{}\" fill=\"#4a7ab0\"/>\
             <text x=\"{}\" y=\"{}\">{v:.2} {unit}</text>",
            left - 6.0,
            y + 13.0,
            label.replace('&', "&amp;").replace('<', "&lt;"),
            y + 2.0,
            row - 6.0,
            left + len + 4.0,
            y + 13.0
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).expect("write chart");
}

/// Kernel-native first-touch throughput of one thread, from the mean.
fn native_rate(first_touch: &str) -> String {
    let mean = |case: &str| {
        first_touch
            .lines()
            .find(|l| l.contains(case))
            .and_then(|l| l.split('|').nth(6))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (
        mean("Shmem primary (allocate + zero)"),
        mean("anonymous memory (allocate + zero)"),
    ) {
        (Some(shmem), Some(anon)) => format!(
            " (one thread, kernel-native first touches: shmem {:.2} GB/s, anonymous {:.2} GB/s)",
            4096.0 / shmem / 1e3,
            4096.0 / anon / 1e3
        ),
        _ => String::new(),
    }
}

/// Parses the p50 column of a first_touch table row.
fn population(quick: bool, doc: &mut String, plots: &Path, first_touch: &str) {
    let size = if quick { "64" } else { "256" };
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    let backends = ["shmem", "thp", "hugetlb"];
    let drivers = ["in-thread", "handlers:1", "handlers:2", "proactive"];
    for backend in backends {
        for driver in drivers {
            for order in ["random", "sequential"] {
                let out = run(Command::new(example("populate")).args([
                    "--backend",
                    backend,
                    "--driver",
                    driver,
                    "--order",
                    order,
                    "--source",
                    "zero",
                    "--size",
                    size,
                ]));
                let Some(line) = out.lines().find(|l| l.starts_with("RESULT")) else {
                    continue;
                };
                let f = fields(line);
                if order == "random" {
                    let p50: f64 = get(&f, "p50_us").parse().unwrap_or(0.0);
                    bars.push((format!("{} {driver}", get(&f, "backend")), p50));
                }
                rows.push(format!(
                    "| {} | {driver} | {order} | {} | {} | {} | {} | {} | {} |",
                    get(&f, "backend"),
                    get(&f, "p50_us"),
                    get(&f, "p99_us"),
                    get(&f, "p999_us"),
                    get(&f, "gbps"),
                    get(&f, "faults"),
                    get(&f, "readahead"),
                ));
            }
        }
    }
    let _ = writeln!(
        doc,
        "## 1–2. Population latency and throughput, per backend × driver\n\n\
         ```sh\ncargo run --release --example populate -- --backend B --driver D --order O --source zero --size {size}\n```\n\n\
         Two threads touch the first byte of every granule of a {size} MiB region, each in its own order; every touch is timed \
         (touches of pages the other thread already populated included). `sequential` is where readahead works. Throughput is \
         the region size over the wall time. Compare with the kernel-native rows and memcpy in section 0{}. The regions are \
         memfds: with `shmem_enabled=never` a `ShmemThp` block is allocated by run and collapsed by copying; section 7 has \
         `ShmemThp` on a tmpfs mounted `huge=always`, where each block gets its 2 MiB folio first.\n\n\
         | backend | driver | order | touch p50 µs | p99 µs | p99.9 µs | GB/s | faults | readahead granules |\n|---|---|---|---|---|---|---|---|---|",
        native_rate(first_touch)
    );
    for r in rows {
        let _ = writeln!(doc, "{r}");
    }
    bar_chart(
        &plots.join("population_p50.svg"),
        "First-touch p50, random order (µs, lower is better)",
        "µs",
        &bars,
    );
    let _ = writeln!(doc, "\n![first-touch p50](plots/population_p50.svg)\n");
}

/// Section 7: the population targets, P1, P2a and P2b from the targets
/// bench (each against its kernel-native baseline in the same process,
/// fresh and warm memory), P3 and P4 from the restore bench's tables.
fn targets(quick: bool, doc: &mut String, restore: &str, losses: &mut Vec<String>) {
    let mut args = vec!["bench", "--bench", "targets"];
    if quick {
        args.extend_from_slice(&["--", "--quick"]);
    }
    let out = cargo(&args);
    let mut rows: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("| P"))
        .map(str::to_string)
        .collect();
    // P3: restore → first byte, from the lazy-restore table (ms column).
    let cells =
        |row: &str| -> Vec<String> { row.split('|').map(|c| c.trim().to_string()).collect() };
    let restore_rows: Vec<Vec<String>> = restore
        .lines()
        .filter(|l| l.contains(" ms |"))
        .map(cells)
        .collect();
    let ms = |c: &[String]| {
        c.get(3)
            .and_then(|v| v.trim_end_matches(" ms").parse::<f64>().ok())
    };
    // Every size within 10 ms; the largest (a sparse 16 GiB one in a full
    // run) within 1.5× of the smallest: flat.
    let smallest = restore_rows.first().and_then(|c| ms(c));
    for (i, c) in restore_rows.iter().enumerate() {
        let (Some(t), Some(base)) = (ms(c), smallest) else {
            continue;
        };
        let largest = i + 1 == restore_rows.len() && i > 0;
        let met = t <= 10.0 && (!largest || t <= 1.5 * base);
        rows.push(format!(
            "| P3 | restore → first byte, {} (cold cache) | — | {t:.2} ms | {base:.2} ms (the smallest snapshot) | {:.2}× | {} | {} |",
            c[1],
            t / base,
            if largest { "≤ 10 ms and ≤ 1.5×" } else { "≤ 10 ms" },
            if met { "yes" } else { "**no**" }
        ));
    }
    // P4: drain against a cold sequential read of the file.
    for c in restore
        .lines()
        .filter(|l| l.contains("GB/s |") && l.matches('|').count() == 6)
        .map(cells)
    {
        let Ok(ratio) = c[5].parse::<f64>() else {
            continue;
        };
        rows.push(format!(
            "| P4 | background drain of a {} snapshot (cold cache, crc32c verified) | — | {} | {} (sequential read of the file) | {ratio:.2}× | ≥ 0.7× | {} |",
            c[1],
            c[3],
            c[4],
            if ratio >= 0.7 { "yes" } else { "**no**" }
        ));
    }
    // A loss: a missed goal, or slower than the baseline whatever the goal
    // (P3 compares restore sizes with each other, not with a baseline).
    for r in &rows {
        let c = cells(r);
        let ratio: f64 = c[6].trim_end_matches('×').parse().unwrap_or(1.0);
        let slower = c[1] != "P3"
            && c[7] != "—"
            && if c[7].starts_with('≥') {
                ratio < 1.0
            } else {
                ratio > 1.0
            };
        let missed = c[8] != "yes" && c[8] != "—";
        if missed || slower {
            losses.push(format!(
                "{}: {} ({} memory): {} against {}, {} (goal {}{}).",
                c[1],
                c[2],
                c[3],
                c[4],
                c[5],
                c[6],
                c[7],
                if missed { ", missed" } else { ", met" }
            ));
        }
    }
    let _ = writeln!(
        doc,
        "## 7. Population targets P1–P4\n\n```sh\ncargo bench --bench targets{}\n```\n\n\
         Each hugearena figure against its kernel-native (or file) baseline measured in the same process. `ShmemThp` regions \
         live on a tmpfs mounted `huge=always`, so each block gets one 2 MiB folio before its first fill. *Fresh* memory: after \
         4 s without allocating, when these guests have handed part of the free memory back to the host (a host fault on first \
         use, milliseconds per 2 MiB, far more often for huge folios than for 4 KiB pages; how much varies between runs). \
         *Warm*: right after as much memory was touched and freed. P3 and P4 come from section 5.\n\n\
         | target | what | memory | hugearena | baseline | ratio | goal | met |\n|---|---|---|---|---|---|---|---|",
        if quick { " -- --quick" } else { "" }
    );
    for r in rows {
        let _ = writeln!(doc, "{r}");
    }
    let _ = writeln!(doc);
}

/// The test guests of the kernel matrix (`.ci/kernel-matrix` finds them
/// the same way).
fn guest_dir() -> Option<PathBuf> {
    [
        std::env::var_os("HUGEARENA_GUEST_DIR").map(PathBuf::from),
        Some(root().join("../shared/guest")),
        Some(PathBuf::from("/work/shared/guest")),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.join("run-in-guest.sh").exists())
}

/// Section 8: what HGM exists for, in the HGM guest (emulated, so only
/// the ratios within this run mean anything): a random sparse touch of
/// 4 KiB pages of a 256 MiB region on HugetlbHgm (4 KiB fills inside huge
/// pages), Hugetlb (whole 2 MiB fills) and ShmemThp.
fn emulated_hgm(doc: &mut String) {
    let _ = writeln!(
        doc,
        "## 8. Emulated: 4 KiB population inside huge pages (HGM) against whole huge pages\n"
    );
    let Some(guests) = guest_dir() else {
        let _ = writeln!(doc, "Skipped: no test guests (set HUGEARENA_GUEST_DIR).\n");
        return;
    };
    if !have("qemu-system-x86_64") || !have_command("cpio") {
        let _ = writeln!(
            doc,
            "Skipped: the guests need QEMU and cpio (`apt-get install qemu-system-x86 cpio`).\n"
        );
        return;
    }
    let static_dir = root().join("target/static");
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "--example", "populate", "--target"])
        .arg("x86_64-unknown-linux-gnu")
        .arg("--target-dir")
        .arg(&static_dir));
    let binary = static_dir.join("x86_64-unknown-linux-gnu/release/examples/populate");
    let touches = 256;
    let mut cmd = Command::new(guests.join("run-in-guest.sh"));
    cmd.arg("-a").arg(&binary).args(["-t", "900", "-T", "1800"]);
    for backend in ["hgm", "hugetlb", "thp"] {
        cmd.arg("-c").arg(format!(
            "./populate --backend {backend} --size 256 --threads 1 --source file --touches {touches}"
        ));
    }
    let out = run(&mut cmd);
    let _ = writeln!(
        doc,
        "```sh\nrun-in-guest.sh -a populate -c './populate --backend B --size 256 --threads 1 --source file --touches {touches}'\n```\n\n\
         In a QEMU guest (`{}`: software emulation, Linux 6.3.8 with the HGM series): one thread touches {touches} random \
         4 KiB pages of a 256 MiB region filled from a file. **Emulated: compare only the rows with each other.** HGM reads \
         from the source only the pieces touched, where `Hugetlb` reads whole huge pages; both still have the kernel allocate \
         and zero a whole 2 MiB hugetlb page on a huge page's first touch, which emulation makes slow, while `ShmemThp` \
         (on a memfd here, allocated by run) allocates 4 KiB pages.\n\n\
         | backend | granule | wall for all touches | touch p50 | p99 | fills | bytes filled | bytes filled / touched |\n\
         |---|---|---|---|---|---|---|---|",
        guests.join("run-in-guest.sh").display()
    );
    for line in out.lines().filter(|l| l.starts_with("RESULT")) {
        let f = fields(line);
        let filled: f64 = get(&f, "bytes_filled").parse().unwrap_or(0.0);
        let fills: f64 = get(&f, "fills").parse().unwrap_or(0.0);
        let _ = writeln!(
            doc,
            "| {} | {} | {} ms | {} µs | {} µs | {} | {:.1} MiB | {:.0}× |",
            get(&f, "backend"),
            if fills > 0.0 {
                format!("{:.0} KiB", filled / fills / 1024.0)
            } else {
                "—".into()
            },
            get(&f, "wall_ms"),
            get(&f, "p50_us"),
            get(&f, "p99_us"),
            get(&f, "fills"),
            filled / (1 << 20) as f64,
            filled / (touches as f64 * 4096.0)
        );
    }
    let _ = writeln!(doc);
}

fn scaling(quick: bool, doc: &mut String, plots: &Path) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = if quick { "64" } else { "256" };
    let _ = writeln!(
        doc,
        "## 3. Scaling: faulting threads × handler threads (Shmem, random order, {size} MiB)\n\n\
         | touching threads | driver | GB/s | touch p50 µs | p99 µs |\n|---|---|---|---|---|"
    );
    let mut bars = Vec::new();
    for threads in 1..=n {
        let mut drivers = vec!["in-thread".to_string()];
        drivers.extend((1..=n).map(|h| format!("handlers:{h}")));
        for driver in drivers {
            let out = run(Command::new(example("populate")).args([
                "--backend",
                "shmem",
                "--driver",
                &driver,
                "--source",
                "zero",
                "--size",
                size,
                "--threads",
                &threads.to_string(),
            ]));
            if let Some(line) = out.lines().find(|l| l.starts_with("RESULT")) {
                let f = fields(line);
                let _ = writeln!(
                    doc,
                    "| {threads} | {driver} | {} | {} | {} |",
                    get(&f, "gbps"),
                    get(&f, "p50_us"),
                    get(&f, "p99_us")
                );
                bars.push((
                    format!("{threads} toucher(s), {driver}"),
                    get(&f, "gbps").parse().unwrap_or(0.0),
                ));
            }
        }
    }
    bar_chart(
        &plots.join("scaling.svg"),
        "Population throughput (GB/s, higher is better)",
        "GB/s",
        &bars,
    );
    let _ = writeln!(
        doc,
        "\n![scaling](plots/scaling.svg)\n\n### Two processes sharing a region\n\n\
         ```sh\ncargo run --release --example populate -- --backend shmem --driver D --source file --size {size} --second-process\n```\n\n\
         The first process populates the region from a file; a second process opens it and touches every page the same way: \
         it only maps what the first filled (its fills stay 0).\n\n\
         | driver | process | GB/s | touch p50 µs | p99 µs | fills |\n|---|---|---|---|---|---|"
    );
    for driver in ["in-thread", "handlers:2"] {
        let out = run(Command::new(example("populate")).args([
            "--backend",
            "shmem",
            "--driver",
            driver,
            "--source",
            "file",
            "--size",
            size,
            "--second-process",
        ]));
        for line in out.lines().filter(|l| l.starts_with("RESULT")) {
            let f = fields(line);
            let _ = writeln!(
                doc,
                "| {driver} | {} | {} | {} | {} | {} |",
                get(&f, "process"),
                get(&f, "gbps"),
                get(&f, "p50_us"),
                get(&f, "p99_us"),
                get(&f, "fills")
            );
        }
    }
    let _ = writeln!(doc);
}

/// One run of `examples/bufferpool`; its `RESULT` fields.
fn bufferpool_run(
    backend: &str,
    data_mib: u64,
    pool_mib: u64,
    processes: u32,
    threads: u32,
    keys: &str,
    seconds: &str,
) -> Vec<(String, String)> {
    let out = run(Command::new(example("bufferpool")).args([
        "--backend",
        backend,
        "--data",
        &format!("{data_mib}M"),
        "--pool",
        &format!("{pool_mib}M"),
        "--processes",
        &processes.to_string(),
        "--threads",
        &threads.to_string(),
        "--workload",
        "b",
        "--keys",
        keys,
        "--seconds",
        seconds,
        "--no-verify",
    ]));
    out.lines()
        .find(|l| l.starts_with("RESULT"))
        .map(fields)
        .unwrap_or_default()
}

/// Section 10: SQLite with its page cache on hugearena against its default
/// page cache, the same workload in the same run, the cache at a quarter
/// of the database and at twice its size.
fn sqlite_pcache(quick: bool, doc: &mut String, plots: &Path, losses: &mut Vec<String>) {
    let (accounts, operations, rounds) = if quick {
        ("100000", "50000", 1)
    } else {
        ("200000", "100000", 3)
    };
    let _ = writeln!(
        doc,
        "## 10. SQLite: its page cache on hugearena against its default page cache\n\n\
         ```sh\ncargo run --release -p hugearena-c --example sqlite_workload -- --cache C --cache-percent P --accounts {accounts} --operations {operations}\n```\n\n\
         The system's libsqlite3 (through rusqlite), a database file of accounts with two indexes loaded in transactions, then a seeded \
         mix: 35 % indexed point reads, 10 % index range scans, 20 % transfers in transactions (one in eight rolled back), 10 % \
         inserts, 8 % deletes, aggregates, a temporary and an in-memory table, `PRAGMA shrink_memory` (1 %). `hugearena`: \
         `hugearena_c::sqlite::install` with its defaults (an anonymous 256 MiB region, huge pages `Try`); `default`: SQLite's own \
         cache. Both give the same results (`hugearena-c/tests/sqlite.rs` checks every one). Operations/s of the mix, the median of \
         {rounds} alternating run(s) each; the goal is at least 0.95× the default cache.\n\n\
         | cache size | database pages | cache pages | default ops/s | hugearena ops/s | ratio | hugearena backend |\n|---|---|---|---|---|---|---|"
    );
    let mut bars = Vec::new();
    for percent in ["25", "200"] {
        let mut default = Vec::new();
        let mut ours = Vec::new();
        let mut last = Vec::new();
        for _ in 0..rounds {
            for (cache, into) in [("default", &mut default), ("hugearena", &mut ours)] {
                let out = run(Command::new(example("sqlite_workload")).args([
                    "--cache",
                    cache,
                    "--cache-percent",
                    percent,
                    "--accounts",
                    accounts,
                    "--operations",
                    operations,
                ]));
                let f = out
                    .lines()
                    .find(|l| l.starts_with("RESULT"))
                    .map(fields)
                    .unwrap_or_default();
                into.push(number(&f, "ops_per_s"));
                last = f;
            }
        }
        let (d, h) = (
            median(default).expect("at least one round"),
            median(ours).expect("at least one round"),
        );
        let ratio = h / d;
        let backend = get(&last, "backend")
            .parse()
            .ok()
            .and_then(hugearena::BackendKind::from_code)
            .map_or_else(|| get(&last, "backend").to_string(), |k| k.to_string());
        let _ = writeln!(
            doc,
            "| {percent} % | {} | {} | {d:.0} | {h:.0} | {ratio:.2}× | {backend} |",
            get(&last, "db_pages"),
            get(&last, "cache_pages"),
        );
        bars.push((format!("default, cache {percent} %"), d / 1e3));
        bars.push((format!("hugearena, cache {percent} %"), h / 1e3));
        if ratio < 0.95 {
            losses.push(format!(
                "SQLite with the cache at {percent} % of the database: {h:.0} operations/s with the hugearena page cache, \
                 {ratio:.2}× the default cache (goal: 0.95×)."
            ));
        }
    }
    bar_chart(
        &plots.join("sqlite.svg"),
        "SQLite mixed workload: page cache",
        "k operations/s",
        &bars,
    );
    let _ = writeln!(doc, "\n![SQLite page caches](plots/sqlite.svg)\n");
}

/// Sets the 2 MiB huge page pool to at least `pages`; returns what it was.
fn reserve_huge_pages(pages: u64) -> String {
    let path = "/proc/sys/vm/nr_hugepages";
    let before = read(path);
    if before.parse::<u64>().unwrap_or(0) < pages {
        let _ = std::fs::write(path, pages.to_string());
    }
    before
}

fn number(f: &[(String, String)], k: &str) -> f64 {
    get(f, k).parse().unwrap_or(0.0)
}

/// Section 9: the buffer pool example against a database's own ways,
/// at a size where misses dominate and one where everything hits.
fn buffer_pool(quick: bool, doc: &mut String, plots: &Path, losses: &mut Vec<String>) {
    let seconds = if quick { "3" } else { "5" };
    // (what, data MiB, pool MiB)
    let sizes: [(&str, u64, u64); 2] = if quick {
        [("misses dominate", 1024, 256), ("all hits", 512, 1024)]
    } else {
        [("misses dominate", 4096, 1024), ("all hits", 2048, 4096)]
    };
    let backends = ["shmem-thp", "hugetlb", "shmem", "anon", "mmap"];
    // Hugetlb reserves its whole region: the larger data file, plus room.
    let before = reserve_huge_pages(sizes[0].1 / 2 + 64);
    let _ = writeln!(
        doc,
        "## 9. Buffer pool: hugearena against anonymous memory + pread and mmap of the file\n\n\
         ```sh\ncargo run --release --example bufferpool -- --backend B --data D --pool P --processes 1 --threads 2 --workload b --keys uniform --seconds {seconds}\n```\n\n\
         The example's vmcache-style buffer manager over a data file of 4 KiB pages (a hash index in pages; YCSB B: 95 % reads, \
         5 % updates; every read checked), the same code over five memories: hugearena `ShmemThp`, `Hugetlb` and `Shmem` \
         (`populate` on a miss, `write_back` + `discard` to evict), anonymous memory with `pread` on a miss and `MADV_DONTNEED` \
         to evict (vmcache without its kernel module), and a shared `mmap` of the data file evicted with `MADV_DONTNEED` \
         (LMDB's way: a miss is a page-cache fault). The data file is read once before each run, so it is in the page cache \
         for every backend: a miss costs a copy (or a mapping), not a disk read. *Memory held*: the region file's blocks \
         (hugearena), the resident pages of the mapping (anonymous), the file's page-cache pages (mmap: its pool is the page \
         cache, which keeps every page read)."
    );
    let mut rows: Vec<Vec<(String, String)>> = Vec::new();
    let mut bars = Vec::new();
    for (what, data, pool) in sizes {
        for keys in ["uniform", "zipf"] {
            if what == "all hits" && keys == "zipf" {
                continue;
            }
            let _ = writeln!(
                doc,
                "\n### {what}: {data} MiB of data, a {pool} MiB pool, {keys} keys, 1 process × 2 threads\n\n\
                 | memory | Mops/s | p50 ns | p99 ns | hit rate | misses/s | evictions/s | memory held MiB | vs anon | vs mmap |\n\
                 |---|---|---|---|---|---|---|---|---|---|"
            );
            let results: Vec<(&str, Vec<(String, String)>)> = backends
                .iter()
                .map(|b| (*b, bufferpool_run(b, data, pool, 1, 2, keys, seconds)))
                .collect();
            let ops = |name: &str| {
                results
                    .iter()
                    .find(|(b, _)| *b == name)
                    .map_or(0.0, |(_, f)| number(f, "ops_per_s"))
            };
            let (anon, mmap) = (ops("anon").max(1.0), ops("mmap").max(1.0));
            for (b, f) in &results {
                let o = number(f, "ops_per_s");
                let _ = writeln!(
                    doc,
                    "| {b} | {:.2} | {} | {} | {:.3} | {:.0} | {:.0} | {} | {:.2}× | {:.2}× |",
                    o / 1e6,
                    get(f, "p50_ns"),
                    get(f, "p99_ns"),
                    number(f, "hit_rate"),
                    number(f, "misses_per_s"),
                    number(f, "evictions_per_s"),
                    get(f, "memory_mib"),
                    o / anon,
                    o / mmap
                );
                if keys == "uniform" {
                    bars.push((format!("{what}: {b}"), o / 1e6));
                }
                let mut row = f.clone();
                row.push(("what".into(), what.into()));
                row.push(("keys".into(), keys.into()));
                row.push(("vs_anon".into(), format!("{:.2}", o / anon)));
                row.push(("vs_mmap".into(), format!("{:.2}", o / mmap)));
                rows.push(row);
            }
        }
    }
    // Several processes: 2 × 1 thread against 1 × 2 threads, ShmemThp.
    let _ = writeln!(
        doc,
        "\n### Two processes sharing the pool\n\n`ShmemThp`, uniform keys: 2 processes × 1 thread against 1 process × 2 threads.\n\n\
         | case | 1 × 2 Mops/s | 2 × 1 Mops/s | ratio |\n|---|---|---|---|"
    );
    let mut scaling = Vec::new();
    for (what, data, pool) in sizes {
        let one = rows
            .iter()
            .find(|r| {
                get(r, "what") == what
                    && get(r, "keys") == "uniform"
                    && get(r, "backend") == "shmem-thp"
            })
            .map_or(0.0, |r| number(r, "ops_per_s"));
        let two = number(
            &bufferpool_run("shmem-thp", data, pool, 2, 1, "uniform", seconds),
            "ops_per_s",
        );
        let ratio = two / one.max(1.0);
        let _ = writeln!(
            doc,
            "| {what} | {:.2} | {:.2} | {ratio:.2}× |",
            one / 1e6,
            two / 1e6
        );
        scaling.push((what, ratio));
    }
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before);
    bar_chart(
        &plots.join("bufferpool.svg"),
        "Buffer pool, YCSB B uniform (Mops/s, higher is better)",
        "Mops/s",
        &bars,
    );
    let _ = writeln!(
        doc,
        "\n![buffer pool](plots/bufferpool.svg)\n\n### Targets\n\n\
         | target | case | memory | ratio | goal | met |\n|---|---|---|---|---|---|"
    );
    let mut target = |name: &str, case: String, memory: &str, ratio: f64, goal: f64| {
        let met = ratio >= goal;
        let _ = writeln!(
            doc,
            "| {name} | {case} | {memory} | {ratio:.2}× | ≥ {goal}× | {} |",
            if met { "yes" } else { "**no**" }
        );
        if !met {
            losses.push(format!(
                "{name}: buffer pool, {case}, {memory}: {ratio:.2}× (goal ≥ {goal}×, missed)."
            ));
        }
    };
    for r in rows.iter().filter(|r| get(r, "keys") == "uniform") {
        let (what, b) = (get(r, "what"), get(r, "backend"));
        let vs_anon: f64 = get(r, "vs_anon").parse().unwrap_or(0.0);
        let vs_mmap: f64 = get(r, "vs_mmap").parse().unwrap_or(0.0);
        match (what, b) {
            ("all hits", "shmem-thp" | "hugetlb") => target(
                "B1",
                "all hits, against anonymous memory".into(),
                b,
                vs_anon,
                1.2,
            ),
            ("misses dominate", "shmem-thp" | "hugetlb" | "shmem") => {
                target(
                    "B2",
                    "misses dominate, against anonymous memory".into(),
                    b,
                    vs_anon,
                    1.0,
                );
                target(
                    "B2",
                    "misses dominate, against mmap of the file".into(),
                    b,
                    vs_mmap,
                    1.5,
                );
            }
            _ => {}
        }
    }
    for (what, ratio) in scaling {
        target(
            "B3",
            format!("{what}, 2 processes × 1 thread against 1 × 2"),
            "shmem-thp",
            ratio,
            0.9,
        );
    }
    let _ = writeln!(doc);
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `tool` is on the `PATH` (for tools without `--version`).
fn have_command(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// What the population and buffer pool sections need of the machine,
/// set up the way `.ci/run` does when this runs as root: 1024 reserved
/// 2 MiB huge pages and hugetlbfs mounted on `/dev/hugepages`. Otherwise
/// says what is missing (those sections then stop with the library's
/// error, which names the command).
fn prepare_machine() {
    use hugearena::PageSize;
    use hugearena::probe::{HugePagePool, HugetlbfsMount};
    const WANT: u64 = 1024;
    let reserved = || HugePagePool::read(PageSize::Huge2M).map_or(0, |p| p.total);
    let root = nix::unistd::Uid::effective().is_root();
    if reserved() < WANT && root {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", WANT.to_string());
    }
    if reserved() < WANT {
        eprintln!(
            "note: {} huge pages reserved, the population and buffer pool sections need {WANT}: {}",
            reserved(),
            HugePagePool::reserve_command(PageSize::Huge2M, WANT)
        );
    }
    let dir = huge_tmpfs::HUGETLBFS_DIR;
    let mounted = || {
        HugetlbfsMount::list()
            .iter()
            .any(|m| m.path == Path::new(dir) && m.page_size == PageSize::Huge2M)
    };
    if !mounted() && root {
        let _ = huge_tmpfs::mount_hugetlbfs_2m();
    }
    if !mounted() {
        eprintln!(
            "note: no hugetlbfs on {dir}, which the buffer pool section needs: sudo {}",
            huge_tmpfs::hugetlbfs_mount_command()
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// redis-benchmark --csv: (test, rps, p50 ms, p99 ms).
fn redis_bench(port: u16, pipeline: &str, n: &str) -> Vec<(String, f64, f64, f64)> {
    let out = run(Command::new("redis-benchmark").args([
        "-p",
        &port.to_string(),
        "-t",
        "set,get",
        "-c",
        "50",
        "-n",
        n,
        "-P",
        pipeline,
        "-d",
        "100",
        "-r",
        "100000",
        "--csv",
    ]));
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').map(|x| x.trim_matches('"')).collect();
            (c.len() >= 7).then(|| {
                (
                    c[0].to_string(),
                    c[1].parse().unwrap_or(0.0),
                    c[4].parse().unwrap_or(0.0),
                    c[6].parse().unwrap_or(0.0),
                )
            })
        })
        .collect()
}

/// The median of `v` (the upper one of an even count), `None` if empty.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Alternating rounds of redis-benchmark per server and pipeline.
const KV_ROUNDS: usize = 5;

/// Per test, the median of each figure over the rounds (requests/s, p50
/// and p99 each on its own): one round's p99 on this shared machine
/// swings by a third, more than the servers differ.
fn median_rows(rounds: &[Vec<(String, f64, f64, f64)>]) -> Vec<(String, f64, f64, f64)> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (0..first.len())
        .filter_map(|i| {
            let rows: Vec<&(String, f64, f64, f64)> =
                rounds.iter().filter_map(|r| r.get(i)).collect();
            let test = rows.first()?.0.clone();
            Some((
                test,
                median(rows.iter().map(|r| r.1).collect())?,
                median(rows.iter().map(|r| r.2).collect())?,
                median(rows.iter().map(|r| r.3).collect())?,
            ))
        })
        .collect()
}

/// Waits until the server on `port` answers `GET key:KEY` correctly.
fn wait_get(port: u16, key: u64) {
    run(Command::new(example("kvstore")).args([
        "wait-get",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--key",
        &key.to_string(),
    ]));
}

/// P5, computed from the arena table: each goal, the figure, met or not
/// (a miss also goes to the losses).
fn arena_targets(arena: &str, doc: &mut String, losses: &mut Vec<String>) {
    // (range, threads, allocator) → (Mops/s, p99 ns)
    let mut rows = std::collections::HashMap::new();
    for line in arena
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("---"))
    {
        let c: Vec<&str> = line.split('|').map(str::trim).collect();
        if let (Some(range), Some(Ok(threads)), Some(name), Some(Ok(mops)), Some(Ok(p99))) = (
            c.get(1),
            c.get(2).map(|t| t.parse::<u32>()),
            c.get(3),
            c.get(4).map(|m| m.parse::<f64>()),
            c.get(6).map(|p| p.parse::<f64>()),
        ) {
            rows.insert((range.to_string(), threads, name.to_string()), (mops, p99));
        }
    }
    let threads: Vec<u32> = {
        let mut t: Vec<u32> = rows.keys().map(|k| k.1).collect();
        t.sort_unstable();
        t.dedup();
        t
    };
    let get = |range: &str, t: u32, name: &str| {
        rows.get(&(range.to_string(), t, name.to_string())).copied()
    };
    let (small, runs, large) = (
        "small 16 B – 1 KiB",
        "page runs 16 – 256 KiB",
        "large 2 – 8 MiB",
    );
    let mut lines = Vec::new();
    for &t in &threads {
        for (range, goal) in [(small, 1.0), (runs, 0.8), (large, 1.0)] {
            if let (Some(h), Some(g)) = (get(range, t, "hugearena"), get(range, t, "glibc malloc"))
            {
                lines.push((
                    format!("{range}, {t} thread(s): Mops/s against glibc malloc"),
                    h.0 / g.0,
                    format!("≥ {goal}×"),
                    h.0 / g.0 >= goal,
                ));
            }
        }
        if let (Some(h), Some(g)) = (get(small, t, "hugearena"), get(small, t, "glibc malloc")) {
            lines.push((
                format!("{small}, {t} thread(s): p99 against glibc malloc's"),
                h.1 / g.1,
                "≤ 1.5×".into(),
                h.1 <= 1.5 * g.1,
            ));
        }
        if let (Some(h), Some(g)) = (get(large, t, "hugearena"), get(large, t, "glibc malloc")) {
            lines.push((
                format!("{large}, {t} thread(s): p99 against glibc malloc's"),
                h.1 / g.1,
                "< 1×".into(),
                h.1 < g.1,
            ));
        }
    }
    if let (Some(&one), Some(&many)) = (threads.first(), threads.last())
        && many > one
    {
        if let (Some(a), Some(b)) = (get(small, one, "hugearena"), get(small, many, "hugearena")) {
            lines.push((
                format!("{small}: {many} threads against {one}"),
                b.0 / a.0,
                "≥ 1.8×".into(),
                b.0 / a.0 >= 1.8,
            ));
        }
        if let (Some(h), Some(m)) = (
            get(small, many, "hugearena"),
            get(small, many, "mutex + arena"),
        ) {
            lines.push((
                format!("{small}, {many} threads: against the mutex-protected arena"),
                h.0 / m.0,
                "≥ 5×".into(),
                h.0 / m.0 >= 5.0,
            ));
        }
    }
    let _ = writeln!(
        doc,
        "P5, computed from the table:\n\n| what | ratio | goal | met |\n|---|---|---|---|"
    );
    for (what, ratio, goal, met) in lines {
        let _ = writeln!(
            doc,
            "| {what} | {ratio:.2}× | {goal} | {} |",
            if met { "yes" } else { "no" }
        );
        if !met {
            losses.push(format!("P5: {what}: {ratio:.2}× (goal {goal})."));
        }
    }
    let _ = writeln!(doc);
}

fn kv_vs_redis(quick: bool, doc: &mut String, plots: &Path, losses: &mut Vec<String>) {
    let _ = writeln!(doc, "## 6. Key-value example against Redis\n");
    if !have("redis-server") || !have("redis-benchmark") {
        let _ = writeln!(
            doc,
            "Skipped: `redis-server`/`redis-benchmark` not installed (`apt-get install redis-server redis-tools`).\n"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (kp, rp) = (free_port(), free_port());
    // The arena's file on a huge=always tmpfs: where shmem_enabled is
    // never, a memfd region copies every block it collapses.
    let region_dir = match huge_tmpfs::HUGE_TMPFS.mount() {
        Ok(path) => {
            let _ = writeln!(
                doc,
                "The key-value store's arena is an unnamed file on the `huge=always` tmpfs at {} (`--region-dir`).\n",
                path.display()
            );
            Some(path)
        }
        Err(why) => {
            let _ = writeln!(
                doc,
                "Note: {why}; the key-value store's arena is a memfd.\n"
            );
            None
        }
    };
    let start_kv = |eager: bool| {
        let mut c = Command::new(example("kvstore"));
        c.args(["serve", "--addr", &format!("127.0.0.1:{kp}"), "--dir"])
            .arg(dir.path().join("kv"))
            .args(["--size", "3G"]);
        if let Some(d) = &region_dir {
            c.arg("--region-dir").arg(d);
        }
        if eager {
            c.arg("--eager");
        }
        c.stderr(Stdio::null()).spawn().expect("kvstore")
    };
    let start_redis = || {
        Command::new("redis-server")
            .args([
                "--port",
                &rp.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path())
            .args(["--dbfilename", "dump.rdb"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server")
    };
    let n = if quick { "100000" } else { "1000000" };
    let mut kv = start_kv(false);
    let mut redis = start_redis();
    wait_get_ready(kp);
    wait_get_ready(rp);
    let _ = writeln!(
        doc,
        "```sh\nredis-benchmark -p PORT -t set,get -c 50 -n {n} -P {{1,16}} -d 100 -r 100000 --csv\n```\n\n\
         Same parameters against `redis-server` (no persistence) and `kvstore serve` (one worker, one event loop), both on loopback; \
         {KV_ROUNDS} alternating rounds (1 with `--quick`), each figure the median of its rounds (requests/s, p50 and p99 each on its own).\n\n\
         | server | test | pipeline | requests/s | p50 ms | p99 ms | vs Redis |\n|---|---|---|---|---|---|---|"
    );
    let mut bars = Vec::new();
    for pipeline in ["1", "16"] {
        // Alternating rounds, the median of each: one round of loopback
        // requests on a shared 2-vCPU machine swings by several percent.
        let rounds = if quick { 1 } else { KV_ROUNDS };
        let (mut r, mut k) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            r.push(redis_bench(rp, pipeline, n));
            k.push(redis_bench(kp, pipeline, n));
        }
        let (r, k) = (median_rows(&r), median_rows(&k));
        for ((test, rps, p50, p99), (_, krps, kp50, kp99)) in r.iter().zip(&k) {
            let _ = writeln!(
                doc,
                "| Redis | {test} | {pipeline} | {rps:.0} | {p50} | {p99} | 1.00× |"
            );
            let _ = writeln!(
                doc,
                "| hugearena kvstore | {test} | {pipeline} | {krps:.0} | {kp50} | {kp99} | {:.2}× |",
                krps / rps
            );
            if krps < rps {
                losses.push(format!(
                    "KV example against Redis, {test} with pipeline {pipeline}: {krps:.0} against {rps:.0} requests/s ({:.2}×).",
                    krps / rps
                ));
            }
            if kp99 > p99 {
                losses.push(format!(
                    "P6: KV example against Redis, {test} with pipeline {pipeline}: p99 {kp99} ms against {p99} ms."
                ));
            }
            bars.push((format!("Redis {test} P{pipeline}"), rps / 1e3));
            bars.push((format!("kvstore {test} P{pipeline}"), krps / 1e3));
        }
    }
    bar_chart(
        &plots.join("kv_vs_redis.svg"),
        "Throughput (thousand requests/s, higher is better)",
        "k/s",
        &bars,
    );
    // Restart with the same data set.
    let keys: u64 = if quick { 200_000 } else { 1_000_000 };
    for port in [kp, rp] {
        run(Command::new(example("kvstore")).args([
            "load",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--keys",
            &keys.to_string(),
            "--save",
        ]));
    }
    let _ = kv.kill();
    let _ = kv.wait();
    let _ = redis.kill();
    let _ = redis.wait();
    const LAZY: &str = "hugearena kvstore, lazy restore";
    const EAGER: &str = "hugearena kvstore, eager restore";
    const REDIS: &str = "Redis, RDB load";
    const LAZY_FRESH: &str = "hugearena kvstore, lazy restore, fresh memory";
    const EAGER_FRESH: &str = "hugearena kvstore, eager restore, fresh memory";
    let mut samples = Vec::new();
    // Lazy and eager take turns (one 3 s window each is noisy on these
    // machines); each row is the median of its rounds.
    let rounds = if quick { 1 } else { RESTART_ROUNDS };
    let mut runs = Vec::new();
    for _ in 0..rounds {
        runs.push((LAZY, Some(false), Memory::Backed));
        runs.push((EAGER, Some(true), Memory::Backed));
    }
    runs.push((REDIS, None, Memory::Backed));
    if !quick {
        runs.push((LAZY_FRESH, Some(false), Memory::Fresh));
        runs.push((EAGER_FRESH, Some(true), Memory::Fresh));
    }
    for (name, eager, memory) in runs {
        memory.prepare();
        let t = Instant::now();
        let (mut child, port) = match eager {
            Some(e) => (start_kv(e), kp),
            None => (start_redis(), rp),
        };
        wait_get(port, keys / 2);
        // From spawning the server, as the table says.
        let waited = t.elapsed();
        // GETs of random keys right after (checked): during the fill
        // after a lazy restore.
        let gets = eager.map(|_| {
            let out = run(Command::new(example("kvstore")).args([
                "gets",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--keys",
                &keys.to_string(),
                "--secs",
                "3",
            ]));
            out.lines()
                .find(|l| l.starts_with("RESULT"))
                .map(fields)
                .map_or(0.0, |f| number(&f, "gets_per_s"))
        });
        samples.push((name, waited, gets));
        let _ = child.kill();
        let _ = child.wait();
    }
    let restart = median_restarts(&samples);
    let _ = writeln!(
        doc,
        "\n![kv vs redis](plots/kv_vs_redis.svg)\n\nRestart with the same {keys} keys (1000-byte values), from spawning the server to \
         the first correct `GET`, then GETs of random keys for 3 s at once (`kvstore gets`: 4 connections, 16 in flight each, \
         every value checked; after a lazy restore they run while the pages fill); the lazy and eager restarts on backed \
         memory take turns, {rounds} rounds each (1 with `--quick`), each row the median of its rounds. \
         Each restart begins on memory this \
         machine backed just before ({}), but those marked \"fresh memory\", which begin after {} s idle, on memory the \
         host has taken back: on this virtual machine such memory costs several µs per 4 KiB page on first use, which a \
         lazy restore pays while it serves and an eager one before its first reply:\n\n\
         | restart | first correct GET | GET/s in the next 3 s |\n|---|---|---|",
        Memory::BACKED_HOW,
        Memory::FRESH_IDLE.as_secs()
    );
    for (name, d, gets) in &restart {
        let gets = gets.map_or("—".to_string(), |g| format!("{g:.0}"));
        let _ = writeln!(doc, "| {name} | {:.1} ms | {gets} |", d.as_secs_f64() * 1e3);
    }
    // A restart's row: (name, first correct GET, GET/s).
    let row = |name: &str| restart.iter().find(|r| r.0 == name);
    if let (Some((_, _, Some(lazy))), Some((_, _, Some(eager)))) = (row(LAZY), row(EAGER)) {
        let ratio = lazy / eager;
        let _ = writeln!(
            doc,
            "\nGETs during the lazy fill: {ratio:.2}× those after an eager restore (goal ≥ 0.8×).\n"
        );
        if ratio < 0.8 {
            losses.push(format!(
                "P6: GETs right after a lazy restart, {lazy:.0}/s: {ratio:.2}× those after an eager one (goal ≥ 0.8×)."
            ));
        }
    }
    if let (Some((_, _, Some(lazy))), Some((_, eager_waited, Some(eager)))) =
        (row(LAZY_FRESH), row(EAGER_FRESH))
    {
        let _ = writeln!(
            doc,
            "On fresh memory: {:.2}× (the eager restore answered after {:.1} s).\n",
            lazy / eager,
            eager_waited.as_secs_f64()
        );
    }
    if let (Some(lazy), Some(redis)) = (row(LAZY), row(REDIS)) {
        if lazy.1 > redis.1 {
            losses.push(format!(
                "Restart: the lazy restore answered after {:?}, Redis after {:?}.",
                lazy.1, redis.1
            ));
        }
    }
    let _ = writeln!(doc);
}

/// Rounds of the lazy and the eager restart on backed memory.
const RESTART_ROUNDS: usize = 5;

/// One row per restart kind from its rounds `(name, first correct GET,
/// GET/s)`, in first-seen order: the median of each column.
fn median_restarts(
    samples: &[(&'static str, Duration, Option<f64>)],
) -> Vec<(&'static str, Duration, Option<f64>)> {
    let mut names: Vec<&'static str> = Vec::new();
    for s in samples {
        if !names.contains(&s.0) {
            names.push(s.0);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mut waited: Vec<Duration> = samples
                .iter()
                .filter(|s| s.0 == name)
                .map(|s| s.1)
                .collect();
            let gets: Vec<f64> = samples
                .iter()
                .filter(|s| s.0 == name)
                .filter_map(|s| s.2)
                .collect();
            waited.sort();
            (name, waited[waited.len() / 2], median(gets))
        })
        .collect()
}

/// What memory a restart begins on. On a virtual machine, memory the
/// host has not backed yet (or has taken back after the guest freed it)
/// costs several µs per 4 KiB page on first use.
#[derive(Clone, Copy)]
enum Memory {
    /// Memory a process touched and freed just before.
    Backed,
    /// Memory after a long idle pause, which the host takes back.
    Fresh,
}

impl Memory {
    const BACKED_BYTES: usize = 4 << 30;
    const BACKED_HOW: &str = "4 GiB touched and freed";
    const FRESH_IDLE: Duration = Duration::from_secs(45);

    fn prepare(self) {
        match self {
            Memory::Backed => {
                // Touched page by page and unmapped: the pages go back to
                // this machine's free lists, backed.
                let mut m = memmap2::MmapMut::map_anon(Self::BACKED_BYTES).expect("anonymous map");
                for page in m.chunks_mut(4096) {
                    page[0] = 1;
                }
            }
            Memory::Fresh => std::thread::sleep(Self::FRESH_IDLE),
        }
    }
}

fn wait_get_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server on {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let q: &[&str] = if quick { &["--", "--quick"] } else { &[] };
    let plots = root().join("docs/plots");
    std::fs::create_dir_all(&plots).expect("docs/plots");
    eprintln!("building benches and examples");
    cargo(&["build", "--release", "--benches", "--examples"]);
    prepare_machine();
    let started = Instant::now();
    let mut doc = String::new();
    // One section alone, printed rather than written into the report.
    type Section = fn(bool, &mut String, &Path, &mut Vec<String>);
    let alone: [(&str, Section); 3] = [
        ("--only-kv", kv_vs_redis),
        ("--only-bufferpool", buffer_pool),
        ("--only-sqlite", sqlite_pcache),
    ];
    if let Some((_, section)) = alone
        .iter()
        .find(|(flag, _)| std::env::args().any(|a| a == *flag))
    {
        let mut losses = Vec::new();
        section(quick, &mut doc, &plots, &mut losses);
        println!("{doc}");
        for l in &losses {
            println!("- {l}");
        }
        return;
    }
    let _ = writeln!(
        doc,
        "# Benchmarks\n\nProduced by `cargo run --release --example bench_report{}` on {}. \
         These guests are noisy (2 vCPUs, host-side memory management threads): compare numbers within one run, and rerun \
         before trusting a difference under ~30 %. Analysis of individual runs (drivers, arena, restore, the KV demo, the buffer pool): \
         [PERFORMANCE-NOTES.md](PERFORMANCE-NOTES.md).\n",
        if quick { " -- --quick" } else { "" },
        machine()
    );
    let mut losses = Vec::new();
    eprintln!("0. kernel-native first touch");
    let first_touch = cargo(&["bench", "--bench", "first_touch"]);
    let _ = writeln!(
        doc,
        "## 0. Kernel-native first touch, MADV_POPULATE_WRITE and memcpy (the baselines)\n\n```sh\ncargo bench --bench first_touch\n```\n\n{}",
        tables(&first_touch)
    );
    eprintln!("1-2. population");
    population(quick, &mut doc, &plots, &first_touch);
    eprintln!("3. scaling");
    scaling(quick, &mut doc, &plots);
    eprintln!("4. arena");
    let mut args = vec!["bench", "--bench", "arena"];
    args.extend_from_slice(q);
    let arena = cargo(&args);
    let _ = writeln!(
        doc,
        "## 4. Arena allocation against glibc malloc, mimalloc and a mutex-protected arena\n\n```sh\ncargo bench --bench arena{}\n```\n\n{}",
        if quick { " -- --quick" } else { "" },
        tables(&arena)
    );
    arena_targets(&arena, &mut doc, &mut losses);
    eprintln!("5. restore");
    let mut args = vec!["bench", "--bench", "restore"];
    args.extend_from_slice(q);
    let restore = cargo(&args);
    let _ = writeln!(
        doc,
        "## 5. Snapshots and restore\n\n```sh\ncargo bench --bench restore{}\n```\n\n{}",
        if quick { " -- --quick" } else { "" },
        tables(&restore)
    );
    eprintln!("6. kv vs redis");
    kv_vs_redis(quick, &mut doc, &plots, &mut losses);
    eprintln!("7. population targets");
    targets(quick, &mut doc, &restore, &mut losses);
    eprintln!("8. emulated: HGM");
    emulated_hgm(&mut doc);
    eprintln!("9. buffer pool");
    buffer_pool(quick, &mut doc, &plots, &mut losses);
    eprintln!("10. sqlite page cache");
    sqlite_pcache(quick, &mut doc, &plots, &mut losses);
    let _ = writeln!(
        doc,
        "## Where hugearena loses (computed from the tables above)\n"
    );
    for l in &losses {
        let _ = writeln!(doc, "- {l}");
    }
    if losses.is_empty() {
        let _ = writeln!(doc, "- Nowhere in this run.");
    }
    let _ = writeln!(
        doc,
        "\n---\nThe whole report took {:.0} s.\n",
        started.elapsed().as_secs_f64()
    );
    let out = root().join("docs/BENCHMARKS.md");
    std::fs::write(&out, doc).expect("write the report");
    println!("wrote {} and {}", out.display(), plots.display());
}
