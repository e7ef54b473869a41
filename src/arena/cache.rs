//! Per-thread caches of free small objects: a free records the object in
//! the thread's bin for its class, an allocation takes it back, and
//! neither touches a word another thread writes. Objects in a cache stay
//! reserved in the shared tables (they count as in use) until the cache is
//! flushed.
//!
//! The bins live in the arena's shared tables, in a slot of the cache
//! ledger (`ledger`) that the thread's process holds: what a process held
//! when it was killed is found there and given back by the next process
//! that notices it is gone (`Arena::reclaim_dead_caches`).
//!
//! Each thread has one cache per arena, behind a [`Gate`]: its thread
//! enters it with plain stores and a compiler fence (no atomic
//! read-modify-write on the hot path), and a flush
//! (`Arena::flush_thread_caches`, a snapshot, `audit`, the arena's drop)
//! waits at the gate to empty it. The arena keeps every cache it handed
//! out; the cache of a thread that exited goes, objects and all, to the
//! next thread that needs one.
//!
//! A cached object is marked free in the shared object bitmap when it is
//! freed (so a second free of it fails in any thread or process); what
//! the cache keeps is the span reservation, which stops the span from
//! being retired, and the object's offset as a hint. An allocation from
//! the cache reclaims the hint's bit, or any clear bit of the same span if
//! another reservation took that one (a reservation always has a clear
//! bit to claim).

use std::cell::{Cell as CopyCell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::gate::{self, Flushing, Gate};
use super::ledger;
use crate::populate::fork;
use crate::populate::state::Owner;

/// One thread's cache for one arena: the ledger slot its bins are in.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    slot: usize,
}

type Cell = Arc<Gate<ThreadCache>>;

/// The caches of one arena.
#[derive(Debug)]
pub(crate) struct Caches {
    id: u64,
    /// The fork generation the caches belong to: in a forked child they
    /// are the parent's (their objects are the parent's to reuse, and a
    /// vanished parent thread may hold a cache's lock), so the child
    /// allocates and frees without caches.
    generation: u64,
    enabled: AtomicBool,
    /// This process as a ledger holder; `None` (no caches) if its start
    /// time could not be read.
    me: Option<Owner>,
    /// Flushes in progress (the gates' protocol).
    flushing: Flushing,
    /// Every cache handed out; its lock also serializes flushes.
    cells: Mutex<Vec<Cell>>,
}

/// This thread's caches, by arena id (`None`: the ledger had no slot).
struct Local(Vec<(u64, Option<Cell>)>);

impl Drop for Local {
    fn drop(&mut self) {
        // Before the gates go: `LAST` must never point at a dropped one.
        LAST.with(|last| last.set(NO_LAST));
    }
}

const NO_LAST: (u64, *const Gate<ThreadCache>) = (0, std::ptr::null());

thread_local! {
    static LOCAL: RefCell<Local> = const { RefCell::new(Local(Vec::new())) };
    /// The entry of `LOCAL` this thread used last, as (arena id, gate):
    /// one thread-local load on the hot path instead of a lookup. `LOCAL`
    /// keeps the gate alive and clears this before dropping its gates;
    /// arena ids are never reused, so the entry of an arena that is gone
    /// is never looked up. No destructor: usable from other thread-local
    /// destructors, after `LOCAL` is gone.
    static LAST: CopyCell<(u64, *const Gate<ThreadCache>)> = const { CopyCell::new(NO_LAST) };
}

impl Caches {
    pub(crate) fn new(enabled: bool) -> Caches {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Caches {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: {
                fork::install();
                fork::generation()
            },
            enabled: AtomicBool::new(enabled),
            me: Owner::current().ok(),
            flushing: {
                gate::init();
                Flushing::default()
            },
            cells: Mutex::new(Vec::new()),
        }
    }

    /// The arena's process-local id (keys thread-local state).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// This process as a ledger holder.
    pub(crate) fn me(&self) -> Option<Owner> {
        self.me
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
            && self.me.is_some()
            && self.generation == fork::generation()
    }

