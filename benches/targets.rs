//! The population targets, each against its kernel-native baseline in the
//! same process, with warm and with fresh memory:
//!
//! - P1: sequential population of a `ShmemThp` region (zero and file
//!   source, one thread; by touching, and by one `populate` call) against
//!   a kernel-native anonymous first touch (goal: ≥ 2× its throughput).
//!   The kernel's own huge-page first touch (a file on a tmpfs mounted
//!   `huge=always`) is shown as the native equivalent of block allocation.
//! - P2a: `populate` of one random page whose block is allocated, then a
//!   touch, against a kernel-native shmem minor fault (goal: p50 ≤ 0.8×).
//!   Pages 64 KiB apart, so the kernel's fault-around never maps a page
//!   before it is measured.
//! - P2b: random 4 KiB first touches of a `Shmem` region against a
//!   kernel-native shmem first touch (goal: p50 ≤ 1.5× in-thread, ≤ 2×
//!   with handler threads).
//!
//! ```text
//! cargo bench --bench targets [-- --quick]
//! ```
//!
//! **Fresh** memory: measured after 4 s without allocating. These guests
//! hand free 2 MiB chunks back to the host a share at a time (every 2 s),
//! and the first use of one costs a host fault (milliseconds per 2 MiB):
//! how much of the memory a fresh case gets is host-cold varies from run
//! to run, and hits 2 MiB allocations (huge folios) far more than 4 KiB
//! ones, which come from partly used chunks. **Warm**: right after the
//! same amount of anonymous memory (in 2 MiB pages) was touched and freed. `ShmemThp` regions live on a tmpfs
//! mounted `huge=always` (mounted at `/tmp/hugearena-huge-tmpfs` when
//! missing; needs root), so their blocks get a 2 MiB folio each.

#[path = "../examples/support/huge_tmpfs.rs"]
#[allow(dead_code)] // the tests use the other mount too
mod huge_tmpfs;
#[path = "../examples/support/mapping.rs"]
mod mapping;
#[path = "../examples/support/order.rs"]
mod order;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hugearena::populate::{
    Driver, FileSource, PopulateOptions, Populator, SignalSafeSource, ZeroSource,
};
use hugearena::{BackendKind, BlockAllocation, Region, RegionOptions};

const PAGE: usize = 4096;
const BLOCK: usize = 2 << 20;
/// The kernel's fault-around window for file mappings.
const FAULT_AROUND: usize = 64 << 10;

#[derive(Clone, Copy, PartialEq)]
enum Memory {
    Fresh,
    Warm,
}

