//! Shared helpers for the real-kernel integration tests: huge page
//! reservation, hugetlbfs mounts, child processes and data patterns.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use hugearena::PageSize;
use hugearena::probe::{HugePagePool, HugetlbfsMount};

/// Environment variable that turns a test binary into a child helper.
pub const CHILD_ROLE: &str = "HUGEARENA_TEST_CHILD";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Skips (returns false with the reason printed) or, in CI, fails.
pub fn skip(reason: &str) -> bool {
    if in_ci() {
        panic!("required in CI, cannot skip: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

/// Makes sure `pages` huge pages of `size` are free and unreserved, growing
/// the pool when running as root. Returns false (after reporting a skip)
/// when that is impossible.
pub fn ensure_huge_pages(size: PageSize, pages: u64) -> bool {
    // Tests run in parallel: keep headroom for the others.
    let want = pages + 16;
    let Some(pool) = HugePagePool::read(size) else {
        return skip(&format!("the kernel has no {size} huge page pool"));
    };
    if pool.available() >= want {
        return true;
    }
    if !is_root() {
        return skip(&format!(
            "needs {want} free {size} huge pages, have {}; reserve huge pages: {}",
            pool.available(),
            HugePagePool::reserve_command(size, pool.total + want)
        ));
    }
    let knob = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
        size.kib()
    );
    let target = pool.total + (want - pool.available());
    if let Err(e) = std::fs::write(&knob, target.to_string()) {
        return skip(&format!("cannot write {knob}: {e}"));
    }
    let after = HugePagePool::read(size).expect("pool exists");
    if after.available() < pages {
        return skip(&format!(
            "asked the kernel for {target} {size} huge pages, it gave {} (memory too fragmented?)",
            after.total
        ));
    }
    true
}

/// A hugetlbfs mount with 2 MiB pages, mounting one when root.
pub fn hugetlbfs_2m() -> Option<PathBuf> {
    let find = || {
        HugetlbfsMount::list()
            .into_iter()
            .find(|m| m.page_size == PageSize::Huge2M)
            .map(|m| m.path)
    };
    if let Some(path) = find() {
        return Some(path);
    }
    if !is_root() {
        skip(&format!(
            "no hugetlbfs mount: sudo {}",
            huge_tmpfs_mount::hugetlbfs_mount_command()
        ));
        return None;
    }
    let mounted = huge_tmpfs_mount::mount_hugetlbfs_2m();
    match (mounted, find()) {
        (_, Some(path)) => Some(path),
        (mounted, None) => {
            skip(&format!("mounting hugetlbfs failed: {mounted:?}"));
            None
        }
    }
}

#[path = "../../examples/support/huge_tmpfs.rs"]
pub mod huge_tmpfs_mount;
#[path = "../../examples/support/order.rs"]
mod order;
#[allow(unused_imports)] // not every test binary shuffles
pub use order::shuffled;

/// A tmpfs mounted with `huge=always` (its files get 2 MiB folios whatever
/// `shmem_enabled` says), mounting one when root.
pub fn huge_tmpfs() -> Option<PathBuf> {
    tmpfs(&huge_tmpfs_mount::HUGE_TMPFS)
}

/// A small tmpfs mounted `huge=advise` (2 MiB folios only where a mapping
/// asks with `MADV_HUGEPAGE`, as the alias does), mounting it when root.
pub fn advise_tmpfs() -> Option<PathBuf> {
    tmpfs(&huge_tmpfs_mount::ADVISE_TMPFS)
}

fn tmpfs(mount: &huge_tmpfs_mount::TmpfsMount) -> Option<PathBuf> {
    if let Some(path) = mount.mounted() {
        return Some(path);
    }
    if !is_root() {
        skip(&format!(
            "no huge={} tmpfs: sudo mount -t tmpfs -o huge={},size={} none {}",
            mount.huge, mount.huge, mount.size, mount.dir
        ));
        return None;
    }
    mount.mount().map_err(|e| skip(&e)).ok()
}

/// Sums a field of `/proc/self/smaps` over the mappings that lie inside
/// `[start, end)`, in KiB.
pub fn smaps_kib(start: usize, end: usize, field: &str) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            inside = a >= start && b <= end;
            continue;
        }
        if inside && let Some(v) = line.strip_prefix(field) {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap();
        }
    }
    total
}

