//! Arena allocation throughput and latency, side by side with glibc malloc,
//! mimalloc and a mutex-protected allocator over the same kind of shared region, for
//! small objects, page runs and large blocks, from 1 and 2 threads.
//!
//! ```text
//! cargo bench --bench arena [-- --quick] [--range WORD]
//! ```
//!
//! `--range WORD` runs only the size ranges whose name contains `WORD`
//! (`small`, `page`, `large`).
//!
//! Each thread keeps a window of 64 live allocations and replaces the
//! oldest each step (alloc + free per operation), so the allocators work
//! in a steady state rather than on a stack. The memory is never touched:
//! this measures the allocator, not page population (warmed first).
//!
//! Throughput is the best of fifteen passes with no clock read inside the
//! loop, the allocators taking turns: a clock read costs more than a small
//! allocation (about 30 ns on a virtual machine), and timing every
//! operation would hide most of the difference between allocators. The
//! percentiles come from three more passes that time each operation (so
//! they include one clock read), each percentile the median of the three.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use hugearena::populate::PopulateOptions;
use hugearena::{Arena, BackendKind, RegionOptions, ShmPtr};

const WINDOW: usize = 64;

/// Throughput passes per allocator; the best counts. A small-object pass
/// lasts about 25 ms, and the host takes a share of some of them: with
/// five, three runs in a row gave glibc's best as 48–73 Mops/s (1 thread),
/// with fifteen 70–77.
const ROUNDS: usize = 15;

/// Timed passes per allocator; each percentile is the median of them.
const LATENCY_ROUNDS: usize = 3;

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

/// One thread's steady-state loop: `ops` operations, each freeing the
/// oldest of `WINDOW` live allocations (once full) and allocating anew;
/// `record` gets each operation's duration when given.
fn steady(
    a: &dyn Alloc,
    sizes: &[usize],
    t: usize,
    ops: usize,
    mut record: Option<&mut Histogram<u64>>,
) {
    let mut live = VecDeque::with_capacity(WINDOW);
    for i in 0..ops {
        let size = sizes[(i * 7 + t) % sizes.len()];
        let layout = Layout::from_size_align(size, 16).expect("layout");
        let t0 = record.is_some().then(Instant::now);
        if live.len() == WINDOW {
            let (p, l) = live.pop_front().expect("full window");
            a.free(p, l);
        }
        live.push_back((std::hint::black_box(a.alloc(layout)), layout));
        if let (Some(h), Some(t0)) = (record.as_deref_mut(), t0) {
            h.record(t0.elapsed().as_nanos() as u64).expect("record");
        }
    }
    for (p, l) in live {
        a.free(p, l);
    }
}

/// Millions of operations per second over `threads` threads, untimed
/// inside the loop.
fn throughput(a: &dyn Alloc, sizes: &[usize], threads: usize, ops: usize) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || steady(a, sizes, t, ops, None));
        }
    });
    (threads * ops) as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Each operation's latency over `threads` threads.
fn latency(a: &dyn Alloc, sizes: &[usize], threads: usize, ops: usize) -> Histogram<u64> {
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut h = Histogram::<u64>::new(3).expect("histogram");
                    steady(a, sizes, t, ops, Some(&mut h));
                    h
                })
            })
            .collect();
        for h in handles {
            all.add(h.join().expect("thread")).expect("same precision");
        }
    });
    all
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
    let ops = if quick { 200_000 } else { 2_000_000 };
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--range")
        .and_then(|i| args.get(i + 1).cloned());
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
    let chosen = ranges
        .iter()
        .filter(|(range, ..)| only.as_ref().is_none_or(|w| range.contains(w.as_str())));
    for (range, sizes, n) in chosen {
        for threads in (1..=nproc).filter(|t| *t == 1 || *t == nproc) {
            // Warm (the tables and the kernel's memory), then the best of
            // `ROUNDS` passes, the allocators taking turns (these
            // machines' speed drifts between passes by more than the
            // allocators differ).
            let mut best = vec![0f64; allocators.len()];
            for a in &allocators {
                throughput(a.as_ref(), sizes, threads, n / 10);
            }
            for _ in 0..ROUNDS {
                for (a, best) in allocators.iter().zip(&mut best) {
                    *best = best.max(throughput(a.as_ref(), sizes, threads, *n));
                }
            }
            // Percentiles: each the median over `LATENCY_ROUNDS` timed
            // passes, the allocators taking turns (one pass's tail on these
            // machines moves with whatever else the host runs).
            let mut passes: Vec<Vec<[u64; 3]>> = vec![Vec::new(); allocators.len()];
            for _ in 0..LATENCY_ROUNDS {
                for (a, passes) in allocators.iter().zip(&mut passes) {
                    let h = latency(a.as_ref(), sizes, threads, *n);
                    passes.push([0.5, 0.99, 0.999].map(|q| h.value_at_quantile(q)));
                }
            }
            let malloc = best[1];
            for ((a, mops), passes) in allocators.iter().zip(&best).zip(&passes) {
                let [p50, p99, p999] = [0, 1, 2].map(|i| {
                    let mut v: Vec<u64> = passes.iter().map(|p| p[i]).collect();
                    v.sort_unstable();
                    v[v.len() / 2]
                });
                println!(
                    "| {range} | {threads} | {} | {mops:.2} | {p50} | {p99} | {p999} | {:.2}× |",
                    a.name(),
                    mops / malloc
                );
            }
        }
    }
}
