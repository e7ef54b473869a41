//! Block allocation in this process: before the first fill of a 2 MiB
//! block, the block gets all its memory in one step (the region's
//! [`BlockAllocation`]), so fills write into pages that exist, a zero fill
//! is nothing at all, and promotion remaps the block without copying.
//!
//! What this process knows is only a hint: another process may punch a
//! page of an allocated block out (a discard). A fill that trusted the
//! hint then finds the page gone when it maps it (`EFAULT`) and fills it
//! again (see `Core::refill_vanished`). A block that lost some of its pages
//! is not allocated whole again: that would bring back every hole.
#![allow(unsafe_code)] // madvise of the region's own alias

use super::bits::AtomicBits;
use super::stats::Counters;
use crate::region::BlockAllocation;
use crate::sys::mman::{self, Advice};

/// Per-block allocation state of one populator.
#[derive(Debug)]
pub(crate) struct BlockAllocator {
    alias: usize,
    block_bytes: usize,
    granules_per_block: usize,
    /// Blocks whose pages this process allocated (or found allocated) and
    /// has not discarded part of since.
    allocated: AtomicBits,
    /// Blocks filled a run at a time, without trying again on every fill:
    /// their allocation failed (no free 2 MiB of memory, say), or part of
    /// them was discarded.
    given_up: AtomicBits,
}

impl BlockAllocator {
    /// The allocator for a region whose alias starts at `alias` and holds
    /// `len` bytes, or `None` if its pages are allocated as they are
    /// filled. The one way there is: `MADV_POPULATE_WRITE` of the alias
    /// block ([`BlockAllocation::PopulateAlias`]).
    pub(crate) fn new(
        how: BlockAllocation,
        alias: usize,
        len: usize,
        block_bytes: usize,
        granule: usize,
    ) -> Option<BlockAllocator> {
        if how == BlockAllocation::ByRun || block_bytes <= granule {
            return None;
        }
        let blocks = len.div_ceil(block_bytes);
        Some(BlockAllocator {
            alias,
            block_bytes,
            granules_per_block: block_bytes / granule,
            allocated: AtomicBits::new(blocks),
            given_up: AtomicBits::new(blocks),
        })
    }

    /// Gives every block holding granules `[from, to)` its memory, unless
    /// this process already did (or gave up on it). Whether all of them
    /// have it now. Async-signal-safe.
    pub(crate) fn ensure(&self, from: usize, to: usize, counters: &Counters) -> bool {
        let per = self.granules_per_block;
        let mut all = true;
        for block in from / per..to.div_ceil(per) {
            if self.allocated.contains(block) {
                continue;
            }
            if self.given_up.contains(block) {
                all = false;
            } else if self.allocate(block) {
                // Two threads may allocate the same block at once (the
                // second call only maps it): it is counted once.
                if self.allocated.insert_new(block) {
                    Counters::bump(&counters.blocks_allocated);
                }
            } else {
                if self.given_up.insert_new(block) {
                    Counters::bump(&counters.block_allocation_failures);
                }
                all = false;
            }
        }
        all
    }

    fn allocate(&self, block: usize) -> bool {
        let start = (self.alias + block * self.block_bytes) as *mut u8;
        // SAFETY: the alias is this region's, never registered; populating
        // allocates (zeroed) pages or maps existing ones, and changes no
        // byte.
        unsafe { mman::madvise(start, self.block_bytes, Advice::PopulateWrite) }.is_ok()
    }

    /// Granules `[from, to)` were punched out (here, or found missing).
    /// A block that lost all its granules is empty again and will be
    /// allocated whole at its next fill; a block that lost only some is
    /// filled a run at a time from now on in this process: allocating it
    /// whole again would bring back every hole, and a buffer pool that
    /// evicts single pages would get back all the memory it gave up.
    pub(crate) fn discarded(&self, from: usize, to: usize) {
        let per = self.granules_per_block;
        for block in from / per..to.div_ceil(per) {
            self.allocated.remove(block);
            let whole = from <= block * per && (block + 1) * per <= to;
            if whole {
                self.given_up.remove(block);
            } else {
                self.given_up.insert_new(block);
            }
        }
    }
}
