//! The page-state word: one per population granule, in the region's shared
//! metadata, so every thread of every process agrees on who fills a page.
//!
//! # Protocol
//!
//! ```text
//!            claim (CAS, AcqRel)            publish (CAS, Release)
//!   Absent ─────────────────────▶ Filling(owner) ─────────────────▶ Present
//!     ▲  ▲                          │ ▲  ▲ │ │ poison (CAS, Release)    │
//!     │  │   take_over(dead owner)  │ └──┘ │ ▼                          │
//!     │  │   (CAS, AcqRel)          │      │ Poisoned ──┐               │
//!     │  └── finish_discard ────────┘      │            │ begin_discard │
//!     │      (CAS, Release)                └────────────┴───────────────┘
//!     └──── begin_discard (from Absent too)          (CAS, AcqRel)
//! ```
//!
//! Encoding (`u64`): bits 62–63 are the tag (0 Absent, 1 Filling,
//! 2 Present, 3 Poisoned). A Filling word carries its owner: the pid in
//! bits 0–31 and, in bits 32–60, a token that defeats pid reuse (the low
//! 29 bits of the owner process's start time); bit 61 (`WAITERS`) says a
//! waiter sleeps on the word (a futex on its high half), so whoever ends
//! the claim must wake it.
//!
//! - **claim**: whoever moves `Absent → Filling(me)` is the one filler of
//!   the granule; everyone else sees `Filling` (wait), `Present` (map it)
//!   or `Poisoned` (the fill failed; report it).
//! - **publish**: the filler's writes to the page (through the alias)
//!   happen before its `Release` CAS to `Present`; anyone who loads
//!   `Present` with `Acquire` may map and read the page.
//! - **take_over**: a `Filling(owner)` whose owner process is proven dead
//!   is moved to `Filling(me)` by one CAS (keeping `WAITERS`); the loser of
//!   a race sees the winner's claim. A slow-but-alive owner that lost its
//!   claim this way fails its publish CAS and leaves the granule to the new
//!   owner (both wrote the same bytes from the same source).
//! - **wait**: a waiter sets `WAITERS` on the exact claim it saw (CAS) and
//!   sleeps on the high half of the word while it is unchanged, with a
//!   timeout: it re-checks liveness and its deadline after each wake-up.
//!   Every transition out of `Filling` reports whether `WAITERS` was set.
//! - **discard** (drop a granule's page: the arena's release, a buffer
//!   pool's eviction): `begin_discard` claims the granule from `Present`,
//!   `Absent` or `Poisoned` as a fill would (`Filling(me)`), the caller
//!   then punches the page out of the file, and `finish_discard` moves
//!   `Filling(me) → Absent`. While the page is being punched its word is
//!   never `Present`, so nobody maps a page that is going away; a
//!   discarder killed half-way leaves a `Filling` claim of a dead process,
//!   which the next toucher takes over and fills from the source.
//! - **write-back** (a buffer pool evicting a dirty page): both discard
//!   transitions are releases and every claim an acquire, so bytes written
//!   to the page store before `begin_discard` are what the next fill of the
//!   granule reads, in any process. The library guarantees that order and
//!   no more: keeping writers of the page out from the write-back to the
//!   end of the discard is the caller's latch, and bytes written to the
//!   page after its write-back are dropped with it.
//!
//! Every transition is a single CAS from an exact expected value, so no
//! transition can be applied to a word that changed in between.

use crate::sync::{AtomicSlot, Ordering};

const TAG_SHIFT: u32 = 62;
const TAG_ABSENT: u64 = 0;
const TAG_FILLING: u64 = 1;
const TAG_PRESENT: u64 = 2;
const TAG_POISONED: u64 = 3;
const TOKEN_BITS: u32 = 29;
/// Set on a Filling word when a waiter sleeps on it.
const WAITERS: u64 = 1 << 61;

