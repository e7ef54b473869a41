//! The arena on the real kernel: every size range, bad input, a reference
//! model under random operation sequences, `hashbrown` in the arena, three
//! processes × two threads allocating and freeing at once, a process
//! killed with objects in its thread caches, and release of empty blocks
//! back to the kernel.

mod common;

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use hugearena::populate::PopulateOptions;
use hugearena::probe::HugePagePool;
use hugearena::{Arena, BackendKind, Error, PageSize, RegionOptions, ReleasePolicy, ShmPtr};
use proptest::prelude::*;

/// The arena's block size (its page runs and large allocations are
/// counted in it).
const BLOCK: u64 = 2 << 20;

fn arena(size: u64, kind: BackendKind) -> Arena {
    Arena::create(
        RegionOptions::new(size).backend(kind),
        PopulateOptions::new(),
    )
    .unwrap()
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Writes `tag` over the whole allocation, through the primary view.
fn stamp(a: &Arena, p: ShmPtr, size: usize, tag: u8) {
    a.region()
        .write_via_primary(p.offset() as usize, &vec![tag; size])
        .unwrap();
}

fn check_stamp(a: &Arena, p: ShmPtr, size: usize, tag: u8) {
    let mut buf = vec![0u8; size];
    a.region()
        .read_via_primary(p.offset() as usize, &mut buf)
        .unwrap();
    if let Some(i) = buf.iter().position(|&b| b != tag) {
        panic!(
            "allocation {p:?} ({size} B) byte {i} is {:#x}, stamped {tag:#x}: overlap",
            buf[i]
        );
    }
}

/// Live allocations as intervals: no two may overlap.
#[derive(Default)]
struct Model {
    live: BTreeMap<u64, u64>,
}

impl Model {
    fn insert(&mut self, p: ShmPtr, size: u64) {
        let start = p.offset();
        if let Some((&s, &len)) = self.live.range(..=start).next_back() {
            assert!(s + len <= start, "{p:?} overlaps [{s:#x}, +{len})");
        }
        if let Some((&s, _)) = self.live.range(start..).next() {
            assert!(start + size <= s, "{p:?}+{size} overlaps {s:#x}");
        }
        self.live.insert(start, size);
    }
}

#[test]
fn every_size_range_allocates_distinct_aligned_memory_and_frees_it() {
    let a = arena(64 << 20, BackendKind::Shmem);
    let mut model = Model::default();
    let mut live = Vec::new();
    let requests = [
        (1, 1),
        (16, 16),
        (24, 8),
        (100, 64),
        (1000, 8),
        (4096, 4096),
        (8192, 8),
        (8193, 8),
        (64 << 10, 4096),
        (100 << 10, 64 << 10),
        ((2 << 20) - 4096, 4096),
        (2 << 20, 2 << 20),
        (5 << 20, 8),
    ];
    for (round, &(size, align)) in requests.iter().cycle().take(60).enumerate() {
        let p = a.alloc(layout(size, align)).unwrap();
        assert_eq!(p.offset() % align as u64, 0, "{size} B aligned {align}");
        assert_eq!(a.local(p).unwrap().as_ptr() as usize % align, 0);
        assert_eq!(a.shm_ptr(a.local(p).unwrap().as_ptr()), Some(p));
        model.insert(p, size as u64);
        stamp(&a, p, size, round as u8);
        live.push((p, size, round as u8));
    }
    let stats = a.audit().unwrap();
    assert!(
        stats.small_objects > 0 && stats.runs > 0 && stats.large_allocs > 0,
        "{stats:?}"
    );
    for &(p, size, tag) in &live {
        check_stamp(&a, p, size, tag);
        a.free(p).unwrap();
    }
    let stats = a.audit().unwrap();
    assert_eq!(stats.in_use_bytes(), 0, "{stats:?}");
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let a = arena(16 << 20, BackendKind::Shmem);
    assert!(matches!(a.alloc(layout(0, 1)), Err(Error::ZeroAllocation)));
    assert!(matches!(
        a.alloc(layout(64, 4 << 20)),
        Err(Error::AlignmentTooLarge { .. })
    ));
    let err = a.alloc(layout(64 << 20, 8)).unwrap_err();
    assert!(matches!(err, Error::ArenaExhausted { .. }), "{err}");
    assert!(err.to_string().contains("create a larger arena"), "{err}");

    let small = a.alloc(layout(48, 8)).unwrap();
    let run = a.alloc(layout(20 << 10, 8)).unwrap();
    let large = a.alloc(layout(3 << 20, 8)).unwrap();
    let before = a.audit().unwrap();
    for (p, why) in [
        (ShmPtr::NULL, "outside"),
        (ShmPtr::from_offset(4096), "outside"),
        (ShmPtr::from_offset(small.offset() + 8), "not the start"),
        (ShmPtr::from_offset(small.offset() + 48), "not allocated"),
        (
            ShmPtr::from_offset(run.offset() + 4096),
            "not the start of a live",
        ),
        (
            ShmPtr::from_offset(large.offset() + BLOCK),
            "inside a large",
        ),
        (ShmPtr::from_offset(a.stats().data_bytes), "outside"),
    ] {
        let err = a.free(p).unwrap_err();
        assert!(matches!(err, Error::InvalidFree { .. }), "{err}");
        assert!(err.to_string().contains(why), "{p:?}: {err}");
    }
    assert_eq!(a.audit().unwrap(), before, "rejected frees changed nothing");
    for p in [small, run, large] {
        a.free(p).unwrap();
        assert!(
            matches!(a.free(p), Err(Error::InvalidFree { .. })),
            "double free of {p:?}"
        );
    }
    assert_eq!(a.audit().unwrap().in_use_bytes(), 0);
}

#[test]
fn a_region_that_is_not_an_arena_is_refused() {
    let region =
        hugearena::Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap();
    let region = Arc::new(region);
    let p = hugearena::populate::Populator::new(region.clone(), hugearena::populate::ZeroSource)
        .unwrap();
    let err = Arena::attach(p).unwrap_err();
    assert!(matches!(err, Error::NotAnArena { .. }), "{err}");
    let too_small = Arena::create(
        RegionOptions::new(2 << 20).backend(BackendKind::Shmem),
        PopulateOptions::new(),
    )
    .unwrap_err();
    assert!(
        too_small.to_string().contains("at least 4 MiB"),
        "{too_small}"
    );
}

#[test]
fn hashbrown_and_vec_live_in_the_arena() {
    let a = arena(32 << 20, BackendKind::Shmem);
    {
        let mut map = hashbrown::HashMap::new_in(&a);
        for i in 0..20_000u64 {
            map.insert(i, i * 3);
        }
        assert_eq!(map.get(&777), Some(&2331));
        let mut v = allocator_api2::vec::Vec::new_in(&a);
        v.extend(0..100_000u32);
        assert_eq!(v.iter().map(|&x| u64::from(x)).sum::<u64>(), 4_999_950_000);
        let stats = a.audit().unwrap();
        assert!(stats.in_use_bytes() >= 400_000, "{stats:?}");
    }
    assert_eq!(a.audit().unwrap().in_use_bytes(), 0);
}

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align_shift: u32 },
    Free { pick: usize },
    FreeBogus { pick: usize, delta: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1usize..=2048, 0u32..=6).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        2 => (2049usize..=(300 << 10), 0u32..=14).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        1 => ((2usize << 20)..=(5 << 20), 0u32..=21).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        5 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 1u64..=4096).prop_map(|(pick, delta)| Op::FreeBogus { pick, delta }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random operation sequences against a reference model: no overlap,
    /// every valid free accepted, every bogus one rejected, the tables
    /// consistent and the statistics equal to the model's.
    #[test]
    fn operation_sequences_match_a_reference_model(
        ops in proptest::collection::vec(op(), 1..300),
        caches: bool,
    ) {
        let a = arena(48 << 20, BackendKind::Shmem);
        a.set_thread_caches(caches);
        let mut model = Model::default();
        let mut live: Vec<(ShmPtr, usize)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc { size, align_shift } => match a.alloc(layout(size, 1 << align_shift)) {
                    Ok(p) => {
                        prop_assert_eq!(p.offset() % (1u64 << align_shift), 0);
                        model.insert(p, size as u64);
                        live.push((p, size));
                    }
                    Err(Error::ArenaExhausted { .. }) => {}
                    Err(e) => prop_assert!(false, "{}", e),
                },
                Op::Free { pick } if !live.is_empty() => {
                    let (p, _) = live.swap_remove(pick % live.len());
                    model.live.remove(&p.offset());
                    prop_assert!(a.free(p).is_ok());
                    prop_assert!(a.free(p).is_err(), "double free accepted");
                }
                Op::FreeBogus { pick, delta } if !live.is_empty() => {
                    let (p, _) = live[pick % live.len()];
                    let bogus = ShmPtr::from_offset(p.offset() + delta);
                    if !model.live.contains_key(&bogus.offset()) {
                        prop_assert!(a.free(bogus).is_err(), "bogus free of {:?} accepted", bogus);
                    }
                }
                _ => {}
            }
        }
        let stats = a.audit().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let allocs = live.len() as u64;
        prop_assert_eq!(stats.cached_objects, 0, "one process, caches flushed");
        prop_assert_eq!(stats.leaked_pages, 0, "nothing leaked");
        prop_assert_eq!(stats.small_objects + stats.runs + stats.large_allocs, allocs);
        for (p, _) in live {
            prop_assert!(a.free(p).is_ok());
        }
        prop_assert_eq!(a.audit().map_err(|e| TestCaseError::fail(e.to_string()))?.in_use_bytes(), 0);
    }
}

