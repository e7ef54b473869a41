//! Backing files: memfd creation (shmem or hugetlb), sizing, preallocation,
//! hole punching and file-system identification.
#![allow(unsafe_code)] // system calls

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::error::{Errno, SysError, SysResult, check};
use super::size::PageSize;

/// What kind of memory a memfd is backed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemfdKind {
    /// tmpfs (shmem) pages: 4 KiB, or 2 MiB folios when THP allows.
    Shmem,
    /// hugetlb pages of the given size, taken from the reserved pool.
    Hugetlb(PageSize),
}

/// `MFD_HUGE_*` flag for a huge page size: log2(size) in bits 26..32.
fn huge_flag(size: PageSize) -> libc::c_uint {
    size.shift() << libc::MFD_HUGE_SHIFT
}

/// Creates an anonymous memory file (`memfd_create(2)`), close-on-exec.
///
/// `name` only shows up in `/proc/PID/fd` and `/proc/PID/maps`.
pub(crate) fn memfd_create(name: &str, kind: MemfdKind) -> SysResult<OwnedFd> {
    let cname = CString::new(name.replace('\0', "_")).expect("NULs were replaced");
    let mut flags = libc::MFD_CLOEXEC;
    match kind {
        MemfdKind::Shmem => {}
        MemfdKind::Hugetlb(PageSize::Base4K) => {
            return Err(SysError::new("memfd_create", Errno::EINVAL).arg("page_size", 4096));
        }
        MemfdKind::Hugetlb(size) => flags |= libc::MFD_HUGETLB | huge_flag(size),
    }
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    let fd = check(fd, "memfd_create").map_err(|e| e.arg("flags", u64::from(flags)))?;
    // SAFETY: the kernel just returned `fd`, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the file's size (`ftruncate(2)`).
pub(crate) fn set_len(fd: BorrowedFd<'_>, len: u64) -> SysResult<()> {
    let signed = i64::try_from(len).map_err(|_| SysError::new("ftruncate", Errno::EFBIG))?;
    // SAFETY: plain syscall on a borrowed, open descriptor.
    let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), signed) };
    check(ret, "ftruncate").map_err(|e| e.arg("len", len))?;
    Ok(())
}

/// The file's size in bytes (`fstat(2)`).
pub(crate) fn file_len(fd: BorrowedFd<'_>) -> SysResult<u64> {
    Ok(fstat(fd)?.st_size as u64)
}

/// `fstat(2)`.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> SysResult<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out pointer for one `stat`.
    let ret = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    check(ret, "fstat")?;
    // SAFETY: fstat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// What `fallocate(2)` should do with a byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallocate {
    /// Allocate backing pages now (for hugetlb: take them from the pool).
    Allocate,
    /// Free the backing pages and leave a hole that reads as zero.
    PunchHole,
}

/// `fallocate(2)` on `[offset, offset + len)`.
pub(crate) fn fallocate(
    fd: BorrowedFd<'_>,
    what: Fallocate,
    offset: u64,
    len: u64,
) -> SysResult<()> {
    let mode = match what {
        Fallocate::Allocate => 0,
        Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    };
    // SAFETY: plain syscall on a borrowed, open descriptor.
    let ret = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
    check(ret, "fallocate").map_err(|e| {
        e.arg("mode", mode as u64)
            .arg("offset", offset)
            .arg("len", len)
    })?;
    Ok(())
}

/// The allocated extents of `fd` within `[from, to)`, by
/// `lseek(SEEK_DATA / SEEK_HOLE)`: where the file has memory behind it.
pub(crate) fn data_extents(fd: BorrowedFd<'_>, from: u64, to: u64) -> SysResult<Vec<(u64, u64)>> {
    let seek = |at: u64, whence: libc::c_int, op: &'static str| -> SysResult<Option<u64>> {
        // SAFETY: lseek on an open descriptor only moves its offset.
        let ret = unsafe { libc::lseek(fd.as_raw_fd(), at as libc::off_t, whence) };
        if ret < 0 {
            let e = SysError::last(op).arg("offset", at);
            // ENXIO: no data (or hole) at or after `at`.
            return if e.errno() == Errno::ENXIO {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(ret as u64))
    };
    let mut extents = Vec::new();
    let mut at = from;
    while at < to {
        let Some(start) = seek(at, libc::SEEK_DATA, "lseek(SEEK_DATA)")? else {
            break;
        };
        if start >= to {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE, "lseek(SEEK_HOLE)")?
            .unwrap_or(to)
            .min(to);
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}

/// The file system a descriptor lives on, as far as hugearena cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileSystem {
    /// hugetlbfs (including hugetlb memfds), with its huge page size.
    Hugetlbfs(Option<PageSize>),
    /// tmpfs / shmem (including shmem memfds and `/dev/shm`).
    Tmpfs,
    /// Anything else, by its `f_type` magic.
    Other(i64),
}

/// Identifies the file system of `fd` (`fstatfs(2)`).
pub(crate) fn file_system(fd: BorrowedFd<'_>) -> SysResult<FileSystem> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a valid out pointer for one `statfs`.
    let ret = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    check(ret, "fstatfs")?;
    // SAFETY: fstatfs succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(match st.f_type {
        libc::HUGETLBFS_MAGIC => FileSystem::Hugetlbfs(PageSize::from_bytes(st.f_bsize as u64)),
        libc::TMPFS_MAGIC => FileSystem::Tmpfs,
        other => FileSystem::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn shmem_memfd_sizes_and_punches() {
        let fd = memfd_create("hugearena-test", MemfdKind::Shmem).unwrap();
        set_len(fd.as_fd(), 1 << 20).unwrap();
        assert_eq!(file_len(fd.as_fd()).unwrap(), 1 << 20);
        fallocate(fd.as_fd(), Fallocate::Allocate, 0, 1 << 20).unwrap();
        fallocate(fd.as_fd(), Fallocate::PunchHole, 0, 4096).unwrap();
        assert_eq!(file_system(fd.as_fd()).unwrap(), FileSystem::Tmpfs);
        let mut buf = [1u8; 16];
        let file = std::fs::File::from(fd);
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 16]);
    }

    #[test]
    fn hugetlb_memfd_rejects_base_pages() {
        let err = memfd_create("x", MemfdKind::Hugetlb(PageSize::Base4K)).unwrap_err();
        assert_eq!(err.errno(), Errno::EINVAL);
    }

    #[test]
    fn hugetlb_flag_encodes_log2_size() {
        assert_eq!(huge_flag(PageSize::Huge2M), libc::MFD_HUGE_2MB);
        assert_eq!(huge_flag(PageSize::Huge1G), libc::MFD_HUGE_1GB);
    }
}
