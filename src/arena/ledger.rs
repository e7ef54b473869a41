//! The cache ledger: the slots in the arena's shared tables where the
//! per-thread caches keep their free objects, so that what a process held
//! when it was killed goes back to the arena when another process notices
//! it is gone.
//!
//! # Layout
//!
//! [`SLOTS`] slots of [`SLOT_WORDS`] words: the holder word, a count per
//! size class, then [`PER_CLASS`] entries per class. An entry is the
//! offset of a freed object: its bit in the span's object bitmap is clear,
//! and the entry stands for one reservation of that span (the offset is a
//! hint for the next allocation, see `cache`).
//!
//! # Protocol
//!
//! - **Holder word** (`Owner::to_bits` of a process, 0 when free):
//!   - *claim*: CAS 0 → me (acquire: the counts a previous holder left
//!     are seen);
//!   - *take over*: CAS dead → me, only after proving the holder dead
//!     (`Owner::liveness`); of two processes that race, one wins;
//!   - *give up*: store 0 (release), after emptying the slot.
//! - **Counts and entries** are written by the holder only, with plain
//!   (relaxed) loads and stores; inside the holding process, the cache's
//!   gate keeps its thread and a flusher apart.
//!   - *push*: write the entry, then the count;
//!   - *pop*: read the entry, then write the count.
//!
//!   A holder killed between the two steps leaves one reservation that no
//!   entry records (a bounded leak), never an entry whose reservation was
//!   already given back: a reclaimer pops an entry before returning its
//!   reservation, so an entry is returned at most once, even when the
//!   reclaimer is killed too and another takes over.
//!
//! Everything read here comes from shared memory and is validated by the
//! caller: a count past [`PER_CLASS`] empties the bin (its entries are
//! leaked, not trusted).

use crate::populate::owner::Liveness;
use crate::populate::state::Owner;
use crate::sync::{AtomicSlot, Ordering};

use super::layout::CLASSES;

/// Ledger slots in an arena: threads (of all processes together) that
/// cache at once; a thread beyond them allocates without a cache.
pub(crate) const SLOTS: usize = 64;
/// Objects kept per class and thread.
pub(crate) const PER_CLASS: usize = 32;
const COUNTS: usize = 1;
const ENTRIES: usize = COUNTS + CLASSES.len();
/// Words per slot.
pub(crate) const SLOT_WORDS: usize = ENTRIES + CLASSES.len() * PER_CLASS;

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

/// The count of `class`'s bin, validated (a damaged count empties the bin).
fn count(slot: &[impl AtomicSlot], class: usize) -> usize {
    let n = slot[COUNTS + class].load(Ordering::Relaxed);
    if n > PER_CLASS as u64 {
        slot[COUNTS + class].store(0, Ordering::Relaxed);
        return 0;
    }
    n as usize
}

/// Records a freed object of `class`; `false` if the bin is full.
pub(crate) fn push(slot: &[impl AtomicSlot], class: u32, offset: u64) -> bool {
    let class = class as usize;
    let n = count(slot, class);
    if n == PER_CLASS {
        return false;
    }
    slot[ENTRIES + class * PER_CLASS + n].store(offset, Ordering::Relaxed);
    slot[COUNTS + class].store(n as u64 + 1, Ordering::Release);
    true
}

/// Takes the last recorded object of `class`.
pub(crate) fn pop(slot: &[impl AtomicSlot], class: u32) -> Option<u64> {
    let class = class as usize;
    let n = count(slot, class).checked_sub(1)?;
    let offset = slot[ENTRIES + class * PER_CLASS + n].load(Ordering::Relaxed);
    slot[COUNTS + class].store(n as u64, Ordering::Release);
    Some(offset)
}

/// Takes every recorded object, one at a time (`f(class, offset)` after
/// each pop).
pub(crate) fn drain(slot: &[impl AtomicSlot], mut f: impl FnMut(u32, u64)) {
    for class in 0..CLASSES.len() as u32 {
        while let Some(offset) = pop(slot, class) {
            f(class, offset);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    fn words(slots: usize) -> Vec<AtomicU64> {
        (0..slots * SLOT_WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn bins_fill_to_their_size_and_pop_last_in_first_out() {
        let w = words(2);
        let s = slot(&w, 1).unwrap();
        assert!(slot(&w, 2).is_none());
        for i in 0..PER_CLASS as u64 {
            assert!(push(s, 3, 100 + i));
        }
        assert!(!push(s, 3, 1), "full");
        assert!(push(s, 4, 7), "bins are per class");
        assert_eq!(pop(s, 3), Some(100 + PER_CLASS as u64 - 1));
        let mut all = Vec::new();
        drain(s, |c, o| all.push((c, o)));
        assert_eq!(all.len(), PER_CLASS);
        assert_eq!(all.last(), Some(&(4, 7)));
        assert_eq!(pop(s, 3), None);
        assert!(
            slot(&w, 0)
                .unwrap()
                .iter()
                .all(|x| x.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn a_damaged_count_empties_the_bin() {
        let w = words(1);
        let s = slot(&w, 0).unwrap();
        s[COUNTS + 2].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(pop(s, 2), None);
        assert!(push(s, 2, 5));
        assert_eq!(pop(s, 2), Some(5));
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
