//! The gate between a per-thread cache and the threads that flush it: the
//! owner enters and leaves with plain stores and a compiler fence (no
//! read-modify-write, which costs more than the cache saves), a flusher
//! pays instead, with `membarrier`.
//!
//! # Protocol
//!
//! Words: each cache's `busy` (written by its owner only) and the arena's
//! `flushing` count (flushers in progress, plus one while the arena's
//! caching is off, which keeps owners out the same way).
//!
//! - **Owner enters**: `busy = true` (relaxed); *light fence*; load
//!   `flushing` (acquire). Non-zero: `busy = false` and go without the
//!   cache. Zero: use the cache, then **leave**: `busy = false` (release).
//! - **Flusher**: `flushing += 1`; *heavy fence*; then per cache: wait
//!   until `busy` is false (acquire), take what the cache holds; at the
//!   end `flushing -= 1` (release).
//!
//! Either the flusher sees the owner's `busy = true` (and waits for the
//! release of its leave, after which the cache's contents happen-before
//! the take), or the owner sees `flushing` non-zero and keeps out: a
//! Dekker handshake, which needs a full fence on both sides between the
//! store and the load. The heavy fence is `membarrier(PRIVATE_EXPEDITED)`,
//! which runs a full barrier on every thread of the process, so the
//! owner's light fence is a compiler fence; where `membarrier` is
//! unavailable both are `fence(SeqCst)`. That mode costs the owner's fast
//! path nothing: `flushing` then carries [`FENCED`] for good, so the
//! owner's load is never zero and it takes the slow check, which runs
//! the full fence and loads `flushing` again (only the second load
//! counts).
//!
//! Under loom, which treats `SeqCst` as `AcqRel` and so cannot show a
//! Dekker handshake through fences, the owner's fence is stood in for by
//! a read-modify-write of `flushing` at the same point (`fetch_add(0)`,
//! acquire-release): either it comes after the flusher's increment and
//! reads it, or the flusher's increment reads from it and so sees the
//! owner's `busy = true` — the same either-or `membarrier` guarantees.
//! `--cfg hugearena_mutation_cache` drops the owner's fence, and
//! `arena::loom_model` must then find two threads in one cache.
//!
//! A flusher's wait is short: the owner holds the gate for a few
//! instructions and never blocks inside it.

#![allow(unsafe_code)] // the cache's contents behind the gate

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Contents only the gate's protocol lets two threads reach.
#[cfg(not(loom))]
#[derive(Debug)]
struct Contents<T>(std::cell::UnsafeCell<T>);
#[cfg(loom)]
#[derive(Debug)]
struct Contents<T>(loom::cell::UnsafeCell<T>);

impl<T> Contents<T> {
    fn new(value: T) -> Self {
        #[cfg(not(loom))]
        return Contents(std::cell::UnsafeCell::new(value));
        #[cfg(loom)]
        return Contents(loom::cell::UnsafeCell::new(value));
    }

    /// # Safety
    ///
    /// No other thread reaches the contents until `f` returns.
    unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(not(loom))]
        // SAFETY: the caller's contract.
        return f(unsafe { &mut *self.0.get() });
        #[cfg(loom)]
        // SAFETY: the caller's contract (loom checks it).
        return self.0.with_mut(|p| f(unsafe { &mut *p }));
    }
}

/// One thread's cache behind its gate. Aligned so that two threads'
/// gates never share a cache line (each owner writes `busy` twice per
/// operation).
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Gate<T> {
    /// The owner is inside. See the module's protocol.
    busy: AtomicBool,
    contents: Contents<T>,
}

// SAFETY: the contents are reached by one thread at a time, as the
// protocol orders them; `T: Send` moves between those threads.
unsafe impl<T: Send> Sync for Gate<T> {}

/// The owner inside its gate (from [`Gate::open`]): it leaves when this
/// is dropped.
pub(crate) struct Inside<'a, T> {
    gate: &'a Gate<T>,
    /// The access loom tracks (ended before the gate opens again).
    #[cfg(loom)]
    contents: Option<loom::cell::MutPtr<T>>,
}

