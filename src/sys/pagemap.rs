//! `PAGEMAP_SCAN` (Linux 6.7) on `/proc/self/pagemap`: which pages of a
//! range were written since they were last write-protected, re-protecting
//! them in the same walk. With a userfaultfd registered for write-protect
//! faults with `UFFD_FEATURE_WP_ASYNC`, the kernel resolves those faults by
//! itself and only remembers that the page was written.
#![allow(unsafe_code)] // the PAGEMAP_SCAN ioctl

use std::fs::File;
use std::os::fd::AsRawFd;

use super::error::{SysError, SysResult};

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`.
    pub size: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Where the walk stopped (output).
    pub walk_end: u64,
    /// Output array of `PageRegion`.
    pub vec: u64,
    /// Its length.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all match.
    pub category_mask: u64,
    /// Categories of which one must match.
    pub category_anyof_mask: u64,
    /// Categories to report.
    pub return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageRegion {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Categories.
    pub categories: u64,
}

/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages.
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the range uses async write-protect.
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: not write-protected (an unmapped page counts too).
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`: mapped.
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
pub(crate) const PAGEMAP_SCAN: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(b'f', 16, std::mem::size_of::<PmScanArg>());

/// Returns the written, mapped ranges of `[start, end)` of this process and
/// write-protects them again, so the next call reports only later writes.
pub(crate) fn take_written(start: u64, end: u64) -> SysResult<Vec<(u64, u64)>> {
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| {
        SysError::new(
            "open(/proc/self/pagemap)",
            super::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        )
    })?;
    let mut out = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            // Unmapped pages look written; only mapped ones can have been.
            category_mask: PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
        // `vec_len` writable `page_region`s that outlive the call.
        let n = unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                PAGEMAP_SCAN,
                &mut arg as *mut PmScanArg,
            )
        };
        if n < 0 {
            return Err(SysError::last("ioctl(PAGEMAP_SCAN)")
                .arg("start", at)
                .arg("end", end));
        }
        out.extend(regions[..n as usize].iter().map(|r| (r.start, r.end)));
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::general as k;

    // `ioctl_num_type` is u64 on x86_64 but not everywhere: keep the cast.
    #[allow(clippy::unnecessary_cast)]
    #[test]
    fn layout_and_constants_match_the_kernel_headers() {
        assert_eq!(
            std::mem::size_of::<PmScanArg>(),
            std::mem::size_of::<k::pm_scan_arg>()
        );
        assert_eq!(
            std::mem::size_of::<PageRegion>(),
            std::mem::size_of::<k::page_region>()
        );
        assert_eq!(PM_SCAN_WP_MATCHING, u64::from(k::PM_SCAN_WP_MATCHING));
        assert_eq!(PM_SCAN_CHECK_WPASYNC, u64::from(k::PM_SCAN_CHECK_WPASYNC));
        assert_eq!(PAGE_IS_WRITTEN, u64::from(k::PAGE_IS_WRITTEN));
        assert_eq!(PAGE_IS_PRESENT, u64::from(k::PAGE_IS_PRESENT));
        // _IOWR('f', 16, 96 bytes).
        assert_eq!(
            PAGEMAP_SCAN as u64,
            (3 << 30) | (96 << 16) | (0x66 << 8) | 16
        );
    }
}
