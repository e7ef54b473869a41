//! The span state word: one per 64 KiB span slot, for small objects.
//!
//! A span belongs to at most one **owner** at a time: a thread cache's
//! ledger slot (`ledger`), or, for one allocation, a thread without one
//! ([`BORROWED`]). Only the owner allocates from the span and clears bits
//! of its object bitmap, with plain stores (`objects`); anyone else frees
//! by setting a bit in the span's remote-free bitmap and then marking the
//! span PENDING here, so the owner knows to collect.
//!
//! # Protocol
//!
//! ```text
//!  bit 63 ACTIVE · bit 62 LISTED (on the class's partial stack) ·
//!  bit 61 PENDING (remote frees not collected yet) ·
//!  bits 16–21 size class · bits 0–6 owner (0: none)
//!
//!   FREE (0) ──carve (store, Release; by the thread that claimed the
//!     ▲        slot's pages, owned by it)──▶ ACTIVE, owned
//!     │                                       │   ▲
//!     │                  give up (CAS by the  │   │ adopt (CAS, Acquire:
//!     │                  owner, Release; sets │   │ unowned and LISTED →
//!     │                  LISTED if there is   ▼   │ owned, after a pop)
//!     └── retire (CAS by the owner: empty) ── ACTIVE, unowned
//! ```
//!
//! - An ACTIVE state means the span's pages are claimed in a page block:
//!   a carve publishes the state after claiming them, a retire clears it
//!   before freeing them (so `free` needs no look at the block's word).
//! - Every unowned span with room is LISTED (and on the stack once), so
//!   it is found, except a span given up full while fewer than a
//!   sixteenth of its objects ([`ripe_at`]) were freed since: a give-up
//!   lists a span with free objects or PENDING frees, and a remote free
//!   that finds its span unowned and not listed lists it in the same CAS
//!   that sets PENDING once its remote frees reach that count. Both run on
//!   this word, so of a give-up and a remote free that race, the later one
//!   sees the other's effect.
//! - The count keeps a thread from adopting, again and again, spans with
//!   one or two free objects (the stack is LIFO: the span listed last has
//!   had the fewest frees), which costs several atomic operations per
//!   object. Its price: up to a sixteenth of a span (or, when the frees
//!   that reach the count race, until the next free) waits for more frees
//!   before another thread can reuse it.
//! - The owner clears PENDING (CAS, Acquire) before it collects the remote
//!   bits; a remote free after that sets it again.
//! - A remote free sets its bit before its CAS here, and the CAS re-reads
//!   the class: if the span was retired (or carved again for another
//!   class) since the free looked it up, the free takes its bit back and
//!   is refused, unless the bit is gone already. Then an owner's collect
//!   took it between the two steps and the free counted: the span was
//!   retired because that free emptied it ([`free_remotely`]).

use super::objects;
use crate::sync::{AtomicSlot, Ordering};

const ACTIVE: u64 = 1 << 63;
const LISTED: u64 = 1 << 62;
const PENDING: u64 = 1 << 61;
const CLASS_SHIFT: u32 = 16;
const CLASS_MASK: u64 = 0x3F;
const OWNER_MASK: u64 = 0x7F;

/// The owner value of a thread without a ledger slot, which owns a span
/// only inside one allocation (a process killed there leaves the span
/// owned until an `audit`).
pub(crate) const BORROWED: u32 = OWNER_MASK as u32;

/// A span's state, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpanState {
    /// The size class.
    pub(crate) class: u32,
    /// The owner (0: none).
    pub(crate) owner: u32,
    /// Remote frees wait to be collected.
    pub(crate) pending: bool,
    /// On the partial stack.
    pub(crate) listed: bool,
}

#[inline]
fn class_of(w: u64) -> u32 {
    ((w >> CLASS_SHIFT) & CLASS_MASK) as u32
}

#[inline]
fn owner_of(w: u64) -> u32 {
    (w & OWNER_MASK) as u32
}

#[inline]
fn decode(w: u64) -> Option<SpanState> {
    // A class past the table is a damaged word: no span (never an index
    // out of bounds).
    (w & ACTIVE != 0 && (class_of(w) as usize) < super::layout::CLASSES.len()).then(|| SpanState {
        class: class_of(w),
        owner: owner_of(w),
        pending: w & PENDING != 0,
        listed: w & LISTED != 0,
    })
}

/// The state of a span, if it is active.
pub(crate) fn describe(state: &impl AtomicSlot) -> Option<SpanState> {
    decode(state.load(Ordering::Acquire))
}

