//! A buffer pool on hugearena, on the real kernel: pages written back to a
//! database file and discarded come back with the written bytes, in any
//! process; the example's buffer manager shared by several processes never
//! serves torn or stale data while they fill, write and evict the same
//! pages; and a process killed with SIGKILL while it holds page locks is
//! taken over by the others.

mod common;

use common::huge_tmpfs_mount as huge_tmpfs;

#[allow(dead_code)]
#[path = "../examples/bufferpool/frames.rs"]
mod frames;
#[allow(dead_code)]
#[path = "../examples/support/human.rs"]
mod human;
#[allow(dead_code)]
#[path = "../examples/bufferpool/liveness.rs"]
mod liveness;
#[allow(dead_code)]
#[path = "../examples/bufferpool/pool.rs"]
mod pool;
#[allow(dead_code)]
#[path = "../examples/bufferpool/workload.rs"]
mod workload;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{CHILD_ROLE, RemoveOnDrop, fill_pattern, pattern_byte, run_child};
use hugearena::populate::{
    FileStore, FillError, PageState, PopulateOptions, Populator, ZeroSource,
};
use hugearena::{BackendKind, Error, PageSize, Region, RegionOptions};

use frames::HugearenaFrames;
use pool::{BufferPool, PAGE};
use workload::{KeyDist, Mix};

const KIB4: usize = 4096;

/// A data file of `len` bytes holding pattern `seed`.
fn data_file(dir: &Path, len: usize, seed: u64) -> PathBuf {
    let path = dir.join(format!("data-{seed}.db"));
    let mut bytes = vec![0u8; len];
    fill_pattern(seed, 0, &mut bytes);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A region of `kind` at a fresh path suited to it, as large as the file.
fn region_for(kind: BackendKind, data: &Path) -> Option<(Arc<Region>, RemoveOnDrop)> {
    let len = std::fs::metadata(data).unwrap().len();
    if kind == BackendKind::Hugetlb && !common::ensure_huge_pages(PageSize::Huge2M, len >> 21) {
        return None;
    }
    if kind == BackendKind::ShmemThp {
        common::huge_tmpfs()?;
    }
    let path = common::unique_path(frames::region_dir(kind), "bufferpool");
    let region = Region::create(RegionOptions::new(len).backend(kind).path(&path)).unwrap();
    Some((Arc::new(region), RemoveOnDrop(path)))
}

fn store_populator(region: Arc<Region>, data: &Path) -> Populator {
    Populator::with_options(
        region,
        FileStore::open(data).unwrap(),
        PopulateOptions::new().readahead(0),
    )
    .unwrap()
}

fn read_file(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset as u64)
        .unwrap();
    buf
}

fn read_region(region: &Region, offset: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    region.read_via_primary(offset, &mut buf).unwrap();
    buf
}