impl Memory {
    fn name(self) -> &'static str {
        match self {
            Memory::Fresh => "fresh",
            Memory::Warm => "warm",
        }
    }

    /// Prepares the machine's free memory for a measurement of `len` bytes.
    fn prepare(self, len: usize) {
        match self {
            Memory::Fresh => std::thread::sleep(Duration::from_secs(4)),
            Memory::Warm => {
                // In 2 MiB pages: the host backs whole 2 MiB chunks, which
                // serve huge and small allocations alike afterwards.
                let len = len + (64 << 20);
                let p = mapping::anonymous_4k(len);
                // SAFETY: the fresh mapping above; populated, then unmapped.
                unsafe {
                    libc::madvise(p.cast(), len, libc::MADV_HUGEPAGE);
                    libc::madvise(p.cast(), len, libc::MADV_POPULATE_WRITE);
                    libc::munmap(p.cast(), len);
                }
            }
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")
}

/// A shared mapping of `len` bytes of `file`, 2 MiB-aligned.
fn map_shared(file: &std::fs::File, len: usize) -> *mut u8 {
    // SAFETY: a fresh shared mapping of an open file of at least `len`
    // bytes; 2 MiB of slack keeps the aligned start inside it.
    unsafe {
        let raw = libc::mmap(
            std::ptr::null_mut(),
            len + BLOCK,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(raw, libc::MAP_FAILED);
        let at = (raw as usize).next_multiple_of(BLOCK);
        let p = libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: unmapping a mapping this file made.
    unsafe { libc::munmap(p.cast(), len) };
}

/// Touches (reads) one byte of each page in `order`, timing each touch.
fn touch(base: *mut u8, order: &[usize]) -> Histogram<u64> {
    let mut hist = histogram();
    for &off in order {
        let t = Instant::now();
        // SAFETY: `off` lies inside the caller's mapping.
        std::hint::black_box(unsafe { base.add(off).read_volatile() });
        hist.record(t.elapsed().as_nanos().max(1) as u64)
            .expect("in range");
    }
    hist
}

/// Writes one byte of each page in order: a first touch that allocates.
fn write_each(base: *mut u8, len: usize) {
    for off in (0..len).step_by(PAGE) {
        // SAFETY: `off` lies inside the caller's mapping.
        unsafe { base.add(off).write_volatile(1) };
    }
}

fn gbps(len: usize, d: Duration) -> f64 {
    len as f64 / d.as_secs_f64() / 1e9
}

/// A file of `len` bytes for a region or a baseline, removed on drop.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path(dir: &Path, tag: &str) -> TempPath {
    TempPath(dir.join(format!("hugearena-targets-{}-{tag}", std::process::id())))
}

/// A region of `len` bytes of `kind`, in `dir` if given.
fn region(kind: BackendKind, len: usize, dir: Option<&Path>) -> (Arc<Region>, Option<TempPath>) {
    let mut options = RegionOptions::new(len as u64).backend(kind);
    let path = dir.map(|d| temp_path(d, "region"));
    if let Some(p) = &path {
        options = options.path(&p.0);
    }
    (Arc::new(Region::create(options).expect("region")), path)
}

/// A measurement that returns its figure.
type Measure<'a> = Box<dyn Fn() -> f64 + 'a>;

/// One row of the report.
struct Row {
    target: &'static str,
    what: String,
    memory: Memory,
    ours: f64,
    baseline: f64,
    unit: &'static str,
    /// Throughput (higher is better) or latency (lower is better).
    higher_is_better: bool,
    goal: f64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ours / self.baseline
    }

    fn met(&self) -> bool {
        if self.higher_is_better {
            self.ratio() >= self.goal
        } else {
            self.ratio() <= self.goal
        }
    }

    fn print(&self, baseline_name: &str) {
        println!(
            "| {} | {} | {} | {:.2} {unit} | {:.2} {unit} ({baseline_name}) | {:.2}× | {}{:.1}× | {} |",
            self.target,
            self.what,
            self.memory.name(),
            self.ours,
            self.baseline,
            self.ratio(),
            if self.higher_is_better {
                "≥ "
            } else {
                "≤ "
            },
            self.goal,
            if self.met() { "yes" } else { "**no**" },
            unit = self.unit,
        );
    }
}

/// Kernel-native first touch of `len` bytes of 4 KiB anonymous memory,
/// sequential: GB/s.
fn native_anonymous(len: usize) -> f64 {
    let p = mapping::anonymous_4k(len);
    let t = Instant::now();
    write_each(p, len);
    let d = t.elapsed();
    unmap(p, len);
    gbps(len, d)
}

/// Kernel-native first touch of a file on the huge tmpfs, sequential
/// (one 2 MiB folio allocated and zeroed per block): GB/s.
fn native_huge(len: usize, dir: &Path) -> f64 {
    let path = temp_path(dir, "native-huge");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path.0)
        .expect("file");
    file.set_len(len as u64).expect("size");
    let p = map_shared(&file, len);
    let t = Instant::now();
    write_each(p, len);
    let d = t.elapsed();
    unmap(p, len);
    gbps(len, d)
}

