//! Snapshot and restore: time to first access after a restore (lazy) for
//! several snapshot sizes, against reading the whole snapshot eagerly; the
//! rate of a full background drain against the file's sequential read
//! bandwidth; and a full against an incremental snapshot after 1 % of the
//! pages changed.
//!
//! ```text
//! cargo bench --bench restore [-- --quick]
//! ```
//!
//! Snapshot files go to `$HUGEARENA_BENCH_DIR` (default: the system temp
//! directory, on disk here). Before every cold measurement the file is
//! dropped from the page cache (`posix_fadvise(DONTNEED)` after `fsync`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hugearena::persist::{self, Snapshotter};
use hugearena::populate::{Driver, FillError, FnSource, PopulateOptions, Populator, SignalSafe};
use hugearena::{BackendKind, Region, RegionOptions};

fn pattern(index: u64, dst: &mut [u8]) -> Result<(), FillError> {
    for (k, chunk) in dst.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(index << 20 | k as u64).to_le_bytes());
    }
    Ok(())
}

fn drop_cache(path: &Path) {
    let f = File::open(path).expect("snapshot");
    f.sync_all().expect("fsync");
    // SAFETY: plain advice syscall on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

type PatternSource = SignalSafe<FnSource<fn(u64, &mut [u8]) -> Result<(), FillError>>>;

/// A region of `len` bytes, every page populated with a pattern.
fn populated(len: usize, track: bool) -> Populator {
    let region = Arc::new(
        Region::create(RegionOptions::new(len as u64).backend(BackendKind::Shmem)).expect("region"),
    );
    let options = PopulateOptions::new()
        .driver(Driver::Proactive)
        .track_writes(track);
    // SAFETY: `pattern` only computes bytes into `dst`.
    let source: PatternSource = unsafe { SignalSafe::new(FnSource(pattern)) };
    let p = Populator::with_options(region, source, options).expect("populator");
    p.populate(0, len).expect("populate");
    p
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Restore → first byte at `offset`, from a cold cache: p50 of 5.
fn first_byte(path: &Path, offset: usize) -> Duration {
    let mut first = Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..5 {
        drop_cache(path);
        let t = Instant::now();
        let p = persist::restore(path, PopulateOptions::new()).expect("restore");
        let mut b = [0u8; 8];
        p.region()
            .read_via_primary(offset, &mut b)
            .expect("first access");
        // Keep the read (and its fault): the bytes are otherwise unused.
        std::hint::black_box(&mut b);
        first.record(t.elapsed().as_nanos() as u64).expect("record");
    }
    Duration::from_nanos(first.value_at_quantile(0.5))
}

/// Reads the whole file with 1 MiB `pread`s.
fn eager_read(path: &Path) -> Duration {
    drop_cache(path);
    let f = File::open(path).expect("snapshot");
    let len = f.metadata().expect("metadata").len();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut at = 0;
    while at < len {
        let n = f.read_at(&mut buf, at).expect("read");
        at += n as u64;
    }
    t.elapsed()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = std::env::var_os("HUGEARENA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let sizes: &[usize] = if quick {
        &[256 << 20, 1 << 30]
    } else {
        &[512 << 20, 1 << 30, 4 << 30]
    };
    println!("## Restore: time to first access, lazy vs eager\n");
    println!(
        "| snapshot | write snapshot | restore → first byte (p50 of 5, cold cache) | eager read of the file (cold) | lazy / eager |"
    );
    println!("|---|---|---|---|---|");
    let mut drains = Vec::new();
    for &len in sizes {
        let path = dir.join(format!("hugearena-bench-{}.snap", len >> 20));
        let info = {
            let p = populated(len, false);
            persist::snapshot(p.region(), &path).expect("snapshot")
        };
        let lazy = first_byte(&path, len / 2);
        let eager = eager_read(&path);
        println!(
            "| {} MiB | {:.2} s | {:.2} ms | {:.2} s ({:.2} GB/s) | {:.5} |",
            len >> 20,
            info.elapsed.as_secs_f64(),
            lazy.as_secs_f64() * 1e3,
            eager.as_secs_f64(),
            gbps(info.file_len, eager),
            lazy.as_secs_f64() / eager.as_secs_f64()
        );
        // Full background drain from a cold cache.
        drop_cache(&path);
        let p = persist::restore(&path, PopulateOptions::new()).expect("restore");
        let t = Instant::now();
        p.start_drain(8 << 20)
            .expect("drain")
            .wait()
            .expect("drain");
        let drain = t.elapsed();
        drains.push((len, drain, eager, info.file_len));
        let _ = std::fs::remove_file(&path);
    }
    // A large sparse snapshot: restore must not grow with the region.
    if !quick {
        let len = 16usize << 30;
        let every = 64;
        let path = dir.join("hugearena-bench-sparse.snap");
        let info = {
            let region = Arc::new(
                Region::create(RegionOptions::new(len as u64).backend(BackendKind::Shmem))
                    .expect("region"),
            );
            // SAFETY: `pattern` only computes bytes into `dst`.
            let source: PatternSource = unsafe { SignalSafe::new(FnSource(pattern)) };
            let options = PopulateOptions::new().driver(Driver::Proactive);
            let p = Populator::with_options(region, source, options).expect("populator");
            for page in (0..len / 4096).step_by(every) {
                p.populate(page * 4096, 4096).expect("populate");
            }
            persist::snapshot(p.region(), &path).expect("snapshot")
        };
        println!(
            "| {} MiB, sparse ({} MiB present) | {:.2} s | {:.2} ms | — | — |",
            len >> 20,
            info.data_bytes >> 20,
            info.elapsed.as_secs_f64(),
            first_byte(&path, len / 2).as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_file(&path);
    }
    println!("\n## Full background drain (cold cache, crc32c verified) vs sequential read\n");
    println!("| snapshot | drain | drain rate | file read rate | drain / read |");
    println!("|---|---|---|---|---|");
    for (len, drain, eager, file_len) in drains {
        println!(
            "| {} MiB | {:.2} s | {:.2} GB/s | {:.2} GB/s | {:.2} |",
            len >> 20,
            drain.as_secs_f64(),
            gbps(len as u64, drain),
            gbps(file_len, eager),
            gbps(len as u64, drain) / gbps(file_len, eager)
        );
    }

    // Incremental after 1 % of the pages changed.
    let len = if quick { 256 << 20 } else { 1 << 30 };
    let p = populated(len, true);
    let mut snap = Snapshotter::new();
    let base = dir.join("hugearena-bench-base.snap");
    let full = snap.full(&p, &base).expect("full snapshot");
    let pages = len / 4096;
    let mut page = vec![0xABu8; 4096];
    for i in (0..pages).step_by(100) {
        page[0] = i as u8;
        p.region()
            .write_via_primary(i * 4096, &page)
            .expect("write");
    }
    let inc_path = dir.join("hugearena-bench-inc.snap");
    let inc = snap.incremental(&p, &inc_path).expect("incremental");
    let full_again =
        persist::snapshot(p.region(), dir.join("hugearena-bench-full2.snap")).expect("full");
    let on_disk = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("metadata").blocks() * 512
    };
    println!(
        "\n## Incremental snapshot after changing 1 % of the pages ({} MiB region)\n",
        len >> 20
    );
    println!("| snapshot | pages written | data written | on disk | time |");
    println!("|---|---|---|---|---|");
    for (name, info, path) in [
        ("full (base)", &full, base.clone()),
        ("incremental", &inc, inc_path.clone()),
        (
            "full again",
            &full_again,
            dir.join("hugearena-bench-full2.snap"),
        ),
    ] {
        println!(
            "| {name} | {} | {:.1} MiB | {:.1} MiB | {:.3} s |",
            info.present,
            info.data_bytes as f64 / (1 << 20) as f64,
            on_disk(&path) as f64 / (1 << 20) as f64,
            info.elapsed.as_secs_f64()
        );
        let _ = std::fs::remove_file(&path);
    }
}