impl<T> Inside<'_, T> {
    /// The cache's contents.
    #[inline(always)]
    pub(crate) fn contents(&mut self) -> &mut T {
        #[cfg(not(loom))]
        // SAFETY: a flusher waits for `busy` to clear (the protocol), and
        // the owner holds one guard at a time (`open`'s contract), which
        // this `&mut` borrow keeps unique.
        return unsafe { &mut *self.gate.contents.0.get() };
        #[cfg(loom)]
        // SAFETY: as above; loom checks it.
        return unsafe { self.contents.as_ref().expect("open until dropped").deref() };
    }
}

impl<T> Drop for Inside<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        #[cfg(loom)]
        drop(self.contents.take());
        self.gate.busy.store(false, Ordering::Release);
    }
}

/// The arena-wide count of flushes in progress (plus one while caching is
/// off), with [`FENCED`] set for good where `membarrier` is unavailable:
/// the bit is also how both sides know which fences to use. Made only by
/// [`holding`](Flushing::holding), which sets the bit.
#[derive(Debug)]
pub(crate) struct Flushing(AtomicUsize);

impl<T> Gate<T> {
    pub(crate) fn new(value: T) -> Self {
        Gate {
            busy: AtomicBool::new(false),
            contents: Contents::new(value),
        }
    }

    /// Enters the cache unless a flush is in progress (`None`); the
    /// returned guard leaves when dropped (a guard, not a closure: on the
    /// hot paths the compiler left a closure out of line, costing a call).
    ///
    /// # Safety
    ///
    /// Only the gate's owner thread calls it, and not while it holds
    /// another guard of this gate. The guard must be dropped, not
    /// forgotten (a flusher waits for it).
    #[inline(always)]
    pub(crate) unsafe fn open<'a>(&'a self, flushing: &Flushing) -> Option<Inside<'a, T>> {
        self.busy.store(true, Ordering::Relaxed);
        light_fence(flushing);
        // Acquire: a flush that ended before this load happens-before what
        // follows (its `end` is a release).
        let seen = flushing.0.load(Ordering::Acquire);
        if seen != 0 && !flushing.none_after_full_fence(seen) {
            self.busy.store(false, Ordering::Release);
            return None;
        }
        Some(Inside {
            gate: self,
            #[cfg(loom)]
            contents: Some(self.contents.0.get_mut()),
        })
    }

    /// Runs `f` on the cache once its owner is out; call it between
    /// [`Flushing::begin`] and [`Flushing::end`].
    pub(crate) fn take<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut spins = 0u32;
        while self.busy.load(Ordering::Acquire) {
            spins += 1;
            #[cfg(loom)]
            loom::thread::yield_now();
            #[cfg(not(loom))]
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                // The owner was preempted inside: let it run.
                std::thread::yield_now();
            }
        }
        // SAFETY: the owner is out and, seeing `flushing`, stays out until
        // `end`; flushers are serialized by the caller.
        unsafe { self.contents.with_mut(f) }
    }
}

/// In `flushing` for good where `membarrier` is unavailable (see the
/// module's protocol); never counted.
const FENCED: usize = 1 << (usize::BITS - 1);

impl Flushing {
    /// The owner's check after its fast load found `flushing` non-zero
    /// (`seen`): where `membarrier` is unavailable (`FENCED`), the full
    /// fence the protocol needs and the load that counts; whether no flush
    /// is in progress.
    #[inline]
    fn none_after_full_fence(&self, seen: usize) -> bool {
        if seen & FENCED == 0 {
            return false;
        }
        #[cfg(not(loom))]
        std::sync::atomic::fence(Ordering::SeqCst);
        self.0.load(Ordering::Acquire) == FENCED
    }

    /// Starts a flush: owners keep out of their caches until
    /// [`end`](Self::end). `false` if the heavy fence failed (it cannot
    /// once `membarrier` is registered): then the caches must not be taken
    /// (their objects stay cached, nothing is lost); call `end` still.
    #[must_use]
    pub(crate) fn begin(&self) -> bool {
        let before = self.0.fetch_add(1, Ordering::SeqCst);
        heavy_fence(before & FENCED != 0)
    }

