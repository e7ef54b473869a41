//! Virtual memory: reserving address ranges, placing shared file mappings
//! inside them at chosen offsets, and `madvise(2)`.
//!
//! A [`Reservation`] owns a range of address space (mapped `PROT_NONE`, so
//! nothing else lands there). [`Reservation::place_shared`] then replaces
//! parts of it with `MAP_SHARED` mappings of a file, which is how a region
//! lays out its metadata, primary and alias views side by side.
#![allow(unsafe_code)] // system calls

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use super::error::{Errno, SysError, SysResult, check};
use super::size::PageSize;

/// `madvise(2)` advice that hugearena uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Advice {
    /// `MADV_SPLIT` (26, HugeTLB high-granularity mapping; never merged
    /// upstream): allow 4 KiB mappings inside a shared hugetlb VMA.
    Split,
    /// `MADV_COLLAPSE` (25): map a range with huge pages now, synchronously.
    Collapse,
    /// `MADV_HUGEPAGE` (14): allow transparent huge pages here.
    HugePage,
    /// `MADV_NOHUGEPAGE` (15): never use transparent huge pages here.
    NoHugePage,
    /// `MADV_DONTNEED` (4): drop this mapping's page-table entries.
    DontNeed,
    /// `MADV_POPULATE_WRITE` (23, Linux 5.14): allocate and map the range
    /// writable now; `EFAULT` where a touch would have raised SIGBUS.
    PopulateWrite,
}

impl Advice {
    /// `MADV_SPLIT` from the HGM patch series (x86_64; 74 on parisc).
    pub(crate) const MADV_SPLIT: libc::c_int = 26;
    /// `MADV_COLLAPSE`, Linux 6.1.
    pub(crate) const MADV_COLLAPSE: libc::c_int = 25;
    /// `MADV_POPULATE_WRITE`, Linux 5.14.
    pub(crate) const MADV_POPULATE_WRITE: libc::c_int = 23;

    /// The raw advice number.
    pub(crate) const fn raw(self) -> libc::c_int {
        match self {
            Advice::Split => Self::MADV_SPLIT,
            Advice::Collapse => Self::MADV_COLLAPSE,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::PopulateWrite => Self::MADV_POPULATE_WRITE,
        }
    }

    /// The kernel's name for the advice, for error messages.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Advice::Split => "madvise(MADV_SPLIT)",
            Advice::Collapse => "madvise(MADV_COLLAPSE)",
            Advice::HugePage => "madvise(MADV_HUGEPAGE)",
            Advice::NoHugePage => "madvise(MADV_NOHUGEPAGE)",
            Advice::DontNeed => "madvise(MADV_DONTNEED)",
            Advice::PopulateWrite => "madvise(MADV_POPULATE_WRITE)",
        }
    }
}

/// Applies `advice` to `[addr, addr + len)`.
///
/// # Safety
///
/// The range must lie within mappings the caller owns. `Remove` and
/// `DontNeed` discard contents: no live reference may rely on the bytes in
/// the range. `Collapse` and `PopulateWrite` may fault pages in (and so may
/// trigger userfaultfd events that someone must resolve).
pub(crate) unsafe fn madvise(addr: *mut u8, len: usize, advice: Advice) -> SysResult<()> {
    // SAFETY: the caller guarantees the range is owned and that the advice's
    // effect on its contents is acceptable.
    let ret = unsafe { libc::madvise(addr.cast(), len, advice.raw()) };
    check(ret, advice.name()).map_err(|e| e.arg("addr", addr as u64).arg("len", len as u64))?;
    Ok(())
}

/// Makes `[addr, addr + len)` inaccessible (`mprotect(PROT_NONE)`): any
/// access faults with SIGSEGV.
///
/// # Safety
///
/// The range must lie within mappings the caller owns, and no live
/// reference may point into it.
pub(crate) unsafe fn protect_none(addr: *mut u8, len: usize) -> SysResult<()> {
    // SAFETY: the caller owns the range and holds no reference into it.
    let ret = unsafe { libc::mprotect(addr.cast(), len, libc::PROT_NONE) };
    check(ret, "mprotect(PROT_NONE)")
        .map_err(|e| e.arg("addr", addr as u64).arg("len", len as u64))?;
    Ok(())
}

/// Memory protection of a placed mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protection {
    /// Readable and writable.
    ReadWrite,
}