const STRESS_OPS_PER_THREAD: u64 = 500_000;

/// One thread's share of the stress test: allocate, stamp, check, free.
fn stress_thread(a: &Arena, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut live: Vec<(ShmPtr, usize, u8)> = Vec::new();
    let mut ops = 0;
    while ops < STRESS_OPS_PER_THREAD {
        let r = next();
        if live.len() < 400 && (r % 2 == 0 || live.is_empty()) {
            let size = match r % 1000 {
                0 => (2 << 20) + (r as usize >> 20) % (2 << 20),
                1..=150 => 8192 + (r as usize >> 16) % (24 << 10),
                _ => 1 + (r as usize >> 16) % 1024,
            };
            match a.alloc(layout(size, 8)) {
                Ok(p) => {
                    let tag = (r >> 40) as u8;
                    stamp(a, p, size, tag);
                    live.push((p, size, tag));
                }
                Err(Error::ArenaExhausted { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        } else {
            let (p, size, tag) = live.swap_remove((r >> 8) as usize % live.len());
            check_stamp(a, p, size, tag);
            a.free(p).unwrap();
        }
        ops += 1;
    }
    for (p, size, tag) in live.drain(..) {
        check_stamp(a, p, size, tag);
        a.free(p).unwrap();
    }
    ops
}

/// Child: the parent's arena, by the path in `REGION_PATH`.
fn open_shared() -> Arena {
    Arena::open(
        std::env::var("REGION_PATH").unwrap(),
        PopulateOptions::new(),
    )
    .unwrap()
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    match role.as_str() {
        "stress" => {}
        "cache-then-wait" => return cache_then_wait(),
        "audit" => return audit_child(),
        other => panic!("unknown role {other}"),
    }
    let a = open_shared();
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let ops: u64 = std::thread::scope(|s| {
        let t1 = s.spawn(|| stress_thread(&a, seed));
        let t2 = s.spawn(|| stress_thread(&a, seed.wrapping_mul(7919)));
        t1.join().unwrap() + t2.join().unwrap()
    });
    println!("CHILD-OPS {ops}");
}

#[test]
fn three_processes_two_threads_each_never_overlap_and_leak_nothing() {
    let a = arena(128 << 20, BackendKind::ShmemThp);
    let path = a.region().shareable_path().display().to_string();
    let children: Vec<_> = (1..=3u64)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                run_child(
                    "stress",
                    &[
                        ("REGION_PATH", path),
                        ("SEED", (i * 0x9E37_79B9).to_string()),
                    ],
                )
            })
        })
        .collect();
    for c in children {
        let out = c.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ops: u64 = stdout
            .split("CHILD-OPS ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no op count: {stdout}"));
        assert!(ops >= 1_000_000, "{ops} operations");
    }
    let stats = a.audit().unwrap();
    assert_eq!(stats.in_use_bytes(), 0, "leaked: {stats:?}");
    assert_eq!(stats.small_objects + stats.runs + stats.large_allocs, 0);
}

