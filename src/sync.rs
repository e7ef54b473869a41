//! The atomics lock-free code is written against, swapped for loom's under
//! `--cfg loom` so the model checker can explore every interleaving.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};

/// A 64-bit atomic word that a lock-free protocol runs on: an `AtomicU64`
/// in shared memory in production, a loom atomic under the model checker.
pub trait AtomicSlot {
    /// Loads the word.
    fn load(&self, order: Ordering) -> u64;
    /// Compare-and-swap; `Err` carries the value found.
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
    /// Stores the word.
    fn store(&self, value: u64, order: Ordering);
    /// Adds to the word (wrapping); returns the previous value.
    fn fetch_add(&self, value: u64, order: Ordering) -> u64;
    /// Subtracts from the word (wrapping); returns the previous value.
    fn fetch_sub(&self, value: u64, order: Ordering) -> u64;
}

impl AtomicSlot for AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }

    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        AtomicU64::compare_exchange(self, current, new, success, failure)
    }

    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }

    fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_add(self, value, order)
    }

    fn fetch_sub(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_sub(self, value, order)
    }
}

/// Under loom, the std atomics of shared memory still need to be slots.
#[cfg(loom)]
impl AtomicSlot for std::sync::atomic::AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::load(self, order)
    }

    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        // loom re-exports std's `Ordering`, so orderings pass through.
        std::sync::atomic::AtomicU64::compare_exchange(self, current, new, success, failure)
    }

    fn store(&self, value: u64, order: Ordering) {
        std::sync::atomic::AtomicU64::store(self, value, order)
    }

    fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::fetch_add(self, value, order)
    }

    fn fetch_sub(&self, value: u64, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::fetch_sub(self, value, order)
    }
}