/// For a free's fast path: the class of the active span whose state word
/// is `state` and the index of the object at `offset` in it (an object's
/// first byte), computed from the span's `divisor` word
/// (`layout::divisor_word`), which the carve stored before it published
/// the state. `None` if the span is not active, the offset is no object's
/// first byte, or the word does not name the state's class: a span carved
/// before the word was kept, or a word read across a carve for another
/// class; the caller then divides by its table. The word is a function of
/// the class alone, so this check is its whole protocol: a word read
/// before or after the state is the state's exactly when their classes
/// match. `--cfg hugearena_mutation_divisor` drops the check, and
/// `arena::loom_model` must then find an index of the wrong class.
#[inline(always)]
pub(crate) fn class_and_index(
    state: &impl AtomicSlot,
    divisor: &impl AtomicSlot,
    offset: u64,
) -> Option<(u32, usize)> {
    let st = describe(state)?;
    let divisor = divisor.load(Ordering::Relaxed);
    #[cfg(not(hugearena_mutation_divisor))]
    if super::layout::divisor_class(divisor) != Some(st.class) {
        return None;
    }
    Some((st.class, super::layout::object_at_with(divisor, offset)?))
}

/// Publishes a freshly carved span of `class`, owned by `owner` (its
/// bitmaps must already be clear, or show its first object).
pub(crate) fn carve(state: &impl AtomicSlot, class: u32, owner: u32) {
    debug_assert!(owner != 0 && u64::from(owner) <= OWNER_MASK);
    state.store(
        ACTIVE | (u64::from(class) << CLASS_SHIFT) | u64::from(owner),
        Ordering::Release,
    );
}

/// Makes `me` the owner of a span popped from the partial stack: it must
/// be an unowned, listed span of `class`. Clears LISTED (keeps PENDING).
pub(crate) fn adopt(state: &impl AtomicSlot, class: u32, me: u32) -> bool {
    let mut w = state.load(Ordering::Acquire);
    loop {
        if w & ACTIVE == 0 || class_of(w) != class || owner_of(w) != 0 || w & LISTED == 0 {
            return false;
        }
        let new = (w & !LISTED) | u64::from(me);
        match state.compare_exchange(w, new, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return true,
            Err(found) => w = found,
        }
    }
}

/// Clears PENDING before the owner collects the remote bits; returns
/// whether it was set (there may be bits to collect).
pub(crate) fn take_pending(state: &impl AtomicSlot) -> bool {
    let mut w = state.load(Ordering::Relaxed);
    loop {
        if w & PENDING == 0 {
            return false;
        }
        match state.compare_exchange(w, w & !PENDING, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(found) => w = found,
        }
    }
}

/// What the owner's give-up did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GaveUp {
    /// Unowned and not listed: full (a remote free will list it).
    Unowned,
    /// Unowned and listed: the caller pushes it on the partial stack.
    List,
    /// Empty and retired: the caller frees its pages.
    Retire,
    /// `me` did not own it (damaged or stale record): nothing changed.
    NotOwner,
}

/// Gives up `me`'s ownership. `room`: the span has free objects; `empty`:
/// it has no live object (and so no remote free to come but a stray one).
pub(crate) fn give_up(state: &impl AtomicSlot, me: u32, room: bool, empty: bool) -> GaveUp {
    let mut w = state.load(Ordering::Relaxed);
    loop {
        if w & ACTIVE == 0 || owner_of(w) != me {
            return GaveUp::NotOwner;
        }
        let unowned = w & !OWNER_MASK;
        let (new, what) = if empty && w & PENDING == 0 {
            (0, GaveUp::Retire)
        } else if room || w & PENDING != 0 {
            (unowned | LISTED, GaveUp::List)
        } else {
            (unowned, GaveUp::Unowned)
        };
        #[cfg(not(hugearena_mutation_span))]
        match state.compare_exchange(w, new, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return what,
            Err(found) => w = found,
        }
        // Planted mutation: a load and a store, so a remote free's PENDING
        // and LISTED between them are lost; `arena::loom_model` must catch
        // it.
        #[cfg(hugearena_mutation_span)]
        {
            state.store(new, Ordering::Release);
            return what;
        }
    }
}

/// What a remote free found after setting its bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Remote {
    /// Marked PENDING; the owner (or the next adopter) collects.
    Noted,
    /// Marked PENDING and LISTED: the caller pushes it on the stack.
    List,
    /// No longer an active span of the class the free looked up: the
    /// caller takes its bit back and refuses the free.
    Gone,
}

/// The remote frees after which a span given up full is listed again:
/// a sixteenth of its `capacity`, at least one.
pub(crate) fn ripe_at(capacity: usize) -> usize {
    (capacity / 16).max(1)
}