/// The word of an absent granule (and of a fresh, zeroed table).
pub(crate) const ABSENT: u64 = TAG_ABSENT << TAG_SHIFT;
/// The word of a present granule.
pub(crate) const PRESENT: u64 = TAG_PRESENT << TAG_SHIFT;
/// The word of a poisoned granule.
pub(crate) const POISONED: u64 = TAG_POISONED << TAG_SHIFT;

/// Ordering of the publishing CAS. `--cfg hugearena_mutation` weakens it on
/// purpose so CI can check that the loom tests notice (and
/// `--cfg hugearena_mutation_discard` restores the old discard order,
/// which punched a page while its word still said `Present`).
#[cfg(not(hugearena_mutation))]
const PUBLISH: Ordering = Ordering::Release;
#[cfg(hugearena_mutation)]
const PUBLISH: Ordering = Ordering::Relaxed;

/// Orderings of the two discard transitions: each is a release, so a
/// write-back done before `begin_discard` (a buffer pool's dirty page) is
/// read by the fill that claims the granule after `finish_discard`.
/// `--cfg hugearena_mutation_writeback` drops both releases on purpose so
/// CI can check that the loom model of write-back notices.
#[cfg(not(hugearena_mutation_writeback))]
const DISCARD_CLAIM: Ordering = Ordering::AcqRel;
#[cfg(not(hugearena_mutation_writeback))]
const DISCARD_END: Ordering = Ordering::Release;
#[cfg(hugearena_mutation_writeback)]
const DISCARD_CLAIM: Ordering = Ordering::Acquire;
#[cfg(hugearena_mutation_writeback)]
const DISCARD_END: Ordering = Ordering::Relaxed;

/// Who holds a `Filling` claim: a process, told apart from a later process
/// that reuses its pid by a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Low 29 bits of the process's start time (or another per-process
    /// value that a reused pid will not repeat).
    pub token: u32,
}

impl Owner {
    /// An owner from its parts; the token is cut to 29 bits.
    pub const fn new(pid: u32, token: u32) -> Owner {
        Owner {
            pid,
            token: token & ((1 << TOKEN_BITS) - 1),
        }
    }

    /// The owner as one word (pid low, token high), for an atomic field.
    pub(crate) const fn to_bits(self) -> u64 {
        ((self.token as u64) << 32) | self.pid as u64
    }

    /// The owner [`to_bits`](Owner::to_bits) made `bits` from.
    pub(crate) const fn from_bits(bits: u64) -> Owner {
        Owner::new(bits as u32, (bits >> 32) as u32)
    }

    const fn filling_word(self) -> u64 {
        (TAG_FILLING << TAG_SHIFT) | ((self.token as u64) << 32) | self.pid as u64
    }
}

/// A decoded state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Not populated.
    Absent,
    /// Being filled by `Owner`.
    Filling(Owner),
    /// Filled and mappable.
    Present,
    /// The fill failed; accesses get SIGBUS.
    Poisoned,
}

impl PageState {
    /// Decodes a word.
    pub(crate) const fn decode(word: u64) -> PageState {
        match word >> TAG_SHIFT {
            TAG_ABSENT => PageState::Absent,
            TAG_FILLING => PageState::Filling(Owner {
                pid: word as u32,
                token: ((word >> 32) & ((1 << TOKEN_BITS) - 1)) as u32,
            }),
            TAG_PRESENT => PageState::Present,
            _ => PageState::Poisoned,
        }
    }
}

/// The outcome of [`claim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The caller owns the fill now.
    Won,
    /// Someone else is filling it.
    Busy(Owner),
    /// Already present: map it.
    Present,
    /// Its fill failed earlier.
    Poisoned,
}

/// Loads and decodes the state (`Acquire`: a `Present` seen here means the
/// page's bytes are visible).
pub(crate) fn observe(slot: &impl AtomicSlot) -> PageState {
    PageState::decode(slot.load(Ordering::Acquire))
}

