//! The in-thread driver's process-wide side: a fixed table of registered
//! ranges that the SIGBUS handler searches, so that the faulting thread
//! resolves its own fault (`UFFD_FEATURE_SIGBUS`), and chains to the
//! previous handler for every address that is not in the table.
//!
//! Everything the handler does is async-signal-safe: atomics, system calls
//! and the populator's resolve routine (which allocates nothing and takes
//! no lock). The table is static, so the handler never follows a pointer
//! that registration could free under it: an entry's resolver is only
//! called between a successful [`enter`] and the matching [`exit`], and
//! unregistering waits for those to drain.
#![allow(unsafe_code)] // reading the resolver out of an entry and calling it

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

use crate::sync::{AtomicSlot, Ordering};
use crate::sys::signal::{self as sig, SigInfoHandler};
use crate::sys::{Errno, SysError, SysResult};

/// How many populators of one process can use the in-thread driver at once.
pub(crate) const CAPACITY: usize = 64;

// # Protocol of an entry's state word
//
// ```text
//          claim (CAS 0→CLAIMED)       publish (store, Release)
//   FREE ────────────────────▶ CLAIMED ────────────────────▶ LIVE | n
//    ▲                                                        │   ▲ enter: CAS n→n+1 (Acquire),
//    │ free (store 0, Release)                                │   │ only while LIVE is set
//    │                                                        │   │ exit: fetch_sub 1 (Release)
//    └──────── RETIRING | 0 ◀── wait for n = 0 ◀── RETIRING | n ◀┘ begin_retire (CAS, clears LIVE)
// ```
//
// - The registrant writes the entry's range and resolver between `claim`
//   and `publish`; `publish` releases them, and `enter` acquires them.
// - `n` counts handlers inside the entry. A handler enters only while LIVE
//   is set, so after `begin_retire` no new handler can enter, and once `n`
//   drains to 0 nobody uses the resolver: `free` may let the slot be
//   reused and the populator be dropped.

/// A registrant is filling in the entry.
pub(crate) const CLAIMED: u64 = 1 << 63;
/// The entry is published; the low bits count handlers inside.
pub(crate) const LIVE: u64 = 1 << 62;
/// The entry is being unregistered; the low bits count handlers inside.
pub(crate) const RETIRING: u64 = 1 << 61;