/// Write, write back, discard, refill: the refill (here and in another
/// process) reads the written bytes, and the file holds them.
fn written_back_pages_come_back(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 8 << 20, 3);
    let Some((region, _remove)) = region_for(kind, &data) else {
        return;
    };
    let pool = store_populator(region.clone(), &data);
    let g = region.granule().bytes();
    let page = 3 * g + KIB4; // a 4 KiB page inside the fourth granule
    assert!(!pool.is_present(page));
    pool.populate(page, KIB4).unwrap();
    assert!(pool.is_present(page));
    assert_eq!(
        read_region(&region, page, 16),
        (0..16)
            .map(|i| pattern_byte(3, page + i))
            .collect::<Vec<_>>()
    );

    let mut new = vec![0u8; KIB4];
    fill_pattern(99, page, &mut new);
    region.write_via_primary(page, &new).unwrap();
    pool.write_back(page, KIB4).unwrap();
    pool.sync().unwrap();
    assert_eq!(
        read_file(&data, page, KIB4),
        new,
        "the file holds the written-back page"
    );
    pool.discard(page - page % g, g).unwrap();
    assert!(!pool.is_present(page));
    assert_eq!(pool.page_state(page / g), Some(PageState::Absent));

    // Another process fills it again from the file.
    let out = run_child(
        "refill-and-read",
        &[
            ("REGION", region.shareable_path().display().to_string()),
            ("DATA", data.display().to_string()),
            ("OFFSET", page.to_string()),
        ],
    );
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once("READ ").map(|(_, r)| r.to_string()))
        .expect("child output");
    let expected: Vec<String> = new[..32].iter().map(u8::to_string).collect();
    assert_eq!(
        line,
        expected.join(","),
        "the other process refilled the written bytes"
    );
    assert!(
        pool.is_present(page),
        "the other process's fill is seen here"
    );
    assert_eq!(read_region(&region, page, KIB4), new, "and read here");
    // The rest of the granule came back from the file unchanged.
    let other = page - page % g;
    if other != page {
        assert_eq!(
            read_region(&region, other, 16),
            (0..16)
                .map(|i| pattern_byte(3, other + i))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn written_back_pages_come_back_shmem() {
    written_back_pages_come_back(BackendKind::Shmem);
}

#[test]
fn written_back_pages_come_back_shmem_thp() {
    written_back_pages_come_back(BackendKind::ShmemThp);
}

#[test]
fn written_back_pages_come_back_hugetlb() {
    written_back_pages_come_back(BackendKind::Hugetlb);
}

/// `HugetlbHgm` (a kernel with the HGM series) fills 4 KiB pieces of huge
/// pages, but a discard of a piece is refused: the kernel would zero it
/// without unmapping it from other processes, which would read zeroes.
/// Whole huge pages are discarded and refilled from the source, and the
/// other huge pages keep their bytes.
#[test]
fn on_hgm_a_discard_drops_whole_huge_pages_only() {
    if !common::hgm_available() || !common::ensure_huge_pages(PageSize::Huge2M, 4) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 4 << 20, 13);
    let Some((region, _remove)) = region_for(BackendKind::HugetlbHgm, &data) else {
        return;
    };
    assert_eq!(region.granule().bytes(), KIB4);
    let pool = store_populator(region.clone(), &data);
    assert_eq!(pool.discard_unit(), 2 << 20);
    pool.populate(0, 4 << 20).unwrap();
    for page in [6, 600] {
        region.write_via_primary(page * KIB4, &[0xEE; 8]).unwrap();
    }
    let at = |page: usize| read_region(&region, page * KIB4, 8);
    let source = |page: usize| {
        (0..8)
            .map(|i| pattern_byte(13, page * KIB4 + i))
            .collect::<Vec<_>>()
    };
    let err = pool.discard(6 * KIB4, KIB4).unwrap_err();
    assert!(matches!(err, Error::PartialHugePage { .. }), "{err}");
    assert!(err.to_string().contains("discard_unit"), "{err}");
    assert_eq!(at(6), vec![0xEE; 8], "a refused discard drops nothing");
    pool.discard(0, 2 << 20).unwrap();
    assert!(!pool.is_present(6 * KIB4));
    assert_eq!(
        at(6),
        source(6),
        "the discarded huge page is refilled from the source"
    );
    assert_eq!(
        at(600),
        vec![0xEE; 8],
        "the other huge page keeps its bytes"
    );
}

/// A page another process filled and wrote, never mapped in this one, is
/// written back from here: the kernel's read of it is a minor fault that
/// the in-thread driver cannot serve in kernel mode, so the write-back maps
/// it first.
#[test]
fn a_page_filled_by_another_process_is_written_back_from_this_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 4 << 20, 5);
    let Some((region, _remove)) = region_for(BackendKind::Shmem, &data) else {
        return;
    };
    let pool = store_populator(region.clone(), &data);
    let page = 77 * KIB4;
    run_child(
        "fill-and-write",
        &[
            ("REGION", region.shareable_path().display().to_string()),
            ("DATA", data.display().to_string()),
            ("OFFSET", page.to_string()),
        ],
    );
    assert!(pool.is_present(page));
    pool.write_back(page, KIB4).unwrap();
    let mut expected = vec![0u8; KIB4];
    fill_pattern(42, page, &mut expected);
    assert_eq!(read_file(&data, page, KIB4), expected);
}

