//! The span state word: one per 64 KiB span slot, for small objects.
//!
//! # Protocol
//!
//! ```text
//!  bit 63 ACTIVE · bit 62 LISTED (on the class's partial stack) ·
//!  bits 16–21 size class · bits 0–15 objects reserved (`used`)
//!
//!   FREE (0) ──activate (store, Release; by the thread that claimed the
//!     ▲        slot's pages, with used = 1 for its own object)──▶ ACTIVE
//!     │
//!     └── retire (CAS used 1→0 and ACTIVE→FREE, only when not LISTED and
//!         not the class's current span; the retiring thread then frees
//!         the slot's pages)
//! ```
//!
//! - **reserve** (CAS, `Acquire`): `used += 1` while ACTIVE, of the right
//!   class and below capacity. A reservation guarantees a clear bit in the
//!   span's object bitmap for the reserver, so claiming one always ends.
//! - **unreserve** (CAS, `AcqRel`), after the object's bit was cleared:
//!   `used -= 1`, and in the same CAS either retire the span (it became
//!   empty, is not listed and not current) or set LISTED (it has room, is
//!   not current and not listed: the caller pushes it on the partial stack)
//!   — so every non-current span with room is findable, and a span is on
//!   the stack at most once.
//! - **unlist** (CAS): the popper of a span clears LISTED before using it.

use crate::sync::{AtomicSlot, Ordering};

const ACTIVE: u64 = 1 << 63;
const LISTED: u64 = 1 << 62;
const CLASS_SHIFT: u32 = 16;
const CLASS_MASK: u64 = 0x3F;
const USED_MASK: u64 = 0xFFFF;

fn used(w: u64) -> u64 {
    w & USED_MASK
}

fn class_of(w: u64) -> u32 {
    ((w >> CLASS_SHIFT) & CLASS_MASK) as u32
}

/// The word of a span just carved for `class`, holding one object.
pub(crate) fn active_word(class: u32) -> u64 {
    ACTIVE | (u64::from(class) << CLASS_SHIFT) | 1
}

/// Publishes a freshly carved span (its bitmap must already show the
/// first object).
pub(crate) fn activate(state: &impl AtomicSlot, class: u32) {
    state.store(active_word(class), Ordering::Release);
}

/// Reserves one object of `class` in the span; `false` if it is not an
/// active span of that class or is full.
pub(crate) fn reserve(state: &impl AtomicSlot, class: u32, capacity: u64) -> bool {
    let mut w = state.load(Ordering::Acquire);
    loop {
        if w & ACTIVE == 0 || class_of(w) != class || used(w) >= capacity {
            return false;
        }
        match state.compare_exchange(w, w + 1, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return true,
            Err(found) => w = found,
        }
    }
}

/// What the caller of [`unreserve`] must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterFree {
    /// Nothing.
    Keep,
    /// Push the span on its class's partial stack.
    List,
    /// The span is empty and retired: free its pages.
    Retire,
}

/// Gives back one object (whose bitmap bit the caller cleared).
/// `is_current` says whether the span is its class's current span.
pub(crate) fn unreserve(state: &impl AtomicSlot, is_current: bool) -> AfterFree {
    let mut w = state.load(Ordering::Relaxed);
    loop {
        if w & ACTIVE == 0 || used(w) == 0 {
            // A damaged word (no reservation to give back): change nothing.
            return AfterFree::Keep;
        }
        let left = used(w) - 1;
        let (new, after) = if left == 0 && w & LISTED == 0 && !is_current {
            (0, AfterFree::Retire)
        } else if w & LISTED == 0 && !is_current {
            ((w - 1) | LISTED, AfterFree::List)
        } else {
            (w - 1, AfterFree::Keep)
        };
        match state.compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return after,
            Err(found) => w = found,
        }
    }
}

/// Clears LISTED after popping the span from the partial stack. Returns
/// whether it is still an active span of `class` (a listed span is never
/// retired, so it is, unless something is badly wrong).
pub(crate) fn unlist(state: &impl AtomicSlot, class: u32) -> bool {
    let mut w = state.load(Ordering::Acquire);
    loop {
        let new = w & !LISTED;
        match state.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return w & ACTIVE != 0 && class_of(w) == class,
            Err(found) => w = found,
        }
    }
}

/// Retires an empty, unlisted span that the caller found and is not
/// current (e.g. after unlisting it). `false` if it is in use or listed.
pub(crate) fn try_retire(state: &impl AtomicSlot) -> bool {
    let w = state.load(Ordering::Acquire);
    w & ACTIVE != 0
        && w & LISTED == 0
        && used(w) == 0
        && state
            .compare_exchange(w, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
}

/// Decoded for statistics: `(class, used)` of an active span.
pub(crate) fn describe(state: &impl AtomicSlot) -> Option<(u32, u64)> {
    let w = state.load(Ordering::Acquire);
    // A class past the table is a damaged word: no span (never an index
    // out of bounds).
    (w & ACTIVE != 0 && (class_of(w) as usize) < super::layout::CLASSES.len())
        .then(|| (class_of(w), used(w)))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    #[test]
    fn reserve_up_to_capacity_list_then_retire() {
        let s = AtomicU64::new(0);
        assert!(!reserve(&s, 3, 4), "free spans take nothing");
        activate(&s, 3);
        assert!(!reserve(&s, 4, 4), "wrong class");
        assert!(reserve(&s, 3, 4) && reserve(&s, 3, 4) && reserve(&s, 3, 4));
        assert!(!reserve(&s, 3, 4), "full");
        assert_eq!(unreserve(&s, true), AfterFree::Keep, "current spans stay");
        assert_eq!(unreserve(&s, false), AfterFree::List);
        assert_eq!(unreserve(&s, false), AfterFree::Keep, "already listed");
        assert_eq!(unreserve(&s, false), AfterFree::Keep, "listed: not retired");
        assert_eq!(describe(&s), Some((3, 0)));
        assert!(unlist(&s, 3));
        assert!(try_retire(&s));
        assert_eq!(describe(&s), None);
        activate(&s, 1);
        assert_eq!(unreserve(&s, false), AfterFree::Retire);
        assert_eq!(s.load(Ordering::Relaxed), 0);
    }
}
