//! The arena's tables as slices resolved once, when the arena is attached,
//! instead of a bounds-checked lookup in the region per word touched.

#![allow(unsafe_code)] // slices over the region's primary view, made once

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use super::layout::{
    ArenaLayout, BLOCK_WORD_STRIDE, LEDGER_BYTES, SPAN, SPAN_DESC, SPAN_DESC_WORDS,
};
use crate::error::Result;
use crate::region::{Region, SharedAtomic};

/// A slice of shared atomic words in the region's primary view.
///
/// It is made from a checked `&[T]` of the view, and lives inside the
/// [`Arena`](super::Arena) that owns the populator that keeps the region,
/// and so the view, mapped: it never outlives the words it points to.
#[derive(Debug)]
pub(super) struct SharedSlice<T>(NonNull<[T]>);

// SAFETY: the words are atomics (`SharedAtomic: Sync`) made for sharing
// across threads and processes; moving the pointer moves no state.
unsafe impl<T: SharedAtomic> Send for SharedSlice<T> {}
// SAFETY: as above.
unsafe impl<T: SharedAtomic> Sync for SharedSlice<T> {}

impl<T: SharedAtomic> SharedSlice<T> {
    fn new(words: &[T]) -> SharedSlice<T> {
        SharedSlice(NonNull::from(words))
    }

    #[inline]
    pub(super) fn get(&self) -> &[T] {
        // SAFETY: see the type: the view outlives `self`, and the words are
        // only ever accessed atomically.
        unsafe { self.0.as_ref() }
    }
}

/// Every table of one arena.
#[derive(Debug)]
pub(super) struct Tables {
    pub(super) header: SharedSlice<AtomicU64>,
    /// One word per 2 MiB block, each in its own cache line
    /// (`BLOCK_WORD_STRIDE` words apart).
    pub(super) blocks: SharedSlice<AtomicU64>,
    /// Eight words (512 bits) per block.
    pub(super) bitmaps: SharedSlice<AtomicU64>,
    /// One word per 4 KiB page.
    pub(super) runs: SharedSlice<AtomicU32>,
    /// `SPAN_DESC / 8` words per 64 KiB span slot.
    pub(super) spans: SharedSlice<AtomicU64>,
    /// Span slots: `spans` holds this many descriptors.
    span_slots: u64,
    /// The thread caches' ledger (`ledger`).
    pub(super) ledger: SharedSlice<AtomicU64>,
}

impl Tables {
    /// Resolves the tables of `layout` in `region` (checked here, once).
    pub(super) fn new(
        region: &Region,
        layout: &ArenaLayout,
        header_words: usize,
    ) -> Result<Tables> {
        let pages = layout.data_len / super::layout::PAGE;
        let slots = layout.data_len / SPAN;
        let words = |offset: u64, count: u64| {
            region.shared_atomics::<AtomicU64>(offset as usize, count as usize)
        };
        Ok(Tables {
            header: SharedSlice::new(words(0, header_words as u64)?),
            blocks: SharedSlice::new(words(
                layout.blocks_offset,
                layout.blocks * BLOCK_WORD_STRIDE as u64,
            )?),
            bitmaps: SharedSlice::new(words(layout.bitmaps_offset, layout.blocks * 8)?),
            runs: SharedSlice::new(
                region.shared_atomics::<AtomicU32>(layout.runs_offset as usize, pages as usize)?,
            ),
            spans: SharedSlice::new(words(layout.spans_offset, slots * SPAN_DESC / 8)?),
            span_slots: slots,
            ledger: SharedSlice::new(words(layout.ledger_offset, LEDGER_BYTES / 8)?),
        })
    }

    /// Span slot `slot`'s descriptor, `None` past the last slot: one
    /// compare against the count checked when the table was resolved (a
    /// slice index would add its own, which the free path pays for).
    #[inline(always)]
    pub(super) fn span_desc(&self, slot: u64) -> Option<&[AtomicU64; SPAN_DESC_WORDS]> {
        if slot >= self.span_slots {
            return None;
        }
        let at = slot as usize * SPAN_DESC_WORDS;
        // SAFETY: `spans` holds `span_slots * SPAN_DESC_WORDS` words (`new`),
        // so the descriptor lies inside it.
        Some(unsafe {
            &*self
                .spans
                .get()
                .as_ptr()
                .add(at)
                .cast::<[AtomicU64; SPAN_DESC_WORDS]>()
        })
    }
}
