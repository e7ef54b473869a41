//! Reproductions of defects found under adversarial use, one test each,
//! through the public API: each failed before its fix.

mod common;

use std::alloc::Layout;
use std::sync::Barrier;

use common::*;
use hugearena::populate::PopulateOptions;
use std::sync::Arc;
use std::time::Duration;

use hugearena::populate::{Driver, FillError, Populator};
use hugearena::{Arena, BackendKind, Error, Region, RegionOptions, ShmPtr};

fn in_thread() -> PopulateOptions {
    PopulateOptions::new().driver(Driver::InThread).readahead(0)
}

/// Page 0 takes 1.5 s to fill (with 0x5A); the others fill at once.
fn slow_page_zero() -> SafeFnSource<impl Fn(u64, &mut [u8]) -> Result<(), FillError> + Send + Sync>
{
    safe_fn(|index: u64, dst: &mut [u8]| {
        if index == 0 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        dst.fill(0x5A);
        Ok(())
    })
}

/// Pattern 7 at every byte.
fn patterned() -> SafeFnSource<impl Fn(u64, &mut [u8]) -> Result<(), FillError> + Send + Sync> {
    safe_fn(|index: u64, dst: &mut [u8]| {
        fill_pattern(7, index as usize * dst.len(), dst);
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

/// Checks that no object in `got` was handed out twice, then frees them.
fn free_all_distinct(a: &Arena, got: &mut Vec<ShmPtr>, round: usize) {
    let n = got.len();
    got.sort();
    got.dedup();
    assert_eq!(
        got.len(),
        n,
        "round {round}: an object was handed out twice"
    );
    for &q in got.iter() {
        a.free(q).unwrap();
    }
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
        free_all_distinct(&a, &mut got, round);
    }
    a.audit().unwrap();
}

/// The owner of an object's span frees it while another thread frees it
/// too, many times over. The owner's free takes no read-modify-write, so
/// both may succeed (the README says so); what must hold is that the
/// object is freed once: never handed out twice afterwards, and the
/// tables stay consistent.
#[test]
fn an_owners_free_racing_another_threads_never_hands_an_object_out_twice() {
    let a = arena(16 << 20, BackendKind::Shmem);
    let l = Layout::from_size_align(64, 8).unwrap();
    let (mut both_ok, mut one_ok) = (0, 0);
    for round in 0..500 {
        // This thread owns the span: it allocated the object.
        let p = a.alloc(l).unwrap();
        let go = Barrier::new(2);
        let (mine, theirs) = std::thread::scope(|s| {
            let other = s.spawn(|| {
                go.wait();
                let r = a.free(p);
                go.wait();
                r
            });
            go.wait();
            let mine = a.free(p);
            go.wait();
            (mine, other.join().unwrap())
        });
        match (mine.is_ok(), theirs.is_ok()) {
            (true, true) => both_ok += 1,
            (true, false) | (false, true) => one_ok += 1,
            (false, false) => panic!("round {round}: neither free of a live object succeeded"),
        }
        // The owner allocates more than the span could hold twice over
        // from the freed object: a duplicate would show.
        let mut got: Vec<ShmPtr> = (0..64).map(|_| a.alloc(l).unwrap()).collect();
        free_all_distinct(&a, &mut got, round);
    }
    let stats = a.audit().unwrap();
    assert_eq!(stats.in_use_bytes(), 0, "{stats:?}");
    println!("racing frees: both succeeded {both_ok} times, one {one_ok} times");
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
        "release-loop" => {
            // Two threads allocate a block, touch every page, free it and
            // release free blocks, for a while (or until killed).
            let kind: BackendKind = match std::env::var("KIND").unwrap().as_str() {
                "shmem" => BackendKind::Shmem,
                _ => BackendKind::ShmemThp,
            };
            let _ = kind;
            let a = Arena::open(&path, PopulateOptions::new()).unwrap();
            let millis: u64 = std::env::var("MILLIS").unwrap().parse().unwrap();
            let until = std::time::Instant::now() + Duration::from_millis(millis);
            let rounds = std::thread::scope(|s| {
                let worker = || {
                    let mut rounds = 0u64;
                    while std::time::Instant::now() < until {
                        let Ok(p) = a.alloc_bytes(2 << 20) else {
                            a.release_free_blocks();
                            continue;
                        };
                        let base = a.local(p).unwrap().as_ptr();
                        for page in 0..512 {
                            // SAFETY: inside the live 2 MiB allocation.
                            unsafe { base.add(page * 4096).write_volatile(page as u8) };
                        }
                        a.free(p).unwrap();
                        a.release_free_blocks();
                        rounds += 1;
                    }
                    rounds
                };
                let t1 = s.spawn(worker);
                let t2 = s.spawn(worker);
                t1.join().unwrap() + t2.join().unwrap()
            });
            println!("ROUNDS {rounds} FAILURES {:?}", a.populator().failures());
        }
        "hold-page-zero" => {
            // Claims page 0 and never finishes filling it.
            let region = Arc::new(Region::open(&path).unwrap());
            let never = safe_fn(|index: u64, dst: &mut [u8]| {
                if index == 0 {
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                dst.fill(1);
                Ok(())
            });
            let _p = Populator::with_options(region.clone(), never, in_thread()).unwrap();
            let mut b = [0u8; 1];
            region.read_via_primary(0, &mut b).unwrap();
            unreachable!("the fill of page 0 never ends");
        }
        "at-emfile" => {
            // Everything made before the descriptors run out.
            let a = arena(16 << 20, BackendKind::Shmem);
            let p = a.alloc_bytes(64 << 10).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let snap = dir.path().join("a.snap");
            a.snapshot(&snap).unwrap();
            let region = Arc::new(
                Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap(),
            );
            let populator =
                Populator::with_options(region.clone(), patterned(), in_thread()).unwrap();
            let mut held = Vec::new();
            while let Ok(fd) = nix::unistd::dup(std::io::stdout()) {
                held.push(fd);
            }
            let mut report = Vec::new();
            let mut check = |what: &str, r: Result<(), String>| {
                report.push(format!(
                    "EP {what}: {}",
                    r.err().unwrap_or_else(|| "OK".into())
                ));
            };
            let e = |x: Error| x.to_string();
            check(
                "create",
                Region::create(RegionOptions::new(8 << 20))
                    .map(drop)
                    .map_err(e),
            );
            check(
                "populator",
                Populator::with_options(region.clone(), patterned(), in_thread())
                    .map(drop)
                    .map_err(e),
            );
            check("snapshot", a.snapshot(&snap).map(drop).map_err(e));
            check(
                "open snapshot",
                hugearena::persist::SnapshotSource::open(&snap)
                    .map(drop)
                    .map_err(e),
            );
            // What keeps working: allocation, and touches in this process.
            check("alloc", a.alloc_bytes(100).map(drop).map_err(e));
            check("free", a.free(p).map_err(e));
            let mut b = [0u8; 1];
            region.read_via_primary(4096 + 9, &mut b).unwrap();
            check(
                "touch",
                (b[0] == pattern_byte(7, 4096 + 9))
                    .then_some(())
                    .ok_or("wrong byte".into()),
            );
            // A child forked now cannot re-arm its populator: its view is
            // made inaccessible (SIGSEGV), never read as zeroes.
            // SAFETY: the child touches one byte and leaves with _exit.
            let child = match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    let byte = region.read_via_primary(8 * 4096, &mut b).map(|()| b[0]);
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(if byte.is_ok() { 10 } else { 11 }) }
                }
                nix::unistd::ForkResult::Parent { child } => child,
            };
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            drop(held);
            for line in &report {
                println!("{line}");
            }
            println!("FORKED {status:?}");
            println!("FAILURES {:?}", populator.failures().len());
            let _ = std::fs::read_dir(dir.path()).map(|d| println!("FILES {}", d.count()));
        }
        "read-patterned" => {
            let region = Arc::new(Region::open(&path).unwrap());
            let _p = Populator::with_options(region.clone(), patterned(), in_thread()).unwrap();
            let offset: usize = std::env::var("OFFSET").unwrap().parse().unwrap();
            let mut b = [0u8; 1];
            region.read_via_primary(offset, &mut b).unwrap();
            println!("READ {} WANT {}", b[0], pattern_byte(7, offset));
        }
        "touch-page-zero" => {
            let region = Arc::new(Region::open(&path).unwrap());
            let driver = match std::env::var("DRIVER").unwrap().as_str() {
                "handlers" => Driver::HandlerThreads(1),
                _ => Driver::InThread,
            };
            let options = in_thread()
                .driver(driver)
                .fill_timeout(Duration::from_millis(300));
            let _p = Populator::with_options(region.clone(), slow_page_zero(), options).unwrap();
            let mut b = [0u8; 1];
            region.read_via_primary(0, &mut b).unwrap();
            println!("READ {}", b[0]);
        }
        "recursive-source" => {
            let region = Arc::new(Region::open(&path).unwrap());
            let r = region.clone();
            let touches_itself = safe_fn(move |_index: u64, dst: &mut [u8]| {
                let mut b = [0u8; 1];
                r.read_via_primary(0, &mut b).unwrap();
                dst.fill(b[0]);
                Ok(())
            });
            let options = in_thread().fill_timeout(Duration::from_secs(600));
            let _p = Populator::with_options(region.clone(), touches_itself, options).unwrap();
            let mut b = [0u8; 1];
            region.read_via_primary(0, &mut b).unwrap();
            println!("READ {}", b[0]);
        }
        "touch-all" => {
            let driver = match std::env::var("DRIVER").unwrap().as_str() {
                "handlers" => Driver::HandlerThreads(1),
                _ => Driver::InThread,
            };
            let a = Arena::open(&path, PopulateOptions::new().driver(driver)).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for off in (0..a.region().len()).step_by(buf.len()) {
                a.region().read_via_primary(off, &mut buf).unwrap();
            }
            assert!(
                a.populator().failures().is_empty(),
                "{:?}",
                a.populator().failures()
            );
        }
        "hostile-tables" => {
            let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
            let a = arena(16 << 20, BackendKind::Shmem);
            let l = Layout::from_size_align(48, 8).unwrap();
            let mut live: Vec<ShmPtr> = (0..200).map(|_| a.alloc(l).unwrap()).collect();
            live.push(a.alloc_bytes(100 << 10).unwrap());
            live.push(a.alloc_bytes(3 << 20).unwrap());
            // Damage every table word after the header's identity words
            // with random values (some words kept plausible: small numbers).
            let mut x = seed | 1;
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let meta = a.stats().meta_bytes as usize;
            let mut words = vec![0u8; meta - 32];
            for w in words.chunks_exact_mut(8) {
                let v = match next() % 4 {
                    0 => next(),
                    1 => next() % 4096,
                    2 => next() & 0xC03F_0000_0000_FFFF,
                    _ => 0,
                };
                w.copy_from_slice(&v.to_le_bytes());
            }
            a.region().write_via_primary(32, &words).unwrap();
            let mut oks = 0;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for i in 0..3000u64 {
                    let r = match next() % 5 {
                        0 => a.alloc(l).map(drop),
                        1 => a.alloc_bytes((next() % (3 << 20)) as usize + 1).map(drop),
                        2 => live
                            .get((next() % live.len() as u64) as usize)
                            .map_or(Ok(()), |p| a.free(*p)),
                        3 => a.free(ShmPtr::from_offset(next() % (16 << 20))),
                        _ => {
                            let _ = a.stats();
                            let _ = a.local(ShmPtr::from_offset(next()));
                            Ok(())
                        }
                    };
                    oks += u64::from(r.is_ok());
                    if i % 500 == 0 {
                        a.release_free_blocks();
                        let _ = a.audit();
                    }
                }
            }));
            assert!(result.is_ok(), "a damaged table made the arena panic");
            println!("HOSTILE-OK {oks}");
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
                let addr = a.local(p).unwrap().as_ptr() as usize;
                assert_eq!(addr % align, 0, "{kind}: align {align} gave {addr:#x}");
            }
            #[repr(align(65536))]
            struct Aligned(#[allow(dead_code)] [u8; 16]);
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

/// Releasing free blocks while other threads fill pages with readahead next
/// to them never leaves a page mapped-as-present with nothing behind it:
/// no SIGBUS, no driver failure.
#[test]
fn releasing_blocks_while_readahead_runs_next_to_them_is_safe() {
    for (kind, name) in [
        (BackendKind::Shmem, "shmem"),
        (BackendKind::ShmemThp, "thp"),
    ] {
        let a = arena(8 << 20, kind);
        let out = run_child_within(
            "release-loop",
            &[
                (
                    "REGION_PATH",
                    a.region().shareable_path().display().to_string(),
                ),
                ("KIND", name.into()),
                ("MILLIS", "2500".into()),
            ],
            Duration::from_secs(60),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {:?} (signal {:?})\n{stdout}\n{}",
            out.status,
            killed_by(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("FAILURES []"), "{name}: {stdout}");
        a.audit().unwrap();
    }
}

/// A releaser killed at random points of its loop leaves every page either
/// present with its page or absent: another process then touches all of
/// the arena's memory without SIGBUS or a hang, on both drivers.
#[test]
fn a_releaser_killed_at_any_point_leaves_consistent_pages() {
    // Room for the blocks each kill may leave allocated.
    let a = arena(64 << 20, BackendKind::Shmem);
    let path = a.region().shareable_path().display().to_string();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for kill in 0..12 {
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_ROLE, "release-loop")
            .env("REGION_PATH", &path)
            .env("KIND", "shmem")
            .env("MILLIS", "100000")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(30 + rng % 120));
        child.kill().unwrap();
        child.wait().unwrap();
        for driver in ["in-thread", "handlers"] {
            let out = run_child_within(
                "touch-all",
                &[("REGION_PATH", path.clone()), ("DRIVER", driver.into())],
                Duration::from_secs(60),
            );
            assert!(
                out.status.success(),
                "after kill {kill}, {driver}: {:?} (signal {:?})\n{}",
                out.status,
                killed_by(&out),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A live filler that never finishes (stopped, or stuck in its source)
/// holds page 0: a toucher gives up after the fill timeout with SIGBUS on
/// that page (both drivers), and `populate` returns an error naming the
/// timeout; the error log names the holder's pid. No wait without bound.
#[test]
fn a_stuck_filler_makes_touchers_give_up_at_the_deadline() {
    let region =
        Arc::new(Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap());
    let path = region.shareable_path().display().to_string();
    let exe = std::env::current_exe().unwrap();
    let mut holder = std::process::Command::new(exe)
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, "hold-page-zero")
        .env("REGION_PATH", &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for driver in ["in-thread", "handlers"] {
        let started = std::time::Instant::now();
        let out = run_child_within(
            "touch-page-zero",
            &[("REGION_PATH", path.clone()), ("DRIVER", driver.into())],
            Duration::from_secs(30),
        );
        assert_eq!(
            killed_by(&out),
            Some(libc::SIGBUS),
            "{driver}: {:?}",
            out.status
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    let p = Populator::with_options(
        region.clone(),
        slow_page_zero(),
        in_thread().fill_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let err = p.populate(0, 4096).unwrap_err();
    assert!(
        err.to_string().contains("ETIMEDOUT") || err.to_string().contains("timed out"),
        "{err}"
    );
    let errors = p.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.error == FillError::Stuck { pid: holder.id() }),
        "{errors:?}"
    );
    // Once the holder is gone its claim is taken over and the page fills.
    holder.kill().unwrap();
    holder.wait().unwrap();
    p.retry(0, 4096).unwrap();
    p.populate(0, 4096).unwrap();
    let mut b = [0u8; 1];
    region.read_via_primary(0, &mut b).unwrap();
    assert_eq!(b[0], 0x5A);
}

/// A source that touches the page it is filling gets SIGBUS for that touch
/// instead of waiting for itself forever.
#[test]
fn a_source_that_touches_its_own_page_gets_sigbus_not_a_hang() {
    let region = Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap();
    let out = run_child_within(
        "recursive-source",
        &[("REGION_PATH", region.shareable_path().display().to_string())],
        Duration::from_secs(30),
    );
    assert_eq!(killed_by(&out), Some(libc::SIGBUS), "{:?}", out.status);
}

/// A present page whose memory was punched out of the file behind the
/// protocol's back is filled again from the source on its next touch,
/// with handler threads too (they used to leave the toucher parked).
#[test]
fn a_present_page_with_nothing_behind_it_is_filled_again() {
    for driver in [Driver::HandlerThreads(1), Driver::InThread] {
        let region = Arc::new(
            Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap(),
        );
        let p =
            Populator::with_options(region.clone(), slow_page_zero(), in_thread().driver(driver))
                .unwrap();
        p.populate(4096, 4096).unwrap();
        let data = region.layout().data_offset() as i64;
        nix::fcntl::fallocate(
            region.fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            data + 4096,
            4096,
        )
        .unwrap();
        let mut b = [0u8; 1];
        region.read_via_primary(4096, &mut b).unwrap();
        assert_eq!(b[0], 0x5A, "{driver}");
        assert_eq!(p.stats().refills, 1, "{driver}");
    }
}

fn tracked_region() -> (Arc<Region>, Populator) {
    let region =
        Arc::new(Region::create(RegionOptions::new(4 << 20).backend(BackendKind::Shmem)).unwrap());
    let options = PopulateOptions::new().track_writes(true);
    let p =
        Populator::with_options(region.clone(), hugearena::populate::ZeroSource, options).unwrap();
    p.populate(0, 4 << 20).unwrap();
    (region, p)
}

/// An incremental snapshot over a file of its own chain is refused (it
/// made the chain a cycle and lost the base's pages), and a cyclic chain
/// planted on disk is an error at open, not a stack overflow.
#[test]
fn a_snapshot_chain_cannot_become_a_cycle() {
    use hugearena::persist::{self, SnapshotSource};
    let dir = tempfile::tempdir().unwrap();
    let (region, p) = tracked_region();
    let mut snap = persist::Snapshotter::new();
    region.write_via_primary(0, b"base").unwrap();
    snap.full(&p, dir.path().join("snap.0")).unwrap();
    region.write_via_primary(4096, b"one").unwrap();
    let one = snap.incremental(&p, dir.path().join("snap.1")).unwrap();
    if !p.tracks_writes() {
        // Before Linux 6.7 increments are full snapshots: no chain to loop.
        assert!(one.full_because.is_some(), "{one:?}");
        let source = SnapshotSource::open(dir.path().join("snap.1")).unwrap();
        assert_eq!(source.depth(), 0);
        return;
    }
    region.write_via_primary(8192, b"two").unwrap();
    let err = snap.incremental(&p, dir.path().join("snap.0")).unwrap_err();
    assert!(err.to_string().contains("part of the chain"), "{err}");
    // The chain is intact: snap.1 restores with the base's page.
    let source = SnapshotSource::open(dir.path().join("snap.1")).unwrap();
    assert_eq!(source.depth(), 1);
    // A cycle made by hand (snap.1 copied over snap.0's name, so snap.0
    // names itself as parent... via snap.1's header) is refused.
    std::fs::copy(dir.path().join("snap.1"), dir.path().join("snap.0")).unwrap();
    let err = SnapshotSource::open(dir.path().join("snap.0")).unwrap_err();
    assert!(
        err.to_string().contains("loops back") || err.to_string().contains("replaced"),
        "{err}"
    );
}

/// Snapshot files are 0600; the temporary is created exclusively and never
/// follows a symlink; a failed rename leaves nothing behind.
#[test]
fn snapshot_files_are_private_and_temporaries_are_safe() {
    use hugearena::persist;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (region, _p) = tracked_region();
    let path = dir.path().join("pool.snap");
    persist::snapshot(&region, &path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Plant symlinks under every temporary name this process could use
    // next: the snapshot must not write through them.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(
        &victim,
        dir.path()
            .join(format!(".pool2.snap.tmp-{}", std::process::id())),
    )
    .unwrap();
    for n in 0..64 {
        let _ = std::os::unix::fs::symlink(
            &victim,
            dir.path()
                .join(format!(".pool2.snap.tmp-{}-{n}", std::process::id())),
        );
    }
    let _ = persist::snapshot(&region, dir.path().join("pool2.snap"));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A rename that fails (the target is a non-empty directory) leaves no
    // temporary behind.
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("x"), b"x").unwrap();
    assert!(persist::snapshot(&region, &target).is_err());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".taken"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Damaged arena tables (random words over every table) give errors or
/// wrong-but-bounded answers: never a panic, never a hang.
#[test]
fn damaged_arena_tables_never_panic_or_hang() {
    for seed in 1..=12u64 {
        let out = run_child_within(
            "hostile-tables",
            &[
                ("REGION_PATH", String::new()),
                ("SEED", (seed * 0x9E37_79B9).to_string()),
            ],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("HOSTILE-OK"),
            "seed {seed}: {:?}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `body` in a forked child and returns its exit status: 0 when the
/// body returned `Ok`, 1 with its error, 2 if it panicked. The child exits
/// with `_exit`, running no destructor of the parent's state by accident.
fn in_forked_child(body: impl FnOnce() -> Result<(), String>) -> i32 {
    in_forked_child_meanwhile(body, || {})
}

/// [`in_forked_child`], running `meanwhile` in the parent while the child
/// runs.
fn in_forked_child_meanwhile(
    body: impl FnOnce() -> Result<(), String>,
    meanwhile: impl FnOnce(),
) -> i32 {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    // SAFETY: the child runs `body` (which only touches memory and makes
    // system calls through the library) and leaves with `_exit`.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                Ok(Ok(())) => 0,
                Ok(Err(why)) => {
                    let _ = nix::unistd::write(std::io::stderr(), why.as_bytes());
                    1
                }
                Err(_) => 2,
            };
            // SAFETY: ends the child without unwinding into the test harness.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            meanwhile();
            match waitpid(child, None).unwrap() {
                WaitStatus::Exited(_, code) => code,
                other => panic!("forked child ended with {other:?}"),
            }
        }
    }
}

/// Page `index` of the fork tests' source holds `index as u8 ^ 0xA5`.
fn indexed_source() -> SafeFnSource<impl Fn(u64, &mut [u8]) -> Result<(), FillError> + Send + Sync>
{
    safe_fn(|index: u64, dst: &mut [u8]| {
        dst.fill(index as u8 ^ 0xA5);
        Ok(())
    })
}

/// A child forked after a populator exists reads the source's bytes (not
/// zeroes) on every driver, its writes reach the parent, and nothing it
/// does, dropping its copy of the populator included, stops the parent's
/// handler threads.
#[test]
fn a_forked_child_reads_source_bytes_and_leaves_the_parent_serving() {
    for driver in [
        Driver::InThread,
        Driver::HandlerThreads(1),
        Driver::Proactive,
    ] {
        let region = Arc::new(
            Region::create(RegionOptions::new(16 << 20).backend(BackendKind::Shmem)).unwrap(),
        );
        let g = region.granule().bytes();
        let options = PopulateOptions::new().driver(driver).readahead(16 * g);
        let mut populator =
            Some(Populator::with_options(Arc::clone(&region), indexed_source(), options).unwrap());
        let base = region.primary().as_ptr();
        let byte = |i: usize| -> u8 {
            // SAFETY: inside the primary view, which the populator fills.
            unsafe { std::ptr::read_volatile(base.add(i * g + 7)) }
        };
        // Some pages populated before the fork, most not.
        for i in 0..8 {
            assert_eq!(byte(i), i as u8 ^ 0xA5);
        }
        let status = in_forked_child(|| {
            for i in (0..region.len() / g).step_by(3) {
                if byte(i) != i as u8 ^ 0xA5 {
                    return Err(format!("{driver}: child read {:#x} at page {i}", byte(i)));
                }
            }
            // SAFETY: inside the primary; page 100 was not read above, so
            // this write is its first touch in any process.
            unsafe { base.add(100 * g).write_volatile(0xC7) };
            drop(populator.take());
            Ok(())
        });
        assert_eq!(status, 0, "{driver}: the forked child failed");
        let populator = populator.unwrap();
        // The parent still serves first touches, on pages the child did not
        // populate, and sees the child's write.
        for i in (1..region.len() / g).step_by(3) {
            assert_eq!(byte(i), i as u8 ^ 0xA5, "{driver}: parent, page {i}");
        }
        // SAFETY: as above.
        assert_eq!(unsafe { base.add(100 * g).read_volatile() }, 0xC7);
        if let Driver::HandlerThreads(n) = driver {
            assert_eq!(
                populator.live_handlers(),
                n,
                "the child stopped the parent's handlers"
            );
        }
        assert!(
            populator.failures().is_empty(),
            "{:?}",
            populator.failures()
        );
    }
}

/// An arena keeps working in a forked child: the child allocates and
/// frees (without the parent's thread caches), the parent goes on
/// allocating, and no object is handed to both.
#[test]
fn an_arena_keeps_working_in_a_forked_child() {
    let a = arena(32 << 20, BackendKind::Shmem);
    a.set_thread_caches(true);
    let l = Layout::from_size_align(256, 8).unwrap();
    // Cached free objects in this thread at the fork.
    let warm: Vec<ShmPtr> = (0..64).map(|_| a.alloc(l).unwrap()).collect();
    for p in warm {
        a.free(p).unwrap();
    }
    let (read, write) = nix::unistd::pipe().unwrap();
    let mut parents = Some(a);
    let status = in_forked_child(|| {
        let a = parents.take().unwrap();
        let mut offsets = Vec::new();
        for round in 0..200 {
            let p = a.alloc(l).map_err(|e| e.to_string())?;
            // SAFETY: a fresh 256-byte allocation.
            unsafe { std::ptr::write_bytes(a.local(p).unwrap().as_ptr(), 0xC1, 256) };
            if round % 2 == 0 {
                a.free(p).map_err(|e| e.to_string())?;
            } else {
                offsets.extend_from_slice(&p.offset().to_le_bytes());
            }
        }
        nix::unistd::write(&write, &offsets).map_err(|e| e.to_string())?;
        drop(a);
        Ok(())
    });
    assert_eq!(status, 0, "the forked child failed");
    let a = parents.unwrap();
    drop(write);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(read), &mut bytes).unwrap();
    let theirs: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(theirs.len(), 100);
    let mine: Vec<ShmPtr> = (0..300).map(|_| a.alloc(l).unwrap()).collect();
    for p in &mine {
        assert!(
            !theirs.contains(&p.offset()),
            "{p:?} handed to both processes"
        );
        // SAFETY: a fresh 256-byte allocation.
        unsafe { std::ptr::write_bytes(a.local(*p).unwrap().as_ptr(), 0xA1, 256) };
    }
    for &off in &theirs {
        let p = a.local(ShmPtr::from_offset(off)).unwrap().as_ptr();
        // SAFETY: the child's allocation, still live.
        let got = unsafe { std::slice::from_raw_parts(p, 256) };
        assert!(
            got.iter().all(|&b| b == 0xC1),
            "child's object at {off} overwritten"
        );
    }
}

/// A child forked by a thread with a cache never uses that cache (its
/// copy names the same span as the parent's): the parent thread and the
/// child allocate and free at the same time, each checking that nobody
/// wrote over the objects it holds.
#[test]
fn a_forked_child_and_its_parent_allocating_at_once_share_no_object() {
    let a = arena(64 << 20, BackendKind::Shmem);
    a.set_thread_caches(true);
    let l = Layout::from_size_align(64, 8).unwrap();
    // This thread's cache owns a span of the class with free objects.
    let warm: Vec<ShmPtr> = (0..64).map(|_| a.alloc(l).unwrap()).collect();
    for p in warm {
        a.free(p).unwrap();
    }
    // Alloc and free in a window of 32 live objects, each marked with
    // `mark` and checked before it is freed: how many were overwritten.
    let churn = |mark: u64| -> Result<usize, String> {
        let mut live = std::collections::VecDeque::new();
        let mut overwritten = 0;
        for round in 0..300_000u64 {
            let p = a.alloc(l).map_err(|e| e.to_string())?;
            let word = a
                .local(p)
                .map_err(|e| e.to_string())?
                .as_ptr()
                .cast::<u64>();
            // SAFETY: a fresh 64-byte allocation, 8-aligned.
            unsafe { word.write_volatile(mark ^ round) };
            live.push_back((p, word, round));
            if live.len() == 32 {
                let (p, word, round) = live.pop_front().unwrap();
                // SAFETY: still allocated by this process.
                overwritten += usize::from(unsafe { word.read_volatile() } != mark ^ round);
                a.free(p).map_err(|e| e.to_string())?;
            }
        }
        Ok(overwritten)
    };
    let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
    let mut parents = None;
    let status = in_forked_child_meanwhile(
        || {
            nix::unistd::write(&ready_w, b"g").map_err(|e| e.to_string())?;
            match churn(0xC41D)? {
                0 => Ok(()),
                n => Err(format!("{n} of the child's objects were overwritten")),
            }
        },
        || {
            let mut go = [0u8; 1];
            nix::unistd::read(&ready_r, &mut go).unwrap();
            parents = Some(churn(0x9A7E));
        },
    );
    assert_eq!(status, 0, "the forked child failed");
    assert_eq!(
        parents,
        Some(Ok(0)),
        "the parent's objects were overwritten"
    );
}

/// A tmpfs of `mib` MiB mounted on a fresh directory; unmounted on drop.
struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    fn mount(mib: u64) -> SmallTmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount(8)");
        assert!(status.success(), "mounting a tmpfs needs root: {status:?}");
        SmallTmpfs(dir)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// On a full tmpfs a fill fails with ENOSPC (tried again a few times, then
/// the page is poisoned: SIGBUS on touch in any process, `errors()` names
/// ENOSPC); nothing crashes, neither on the page-state table nor on the
/// fill's own write. The poison stays after space is freed, until `retry`;
/// then the pages fill with the source's bytes. The page-state table is
/// allocated as it is used: where even its page cannot be allocated,
/// `populate` returns ENOSPC and a touch gets SIGBUS, and once space
/// returns that page fills normally (nothing stayed poisoned).
#[test]
fn a_full_tmpfs_poisons_pages_until_space_returns_and_they_are_retried() {
    use std::io::Write;
    let fs = SmallTmpfs::mount(8);
    let region = Arc::new(
        Region::create(
            RegionOptions::new(16 << 20)
                .backend(BackendKind::Shmem)
                .path(fs.0.path().join("region")),
        )
        .unwrap(),
    );
    let path = region.shareable_path().display().to_string();
    let populator = Populator::with_options(region.clone(), patterned(), in_thread()).unwrap();
    let g = region.granule().bytes();
    // The page-state table is allocated as it is used: use the part that
    // describes pages 0..512 before the file system fills up.
    populator.populate(100 * g, g).unwrap();
    // Fill what is left of the file system.
    let ballast_path = fs.0.path().join("ballast");
    let mut ballast = std::fs::File::create(&ballast_path).unwrap();
    for chunk in [1 << 20, 4096] {
        while ballast.write_all(&vec![1u8; chunk]).is_ok() {}
    }
    drop(ballast);

    populator.populate(0, 8 * g).unwrap();
    let errors = populator.errors();
    assert_eq!(errors.len(), 8, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.to_string().contains("ENOSPC")),
        "{errors:?}"
    );
    let touch = |offset: usize| {
        run_child_within(
            "read-patterned",
            &[
                ("REGION_PATH", path.clone()),
                ("OFFSET", offset.to_string()),
            ],
            Duration::from_secs(60),
        )
    };
    let out = touch(3 * g + 5);
    assert_eq!(
        killed_by(&out),
        Some(libc::SIGBUS),
        "a poisoned page: {out:?}"
    );

    std::fs::remove_file(&ballast_path).unwrap();
    let out = touch(3 * g + 5);
    assert_eq!(
        killed_by(&out),
        Some(libc::SIGBUS),
        "poison stays until retry"
    );
    assert_eq!(populator.retry(0, 8 * g).unwrap(), 8);
    let out = touch(3 * g + 5);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = pattern_byte(7, 3 * g + 5);
    assert!(
        stdout.contains(&format!("READ {want} WANT {want}")),
        "{out:?}"
    );
    populator.populate(0, 8 * g).unwrap();
    let mut bytes = vec![0u8; 8 * g];
    region.read_via_primary(0, &mut bytes).unwrap();
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(7, i))
    );

    // Where even the state table's page cannot be allocated: `populate`
    // says so, a touch gets SIGBUS, and nothing stays poisoned in the
    // shared table once space returns.
    let far = 3000 * g;
    let mut ballast = std::fs::File::create(&ballast_path).unwrap();
    for chunk in [1 << 20, 4096] {
        while ballast.write_all(&vec![1u8; chunk]).is_ok() {}
    }
    drop(ballast);
    let err = populator.populate(far, g).unwrap_err();
    assert!(err.to_string().contains("ENOSPC"), "{err}");
    let out = touch(far + 1);
    assert_eq!(killed_by(&out), Some(libc::SIGBUS), "{out:?}");
    std::fs::remove_file(&ballast_path).unwrap();
    let out = touch(far + 1);
    let want = pattern_byte(7, far + 1);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("READ {want} WANT {want}")),
        "{out:?}"
    );
}