    /// Runs `f` on this thread's ledger slot, if caching is on, the
    /// thread has a slot and no flush is in progress.
    #[allow(unsafe_code)] // entering the thread's own gate
    fn with_local<R>(&self, ledger: &[AtomicU64], f: impl FnOnce(&[AtomicU64]) -> R) -> Option<R> {
        if !self.enabled() {
            return None;
        }
        let (id, last) = LAST.with(CopyCell::get);
        let gate = if id == self.id && !last.is_null() {
            last
        } else {
            self.look_up(ledger)?
        };
        // SAFETY: `gate` comes from this thread's `LAST` or `LOCAL`, whose
        // `Arc` keeps it alive (`LAST` is cleared before `LOCAL` drops
        // it), and `f` touches neither.
        let gate = unsafe { &*gate };
        // SAFETY: the gate is this thread's own (handed to it by `acquire`
        // and kept in its `LOCAL`): it has one owner.
        unsafe { gate.enter(&self.flushing, |c| ledger::slot(ledger, c.slot).map(f)) }.flatten()
    }

    /// This thread's gate for the arena, from `LOCAL` (acquiring one for a
    /// thread new to the arena), remembered in `LAST`.
    fn look_up(&self, ledger: &[AtomicU64]) -> Option<*const Gate<ThreadCache>> {
        LOCAL
            .try_with(|local| {
                let mut local = local.borrow_mut();
                let local = &mut local.0;
                let at = match local.iter().position(|(id, _)| *id == self.id) {
                    Some(at) => at,
                    None => {
                        // Forget caches of arenas that are gone (only this
                        // thread still holds them).
                        local.retain(|(_, c)| c.as_ref().is_some_and(|c| Arc::strong_count(c) > 1));
                        local.push((self.id, self.acquire(ledger)));
                        local.len() - 1
                    }
                };
                let gate = Arc::as_ptr(local[at].1.as_ref()?);
                LAST.with(|last| last.set((self.id, gate)));
                Some(gate)
            })
            .ok()
            .flatten()
    }

    /// A cache for a thread new to the arena: one a thread that exited
    /// left (with its objects), a free ledger slot, or the slot of a
    /// process proven dead (its objects become this thread's: each is a
    /// reservation any thread may use). `None` when all are taken.
    fn acquire(&self, ledger: &[AtomicU64]) -> Option<Cell> {
        let me = self.me?;
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(orphan) = cells.iter().find(|c| Arc::strong_count(c) == 1) {
            // Pairs with the release of the exited thread's `Arc` drop:
            // what it did in the cache happens-before what we do.
            std::sync::atomic::fence(Ordering::Acquire);
            return Some(Arc::clone(orphan));
        }
        let found = ledger::slots(ledger)
            .find(|(_, s)| ledger::holder(s).is_none() && ledger::claim(s, me))
            .or_else(|| {
                ledger::slots(ledger).find(|(_, s)| ledger::take_over_from_dead(s, me, false))
            })?;
        let cell = Arc::new(Gate::new(ThreadCache { slot: found.0 }));
        cells.push(Arc::clone(&cell));
        Some(cell)
    }

    /// Takes a cached object of `class`.
    pub(crate) fn pop(&self, ledger: &[AtomicU64], class: u32) -> Option<u64> {
        self.with_local(ledger, |s| ledger::pop(s, class)).flatten()
    }

    /// Offers a freed object of `class` to the cache; `false` if the bin
    /// is full (or there is no cache): free it to the arena.
    pub(crate) fn push(&self, ledger: &[AtomicU64], class: u32, offset: u64) -> bool {
        self.with_local(ledger, |s| ledger::push(s, class, offset))
            .unwrap_or(false)
    }

    /// Takes every cached object of every thread: `(class, offset)`.
    pub(crate) fn drain(&self, ledger: &[AtomicU64]) -> Vec<(u32, u64)> {
        if self.generation != fork::generation() {
            return Vec::new();
        }
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        if self.flushing.begin() {
            for cell in cells.iter() {
                cell.take(|cache| {
                    if let Some(s) = ledger::slot(ledger, cache.slot) {
                        ledger::drain(s, |class, offset| out.push((class, offset)));
                    }
                });
            }
        }
        self.flushing.end();
        out
    }

    /// Gives up this process's ledger slots (when the arena goes, after a
    /// flush emptied them). Nothing in a forked child: they are the
    /// parent's.
    pub(crate) fn give_up_slots(&self, ledger: &[AtomicU64]) {
        if self.generation != fork::generation() {
            return;
        }
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        for cell in cells.drain(..) {
            cell.take(|cache| {
                if let Some(s) = ledger::slot(ledger, cache.slot) {
                    ledger::give_up(s);
                }
            });
        }
    }
}
