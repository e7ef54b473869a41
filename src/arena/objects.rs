//! A span's objects: two bitmaps in its descriptor.
//!
//! - **Owner bits** (set = allocated): written only by the span's owner
//!   (`span`), with plain (relaxed) loads and stores: an allocation sets a
//!   bit, the owner's own free clears one, and nobody else writes them, so
//!   the owner's hot path takes no lock and no read-modify-write. Others
//!   only read them, to refuse a free of an object that is not allocated.
//!   Being their only writer, the owner also keeps a copy of the word it
//!   allocates from ([`NextWord`]) and allocates from the copy, storing
//!   the word after each change; it forgets the copy before anything else
//!   changes the word (a collect, a give-up, a flush).
//! - **Remote bits** (set = freed by a thread that does not own the span,
//!   not collected yet): a remote free sets its bit with one `fetch_or`
//!   (`Release`: its writes to the object happen before the next owner's
//!   use), so of two remote frees of one object exactly one wins. The
//!   owner collects: it clears the owner bits of the remote ones, *then*
//!   takes the remote bits back with a `fetch_and` (`Acquire`). An owner
//!   killed between the two leaves remote bits on free objects, which the
//!   next allocation of those objects drops: nothing is lost or leaked.
//!
//! # Double frees
//!
//! A free checks both bitmaps: a free of an object whose owner bit is
//! clear, or whose remote bit is set, is refused. So every double free
//! that is ordered after the first free (by the program, a lock, a
//! message, the same thread) is refused, in every thread and process. Two
//! frees that race: two remote ones, exactly one wins (`fetch_or`); the
//! owner's and a remote one may both succeed, and then the object is free
//! once, not twice. The remote bit left on the free object is dropped
//! when the owner allocates the object again ([`take`] checks it, so a
//! collect never frees the new allocation), or by the next collect.

use super::bitmap::valid_bits as valid;
use crate::sync::{AtomicSlot, Ordering};

const BITS: usize = 64;

/// Object `i`'s word and bit.
#[inline(always)]
fn locate(i: usize) -> (usize, u64) {
    (i / BITS, 1u64 << (i % BITS))
}

/// Words of a span of `capacity` objects.
pub(crate) fn words(capacity: usize) -> usize {
    capacity.div_ceil(BITS)
}

/// Clears both bitmaps of a span about to be carved (by the thread that
/// claimed its pages; the span's state publishes the stores).
pub(crate) fn clear<S: AtomicSlot>(owned: &[S], remote: &[S]) {
    for w in owned.iter().chain(remote) {
        w.store(0, Ordering::Relaxed);
    }
}

/// The owner allocates: the lowest free object at or after word `from`.
/// Returns its index, the remote bits it found on free objects (stray
/// double frees, dropped) and the owner bits it stored in the object's
/// word (for a [`NextWord`]).
#[inline]
pub(crate) fn take<S: AtomicSlot>(
    owned: &[S],
    remote: &[S],
    capacity: usize,
    from: usize,
) -> Option<(usize, u32, u64)> {
    for w in from..words(capacity) {
        let bits = owned[w].load(Ordering::Relaxed);
        let free = !bits & valid(w, capacity);
        if free == 0 {
            continue;
        }
        let bit = free & free.wrapping_neg();
        let stray = drop_stray(&remote[w], bit);
        owned[w].store(bits | bit, Ordering::Relaxed);
        return Some((w * BITS + bit.trailing_zeros() as usize, stray, bits | bit));
    }
    None
}

/// Before the owner allocates the object of `bit`: drops a remote bit that
/// a double free racing with the owner's own free left on it, or a collect
/// would free the new allocation. Whether there was one.
#[inline]
fn drop_stray<S: AtomicSlot>(remote: &S, bit: u64) -> u32 {
    #[cfg(hugearena_mutation_objects)]
    let _ = (remote, bit);
    #[cfg(not(hugearena_mutation_objects))]
    if remote.load(Ordering::Relaxed) & bit != 0 {
        remote.fetch_and(!bit, Ordering::Acquire);
        return 1;
    }
    0
}

/// The owner's copy of the owner-bit word its next allocation of a class
/// takes from. The owner is the only writer of owner bits, so the copy
/// stays exact for as long as it owns the span (the thread cache forgets
/// the copy before it gives the span up, or moves its cursor elsewhere),
/// and allocating from it skips the search of [`take`]. `Default`: no
/// copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NextWord {
    /// The word's bits as last stored.
    owned: u64,
    /// Its free objects: the valid bits not in `owned` (0 without a copy).
    free: u64,
    /// The arena offset of the object of bit 0.
    base: u64,
    /// The object size.
    size: u64,
    /// Where the owner word lies in the caller's table (the remote word
    /// is the caller's to find from it). 32 bits, so that adding the
    /// distance to the remote word cannot overflow and one bounds check
    /// covers both words.
    at: u32,
}

