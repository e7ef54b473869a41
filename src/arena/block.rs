//! The block word: one per 2 MiB block of the arena.
//!
//! # Protocol
//!
//! ```text
//!  bits 56–59 kind · bit 60 DIRTY (pages may be resident) ·
//!  bits 16–31 blocks in a large allocation (LARGE_HEAD, LARGE_CACHED) ·
//!  bits 0–15 free pages (PAGES)
//!
//!          to_pages (CAS)                 reserve / unreserve pages (CAS)
//!   FREE ─────────────────▶ PAGES | 512 ◀──────────────────────────────▶ PAGES | k
//!   ▲ ▲ ▲ claim_large (CAS per block, rolled back on conflict)
//!   │ │ └──────────────▶ LARGE_HEAD | n, LARGE_TAIL ... ──free (CAS head→RELEASING)─┐
//!   │ │                     │    ▲                                                   │
//!   │ │   cache_large (CAS) ▼    │ uncache_large (CAS, the caching thread)           │
//!   │ │                  LARGE_CACHED | n ──release (CAS head→RELEASING)────────────┤
//!   │ └──────────── finish_release (store FREE, clean) ◀── RELEASING ◀──────────────┘
//!   └──────────────────────────────────────────────── begin_release (CAS PAGES|512 or
//!                                                        FREE|DIRTY → RELEASING)
//! ```
//!
//! - A page allocation **reserves** its pages in the block word first (CAS
//!   requiring PAGES and enough free pages), then claims bits in the
//!   block's page bitmap; if no run fits it gives the reservation back. So
//!   `free pages = 512` really means no page is in use or about to be, and
//!   only then can a release (CAS from exactly PAGES | 512) take the block.
//! - LARGE_CACHED is a freed large allocation a thread cache keeps for its
//!   next allocation of as many blocks (its tails stay LARGE_TAIL). Caching
//!   is a free (one CAS from LARGE_HEAD: of two frees, one gets it, and a
//!   free of a cached one is refused); only the caching thread hands it out
//!   again, and only it, a flush of its process or the reclaimer of its
//!   dead process (as the cache ledger records it) releases it.
//! - RELEASING belongs to one thread: it punches the pages out of the file
//!   and resets their population state, then stores FREE (`Release`).
//! - Every successful CAS is `AcqRel`: whoever takes a block over sees the
//!   writes of whoever gave it up.

use crate::sync::{AtomicSlot, Ordering};

/// Pages per 2 MiB block.
pub(crate) const PAGES_PER_BLOCK: u64 = 512;

const KIND_SHIFT: u32 = 56;
const KIND_MASK: u64 = 0xF << KIND_SHIFT;
const DIRTY: u64 = 1 << 60;
const COUNT_SHIFT: u32 = 16;
const LOW: u64 = 0xFFFF;

/// What a block is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Unused (possibly with resident pages: DIRTY).
    Free,
    /// Arena metadata; never allocated.
    Meta,
    /// Page runs and small-object spans.
    Pages,
    /// First block of a large allocation.
    LargeHead,
    /// Later block of a large allocation.
    LargeTail,
    /// Being released by one thread.
    Releasing,
    /// First block of a freed large allocation a thread cache keeps.
    LargeCached,
}

impl Kind {
    const fn code(self) -> u64 {
        (match self {
            Kind::Free => 0,
            Kind::Meta => 1,
            Kind::Pages => 2,
            Kind::LargeHead => 3,
            Kind::LargeTail => 4,
            Kind::Releasing => 5,
            Kind::LargeCached => 6,
        }) << KIND_SHIFT
    }

    fn of(w: u64) -> Kind {
        match (w & KIND_MASK) >> KIND_SHIFT {
            0 => Kind::Free,
            1 => Kind::Meta,
            2 => Kind::Pages,
            3 => Kind::LargeHead,
            4 => Kind::LargeTail,
            6 => Kind::LargeCached,
            // 5, or a damaged word: busy, taken by nobody.
            _ => Kind::Releasing,
        }
    }
}

/// A decoded block word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockState {
    /// The kind.
    pub kind: Kind,
    /// Whether pages may be resident.
    pub dirty: bool,
    /// Free pages (PAGES) .
    pub free_pages: u64,
    /// Blocks of the allocation (LARGE_HEAD, LARGE_CACHED).
    pub blocks: u64,
}