/// Sequential population of a ShmemThp region on the huge tmpfs by
/// touching every page in order (in-thread driver) or by one `populate`
/// call, including the promotion of every block: GB/s.
fn sequential<S: SignalSafeSource + 'static>(
    len: usize,
    dir: &Path,
    source: S,
    by_touch: bool,
) -> f64 {
    let (region, _path) = region(BackendKind::ShmemThp, len, Some(dir));
    assert_eq!(region.block_allocation(), BlockAllocation::PopulateAlias);
    let driver = if by_touch {
        Driver::InThread
    } else {
        Driver::Proactive
    };
    let p = Populator::with_options(
        region.clone(),
        source,
        PopulateOptions::new().driver(driver),
    )
    .expect("populator");
    let in_order: Vec<usize> = (0..len / PAGE).map(|i| i * PAGE).collect();
    let t = Instant::now();
    if by_touch {
        touch(region.primary().as_ptr(), &in_order);
    } else {
        p.populate(0, len).expect("populate");
    }
    p.flush_promotions();
    let d = t.elapsed();
    let stats = p.stats();
    assert_eq!(
        stats.collapse_failures + stats.block_allocation_failures,
        0,
        "{stats}"
    );
    gbps(len, d)
}

/// p50 of a kernel-native shmem minor fault (the page is in the page
/// cache, this mapping has no entry for it), random order, µs.
fn native_minor(len: usize, order: &[usize]) -> f64 {
    let fd = memfd();
    let file = std::fs::File::from(fd);
    file.set_len(len as u64).expect("size");
    let writer = map_shared(&file, len);
    // SAFETY: advice on this file's own mapping.
    unsafe { libc::madvise(writer.cast(), len, libc::MADV_NOHUGEPAGE) };
    write_each(writer, len);
    let reader = map_shared(&file, len);
    // SAFETY: as above.
    unsafe { libc::madvise(reader.cast(), len, libc::MADV_NOHUGEPAGE) };
    let hist = touch(reader, order);
    unmap(writer, len);
    unmap(reader, len);
    hist.value_at_quantile(0.5) as f64 / 1e3
}

/// p50 of a kernel-native shmem first touch (allocate + zero + map),
/// random order, µs.
fn native_shmem_first_touch(len: usize, order: &[usize]) -> f64 {
    let file = std::fs::File::from(memfd());
    file.set_len(len as u64).expect("size");
    let p = map_shared(&file, len);
    // SAFETY: advice on this file's own mapping.
    unsafe { libc::madvise(p.cast(), len, libc::MADV_NOHUGEPAGE) };
    let hist = touch(p, order);
    unmap(p, len);
    hist.value_at_quantile(0.5) as f64 / 1e3
}

