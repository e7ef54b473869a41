//! The cache ledger: one slot per thread cache in the arena's shared
//! tables, naming the process that holds it, the span it owns in each
//! size class and the page runs it keeps, so that what a process held
//! when it was killed goes back to the arena when another process notices
//! it is gone.
//!
//! # Layout
//!
//! [`SLOTS`] slots of [`SLOT_WORDS`] words (a page each: two threads'
//! caches never write one page): the holder word, then one word per size
//! class: the slot's span of that class plus one (0: none), then
//! [`RUNS`] run entries. A span owned by slot `i` says so in its state
//! word (owner `i + 1`, `span`); the ledger is how a reclaimer finds those
//! spans. A run entry (`first page << 16 | pages`, 0: empty) is a page run
//! the cache's thread freed and keeps for its next allocation of that
//! size: still reserved in its block, with no run length, so a second free
//! of it is refused. An entry whose first page starts a block and whose
//! pages are a whole number of blocks is a large allocation the thread
//! freed and keeps: its head block is LARGE_CACHED (`block`), which refuses
//! a second free the same way.
//!
//! # Protocol
//!
//! - **Holder word** (`Owner::to_bits` of a process, 0 when free):
//!   - *claim*: CAS 0 → me (acquire: the words a previous holder left
//!     are seen);
//!   - *take over*: CAS dead → me, only after proving the holder dead
//!     (`Owner::liveness`); of two processes that race, one wins;
//!   - *give up*: store 0 (release), after giving its spans up.
//! - **Span words and run entries** are written by the holder only, with
//!   plain (relaxed) stores; inside the holding process, the cache's gate
//!   keeps its thread and a flusher apart. The holder records a span
//!   *before* it takes the span (carve or adopt) and forgets it *after*
//!   giving it up, so a holder killed at any point leaves every span it
//!   owns recorded. A recorded span that the slot does not own (killed
//!   between the two steps) is skipped: a reclaimer gives up only spans
//!   whose state names the slot.
//! - A run is recorded *before* its run length is cleared (a free) and
//!   forgotten *after* its run length is set (an allocation): a holder
//!   killed between the two leaves a run both recorded and live, which its
//!   thread was freeing or was about to hand out, and the reclaimer frees
//!   it (clearing its length first). No run is ever lost. A large
//!   allocation likewise: recorded before its head is cached, forgotten
//!   after it is live again; the reclaimer frees a recorded head that is
//!   cached, or live with the recorded block count.
//!
//! Everything read here comes from shared memory and is validated by the
//! caller.

use crate::populate::owner::Liveness;
use crate::populate::state::Owner;
use crate::sync::{AtomicSlot, Ordering};

use super::layout::CLASSES;

/// Ledger slots in an arena: threads (of all processes together) that
/// cache at once; a thread beyond them allocates without a cache.
pub(crate) const SLOTS: usize = 64;
const SPANS: usize = 1;
/// Page runs a thread cache keeps.
pub(crate) const RUNS: usize = 16;
const RUN_ENTRIES: usize = SPANS + CLASSES.len();
/// Words per slot: a page.
pub(crate) const SLOT_WORDS: usize = 512;
const _: () = assert!(RUN_ENTRIES + RUNS <= SLOT_WORDS);

/// The words of slot `slot` in the ledger `words` (`None` past the end).
pub(crate) fn slot<S>(words: &[S], slot: usize) -> Option<&[S]> {
    words.get(slot * SLOT_WORDS..(slot + 1) * SLOT_WORDS)
}

/// Every slot of the ledger `words`, with its index.
pub(crate) fn slots<S>(words: &[S]) -> impl Iterator<Item = (usize, &[S])> {
    words.chunks_exact(SLOT_WORDS).take(SLOTS).enumerate()
}

/// The holder of a slot, if any.
pub(crate) fn holder(slot: &[impl AtomicSlot]) -> Option<Owner> {
    match slot[0].load(Ordering::Acquire) {
        0 => None,
        bits => Some(Owner::from_bits(bits)),
    }
}