/// Decodes a block word.
pub(crate) fn decode(w: u64) -> BlockState {
    BlockState {
        kind: Kind::of(w),
        dirty: w & DIRTY != 0,
        free_pages: w & LOW,
        blocks: (w >> COUNT_SHIFT) & LOW,
    }
}

/// Loads and decodes.
pub(crate) fn observe(slot: &impl AtomicSlot) -> BlockState {
    decode(slot.load(Ordering::Acquire))
}

/// The word of a metadata block.
pub(crate) const META: u64 = Kind::Meta.code() | DIRTY;

/// Turns a free block into a page block with every page free.
pub(crate) fn to_pages(slot: &impl AtomicSlot) -> bool {
    let w = slot.load(Ordering::Acquire);
    Kind::of(w) == Kind::Free
        && slot
            .compare_exchange(
                w,
                Kind::Pages.code() | DIRTY | PAGES_PER_BLOCK,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
}

/// Reserves `n` pages of a page block.
pub(crate) fn reserve_pages(slot: &impl AtomicSlot, n: u64) -> bool {
    let mut w = slot.load(Ordering::Acquire);
    loop {
        if Kind::of(w) != Kind::Pages || w & LOW < n {
            return false;
        }
        match slot.compare_exchange(w, w - n, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(found) => w = found,
        }
    }
}

/// Gives back `n` pages; returns the free pages after.
pub(crate) fn unreserve_pages(slot: &impl AtomicSlot, n: u64) -> u64 {
    let mut w = slot.load(Ordering::Relaxed);
    loop {
        if Kind::of(w) != Kind::Pages || (w & LOW) + n > PAGES_PER_BLOCK {
            // A damaged word: change nothing.
            return w & LOW;
        }
        match slot.compare_exchange(w, w + n, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return (w & LOW) + n,
            Err(found) => w = found,
        }
    }
}

/// Claims blocks `[0, n)` of `slots` (a contiguous range) for a large
/// allocation; rolls back and fails if any is not free.
pub(crate) fn claim_large(slots: &[impl AtomicSlot], stride: usize) -> bool {
    let n = slots.len().div_ceil(stride) as u64;
    for (i, slot) in slots.iter().step_by(stride).enumerate() {
        let w = slot.load(Ordering::Acquire);
        let new = if i == 0 {
            Kind::LargeHead.code() | DIRTY | (n << COUNT_SHIFT)
        } else {
            Kind::LargeTail.code() | DIRTY
        };
        let taken = Kind::of(w) == Kind::Free
            && slot
                .compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
        if !taken {
            for s in slots.iter().step_by(stride).take(i) {
                // Ours until now: give them back, dirty to be safe.
                s.store(Kind::Free.code() | DIRTY, Ordering::Release);
            }
            return false;
        }
    }
    true
}

/// Takes the head of a large allocation that is `from` (LARGE_HEAD: a
/// live one, exactly once; LARGE_CACHED: one a cache keeps) for freeing:
/// `Some(n)` with its block count, `None` if `slot` is no such head.
pub(crate) fn begin_free_large(slot: &impl AtomicSlot, from: Kind) -> Option<u64> {
    let w = slot.load(Ordering::Acquire);
    (Kind::of(w) == from
        && slot
            .compare_exchange(
                w,
                Kind::Releasing.code(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok())
    .then_some((w >> COUNT_SHIFT) & LOW)
}

/// Frees a live large allocation into its freeing thread's cache: its
/// head goes from LARGE_HEAD to LARGE_CACHED (exactly once, as a free
/// does). `Some(n)` with its block count, `None` if `slot` is not a live
/// large allocation's head.
pub(crate) fn cache_large(slot: &impl AtomicSlot) -> Option<u64> {
    let w = slot.load(Ordering::Acquire);
    let cached = (w & !KIND_MASK) | Kind::LargeCached.code();
    if Kind::of(w) != Kind::LargeHead {
        return None;
    }
    #[cfg(not(hugearena_mutation_large))]
    let won = slot
        .compare_exchange(w, cached, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok();
    // Planted mutation: check, then store. Two racing frees both cache
    // the allocation; `arena::loom_model` must catch it.
    #[cfg(hugearena_mutation_large)]
    let won = {
        slot.store(cached, Ordering::Release);
        true
    };
    won.then_some((w >> COUNT_SHIFT) & LOW)
}

/// Hands a cached large allocation of `n` blocks out again (its caching
/// thread): `false` if `slot` is not such a head (a damaged word).
pub(crate) fn uncache_large(slot: &impl AtomicSlot, n: u64) -> bool {
    let w = slot.load(Ordering::Acquire);
    Kind::of(w) == Kind::LargeCached
        && (w >> COUNT_SHIFT) & LOW == n
        && slot
            .compare_exchange(
                w,
                (w & !KIND_MASK) | Kind::LargeHead.code(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
}

/// Takes a block that is entirely free (a page block with every page
/// free, or a dirty free block) for release.
pub(crate) fn begin_release(slot: &impl AtomicSlot) -> bool {
    let w = slot.load(Ordering::Acquire);
    let releasable = match Kind::of(w) {
        Kind::Pages => w & LOW == PAGES_PER_BLOCK,
        Kind::Free => w & DIRTY != 0,
        _ => false,
    };
    releasable
        && slot
            .compare_exchange(
                w,
                Kind::Releasing.code(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
}

/// Ends a release or a large free: the block is free, `dirty` if its pages
/// were not punched out.
pub(crate) fn finish(slot: &impl AtomicSlot, dirty: bool) {
    let w = Kind::Free.code() | if dirty { DIRTY } else { 0 };
    slot.store(w, Ordering::Release);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    #[test]
    fn page_blocks_reserve_and_release_only_when_empty() {
        let b = AtomicU64::new(0);
        assert!(!reserve_pages(&b, 1), "not a page block yet");
        assert!(to_pages(&b));
        assert!(!to_pages(&b));
        assert!(reserve_pages(&b, 500));
        assert!(!reserve_pages(&b, 13));
        assert!(!begin_release(&b), "pages in use");
        assert_eq!(unreserve_pages(&b, 500), 512);
        assert!(begin_release(&b));
        assert_eq!(observe(&b).kind, Kind::Releasing);
        finish(&b, false);
        assert_eq!(observe(&b), decode(0));
        assert!(!begin_release(&b), "clean free blocks need no release");
    }

    #[test]
    fn large_claims_roll_back_and_free_once() {
        let blocks: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        assert!(to_pages(&blocks[2]));
        assert!(!claim_large(&blocks[0..3], 1));
        assert!(blocks.iter().all(|b| observe(b).kind != Kind::LargeHead));
        assert_eq!(observe(&blocks[0]).kind, Kind::Free);
        assert!(claim_large(&blocks[0..2], 1));
        assert_eq!(observe(&blocks[0]).blocks, 2);
        assert_eq!(
            begin_free_large(&blocks[1], Kind::LargeHead),
            None,
            "a tail is not a head"
        );
        assert_eq!(begin_free_large(&blocks[0], Kind::LargeHead), Some(2));
        assert_eq!(
            begin_free_large(&blocks[0], Kind::LargeHead),
            None,
            "freed twice"
        );
    }

    #[test]
    fn a_cached_large_allocation_is_freed_once_and_handed_out_by_its_count() {
        let blocks: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        assert!(claim_large(&blocks[0..3], 1));
        assert_eq!(cache_large(&blocks[1]), None, "a tail");
        assert_eq!(cache_large(&blocks[0]), Some(3));
        assert_eq!(cache_large(&blocks[0]), None, "freed twice");
        assert_eq!(begin_free_large(&blocks[0], Kind::LargeHead), None);
        assert_eq!(observe(&blocks[0]).blocks, 3);
        assert!(!uncache_large(&blocks[0], 2), "another size");
        assert!(uncache_large(&blocks[0], 3));
        assert!(!uncache_large(&blocks[0], 3), "live again");
        assert_eq!(observe(&blocks[0]).kind, Kind::LargeHead);
        assert_eq!(cache_large(&blocks[0]), Some(3));
        assert_eq!(begin_free_large(&blocks[0], Kind::LargeCached), Some(3));
        assert_eq!(observe(&blocks[0]).kind, Kind::Releasing);
    }
}