/// Marks remote frees pending in a span of `class`, listing it if it is
/// unowned, not listed and `ripe` (asked at most once, only then: whether
/// its remote frees reach [`ripe_at`]).
pub(crate) fn note_remote_free(
    state: &impl AtomicSlot,
    class: u32,
    ripe: impl FnOnce() -> bool,
) -> Remote {
    let ripe = std::cell::LazyCell::new(ripe);
    let mut w = state.load(Ordering::Relaxed);
    loop {
        if w & ACTIVE == 0 || class_of(w) != class {
            return Remote::Gone;
        }
        let (new, what) = if owner_of(w) == 0 && w & LISTED == 0 && *ripe {
            (w | PENDING | LISTED, Remote::List)
        } else {
            (w | PENDING, Remote::Noted)
        };
        // A CAS even when nothing changes (already pending): an RMW
        // orders our bit before the owner's next `take_pending`.
        match state.compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return what,
            Err(found) => w = found,
        }
    }
}

/// A thread that does not own the span (state word `state`, of `class`,
/// `capacity` objects) frees object `index`: sets its remote bit, then
/// marks the span PENDING, listing it when ripe. `Ok(true)`: the caller
/// pushes the span on its class's stack.
pub(crate) fn free_remotely<S: AtomicSlot>(
    state: &S,
    class: u32,
    capacity: usize,
    (owned, remote): (&[S], &[S]),
    index: usize,
) -> Result<bool, &'static str> {
    objects::free_remote(owned, remote, index)?;
    let ripe = || objects::remote_count(remote, capacity) >= ripe_at(capacity);
    match note_remote_free(state, class, ripe) {
        Remote::Noted => Ok(false),
        Remote::List => Ok(true),
        // Retired (or carved again) since the free looked it up. Our bit
        // still set: nobody counted the free, so it takes the bit back
        // and is refused. Our bit gone: the retiring owner collected it
        // first, so this free emptied the span and counted (or, racing
        // with a double free, a new carve cleared it). One case is
        // refused though its object ends free: an owner killed between
        // clearing the owner bits and taking the remote bits back, whose
        // span a reclaimer then retires with our bit still set.
        Remote::Gone => {
            let took_back = objects::unfree_remote(remote, index);
            #[cfg(hugearena_mutation_remote)]
            let took_back = {
                let _ = took_back;
                true
            };
            if took_back {
                Err("object not allocated (its span was freed)")
            } else {
                Ok(false)
            }
        }
    }
}

/// Forces a span held by a [`BORROWED`] owner (one a killed process left)
/// back to unowned and listed; only while nothing allocates (restore,
/// `audit`). Returns whether the caller should push it.
pub(crate) fn unborrow(state: &impl AtomicSlot) -> bool {
    let w = state.load(Ordering::Acquire);
    w & ACTIVE != 0
        && owner_of(w) == BORROWED
        && state
            .compare_exchange(
                w,
                (w & !OWNER_MASK) | LISTED,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        && w & LISTED == 0
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    #[test]
    fn owned_given_up_listed_adopted_and_retired() {
        let s = AtomicU64::new(0);
        assert_eq!(describe(&s), None);
        carve(&s, 3, 5);
        let st = describe(&s).unwrap();
        assert_eq!(
            (st.class, st.owner, st.pending, st.listed),
            (3, 5, false, false)
        );
        assert!(!adopt(&s, 3, 6), "owned spans are not adopted");
        assert_eq!(give_up(&s, 6, true, false), GaveUp::NotOwner);
        assert_eq!(
            note_remote_free(&s, 3, || unreachable!("owned: not asked")),
            Remote::Noted,
            "owned: the owner collects"
        );
        assert_eq!(
            note_remote_free(&s, 4, || true),
            Remote::Gone,
            "another class"
        );
        assert!(take_pending(&s) && !take_pending(&s));
        assert_eq!(give_up(&s, 5, false, false), GaveUp::Unowned, "full");
        assert_eq!(
            note_remote_free(&s, 3, || false),
            Remote::Noted,
            "too few frees yet: pending, not listed"
        );
        assert!(!describe(&s).unwrap().listed);
        assert_eq!(
            note_remote_free(&s, 3, || true),
            Remote::List,
            "the free that makes it ripe lists it"
        );
        assert_eq!(
            note_remote_free(&s, 3, || unreachable!("listed: not asked")),
            Remote::Noted,
            "listed once"
        );
        assert!(adopt(&s, 3, 6));
        let st = describe(&s).unwrap();
        assert_eq!((st.owner, st.pending, st.listed), (6, true, false));
        assert_eq!(
            give_up(&s, 6, false, true),
            GaveUp::List,
            "pending: not retired"
        );
        assert!(adopt(&s, 3, 7) && take_pending(&s));
        assert_eq!(give_up(&s, 7, true, true), GaveUp::Retire);
        assert_eq!(describe(&s), None);
        carve(&s, 1, BORROWED);
        assert!(unborrow(&s));
        assert!(describe(&s).unwrap().listed && describe(&s).unwrap().owner == 0);
    }
}