fn resident_bytes(a: &Arena) -> u64 {
    nix::sys::stat::fstat(a.region().fd()).unwrap().st_blocks as u64 * 512
}

#[test]
fn freeing_everything_and_releasing_gives_memory_back() {
    let a = arena(64 << 20, BackendKind::Shmem);
    let blocks: Vec<ShmPtr> = (0..10)
        .map(|_| a.alloc(layout(2 << 20, 8)).unwrap())
        .collect();
    let runs: Vec<ShmPtr> = (0..200)
        .map(|_| a.alloc(layout(64 << 10, 8)).unwrap())
        .collect();
    for &p in blocks.iter().chain(&runs) {
        stamp(&a, p, 4096, 1);
    }
    // Touch everything so it is resident.
    for &p in &blocks {
        stamp(&a, p, 2 << 20, 2);
    }
    let full = resident_bytes(&a);
    assert!(full >= 20 << 20, "{full}");
    for p in blocks.into_iter().chain(runs) {
        a.free(p).unwrap();
    }
    assert!(
        resident_bytes(&a) >= full,
        "freeing alone keeps pages (OnRequest)"
    );
    let released = a.release_free_blocks();
    assert!(released >= 17, "{released} blocks released");
    let after = resident_bytes(&a);
    assert!(
        after < 4 << 20,
        "resident after release: {after} bytes (was {full})"
    );
    // Released memory is usable again, and reads as zero.
    let p = a.alloc(layout(2 << 20, 8)).unwrap();
    check_stamp(&a, p, 2 << 20, 0);
    a.audit().unwrap();
}

