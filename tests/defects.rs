//! Reproductions of defects found under adversarial use, one test each,
//! through the public API: each failed before its fix.

mod common;

use std::alloc::Layout;
use std::sync::Barrier;

use common::*;
use hugearena::populate::PopulateOptions;
use hugearena::{Arena, BackendKind, Error, RegionOptions, ShmPtr};

fn arena(size: u64, kind: BackendKind) -> Arena {
    Arena::create(
        RegionOptions::new(size).backend(kind),
        PopulateOptions::new(),
    )
    .unwrap()
}

/// Two threads free the same small object at once, many times over, with
/// the per-thread caches on: exactly one free succeeds each time, and the
/// object is never handed out twice afterwards.
#[test]
fn a_double_free_across_threads_is_rejected_and_never_hands_out_twice() {
    let a = arena(16 << 20, BackendKind::Shmem);
    a.set_thread_caches(true);
    let l = Layout::from_size_align(64, 8).unwrap();
    for round in 0..200 {
        let p = a.alloc(l).unwrap();
        let go = Barrier::new(2);
        let (r1, r2, mut got) = std::thread::scope(|s| {
            let free_then_alloc = || {
                go.wait();
                let r = a.free(p);
                // Both frees happen before either thread allocates again
                // (a free after the object was handed out anew would be a
                // use after free, which no allocator can tell apart).
                go.wait();
                let got: Vec<ShmPtr> = (0..16).map(|_| a.alloc(l).unwrap()).collect();
                (r, got)
            };
            let t1 = s.spawn(free_then_alloc);
            let t2 = s.spawn(free_then_alloc);
            let (r1, g1) = t1.join().unwrap();
            let (r2, mut g2) = t2.join().unwrap();
            let mut got = g1;
            got.append(&mut g2);
            (r1, r2, got)
        });
        assert!(
            r1.is_ok() != r2.is_ok(),
            "round {round}: frees of one object gave {r1:?} and {r2:?}"
        );
        let failed = if r1.is_err() { r1 } else { r2 };
        assert!(matches!(failed, Err(Error::InvalidFree { .. })));
        let n = got.len();
        got.sort();
        got.dedup();
        assert_eq!(
            got.len(),
            n,
            "round {round}: an object was handed out twice"
        );
        for q in got {
            a.free(q).unwrap();
        }
    }
    a.audit().unwrap();
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let path = std::env::var("REGION_PATH").unwrap();
    match role.as_str() {
        "free-twice" => {
            let a = Arena::open(&path, PopulateOptions::new()).unwrap();
            a.set_thread_caches(true);
            let p = ShmPtr::from_offset(std::env::var("PTR").unwrap().parse().unwrap());
            match a.free(p) {
                Ok(()) => println!("FREE ok"),
                Err(e) => println!("FREE err {e}"),
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// A second process frees an object the first one freed into its thread
/// cache: the shared bitmap already says free, so it is rejected.
#[test]
fn a_double_free_across_processes_is_rejected() {
    let a = arena(16 << 20, BackendKind::Shmem);
    a.set_thread_caches(true);
    let l = Layout::from_size_align(64, 8).unwrap();
    let p = a.alloc(l).unwrap();
    a.free(p).unwrap();
    let out = run_child(
        "free-twice",
        &[
            (
                "REGION_PATH",
                a.region().shareable_path().display().to_string(),
            ),
            ("PTR", p.offset().to_string()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FREE err"), "child: {stdout}");
    // Everything this thread allocates next is distinct.
    let mut got: Vec<ShmPtr> = (0..64).map(|_| a.alloc(l).unwrap()).collect();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 64);
}

/// Over-aligned allocations are aligned in memory, not only as offsets,
/// on every backend (the views start on 2 MiB boundaries).
#[test]
fn over_aligned_allocations_are_aligned_in_memory() {
    for kind in [BackendKind::Shmem, BackendKind::ShmemThp] {
        for mib in [6u64, 10, 16, 34, 66, 130] {
            let a = arena(mib << 20, kind);
            for align in [8192usize, 64 << 10, 1 << 20, 2 << 20] {
                let p = a
                    .alloc(Layout::from_size_align(100, align).unwrap())
                    .unwrap();
                let addr = a.local(p).as_ptr() as usize;
                assert_eq!(addr % align, 0, "{kind}: align {align} gave {addr:#x}");
            }
            #[repr(align(65536))]
            struct Aligned([u8; 16]);
            let v = allocator_api2::vec::Vec::<Aligned, _>::with_capacity_in(3, &a);
            assert_eq!(v.as_ptr() as usize % 65536, 0, "{kind}: Vec in the arena");
        }
    }
}