fn memfd() -> std::os::fd::OwnedFd {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hugearena-bench".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor owned from here on.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// p50 of `populate` of one random page whose block is allocated, then a
/// touch of it (ShmemThp on the huge tmpfs, zero source), µs.
fn populate_one(len: usize, dir: &Path, order: &[usize]) -> f64 {
    let (region, _path) = region(BackendKind::ShmemThp, len, Some(dir));
    let p = Populator::with_options(
        region.clone(),
        ZeroSource,
        PopulateOptions::new().driver(Driver::Proactive),
    )
    .expect("populator");
    // Allocate every block by populating its first page.
    for block in (0..len).step_by(BLOCK) {
        p.populate(block, PAGE).expect("populate");
    }
    let base = region.primary().as_ptr();
    let mut hist = histogram();
    for &off in order {
        let t = Instant::now();
        p.populate(off, PAGE).expect("populate");
        // SAFETY: inside the primary, populated just now.
        std::hint::black_box(unsafe { base.add(off).read_volatile() });
        hist.record(t.elapsed().as_nanos().max(1) as u64)
            .expect("in range");
    }
    assert_eq!(p.stats().blocks_allocated, (len / BLOCK) as u64);
    hist.value_at_quantile(0.5) as f64 / 1e3
}

/// p50 of a random first touch of a Shmem region (zero source) with
/// `driver` (handler threads spinning for `spin` before they sleep), µs.
fn random_first_touch(len: usize, driver: Driver, spin: Duration, order: &[usize]) -> f64 {
    let (region, _path) = region(BackendKind::Shmem, len, None);
    let p = Populator::with_options(
        region.clone(),
        ZeroSource,
        PopulateOptions::new().driver(driver).handler_spin(spin),
    )
    .expect("populator");
    let hist = touch(region.primary().as_ptr(), order);
    drop(p);
    hist.value_at_quantile(0.5) as f64 / 1e3
}

fn snapshot_file(len: usize) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    let mut buf = vec![0u8; 1 << 20];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    for off in (0..len).step_by(buf.len()) {
        f.as_file().write_all_at(&buf, off as u64).expect("write");
    }
    f
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let len: usize = if quick { 128 << 20 } else { 256 << 20 };
    let dir = match huge_tmpfs::HUGE_TMPFS.mount() {
        Ok(dir) => dir,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let snapshot = snapshot_file(len);
    // Warm the page cache for the file source.
    let mut sink = vec![0u8; 1 << 20];
    for off in (0..len).step_by(sink.len()) {
        snapshot
            .as_file()
            .read_exact_at(&mut sink, off as u64)
            .expect("read");
    }
    let file_source = || FileSource::open(snapshot.path()).expect("source");
    println!(
        "| target | what | memory | hugearena | kernel-native baseline | ratio | goal | met |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let random = order::shuffled(len / PAGE, PAGE, 0x5eed);
    for memory in [Memory::Fresh, Memory::Warm] {
        memory.prepare(len);
        let anon = native_anonymous(len);
        memory.prepare(len);
        let huge = native_huge(len, &dir);
        println!(
            "| P1 | kernel-native huge-page first touch (tmpfs huge=always), for reference | {} | {huge:.2} GB/s | {anon:.2} GB/s (anonymous first touch) | {:.2}× | — | — |",
            memory.name(),
            huge / anon
        );
        let cases: [(&str, Measure<'_>); 4] = [
            (
                "ShmemThp, zero source, sequential touches",
                Box::new(|| sequential(len, &dir, ZeroSource, true)),
            ),
            (
                "ShmemThp, file source, sequential touches",
                Box::new(|| sequential(len, &dir, file_source(), true)),
            ),
            (
                "ShmemThp, zero source, one populate call",
                Box::new(|| sequential(len, &dir, ZeroSource, false)),
            ),
            (
                "ShmemThp, file source, one populate call",
                Box::new(|| sequential(len, &dir, file_source(), false)),
            ),
        ];
        for (what, run) in cases {
            memory.prepare(len);
            Row {
                target: "P1",
                what: format!("{what}, 1 thread, {} MiB", len >> 20),
                memory,
                ours: run(),
                baseline: anon,
                unit: "GB/s",
                higher_is_better: true,
                goal: 2.0,
            }
            .print("anonymous first touch");
        }

        // One page per 64 KiB, in random order: a kernel-native minor
        // fault maps the present pages around it too (fault-around, 64 KiB),
        // which would make later touches nearby free.
        let sample: Vec<usize> = order::shuffled(len / FAULT_AROUND, PAGE, 0xfa17)
            .into_iter()
            .map(|off| off / PAGE * FAULT_AROUND + PAGE)
            .collect();
        let sample = &sample[..];
        memory.prepare(len);
        let minor = native_minor(len, sample);
        memory.prepare(len);
        Row {
            target: "P2a",
            what: "populate one random page of an allocated block, then touch (ShmemThp), p50"
                .into(),
            memory,
            ours: populate_one(len, &dir, sample),
            baseline: minor,
            unit: "µs",
            higher_is_better: false,
            goal: 0.8,
        }
        .print("shmem minor fault");

        memory.prepare(len);
        let first = native_shmem_first_touch(len, &random);
        let spin = Duration::from_micros(50);
        for (driver, spin, name, goal) in [
            (Driver::InThread, Duration::ZERO, "in-thread", 1.5),
            (Driver::HandlerThreads(1), Duration::ZERO, "handlers:1", 2.0),
            (Driver::HandlerThreads(2), Duration::ZERO, "handlers:2", 2.0),
            (
                Driver::HandlerThreads(1),
                spin,
                "handlers:1, 50 µs spin",
                2.0,
            ),
            (
                Driver::HandlerThreads(2),
                spin,
                "handlers:2, 50 µs spin",
                2.0,
            ),
        ] {
            memory.prepare(len);
            Row {
                target: "P2b",
                what: format!("random 4 KiB first touch, Shmem, {name}, p50"),
                memory,
                ours: random_first_touch(len, driver, spin, &random),
                baseline: first,
                unit: "µs",
                higher_is_better: false,
                goal,
            }
            .print("shmem first touch");
        }
    }
}
