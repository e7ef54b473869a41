//! Baseline: what a first touch of a 4 KiB page costs when the kernel
//! resolves it natively, on each kind of memory a region can be made of.
//! These are the numbers userfaultfd population is later compared with.
//!
//! ```text
//! cargo bench --bench first_touch [-- PAGES]
//! ```
//!
//! Each case maps fresh memory, touches every 4 KiB page once (a write of
//! one byte), and records the latency of each touch in an hdrhistogram.
//! "page cache hot" cases fill the file through the alias first, so the
//! primary's touch is a minor fault (map an existing page); the others
//! allocate and zero on touch. Memory is not pre-warmed at the host level.

use std::time::Instant;

#[path = "../examples/support/mapping.rs"]
mod mapping;

use hdrhistogram::Histogram;
use hugearena::{BackendKind, Region, RegionOptions};

const PAGE: usize = 4096;

fn touch_all(base: *mut u8, len: usize) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    for off in (0..len).step_by(PAGE) {
        let start = Instant::now();
        // SAFETY: `off` is inside the caller's mapping of `len` bytes.
        unsafe { base.add(off).write_volatile(1) };
        hist.record(start.elapsed().as_nanos().max(1) as u64)
            .expect("in range");
    }
    hist
}

fn report(name: &str, hist: &Histogram<u64>, pages: usize, baseline_p50: Option<u64>) {
    let p50 = hist.value_at_quantile(0.5);
    let ratio = baseline_p50.map_or(String::from("1.00"), |b| {
        format!("{:.2}", p50 as f64 / b as f64)
    });
    println!(
        "| {name:<44} | {pages:>7} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} | {ratio:>6} |",
        p50 as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.mean() / 1000.0,
    );
}

fn anonymous(len: usize) -> Histogram<u64> {
    let p = mapping::anonymous_4k(len).cast::<libc::c_void>();
    let hist = touch_all(p.cast(), len);
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(p, len) };
    hist
}

/// `MADV_POPULATE_WRITE` of one 4 KiB page at a time of fresh anonymous
/// memory: the kernel's own "populate ahead" path.
fn populate_write(len: usize) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let p = mapping::anonymous_4k(len).cast::<libc::c_void>();
    for off in (0..len).step_by(PAGE) {
        let start = Instant::now();
        // SAFETY: the page lies inside the mapping.
        let ret = unsafe {
            libc::madvise(
                p.cast::<u8>().add(off).cast(),
                PAGE,
                libc::MADV_POPULATE_WRITE,
            )
        };
        assert_eq!(ret, 0, "MADV_POPULATE_WRITE");
        hist.record(start.elapsed().as_nanos().max(1) as u64)
            .expect("in range");
    }
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(p, len) };
    hist
}

/// memcpy bandwidth of one thread between two resident 256 MiB buffers:
/// the limit of any fill that copies.
fn memcpy_gbps() -> f64 {
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![2u8; len];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    len as f64 / best / 1e9
}

fn region_touch(kind: BackendKind, len: usize, page_cache_hot: bool) -> Option<Histogram<u64>> {
    let region = match Region::create(RegionOptions::new(len as u64).backend(kind)) {
        Ok(r) => r,
        Err(e) => {
            println!("| {kind:<44} | skipped: {e}");
            return None;
        }
    };
    if page_cache_hot {
        // Through a second mapping of the same file, dropped before the
        // touches: the page cache is full, this mapping's page tables empty.
        let other = Region::open(region.shareable_path()).expect("reopen");
        let chunk = vec![7u8; 1 << 20];
        for off in (0..len).step_by(chunk.len()) {
            other
                .write_via_primary(off, &chunk[..chunk.len().min(len - off)])
                .expect("in bounds");
        }
    }
    Some(touch_all(region.primary().as_ptr(), len))
}

fn main() {
    let pages: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(16384);
    let len = pages * PAGE;
    println!("first touch of {pages} pages of 4 KiB, one thread; latency in µs");
    println!();
    println!("| case | pages | p50 | p99 | p99.9 | mean | p50 vs anon |");
    println!("|---|---|---|---|---|---|---|");
    let anon = anonymous(len);
    let base = anon.value_at_quantile(0.5);
    report("anonymous memory (allocate + zero)", &anon, pages, None);
    report(
        "anonymous, MADV_POPULATE_WRITE per page",
        &populate_write(len),
        pages,
        Some(base),
    );
    for (kind, hot, name) in [
        (BackendKind::Shmem, false, "Shmem primary (allocate + zero)"),
        (
            BackendKind::Shmem,
            true,
            "Shmem primary (page cache hot, minor)",
        ),
        (
            BackendKind::ShmemThp,
            true,
            "ShmemThp primary (page cache hot, minor)",
        ),
        (
            BackendKind::Hugetlb,
            false,
            "Hugetlb primary (one fault per 2 MiB, hot pool)",
        ),
    ] {
        if let Some(h) = region_touch(kind, len, hot) {
            report(name, &h, pages, Some(base));
        }
    }
    println!();
    let gbps = memcpy_gbps();
    println!(
        "memcpy, one thread, resident buffers: {gbps:.1} GB/s ({:.2} µs per 4 KiB)",
        PAGE as f64 / gbps / 1e3
    );
}
