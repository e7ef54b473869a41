//! Real-kernel tests of regions on every backend available here: layout,
//! primary/alias coherence, sharing with a second (spawned) process, and
//! backend selection.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::*;
use hugearena::{BackendKind, Error, HugePages, KernelCaps, PageSize, Region, RegionOptions};

const CHUNK: usize = 1 << 20;

/// Writes the pattern in 1 MiB chunks.
fn write_pattern(region: &Region, seed: u64) {
    let mut buf = vec![0u8; CHUNK];
    for off in (0..region.len()).step_by(CHUNK) {
        let n = CHUNK.min(region.len() - off);
        fill_pattern(seed, off, &mut buf[..n]);
        region.write_via_primary(off, &buf[..n]).unwrap();
    }
}

/// Reads everything through the primary and compares with the pattern.
fn verify_pattern(region: &Region, seed: u64) {
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    for off in (0..region.len()).step_by(CHUNK) {
        let n = CHUNK.min(region.len() - off);
        region.read_via_primary(off, &mut got[..n]).unwrap();
        fill_pattern(seed, off, &mut want[..n]);
        if got[..n] != want[..n] {
            let i = (0..n).find(|&i| got[i] != want[i]).unwrap();
            panic!(
                "byte {} differs: got {:#x}, want {:#x}",
                off + i,
                got[i],
                want[i]
            );
        }
    }
}

/// The child side of every cross-process test.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let seed: u64 = std::env::var("SEED").map_or(0, |s| s.parse().unwrap());
    match role.as_str() {
        "verify" => {
            let region = if let Ok(path) = std::env::var("REGION_PATH") {
                Region::open(&path).unwrap()
            } else {
                let raw: i32 = std::env::var("REGION_FD").unwrap().parse().unwrap();
                nix::fcntl::fcntl(
                    // SAFETY: only checks that the number is open.
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) },
                    nix::fcntl::FcntlArg::F_GETFD,
                )
                .expect("the inherited descriptor is open");
                // SAFETY: the parent passed this descriptor to us alone.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                Region::from_fd(fd).unwrap()
            };
            assert!(!region.created_here());
            let backend = std::env::var("BACKEND").unwrap();
            assert_eq!(region.backend().kind().to_string(), backend);
            assert_eq!(region.len().to_string(), std::env::var("LEN").unwrap());
            verify_pattern(&region, seed);
            // Answer through our own alias: the parent checks it arrives.
            region
                .write_via_primary(region.len() - 5, b"child")
                .unwrap();
            println!("CHILD-OK granule={}", region.granule());
        }
        other => panic!("unknown child role {other}"),
    }
}