#[test]
fn eager_release_returns_huge_pages_to_the_pool() {
    if !ensure_huge_pages(PageSize::Huge2M, 40) {
        return;
    }
    let mut a = arena(64 << 20, BackendKind::Hugetlb);
    a.set_release_policy(ReleasePolicy::Eager);
    let free_before = HugePagePool::read(PageSize::Huge2M).unwrap().free;
    let blocks: Vec<ShmPtr> = (0..8)
        .map(|_| a.alloc(layout(2 << 20, 8)).unwrap())
        .collect();
    for &p in &blocks {
        stamp(&a, p, 2 << 20, 3);
    }
    let during = HugePagePool::read(PageSize::Huge2M).unwrap().free;
    assert!(during + 8 <= free_before, "{free_before} → {during}");
    for p in blocks {
        a.free(p).unwrap();
    }
    let after = HugePagePool::read(PageSize::Huge2M).unwrap().free;
    assert!(
        after >= during + 8,
        "pool free: {free_before} → {during} → {after}"
    );
}

/// A span given up full goes back on offer once a sixteenth of its
/// objects were freed by other threads, not at the first free: a thread
/// then adopts a span with room for many objects, not one.
#[test]
fn a_full_span_is_offered_again_after_a_sixteenth_of_it_is_freed() {
    const SPAN: u64 = 64 << 10;
    let a = arena(32 << 20, BackendKind::Shmem);
    a.set_thread_caches(true);
    // 256-byte objects: 256 to a span, offered again after 16 frees.
    let l = Layout::from_size_align(256, 16).unwrap();
    let first: Vec<ShmPtr> = (0..256).map(|_| a.alloc(l).unwrap()).collect();
    let span = first[0].offset() / SPAN;
    assert!(first.iter().all(|p| p.offset() / SPAN == span), "one span");
    // The next allocation gives the full span up.
    let mut mine = vec![a.alloc(l).unwrap()];
    let free_elsewhere = |ps: &[ShmPtr]| {
        std::thread::scope(|s| {
            s.spawn(|| ps.iter().for_each(|&p| a.free(p).unwrap()));
        });
    };
    free_elsewhere(&first[..15]);
    for _ in 0..300 {
        let p = a.alloc(l).unwrap();
        assert_ne!(p.offset() / SPAN, span, "offered after 15 frees");
        mine.push(p);
    }
    free_elsewhere(&first[15..16]);
    let mut back = Vec::new();
    for _ in 0..600 {
        let p = a.alloc(l).unwrap();
        if p.offset() / SPAN == span {
            back.push(p.offset());
        }
    }
    back.sort_unstable();
    let mut freed: Vec<u64> = first[..16].iter().map(|p| p.offset()).collect();
    freed.sort_unstable();
    assert_eq!(back, freed, "the 16 freed objects come back");
}

