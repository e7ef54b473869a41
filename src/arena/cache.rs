//! Per-thread caches: each thread that allocates small objects holds a
//! slot of the arena's cache ledger (`ledger`) and, through it, owns up to
//! one span per size class (`span`). It allocates from those spans and
//! frees into them with plain stores (`objects`): no word another thread
//! writes, no read-modify-write. What it owned when its process was
//! killed is recorded in the ledger and goes back to the arena when
//! another process notices the process is gone
//! (`Arena::reclaim_dead_caches`).
//!
//! Each thread has one cache per arena, behind a [`Gate`]: its thread
//! enters it with plain stores and a compiler fence, and a flush
//! (`Arena::flush_thread_caches`, a snapshot, `audit`, the arena's drop)
//! waits at the gate to give the cache's spans up. The arena keeps every
//! cache it handed out; the cache of a thread that exited goes, spans and
//! all, to the next thread that needs one.

use std::cell::{Cell as CopyCell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::gate::{self, Flushing, Gate, Inside};
use super::layout::CLASSES;
use super::ledger;
use super::objects::NextWord;
use crate::populate::fork;
use crate::populate::state::Owner;

/// One thread's cache for one arena.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    /// Its ledger slot; its spans' owner is `slot + 1`.
    pub(crate) slot: usize,
    /// The span it owns in each class plus one (0: none), as recorded in
    /// the ledger (a process-local copy, read without validation).
    pub(crate) spans: [u32; CLASSES.len()],
    /// Per class, the bitmap word where its next allocation looks first
    /// (everything below it is taken).
    pub(crate) cursor: [u8; CLASSES.len()],
    /// Per class, a copy of that word (`NextWord`: none, or exact while
    /// the span is owned; reset whenever `spans` or `cursor` changes).
    pub(crate) next: [NextWord; CLASSES.len()],
    /// The block it carves its spans in (0: none yet; block 0 holds the
    /// tables). Only a hint.
    pub(crate) span_block: u64,
    /// The page runs and large allocations it keeps, `(first page,
    /// pages)` (pages 0: empty; a whole number of blocks: a large
    /// allocation), as recorded in the ledger's run entries.
    pub(crate) runs: [(u64, u64); ledger::RUNS],
    /// The run entry the next eviction empties.
    pub(crate) next_eviction: usize,
}

impl ThreadCache {
    fn new(slot: usize) -> ThreadCache {
        ThreadCache {
            slot,
            spans: [0; CLASSES.len()],
            cursor: [0; CLASSES.len()],
            next: [NextWord::default(); CLASSES.len()],
            span_block: 0,
            runs: [(0, 0); ledger::RUNS],
            next_eviction: 0,
        }
    }

    /// The owner value of its spans.
    pub(crate) fn owner(&self) -> u32 {
        self.slot as u32 + 1
    }

    /// Records `span` (or none) as its span of class `c`, its next
    /// allocation looking from the span's first word.
    pub(crate) fn set_span(&mut self, c: usize, span: Option<u64>) {
        self.spans[c] = span.map_or(0, |s| s as u32 + 1);
        self.cursor[c] = 0;
        self.next[c] = NextWord::default();
    }
}

/// Blocks of freed large allocations a thread cache keeps at most
/// (16 MiB): enough for a thread that frees and allocates a few sizes of
/// large buffers in turn to reuse them without searching the blocks,
/// little enough that caches hoard no great share of an arena.
pub(crate) const LARGE_BLOCKS: u64 = 8;

/// The largest freed allocation a thread cache keeps, in blocks.
pub(crate) const LARGE_MAX: u64 = LARGE_BLOCKS / 2;

type Cell = Arc<Gate<ThreadCache>>;

/// Gives up what a dead process's ledger slot (index, words) recorded,
/// before a new thread takes the slot over.
pub(crate) type ReleaseDead<'a> = &'a mut dyn FnMut(usize, &[AtomicU64]);

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

