//! The experiments behind [`KernelCaps`](super::KernelCaps): each one tries
//! the real operation on a small scratch mapping and reports what happened.
#![allow(unsafe_code)] // probing mappings the experiments own

use std::os::fd::AsFd;

use super::{Capability, UffdCaps};
use crate::sys::memfd::{Fallocate, MemfdKind, fallocate, memfd_create, set_len};
use crate::sys::mman::{Advice, Protection, Reservation, madvise, map_probe};
use crate::sys::size::PageSize;
use crate::sys::uffd::{Features, OpenFlags, RegisterMode, Userfaultfd};
use crate::sys::{Errno, SysError};

const HUGE: usize = PageSize::Huge2M.bytes();
const BASE: usize = PageSize::Base4K.bytes();

pub(super) fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

pub(super) fn userfaultfd() -> UffdCaps {
    let flags = OpenFlags::default();
    let device = Userfaultfd::open_device(flags);
    let syscall = Userfaultfd::open_syscall(flags);
    let unprivileged_sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let (opened_through, uffd) = match (&device, &syscall) {
        (Ok(_), _) => (
            Some(crate::sys::uffd::OpenedThrough::Device),
            device.as_ref().ok(),
        ),
        (Err(_), Ok(_)) => (
            Some(crate::sys::uffd::OpenedThrough::Syscall),
            syscall.as_ref().ok(),
        ),
        _ => (None, None),
    };
    let features = uffd
        .and_then(|u| u.api(Features::empty()).ok())
        .map_or(Features::empty(), |api| Features(api.features));
    UffdCaps {
        device: device.map(drop),
        syscall: syscall.map(drop),
        unprivileged_sysctl,
        opened_through,
        features,
    }
}

pub(super) fn hugetlb_memfd() -> Capability {
    let fd = match memfd_create("hugearena-probe", MemfdKind::Hugetlb(PageSize::Huge2M)) {
        Ok(fd) => fd,
        Err(e) => return Capability::No(format!("cannot create a 2 MiB hugetlb memfd: {e}")),
    };
    if let Err(e) = set_len(fd.as_fd(), HUGE as u64) {
        return Capability::No(format!("cannot size a hugetlb memfd: {e}"));
    }
    match map_probe(fd.as_fd(), HUGE) {
        Ok(_) => Capability::Yes("2 MiB hugetlb memfd created and mapped MAP_SHARED".into()),
        Err(e) => Capability::No(format!("cannot map a hugetlb memfd: {e}")),
    }
}

/// HGM: `MADV_SPLIT` on a shared hugetlb mapping, then a 4 KiB CONTINUE.
pub(super) fn hgm(uffd: &UffdCaps, hugetlb: &Capability) -> Capability {
    if !hugetlb.is_yes() {
        return Capability::No(format!("no hugetlb memory to split: {}", hugetlb.detail()));
    }
    let attempt = || -> Result<Capability, SysError> {
        let fd = memfd_create("hugearena-probe-hgm", MemfdKind::Hugetlb(PageSize::Huge2M))?;
        set_len(fd.as_fd(), HUGE as u64)?;
        // MAP_NORESERVE: the split test must work with an empty pool.
        let primary = map_probe(fd.as_fd(), HUGE)?;
        // SAFETY: the scratch mapping is ours; MADV_SPLIT changes no contents.
        match unsafe { madvise(primary.addr(), HUGE, Advice::Split) } {
            Ok(()) => {}
            Err(e) if e.errno() == Errno::EINVAL => {
                return Ok(Capability::No(
                    "madvise(MADV_SPLIT = 26) on a shared hugetlb mapping returned EINVAL: this \
                     kernel lacks HugeTLB high-granularity mapping (posted in 2023, never merged \
                     upstream), so hugetlb pages populate whole"
                        .into(),
                ));
            }
            Err(e) => return Ok(Capability::No(format!("MADV_SPLIT failed: {e}"))),
        }
        if !uffd.features.contains(Features::MINOR_HUGETLBFS) {
            return Ok(Capability::No(
                "MADV_SPLIT accepted, but userfaultfd minor faults on hugetlbfs are unavailable"
                    .into(),
            ));
        }
        // Give the file one real huge page so CONTINUE has something to map.
        if let Err(e) = fallocate(fd.as_fd(), Fallocate::Allocate, 0, HUGE as u64) {
            return Ok(Capability::No(format!(
                "MADV_SPLIT accepted, but the 4 KiB UFFDIO_CONTINUE could not be tried \
                 (no free 2 MiB huge page: {e}); reserve one and probe again"
            )));
        }
        let alias = map_probe(fd.as_fd(), HUGE)?;
        // SAFETY: in bounds of the 2 MiB alias, which nothing else uses.
        unsafe { alias.addr().add(BASE).write_volatile(0xA5) };
        let (uffd, _) = Userfaultfd::open(OpenFlags::default()).map_err(|e| e.syscall)?;
        uffd.api(Features::MINOR_HUGETLBFS)?;
        uffd.register(primary.addr(), HUGE, RegisterMode::MINOR)?;
        // SAFETY: the page is registered, and its page-cache page was
        // written through the alias above.
        let mapped = unsafe { uffd.continue_range(primary.addr().add(BASE), BASE, 0) };
        Ok(match mapped {
            // SAFETY: the 4 KiB piece is now mapped and readable.
            Ok(_) if unsafe { primary.addr().add(BASE).read_volatile() } == 0xA5 => {
                Capability::Yes(
                    "MADV_SPLIT accepted and a 4 KiB UFFDIO_CONTINUE mapped part of a huge page"
                        .into(),
                )
            }
            Ok(_) => Capability::No("4 KiB UFFDIO_CONTINUE mapped the wrong bytes".into()),
            Err(e) => Capability::No(format!(
                "MADV_SPLIT accepted, but a 4 KiB UFFDIO_CONTINUE failed: {}",
                e.sys()
            )),
        })
    };
    attempt().unwrap_or_else(|e| Capability::No(format!("HGM probe could not run: {e}")))
}

/// `MADV_COLLAPSE` of a fully written 2 MiB shmem block.
pub(super) fn shmem_collapse() -> Capability {
    let attempt = || -> Result<Capability, SysError> {
        let fd = memfd_create("hugearena-probe-collapse", MemfdKind::Shmem)?;
        set_len(fd.as_fd(), HUGE as u64)?;
        let res = Reservation::new(HUGE, PageSize::Huge2M)?;
        // SAFETY: the reservation is fresh; nothing references it.
        let block = unsafe { res.place_shared(0, HUGE, fd.as_fd(), 0, Protection::ReadWrite, 0)? };
        for off in (0..HUGE).step_by(BASE) {
            // SAFETY: in bounds of the 2 MiB mapping, which nothing else uses.
            unsafe { block.as_ptr().add(off).write_volatile(1) };
        }
        // SAFETY: the block is ours and fully populated; collapse keeps contents.
        Ok(
            match unsafe { madvise(block.as_ptr(), HUGE, Advice::Collapse) } {
                Ok(()) => {
                    Capability::Yes("MADV_COLLAPSE of a full 2 MiB shmem block succeeded".into())
                }
                Err(e) => Capability::No(format!("MADV_COLLAPSE of a full 2 MiB shmem block: {e}")),
            },
        )
    };
    attempt().unwrap_or_else(|e| Capability::No(format!("collapse probe could not run: {e}")))
}
