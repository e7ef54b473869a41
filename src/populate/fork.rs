//! Forked children.
//!
//! `fork(2)` gives the child the parent's memory but neither its threads
//! nor, without `UFFD_FEATURE_EVENT_FORK`, its userfaultfd registrations:
//! the kernel drops them from the child's copy of the mappings. A child
//! touching an unpopulated page would then get a fresh zero page in the
//! shared file, which every other process would see in place of the
//! source's bytes. (`EVENT_FORK` does not help: it makes `fork` wait until
//! a handler thread reads the event, which the in-thread driver has none
//! of, and resolving the child's faults would need another descriptor per
//! child in the parent.)
//!
//! So a `pthread_atfork` child handler re-arms every populator of the
//! process in the child, before `fork` returns there: a new userfaultfd
//! with the parent's registration plus `UFFD_FEATURE_SIGBUS`, put at the
//! old descriptor's number, so the child resolves its own faults in the
//! faulting thread whatever the parent's driver was. It also counts forks
//! ([`generation`]), so that what belongs to the parent's threads (handler
//! pools, collapse and drain threads, the arena's thread caches, whose
//! locks a vanished thread may hold) is left alone in the child instead of
//! being stopped, joined or flushed there.
#![allow(unsafe_code)] // `pthread_atfork`, and calling the re-arm routines from the table

use std::sync::Once;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How many populators one process can have at once.
pub(crate) const CAPACITY: usize = 256;

/// Forks this process descends from since it loaded the library: 0 in the
/// original process, incremented in each child.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The number of forks between the original process and this one.
#[inline]
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// Re-arms the populator behind `ctx` in a freshly forked child: called
/// with no other thread running, before `fork` returns.
pub(crate) type Rearm = unsafe fn(ctx: *const ());

// # Protocol of an entry's state word
//
//   FREE ──claim (CAS 0→CLAIMED)──▶ CLAIMED ──publish (store, Release)──▶ LIVE
//     ▲                                                                    │
//     └──────────────────────── free (store 0, Release) ◀──────────────────┘
//
// Only the child handler reads the table, in a child where no other thread
// runs: it sees the parent's memory as of the fork. An entry it sees LIVE
// had its fields written before (Release), and its populator had not yet
// begun to drop (a populator frees its entry before releasing its core).
const FREE: usize = 0;
const CLAIMED: usize = 1;
const LIVE: usize = 2;

struct Entry {
    state: AtomicUsize,
    ctx: AtomicUsize,
    rearm: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry {
    state: AtomicUsize::new(FREE),
    ctx: AtomicUsize::new(0),
    rearm: AtomicUsize::new(0),
};

static TABLE: [Entry; CAPACITY] = [EMPTY; CAPACITY];

/// A populator known to the child handler; forgotten on drop.
#[derive(Debug)]
pub(crate) struct Watch {
    slot: usize,
}

/// Installs the child handler (once per process).
pub(crate) fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: `in_child` is an `extern "C" fn()` that lives as long as
        // the program; pthread_atfork only stores the pointers. It fails
        // only with ENOMEM, and then forked children keep the documented
        // behaviour of a process without populators (nothing re-armed).
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
}

/// Makes the child handler call `rearm(ctx)` in every child forked while
/// the returned watch lives; `None` if the table is full.
///
/// # Safety
///
/// `ctx` must stay valid until the watch is dropped, and `rearm` must only
/// make system calls and touch memory reachable from `ctx` without taking
/// locks (other threads' locks are frozen in the child).
pub(crate) unsafe fn watch(ctx: *const (), rearm: Rearm) -> Option<Watch> {
    install();
    TABLE.iter().enumerate().find_map(|(slot, entry)| {
        entry
            .state
            .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        entry.ctx.store(ctx as usize, Ordering::Relaxed);
        entry.rearm.store(rearm as usize, Ordering::Relaxed);
        entry.state.store(LIVE, Ordering::Release);
        Some(Watch { slot })
    })
}

impl Drop for Watch {
    fn drop(&mut self) {
        TABLE[self.slot].state.store(FREE, Ordering::Release);
    }
}

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    super::signal::after_fork();
    crate::arena::cache::after_fork();
    for entry in &TABLE {
        if entry.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let ctx = entry.ctx.load(Ordering::Relaxed) as *const ();
        // SAFETY: a `Rearm` was stored before the entry was published.
        let rearm: Rearm =
            unsafe { std::mem::transmute::<usize, Rearm>(entry.rearm.load(Ordering::Relaxed)) };
        // SAFETY: the entry is live, so `ctx` is (`watch`'s contract).
        unsafe { rearm(ctx) };
    }
}
