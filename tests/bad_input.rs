//! Bad input gets a specific error whose message names the fix, and leaves
//! nothing behind.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use hugearena::probe::HugePagePool;
use hugearena::{BackendKind, Error, HugePages, PageSize, Region, RegionOptions};

fn message(e: &Error) -> String {
    e.to_string()
}

#[test]
fn zero_size_is_refused() {
    let err = Region::create(RegionOptions::new(0).backend(BackendKind::Shmem)).unwrap_err();
    assert!(matches!(err, Error::ZeroSize { .. }), "{err:?}");
    assert!(message(&err).contains("at least one"), "{err}");
}

#[test]
fn size_must_be_a_multiple_of_the_granule() {
    let err = Region::create(RegionOptions::new(4097).backend(BackendKind::Shmem)).unwrap_err();
    assert!(
        matches!(err, Error::SizeNotGranuleMultiple { rounded: 8192, .. }),
        "{err:?}"
    );
    assert!(message(&err).contains("round it up to 8192"), "{err}");
}

#[test]
fn hugetlb_size_must_be_a_multiple_of_the_huge_page() {
    let err =
        Region::create(RegionOptions::new(3 << 20).backend(BackendKind::Hugetlb)).unwrap_err();
    assert!(
        matches!(err, Error::SizeNotGranuleMultiple { .. }),
        "{err:?}"
    );
    assert!(message(&err).contains("round it up to 4194304"), "{err}");
}

#[test]
fn absurd_sizes_are_refused() {
    let err = Region::create(RegionOptions::new(1 << 50).backend(BackendKind::Shmem)).unwrap_err();
    assert!(matches!(err, Error::SizeTooLarge { .. }), "{err:?}");
    assert!(message(&err).contains("split the data"), "{err}");
}

#[test]
fn a_region_larger_than_the_pool_names_the_shortfall_and_the_fix() {
    let pool = HugePagePool::read(PageSize::Huge2M).expect("2 MiB pool");
    let pages = pool.available() + 100;
    let err =
        Region::create(RegionOptions::new(pages << 21).backend(BackendKind::Hugetlb)).unwrap_err();
    match &err {
        Error::HugePagesShort { needed, .. } => assert_eq!(*needed, pages + 1),
        other => panic!("expected HugePagesShort, got {other:?}"),
    }
    let msg = message(&err);
    assert!(msg.contains("reserve huge pages"), "{msg}");
    assert!(msg.contains("/proc/sys/vm/nr_hugepages"), "{msg}");
}

#[test]
fn huge_pages_on_fails_with_the_fix_when_1g_pages_are_missing() {
    let Some(pool) = HugePagePool::read(PageSize::Huge1G) else {
        skip("no 1 GiB huge page pool on this kernel");
        return;
    };
    let size = (pool.available() + 1) << 30;
    let err = Region::create(
        RegionOptions::new(size)
            .huge_pages(HugePages::On)
            .huge_page_size(PageSize::Huge1G),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::HugePagesShort {
                page_size: PageSize::Huge1G,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        message(&err).contains("hugepages-1048576kB/nr_hugepages"),
        "{err}"
    );
}

#[test]
fn base_pages_are_not_a_huge_page_size() {
    let err =
        Region::create(RegionOptions::new(1 << 20).huge_page_size(PageSize::Base4K)).unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err:?}");
    assert!(
        message(&err).contains("Huge2M or PageSize::Huge1G"),
        "{err}"
    );
}

#[test]
fn opening_a_missing_file_says_so() {
    let err = Region::open("/dev/shm/hugearena-does-not-exist").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(message(&err).contains("check the path"), "{err}");
}

#[test]
fn creating_over_an_existing_file_is_refused() {
    let path = unique_path("/dev/shm", "exists");
    let _cleanup = RemoveOnDrop(path.clone());
    std::fs::write(&path, b"precious").unwrap();
    let err = Region::create(
        RegionOptions::new(1 << 20)
            .backend(BackendKind::Shmem)
            .path(&path),
    )
    .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert!(message(&err).contains("Region::open"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"precious",
        "nothing is lost"
    );
}

#[test]
fn a_file_that_is_not_a_region_is_refused() {
    let path = unique_path("/dev/shm", "junk");
    let _cleanup = RemoveOnDrop(path.clone());
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let err = Region::open(&path).unwrap_err();
    assert!(matches!(err, Error::BadMagic { .. }), "{err:?}");
    assert!(message(&err).contains("not a hugearena region"), "{err}");
}

#[test]
fn a_truncated_file_is_refused() {
    let path = unique_path("/dev/shm", "short");
    let _cleanup = RemoveOnDrop(path.clone());
    std::fs::write(&path, b"HUGEAREN").unwrap();
    let err = Region::open(&path).unwrap_err();
    assert!(matches!(err, Error::Truncated { len: 8, .. }), "{err:?}");

    // A real region cut short after its header.
    let path = unique_path("/dev/shm", "cut");
    let _cleanup2 = RemoveOnDrop(path.clone());
    drop(
        Region::create(
            RegionOptions::new(1 << 20)
                .backend(BackendKind::Shmem)
                .path(&path),
        )
        .unwrap(),
    );
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(64 << 10).unwrap();
    let err = Region::open(&path).unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err:?}");
    assert!(message(&err).contains("create the region again"), "{err}");
}