/// In a forked child (from the fork handler, in its only thread): forgets
/// the cache this thread used last, so that its next use looks it up and
/// finds the parent's caches are not the child's to use.
pub(crate) fn after_fork() {
    LAST.set(NO_LAST);
}

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
        let me = Owner::current().ok();
        Caches {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: {
                fork::install();
                fork::generation()
            },
            enabled: AtomicBool::new(enabled && me.is_some()),
            me,
            flushing: {
                gate::init();
                // Off from the start: the hold `set_enabled` keeps.
                Flushing::holding(!(enabled && me.is_some()))
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

    /// Turns caching on or off. Off, `flushing` holds one more count, so
    /// that a thread entering the cache it used last keeps out without
    /// the hot path reading `enabled` (a flush then takes what it holds).
    pub(crate) fn set_enabled(&self, on: bool) {
        let on = on && self.me.is_some();
        // Serialized with each other (and with flushes) by the lock.
        let _cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        match (self.enabled.swap(on, Ordering::Relaxed), on) {
            // A failed heavy fence still counts: owners see the hold at
            // their next entry.
            (true, false) => drop(self.flushing.begin()),
            (false, true) => self.flushing.end(),
            _ => {}
        }
    }

    /// Whether this thread may use a cache: caching on (and possible:
    /// `set_enabled` folds in whether this process could be named in the
    /// ledger) and not in a forked child.
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.generation == fork::generation()
    }

    /// Runs `f` on this thread's cache, if caching is on, the thread has
    /// one and no flush is in progress. The thread's `LAST` entry is only
    /// ever set while caching is on and in the process it was set in (a
    /// forked child clears it: [`after_fork`]); caching turned off since
    /// keeps the thread out at the gate (`set_enabled`).
    #[inline]
    pub(crate) fn with_local<R>(&self, f: impl FnOnce(&mut ThreadCache) -> R) -> Option<R> {
        let gate = match self.last() {
            Some(gate) => gate,
            None if self.enabled() => self.look_up(None)?,
            None => return None,
        };
        let mut inside = self.open(gate)?;
        Some(f(inside.contents()))
    }

    /// This thread's cache for the hot paths, entered: only if this arena
    /// is the one the thread used last (`None` otherwise, without looking
    /// further), so that it makes no call and keeps few registers. It
    /// leaves the cache when the guard drops.
    #[inline(always)]
    pub(crate) fn open_last(&self) -> Option<Inside<'_, ThreadCache>> {
        self.open(self.last()?)
    }

    /// This thread's gate for the arena if it is the one `LAST` holds.
    #[inline(always)]
    fn last(&self) -> Option<*const Gate<ThreadCache>> {
        let (id, last) = LAST.try_with(CopyCell::get).unwrap_or(NO_LAST);
        // Arena ids start at 1, and `LAST` holds a gate with every id but
        // `NO_LAST`'s 0: a match needs no null check.
        debug_assert!(id != self.id || !last.is_null());
        (id == self.id).then_some(last)
    }

    /// Enters `gate`, this thread's gate for the arena (from its `LAST`
    /// or `LOCAL`), unless a flush is in progress.
    #[allow(unsafe_code)] // entering the thread's own gate
    #[inline(always)]
    fn open(&self, gate: *const Gate<ThreadCache>) -> Option<Inside<'_, ThreadCache>> {
        // SAFETY: `gate` comes from this thread's `LAST` or `LOCAL`, whose
        // `LOCAL` entry keeps it alive while the arena (`self`) is: `LOCAL`
        // drops only the gates of arenas that are gone (their `Arc` is its
        // last), and all of them at thread exit, clearing `LAST` first.
        let gate = unsafe { &*gate };
        // SAFETY: the gate is this thread's own (handed to it by `acquire`
        // and kept in its `LOCAL`), and a thread holds one guard at a time:
        // the hot paths open it once, and `with_local`'s closures do not
        // enter it again.
        unsafe { gate.open(&self.flushing) }
    }

    /// This thread's gate for the arena, from `LOCAL`, remembered in
    /// `LAST`. With `acquire` (which gives up what a dead process's slot
    /// recorded before a new thread takes the slot), a thread new to the
    /// arena gets a cache; without, it gets `None`.
    #[cold]
    fn look_up(
        &self,
        acquire: Option<(&[AtomicU64], ReleaseDead<'_>)>,
    ) -> Option<*const Gate<ThreadCache>> {
        LOCAL
            .try_with(|local| {
                let mut local = local.borrow_mut();
                let local = &mut local.0;
                let at = match local.iter().position(|(id, _)| *id == self.id) {
                    Some(at) => at,
                    None => {
                        let (ledger, release_dead) = acquire?;
                        // Forget caches of arenas that are gone (only this
                        // thread still holds them).
                        local.retain(|(_, c)| c.as_ref().is_some_and(|c| Arc::strong_count(c) > 1));
                        local.push((self.id, self.acquire(ledger, release_dead)));
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
    /// left (with its spans), a free ledger slot, or the slot of a process
    /// proven dead (after `release_dead` gave up what it recorded). `None`
    /// when all are taken.
    fn acquire(&self, ledger: &[AtomicU64], release_dead: ReleaseDead<'_>) -> Option<Cell> {
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
                let dead =
                    ledger::slots(ledger).find(|(_, s)| ledger::take_over_from_dead(s, me, false));
                if let Some((i, s)) = dead {
                    release_dead(i, s);
                }
                dead
            })?;
        let cell = Arc::new(Gate::new(ThreadCache::new(found.0)));
        cells.push(Arc::clone(&cell));
        Some(cell)
    }

    /// This thread's cache, acquiring one for a thread new to the arena
    /// (`release_dead` gives up what a dead process's slot it takes over
    /// recorded). Whether the thread has one.
    pub(crate) fn prepare(&self, ledger: &[AtomicU64], release_dead: ReleaseDead<'_>) -> bool {
        self.enabled() && self.look_up(Some((ledger, release_dead))).is_some()
    }

    /// Runs `f` on every cache of this process, each while its thread is
    /// kept out (a flush).
    pub(crate) fn for_each(
        &self,
        ledger: &[AtomicU64],
        mut f: impl FnMut(&mut ThreadCache, &[AtomicU64]),
    ) {
        if self.generation != fork::generation() {
            return;
        }
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        if self.flushing.begin() {
            for cell in cells.iter() {
                cell.take(|cache| {
                    if let Some(s) = ledger::slot(ledger, cache.slot) {
                        f(cache, s);
                    }
                });
            }
        }
        self.flushing.end();
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
