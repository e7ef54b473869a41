//! A database buffer pool on hugearena: a data file larger than the pool's
//! memory budget, cached in a hugearena region that several processes
//! share. A miss fills a frame from the file (`Populator::populate`), a
//! full pool evicts in batches (`write_back` of dirty pages, then
//! `discard`), and every process sees the same frames. The buffer manager
//! is in the style of vmcache: one state word per page, optimistic reads,
//! second-chance clock eviction; an index (a static hash index stored in
//! pages) sits on top, and a YCSB-like workload runs on it. Every read is
//! checked; at the end dirty pages are written back and the file checked.
//!
//! ```text
//! cargo run --release --example bufferpool -- [--backend B] [--data SIZE] [--pool SIZE]
//!     [--processes N] [--threads N] [--workload c|b|a] [--keys zipf|uniform]
//!     [--seconds S] [--dir DIR] [--kill-after S] [--no-verify]
//! ```
//!
//! `B` is `shmem-thp` (the default: 4 KiB frames, 2 MiB mappings where a
//! block is resident whole), `hugetlb` (2 MiB frames: a miss reads 2 MiB),
//! `shmem`, `auto` (hugearena's general-purpose choice, which prefers
//! reserved huge pages), or a baseline without hugearena: `anon`
//! (anonymous memory, `pread` on a miss, `MADV_DONTNEED` to evict) or
//! `mmap` (a shared mapping of the data file).
//! `SIZE` takes K, M and G suffixes. `--kill-after S` kills one worker
//! process with SIGKILL after S seconds; the others take its page locks
//! over and go on. The data file is built once in `DIR` (default
//! `/tmp/hugearena-bufferpool`, one file per size) and reused; the pool's
//! metadata and region files are removed at exit. The last line of output
//! (`RESULT ...`) is for scripts.

#[allow(dead_code)] // the huge=advise mount is for the tests
#[path = "../support/huge_tmpfs.rs"]
mod huge_tmpfs;
#[path = "../support/human.rs"]
mod human;

mod frames;
mod liveness;
mod pool;
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hugearena::BackendKind;

use frames::{AnonFrames, Frames, HugearenaFrames, MmapFrames};
use pool::{BufferPool, MAX_THREADS, PAGE};
use workload::{KeyDist, Layout, Mix, Tally};

struct Args {
    backend: String,
    data: u64,
    pool: u64,
    processes: usize,
    threads: usize,
    mix: Mix,
    keys: String,
    seconds: f64,
    dir: PathBuf,
    kill_after: Option<f64>,
    verify: bool,
    /// Set in a worker process: its metadata and region paths.
    child: Option<(PathBuf, PathBuf, u64)>,
}

fn usage(problem: &str) -> ! {
    eprintln!("bufferpool: {problem}\n(see the top of examples/bufferpool/main.rs for the flags)");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        backend: "shmem-thp".into(),
        data: 256 << 20,
        pool: 64 << 20,
        processes: 2,
        threads: 1,
        mix: Mix::ReadMostly,
        keys: "zipf".into(),
        seconds: 5.0,
        dir: PathBuf::from("/tmp/hugearena-bufferpool"),
        kill_after: None,
        verify: true,
        child: None,
    };
    let mut it = std::env::args().skip(1);
    let mut meta = None;
    let mut region = None;
    let mut seed = 0;
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let number = |s: String| {
            s.parse::<f64>()
                .unwrap_or_else(|_| usage(&format!("{flag}: not a number: {s}")))
        };
        match flag.as_str() {
            "--backend" => a.backend = value(),
            "--data" => a.data = human::parse_size(&value()).unwrap_or_else(|e| usage(&e)),
            "--pool" => a.pool = human::parse_size(&value()).unwrap_or_else(|e| usage(&e)),
            "--processes" => a.processes = number(value()) as usize,
            "--threads" => a.threads = number(value()) as usize,
            "--workload" => {
                a.mix = Mix::parse(&value()).unwrap_or_else(|| usage("--workload is c, b or a"))
            }
            "--keys" => a.keys = value(),
            "--seconds" => a.seconds = number(value()),
            "--dir" => a.dir = PathBuf::from(value()),
            "--kill-after" => a.kill_after = Some(number(value())),
            "--no-verify" => a.verify = false,
            "--child-meta" => meta = Some(PathBuf::from(value())),
            "--child-region" => region = Some(PathBuf::from(value())),
            "--child-seed" => seed = number(value()) as u64,
            "-h" | "--help" => usage("usage"),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if let (Some(meta), Some(region)) = (meta, region) {
        a.child = Some((meta, region, seed));
    }
    if a.threads == 0 || a.threads > MAX_THREADS || a.processes == 0 || a.processes > 16 {
        usage(&format!("1 to {MAX_THREADS} threads and 1 to 16 processes"));
    }
    if a.data < 2 << 20 || a.data % (2 << 20) != 0 || a.pool < 2 << 20 {
        usage("--data is a multiple of 2 MiB, --pool at least 2 MiB");
    }
    a
}

