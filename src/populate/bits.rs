//! A process-local set of indices in atomic words: any thread (including a
//! signal handler) adds with one `fetch_or`; a consumer takes the whole set
//! word by word with `swap(0)`.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size set of indices `0..len`.
#[derive(Debug)]
pub(crate) struct AtomicBits {
    words: Box<[AtomicU64]>,
}

impl AtomicBits {
    /// An empty set for indices below `len`.
    pub(crate) fn new(len: usize) -> AtomicBits {
        AtomicBits {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds `i` (`Release`: what the caller did before is visible to the
    /// taker).
    pub(crate) fn insert(&self, i: usize) {
        self.words[i / 64].fetch_or(1 << (i % 64), Ordering::Release);
    }

    /// Adds `i`; whether it was absent (`AcqRel`).
    pub(crate) fn insert_new(&self, i: usize) -> bool {
        self.words[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) == 0
    }

    /// Whether `i` is in the set (`Acquire`: what the inserter did before
    /// is visible).
    pub(crate) fn contains(&self, i: usize) -> bool {
        self.words[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Removes `i`.
    pub(crate) fn remove(&self, i: usize) {
        self.words[i / 64].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }

    /// Removes every index and calls `f` on each, in increasing order.
    pub(crate) fn take(&self, mut f: impl FnMut(usize)) {
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                f(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn takes_what_was_inserted_once_in_order() {
        let s = AtomicBits::new(200);
        for i in [130, 3, 64, 3, 199] {
            s.insert(i);
        }
        let mut got = Vec::new();
        s.take(|i| got.push(i));
        assert_eq!(got, vec![3, 64, 130, 199]);
        s.take(|_| panic!("empty after take"));
        assert!(s.insert_new(70) && !s.insert_new(70));
        assert!(s.contains(70) && !s.contains(71));
        s.remove(70);
        assert!(!s.contains(70));
    }
}
