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
}