#[test]
fn writing_back_needs_a_store_and_stays_inside_it() {
    let region =
        Arc::new(Region::create(RegionOptions::new(4 << 20).backend(BackendKind::Shmem)).unwrap());
    let zero = Populator::new(region, ZeroSource).unwrap();
    zero.populate(0, KIB4).unwrap();
    let err = zero.write_back(0, KIB4).unwrap_err();
    assert!(matches!(err, Error::ReadOnlySource), "{err}");
    assert!(
        err.to_string().contains("FileStore"),
        "the error names the fix: {err}"
    );
    assert!(matches!(zero.sync(), Err(Error::ReadOnlySource)));

    // A store shorter than the region: its last, partial page fills
    // (padded with zeroes), but writing the whole page back would grow the
    // file, which a store never does; the page stays in memory.
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), (2 << 20) + 100, 7);
    let region =
        Arc::new(Region::create(RegionOptions::new(4 << 20).backend(BackendKind::Shmem)).unwrap());
    let short = Populator::new(region.clone(), FileStore::open(&data).unwrap()).unwrap();
    short.populate(2 << 20, KIB4).unwrap();
    let err = short.write_back(0, 4 << 20).unwrap_err();
    match &err {
        Error::WriteBack {
            offset,
            source: FillError::PastEnd { len },
            ..
        } => {
            assert_eq!((*offset, *len), (2 << 20, (2 << 20) + 100));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("still in memory"), "{err}");
    assert!(short.is_present(2 << 20));
    assert!(!short.is_present(4 << 20), "past the end is never present");
}

/// A store's file truncated under a running populator: a fill past the new
/// end, which the kernel would copy from the file's mapping, fails there
/// (`EFAULT`, no SIGBUS) and falls back to reading, which names the error;
/// the page is poisoned and every other page works.
#[test]
fn a_store_file_truncated_under_the_populator_poisons_only_what_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 8 << 20, 11);
    let region =
        Arc::new(Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap());
    let pool = Populator::new(region.clone(), FileStore::open(&data).unwrap()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    pool.populate(6 << 20, KIB4).unwrap();
    assert_eq!(pool.page_state((6 << 20) / KIB4), Some(PageState::Poisoned));
    let errors = pool.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    // The short read of a file that shrank: EIO, tried again, then poisoned.
    assert_eq!(errors[0].error, FillError::Io(hugearena::Errno::EIO));
    pool.populate(KIB4, KIB4).unwrap();
    assert_eq!(
        read_region(&region, KIB4, 16),
        (0..16)
            .map(|i| pattern_byte(11, KIB4 + i))
            .collect::<Vec<_>>()
    );
}

/// The example's buffer manager over hugearena frames, as a process of a
/// shared pool.
fn attach(meta: &Path, region: &Path, data: &Path) -> BufferPool {
    let frames = HugearenaFrames::open(region, data, false).unwrap();
    BufferPool::open(meta, Box::new(frames)).unwrap()
}

/// Creates a pool over `pages` pages with `budget` frames: metadata file,
/// region and data file, removed when the guard drops.
struct TestPool {
    pool: BufferPool,
    meta: PathBuf,
    region: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.meta);
        let _ = std::fs::remove_file(&self.region);
    }
}

fn test_pool(kind: BackendKind, pages: usize, budget_frames: usize) -> Option<TestPool> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.db");
    workload::build(&data, pages).unwrap();
    if kind == BackendKind::Hugetlb
        && !common::ensure_huge_pages(PageSize::Huge2M, (pages * PAGE) as u64 >> 21)
    {
        return None;
    }
    if kind == BackendKind::ShmemThp {
        common::huge_tmpfs()?;
    }
    let name = common::unique_path("/", "pool")
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let (frames, region) = HugearenaFrames::create(Some(kind), &name, &data, false).unwrap();
    let meta = common::unique_path("/dev/shm", "pool-meta");
    let pool = BufferPool::create(&meta, pages, budget_frames, Box::new(frames)).unwrap();
    Some(TestPool {
        pool,
        meta,
        region,
        data,
        _dir: dir,
    })
}

fn env_of(t: &TestPool) -> Vec<(&'static str, String)> {
    vec![
        ("META", t.meta.display().to_string()),
        ("REGION", t.region.display().to_string()),
        ("DATA", t.data.display().to_string()),
    ]
}

/// Evicting a dirty page writes it back first: with a pool of 4 frames,
/// updates to 64 pages survive their eviction, and the file holds every
/// committed update.
#[test]
fn a_dirty_page_is_written_back_before_it_is_evicted() {
    let Some(t) = test_pool(BackendKind::Shmem, 64, 4) else {
        return;
    };
    let keys = KeyDist::parse("uniform", 64 * workload::RECORDS as u64).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let tally = workload::run(&t.pool, 0, Mix::Balanced, &keys, 1, deadline, 20_000).unwrap();
    assert_eq!(tally.ops, 20_000);
    let c = t.pool.counters();
    assert!(c.evictions > 1000, "the pool evicted: {c:?}");
    assert!(
        c.write_backs > 500,
        "dirty pages were written back on eviction: {c:?}"
    );
    assert!(c.resident <= 4, "the budget holds: {c:?}");
    // Before the final flush: every page not resident has its last
    // committed update in the file.
    let resident: Vec<bool> = (0..64).map(|p| t.pool.is_resident(p)).collect();
    workload::verify_file(&t.data, 64, |p| {
        if resident[p] { 0 } else { t.pool.committed(p) }
    })
    .unwrap();
    t.pool.flush().unwrap();
    workload::verify_file(&t.data, 64, |p| t.pool.committed(p)).unwrap();
}