fn main() {
    let args = parse_args();
    let data = args.dir.join(format!("data-{}M.db", args.data >> 20));
    if let Some((meta, region, seed)) = &args.child {
        std::process::exit(match worker_process(&args, &data, meta, region, *seed) {
            Ok(()) => 0,
            Err(e) => {
                println!("ERROR {e}");
                1
            }
        });
    }
    if let Err(e) = launch(&args, &data) {
        eprintln!("bufferpool: {e}");
        std::process::exit(1);
    }
}

/// A worker process: opens the pool, waits for the start, runs its threads
/// and prints their merged tally.
fn worker_process(
    args: &Args,
    data: &Path,
    meta: &Path,
    region: &Path,
    seed: u64,
) -> Result<(), String> {
    let frames = HugearenaFrames::open(region, data, args.pool >= args.data)
        .map_err(|e| format!("opening the region: {e}"))?;
    let pool = BufferPool::open(meta, Box::new(frames))
        .map_err(|e| format!("attaching to the pool: {e}"))?;
    let waited = Instant::now();
    while !pool.started() {
        if waited.elapsed() > Duration::from_secs(60) {
            return Err("the launcher did not start the run within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let tally = run_threads(&pool, args, seed)?;
    let buckets: Vec<String> = tally
        .latency
        .iter_recorded()
        .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
        .collect();
    println!(
        "TALLY {} {} {}",
        tally.ops,
        tally.updates,
        buckets.join(",")
    );
    Ok(())
}

fn run_threads(pool: &BufferPool, args: &Args, seed: u64) -> Result<Tally, String> {
    let keys = KeyDist::parse(&args.keys, Layout::new(pool.pages()).keys())
        .ok_or("--keys is zipf or uniform")?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let results: Vec<Result<Tally, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|t| {
                let keys = &keys;
                s.spawn(move || {
                    workload::run(
                        pool,
                        t,
                        args.mix,
                        keys,
                        seed * 64 + t as u64 + 1,
                        deadline,
                        u64::MAX,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a worker thread panicked".into()))
            })
            .collect()
    });
    let mut total: Option<Tally> = None;
    for r in results {
        let t = r?;
        match &mut total {
            None => total = Some(t),
            Some(sum) => {
                sum.ops += t.ops;
                sum.updates += t.updates;
                sum.latency.add(&t.latency).map_err(|e| e.to_string())?;
            }
        }
    }
    total.ok_or_else(|| "no threads".into())
}

/// Frames for the backend asked for; the region path when it has one.
fn open_frames(args: &Args, data: &Path) -> Result<(Box<dyn Frames>, Option<PathBuf>), String> {
    let kind = match args.backend.as_str() {
        "anon" => {
            return AnonFrames::new(data)
                .map(|f| (Box::new(f) as Box<dyn Frames>, None))
                .map_err(|e| e.to_string());
        }
        "mmap" => {
            return MmapFrames::new(data)
                .map(|f| (Box::new(f) as Box<dyn Frames>, None))
                .map_err(|e| e.to_string());
        }
        "auto" => None,
        "shmem-thp" => Some(BackendKind::ShmemThp),
        "hugetlb" => Some(BackendKind::Hugetlb),
        "shmem" => Some(BackendKind::Shmem),
        other => {
            return Err(format!(
                "unknown backend {other}: auto, shmem-thp, hugetlb, shmem, anon or mmap"
            ));
        }
    };
    let name = format!("hugearena-bufferpool-{}", std::process::id());
    let (frames, path) = HugearenaFrames::create(kind, &name, data, args.pool >= args.data)
        .map_err(|e| format!("creating the region: {e}"))?;
    Ok((Box::new(frames), Some(path)))
}

/// Removes the pool's files when the launcher ends, however it ends.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn launch(args: &Args, data: &Path) -> Result<(), String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let pages = (args.data / PAGE as u64) as usize;
    if std::fs::metadata(data).map(|m| m.len()).ok() != Some(args.data) {
        println!(
            "building {} ({} pages of {} records)",
            data.display(),
            pages,
            workload::RECORDS
        );
        workload::build(data, pages).map_err(|e| format!("{}: {e}", data.display()))?;
    }
    workload::warm_page_cache(data).map_err(|e| format!("{}: {e}", data.display()))?;

    let (frames, region) = open_frames(args, data)?;
    if region.is_none() && args.processes > 1 {
        return Err(format!(
            "the {} baseline is one process: use --processes 1",
            args.backend
        ));
    }
    let frame_len = frames.frame_len();
    let budget = (args.pool as usize / frame_len).max(1);
    // The page words on huge pages too where the machine allows (the
    // same for every backend): a lookup touches its page's word first.
    let meta = Path::new(frames::metadata_dir())
        .join(format!("hugearena-bufferpool-{}.meta", std::process::id()));
    let _cleanup = Cleanup(
        [Some(meta.clone()), region.clone()]
            .into_iter()
            .flatten()
            .collect(),
    );
    let description = frames.describe();
    let pool = BufferPool::create(&meta, pages, budget, frames)
        .map_err(|e| format!("creating the pool: {e}"))?;
    let keys =
        KeyDist::parse(&args.keys, Layout::new(pages).keys()).ok_or("--keys is zipf or uniform")?;
    println!(
        "bufferpool: {} of data, a {} pool ({budget} frames of {}), {} process(es) x {} thread(s), {} {} keys, {} s",
        human::bytes(args.data),
        human::bytes(args.pool),
        human::bytes(frame_len as u64),
        args.processes,
        args.threads,
        args.mix.name(),
        keys.name(),
        args.seconds
    );
    println!("backend: {description}");

    workload::preload(&pool, budget * frame_len / PAGE, Duration::from_secs(120))?;
    let mut children = spawn_workers(args, &meta, region.as_deref())?;
    let waited = Instant::now();
    while pool.attached() < args.processes {
        if waited.elapsed() > Duration::from_secs(30)
            || children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            return Err("a worker process did not attach to the pool".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = pool.counters();
    let started = Instant::now();
    pool.signal_start();
    let killer = args
        .kill_after
        .filter(|_| !children.is_empty())
        .map(|after| {
            let pid = children[0].id();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(after));
                // SAFETY: kill(2) on a child this process spawned and has not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            })
        });
    let mut total = run_threads(&pool, args, 0)?;
    let mut killed = 0;
    for (i, child) in children.into_iter().enumerate() {
        match collect_worker(child, args.seconds + 120.0)? {
            Some(t) => {
                total.ops += t.ops;
                total.updates += t.updates;
                total.latency.add(&t.latency).map_err(|e| e.to_string())?;
            }
            None if args.kill_after.is_some() && i == 0 => killed += 1,
            None => return Err(format!("worker process {} died", i + 1)),
        }
    }
    if let Some(k) = killer {
        let _ = k.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = pool.counters();
    let recovered = pool.recover_dead();
    let loads = after.loads - before.loads;
    let evictions = after.evictions - before.evictions;
    let p50 = total.latency.value_at_quantile(0.5);
    let p99 = total.latency.value_at_quantile(0.99);
    let ops_per_s = total.ops as f64 / elapsed;
    println!(
        "throughput: {:.2} Mops/s ({} operations, {} updates; p50 {} ns, p99 {} ns)",
        ops_per_s / 1e6,
        total.ops,
        total.updates,
        p50,
        p99
    );
    println!(
        "hit rate {:.2} %: {:.0} misses/s, {:.0} evictions/s, {} write-backs, {} locks of dead processes taken over{}",
        100.0 * (1.0 - loads as f64 / total.ops.max(1) as f64),
        loads as f64 / elapsed,
        evictions as f64 / elapsed,
        after.write_backs - before.write_backs,
        after.takeovers,
        if killed > 0 {
            format!(" (1 worker killed with SIGKILL, {recovered} dead process recovered)")
        } else {
            String::new()
        }
    );
    if let Some(counters) = pool.frames().counters() {
        println!("this process's populator: {counters}");
    }
    let resident = after.resident * frame_len as u64;
    let memory = pool.frames().memory();
    println!(
        "resident: {} of frames in a {} pool; memory held: {}",
        human::bytes(resident),
        human::bytes(args.pool),
        human::bytes(memory)
    );
    if args.verify {
        let flushed = pool
            .flush()
            .map_err(|e| format!("writing back dirty pages: {e}"))?;
        let checked = workload::verify_file(data, pages, |p| pool.committed(p))?;
        println!(
            "checked: every read, and the data file after {flushed} write-backs ({checked} pages): ok"
        );
    }
    println!(
        "RESULT backend={} data_mib={} pool_mib={} processes={} threads={} workload={} keys={} ops_per_s={:.0} p50_ns={p50} p99_ns={p99} hit_rate={:.4} misses_per_s={:.0} evictions_per_s={:.0} resident_mib={} memory_mib={}",
        args.backend,
        args.data >> 20,
        args.pool >> 20,
        args.processes,
        args.threads,
        args.mix.name(),
        keys.name(),
        ops_per_s,
        1.0 - loads as f64 / total.ops.max(1) as f64,
        loads as f64 / elapsed,
        evictions as f64 / elapsed,
        resident >> 20,
        memory >> 20
    );
    Ok(())
}

fn spawn_workers(args: &Args, meta: &Path, region: Option<&Path>) -> Result<Vec<Child>, String> {
    let Some(region) = region else {
        return Ok(Vec::new());
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    (1..args.processes)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--data",
                    &format!("{}M", args.data >> 20),
                    "--pool",
                    &format!("{}M", args.pool >> 20),
                ])
                .args([
                    "--threads",
                    &args.threads.to_string(),
                    "--seconds",
                    &args.seconds.to_string(),
                ])
                .args(["--workload", args.mix.letter(), "--keys", &args.keys])
                .arg("--dir")
                .arg(&args.dir)
                .arg("--child-meta")
                .arg(meta)
                .arg("--child-region")
                .arg(region)
                .args(["--child-seed", &i.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting worker process {i}: {e}"))
        })
        .collect()
}

/// A worker's tally; `None` if it was killed by a signal.
fn collect_worker(mut child: Child, limit_s: f64) -> Result<Option<Tally>, String> {
    let started = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if started.elapsed().as_secs_f64() > limit_s {
            let _ = child.kill();
            return Err("a worker process ran past its deadline".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if std::os::unix::process::ExitStatusExt::signal(&out.status).is_some() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(e) = text.lines().find_map(|l| l.strip_prefix("ERROR ")) {
        return Err(format!("worker process: {e}"));
    }
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("TALLY "))
        .ok_or("a worker process printed no tally")?;
    let mut parts = line.split(' ');
    let mut num = || {
        parts
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("a garbled tally")
    };
    let (ops, updates) = (num()?, num()?);
    let mut latency = hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 2)
        .map_err(|e| e.to_string())?;
    for pair in line
        .split(' ')
        .nth(2)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (v, n) = pair.split_once(':').ok_or("a garbled tally")?;
        let (v, n) = (
            v.parse().map_err(|_| "a garbled tally")?,
            n.parse().map_err(|_| "a garbled tally")?,
        );
        latency.record_n(v, n).map_err(|e| e.to_string())?;
    }
    Ok(Some(Tally {
        ops,
        updates,
        latency,
    }))
}