impl NextWord {
    /// A copy of word `w` of a span of `capacity` objects of `size` bytes
    /// starting at arena offset `span_base`, whose owner bits the owner
    /// just stored as `owned`; `at` places the word in the caller's table.
    /// No copy for a word past `u32::MAX` (in an arena of more than about
    /// 1.9 TiB): its allocations take the search.
    #[inline]
    pub(crate) fn new(
        owned: u64,
        w: usize,
        capacity: usize,
        span_base: u64,
        size: u64,
        at: usize,
    ) -> NextWord {
        debug_assert!(at != 0, "word 0 of a table is no owner word");
        let Ok(at) = u32::try_from(at) else {
            return NextWord::default();
        };
        NextWord {
            owned,
            free: !owned & valid(w, capacity),
            base: span_base + (w * BITS) as u64 * size,
            size,
            at,
        }
    }

    /// Where the copied word lies in the caller's table, if it has a free
    /// object.
    #[inline]
    pub(crate) fn at_if_free(&self) -> Option<usize> {
        (self.free != 0).then_some(self.at as usize)
    }

    /// The owner freed the object of `bit` in the word at `at` (its owner
    /// bit is cleared already): keeps the copy exact if it is that word.
    #[inline]
    pub(crate) fn note_owner_free(&mut self, at: usize, bit: u64) {
        // No copy (`Default`) matches no word: its `at` is 0, which no
        // owner word's is (`new`).
        if self.at as usize == at {
            self.owned &= !bit;
            self.free |= bit;
        }
    }
}

/// The owner allocates from its copy of the word (`owned` and `remote`
/// are the word and its remote word): the lowest free object's arena
/// offset, or `None` when the copy has none.
#[inline]
pub(crate) fn take_next<S: AtomicSlot>(next: &mut NextWord, owned: &S, remote: &S) -> Option<u64> {
    if next.free == 0 {
        return None;
    }
    let bit = next.free & next.free.wrapping_neg();
    drop_stray(remote, bit);
    next.free ^= bit;
    next.owned |= bit;
    owned.store(next.owned, Ordering::Relaxed);
    Some(next.base + u64::from(bit.trailing_zeros()) * next.size)
}

/// Object `i`'s word and bit, for the caller's copies.
#[inline]
pub(crate) fn word_and_bit(i: usize) -> (usize, u64) {
    locate(i)
}

/// The owner frees object `i`.
#[inline(always)]
pub(crate) fn free_owned<S: AtomicSlot>(
    owned: &[S],
    remote: &[S],
    i: usize,
) -> Result<(), &'static str> {
    let (w, bit) = locate(i);
    let bits = owned[w].load(Ordering::Relaxed);
    if bits & bit == 0 {
        return Err("object not allocated (or already freed)");
    }
    if remote[w].load(Ordering::Relaxed) & bit != 0 {
        return Err("object already freed by another thread or process");
    }
    owned[w].store(bits & !bit, Ordering::Relaxed);
    Ok(())
}

/// A thread that does not own the span frees object `i`: sets its remote
/// bit. The caller then marks the span PENDING (`span::note_remote_free`).
pub(crate) fn free_remote<S: AtomicSlot>(
    owned: &[S],
    remote: &[S],
    i: usize,
) -> Result<(), &'static str> {
    let (w, bit) = locate(i);
    if owned[w].load(Ordering::Acquire) & bit == 0 {
        return Err("object not allocated (or already freed)");
    }
    if remote[w].fetch_or(bit, Ordering::Release) & bit != 0 {
        return Err("object already freed (by another thread or process)");
    }
    Ok(())
}

/// Remote frees not collected yet (stray bits included).
pub(crate) fn remote_count<S: AtomicSlot>(remote: &[S], capacity: usize) -> usize {
    remote
        .iter()
        .take(words(capacity))
        .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
        .sum()
}

/// Takes back a remote bit whose free was refused after it was set;
/// `false` if it was gone already (an owner's collect took it).
pub(crate) fn unfree_remote(remote: &[impl AtomicSlot], i: usize) -> bool {
    let (w, bit) = locate(i);
    remote[w].fetch_and(!bit, Ordering::Relaxed) & bit != 0
}