/// Two processes (two threads each) fill, update and evict the same few
/// pages at once through a pool of 8 frames; every read is checked for
/// torn records and lost updates, and the file is checked at the end.
fn racing_processes(kind: BackendKind, pages: usize, budget: usize, min_evictions: u64) {
    let Some(t) = test_pool(kind, pages, budget) else {
        return;
    };
    let mut env = env_of(&t);
    env.push(("PAGES", pages.to_string()));
    let child = std::thread::spawn(move || run_child("race", &env));
    while t.pool.attached() < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.pool.signal_start();
    let ops = race(&t.pool, pages, 0);
    let out = child.join().unwrap();
    let child_ops: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once("RACED ")?.1.parse().ok())
        .expect("child output");
    let c = t.pool.counters();
    assert!(ops > 0 && child_ops > 0);
    assert!(
        c.evictions >= min_evictions,
        "pages were evicted while both processes used them: {c:?}"
    );
    t.pool.flush().unwrap();
    workload::verify_file(&t.data, pages, |p| t.pool.committed(p)).unwrap();
}

/// Both threads of one process of [`racing_processes`]; returns its operations.
fn race(pool: &BufferPool, pages: usize, seed: u64) -> u64 {
    let keys = KeyDist::parse("uniform", (pages * workload::RECORDS) as u64).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let keys = &keys;
                s.spawn(move || {
                    workload::run(
                        pool,
                        t,
                        Mix::Balanced,
                        keys,
                        seed * 8 + t as u64 + 1,
                        deadline,
                        u64::MAX,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap().ops)
            .sum()
    })
}

#[test]
fn two_processes_racing_to_fill_write_and_evict_never_see_torn_or_stale_data_shmem() {
    racing_processes(BackendKind::Shmem, 32, 8, 100);
}

#[test]
fn two_processes_racing_to_fill_write_and_evict_never_see_torn_or_stale_data_shmem_thp() {
    racing_processes(BackendKind::ShmemThp, 32, 8, 100);
}

#[test]
fn two_processes_racing_to_fill_write_and_evict_never_see_torn_or_stale_data_hugetlb() {
    // 2 MiB frames: 2 of the 4 frames (2048 pages) resident, give or
    // take one; a frame of 512 pages that 4 threads update is seldom
    // free of locks, so evictions are fewer.
    racing_processes(BackendKind::Hugetlb, 2048, 2, 2);
}

/// A process killed with SIGKILL in the middle of an update, holding the
/// page's lock with the record half written: the next process to want the
/// page takes the lock over, redoes the update from its intent record, and
/// reads a whole record; the pool goes on and the file checks out.
#[test]
fn a_process_killed_holding_a_page_lock_is_taken_over_and_its_update_redone() {
    let Some(t) = test_pool(BackendKind::Shmem, 64, 16) else {
        return;
    };
    let layout = workload::Layout::new(64);
    let key = 12_345 % layout.keys();
    let page = layout.page_of(key);
    let before = t
        .pool
        .read(page, |v| workload::read(v, key, layout.slot_of(key)))
        .unwrap()
        .unwrap();
    let mut env = env_of(&t);
    env.push(("KEY", key.to_string()));
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    env.push(("READY", ready.display().to_string()));
    let child = spawn_child("die-holding-a-lock", &env);
    let waited = Instant::now();
    while !ready.exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the child never took the lock"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    kill9(child);
    let seen = t
        .pool
        .read(page, |v| workload::read(v, key, layout.slot_of(key)))
        .unwrap()
        .unwrap();
    assert_eq!(
        seen.version,
        before.version + 1,
        "the dead process's update was redone"
    );
    assert!(t.pool.counters().takeovers >= 1);
    // The pool goes on: updates and evictions of everything.
    let keys = KeyDist::parse("uniform", layout.keys()).unwrap();
    workload::run(
        &t.pool,
        0,
        Mix::Balanced,
        &keys,
        3,
        Instant::now() + Duration::from_secs(30),
        5_000,
    )
    .unwrap();
    t.pool.flush().unwrap();
    workload::verify_file(&t.data, 64, |p| t.pool.committed(p)).unwrap();
}