/// Takes a free entry for registration.
pub(crate) fn claim(state: &impl AtomicSlot) -> bool {
    state
        .compare_exchange(0, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Publishes a claimed entry whose fields are written.
pub(crate) fn publish(state: &impl AtomicSlot) {
    state.store(LIVE, Ordering::Release);
}

/// Enters a live entry; `false` if it is not live.
pub(crate) fn enter(state: &impl AtomicSlot) -> bool {
    let mut word = state.load(Ordering::Acquire);
    loop {
        if word & LIVE == 0 {
            return false;
        }
        match state.compare_exchange(word, word + 1, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return true,
            Err(found) => word = found,
        }
    }
}

/// Ordering of [`exit`]. `--cfg hugearena_mutation` weakens it on purpose
/// so CI can check that the loom tests notice.
#[cfg(not(hugearena_mutation))]
const EXIT: Ordering = Ordering::Release;
#[cfg(hugearena_mutation)]
const EXIT: Ordering = Ordering::Relaxed;

/// Leaves an entry entered with [`enter`] (`Release`: the handler's uses
/// of the entry happen before the retiring thread's [`drained`]).
pub(crate) fn exit(state: &impl AtomicSlot) {
    state.fetch_sub(1, EXIT);
}

/// Stops new handlers from entering; the caller owns the entry.
pub(crate) fn begin_retire(state: &impl AtomicSlot) {
    let mut word = state.load(Ordering::Relaxed);
    loop {
        let retiring = (word & !LIVE) | RETIRING;
        match state.compare_exchange(word, retiring, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(found) => word = found,
        }
    }
}

/// Whether every handler has left a retiring entry (`Acquire`: their uses
/// of the entry happen before whatever the caller does next).
pub(crate) fn drained(state: &impl AtomicSlot) -> bool {
    state.load(Ordering::Acquire) == RETIRING
}

/// Returns a drained entry to the free pool.
pub(crate) fn free(state: &impl AtomicSlot) {
    state.store(0, Ordering::Release);
}

/// Resolves a fault at `addr` for the populator behind `ctx`; `false` if
/// the fault cannot be resolved (a poisoned page) and must be chained.
pub(crate) type Resolver = unsafe fn(ctx: *const (), addr: usize) -> bool;

struct Entry {
    state: std::sync::atomic::AtomicU64,
    start: AtomicUsize,
    end: AtomicUsize,
    ctx: AtomicUsize,
    resolver: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry {
    state: std::sync::atomic::AtomicU64::new(0),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    ctx: AtomicUsize::new(0),
    resolver: AtomicUsize::new(0),
};

static TABLE: [Entry; CAPACITY] = [EMPTY; CAPACITY];

/// A registered range; unregisters (waiting for handlers inside it) on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    slot: usize,
}

/// Registers `[start, end)` so that SIGBUS faults in it call `resolver`
/// with `ctx`, installing the process's SIGBUS handler on first use.
///
/// # Safety
///
/// `ctx` must stay valid for `resolver` until the returned registration is
/// dropped, and `resolver` must be async-signal-safe.
pub(crate) unsafe fn register(
    start: usize,
    end: usize,
    ctx: *const (),
    resolver: Resolver,
) -> SysResult<Registration> {
    sig::install_sigbus(on_sigbus as SigInfoHandler)?;
    for (slot, entry) in TABLE.iter().enumerate() {
        if claim(&entry.state) {
            entry.start.store(start, StdOrdering::Relaxed);
            entry.end.store(end, StdOrdering::Relaxed);
            entry.ctx.store(ctx as usize, StdOrdering::Relaxed);
            entry
                .resolver
                .store(resolver as usize, StdOrdering::Relaxed);
            publish(&entry.state);
            return Ok(Registration { slot });
        }
    }
    Err(
        SysError::new("registering an in-thread populator", Errno::ENOSPC)
            .arg("capacity", CAPACITY as u64),
    )
}

impl Registration {
    /// Keeps the entry registered past this value's life; [`from_slot`]
    /// gets it back.
    ///
    /// [`from_slot`]: Registration::from_slot
    pub(crate) fn into_slot(self) -> usize {
        let slot = self.slot;
        std::mem::forget(self);
        slot
    }

    /// The registration [`into_slot`](Registration::into_slot) returned
    /// `slot` for.
    ///
    /// # Safety
    ///
    /// `slot` must come from `into_slot`, once.
    pub(crate) unsafe fn from_slot(slot: usize) -> Registration {
        Registration { slot }
    }
}

/// In a freshly forked child, where only the forking thread runs: handlers
/// the parent's other threads were inside are not in the child, so no
/// entry counts any (else unregistering would wait for them forever).
pub(crate) fn after_fork() {
    for entry in &TABLE {
        let word = entry.state.load(StdOrdering::Relaxed);
        if word & (LIVE | RETIRING) != 0 {
            entry
                .state
                .store(word & (LIVE | RETIRING), StdOrdering::Relaxed);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let state = &TABLE[self.slot].state;
        begin_retire(state);
        // Handlers inside are resolving one fault each: a few microseconds,
        // or one fill from the source.
        while !drained(state) {
            std::thread::yield_now();
        }
        free(state);
    }
}

/// Looks the address up and resolves it, or chains.
extern "C" fn on_sigbus(signo: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // A handler must leave errno as it found it.
    let saved_errno = Errno::last_raw();
    // SAFETY: the kernel passes the SIGBUS siginfo.
    let addr = unsafe { sig::fault_address(info) };
    for entry in &TABLE {
        if !enter(&entry.state) {
            continue;
        }
        let resolved = (entry.start.load(StdOrdering::Relaxed)
            ..entry.end.load(StdOrdering::Relaxed))
            .contains(&addr)
            .then(|| {
                let ctx = entry.ctx.load(StdOrdering::Relaxed) as *const ();
                // SAFETY: the registrant stored a `Resolver` here before
                // publishing, and `enter` acquired that store.
                let resolver: Resolver = unsafe {
                    std::mem::transmute::<usize, Resolver>(
                        entry.resolver.load(StdOrdering::Relaxed),
                    )
                };
                // SAFETY: the entry is entered, so `ctx` is still valid
                // (registration's contract).
                unsafe { resolver(ctx, addr) }
            });
        exit(&entry.state);
        match resolved {
            Some(true) => {
                Errno::set_raw(saved_errno);
                return;
            }
            // Ours but unresolvable (poisoned): the previous handler decides.
            Some(false) => break,
            None => continue,
        }
    }
    Errno::set_raw(saved_errno);
    // SAFETY: called from the SIGBUS handler with its own arguments.
    unsafe { sig::chain_sigbus(signo, info, uctx) };
}