/// Turning the caches off keeps a thread that used its cache out of it
/// (its next allocations own no span), and on again lets it back in.
#[test]
fn turning_the_caches_off_keeps_a_thread_out_of_the_one_it_used() {
    let a = arena(32 << 20, BackendKind::Shmem);
    let l = Layout::from_size_align(128, 16).unwrap();
    let churn = || {
        let held: Vec<ShmPtr> = (0..10).map(|_| a.alloc(l).unwrap()).collect();
        for p in held {
            a.free(p).unwrap();
        }
        a.stats().cached_objects
    };
    a.set_thread_caches(true);
    assert!(churn() > 0, "on: the thread's cache owns a span");
    a.set_thread_caches(false);
    assert_eq!(churn(), 0, "off: the thread stays out of its cache");
    a.set_thread_caches(false);
    assert_eq!(churn(), 0, "off twice: still out");
    a.set_thread_caches(true);
    assert!(churn() > 0, "on again: back in");
    assert!(a.audit().is_ok());
}

#[test]
fn a_threads_span_takes_its_frees_back_first_and_a_flush_gives_it_up() {
    let a = arena(16 << 20, BackendKind::Shmem);
    a.set_thread_caches(true);
    let objects: Vec<ShmPtr> = (0..10).map(|_| a.alloc(layout(64, 8)).unwrap()).collect();
    for &p in &objects {
        a.free(p).unwrap();
    }
    assert!(
        matches!(a.free(objects[3]), Err(Error::InvalidFree { .. })),
        "double free by the owner"
    );
    // The span stays this thread's: its free objects count as cached...
    let stats = a.stats();
    assert_eq!((stats.small_objects, stats.spans), (0, 1));
    assert_eq!(
        stats.cached_objects, 1024,
        "a 64 KiB span of 64-byte objects"
    );
    // ...and come back first, without touching them.
    let again: Vec<ShmPtr> = (0..10).map(|_| a.alloc(layout(50, 8)).unwrap()).collect();
    let mut sorted = again.clone();
    sorted.sort();
    let mut expected = objects.clone();
    expected.sort();
    assert_eq!(sorted, expected);
    // Frees from another thread: remote, refused twice in any order.
    std::thread::scope(|s| {
        s.spawn(|| {
            a.free(again[0]).unwrap();
            assert!(a.free(again[0]).is_err(), "double free by another thread");
        });
    });
    assert!(
        a.free(again[0]).is_err(),
        "freed by another thread, then by the owner"
    );
    assert_eq!(a.stats().small_objects, 9);
    for &p in &again[1..] {
        a.free(p).unwrap();
    }
    // Another thread's span is its own; a flush gives every span of the
    // process up (the exited thread's too), and empty ones retire.
    std::thread::scope(|s| {
        s.spawn(|| {
            let p = a.alloc(layout(64, 8)).unwrap();
            a.free(p).unwrap();
        });
    });
    assert_eq!(a.stats().spans, 2);
    a.flush_thread_caches();
    let stats = a.audit().unwrap();
    assert_eq!((stats.small_objects, stats.cached_objects), (0, 0));
    assert_eq!((stats.spans, stats.in_use_bytes()), (0, 0));
}