/// Creates a named shmem region and damages 4 bytes of its header.
fn damaged_region(tag: &str, offset: u64, bytes: [u8; 4]) -> (RemoveOnDrop, Error) {
    let path = unique_path("/dev/shm", tag);
    let cleanup = RemoveOnDrop(path.clone());
    drop(
        Region::create(
            RegionOptions::new(1 << 20)
                .backend(BackendKind::Shmem)
                .path(&path),
        )
        .unwrap(),
    );
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&bytes, offset).unwrap();
    (cleanup, Region::open(&path).unwrap_err())
}

#[test]
fn a_newer_format_version_is_refused() {
    let (_c, err) = damaged_region("version", 8, 3u32.to_le_bytes());
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 3,
                expected: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        message(&err).contains("matching hugearena version"),
        "{err}"
    );
}

#[test]
fn a_region_still_being_initialised_is_not_opened() {
    let (_c, err) = damaged_region("notready", 12, 0u32.to_le_bytes());
    assert!(matches!(err, Error::NotReady { .. }), "{err:?}");
    assert!(message(&err).contains("retry shortly"), "{err}");
}

#[test]
fn a_corrupt_header_is_detected() {
    let (_c, err) = damaged_region("corrupt", 32, 0xFFFF_FFFFu32.to_le_bytes());
    assert!(matches!(err, Error::CorruptHeader { .. }), "{err:?}");
}

#[test]
fn shmem_backends_refuse_files_outside_tmpfs_and_leave_nothing_behind() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("region");
    let err = Region::create(
        RegionOptions::new(1 << 20)
            .backend(BackendKind::Shmem)
            .path(&path),
    )
    .unwrap_err();
    match &err {
        Error::WrongFileSystem { .. } => {}
        other => panic!("expected WrongFileSystem, got {other:?}"),
    }
    assert!(message(&err).contains("/dev/shm"), "{err}");
    assert!(!path.exists(), "a failed create must not leave a file");
}

#[test]
fn an_unnamed_file_needs_an_existing_directory() {
    let missing = Region::create(
        RegionOptions::new(1 << 20)
            .backend(BackendKind::Shmem)
            .unnamed_in("/dev/shm/hugearena-no-such-directory"),
    )
    .unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing:?}");
}

/// Named like `shmem_backends_refuse_files_outside_tmpfs_and_leave_nothing_behind`
/// so that where there is no disk (the kernel matrix's guests) one
/// `--skip` leaves both out.
#[test]
fn shmem_backends_refuse_files_outside_tmpfs_unnamed_ones_too() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let err = Region::create(
        RegionOptions::new(1 << 20)
            .backend(BackendKind::Shmem)
            .unnamed_in(dir.path()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::WrongFileSystem { .. }), "{err:?}");
    assert!(message(&err).contains("/dev/shm"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn hugetlb_backends_refuse_files_outside_hugetlbfs() {
    let path = unique_path("/dev/shm", "nothuge");
    let _cleanup = RemoveOnDrop(path.clone());
    if !ensure_huge_pages(PageSize::Huge2M, 2) {
        return;
    }
    let err = Region::create(
        RegionOptions::new(2 << 20)
            .backend(BackendKind::Hugetlb)
            .path(&path),
    )
    .unwrap_err();
    assert!(matches!(err, Error::WrongFileSystem { .. }), "{err:?}");
    assert!(message(&err).contains("mount -t hugetlbfs"), "{err}");
    assert!(!path.exists(), "a failed create must not leave a file");
}

#[test]
fn out_of_bounds_accesses_are_refused() {
    let region = Region::create(RegionOptions::new(64 << 10).backend(BackendKind::Shmem)).unwrap();
    let err = region
        .write_via_primary(60 << 10, &[0u8; 8192])
        .unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err:?}");
    let mut buf = [0u8; 1];
    let err = region.read_via_primary(usize::MAX, &mut buf).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err:?}");
}

#[test]
fn userfaultfd_permission_is_explained() {
    if !nix::unistd::geteuid().is_root() {
        skip("needs root to drop to an unprivileged user");
        return;
    }
    let out = run_child("uffd-denied", &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD-OK"));
}

/// The unprivileged side of `userfaultfd_permission_is_explained`.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    assert_eq!(role, "uffd-denied");
    nix::unistd::setgid(nix::unistd::Gid::from_raw(65534)).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).unwrap();
    let caps = hugearena::KernelCaps::probe();
    let result = Region::create_with(
        RegionOptions::new(1 << 20).backend(BackendKind::Shmem),
        &caps,
    );
    let unprivileged: u32 = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map_or(0, |s| s.trim().parse().unwrap_or(0));
    if unprivileged == 1 {
        println!("CHILD-OK unprivileged userfaultfd is allowed here");
        return;
    }
    match result {
        Err(e @ Error::UserfaultfdDenied { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("/dev/userfaultfd"), "{msg}");
            assert!(msg.contains("vm.unprivileged_userfaultfd=1"), "{msg}");
            println!("CHILD-OK {msg}");
        }
        other => panic!("expected UserfaultfdDenied, got {other:?}"),
    }
}
