//! Arena allocation throughput and latency, side by side with glibc malloc,
//! mimalloc and a mutex-protected allocator over the same kind of shared region, for
//! small objects, page runs and large blocks, from 1 and 2 threads.
//!
//! ```text
//! cargo bench --bench arena [-- --quick]
//! ```
//!
//! Each thread keeps a window of 64 live allocations and replaces the
//! oldest each step (alloc + free per operation), so the allocators work
//! in a steady state rather than on a stack. The memory is never touched:
//! this measures the allocator, not page population (warmed first).

use std::alloc::Layout;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use hugearena::populate::PopulateOptions;
use hugearena::{Arena, BackendKind, RegionOptions, ShmPtr};

const WINDOW: usize = 64;

trait Alloc: Sync {
    fn name(&self) -> &'static str;
    fn alloc(&self, layout: Layout) -> usize;
    fn free(&self, p: usize, layout: Layout);
}

struct ArenaAlloc(Arena);

impl Alloc for ArenaAlloc {
    fn name(&self) -> &'static str {
        "hugearena"
    }
    fn alloc(&self, layout: Layout) -> usize {
        self.0.alloc(layout).expect("arena alloc").offset() as usize
    }
    fn free(&self, p: usize, _: Layout) {
        self.0
            .free(ShmPtr::from_offset(p as u64))
            .expect("arena free");
    }
}

struct Malloc;

impl Alloc for Malloc {
    fn name(&self) -> &'static str {
        "glibc malloc"
    }
    fn alloc(&self, layout: Layout) -> usize {
        // SAFETY: the layout has a non-zero size.
        unsafe { std::alloc::alloc(layout) as usize }
    }
    fn free(&self, p: usize, layout: Layout) {
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { std::alloc::dealloc(p as *mut u8, layout) }
    }
}

struct MiMalloc(mimalloc::MiMalloc);

impl Alloc for MiMalloc {
    fn name(&self) -> &'static str {
        "mimalloc"
    }
    fn alloc(&self, layout: Layout) -> usize {
        use std::alloc::GlobalAlloc;
        // SAFETY: the layout has a non-zero size.
        unsafe { self.0.alloc(layout) as usize }
    }
    fn free(&self, p: usize, layout: Layout) {
        use std::alloc::GlobalAlloc;
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { self.0.dealloc(p as *mut u8, layout) }
    }
}

/// The baseline a shared-memory allocator without lock-free paths would
/// be: the same arena behind one process-wide mutex (a cross-process
/// version would need a robust futex; the cost of serialisation is what
/// this shows).
struct Locked(Mutex<Arena>);

impl Alloc for Locked {
    fn name(&self) -> &'static str {
        "mutex + arena"
    }
    fn alloc(&self, layout: Layout) -> usize {
        let a = self.0.lock().expect("lock");
        a.alloc(layout).expect("alloc").offset() as usize
    }
    fn free(&self, p: usize, _: Layout) {
        let a = self.0.lock().expect("lock");
        a.free(ShmPtr::from_offset(p as u64)).expect("free");
    }
}

fn run(a: &dyn Alloc, sizes: &[usize], threads: usize, ops: usize) -> (f64, Histogram<u64>) {
    let started = Instant::now();
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut h = Histogram::<u64>::new(3).expect("histogram");
                    let mut live = VecDeque::with_capacity(WINDOW);
                    for i in 0..ops {
                        let size = sizes[(i * 7 + t) % sizes.len()];
                        let layout = Layout::from_size_align(size, 16).expect("layout");
                        let t0 = Instant::now();
                        if live.len() == WINDOW {
                            let (p, l) = live.pop_front().expect("full window");
                            a.free(p, l);
                        }
                        live.push_back((a.alloc(layout), layout));
                        h.record(t0.elapsed().as_nanos() as u64).expect("record");
                    }
                    for (p, l) in live {
                        a.free(p, l);
                    }
                    h
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for h in hists {
        all.add(h).expect("same precision");
    }
    ((threads * ops) as f64 / secs / 1e6, all)
}

fn arena() -> Arena {
    Arena::create(
        RegionOptions::new(1 << 30).backend(BackendKind::Shmem),
        PopulateOptions::new(),
    )
    .expect("arena (run as root: userfaultfd)")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ops = if quick { 20_000 } else { 200_000 };
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ranges: [(&str, Vec<usize>, usize); 3] = [
        (
            "small 16 B – 1 KiB",
            vec![16, 32, 48, 64, 128, 256, 512, 1024],
            ops,
        ),
        (
            "page runs 16 – 256 KiB",
            vec![16 << 10, 64 << 10, 256 << 10],
            ops / 4,
        ),
        ("large 2 – 8 MiB", vec![2 << 20, 4 << 20, 8 << 20], ops / 40),
    ];
    let allocators: Vec<Box<dyn Alloc>> = vec![
        Box::new(ArenaAlloc(arena())),
        Box::new(Malloc),
        Box::new(MiMalloc(mimalloc::MiMalloc)),
        Box::new(Locked(Mutex::new(arena()))),
    ];
    println!("| range | threads | allocator | Mops/s | p50 ns | p99 ns | p99.9 ns | vs malloc |");
    println!("|---|---|---|---|---|---|---|---|");
    for (range, sizes, n) in &ranges {
        for threads in (1..=nproc).filter(|t| *t == 1 || *t == nproc) {
            // Warm: the tables and the kernel's memory, then measure.
            let results: Vec<_> = allocators
                .iter()
                .map(|a| {
                    run(a.as_ref(), sizes, threads, n / 10);
                    (a.name(), run(a.as_ref(), sizes, threads, *n))
                })
                .collect();
            let malloc = results[1].1.0;
            for (name, (mops, h)) in &results {
                println!(
                    "| {range} | {threads} | {name} | {mops:.2} | {} | {} | {} | {:.2}× |",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                    mops / malloc
                );
            }
        }
    }
}
