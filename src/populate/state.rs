//! The page-state word: one per population granule, in the region's shared
//! metadata, so every thread of every process agrees on who fills a page.
//!
//! # Protocol
//!
//! ```text
//!            claim (CAS, AcqRel)            publish (CAS, Release)
//!   Absent ─────────────────────▶ Filling(owner) ─────────────────▶ Present
//!     ▲                             │   ▲    │ poison (CAS, Release)   │
//!     │                             │   └────┘ take_over(dead owner)   │
//!     │                             ▼          (CAS, AcqRel)           │
//!     │                          Poisoned                              │
//!     └──────────────────────── evict (CAS, AcqRel) ───────────────────┘
//! ```
//!
//! Encoding (`u64`): bits 62–63 are the tag (0 Absent, 1 Filling,
//! 2 Present, 3 Poisoned). A Filling word carries its owner: the pid in
//! bits 0–31 and, in bits 32–61, a token that defeats pid reuse (the low
//! 30 bits of the owner process's start time).
//!
//! - **claim**: whoever moves `Absent → Filling(me)` is the one filler of
//!   the granule; everyone else sees `Filling` (wait or help later),
//!   `Present` (map it) or `Poisoned` (the fill failed; report it).
//! - **publish**: the filler's writes to the page (through the alias)
//!   happen before its `Release` CAS to `Present`; anyone who loads
//!   `Present` with `Acquire` may map and read the page.
//! - **take_over**: a `Filling(owner)` whose owner process is dead is moved
//!   to `Filling(me)` by one CAS; the loser of a race sees the winner's
//!   claim. A slow-but-alive owner that lost its claim this way fails its
//!   publish CAS and leaves the granule to the new owner (both wrote the
//!   same bytes from the same source).
//! - **evict**: `Present → Absent` once the caller has made sure nobody
//!   maps the page (it zaps the primary's PTEs and frees the backing page
//!   before the next claim can fill it again).
//!
//! Every transition is a single CAS from an exact expected value, so no
//! transition can be applied to a word that changed in between.

use crate::sync::{AtomicSlot, Ordering};

const TAG_SHIFT: u32 = 62;
const TAG_ABSENT: u64 = 0;
const TAG_FILLING: u64 = 1;
const TAG_PRESENT: u64 = 2;
const TAG_POISONED: u64 = 3;
const TOKEN_BITS: u32 = 30;

/// The word of an absent granule (and of a fresh, zeroed table).
pub const ABSENT: u64 = TAG_ABSENT << TAG_SHIFT;
/// The word of a present granule.
pub const PRESENT: u64 = TAG_PRESENT << TAG_SHIFT;
/// The word of a poisoned granule.
pub const POISONED: u64 = TAG_POISONED << TAG_SHIFT;

/// Ordering of the publishing CAS. `--cfg hugearena_mutation` weakens it on
/// purpose so CI can check that the loom tests notice.
#[cfg(not(hugearena_mutation))]
const PUBLISH: Ordering = Ordering::Release;
#[cfg(hugearena_mutation)]
const PUBLISH: Ordering = Ordering::Relaxed;

/// Who holds a `Filling` claim: a process, told apart from a later process
/// that reuses its pid by a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Low 30 bits of the process's start time (or another per-process
    /// value that a reused pid will not repeat).
    pub token: u32,
}

impl Owner {
    /// An owner from its parts; the token is cut to 30 bits.
    pub const fn new(pid: u32, token: u32) -> Owner {
        Owner {
            pid,
            token: token & ((1 << TOKEN_BITS) - 1),
        }
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
    pub const fn decode(word: u64) -> PageState {
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
pub enum Claim {
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
pub fn observe(slot: &impl AtomicSlot) -> PageState {
    PageState::decode(slot.load(Ordering::Acquire))
}

/// Tries to become the filler of an absent granule.
pub fn claim(slot: &impl AtomicSlot, me: Owner) -> Claim {
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

/// Marks the caller's filled granule present. `Err` carries the state
/// found if the claim was taken over in the meantime.
pub fn publish(slot: &impl AtomicSlot, me: Owner) -> Result<(), PageState> {
    slot.compare_exchange(me.filling_word(), PRESENT, PUBLISH, Ordering::Relaxed)
        .map(drop)
        .map_err(PageState::decode)
}

/// Marks the caller's granule poisoned after its fill failed.
pub fn poison(slot: &impl AtomicSlot, me: Owner) -> Result<(), PageState> {
    slot.compare_exchange(
        me.filling_word(),
        POISONED,
        Ordering::Release,
        Ordering::Relaxed,
    )
    .map(drop)
    .map_err(PageState::decode)
}

/// Takes over the claim of `dead` (whose process the caller found gone).
/// `false` if the word no longer shows that claim.
pub fn take_over(slot: &impl AtomicSlot, dead: Owner, me: Owner) -> bool {
    slot.compare_exchange(
        dead.filling_word(),
        me.filling_word(),
        Ordering::AcqRel,
        Ordering::Acquire,
    )
    .is_ok()
}

/// Moves a present granule back to absent. `false` if it was not present.
pub fn evict(slot: &impl AtomicSlot) -> bool {
    slot.compare_exchange(PRESENT, ABSENT, Ordering::AcqRel, Ordering::Relaxed)
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
        assert_eq!(publish(&s, A), Ok(()));
        assert_eq!(claim(&s, B), Claim::Present);
        assert!(evict(&s));
        assert!(!evict(&s));
        assert_eq!(claim(&s, B), Claim::Won);
        assert_eq!(poison(&s, B), Ok(()));
        assert_eq!(claim(&s, A), Claim::Poisoned);
    }

    #[test]
    fn take_over_moves_a_dead_claim_once() {
        let s = AtomicU64::new(ABSENT);
        assert_eq!(claim(&s, A), Claim::Won);
        assert!(take_over(&s, A, B));
        assert!(!take_over(&s, A, B));
        assert_eq!(publish(&s, A), Err(PageState::Filling(B)));
        assert_eq!(publish(&s, B), Ok(()));
    }
}
