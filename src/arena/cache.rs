//! Process-local per-thread caches of free small objects: a free pushes
//! the object on the thread's bin for its class, an allocation pops it,
//! and neither touches a shared word. Objects in a cache stay reserved in
//! the shared tables (they count as in use) until the cache is flushed.
//!
//! Each thread has one cache per arena, behind a [`Gate`]: its thread
//! enters it with plain stores and a compiler fence (no atomic
//! read-modify-write on the hot path), and a flush
//! (`Arena::flush_thread_caches`, a snapshot, `audit`, the arena's drop)
//! waits at the gate to empty it. The arena keeps every cache it handed
//! out, so a thread that exits leaves its cache to the next flush.
//!
//! A cached object is marked free in the shared object bitmap when it is
//! freed (so a second free of it fails in any thread or process); what
//! the cache keeps is the span reservation, which stops the span from
//! being retired, and the object's offset as a hint. An allocation from
//! the cache reclaims the hint's bit, or any clear bit of the same span if
//! another reservation took that one (a reservation always has a clear
//! bit to claim).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::gate::{self, Flushing, Gate};
use super::layout::CLASSES;
use crate::populate::fork;

/// Objects kept per class and thread.
pub(super) const PER_CLASS: usize = 32;

/// One thread's free objects for one arena, per class.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    bins: Vec<Vec<u64>>,
}

impl ThreadCache {
    fn new() -> ThreadCache {
        ThreadCache {
            bins: (0..CLASSES.len())
                .map(|_| Vec::with_capacity(PER_CLASS))
                .collect(),
        }
    }
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
    /// Flushes in progress (the gates' protocol).
    flushing: Flushing,
    /// Every cache handed out; its lock also serializes flushes.
    cells: Mutex<Vec<Cell>>,
}

thread_local! {
    /// This thread's caches, by arena id.
    static LOCAL: RefCell<Vec<(u64, Cell)>> = const { RefCell::new(Vec::new()) };
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

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.generation == fork::generation()
    }

    /// Runs `f` on this thread's cache, if caching is on and no flush is
    /// in progress.
    #[allow(unsafe_code)] // entering the thread's own gate
    fn with_local<R>(&self, f: impl FnOnce(&mut ThreadCache) -> R) -> Option<R> {
        if !self.enabled() {
            return None;
        }
        LOCAL
            .try_with(|local| {
                let mut local = local.borrow_mut();
                let at = match local.iter().position(|(id, _)| *id == self.id) {
                    Some(at) => at,
                    None => {
                        // Forget caches of arenas that are gone (only this
                        // thread still holds them).
                        local.retain(|(_, c)| Arc::strong_count(c) > 1);
                        let cell = Arc::new(Gate::new(ThreadCache::new()));
                        self.cells
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(Arc::clone(&cell));
                        local.push((self.id, cell));
                        local.len() - 1
                    }
                };
                // `f` never touches `LOCAL`, so the borrow can stay held.
                // SAFETY: the gate is this thread's own (made for it and
                // kept in its `LOCAL`): it has one owner.
                unsafe { local[at].1.enter(&self.flushing, f) }
            })
            .ok()
            .flatten()
    }

    /// Pops a cached object of `class`.
    pub(crate) fn pop(&self, class: u32) -> Option<u64> {
        self.with_local(|c| c.bins[class as usize].pop()).flatten()
    }

    /// Offers a freed object of `class` to the cache; `false` if the bin
    /// is full (or the cache is busy): free it to the arena.
    pub(crate) fn push(&self, class: u32, offset: u64) -> bool {
        self.with_local(|c| {
            let bin = &mut c.bins[class as usize];
            let room = bin.len() < PER_CLASS;
            if room {
                bin.push(offset);
            }
            room
        })
        .unwrap_or(false)
    }

    /// Takes every cached object of every thread: `(class, offset)`.
    pub(crate) fn drain(&self) -> Vec<(u32, u64)> {
        if self.generation != fork::generation() {
            return Vec::new();
        }
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        if self.flushing.begin() {
            for cell in cells.iter() {
                cell.take(|cache| {
                    for (class, bin) in cache.bins.iter_mut().enumerate() {
                        out.extend(bin.drain(..).map(|off| (class as u32, off)));
                    }
                });
            }
        }
        self.flushing.end();
        out
    }
}
