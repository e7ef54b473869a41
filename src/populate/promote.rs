//! Promotion: once every granule of a block (2 MiB on `ShmemThp`, a huge
//! page on `HugetlbHgm`) is mapped, `MADV_COLLAPSE` maps the block with one
//! huge-page entry, so resident memory gets huge-page TLB reach.
//!
//! Counting is per process, because mappings are: a block's counter grows
//! by the granules this process mapped with `UFFDIO_CONTINUE`, and reaches
//! the block's size only when all of them are present in the page cache.
//! That matters: collapsing a block maps every one of its pages, including
//! ones never continued.
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

/// Per-block counters and the pending set of one populator.
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
}

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
        }
    }

    pub(crate) fn mode(&self) -> Promotion {
        self.mode
    }

    /// Accounts granules `[from, to)` as mapped in this process and
    /// promotes the blocks this completes. Signal-safe.
    pub(crate) fn on_mapped(&self, from: usize, to: usize, counters: &Counters) {
        let per = self.granules_per_block as usize;
        let mut at = from;
        while at < to {
            let block = at / per;
            let block_end = ((block + 1) * per).min(to);
            let n = (block_end - at) as u32;
            if let Some(count) = self.mapped.get(block) {
                if count.fetch_add(n, Ordering::AcqRel) + n == self.granules_per_block {
                    self.promote(block, counters);
                }
            }
            at = block_end;
        }
    }

    fn promote(&self, block: usize, counters: &Counters) {
        match self.mode {
            Promotion::Off => {}
            Promotion::Inline => self.collapse(block, counters),
            Promotion::Background => {
                self.pending.insert(block);
                if let Some(worker) = self.worker.get() {
                    worker.unpark();
                }
            }
        }
    }

    fn collapse(&self, block: usize, counters: &Counters) {
        let start = (self.primary + block * self.block_bytes) as *mut u8;
        for _ in 0..COLLAPSE_TRIES {
            // SAFETY: the block lies inside the primary view, and every page
            // of it is present in the page cache with its final bytes (its
            // counter is full), so mapping all of them changes no byte
            // anyone reads.
            match unsafe { mman::madvise(start, self.block_bytes, Advice::Collapse) } {
                Ok(()) => return Counters::bump(&counters.collapses),
                // Transient when another thread of this process is mapping
                // a page of the block at the same moment (a fault taken
                // while an earlier collapse retracted its page table): the
                // kernel reports EAGAIN, or EINVAL for the scan results it
                // has no other errno for. Both pass on a retry.
                Err(e) if e.errno() == Errno::EAGAIN || e.errno() == Errno::EINVAL => {
                    std::thread::yield_now()
                }
                Err(_) => break,
            }
        }
        Counters::bump(&counters.collapse_failures);
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
    pub(crate) fn flush(&self, counters: &Counters) {
        self.drain(counters);
        while self.draining.load(Ordering::Acquire) != 0 {
            std::thread::yield_now();
        }
    }

    /// Collapses every pending block now, in the calling thread.
    fn drain(&self, counters: &Counters) {
        // Counted before taking blocks, so `flush` cannot miss them.
        self.draining.fetch_add(1, Ordering::AcqRel);
        self.pending.take(|block| self.collapse(block, counters));
        self.draining.fetch_sub(1, Ordering::AcqRel);
    }

    /// The background thread's loop; returns when [`Promoter::stop`] is
    /// called.
    pub(crate) fn run_worker(&self, counters: &Counters) {
        let _ = self.worker.set(std::thread::current());
        while !self.stop.load(Ordering::Acquire) {
            self.drain(counters);
            // A timeout covers an unpark that raced with `set` above.
            std::thread::park_timeout(std::time::Duration::from_millis(100));
        }
        self.drain(counters);
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
