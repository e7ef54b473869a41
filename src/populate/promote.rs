//! Promotion: once every granule of a block (2 MiB on `ShmemThp`, a huge
//! page on `HugetlbHgm`) is mapped, `MADV_COLLAPSE` maps the block with one
//! huge-page entry, so resident memory gets huge-page TLB reach.
//!
//! Counting is per process, because mappings are: a block's counter grows
//! by the granules this process mapped with `UFFDIO_CONTINUE`. Reaching
//! the block's size makes the block a candidate; it is collapsed only if
//! the shared page states say every granule is present, because
//! collapsing a block maps every one of its pages, including ones never
//! continued.
#![allow(unsafe_code)] // `MADV_COLLAPSE` on the populator's own primary view

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::Thread;

use super::bits::AtomicBits;
use super::stats::Counters;
use crate::sys::Errno;
use crate::sys::mman::{self, Advice};

/// Attempts per block when `MADV_COLLAPSE` reports a transient failure.
const COLLAPSE_TRIES: u32 = 16;

/// When to collapse a full block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Promotion {
    /// Never: blocks stay mapped at the granule size.
    Off,
    /// In the thread whose mapping completed the block (it pays the
    /// collapse: microseconds with shmem THP enabled, milliseconds when
    /// the kernel has to copy).
    Inline,
    /// In a background thread, woken when a block completes.
    #[default]
    Background,
}

/// A block's mapped count once it has been collapsed: later mappings in
/// it (after another process's collapse zapped them, say) add to it
/// without ever promoting it again.
const COLLAPSED: u32 = 1 << 31;

/// Per-block counters and the pending set of one populator.
///
/// A count reaching the block's size is only a hint: a page zapped from
/// this process's mapping (by another process's collapse) and mapped again
/// is counted twice. Before collapsing, the caller's `complete` check reads
/// the shared page states: a block is collapsed only when every one of its
/// granules is present, because collapsing maps them all.
#[derive(Debug)]
pub(crate) struct Promoter {
    mode: Promotion,
    primary: usize,
    block_bytes: usize,
    granules_per_block: u32,
    mapped: Box<[AtomicU32]>,
    /// Blocks waiting for the background thread.
    pending: AtomicBits,
    worker: OnceLock<Thread>,
    stop: AtomicBool,
    /// Drains in progress (taken blocks not yet collapsed).
    draining: AtomicU32,
    /// Background drains of the region running ([`Promoter::hold`]):
    /// while any is, blocks are not collapsed but queued.
    holds: AtomicU32,
}

/// Whether every granule of a block is present (shared page states).
pub(crate) type Complete<'a> = &'a dyn Fn(usize) -> bool;

impl Promoter {
    pub(crate) fn new(
        mode: Promotion,
        primary: usize,
        len: usize,
        block_bytes: usize,
        granule: usize,
    ) -> Promoter {
        let blocks = len / block_bytes;
        Promoter {
            mode,
            primary,
            block_bytes,
            granules_per_block: (block_bytes / granule) as u32,
            mapped: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            pending: AtomicBits::new(blocks),
            worker: OnceLock::new(),
            stop: AtomicBool::new(false),
            draining: AtomicU32::new(0),
            holds: AtomicU32::new(0),
        }
    }

