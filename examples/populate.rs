//! Runs the population engine end to end: a region filled on first touch
//! from a snapshot-like file (or zeroes), touched by two threads in random
//! order, then a report of the backend (and why), the driver, the counters
//! and latency percentiles.
//!
//! ```text
//! cargo run --release --example populate -- [--backend auto|shmem|thp|hugetlb]
//!     [--driver in-thread|handlers:N|proactive] [--size MIB] [--source file|zero]
//!     [--order random|sequential] [--threads N] [--spin-us N] [--second-process]
//!     [--dir DIR] [--touches N]
//! ```
//!
//! `--touches N` touches only N random 4 KiB pages (the same ones whatever
//! the backend, split between the threads) instead of every granule: the
//! sparse pattern huge-page population is worst at. The report then gives
//! the bytes filled for them.
//!
//! `--dir` puts the region's file in `DIR` (a tmpfs, say one mounted with
//! `huge=always`, or a hugetlbfs) instead of an anonymous memfd.
//!
//! `--second-process` then starts a second process that opens the same
//! region and touches every page the same way: it maps pages the first one
//! filled, and its fill counter stays 0.
//!
//! ```text
//! ```

#[path = "support/human.rs"]
mod human;
#[path = "support/order.rs"]
mod order;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use hugearena::populate::{
    Driver, FileSource, PopulateOptions, Populator, SignalSafeSource, ZeroSource,
};
use hugearena::{BackendKind, HugePages, Region, RegionOptions};

struct Args {
    backend: Option<BackendKind>,
    driver: Driver,
    size: u64,
    from_file: bool,
    sequential: bool,
    threads: usize,
    /// Handler threads spin this long before sleeping.
    spin_us: u64,
    second_process: bool,
    /// Where the region's file lives (default: an anonymous memfd).
    dir: Option<std::path::PathBuf>,
    /// Touch only this many random 4 KiB pages.
    touches: Option<usize>,
    /// Internal: this is the second process, attached to this region.
    attach: Option<String>,
    /// Internal: the first process's source file.
    source_file: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        backend: None,
        driver: Driver::InThread,
        size: 256 << 20,
        from_file: true,
        sequential: false,
        threads: 2,
        spin_us: 0,
        second_process: false,
        dir: None,
        touches: None,
        attach: None,
        source_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "auto" => None,
                    "shmem" => Some(BackendKind::Shmem),
                    "thp" => Some(BackendKind::ShmemThp),
                    "hugetlb" => Some(BackendKind::Hugetlb),
                    "hgm" => Some(BackendKind::HugetlbHgm),
                    other => return Err(format!("unknown backend {other}")),
                }
            }
            "--driver" => {
                let v = value()?;
                args.driver = match v.split_once(':') {
                    Some(("handlers", n)) => {
                        Driver::HandlerThreads(n.parse().map_err(|e| format!("{v}: {e}"))?)
                    }
                    _ if v == "handlers" => Driver::HandlerThreads(2),
                    _ if v == "in-thread" => Driver::InThread,
                    _ if v == "proactive" => Driver::Proactive,
                    _ => return Err(format!("unknown driver {v}")),
                }
            }
            "--size" => {
                let mib: u64 = value()?.parse().map_err(|e| format!("--size: {e}"))?;
                args.size = mib << 20;
            }
            "--source" => args.from_file = value()? == "file",
            "--order" => args.sequential = value()? == "sequential",
            "--second-process" => args.second_process = true,
            "--dir" => args.dir = Some(value()?.into()),
            "--touches" => {
                args.touches = Some(value()?.parse().map_err(|e| format!("--touches: {e}"))?)
            }
            "--attach" => args.attach = Some(value()?),
            "--source-file" => args.source_file = Some(value()?),
            "--spin-us" => {
                args.spin_us = value()?.parse().map_err(|e| format!("--spin-us: {e}"))?;
            }
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?;
                if args.threads == 0 {
                    return Err("--threads must be at least 1".into());
                }
            }
            other => return Err(format!("unknown argument {other} (see the example's docs)")),
        }
    }
    Ok(args)
}

