//! The kill -9 campaign: child processes fill, discard, allocate, release
//! and snapshot on shared regions while the test kills them at random
//! moments, two at a time, at least 100 times. After every round the
//! survivors' view is checked: every page reads its source's bytes, every
//! object this process holds keeps its stamp, the last snapshot opens
//! whole; at the end the whole region is read, the arena audited, and
//! what was tried is printed.

mod common;

use std::alloc::Layout;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hugearena::persist::SnapshotSource;
use hugearena::populate::{Driver, FillError, PopulateOptions, Populator};
use hugearena::{Arena, BackendKind, Region, RegionOptions, ShmPtr};

/// Kills the campaign must reach.
const KILLS: usize = 120;
/// The campaign stops starting rounds after this long, kills or not.
const BUDGET: Duration = Duration::from_secs(75);
/// Seed of the filled region's pattern.
const SEED: u64 = 0x5EED;
/// Exit code of a child that saw a wrong byte or a broken stamp.
const CORRUPT: i32 = 3;

const ROLES: [&str; 4] = ["filler", "allocator", "releaser", "snapshotter"];

fn pattern_source() -> SafeFnSource<impl Fn(u64, &mut [u8]) -> Result<(), FillError> + Send + Sync>
{
    safe_fn(|index: u64, dst: &mut [u8]| {
        fill_pattern(SEED, index as usize * dst.len(), dst);
        Ok(())
    })
}

/// xorshift64.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The stamp an object at `offset` carries in its first word.
fn stamp(offset: u64, owner: u32) -> u64 {
    offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(owner)
}