/// Creates, fills, verifies in-process, then has a child verify and answer.
fn share_with_child(region: &Region, via_fd: bool) {
    let seed = 0x5EED ^ region.len() as u64;
    write_pattern(region, seed);
    verify_pattern(region, seed);
    let mut env = vec![
        ("SEED", seed.to_string()),
        ("BACKEND", region.backend().kind().to_string()),
        ("LEN", region.len().to_string()),
    ];
    let _inherited;
    if via_fd {
        // A duplicate without close-on-exec, for the child to inherit.
        let raw = nix::fcntl::fcntl(region.fd(), nix::fcntl::FcntlArg::F_DUPFD(3)).unwrap();
        // SAFETY: fcntl just returned this new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        env.push(("REGION_FD", fd.as_raw_fd().to_string()));
        _inherited = fd;
    } else {
        env.push(("REGION_PATH", region.shareable_path().display().to_string()));
    }
    let out = run_child("verify", &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD-OK"));
    let mut answer = [0u8; 5];
    region
        .read_via_primary(region.len() - 5, &mut answer)
        .unwrap();
    assert_eq!(&answer, b"child");
}

#[test]
fn shmem_thp_region_is_shared_with_a_child_by_path() {
    let path = unique_path("/dev/shm", "thp");
    let _cleanup = RemoveOnDrop(path.clone());
    let region = Region::create(
        RegionOptions::new(64 << 20)
            .backend(BackendKind::ShmemThp)
            .path(&path),
    )
    .unwrap();
    assert_eq!(region.granule(), PageSize::Base4K);
    assert_eq!(region.layout().data_offset(), 2 << 20);
    assert!(PageSize::Huge2M.divides(region.primary().as_ptr() as usize));
    share_with_child(&region, false);
}

#[test]
fn shmem_region_is_shared_with_a_child_by_inherited_fd() {
    let region = Region::create(RegionOptions::new(16 << 20).backend(BackendKind::Shmem)).unwrap();
    assert_eq!(region.name().to_str(), Some("<memfd>"));
    share_with_child(&region, true);
}

#[test]
fn shmem_memfd_region_is_shared_through_proc_fd() {
    let region = Region::create(RegionOptions::new(8 << 20).huge_pages(HugePages::Off)).unwrap();
    assert!(
        region.choice().reason.contains("huge_pages=Off"),
        "{}",
        region.choice().reason
    );
    share_with_child(&region, false);
}

#[test]
fn hugetlb_memfd_region_is_shared_with_a_child() {
    if !ensure_huge_pages(PageSize::Huge2M, 40) {
        return;
    }
    let region =
        Region::create(RegionOptions::new(64 << 20).backend(BackendKind::Hugetlb)).unwrap();
    assert_eq!(region.granule(), PageSize::Huge2M);
    assert_eq!(region.layout().hugetlb_pages(), 33);
    share_with_child(&region, false);
}

#[test]
fn hugetlbfs_named_region_is_shared_with_a_child() {
    if !ensure_huge_pages(PageSize::Huge2M, 10) {
        return;
    }
    let Some(mount) = hugetlbfs_2m() else { return };
    let path = unique_path(mount.to_str().unwrap(), "hugetlb");
    let _cleanup = RemoveOnDrop(path.clone());
    let region = Region::create(
        RegionOptions::new(16 << 20)
            .backend(BackendKind::Hugetlb)
            .path(&path),
    )
    .unwrap();
    share_with_child(&region, false);
    share_with_child(&region, true);
}

#[test]
fn hgm_request_fails_and_says_why() {
    let caps = KernelCaps::cached();
    let result = Region::create(RegionOptions::new(4 << 20).backend(BackendKind::HugetlbHgm));
    if caps.hgm.is_yes() {
        // A kernel with the HGM series: the request must succeed at 4 KiB.
        assert_eq!(result.unwrap().granule(), PageSize::Base4K);
        return;
    }
    let err = result.unwrap_err();
    assert!(matches!(err, Error::HgmUnavailable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("MADV_SPLIT"), "{msg}");
    assert!(msg.contains("EINVAL"), "{msg}");
    assert!(msg.contains("BackendKind::ShmemThp"), "{msg}");
}

#[test]
fn try_policy_falls_back_and_records_why() {
    if !ensure_huge_pages(PageSize::Huge2M, 4) {
        return;
    }
    let region = Region::create(RegionOptions::new(4 << 20).huge_pages(HugePages::Try)).unwrap();
    let reason = &region.choice().reason;
    if !KernelCaps::cached().hgm.is_yes() {
        assert_eq!(region.backend().kind(), BackendKind::Hugetlb);
        assert!(reason.contains("HugetlbHgm is unavailable"), "{reason}");
        assert!(reason.contains("MADV_SPLIT"), "{reason}");
    }
    // With 1 GiB pages and an empty 1 GiB pool, Try falls back to shmem.
    let pool_1g =
        hugearena::probe::HugePagePool::read(PageSize::Huge1G).map_or(0, |p| p.available());
    if pool_1g == 0 {
        let region = Region::create(
            RegionOptions::new(1 << 30)
                .huge_pages(HugePages::Try)
                .huge_page_size(PageSize::Huge1G),
        )
        .unwrap();
        let reason = &region.choice().reason;
        assert_eq!(region.backend().kind(), BackendKind::ShmemThp, "{reason}");
        assert!(
            reason.contains("Hugetlb is unavailable: needs 2 free 1 GiB huge pages"),
            "{reason}"
        );
    }
}

#[test]
fn on_policy_uses_hugetlb() {
    if !ensure_huge_pages(PageSize::Huge2M, 4) {
        return;
    }
    let region = Region::create(RegionOptions::new(2 << 20).huge_pages(HugePages::On)).unwrap();
    assert!(region.backend().kind().uses_hugetlb());
}