fn byte_at(offset: usize) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9) >> 13) as u8 ^ (offset >> 12) as u8
}

/// A snapshot-like file of `size` patterned bytes.
fn snapshot(size: usize) -> std::io::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::NamedTempFile::new()?;
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..size).step_by(buf.len()) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte_at(off + i);
        }
        f.write_all(&buf[..(size - off).min(buf.len())])?;
    }
    f.flush()?;
    Ok(f)
}

fn order(granules: usize, granule: usize, seed: u64, sequential: bool) -> Vec<usize> {
    if sequential {
        (0..granules).map(|i| i * granule).collect()
    } else {
        order::shuffled(granules, granule, seed)
    }
}

/// Touches every granule (the first byte of each), timing each touch.
fn touch(p: &Populator, offsets: &[usize]) -> Histogram<u64> {
    let mut h = Histogram::new(3).expect("valid precision");
    let region = p.region();
    let mut byte = [0u8; 1];
    for &off in offsets {
        let t = Instant::now();
        if p.driver() == Driver::Proactive {
            p.populate(off, 1).expect("populate");
        }
        region.read_via_primary(off, &mut byte).expect("in bounds");
        // The byte is otherwise unused: keep the read (and its fault).
        std::hint::black_box(&mut byte);
        h.record(t.elapsed().as_nanos() as u64)
            .expect("auto-resizing");
    }
    h
}

fn run<S: SignalSafeSource + 'static>(
    region: Arc<Region>,
    source: S,
    args: &Args,
    check: impl Fn(usize) -> u8,
) -> Result<(), Box<dyn std::error::Error>> {
    let options = PopulateOptions::new()
        .driver(args.driver)
        .handler_spin(std::time::Duration::from_micros(args.spin_us));
    let p = Populator::with_options(region.clone(), source, options)?;
    let g = region.granule().bytes();
    let granules = region.len() / g;
    // Sparse: N random 4 KiB pages, the same for every backend, dealt out
    // to the threads in turn.
    let sparse: Option<Vec<usize>> = args.touches.map(|n| {
        let mut pages = order::shuffled(region.len() / 4096, 4096, 0x5A4A5E);
        pages.truncate(n);
        pages
    });
    let started = Instant::now();
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|t| {
                let p = &p;
                let offsets = match &sparse {
                    Some(pages) => pages
                        .iter()
                        .skip(t)
                        .step_by(args.threads)
                        .copied()
                        .collect(),
                    None => order(granules, g, t as u64 + 1, args.sequential),
                };
                s.spawn(move || touch(p, &offsets))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("toucher"))
            .collect()
    });
    let elapsed = started.elapsed();
    p.flush_promotions();
    let mut touches = Histogram::<u64>::new(3).expect("valid precision");
    for h in hists {
        touches.add(h).expect("same precision");
    }

    // Counted before the check, which touches what was not touched yet.
    let stats = p.stats();
    let mut buf = vec![0u8; 1 << 20];
    match &sparse {
        Some(pages) => {
            for &off in pages {
                region.read_via_primary(off, &mut buf[..4096])?;
                if let Some(i) = (0..4096).find(|&i| buf[i] != check(off + i)) {
                    return Err(format!("byte {} differs from the source", off + i).into());
                }
            }
        }
        None => {
            for off in (0..region.len()).step_by(buf.len()) {
                region.read_via_primary(off, &mut buf)?;
                if let Some(i) = (0..buf.len()).find(|&i| buf[i] != check(off + i)) {
                    return Err(format!("byte {} differs from the source", off + i).into());
                }
            }
        }
    }
    println!("driver:    {}", p.driver());
    println!(
        "populated: {} in {:.1} ms by {} threads ({:.2} GB/s); every byte verified",
        human::bytes(region.len() as u64),
        elapsed.as_secs_f64() * 1e3,
        args.threads,
        region.len() as f64 / elapsed.as_secs_f64() / 1e9
    );
    println!("counters:  {stats}");
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "touch latency (first byte of each granule, all threads, {} touches): \
         p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.1} µs",
        touches.len(),
        us(&touches, 0.5),
        us(&touches, 0.99),
        us(&touches, 0.999),
        touches.max() as f64 / 1e3
    );
    // One machine-readable line for scripts/bench.sh.
    println!(
        "RESULT process={} backend={} driver={} order={} threads={} wall_ms={:.1} gbps={:.3} p50_us={:.2} p99_us={:.2} p999_us={:.2} faults={} readahead={} fills={} touches={} bytes_filled={}",
        if args.attach.is_some() {
            "second"
        } else {
            "first"
        },
        region.backend().kind(),
        p.driver(),
        if args.sequential {
            "sequential"
        } else {
            "random"
        },
        args.threads,
        elapsed.as_secs_f64() * 1e3,
        region.len() as f64 / elapsed.as_secs_f64() / 1e9,
        us(&touches, 0.5),
        us(&touches, 0.99),
        us(&touches, 0.999),
        stats.faults_handler + stats.faults_in_thread,
        stats.readahead,
        stats.fills,
        touches.len(),
        stats.fills * g as u64
    );
    let errors = p.errors();
    if !errors.is_empty() {
        println!("source errors: {errors:?}");
    }
    Ok(())
}