#[test]
fn a_threads_freed_page_runs_come_back_to_it_and_a_second_free_is_refused() {
    let a = arena(32 << 20, BackendKind::Shmem);
    let runs: Vec<ShmPtr> = (0..4)
        .map(|_| a.alloc(layout(64 << 10, 8)).unwrap())
        .collect();
    for &p in &runs {
        a.free(p).unwrap();
    }
    assert!(a.free(runs[1]).is_err(), "double free of a kept run");
    std::thread::scope(|s| {
        s.spawn(|| assert!(a.free(runs[2]).is_err(), "by another thread"));
    });
    let stats = a.stats();
    assert_eq!((stats.runs, stats.run_bytes), (0, 0));
    assert_eq!(stats.cached_run_bytes, 4 * (64 << 10));
    // The same size comes back from the cache...
    let again = a.alloc(layout(63 << 10, 8)).unwrap();
    assert!(runs.contains(&again));
    assert_eq!(a.usable_size(again).unwrap(), 64 << 10);
    // ...another size, or alignment, from the blocks.
    let other = a.alloc(layout(32 << 10, 8)).unwrap();
    assert!(!runs.contains(&other));
    let aligned = a.alloc(layout(64 << 10, 1 << 20)).unwrap();
    assert_eq!(aligned.offset() % (1 << 20), 0);
    // A thread that never allocated has no cache: its free goes back to
    // the blocks.
    std::thread::scope(|s| {
        s.spawn(|| a.free(other).unwrap());
    });
    let stats = a.stats();
    assert_eq!(stats.runs, 2);
    assert_eq!(stats.cached_run_bytes, 3 * (64 << 10));
    // More frees than the cache keeps: the oldest go back to the blocks.
    let many: Vec<ShmPtr> = (0..40)
        .map(|_| a.alloc(layout(16 << 10, 8)).unwrap())
        .collect();
    for p in many {
        a.free(p).unwrap();
    }
    assert!(a.stats().cached_run_bytes <= 16 * (64 << 10));
    for p in [again, aligned] {
        a.free(p).unwrap();
    }
    a.flush_thread_caches();
    let stats = a.audit().unwrap();
    assert_eq!((stats.in_use_bytes(), stats.cached_run_bytes), (0, 0));
    assert_eq!(stats.leaked_pages, 0);
}

#[test]
fn a_threads_freed_large_allocations_come_back_to_it_and_a_second_free_is_refused() {
    const MIB: usize = 1 << 20;
    let mut a = arena(96 << 20, BackendKind::Shmem);
    let sizes = [2 * MIB, 4 * MIB, 8 * MIB];
    let large: Vec<ShmPtr> = sizes
        .iter()
        .map(|&n| a.alloc(layout(n, 16)).unwrap())
        .collect();
    for &p in &large {
        a.free(p).unwrap();
    }
    assert!(
        a.free(large[1]).is_err(),
        "double free of a kept allocation"
    );
    assert!(a.usable_size(large[1]).is_err());
    std::thread::scope(|s| {
        s.spawn(|| assert!(a.free(large[2]).is_err(), "by another thread"));
    });
    let stats = a.stats();
    assert_eq!((stats.large_allocs, stats.large_bytes), (0, 0));
    assert_eq!(stats.cached_large_bytes, 14 << 20);
    assert_eq!(stats.held_bytes(), 14 << 20, "kept blocks are held");
    // The same number of blocks comes back from the cache...
    let again = a.alloc(layout(3 * MIB + 1, 16)).unwrap();
    assert_eq!(again, large[1]);
    assert_eq!(a.usable_size(again).unwrap(), 4 * MIB);
    assert_eq!(a.stats().cached_large_bytes, 10 << 20);
    // ...and allocations larger than 8 MiB are never kept.
    let big = a.alloc(layout(16 * MIB, 16)).unwrap();
    a.free(big).unwrap();
    assert_eq!(a.stats().cached_large_bytes, 10 << 20);
    // More than 16 MiB freed: kept ones go back to the blocks in turn.
    let many: Vec<ShmPtr> = (0..6)
        .map(|_| a.alloc(layout(8 * MIB, 16)).unwrap())
        .collect();
    for p in many {
        a.free(p).unwrap();
    }
    assert_eq!(a.stats().cached_large_bytes, 16 << 20);
    // A thread that never allocated has no cache: its free goes back to
    // the blocks.
    std::thread::scope(|s| {
        s.spawn(|| a.free(again).unwrap());
    });
    assert_eq!(a.stats().cached_large_bytes, 16 << 20);
    assert_eq!(a.stats().large_allocs, 0);
    // An allocation that needs what the cache keeps gets it: the cache
    // gives everything back before the arena is called full.
    let free = a.stats().data_bytes - a.stats().meta_bytes;
    let whole = a.alloc(layout(free as usize, 16)).unwrap();
    assert_eq!(a.stats().cached_large_bytes, 0);
    assert!(a.alloc(layout(2 * MIB, 16)).is_err(), "the arena is full");
    a.free(whole).unwrap();
    // Releasing eagerly, nothing is kept.
    a.set_release_policy(ReleasePolicy::Eager);
    let p = a.alloc(layout(2 * MIB, 16)).unwrap();
    a.free(p).unwrap();
    assert_eq!(a.stats().cached_large_bytes, 0);
    a.set_release_policy(ReleasePolicy::OnRequest);
    let p = a.alloc(layout(2 * MIB, 16)).unwrap();
    a.free(p).unwrap();
    assert_eq!(a.stats().cached_large_bytes, 2 << 20);
    a.flush_thread_caches();
    let stats = a.audit().unwrap();
    assert_eq!((stats.in_use_bytes(), stats.cached_large_bytes), (0, 0));
    assert_eq!(stats.leaked_pages, 0);
}

