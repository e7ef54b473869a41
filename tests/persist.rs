//! Snapshots and lazy restore on the real kernel: round trips on every
//! backend into a fresh process, an arena that keeps allocating after
//! restore, crashes in the middle of a snapshot, corrupt and truncated
//! files, and a background drain.

mod common;

use std::alloc::Layout;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hugearena::persist::{self, SnapshotSource};
use hugearena::populate::{Driver, PopulateOptions, Populator};
use hugearena::{Arena, BackendKind, Error, PageSize, Region, RegionOptions, ShmPtr};

/// Pattern `seed` for every granule whose index is not 3 mod 4 (those are
/// never populated, so the snapshot has holes there).
fn expected(seed: u64, granule: usize) -> impl Fn(usize) -> u8 {
    move |i| {
        if (i / granule) % 4 == 3 {
            0
        } else {
            pattern_byte(seed, i)
        }
    }
}

fn pattern_source(
    seed: u64,
) -> SafeFnSource<impl Fn(u64, &mut [u8]) -> Result<(), hugearena::populate::FillError> + Send + Sync>
{
    safe_fn(move |index: u64, dst: &mut [u8]| {
        fill_pattern(seed, index as usize * dst.len(), dst);
        Ok(())
    })
}

/// A new region of `kind` with `len` bytes and a populator (driven by
/// `populate` calls only) that fills it with pattern `seed`.
fn pattern_populator(kind: BackendKind, len: usize, seed: u64) -> Populator {
    let region = Arc::new(Region::create(RegionOptions::new(len as u64).backend(kind)).unwrap());
    Populator::with_options(
        region,
        pattern_source(seed),
        PopulateOptions::new().driver(Driver::Proactive),
    )
    .unwrap()
}

fn snapshot_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    match role.as_str() {
        "restore-verify" => {
            let started = Instant::now();
            let p = persist::restore(env("SNAPSHOT"), PopulateOptions::new()).unwrap();
            let restored_in = started.elapsed();
            let region = p.region().clone();
            let granule = region.granule().bytes();
            let mut first = [0u8; 1];
            region.read_via_primary(granule, &mut first).unwrap();
            let first_access = started.elapsed();
            assert_eq!(p.stats().fills, 1, "one page read for the first access");
            verify(&region, expected(5, granule));
            assert!(p.errors().is_empty(), "{:?}", p.errors());
            println!(
                "CHILD-RESTORED in {restored_in:?}, first access after {first_access:?}; {}",
                p.stats()
            );
        }
        "arena-after-restore" => {
            let a = Arena::restore(env("SNAPSHOT"), PopulateOptions::new()).unwrap();
            let list = std::fs::read_to_string(env("LIST")).unwrap();
            let old: Vec<(u64, usize, u8)> = list
                .lines()
                .map(|l| {
                    let mut f = l.split(' ').map(|x| x.parse::<u64>().unwrap());
                    (
                        f.next().unwrap(),
                        f.next().unwrap() as usize,
                        f.next().unwrap() as u8,
                    )
                })
                .collect();
            for &(off, size, tag) in &old {
                let mut buf = vec![0u8; size];
                a.region().read_via_primary(off as usize, &mut buf).unwrap();
                assert!(
                    buf.iter().all(|&b| b == tag),
                    "restored allocation {off:#x} differs"
                );
            }
            let stats = a.audit().unwrap();
            assert_eq!(
                stats.small_objects + stats.runs + stats.large_allocs,
                old.len() as u64
            );
            // Allocate more: nothing may land on restored allocations.
            let mut taken: Vec<(u64, u64)> = old.iter().map(|&(o, s, _)| (o, s as u64)).collect();
            for i in 0..300usize {
                let size = [40, 3000, 20_000, 300_000][i % 4];
                let p = a.alloc(Layout::from_size_align(size, 8).unwrap()).unwrap();
                let (s, e) = (p.offset(), p.offset() + size as u64);
                assert!(
                    taken.iter().all(|&(o, l)| e <= o || o + l <= s),
                    "{p:?} overlaps"
                );
                taken.push((s, size as u64));
            }
            for &(off, _, _) in &old {
                a.free(ShmPtr::from_offset(off)).unwrap();
            }
            a.audit().unwrap();
            println!("CHILD-ARENA-OK");
        }
        "snapshot-loop" => {
            let region = Region::open(env("REGION_PATH")).unwrap();
            println!("CHILD-SNAPSHOTTING");
            loop {
                persist::snapshot(&region, env("SNAPSHOT")).unwrap();
            }
        }
        "verify-chain" => {
            let p = persist::restore(env("SNAPSHOT"), PopulateOptions::new()).unwrap();
            let changed: Vec<usize> = env("CHANGED")
                .split(',')
                .map(|x| x.parse().unwrap())
                .collect();
            let region = p.region().clone();
            verify(&region, |i| {
                let page = i / 4096;
                match changed.iter().rposition(|&c| c == page) {
                    // Later entries won: the seed is the change's position.
                    Some(k) => pattern_byte(100 + k as u64, i),
                    None => pattern_byte(1, i),
                }
            });
            assert!(p.errors().is_empty(), "{:?}", p.errors());
            println!("CHILD-CHAIN-OK");
        }
        "touch-corrupt" => {
            let p = persist::restore(env("SNAPSHOT"), PopulateOptions::new()).unwrap();
            let mut b = [0u8; 1];
            p.region().read_via_primary(6 * 4096, &mut b).unwrap();
            println!("CHILD-READ-PAGE-6");
            let _ = p.region().read_via_primary(7 * 4096, &mut b);
            println!("CHILD-SURVIVED");
        }
        other => panic!("unknown role {other}"),
    }
}