fn driver_arg(d: Driver) -> String {
    match d {
        Driver::HandlerThreads(n) => format!("handlers:{n}"),
        Driver::InThread => "in-thread".into(),
        Driver::Proactive => "proactive".into(),
    }
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(path) = &args.attach {
        let region = Arc::new(Region::open(path).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1)
        }));
        let result = match &args.source_file {
            Some(f) => run(
                region,
                FileSource::open(f).expect("the first process's source"),
                &args,
                byte_at,
            ),
            None => run(region, ZeroSource, &args, |_| 0),
        };
        if let Err(e) = result {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut options = RegionOptions::new(args.size);
    options = match args.backend {
        Some(kind) => options.backend(kind),
        None => options.huge_pages(HugePages::Try),
    };
    let file_path = args
        .dir
        .as_ref()
        .map(|dir| dir.join(format!("hugearena-populate-{}", std::process::id())));
    if let Some(path) = &file_path {
        options = options.path(path);
    }
    let region = match Region::create(options) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let choice = region.choice();
    println!(
        "backend:   {} (granule {}): {}",
        choice.backend.kind(),
        region.granule(),
        choice.reason
    );
    let second = |file: Option<&std::path::Path>| {
        if !args.second_process {
            return;
        }
        println!("second process:");
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("own path"));
        cmd.arg("--attach")
            .arg(region.shareable_path())
            .args(["--driver", &driver_arg(args.driver)])
            .args(["--threads", &args.threads.to_string()])
            .args([
                "--order",
                if args.sequential {
                    "sequential"
                } else {
                    "random"
                },
            ]);
        if let Some(f) = file {
            cmd.arg("--source-file").arg(f);
        }
        let status = cmd.status().expect("second process");
        assert!(status.success(), "second process failed: {status}");
    };
    let result = if args.from_file {
        let file = snapshot(region.len()).expect("temporary snapshot file");
        println!("source:    file {}", file.path().display());
        let source = FileSource::open(file.path()).expect("open the snapshot");
        let r = run(region.clone(), source, &args, byte_at);
        second(Some(file.path()));
        r
    } else {
        println!("source:    zeroes");
        let r = run(region.clone(), ZeroSource, &args, |_| 0);
        second(None);
        r
    };
    if let Some(path) = &file_path {
        let _ = std::fs::remove_file(path);
    }
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
