//! Reproductions of defects found under adversarial use, one test each,
//! through the public API: each failed before its fix.

mod common;

use std::alloc::Layout;
use std::sync::Barrier;

use common::*;
use hugearena::populate::PopulateOptions;
use std::sync::Arc;
use std::time::Duration;

use hugearena::populate::{Driver, FillError, FnSource, Populator};
use hugearena::{Arena, BackendKind, Error, Region, RegionOptions, ShmPtr};

fn in_thread() -> PopulateOptions {
    PopulateOptions::new().driver(Driver::InThread).readahead(0)
}

/// Page 0 takes 1.5 s to fill (with 0x5A); the others fill at once.
fn slow_page_zero() -> FnSource<impl Fn(u64, &mut [u8]) -> Result<(), FillError> + Send + Sync> {
    FnSource(|index: u64, dst: &mut [u8]| {
        if index == 0 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        dst.fill(0x5A);
        Ok(())
    })
}

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
        "wait-at-emfile" => {
            let region = Arc::new(Region::open(&path).unwrap());
            let p = Populator::with_options(region.clone(), slow_page_zero(), in_thread()).unwrap();
            // Use up every descriptor: /proc cannot be opened any more.
            let mut held = Vec::new();
            while let Ok(fd) = nix::unistd::dup(std::io::stdout()) {
                held.push(fd);
            }
            println!("HELD {}", held.len());
            let mut b = [0u8; 1];
            region.read_via_primary(0, &mut b).unwrap();
            drop(held);
            println!(
                "TAKEOVERS {} FILLS {} BYTE {}",
                p.stats().takeovers,
                p.stats().fills,
                b[0]
            );
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

/// A waiter that cannot open `/proc` (every descriptor in use) must not
/// declare the live filler dead and fill the page a second time (a write
/// the filler made after its touch returned would be lost).
#[test]
fn a_waiter_out_of_descriptors_never_takes_over_a_live_filler() {
    let region =
        Arc::new(Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap());
    let p = Populator::with_options(region.clone(), slow_page_zero(), in_thread()).unwrap();
    let path = region.shareable_path().display().to_string();
    let filler = {
        let region = region.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            region.read_via_primary(0, &mut b).unwrap();
            // The filler's own write, after its touch returned.
            region.write_via_primary(0, &[0xEE]).unwrap();
            b[0]
        })
    };
    // The child starts waiting while the fill is in progress.
    std::thread::sleep(Duration::from_millis(200));
    let out = run_child("wait-at-emfile", &[("REGION_PATH", path)]);
    assert_eq!(filler.join().unwrap(), 0x5A);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("TAKEOVERS 0 FILLS 0"), "child: {stdout}");
    let mut b = [0u8; 1];
    region.read_via_primary(0, &mut b).unwrap();
    assert_eq!(b[0], 0xEE, "the filler's write was lost");
    assert_eq!(p.stats().fills, 1);
}