fn exit_corrupt(why: String) -> ! {
    eprintln!("CORRUPT {why}");
    std::process::exit(CORRUPT);
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let mut rng = u64::from(std::process::id()) | 1;
    match role.as_str() {
        // Touches random granules and checks their bytes; every 32 touches
        // discards a random range, so fills and discards keep happening.
        "filler" => {
            let region = Arc::new(Region::open(std::env::var("FILLED").unwrap()).unwrap());
            let driver = if rng % 2 == 0 {
                Driver::InThread
            } else {
                Driver::HandlerThreads(1)
            };
            let options = PopulateOptions::new().driver(driver);
            let p = Populator::with_options(region.clone(), pattern_source(), options).unwrap();
            let (g, len) = (region.granule().bytes(), region.len());
            let mut buf = [0u8; 64];
            for n in 0u64.. {
                let off = (next(&mut rng) as usize % (len / g)) * g + (n as usize % 64) * 64;
                region.read_via_primary(off, &mut buf).unwrap();
                if let Some(i) = (0..buf.len()).find(|&i| buf[i] != pattern_byte(SEED, off + i)) {
                    exit_corrupt(format!("byte {} is {:#x}", off + i, buf[i]));
                }
                if n % 32 == 31 {
                    let first = next(&mut rng) as usize % (len / g);
                    let count = (1 + next(&mut rng) as usize % 64).min(len / g - first);
                    p.discard(first * g, count * g).unwrap();
                }
            }
        }
        // Allocates objects of every size range, stamps them, checks and
        // frees them in random order.
        "allocator" => {
            let a = Arena::open(std::env::var("ARENA").unwrap(), PopulateOptions::new()).unwrap();
            let me = std::process::id();
            let mut live: Vec<(ShmPtr, usize)> = Vec::new();
            loop {
                if live.len() < 64 && next(&mut rng) % 3 != 0 {
                    let size = match next(&mut rng) % 16 {
                        0 => 64 << 10,
                        1..=3 => 8 << 10,
                        _ => 16 + (next(&mut rng) % 2000) as usize,
                    };
                    let Ok(p) = a.alloc(Layout::from_size_align(size, 8).unwrap()) else {
                        continue;
                    };
                    let at = a.local(p).unwrap().as_ptr().cast::<u64>();
                    // SAFETY: a fresh allocation of at least 16 bytes.
                    unsafe { at.write(stamp(p.offset(), me)) };
                    live.push((p, size));
                } else if !live.is_empty() {
                    let i = next(&mut rng) as usize % live.len();
                    let (p, _) = live.swap_remove(i);
                    let at = a.local(p).unwrap().as_ptr().cast::<u64>();
                    // SAFETY: our live allocation.
                    let word = unsafe { at.read() };
                    if word != stamp(p.offset(), me) {
                        exit_corrupt(format!("object {p:?} holds {word:#x}"));
                    }
                    a.free(p).unwrap();
                }
            }
        }
        // Allocates whole blocks, touches every page, frees them and gives
        // free blocks back to the kernel.
        "releaser" => {
            let a = Arena::open(std::env::var("ARENA").unwrap(), PopulateOptions::new()).unwrap();
            loop {
                if let Ok(p) = a.alloc_bytes(2 << 20) {
                    let base = a.local(p).unwrap().as_ptr();
                    for page in 0..512 {
                        // SAFETY: inside the live 2 MiB allocation.
                        unsafe { base.add(page * 4096).write_volatile(page as u8) };
                    }
                    a.free(p).unwrap();
                }
                a.release_free_blocks();
            }
        }
        // Snapshots the arena to the same path, over and over.
        "snapshotter" => {
            let a = Arena::open(std::env::var("ARENA").unwrap(), PopulateOptions::new()).unwrap();
            let to = std::env::var("SNAPSHOT").unwrap();
            loop {
                a.snapshot(&to).unwrap();
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn(role: &str, env: &[(&str, &str)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What the campaign did, per role.
#[derive(Default, Debug)]
struct Tally {
    /// Killed while running.
    killed: [usize; 4],
    /// Ended on their own before the kill (an error: they loop forever).
    ended: [usize; 4],
}

#[test]
fn kill_9_campaign_over_fillers_allocators_releasers_and_snapshotters() {
    let filled =
        Arc::new(Region::create(RegionOptions::new(32 << 20).backend(BackendKind::Shmem)).unwrap());
    let check = Populator::with_options(
        filled.clone(),
        pattern_source(),
        PopulateOptions::new().driver(Driver::InThread),
    )
    .unwrap();
    let arena = Arena::create(
        RegionOptions::new(256 << 20).backend(BackendKind::Shmem),
        PopulateOptions::new(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("campaign.snap");
    let (filled_path, arena_path, snap_path) = (
        filled.shareable_path().display().to_string(),
        arena.region().shareable_path().display().to_string(),
        snap.display().to_string(),
    );
    let env = [
        ("FILLED", filled_path.as_str()),
        ("ARENA", arena_path.as_str()),
        ("SNAPSHOT", snap_path.as_str()),
    ];

    // Objects this process holds throughout, stamped: a child handed one
    // of them would overwrite a stamp.
    let me = std::process::id();
    let mine: Vec<ShmPtr> = (0..300)
        .map(|i| {
            let p = arena.alloc_bytes(16 + (i % 7) * 300).unwrap();
            // SAFETY: a fresh allocation of at least 16 bytes.
            unsafe {
                arena
                    .local(p)
                    .unwrap()
                    .as_ptr()
                    .cast::<u64>()
                    .write(stamp(p.offset(), me))
            };
            p
        })
        .collect();
    let stamps_hold = || {
        for p in &mine {
            // SAFETY: our live allocation.
            let word = unsafe { arena.local(*p).unwrap().as_ptr().cast::<u64>().read() };
            assert_eq!(
                word,
                stamp(p.offset(), me),
                "{p:?} was handed to another process"
            );
        }
    };

    let (g, len) = (filled.granule().bytes(), filled.len());
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut tally = Tally::default();
    let (mut snapshots_checked, mut rounds) = (0usize, 0usize);
    let started = Instant::now();
    while tally.killed.iter().sum::<usize>() < KILLS && started.elapsed() < BUDGET {
        let pair = [rounds % 4, (rounds + 1 + rounds / 4 % 3) % 4];
        let mut children: Vec<(usize, Child, u64)> = pair
            .iter()
            .map(|&r| (r, spawn(ROLES[r], &env), 20 + next(&mut rng) % 150))
            .collect();
        let round_start = Instant::now();
        while !children.is_empty() {
            let elapsed = round_start.elapsed().as_millis() as u64;
            children.retain_mut(|(role, child, at)| {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                    assert_ne!(status.code(), Some(CORRUPT), "{}: {err}", ROLES[*role]);
                    tally.ended[*role] += 1;
                    panic!("{} ended on its own: {status:?}\n{err}", ROLES[*role]);
                }
                if elapsed < *at {
                    return true;
                }
                child.kill().unwrap();
                let status = child.wait().unwrap();
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                assert!(
                    killed_by_signal(&status) == Some(libc::SIGKILL),
                    "{} ended with {status:?} before its kill\n{err}",
                    ROLES[*role]
                );
                tally.killed[*role] += 1;
                false
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        rounds += 1;

        // The survivors' view: random pages of the filled region, the
        // stamps, the last snapshot.
        for _ in 0..16 {
            let off = (next(&mut rng) as usize % (len / g)) * g;
            let mut b = [0u8; 8];
            filled.read_via_primary(off, &mut b).unwrap();
            let want: Vec<u8> = (0..8).map(|i| pattern_byte(SEED, off + i)).collect();
            assert_eq!(b.as_slice(), want.as_slice(), "filled region at {off}");
        }
        stamps_hold();
        if snap.exists() {
            SnapshotSource::open(&snap).unwrap_or_else(|e| panic!("snapshot after a kill: {e}"));
            snapshots_checked += 1;
        }
    }
    let killed: usize = tally.killed.iter().sum();

    // Everything, once more: every byte of the filled region, the stamps,
    // the arena's tables, and that it still allocates.
    verify(&filled, |off| pattern_byte(SEED, off));
    stamps_hold();
    let stats = arena
        .audit()
        .unwrap_or_else(|e| panic!("audit after {killed} kills: {e}"));
    for _ in 0..1000 {
        let p = arena
            .alloc_bytes(100)
            .unwrap_or_else(|e| panic!("after {killed} kills: {e}; {stats:#?}"));
        assert!(!mine.contains(&p));
    }
    let temporaries = std::fs::read_dir(dir.path()).unwrap().count() - usize::from(snap.exists());
    // The next snapshot removes what killed snapshotters left.
    arena.snapshot(&snap).unwrap();
    let left = std::fs::read_dir(dir.path()).unwrap().count() - 1;
    assert_eq!(left, 0, "temporaries of dead snapshotters left behind");
    let fills = check.stats();
    println!(
        "kill -9 campaign: {killed} kills in {rounds} rounds, {:.1} s \
         (filler {}, allocator {}, releaser {}, snapshotter {}); \
         this process: {} fills, {} dead claims taken over; \
         {snapshots_checked} snapshots opened whole after a kill, \
         {temporaries} temporaries left by killed snapshotters (removed by the next snapshot); \
         arena after the kills: {} small objects ({} of them free in dead processes' thread caches), {} page runs in use, {} pages leaked by killed allocations",
        started.elapsed().as_secs_f64(),
        tally.killed[0],
        tally.killed[1],
        tally.killed[2],
        tally.killed[3],
        fills.fills,
        fills.takeovers,
        stats.small_objects,
        stats.cached_objects,
        stats.runs,
        stats.leaked_pages,
    );
    assert!(killed >= KILLS, "only {killed} kills within {BUDGET:?}");
    assert!(tally.killed.iter().all(|&k| k > 0), "{tally:?}");
}

fn killed_by_signal(status: &std::process::ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(status)
}