/// The signal a touch of an unfilled page gets once nobody resolves faults
/// for it any more (a dropped populator, stopped handler threads): SIGBUS
/// from a poison marker (Linux 6.6+) or from a registration kept with
/// `UFFD_FEATURE_SIGBUS` (the in-thread and proactive drivers); SIGSEGV
/// from `PROT_NONE` where handler threads ran on a kernel without markers.
pub fn unfilled_touch_signal(handler_threads: bool) -> i32 {
    let markers = hugearena::KernelCaps::cached()
        .uffd
        .features
        .contains(hugearena::probe::UffdFeatures::POISON);
    if markers || !handler_threads {
        libc::SIGBUS
    } else {
        libc::SIGSEGV
    }
}

/// Whether this kernel has HugeTLB high-granularity mapping (the unmerged
/// HGM series), so `HugetlbHgm` regions can be tested. Where it has not,
/// checks what can be checked (the backend is refused, with the reason)
/// and returns false; with `HUGEARENA_REQUIRE_HGM` set (CI's HGM guest)
/// its absence fails the test instead.
pub fn hgm_available() -> bool {
    use hugearena::probe::Capability;
    match &hugearena::KernelCaps::cached().hgm {
        Capability::Yes(_) => true,
        Capability::No(reason) => {
            assert!(
                std::env::var_os("HUGEARENA_REQUIRE_HGM").is_none(),
                "HGM is required here and missing: {reason}"
            );
            let err = hugearena::Region::create(
                hugearena::RegionOptions::new(4 << 20).backend(hugearena::BackendKind::HugetlbHgm),
            )
            .unwrap_err();
            assert!(
                matches!(err, hugearena::Error::HgmUnavailable { .. }),
                "{err}"
            );
            false
        }
    }
}

/// A fresh path in `dir` for a region file; the file does not exist yet.
pub fn unique_path(dir: &str, tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!(
        "{dir}/hugearena-test-{}-{tag}-{n}",
        std::process::id()
    ))
}

/// Removes a file when dropped.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs this test binary's `child_entry` test as a separate process with
/// `role` and extra environment.
pub fn run_child(role: &str, env: &[(&str, String)]) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("spawn child test process");
    if !out.status.success() {
        panic!(
            "child {role} failed: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The byte a pattern with `seed` has at `offset`.
pub fn pattern_byte(seed: u64, offset: usize) -> u8 {
    let x = (offset as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (x >> 56) as u8 ^ (offset >> 12) as u8
}

/// Fills `buf` with the pattern starting at `offset`.
pub fn fill_pattern(seed: u64, offset: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i);
    }
}

/// Checks every byte of `region` through its primary view against
/// `expect(offset)`, 1 MiB at a time.
pub fn verify(region: &hugearena::Region, expect: impl Fn(usize) -> u8) {
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..region.len()).step_by(buf.len()) {
        let n = buf.len().min(region.len() - off);
        region.read_via_primary(off, &mut buf[..n]).unwrap();
        if let Some(i) = (0..n).find(|&i| buf[i] != expect(off + i)) {
            panic!(
                "byte {} is {:#x}, want {:#x}",
                off + i,
                buf[i],
                expect(off + i)
            );
        }
    }
}

/// Runs this test binary's `child_entry` with `role` and extra environment,
/// killing it (and failing) if it runs longer than `limit`. Returns its
/// output whatever its exit status.
pub fn run_child_within(role: &str, env: &[(&str, String)], limit: std::time::Duration) -> Output {
    use std::process::Stdio;
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child test process");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait for child").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap child");
            panic!(
                "child {role} still running after {limit:?} (a wait without bound?)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect child output")
}

/// Whether process `pid` still runs: it exists and is not a zombie
/// (whose `/proc/PID/stat` state, after the command name in parentheses,
/// is `Z`).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The signal that ended a child, if one did.
pub fn killed_by(out: &Output) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&out.status)
}

/// A closure source declared async-signal-safe, for the in-thread drivers.
pub type SafeFnSource<F> = hugearena::populate::SignalSafe<hugearena::populate::FnSource<F>>;

/// Wraps a test's closure source for the in-thread drivers.
pub fn safe_fn<F>(fill: F) -> SafeFnSource<F>
where
    F: Fn(u64, &mut [u8]) -> Result<(), hugearena::populate::FillError> + Send + Sync,
{
    // SAFETY: the tests' closures compute bytes into `dst`, sleep, spin or
    // read the region (system calls and plain memory access); none
    // allocates or locks, and the one that panics runs on handler threads.
    unsafe { hugearena::populate::SignalSafe::new(hugearena::populate::FnSource(fill)) }
}