/// Tries to become the filler of an absent granule.
pub(crate) fn claim(slot: &impl AtomicSlot, me: Owner) -> Claim {
    match slot.compare_exchange(
        ABSENT,
        me.filling_word(),
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => Claim::Won,
        Err(found) => match PageState::decode(found) {
            PageState::Filling(owner) => Claim::Busy(owner),
            PageState::Present => Claim::Present,
            PageState::Poisoned => Claim::Poisoned,
            // The CAS expected exactly ABSENT, so it cannot fail with it.
            PageState::Absent => unreachable!("CAS from ABSENT failed with ABSENT"),
        },
    }
}

/// Ends the caller's claim with the word `to`. `Ok(true)` if a waiter
/// sleeps on the word (the caller must wake it); `Err` carries the state
/// found if the claim is no longer the caller's.
fn end_claim(slot: &impl AtomicSlot, me: Owner, to: u64, order: Ordering) -> Result<bool, u64> {
    let mine = me.filling_word();
    match slot.compare_exchange(mine, to, order, Ordering::Relaxed) {
        Ok(_) => Ok(false),
        Err(found) if found == mine | WAITERS => slot
            .compare_exchange(found, to, order, Ordering::Relaxed)
            .map(|_| true),
        Err(found) => Err(found),
    }
}

/// Marks the caller's filled granule present. `Ok(true)`: wake the
/// waiters. `Err` carries the state found if the claim was taken over in
/// the meantime.
pub(crate) fn publish(slot: &impl AtomicSlot, me: Owner) -> Result<bool, PageState> {
    end_claim(slot, me, PRESENT, PUBLISH).map_err(PageState::decode)
}

/// Marks the caller's granule poisoned after its fill failed.
/// `Ok(true)`: wake the waiters.
pub(crate) fn poison(slot: &impl AtomicSlot, me: Owner) -> Result<bool, PageState> {
    end_claim(slot, me, POISONED, Ordering::Release).map_err(PageState::decode)
}

/// Takes over the claim of `dead` (whose process the caller proved gone).
/// `false` if the word no longer shows that claim.
pub(crate) fn take_over(slot: &impl AtomicSlot, dead: Owner, me: Owner) -> bool {
    let theirs = dead.filling_word();
    let mut expected = theirs;
    loop {
        match slot.compare_exchange(
            expected,
            me.filling_word() | (expected & WAITERS),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return true,
            Err(found) if found == theirs | WAITERS && expected == theirs => expected = found,
            Err(_) => return false,
        }
    }
}

/// Announces a waiter on `owner`'s claim: sets `WAITERS` unless set.
/// Returns the word to sleep on while it is unchanged, or `None` if the
/// word no longer shows that claim (look again instead of sleeping).
pub(crate) fn announce_waiter(slot: &impl AtomicSlot, owner: Owner) -> Option<u64> {
    let theirs = owner.filling_word();
    match slot.compare_exchange(
        theirs,
        theirs | WAITERS,
        Ordering::Relaxed,
        Ordering::Relaxed,
    ) {
        Ok(_) => Some(theirs | WAITERS),
        Err(found) if found == theirs | WAITERS => Some(found),
        Err(_) => None,
    }
}

/// The outcome of [`begin_discard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Discard {
    /// The caller holds the granule (`Filling(me)`): punch it, then
    /// [`finish_discard`].
    Claimed,
    /// Someone is filling it: wait for the fill to end, then try again.
    Busy(Owner),
}

/// Claims a granule for discarding, from `Present`, `Absent` or
/// `Poisoned`.
#[cfg(not(hugearena_mutation_discard))]
pub(crate) fn begin_discard(slot: &impl AtomicSlot, me: Owner) -> Discard {
    let mut word = slot.load(Ordering::Relaxed);
    loop {
        if let PageState::Filling(owner) = PageState::decode(word) {
            return Discard::Busy(owner);
        }
        match slot.compare_exchange(word, me.filling_word(), DISCARD_CLAIM, Ordering::Relaxed) {
            Ok(_) => return Discard::Claimed,
            Err(found) => word = found,
        }
    }
}

/// The planted mutation: the old order, which left the word `Present`
/// while the page was punched (and moved it to `Absent` only afterwards).
#[cfg(hugearena_mutation_discard)]
pub fn begin_discard(slot: &impl AtomicSlot, _me: Owner) -> Discard {
    match PageState::decode(slot.load(Ordering::Acquire)) {
        PageState::Filling(owner) => Discard::Busy(owner),
        _ => Discard::Claimed,
    }
}