/// A region of `kind` with pattern 5 in three granules of every four,
/// snapshotted into `dir`.
fn patterned_snapshot(
    kind: BackendKind,
    len: usize,
    dir: &tempfile::TempDir,
) -> (std::path::PathBuf, persist::SnapshotInfo) {
    let p = pattern_populator(kind, len, 5);
    let g = p.region().granule().bytes();
    for i in (0..len / g).filter(|i| i % 4 != 3) {
        p.populate(i * g, g).unwrap();
    }
    let path = dir.path().join("snap");
    let info = persist::snapshot(p.region(), &path).unwrap();
    (path, info)
}

fn round_trip(kind: BackendKind) {
    if kind == BackendKind::HugetlbHgm && !hgm_available() {
        return;
    }
    if kind.uses_hugetlb() && !ensure_huge_pages(PageSize::Huge2M, 80) {
        return;
    }
    let dir = snapshot_dir();
    let (path, info) = patterned_snapshot(kind, 64 << 20, &dir);
    assert_eq!(info.present, info.granules - info.granules / 4, "{info:?}");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), info.file_len);
    assert!(
        meta.blocks() * 512 < info.file_len - (info.file_len / 5),
        "the holes take no space: {} of {} bytes allocated",
        meta.blocks() * 512,
        info.file_len
    );
    let out = run_child(
        "restore-verify",
        &[("SNAPSHOT", path.display().to_string())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CHILD-RESTORED"), "{stdout}");
    eprintln!(
        "{kind}: {}",
        stdout
            .lines()
            .find(|l| l.contains("CHILD-RESTORED"))
            .unwrap_or("")
    );
}

#[test]
fn shmem_round_trip() {
    round_trip(BackendKind::Shmem);
}

#[test]
fn shmem_thp_round_trip() {
    round_trip(BackendKind::ShmemThp);
}

#[test]
fn hugetlb_round_trip() {
    round_trip(BackendKind::Hugetlb);
}

#[test]
fn hgm_round_trip() {
    round_trip(BackendKind::HugetlbHgm);
}

#[test]
fn an_arena_keeps_allocating_after_restore() {
    arena_after_restore(BackendKind::Shmem);
}

#[test]
fn an_hgm_arena_keeps_allocating_after_restore() {
    if hgm_available() && ensure_huge_pages(PageSize::Huge2M, 80) {
        arena_after_restore(BackendKind::HugetlbHgm);
    }
}

fn arena_after_restore(kind: BackendKind) {
    let dir = snapshot_dir();
    let a = Arena::create(
        RegionOptions::new(64 << 20).backend(kind),
        PopulateOptions::new(),
    )
    .unwrap();
    let mut list = String::new();
    for i in 0..300usize {
        let size = [24, 5000, 70_000, 2 << 20][i % 4];
        let p = a.alloc(Layout::from_size_align(size, 8).unwrap()).unwrap();
        let tag = (i % 251) as u8 + 1;
        a.region()
            .write_via_primary(p.offset() as usize, &vec![tag; size])
            .unwrap();
        list.push_str(&format!("{} {} {}\n", p.offset(), size, tag));
        if i % 4 == 3 && i > 20 {
            break;
        }
    }
    let path = dir.path().join("arena.snap");
    a.snapshot(&path).unwrap();
    let list_path = dir.path().join("list");
    std::fs::write(&list_path, list).unwrap();
    let out = run_child(
        "arena-after-restore",
        &[
            ("SNAPSHOT", path.display().to_string()),
            ("LIST", list_path.display().to_string()),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD-ARENA-OK"));
}

#[test]
fn a_crash_during_snapshot_leaves_the_previous_one_intact() {
    use std::process::{Command, Stdio};
    let dir = snapshot_dir();
    let len = 64 << 20;
    let p = pattern_populator(BackendKind::Shmem, len, 1);
    let region = p.region().clone();
    p.populate(0, len).unwrap();
    let path = dir.path().join("crash.snap");
    persist::snapshot(&region, &path).unwrap();
    // New contents: a completed new snapshot holds pattern 2 everywhere.
    let mut chunk = vec![0u8; 1 << 20];
    for off in (0..len).step_by(chunk.len()) {
        fill_pattern(2, off, &mut chunk);
        region.write_via_primary(off, &chunk).unwrap();
    }
    for delay_ms in [1, 4, 15, 40, 100, 250] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_ROLE, "snapshot-loop")
            .env("REGION_PATH", region.shareable_path())
            .env("SNAPSHOT", &path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever is at `path` is one whole snapshot, old or new.
        let restored =
            persist::restore(&path, PopulateOptions::new().driver(Driver::Proactive)).unwrap();
        restored.populate(0, len).unwrap();
        assert!(
            restored.errors().is_empty(),
            "after a kill at {delay_ms} ms: {:?}",
            restored.errors()
        );
        let mut first = [0u8; 1];
        restored.region().read_via_primary(0, &mut first).unwrap();
        let seed = if first[0] == pattern_byte(1, 0) { 1 } else { 2 };
        verify(restored.region(), |i| pattern_byte(seed, i));
        eprintln!("killed after {delay_ms} ms: the snapshot holds pattern {seed}");
    }
}

#[test]
fn corrupt_truncated_and_foreign_snapshots_are_refused_or_poisoned() {
    use std::os::unix::process::ExitStatusExt;
    let dir = snapshot_dir();
    let p = pattern_populator(BackendKind::Shmem, 8 << 20, 3);
    let region = p.region().clone();
    p.populate(0, 8 << 20).unwrap();
    let path = dir.path().join("good.snap");
    persist::snapshot(&region, &path).unwrap();
    let header = SnapshotSource::open(&path).unwrap().header().clone();

    // A flipped byte in page 7: that page is poisoned and reported.
    let bad = dir.path().join("flipped.snap");
    std::fs::copy(&path, &bad).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bad)
        .unwrap();
    let at = header.data_offset + 7 * 4096 + 100;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    let restored =
        persist::restore(&bad, PopulateOptions::new().driver(Driver::Proactive)).unwrap();
    restored.populate(0, 8 << 20).unwrap();
    let errors = restored.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].index, 7);
    assert!(
        errors[0].to_string().contains("checksum mismatch"),
        "{}",
        errors[0]
    );
    for page in (0..2048usize).filter(|&i| i != 7) {
        let mut buf = vec![0u8; 4096];
        restored
            .region()
            .read_via_primary(page * 4096, &mut buf)
            .unwrap();
        assert!(
            (0..4096).all(|i| buf[i] == pattern_byte(3, page * 4096 + i)),
            "page {page}"
        );
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, "touch-corrupt")
        .env("SNAPSHOT", &bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CHILD-READ-PAGE-6") && !stdout.contains("CHILD-SURVIVED"),
        "{stdout}"
    );
    assert_eq!(out.status.signal(), Some(libc::SIGBUS));

    // Damage found before anything is mapped.
    type Damage<'a> = Box<dyn Fn(&std::fs::File) + 'a>;
    let cases: [(&str, Damage, &str); 4] = [
        (
            "truncated",
            Box::new(|f| f.set_len(header.file_len() - 4096).unwrap()),
            "truncated or extended",
        ),
        ("short", Box::new(|f| f.set_len(100).unwrap()), "truncated"),
        (
            "version",
            Box::new(|f| f.write_all_at(&9u32.to_le_bytes(), 8).unwrap()),
            "version 9",
        ),
        (
            "chunk table",
            Box::new(|f| {
                let table = header.map_offset + header.granules * 8;
                f.write_all_at(&[0xFF], table + 2).unwrap()
            }),
            "page map checksum",
        ),
    ];
    for (name, damage, message) in cases {
        let copy = dir.path().join(format!("{name}.snap"));
        std::fs::copy(&path, &copy).unwrap();
        damage(&std::fs::OpenOptions::new().write(true).open(&copy).unwrap());
        let err = persist::restore(&copy, PopulateOptions::new()).unwrap_err();
        assert!(matches!(err, Error::BadSnapshot { .. }), "{name}: {err}");
        assert!(err.to_string().contains(message), "{name}: {err}");
    }
    let mut not_a_snapshot = tempfile::NamedTempFile::new().unwrap();
    not_a_snapshot.write_all(&[7u8; 8192]).unwrap();
    let err = persist::restore(not_a_snapshot.path(), PopulateOptions::new()).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn a_background_drain_fills_everything_and_reports_progress() {
    let dir = snapshot_dir();
    let (path, info) = patterned_snapshot(BackendKind::ShmemThp, 64 << 20, &dir);
    let p = persist::restore(&path, PopulateOptions::new()).unwrap();
    let drain = p.start_drain(2 << 20).unwrap();
    let mut seen = Vec::new();
    while !drain.is_finished() {
        seen.push(drain.progress().0);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(drain.progress(), (info.granules, info.granules));
    drain.wait().unwrap();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress only grows");
    let stats = p.stats();
    assert_eq!(stats.fills, info.granules, "{stats}");
    verify(p.region(), expected(5, 4096));
}

#[test]
fn write_tracking_reports_exactly_the_written_pages() {
    for driver in [Driver::InThread, Driver::HandlerThreads(1)] {
        let region = Arc::new(
            Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap(),
        );
        let options = PopulateOptions::new().driver(driver).track_writes(true);
        let p = Populator::with_options(region.clone(), pattern_source(1), options).unwrap();
        p.populate(0, 4 << 20).unwrap();
        if !p.tracks_writes() {
            // Before Linux 6.7: the populator runs, untracked, and says why.
            let why = p.tracking_unavailable().unwrap();
            assert!(why.contains("WP_ASYNC"), "{why}");
            assert!(p.take_changed().is_err());
            continue;
        }
        let mut b = [0u8; 64];
        region.read_via_primary(6 << 20, &mut b).unwrap();
        assert_eq!(
            p.take_changed().unwrap(),
            Vec::<usize>::new(),
            "{driver}: reads and fills are not writes"
        );
        for page in [3usize, 700, 1500] {
            region
                .write_via_primary(page * 4096 + 10, b"changed")
                .unwrap();
        }
        assert_eq!(p.take_changed().unwrap(), vec![3, 700, 1500], "{driver}");
        assert_eq!(
            p.take_changed().unwrap(),
            Vec::<usize>::new(),
            "{driver}: re-protected"
        );
        region.write_via_primary(700 * 4096, b"again").unwrap();
        assert_eq!(p.take_changed().unwrap(), vec![700], "{driver}");
    }
}

#[test]
fn incremental_snapshots_write_only_what_changed_and_restore_as_a_chain() {
    let dir = snapshot_dir();
    let len = 8usize << 20;
    let region = Arc::new(
        Region::create(RegionOptions::new(len as u64).backend(BackendKind::Shmem)).unwrap(),
    );
    let options = PopulateOptions::new().track_writes(true);
    let p = Populator::with_options(region.clone(), pattern_source(1), options).unwrap();
    p.populate(0, len).unwrap();
    let mut snap = persist::Snapshotter::new();
    let base = snap.full(&p, dir.path().join("s0")).unwrap();
    assert_eq!(base.present, 2048);
    // Change 1 % of the pages (20), each with its own pattern.
    let mut changed = Vec::new();
    let mut page_buf = vec![0u8; 4096];
    let mut change = |page: usize, changed: &mut Vec<usize>| {
        fill_pattern(100 + changed.len() as u64, page * 4096, &mut page_buf);
        region.write_via_primary(page * 4096, &page_buf).unwrap();
        changed.push(page);
    };
    for k in 0..20 {
        change(k * 97 + 5, &mut changed);
    }
    let inc = snap.incremental(&p, dir.path().join("s1")).unwrap();
    if !p.tracks_writes() {
        // Before Linux 6.7: nothing says what changed, so the increment is
        // a full snapshot, which says why, and restores as one.
        let why = inc.full_because.as_deref().unwrap();
        assert!(why.contains("WP_ASYNC"), "{why}");
        assert_eq!((inc.present, inc.inherited), (2048, 0), "{inc:?}");
        let list = changed.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        let out = run_child(
            "verify-chain",
            &[
                ("SNAPSHOT", dir.path().join("s1").display().to_string()),
                ("CHANGED", list.join(",")),
            ],
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD-CHAIN-OK"));
        return;
    }
    assert_eq!(inc.full_because, None);
    assert_eq!((inc.present, inc.inherited), (20, 2028), "{inc:?}");
    assert_eq!(inc.data_bytes, 20 * 4096);
    let allocated = std::fs::metadata(dir.path().join("s1")).unwrap().blocks() * 512;
    assert!(allocated < 200 << 10, "s1 takes {allocated} bytes on disk");
    // A second increment, overwriting one page changed in the first.
    for page in [5usize, 2000, 1234] {
        change(page, &mut changed);
    }
    let inc2 = snap.incremental(&p, dir.path().join("s2")).unwrap();
    assert_eq!(inc2.present, 3, "{inc2:?}");
    let source = SnapshotSource::open(dir.path().join("s2")).unwrap();
    assert_eq!(source.depth(), 2);
    let list = changed
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = run_child(
        "verify-chain",
        &[
            ("SNAPSHOT", dir.path().join("s2").display().to_string()),
            ("CHANGED", list),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD-CHAIN-OK"));
    // A parent replaced under the chain is noticed before anything is mapped.
    persist::snapshot(&region, dir.path().join("s0")).unwrap();
    let err = SnapshotSource::open(dir.path().join("s2")).unwrap_err();
    assert!(err.to_string().contains("was replaced"), "{err}");
}

#[test]
fn a_snapshot_of_a_lazily_restored_region_keeps_the_untouched_pages() {
    let dir = snapshot_dir();
    let (path, info) = patterned_snapshot(BackendKind::Shmem, 8 << 20, &dir);
    let restored = persist::restore(&path, PopulateOptions::new()).unwrap();
    // Touch and change one page; leave the rest untouched.
    restored
        .region()
        .write_via_primary(4096 * 10, b"new bytes")
        .unwrap();
    let again = dir.path().join("again");
    let info2 = persist::snapshot_populator(&restored, &again).unwrap();
    assert_eq!(info2.present, info.present, "{info2:?}");
    let back = persist::restore(&again, PopulateOptions::new().driver(Driver::Proactive)).unwrap();
    back.populate(0, 8 << 20).unwrap();
    let e = expected(5, 4096);
    verify(back.region(), |i| {
        if (40960..40960 + 9).contains(&i) {
            b"new bytes"[i - 40960]
        } else {
            e(i)
        }
    });
}

/// An 8 MiB shmem region, every page holding pattern `seed`, snapshotted
/// to `dir/name`: the path and the snapshot's header.
fn full_patterned_snapshot(
    dir: &tempfile::TempDir,
    name: &str,
    seed: u64,
) -> (std::path::PathBuf, hugearena::persist::SnapshotHeader) {
    let p = pattern_populator(BackendKind::Shmem, 8 << 20, seed);
    p.populate(0, 8 << 20).unwrap();
    let path = dir.path().join(name);
    persist::snapshot(p.region(), &path).unwrap();
    let header = SnapshotSource::open(&path).unwrap().header().clone();
    (path, header)
}

/// Every 4 KiB page of `region` but the `skipped` ones holds pattern `seed`.
fn verify_pages_but(region: &Region, seed: u64, skipped: impl Fn(usize) -> bool) {
    let mut buf = vec![0u8; 4096];
    for page in (0..region.len() / 4096).filter(|&i| !skipped(i)) {
        region.read_via_primary(page * 4096, &mut buf).unwrap();
        assert!(
            (0..4096).all(|i| buf[i] == pattern_byte(seed, page * 4096 + i)),
            "page {page}"
        );
    }
}

/// A drain reads the snapshot in large runs, yet a damaged page poisons
/// only itself: the rest of its run is filled and every other byte reads
/// right.
#[test]
fn a_drain_of_a_damaged_snapshot_poisons_exactly_the_damaged_pages() {
    let dir = snapshot_dir();
    let (path, header) = full_patterned_snapshot(&dir, "drain.snap", 5);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for page in [100u64, 1700] {
        f.write_all_at(&[0xFF, 0x00, 0xFF], header.data_offset + page * 4096 + 9)
            .unwrap();
    }
    let restored =
        persist::restore(&path, PopulateOptions::new().driver(Driver::Proactive)).unwrap();
    restored.start_drain(8 << 20).unwrap().wait().unwrap();
    let mut damaged: Vec<u64> = restored.errors().iter().map(|e| e.index).collect();
    damaged.sort_unstable();
    assert_eq!(damaged, [100, 1700]);
    assert_eq!(restored.stats().fills, 2046);
    assert_eq!(restored.present_granules(), 2046);
    verify_pages_but(restored.region(), 5, |i| i == 100 || i == 1700);
}

/// A drain leaves out the aligned 2 MiB runs a snapshot never wrote (its
/// holes need no read, and allocating them spends memory nobody may
/// touch); their first touch reads zeroes. A run with any stored page is
/// filled whole, holes included.
#[test]
fn a_drain_leaves_runs_of_holes_to_their_first_touch() {
    const LEN: usize = 16 << 20;
    let dir = snapshot_dir();
    let p = pattern_populator(BackendKind::Shmem, LEN, 7);
    // Half of run 1 (pages 512..768) and page 2305 of run 4 (2048..2560).
    p.populate(2 << 20, 1 << 20).unwrap();
    p.populate((9 << 20) + 4096, 4096).unwrap();
    let path = dir.path().join("holes.snap");
    persist::snapshot(p.region(), &path).unwrap();
    drop(p);
    let restored =
        persist::restore(&path, PopulateOptions::new().driver(Driver::Proactive)).unwrap();
    let drain = restored.start_drain(8 << 20).unwrap();
    while !drain.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let pages = (LEN / 4096) as u64;
    assert_eq!(drain.progress(), (pages, pages));
    drain.wait().unwrap();
    assert_eq!(restored.stats().fills, 1024, "{}", restored.stats());
    assert_eq!(restored.present_granules(), 1024);
    let stored = |page: usize| (512..768).contains(&page) || page == 2305;
    let mut buf = vec![0u8; 4096];
    for page in 0..LEN / 4096 {
        restored
            .region()
            .read_via_primary(page * 4096, &mut buf)
            .unwrap();
        let want = |i: usize| {
            if stored(page) {
                pattern_byte(7, page * 4096 + i)
            } else {
                0
            }
        };
        assert!((0..4096).all(|i| buf[i] == want(i)), "page {page}");
    }
    assert!(restored.errors().is_empty(), "{:?}", restored.errors());
}

/// The page map is checked chunk by chunk as restore needs it: a damaged
/// chunk (512 entries: 2 MiB of 4 KiB pages) is found on first use, every
/// page it describes is poisoned and reported, and the rest of the
/// snapshot reads right. Opening reads only the chunk table.
#[test]
fn a_damaged_page_map_chunk_poisons_exactly_its_pages() {
    let dir = snapshot_dir();
    let (path, header) = full_patterned_snapshot(&dir, "chunk.snap", 6);
    assert_eq!(header.version, 2);
    // Entry 700 lies in chunk 1 (granules 512..1024).
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xAB], header.map_offset + 700 * 8 + 5)
        .unwrap();
    let restored =
        persist::restore(&path, PopulateOptions::new().driver(Driver::Proactive)).unwrap();
    restored.populate(0, 8 << 20).unwrap();
    let errors = restored.errors();
    assert!(!errors.is_empty());
    assert!(
        errors
            .iter()
            .all(|e| (512..1024).contains(&e.index) && e.to_string().contains("map chunk")),
        "{errors:?}"
    );
    assert_eq!(restored.stats().poisoned, 512);
    verify_pages_but(restored.region(), 6, |i| (512..1024).contains(&i));
}