impl Protection {
    fn raw(self) -> libc::c_int {
        match self {
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// A range of address space owned by this process, aligned to a page size.
///
/// Created `PROT_NONE` and unreserved; parts are replaced by shared file
/// mappings with [`Reservation::place_shared`]. Dropping it unmaps the whole
/// range, placed mappings included. [`Reservation::unmap`] does the same and
/// reports failure.
#[derive(Debug)]
pub(crate) struct Reservation {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a Reservation is an address range; moving its ownership to another
// thread moves no thread-bound state.
unsafe impl Send for Reservation {}
// SAFETY: `&Reservation` only hands out addresses; placing mappings goes
// through `&self` but each call is one atomic syscall over disjoint,
// caller-chosen ranges.
unsafe impl Sync for Reservation {}

impl Reservation {
    /// Reserves `len` bytes of address space aligned to `align`.
    pub(crate) fn new(len: usize, align: PageSize) -> SysResult<Reservation> {
        if len == 0 || !PageSize::Base4K.divides(len) {
            return Err(SysError::new("reserve", Errno::EINVAL).arg("len", len as u64));
        }
        // Over-reserve by one alignment unit, then trim both ends.
        let extra = align.bytes() - PageSize::Base4K.bytes();
        let total = len
            .checked_add(extra)
            .ok_or_else(|| SysError::new("reserve", Errno::ENOMEM).arg("len", len as u64))?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at a kernel-chosen
        // address overlaps nothing we own.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(SysError::last("mmap(PROT_NONE reservation)").arg("len", total as u64));
        }
        let start = raw as usize;
        let aligned = (start + align.bytes() - 1) & !(align.bytes() - 1);
        let head = aligned - start;
        let tail = total - head - len;
        // SAFETY: both trims lie inside the mapping created above and are
        // page aligned; nothing references them.
        unsafe {
            if head > 0 {
                check(libc::munmap(raw, head), "munmap(reservation head)")?;
            }
            if tail > 0 {
                check(
                    libc::munmap((aligned + len) as *mut libc::c_void, tail),
                    "munmap(reservation tail)",
                )?;
            }
        }
        Ok(Reservation {
            base: NonNull::new(aligned as *mut u8).expect("mmap never returns address 0 here"),
            len,
        })
    }

    /// The length of the range.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Maps `len` bytes of `fd` starting at `file_offset` with `MAP_SHARED`
    /// at `offset` bytes into the reservation, replacing what was there.
    ///
    /// `extra_flags` may add `MAP_NORESERVE` or `MAP_POPULATE`.
    ///
    /// # Safety
    ///
    /// Whatever was mapped at `[offset, offset + len)` before is gone: no
    /// live reference may point into it.
    pub(crate) unsafe fn place_shared(
        &self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        prot: Protection,
        extra_flags: libc::c_int,
    ) -> SysResult<NonNull<u8>> {
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len && len > 0);
        if !inside {
            return Err(SysError::new("place_shared", Errno::EINVAL)
                .arg("offset", offset as u64)
                .arg("len", len as u64)
                .arg("reservation_len", self.len as u64));
        }
        // SAFETY: `offset` is within the reservation (checked above).
        let addr = unsafe { self.base.as_ptr().add(offset) };
        // SAFETY: MAP_FIXED replaces only `[addr, addr + len)`, which lies in
        // the reservation we own; the caller guarantees nothing references
        // the old contents.
        let raw = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                prot.raw(),
                libc::MAP_SHARED | libc::MAP_FIXED | extra_flags,
                fd.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(SysError::last("mmap(MAP_SHARED|MAP_FIXED)")
                .arg("addr", addr as u64)
                .arg("len", len as u64)
                .arg("file_offset", file_offset));
        }
        Ok(NonNull::new(raw.cast()).expect("MAP_FIXED returns the requested address"))
    }

    fn munmap(&self) -> SysResult<()> {
        // SAFETY: the range is owned by this reservation and is released
        // exactly once (by `unmap` or `drop`).
        let ret = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        check(ret, "munmap").map(drop).map_err(|e| {
            e.arg("addr", self.base.as_ptr() as u64)
                .arg("len", self.len as u64)
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Err(e) = self.munmap() {
            // Leaking address space is survivable; pretending it worked is not.
            eprintln!("hugearena: leaking a reservation: {e}");
            debug_assert!(false, "munmap of an owned reservation failed: {e}");
        }
    }
}

/// Private words that read as zero until written: anonymous memory the
/// kernel allocates page by page on first touch (`MAP_NORESERVE`), so a
/// large table costs nothing until it is used and a size the system cannot
/// hold is an error rather than an abort. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct ZeroedWords {
    base: NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the words are atomics owned by this value; sharing or moving the
// mapping between threads moves no thread-bound state.
unsafe impl Send for ZeroedWords {}
// SAFETY: as above: every access goes through `AtomicU64`.
unsafe impl Sync for ZeroedWords {}

impl ZeroedWords {
    /// `len` zero words.
    pub(crate) fn new(len: usize) -> SysResult<ZeroedWords> {
        let bytes = len.checked_mul(8).filter(|&b| b > 0).unwrap_or(8);
        // SAFETY: a fresh private mapping at a kernel-chosen address
        // overlaps nothing we own.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(SysError::last("mmap(MAP_ANONYMOUS)").arg("len", bytes as u64));
        }
        Ok(ZeroedWords {
            base: NonNull::new(raw.cast()).expect("mmap returns a non-null address"),
            len,
        })
    }

    /// The words.
    pub(crate) fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping holds `len` 8-byte-aligned words, zero (a
        // valid `AtomicU64`) or written through these atomics, and lives
        // as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }
}

impl Drop for ZeroedWords {
    fn drop(&mut self) {
        let bytes = (self.len * 8).max(8);
        // SAFETY: the mapping is ours and nothing borrows it any more.
        let _ = unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
    }
}

/// Maps `len` bytes of `fd` `MAP_SHARED | MAP_NORESERVE` at a kernel-chosen
/// address for a short-lived experiment (the kernel probe). Unmapped on drop.
pub(crate) fn map_probe(fd: BorrowedFd<'_>, len: usize) -> SysResult<ProbeMapping> {
    // SAFETY: a fresh shared mapping at a kernel-chosen address overlaps
    // nothing we own.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(SysError::last("mmap(MAP_SHARED|MAP_NORESERVE)").arg("len", len as u64));
    }
    Ok(ProbeMapping {
        addr: raw.cast(),
        len,
    })
}

/// A mapping made by [`map_probe`].
#[derive(Debug)]
pub(crate) struct ProbeMapping {
    addr: *mut u8,
    len: usize,
}

impl ProbeMapping {
    /// The first byte.
    pub(crate) fn addr(&self) -> *mut u8 {
        self.addr
    }
}

impl Drop for ProbeMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is owned by this value and unmapped once.
        let ret = unsafe { libc::munmap(self.addr.cast(), self.len) };
        if ret != 0 {
            eprintln!(
                "hugearena: munmap of a probe mapping failed: {}",
                Errno::last()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::memfd::{MemfdKind, memfd_create, set_len};
    use std::os::fd::AsFd;

    #[test]
    fn reservation_is_aligned_and_places_two_views_of_one_file() {
        let fd = memfd_create("mman-test", MemfdKind::Shmem).unwrap();
        set_len(fd.as_fd(), 1 << 20).unwrap();
        let res = Reservation::new(4 << 20, PageSize::Huge2M).unwrap();

        // SAFETY: the reservation is fresh; nothing references it.
        let (a, b) = unsafe {
            (
                res.place_shared(0, 1 << 20, fd.as_fd(), 0, Protection::ReadWrite, 0)
                    .unwrap(),
                res.place_shared(2 << 20, 1 << 20, fd.as_fd(), 0, Protection::ReadWrite, 0)
                    .unwrap(),
            )
        };
        // SAFETY: both views map the same 1 MiB file, in bounds.
        unsafe {
            a.as_ptr().add(12345).write_volatile(0xA5);
            assert_eq!(b.as_ptr().add(12345).read_volatile(), 0xA5);
        }
        assert!(PageSize::Huge2M.divides(a.as_ptr() as usize));
        drop(res);
    }

    #[test]
    fn placement_outside_the_reservation_is_refused() {
        let fd = memfd_create("mman-test", MemfdKind::Shmem).unwrap();
        let res = Reservation::new(1 << 20, PageSize::Base4K).unwrap();
        // SAFETY: the placement is refused before anything is mapped.
        let err = unsafe {
            res.place_shared(1 << 20, 4096, fd.as_fd(), 0, Protection::ReadWrite, 0)
                .unwrap_err()
        };
        assert_eq!(err.errno(), Errno::EINVAL);
    }

    #[test]
    fn split_is_not_a_mainline_advice_on_shmem() {
        let fd = memfd_create("mman-test", MemfdKind::Shmem).unwrap();
        set_len(fd.as_fd(), 2 << 20).unwrap();
        let m = map_probe(fd.as_fd(), 2 << 20).unwrap();
        // SAFETY: the mapping is owned here; MADV_SPLIT changes no contents.
        let err = unsafe { madvise(m.addr(), 2 << 20, Advice::Split).unwrap_err() };
        assert_eq!(err.errno(), Errno::EINVAL);
    }
}