/// Ends a discard: `Filling(me) → Absent`; the next touch fills the
/// granule again. `Ok(true)`: wake the waiters.
#[cfg(not(hugearena_mutation_discard))]
pub(crate) fn finish_discard(slot: &impl AtomicSlot, me: Owner) -> Result<bool, PageState> {
    end_claim(slot, me, ABSENT, DISCARD_END).map_err(PageState::decode)
}

/// The planted mutation's second half (see `begin_discard`).
#[cfg(hugearena_mutation_discard)]
pub fn finish_discard(slot: &impl AtomicSlot, _me: Owner) -> Result<bool, PageState> {
    let _ = slot.compare_exchange(PRESENT, ABSENT, Ordering::AcqRel, Ordering::Relaxed);
    Ok(false)
}

/// Moves a poisoned granule back to `Absent`, so the next touch fills it
/// again (after a transient failure). `false` if it was not poisoned.
pub(crate) fn unpoison(slot: &impl AtomicSlot) -> bool {
    slot.compare_exchange(POISONED, ABSENT, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    const A: Owner = Owner::new(100, 7);
    const B: Owner = Owner::new(200, 9);

    #[test]
    fn words_round_trip() {
        assert_eq!(PageState::decode(ABSENT), PageState::Absent);
        assert_eq!(PageState::decode(A.filling_word()), PageState::Filling(A));
        assert_eq!(PageState::decode(PRESENT), PageState::Present);
        assert_eq!(PageState::decode(POISONED), PageState::Poisoned);
        let big = Owner::new(u32::MAX, u32::MAX);
        assert_eq!(
            PageState::decode(big.filling_word()),
            PageState::Filling(big)
        );
    }

    #[test]
    fn one_claim_wins_and_the_rest_see_why() {
        let s = AtomicU64::new(ABSENT);
        assert_eq!(claim(&s, A), Claim::Won);
        assert_eq!(claim(&s, B), Claim::Busy(A));
        assert_eq!(publish(&s, B), Err(PageState::Filling(A)));
        assert_eq!(publish(&s, A), Ok(false));
        assert_eq!(claim(&s, B), Claim::Present);
        assert_eq!(begin_discard(&s, B), Discard::Claimed);
        assert_eq!(begin_discard(&s, A), Discard::Busy(B));
        assert_eq!(claim(&s, A), Claim::Busy(B));
        assert_eq!(finish_discard(&s, B), Ok(false));
        assert_eq!(claim(&s, B), Claim::Won);
        assert_eq!(poison(&s, B), Ok(false));
        assert_eq!(claim(&s, A), Claim::Poisoned);
        assert!(unpoison(&s));
        assert!(!unpoison(&s));
        assert_eq!(claim(&s, A), Claim::Won);
    }

    #[test]
    fn take_over_moves_a_dead_claim_once() {
        let s = AtomicU64::new(ABSENT);
        assert_eq!(claim(&s, A), Claim::Won);
        assert!(take_over(&s, A, B));
        assert!(!take_over(&s, A, B));
        assert_eq!(publish(&s, A), Err(PageState::Filling(B)));
        assert_eq!(publish(&s, B), Ok(false));
    }

    #[test]
    fn waiters_survive_a_take_over_and_are_reported_to_the_publisher() {
        let s = AtomicU64::new(ABSENT);
        assert_eq!(claim(&s, A), Claim::Won);
        let word = announce_waiter(&s, A).unwrap();
        assert_eq!(announce_waiter(&s, A), Some(word));
        assert_eq!(announce_waiter(&s, B), None);
        assert_eq!(claim(&s, B), Claim::Busy(A));
        assert!(take_over(&s, A, B));
        assert_eq!(publish(&s, A), Err(PageState::Filling(B)));
        assert_eq!(publish(&s, B), Ok(true));
        assert_eq!(observe(&s), PageState::Present);
    }
}