    /// Holds collapses back while a background drain of the region runs:
    /// a collapse that has to copy (shmem without huge folios) costs a
    /// CPU for milliseconds per block and stalls every access to the
    /// block, and during a lazy restore those are the requests the drain
    /// is there to serve. Completed blocks are queued, and the background
    /// thread collapses them when the last hold ends. Explicit flushes
    /// and `Promotion::Inline` are not held back.
    pub(crate) fn hold(&self) {
        self.holds.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends a [`hold`](Self::hold).
    pub(crate) fn release(&self) {
        if self.holds.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(worker) = self.worker.get()
        {
            worker.unpark();
        }
    }

    fn held(&self) -> bool {
        self.holds.load(Ordering::Acquire) != 0
    }

    pub(crate) fn mode(&self) -> Promotion {
        self.mode
    }

    pub(crate) fn granules_per_block(&self) -> usize {
        self.granules_per_block as usize
    }

    /// Accounts granules `[from, to)` as mapped in this process and
    /// promotes the blocks this completes. Signal-safe.
    pub(crate) fn on_mapped(
        &self,
        from: usize,
        to: usize,
        counters: &Counters,
        complete: Complete<'_>,
    ) {
        let per = self.granules_per_block as usize;
        let mut at = from;
        while at < to {
            let block = at / per;
            let block_end = ((block + 1) * per).min(to);
            let n = (block_end - at) as u32;
            if let Some(count) = self.mapped.get(block) {
                let before = count.fetch_add(n, Ordering::AcqRel);
                if before < COLLAPSED && before + n >= self.granules_per_block {
                    self.promote(block, counters, complete);
                }
            }
            at = block_end;
        }
    }

    fn promote(&self, block: usize, counters: &Counters, complete: Complete<'_>) {
        match self.mode {
            Promotion::Off => {}
            Promotion::Inline => self.collapse_block(block, counters, complete),
            Promotion::Background => {
                self.pending.insert(block);
                if let Some(worker) = self.worker.get() {
                    worker.unpark();
                }
            }
        }
    }

    /// Maps block `block`, whose granules this thread just made present
    /// all at once, with one huge-page entry now, instead of one
    /// `UFFDIO_CONTINUE` per run and a collapse later. Whether it did (if
    /// not, the caller maps the granules itself). Signal-safe.
    pub(crate) fn collapse_filled(&self, block: usize, counters: &Counters) -> bool {
        // Held: mapped at the granule size, counted, and queued.
        let held = self.mode == Promotion::Background && self.held();
        if self.mode == Promotion::Off || held || !self.collapse(block) {
            return false;
        }
        if let Some(count) = self.mapped.get(block) {
            count.store(COLLAPSED, Ordering::Release);
        }
        Counters::bump(&counters.collapses);
        true
    }

    fn collapse_block(&self, block: usize, counters: &Counters, complete: Complete<'_>) {
        let Some(count) = self.mapped.get(block) else {
            return;
        };
        // Claimed by setting the mark first: a block queued or triggered
        // twice (a mapping counted twice) is collapsed once.
        if count.fetch_or(COLLAPSED, Ordering::AcqRel) >= COLLAPSED {
            return;
        }
        if !complete(block) {
            // Counted twice somewhere: the block is promoted when its
            // missing granules are mapped here (they count again).
            count.fetch_and(!COLLAPSED, Ordering::AcqRel);
            return;
        }
        if self.collapse(block) {
            Counters::bump(&counters.collapses)
        } else {
            // The mark stays: the block keeps its 4 KiB mappings rather
            // than failing again on every later mapping.
            Counters::bump(&counters.collapse_failures)
        }
    }

    /// `MADV_COLLAPSE` of block `block` of the primary, tried again while
    /// the kernel reports a transient failure. Whether it worked.
    /// Signal-safe.
    fn collapse(&self, block: usize) -> bool {
        let start = (self.primary + block * self.block_bytes) as *mut u8;
        for _ in 0..COLLAPSE_TRIES {
            // SAFETY: the block lies inside the primary view and every
            // page of it is present (callers check the page states, or
            // filled the block themselves): mapping all of them changes no
            // byte anyone reads, only how the block is mapped.
            match unsafe { mman::madvise(start, self.block_bytes, Advice::Collapse) } {
                Ok(()) => return true,
                // Transient when another thread of this process is mapping
                // a page of the block at the same moment (a fault taken
                // while an earlier collapse retracted its page table): the
                // kernel reports EAGAIN, or EINVAL for the scan results it
                // has no other errno for. Both pass on a retry.
                Err(e) if e.errno() == Errno::EAGAIN || e.errno() == Errno::EINVAL => {
                    std::thread::yield_now()
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Forgets the mapped counts of the blocks in `[offset, offset + len)`
    /// of the primary, whose pages were punched out (they count up again
    /// as they are mapped anew).
    pub(crate) fn forget(&self, offset: usize, len: usize) {
        let first = offset / self.block_bytes;
        for count in self
            .mapped
            .iter()
            .skip(first)
            .take(len.div_ceil(self.block_bytes))
        {
            count.store(0, Ordering::Release);
        }
    }

    /// Collapses every pending block now, in the calling thread, and waits
    /// for blocks another thread took to be collapsed too.
    pub(crate) fn flush(&self, counters: &Counters, complete: Complete<'_>) {
        self.drain(counters, complete);
        while self.draining.load(Ordering::Acquire) != 0 {
            std::thread::yield_now();
        }
    }

    /// Collapses every pending block now, in the calling thread.
    fn drain(&self, counters: &Counters, complete: Complete<'_>) {
        // Counted before taking blocks, so `flush` cannot miss them.
        self.draining.fetch_add(1, Ordering::AcqRel);
        self.pending
            .take(|block| self.collapse_block(block, counters, complete));
        self.draining.fetch_sub(1, Ordering::AcqRel);
    }

    /// The background thread's loop; returns when [`Promoter::stop`] is
    /// called.
    pub(crate) fn run_worker(&self, counters: &Counters, complete: Complete<'_>) {
        let _ = self.worker.set(std::thread::current());
        while !self.stop.load(Ordering::Acquire) {
            if !self.held() {
                self.drain(counters, complete);
            }
            // A timeout covers an unpark that raced with `set` above.
            std::thread::park_timeout(std::time::Duration::from_millis(100));
        }
        self.drain(counters, complete);
    }

    /// In a forked child: the parent's threads that were collapsing blocks
    /// are not there, so nobody is draining.
    pub(crate) fn after_fork(&self) {
        self.draining.store(0, Ordering::Relaxed);
    }

    /// Asks the background thread to finish.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(worker) = self.worker.get() {
            worker.unpark();
        }
    }
}
