//! Lazy restore with a background drain: takes a snapshot of a patterned
//! region (or uses the one given), restores it, touches one page at once,
//! then drains the rest at low priority with a progress bar, and verifies.
//!
//! ```text
//! cargo run --release --example restore -- [--size MIB] [SNAPSHOT]
//! ```

#[path = "support/human.rs"]
mod human;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hugearena::persist;
use hugearena::populate::{Driver, FillError, FnSource, PopulateOptions, Populator, SignalSafe};
use hugearena::{BackendKind, Region, RegionOptions};

fn byte_at(offset: usize) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9) >> 13) as u8 ^ (offset >> 12) as u8
}

fn fill(index: u64, dst: &mut [u8]) -> Result<(), FillError> {
    let base = index as usize * dst.len();
    for (i, b) in dst.iter_mut().enumerate() {
        *b = byte_at(base + i);
    }
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mib: usize = args
        .iter()
        .position(|a| a == "--size")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(512), |s| s.parse())
        .unwrap_or_else(|e| fail(format!("--size: {e}")));
    let given = args
        .iter()
        .find(|a| !a.starts_with("--") && a.parse::<usize>().is_err());
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(e));
    let path = match given {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let len = size_mib << 20;
            let region = Region::create(RegionOptions::new(len as u64).backend(BackendKind::Shmem))
                .unwrap_or_else(|e| fail(e));
            let fill = fill as fn(u64, &mut [u8]) -> Result<(), FillError>;
            // SAFETY: `fill` only computes bytes into `dst`.
            let source = unsafe { SignalSafe::new(FnSource(fill)) };
            let options = PopulateOptions::new().driver(Driver::Proactive);
            let p = Populator::with_options(Arc::new(region), source, options)
                .unwrap_or_else(|e| fail(e));
            p.populate(0, len).unwrap_or_else(|e| fail(e));
            let path = dir.path().join("demo.snap");
            let info = persist::snapshot(p.region(), &path).unwrap_or_else(|e| fail(e));
            println!(
                "snapshot: {} pages, {} MiB, written in {:.2} s",
                info.present,
                info.data_bytes >> 20,
                info.elapsed.as_secs_f64()
            );
            path
        }
    };
    let started = Instant::now();
    let p = persist::restore(&path, PopulateOptions::new()).unwrap_or_else(|e| fail(e));
    let restored = started.elapsed();
    let region = p.region().clone();
    let mut byte = [0u8; 1];
    region
        .read_via_primary(region.len() / 2, &mut byte)
        .unwrap_or_else(|e| fail(e));
    // Keep the read (and its fault): the byte is otherwise unused.
    std::hint::black_box(&mut byte);
    println!(
        "restored {} in {:.2} ms; first access after {:.2} ms ({} page read)",
        human::bytes(region.len() as u64),
        restored.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3,
        p.stats().fills
    );
    let fills_before = p.stats().fills;
    let drain = p.start_drain(8 << 20).unwrap_or_else(|e| fail(e));
    let t = Instant::now();
    loop {
        let (done, total) = drain.progress();
        let width = 40;
        let filled = (done * width / total.max(1)) as usize;
        eprint!(
            "\rdraining [{}{}] {:>3}% {done}/{total} pages",
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            done * 100 / total.max(1)
        );
        if drain.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!();
    drain.wait().unwrap_or_else(|e| fail(e));
    let secs = t.elapsed().as_secs_f64();
    // Runs of holes are left to their first touch: the rate is of the
    // pages the drain filled.
    let filled = (p.stats().fills - fills_before) * region.granule().bytes() as u64;
    println!(
        "drained in {:.2} s ({} filled, {:.2} GB/s, every page checked against its crc32c)",
        secs,
        human::bytes(filled),
        filled as f64 / secs / 1e9
    );
    if given.is_none() {
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..region.len()).step_by(buf.len()) {
            region
                .read_via_primary(off, &mut buf)
                .unwrap_or_else(|e| fail(e));
            if let Some(i) = (0..buf.len()).find(|&i| buf[i] != byte_at(off + i)) {
                fail(format!("byte {} differs after restore", off + i));
            }
        }
        println!("every byte verified");
    }
    println!("{}", p.stats());
    if !p.errors().is_empty() {
        println!("corrupt pages (poisoned): {:?}", p.errors());
    }
}