/// With every descriptor in use, each entry point that needs one returns
/// an error naming the failed call (no panic, nothing left behind), what
/// needs none keeps working, and a child forked then cannot read zeroes:
/// its populator cannot be re-armed, so its view faults.
#[test]
fn at_the_descriptor_limit_entry_points_fail_cleanly() {
    let out = run_child_within(
        "at-emfile",
        &[("REGION_PATH", String::new())],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for what in ["create", "populator", "snapshot", "open snapshot"] {
        let line = stdout
            .lines()
            .find_map(|l| l.split_once(&format!("EP {what}: ")).map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no {what} line: {stdout}"));
        assert!(
            line.contains("EMFILE") || line.contains("Too many open files"),
            "{what}: {line}"
        );
    }
    for what in ["EP alloc: OK", "EP free: OK", "EP touch: OK", "FILES 1"] {
        assert!(stdout.contains(what), "{what}: {stdout}");
    }
    assert!(stdout.contains("SIGSEGV"), "the forked child: {stdout}");
}

/// A pointer of one arena given to another is an error, not that arena's
/// memory: every arena tags its pointers. The tag is the same in every
/// process that opens the arena and survives snapshot and restore, and it
/// survives a trip through shared memory as `to_bits`.
#[test]
fn a_pointer_of_another_arena_is_rejected() {
    let a = arena(8 << 20, BackendKind::Shmem);
    // Tags are random: two arenas share one with odds of 1 in 65535.
    let b = std::iter::repeat_with(|| arena(8 << 20, BackendKind::Shmem))
        .find(|b| b.tag() != a.tag())
        .unwrap();
    let l = Layout::from_size_align(64, 8).unwrap();
    let p = a.alloc(l).unwrap();
    let q = b.alloc(l).unwrap();
    assert_eq!(p.offset(), q.offset(), "same offset in both arenas");
    assert!(matches!(b.free(p), Err(Error::ForeignPointer { .. })));
    assert!(matches!(b.local(p), Err(Error::ForeignPointer { .. })));
    // b's object is untouched and still b's to free, once.
    b.free(q).unwrap();
    assert!(b.free(q).is_err());
    let stored = ShmPtr::from_bits(p.to_bits());
    let other = Arena::open(a.region().shareable_path(), PopulateOptions::new()).unwrap();
    assert_eq!(other.tag(), a.tag());
    assert!(other.local(stored).is_ok());
    let dir = tempfile::tempdir().unwrap();
    a.snapshot(dir.path().join("a.snap")).unwrap();
    let restored = Arena::restore(dir.path().join("a.snap"), PopulateOptions::new()).unwrap();
    assert_eq!(restored.tag(), a.tag());
    restored.free(stored).unwrap();
    // An untagged offset is checked against the tables only.
    assert!(a.free(ShmPtr::from_offset(p.offset())).is_ok());
}

/// A free from a thread that no longer owns the span (a flush gave it up)
/// sets its remote bit, then marks the span. A flush retiring empty spans
/// meanwhile could collect that bit and retire the span between the two;
/// the free then found its span gone and was refused, though it had
/// counted. Every free here is of a live object and must succeed, and
/// nothing stays allocated.
#[test]
fn freeing_while_a_flush_retires_spans_never_refuses_a_live_object() {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Stops the flusher however the test thread leaves.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let a = arena(64 << 20, BackendKind::Shmem);
    let stop = AtomicBool::new(false);
    let layout = Layout::from_size_align(8 << 10, 8).unwrap();
    std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            let mut flushes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                a.flush_thread_caches();
                flushes += 1;
            }
            flushes
        });
        let stopping = Stop(&stop);
        let started = std::time::Instant::now();
        let mut frees = 0u64;
        // 8 KiB objects: 8 to a span, so spans empty and retire often.
        while started.elapsed() < Duration::from_secs(3) {
            let batch: Vec<ShmPtr> = (0..24).map(|_| a.alloc(layout).unwrap()).collect();
            for p in batch {
                a.free(p)
                    .unwrap_or_else(|e| panic!("free {frees} of a live object: {e}"));
                frees += 1;
            }
        }
        drop(stopping);
        let flushes = flusher.join().unwrap();
        assert!(flushes > 100, "only {flushes} flushes ran alongside");
    });
    let stats = a.audit().unwrap();
    assert_eq!(stats.small_objects, 0, "{stats:?}");
}