/// Child: two threads allocate small objects of every class and free them
/// all but 50 per thread, which it hands to the parent to free, so that
/// its threads own spans of every class; then it reports and waits to be
/// killed.
fn cache_then_wait() {
    let a = open_shared();
    let handed: Vec<ShmPtr> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let a = &a;
                s.spawn(move || {
                    let mut live: Vec<ShmPtr> = (0..3000)
                        .map(|i| a.alloc(layout(1 + (i * 37 + t * 11) % 8192, 8)).unwrap())
                        .collect();
                    let handed = live.split_off(live.len() - 50);
                    for p in live {
                        a.free(p).unwrap();
                    }
                    // Page runs freed into the thread's cache.
                    let runs: Vec<ShmPtr> = (0..8)
                        .map(|i| a.alloc(layout((16 << 10) * (1 + i % 3), 8)).unwrap())
                        .collect();
                    for p in runs {
                        a.free(p).unwrap();
                    }
                    // Large allocations freed into it: 2 and 4 MiB.
                    let large: Vec<ShmPtr> = [2 << 20, 4 << 20]
                        .iter()
                        .map(|&n| a.alloc(layout(n, 16)).unwrap())
                        .collect();
                    for p in large {
                        a.free(p).unwrap();
                    }
                    handed
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let stats = a.stats();
    let handed: Vec<String> = handed.iter().map(|p| p.to_bits().to_string()).collect();
    // Written whole, then renamed: the parent never reads half a line.
    let report = std::env::var("REPORT_PATH").unwrap();
    std::fs::write(
        format!("{report}.tmp"),
        format!("CACHED {} {}\n", stats.cached_objects, handed.join(" ")),
    )
    .unwrap();
    std::fs::rename(format!("{report}.tmp"), report).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// Child: a fresh process's audit, as numbers.
fn audit_child() {
    let a = open_shared();
    a.set_thread_caches(false);
    let stats = a.audit().unwrap();
    println!(
        "AUDIT {} {} {} {} {} {} {} {} {}",
        stats.small_objects,
        stats.cached_objects,
        stats.spans,
        stats.runs,
        stats.in_use_bytes(),
        stats.cached_run_bytes,
        stats.large_allocs,
        stats.cached_large_bytes,
        stats.leaked_pages
    );
}

fn field(stdout: &str, key: &str) -> Vec<u64> {
    let line = stdout
        .lines()
        .find_map(|l| l.split(key).nth(1))
        .unwrap_or_else(|| panic!("no {key} in {stdout}"));
    line.split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn a_process_killed_while_owning_spans_leaves_nothing_reserved() {
    use std::process::{Command, Stdio};

    let a = arena(128 << 20, BackendKind::Shmem);
    let path = a.region().shareable_path().display().to_string();
    // What the living process allocated (kept) and freed into its own
    // spans (one of 64-byte objects, one of 224).
    let kept: Vec<ShmPtr> = (0..100).map(|_| a.alloc(layout(64, 8)).unwrap()).collect();
    for _ in 0..5 {
        let p = a.alloc(layout(200, 8)).unwrap();
        a.free(p).unwrap();
    }
    let run = a.alloc(layout(40 << 10, 8)).unwrap();
    a.free(run).unwrap();
    let large = a.alloc(layout(2 << 20, 16)).unwrap();
    a.free(large).unwrap();
    let ours = a.stats();
    assert_eq!(ours.cached_large_bytes, 2 << 20, "our large allocation");
    assert_eq!(ours.spans, 2);
    assert_eq!(
        ours.cached_run_bytes,
        40 << 10,
        "our run, kept by this thread"
    );
    assert_eq!(ours.cached_objects, (1024 - 100) + 65536 / 224);

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, "cache-then-wait")
        .env("REGION_PATH", &path)
        .env("REPORT_PATH", &report)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The child reports through a file (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (cached, handed): (u64, Vec<ShmPtr>) = loop {
        if let Ok(text) = std::fs::read_to_string(&report)
            && let Some(line) = text
                .strip_prefix("CACHED ")
                .and_then(|t| t.strip_suffix('\n'))
        {
            let mut words = line.split(' ').map(|w| w.parse::<u64>().unwrap());
            // Its count includes ours: the tables are shared.
            let cached = words.next().unwrap() - ours.cached_objects;
            break (cached, words.map(ShmPtr::from_bits).collect());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child did not report"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // Two threads, each owning a span of every class.
    assert!(
        cached > 10_000,
        "the child's spans hold {cached} free objects"
    );
    assert_eq!(handed.len(), 100);
    assert!(a.stats().spans > 40, "the child owns spans");
    // (A thread that starts after the other exited takes its cache over,
    // runs and all, so one or two threads' runs.)
    assert!(
        a.stats().cached_run_bytes >= ours.cached_run_bytes + 240 * 1024,
        "the child's threads keep the runs they freed"
    );
    // (One or two threads' again.)
    assert!(
        a.stats().cached_large_bytes >= ours.cached_large_bytes + (6 << 20),
        "the child's threads keep the large allocations they freed"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // Objects the dead process allocated, freed here: into spans it owned.
    for &p in &handed {
        a.free(p).unwrap();
    }
    for &p in &handed {
        assert!(a.free(p).is_err(), "double free into a dead owner's span");
    }
    // The dead process's spans are still its own in the tables...
    assert_eq!(a.stats().small_objects, kept.len() as u64);
    assert!(a.stats().cached_objects >= ours.cached_objects + cached);
    // ...until a process that attaches notices it is gone.
    let out = run_child("audit", &[("REGION_PATH", path.clone())]);
    let audit = field(&String::from_utf8_lossy(&out.stdout), "AUDIT ");
    assert_eq!(
        audit,
        vec![
            kept.len() as u64,
            ours.cached_objects,
            ours.spans,
            0,
            kept.len() as u64 * 64,
            ours.cached_run_bytes,
            0,
            ours.cached_large_bytes,
            0
        ],
        "small objects, cached, spans, runs, bytes in use, cached run bytes, large allocations, \
         cached large bytes, leaked pages after the kill"
    );
    let stats = a.audit().unwrap();
    assert_eq!(stats.small_objects, kept.len() as u64);
    assert_eq!(stats.cached_objects, 0, "audit flushed ours");
    assert_eq!(stats.cached_run_bytes, 0, "audit flushed ours");
    assert_eq!(stats.cached_large_bytes, 0, "audit flushed ours");
    for p in kept {
        a.free(p).unwrap();
    }
    let stats = a.audit().unwrap();
    assert_eq!((stats.in_use_bytes(), stats.spans), (0, 0));
}
