//! Page sizes and page-aligned byte counts: invariants the rest of the
//! crate can rely on without re-checking.

use std::fmt;

/// A page size the kernel maps with one page-table entry on x86_64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, one PTE.
    Base4K,
    /// 2 MiB, one PMD.
    Huge2M,
    /// 1 GiB, one PUD.
    Huge1G,
}

impl PageSize {
    /// Every page size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Base4K, PageSize::Huge2M, PageSize::Huge1G];

    /// The size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            PageSize::Base4K => 4 << 10,
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
        }
    }

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        self.bytes().trailing_zeros()
    }

    /// The page size of exactly `bytes` bytes, if there is one.
    pub fn from_bytes(bytes: u64) -> Option<PageSize> {
        Self::ALL.into_iter().find(|p| p.bytes() as u64 == bytes)
    }

    /// The size in KiB, as sysfs names it (`hugepages-2048kB`).
    pub const fn kib(self) -> usize {
        self.bytes() >> 10
    }

    /// Rounds `n` up to a multiple of this page size, or `None` on overflow.
    pub const fn round_up(self, n: usize) -> Option<usize> {
        match n.checked_add(self.bytes() - 1) {
            Some(v) => Some(v & !(self.bytes() - 1)),
            None => None,
        }
    }

    /// Whether `n` is a multiple of this page size.
    pub const fn divides(self, n: usize) -> bool {
        n & (self.bytes() - 1) == 0
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageSize::Base4K => f.write_str("4 KiB"),
            PageSize::Huge2M => f.write_str("2 MiB"),
            PageSize::Huge1G => f.write_str("1 GiB"),
        }
    }
}

/// A non-zero byte count that is a multiple of a page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageAligned {
    bytes: usize,
    page: PageSize,
}

impl PageAligned {
    /// `bytes` if it is non-zero and a multiple of `page`.
    pub(crate) const fn new(bytes: usize, page: PageSize) -> Option<Self> {
        if bytes == 0 || !page.divides(bytes) {
            None
        } else {
            Some(PageAligned { bytes, page })
        }
    }

    /// The byte count.
    pub(crate) const fn bytes(self) -> usize {
        self.bytes
    }

    /// The page size it is a multiple of.
    pub(crate) const fn page(self) -> PageSize {
        self.page
    }

    /// How many pages it spans.
    pub(crate) const fn pages(self) -> usize {
        self.bytes >> self.page.shift()
    }
}

/// Formats a byte count with a binary unit, e.g. `64 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut scaled = n as f64;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if scaled.fract() == 0.0 {
        format!("{} {}", scaled as u64, UNITS[unit])
    } else {
        format!("{scaled:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rounding() {
        assert_eq!(PageSize::Huge2M.bytes(), 2 * 1024 * 1024);
        assert_eq!(PageSize::Huge1G.shift(), 30);
        assert_eq!(PageSize::Base4K.round_up(1), Some(4096));
        assert_eq!(PageSize::Base4K.round_up(4096), Some(4096));
        assert_eq!(PageSize::Huge2M.round_up(usize::MAX), None);
        assert_eq!(PageSize::from_bytes(1 << 30), Some(PageSize::Huge1G));
        assert_eq!(PageSize::from_bytes(12345), None);
    }

    #[test]
    fn aligned_lengths_reject_zero_and_partial_pages() {
        assert!(PageAligned::new(0, PageSize::Base4K).is_none());
        assert!(PageAligned::new(4097, PageSize::Base4K).is_none());
        let len = PageAligned::new(4 << 20, PageSize::Huge2M).unwrap();
        assert_eq!(len.pages(), 2);
    }

    #[test]
    fn human_readable_sizes() {
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(3 << 30), "3 GiB");
    }
}