    pub(crate) fn end(&self) {
        self.0.fetch_sub(1, Ordering::Release);
    }

    /// A count of flushes in progress that starts at one if `held` (owners
    /// keep out until the matching [`end`](Self::end)). Call [`init`]
    /// first.
    pub(crate) fn holding(held: bool) -> Self {
        #[cfg(not(loom))]
        let fenced = if fences::membarrier_works() {
            0
        } else {
            FENCED
        };
        #[cfg(loom)]
        let fenced = 0;
        Flushing(AtomicUsize::new(usize::from(held) | fenced))
    }
}

#[cfg(not(loom))]
mod fences {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, compiler_fence, fence};

    /// Whether `membarrier` works in this process (set by `init`).
    static MEMBARRIER: AtomicBool = AtomicBool::new(false);
    /// The process that registered (a forked child registers again).
    static REGISTERED_BY: AtomicU32 = AtomicU32::new(0);

    /// Registers for `membarrier` (once per process; before any cache is
    /// made, so that each [`Flushing`](super::Flushing) reads the mode
    /// once, when it is made, into its `FENCED` bit).
    pub(super) fn init() {
        let pid = std::process::id();
        if REGISTERED_BY.load(Ordering::Acquire) == pid {
            return;
        }
        let works = crate::sys::thread::membarrier_register().is_ok();
        MEMBARRIER.store(works, Ordering::SeqCst);
        REGISTERED_BY.store(pid, Ordering::Release);
    }

    pub(super) fn membarrier_works() -> bool {
        MEMBARRIER.load(Ordering::Acquire)
    }

    /// The owner's fence before its fast load of `flushing`: a compiler
    /// fence (with `membarrier` that is all it needs; without, the load
    /// is never zero and the slow check fences).
    #[inline(always)]
    pub(super) fn light() {
        compiler_fence(Ordering::SeqCst);
    }

    pub(super) fn heavy(fenced: bool) -> bool {
        if !fenced {
            // Owners use compiler fences: only the syscall orders them.
            crate::sys::thread::membarrier_all_threads().is_ok()
        } else {
            fence(Ordering::SeqCst);
            true
        }
    }
}

/// Prepares the fences (registers for `membarrier`).
pub(crate) fn init() {
    #[cfg(not(loom))]
    fences::init();
}

#[inline(always)]
fn light_fence(_flushing: &Flushing) {
    #[cfg(all(not(loom), not(hugearena_mutation_cache)))]
    fences::light();
    #[cfg(all(loom, not(hugearena_mutation_cache)))]
    _flushing.0.fetch_add(0, Ordering::AcqRel);
}

fn heavy_fence(_fenced: bool) -> bool {
    #[cfg(not(loom))]
    return fences::heavy(_fenced);
    #[cfg(loom)]
    {
        fence(Ordering::SeqCst);
        true
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Both fence modes: the owner enters with no flush in progress, keeps
    /// out during one (and while caching is off), and enters again after.
    /// Without `membarrier` the count carries `FENCED`, which the owner's
    /// slow check tells from a flush.
    #[test]
    fn an_owner_keeps_out_exactly_while_a_flush_is_in_progress_in_both_fence_modes() {
        init();
        assert!(fences::membarrier_works(), "membarrier works here");
        for fenced in [0, FENCED] {
            let flushing = Flushing(AtomicUsize::new(fenced));
            let gate = Gate::new(0u32);
            // SAFETY: this thread is the gate's only owner, one guard at
            // a time.
            let enter = || unsafe { gate.open(&flushing) }.map(|mut n| *n.contents() += 1);
            assert_eq!(enter(), Some(()), "{fenced:#x}");
            assert!(flushing.begin());
            assert_eq!(enter(), None, "{fenced:#x}: a flush keeps it out");
            assert_eq!(gate.take(|n| *n), 1);
            flushing.end();
            assert_eq!(enter(), Some(()), "{fenced:#x}");
            let off = Flushing(AtomicUsize::new(1 | fenced));
            // SAFETY: as above.
            assert!(unsafe { gate.open(&off) }.is_none(), "caching off");
        }
    }
}
