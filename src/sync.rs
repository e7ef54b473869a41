//! The atomics lock-free code is written against, swapped for loom's under
//! `--cfg loom` so the model checker can explore every interleaving.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};

/// A 64-bit atomic word that a lock-free protocol runs on: an `AtomicU64`
/// in shared memory in production, a loom atomic under the model checker.
pub(crate) trait AtomicSlot {
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
    /// Subtracts from the word (wrapping); returns the previous value.
    fn fetch_sub(&self, value: u64, order: Ordering) -> u64;
    /// Sets bits; returns the previous value.
    fn fetch_or(&self, value: u64, order: Ordering) -> u64;
    /// Keeps only the bits of `value`; returns the previous value.
    fn fetch_and(&self, value: u64, order: Ordering) -> u64;
}

/// Forwards every `AtomicSlot` method to the inherent method of `$t`.
macro_rules! atomic_slot_for {
    ($t:ty) => {
        impl AtomicSlot for $t {
            #[inline]
            fn load(&self, order: Ordering) -> u64 {
                <$t>::load(self, order)
            }

            #[inline]
            fn compare_exchange(
                &self,
                current: u64,
                new: u64,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u64, u64> {
                <$t>::compare_exchange(self, current, new, success, failure)
            }

            #[inline]
            fn store(&self, value: u64, order: Ordering) {
                <$t>::store(self, value, order)
            }

            #[inline]
            fn fetch_sub(&self, value: u64, order: Ordering) -> u64 {
                <$t>::fetch_sub(self, value, order)
            }

            #[inline]
            fn fetch_or(&self, value: u64, order: Ordering) -> u64 {
                <$t>::fetch_or(self, value, order)
            }

            #[inline]
            fn fetch_and(&self, value: u64, order: Ordering) -> u64 {
                <$t>::fetch_and(self, value, order)
            }
        }
    };
}

atomic_slot_for!(AtomicU64);

// Under loom, the std atomics of shared memory still need to be slots
// (loom re-exports std's `Ordering`, so orderings pass through).
#[cfg(loom)]
atomic_slot_for!(std::sync::atomic::AtomicU64);