/// The owner collects the remote frees: `(objects freed, stray bits
/// dropped)`.
pub(crate) fn collect<S: AtomicSlot>(owned: &[S], remote: &[S], capacity: usize) -> (u32, u32) {
    let (mut freed, mut stray) = (0, 0);
    for w in 0..words(capacity) {
        let r = remote[w].load(Ordering::Relaxed);
        if r == 0 {
            continue;
        }
        let bits = owned[w].load(Ordering::Relaxed);
        owned[w].store(bits & !r, Ordering::Relaxed);
        remote[w].fetch_and(!r, Ordering::Acquire);
        freed += (bits & r).count_ones();
        stray += (r & !bits).count_ones();
    }
    (freed, stray)
}

/// Live objects: allocated and not freed remotely.
pub(crate) fn live<S: AtomicSlot>(owned: &[S], remote: &[S], capacity: usize) -> u64 {
    (0..words(capacity))
        .map(|w| {
            let live = owned[w].load(Ordering::Acquire) & !remote[w].load(Ordering::Acquire);
            u64::from((live & valid(w, capacity)).count_ones())
        })
        .sum()
}

/// `(room, empty)`: whether some object is free in the owner bits, and
/// whether all are.
pub(crate) fn room_and_empty<S: AtomicSlot>(owned: &[S], capacity: usize) -> (bool, bool) {
    let (mut room, mut empty) = (false, true);
    for (w, word) in owned.iter().enumerate().take(words(capacity)) {
        let bits = word.load(Ordering::Relaxed) & valid(w, capacity);
        room |= bits != valid(w, capacity);
        empty &= bits == 0;
    }
    (room, empty)
}

/// Whether object `i` is allocated and not freed.
pub(crate) fn is_live<S: AtomicSlot>(owned: &[S], remote: &[S], i: usize) -> bool {
    let (w, bit) = locate(i);
    owned[w].load(Ordering::Acquire) & !remote[w].load(Ordering::Acquire) & bit != 0
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    /// [`take`]'s index and stray count.
    fn took(o: &[AtomicU64], r: &[AtomicU64], cap: usize, from: usize) -> Option<(usize, u32)> {
        take(o, r, cap, from).map(|(i, stray, _)| (i, stray))
    }

    fn bitmap(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn the_owner_allocates_and_frees_and_collects_remote_frees() {
        let (o, r) = (bitmap(2), bitmap(2));
        let cap = 100;
        for i in 0..cap {
            assert_eq!(took(&o, &r, cap, 0), Some((i, 0)));
        }
        assert_eq!(
            took(&o, &r, cap, 0),
            None,
            "bits past the capacity stay unused"
        );
        assert_eq!(room_and_empty(&o, cap), (false, false));
        assert!(free_owned(&o, &r, 70).is_ok());
        assert!(free_owned(&o, &r, 70).is_err(), "double free by the owner");
        assert!(free_remote(&o, &r, 70).is_err(), "then by another thread");
        assert!(free_remote(&o, &r, 3).is_ok());
        assert!(free_remote(&o, &r, 3).is_err(), "double remote free");
        assert!(free_owned(&o, &r, 3).is_err(), "remote, then the owner");
        assert!(!is_live(&o, &r, 3) && is_live(&o, &r, 4));
        assert_eq!(live(&o, &r, cap), 98);
        assert_eq!(
            took(&o, &r, cap, 1),
            Some((70, 0)),
            "from the cursor's word"
        );
        assert_eq!(took(&o, &r, cap, 0), None, "3 waits to be collected");
        assert_eq!(collect(&o, &r, cap), (1, 0));
        assert_eq!(took(&o, &r, cap, 0), Some((3, 0)));
    }

    #[test]
    fn a_racing_double_free_leaves_a_stray_bit_that_never_frees_a_new_allocation() {
        let (o, r) = (bitmap(1), bitmap(1));
        assert_eq!(took(&o, &r, 64, 0), Some((0, 0)));
        // The remote free checked the owner bit before the owner's free
        // cleared it, and set its remote bit after.
        assert!(free_owned(&o, &r, 0).is_ok());
        r[0].store(1, Ordering::Relaxed);
        assert_eq!(took(&o, &r, 64, 0), Some((0, 1)), "the stray bit dropped");
        assert_eq!(collect(&o, &r, 64), (0, 0));
        assert!(is_live(&o, &r, 0), "the new allocation stays allocated");
        // A stray bit that a collect finds first is dropped there.
        assert!(free_owned(&o, &r, 0).is_ok());
        r[0].store(1, Ordering::Relaxed);
        assert_eq!(collect(&o, &r, 64), (0, 1));
        assert_eq!(room_and_empty(&o, 64), (true, true));
    }
}