/// kill -9 at a random point of a running workload (several times): the
/// surviving process finishes its run with every read checked, takes over
/// whatever the dead one held, and the file checks out.
#[test]
fn kill_9_at_random_points_leaves_the_pool_usable_for_the_others() {
    let Some(t) = test_pool(BackendKind::Shmem, 48, 8) else {
        return;
    };
    let mut x = std::process::id() as u64 | 1;
    for round in 0..4 {
        let mut env = env_of(&t);
        env.push(("PAGES", "48".into()));
        env.push(("SEED", (round + 1).to_string()));
        let child = spawn_child("workload-forever", &env);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let keys = KeyDist::parse("uniform", 48 * workload::RECORDS as u64).unwrap();
        let kill_at = Instant::now() + Duration::from_millis(50 + x % 400);
        std::thread::scope(|s| {
            s.spawn(|| {
                workload::run(
                    &t.pool,
                    0,
                    Mix::Balanced,
                    &keys,
                    100 + round,
                    kill_at + Duration::from_millis(300),
                    u64::MAX,
                )
                .unwrap()
            });
            while Instant::now() < kill_at {
                std::thread::sleep(Duration::from_millis(1));
            }
            kill9(child);
        });
        t.pool.recover_dead();
    }
    t.pool.flush().unwrap();
    workload::verify_file(&t.data, 48, |p| t.pool.committed(p)).unwrap();
}

fn spawn_child(role: &str, env: &[(&str, String)]) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn kill9(mut child: std::process::Child) {
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the child was running"
    );
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    let region = PathBuf::from(env("REGION"));
    let data = PathBuf::from(env("DATA"));
    match role.as_str() {
        "refill-and-read" => {
            let pool = store_populator(Arc::new(Region::open(&region).unwrap()), &data);
            let offset: usize = env("OFFSET").parse().unwrap();
            pool.populate(offset, KIB4).unwrap();
            let bytes = read_region(pool.region(), offset, 32);
            println!(
                "READ {}",
                bytes
                    .iter()
                    .map(u8::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        "fill-and-write" => {
            let pool = store_populator(Arc::new(Region::open(&region).unwrap()), &data);
            let offset: usize = env("OFFSET").parse().unwrap();
            pool.populate(offset, KIB4).unwrap();
            let mut bytes = vec![0u8; KIB4];
            fill_pattern(42, offset, &mut bytes);
            pool.region().write_via_primary(offset, &bytes).unwrap();
        }
        "race" => {
            let pool = attach(Path::new(&env("META")), &region, &data);
            while !pool.started() {
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("RACED {}", race(&pool, env("PAGES").parse().unwrap(), 1));
        }
        "die-holding-a-lock" => {
            let pool = attach(Path::new(&env("META")), &region, &data);
            let layout = workload::Layout::new(pool.pages());
            let key: u64 = env("KEY").parse().unwrap();
            pool.write(layout.page_of(key), 0, |view, log| {
                // Log the update, write half of it, and wait to be killed.
                let record = workload::find(view, key, layout.slot_of(key)).unwrap();
                let version = view.get(workload::record_at(record) + 1) + 1;
                log.log(&pool::Redo {
                    record,
                    key,
                    version,
                    lsn: view.get(0) + 1,
                });
                view.set(
                    workload::record_at(record) + 2,
                    workload::value(key, version, 0),
                );
                view.set(workload::record_at(record) + 3, 0xdead);
                std::fs::write(env("READY"), b"").unwrap();
                std::thread::sleep(Duration::from_secs(600));
            })
            .unwrap();
        }
        "workload-forever" => {
            let pool = attach(Path::new(&env("META")), &region, &data);
            let pages: usize = env("PAGES").parse().unwrap();
            let keys = KeyDist::parse("uniform", (pages * workload::RECORDS) as u64).unwrap();
            let seed: u64 = env("SEED").parse().unwrap();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (pool, keys) = (&pool, &keys);
                    s.spawn(move || {
                        workload::run(
                            pool,
                            t,
                            Mix::Balanced,
                            keys,
                            seed * 8 + t as u64,
                            Instant::now() + Duration::from_secs(60),
                            u64::MAX,
                        )
                        .unwrap()
                    });
                }
            });
        }
        other => panic!("unknown child role {other}"),
    }
}