/// Claims a free slot for `me`.
pub(crate) fn claim(slot: &[impl AtomicSlot], me: Owner) -> bool {
    slot[0]
        .compare_exchange(0, me.to_bits(), Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Takes over a slot from `dead`, a holder proven dead; `false` if another
/// process took it first (or it changed hands).
pub(crate) fn take_over(slot: &[impl AtomicSlot], dead: Owner, me: Owner) -> bool {
    #[cfg(not(hugearena_mutation_ledger))]
    return slot[0]
        .compare_exchange(
            dead.to_bits(),
            me.to_bits(),
            Ordering::Acquire,
            Ordering::Relaxed,
        )
        .is_ok();
    // Planted mutation: check, then store. Two reclaimers both "win" and
    // return the same entries; `arena::loom_model` must catch it.
    #[cfg(hugearena_mutation_ledger)]
    {
        if slot[0].load(Ordering::Acquire) != dead.to_bits() {
            return false;
        }
        slot[0].store(me.to_bits(), Ordering::Relaxed);
        true
    }
}

/// Takes a slot over for `me` if its holder is another process proven
/// dead (with `any`: whoever holds it); `false` if it is free, its holder
/// lives, or another process took it first.
pub(crate) fn take_over_from_dead(slot: &[impl AtomicSlot], me: Owner, any: bool) -> bool {
    holder(slot).is_some_and(|h| {
        (any || (h != me && h.liveness() == Liveness::Dead)) && take_over(slot, h, me)
    })
}

/// Gives a slot up (its holder, after emptying it).
pub(crate) fn give_up(slot: &[impl AtomicSlot]) {
    slot[0].store(0, Ordering::Release);
}

/// The span of `class` that the slot records, if any (unvalidated).
pub(crate) fn span(slot: &[impl AtomicSlot], class: u32) -> Option<u64> {
    slot[SPANS + class as usize]
        .load(Ordering::Relaxed)
        .checked_sub(1)
}

/// A run entry: `(first page, pages)`, unvalidated (`None`: empty).
pub(crate) fn run(slot: &[impl AtomicSlot], entry: usize) -> Option<(u64, u64)> {
    match slot[RUN_ENTRIES + entry].load(Ordering::Relaxed) {
        0 => None,
        w => Some((w >> 16, w & 0xFFFF)),
    }
}

/// Records run entry `entry` (`None`: empties it).
pub(crate) fn record_run(slot: &[impl AtomicSlot], entry: usize, run: Option<(u64, u64)>) {
    let w = run.map_or(0, |(page, pages)| page << 16 | (pages & 0xFFFF));
    slot[RUN_ENTRIES + entry].store(w, Ordering::Release);
}

/// Records the slot's span of `class` (`None`: forgets it).
pub(crate) fn record(slot: &[impl AtomicSlot], class: u32, span: Option<u64>) {
    slot[SPANS + class as usize].store(span.map_or(0, |s| s + 1), Ordering::Release);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    fn words(slots: usize) -> Vec<AtomicU64> {
        (0..slots * SLOT_WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn spans_are_recorded_per_class() {
        let w = words(2);
        let s = slot(&w, 1).unwrap();
        assert!(slot(&w, 2).is_none());
        assert_eq!(span(s, 3), None);
        record(s, 3, Some(0));
        record(s, 31, Some(77));
        assert_eq!(
            (span(s, 3), span(s, 31), span(s, 4)),
            (Some(0), Some(77), None)
        );
        record(s, 3, None);
        assert_eq!(span(s, 3), None);
        record_run(s, RUNS - 1, Some((1 << 30, 511)));
        assert_eq!(run(s, RUNS - 1), Some((1 << 30, 511)));
        assert_eq!(run(s, 0), None);
        record_run(s, RUNS - 1, None);
        assert_eq!(run(s, RUNS - 1), None);
        assert!(
            slot(&w, 0)
                .unwrap()
                .iter()
                .all(|x| x.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn a_slot_is_claimed_once_and_taken_over_once() {
        let w = words(1);
        let s = slot(&w, 0).unwrap();
        let (a, b, c) = (Owner::new(10, 1), Owner::new(11, 2), Owner::new(12, 3));
        assert_eq!(holder(s), None);
        assert!(claim(s, a));
        assert!(!claim(s, b), "held");
        assert_eq!(holder(s), Some(a));
        assert!(take_over(s, a, b));
        assert!(!take_over(s, a, c), "already taken over");
        give_up(s);
        assert_eq!(holder(s), None);
    }
}
