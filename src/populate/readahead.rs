//! Sequential readahead: a fault that continues a run of faults also
//! populates the next granules, so a scan pays one trap per window instead
//! of one per page.
//!
//! The detector keeps a few streams in process-local atomics. A stream
//! remembers the granule its next fault is expected at and its window. A
//! fault at the expected granule is a hit: the window doubles (from
//! [`INITIAL_WINDOW`] up to the cap) and that many granules after the fault
//! are populated with it. Any other fault starts a new stream in a slot
//! picked by its index. Races between threads only make a hint more or
//! less eager: correctness rests on the page-state claims, not on this.
//!
//! Fault-around (off by default) serves random access instead: any fault
//! also populates the rest of its aligned cluster, so a process that
//! touches scattered pages of a restored region (a hash index, say) pays
//! one trap per cluster it reaches instead of one per page.

use std::sync::atomic::{AtomicU64, Ordering};

/// Streams tracked at once (e.g. concurrent scans).
const STREAMS: usize = 8;
/// The window after the first sequential hit.
pub(crate) const INITIAL_WINDOW: u64 = 4;
/// Bits of a stream word that hold the window.
const WINDOW_BITS: u32 = 16;
const WINDOW_MASK: u64 = (1 << WINDOW_BITS) - 1;

/// Stream word: `(expected granule + 1) << 16 | window`; 0 is an empty slot.
fn encode(expected: u64, window: u64) -> u64 {
    ((expected + 1) << WINDOW_BITS) | window.min(WINDOW_MASK)
}

/// Detects sequential faults and sizes the window.
#[derive(Debug)]
pub(crate) struct Readahead {
    streams: [AtomicU64; STREAMS],
    cap: u64,
    /// Granules per block when a hit's window stretches to the end of the
    /// block the fault is in (0: it does not).
    block: u64,
    /// Granules of a fault-around cluster (0 or 1: off).
    around: u64,
}

impl Readahead {
    /// A detector whose window grows to at most `cap` granules (0 turns
    /// readahead off). With `block` > 0, a hit's window stretches to the
    /// end of the `block`-granule block the fault is in: where blocks are
    /// allocated whole, a scan then fills and maps whole blocks, one fault
    /// each.
    pub(crate) fn new(cap: u64, block: u64) -> Readahead {
        Readahead {
            streams: std::array::from_fn(|_| AtomicU64::new(0)),
            cap: cap.min(WINDOW_MASK),
            block,
            around: 0,
        }
    }

    /// Also populates, after any fault, the rest of its aligned cluster of
    /// `granules` (0 or 1: off).
    pub(crate) fn with_fault_around(mut self, granules: u64) -> Readahead {
        self.around = granules;
        self
    }

    /// Records a fault at granule `index` and returns how many granules
    /// after it to populate as well: the sequential window, or the rest of
    /// its fault-around cluster, whichever reaches further.
    pub(crate) fn on_fault(&self, index: u64) -> u64 {
        let around = match self.around {
            0 | 1 => 0,
            n => n - 1 - index % n,
        };
        self.sequential(index).max(around)
    }

    /// Records a fault at granule `index` and returns how many granules
    /// after it to populate as well (0 if the fault is not sequential).
    /// The caller clips the window to the region.
    fn sequential(&self, index: u64) -> u64 {
        if self.cap == 0 {
            return 0;
        }
        for slot in &self.streams {
            let word = slot.load(Ordering::Relaxed);
            if word >> WINDOW_BITS != index + 1 {
                continue;
            }
            let window = ((word & WINDOW_MASK) * 2).clamp(INITIAL_WINDOW.min(self.cap), self.cap);
            let reach = match self.block {
                0 => window,
                block => window.max((index / block + 1) * block - index - 1),
            };
            let next = encode(index + 1 + reach, window);
            if slot
                .compare_exchange(word, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return reach;
            }
            // Another thread advanced this stream: this fault is not the
            // one it expected any more.
            return 0;
        }
        // Faults within 256 KiB of each other (at 4 KiB) share a slot; far
        // apart ones spread over the table.
        let hash = (index >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61;
        let slot = &self.streams[hash as usize % STREAMS];
        slot.store(encode(index + 1, 0), Ordering::Relaxed);
        0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_scan_grows_its_window_to_the_cap() {
        let ra = Readahead::new(16, 0);
        assert_eq!(ra.on_fault(100), 0, "a first fault is not a run");
        assert_eq!(ra.on_fault(101), 4);
        // 102..=105 were populated; the next fault is at 106.
        assert_eq!(ra.on_fault(106), 8);
        assert_eq!(ra.on_fault(115), 16);
        assert_eq!(ra.on_fault(132), 16, "capped");
    }

    #[test]
    fn random_faults_get_no_readahead_and_off_means_off() {
        let ra = Readahead::new(16, 0);
        for i in [5, 900, 17, 4000, 33] {
            assert_eq!(ra.on_fault(i), 0);
        }
        let off = Readahead::new(0, 0);
        assert_eq!(off.on_fault(1), 0);
        assert_eq!(off.on_fault(2), 0);
    }

    #[test]
    fn with_blocks_a_hit_reaches_the_end_of_its_block() {
        let ra = Readahead::new(16, 512);
        assert_eq!(ra.on_fault(512), 0);
        assert_eq!(ra.on_fault(513), 510, "the rest of block 1");
        assert_eq!(ra.on_fault(1024), 511, "all of block 2 but the fault");
        assert_eq!(ra.on_fault(1536), 511);
        let ra = Readahead::new(0, 512);
        assert_eq!((ra.on_fault(1), ra.on_fault(2)), (0, 0), "off means off");
    }

    #[test]
    fn fault_around_fills_the_rest_of_the_cluster() {
        let ra = Readahead::new(16, 0).with_fault_around(16);
        assert_eq!(ra.on_fault(37), 10, "37 → the end of 32..48");
        assert_eq!(ra.on_fault(48), 15);
        assert_eq!(ra.on_fault(63), 0);
        // A sequential run still grows past the cluster.
        let ra = Readahead::new(64, 0).with_fault_around(4);
        ra.on_fault(100);
        assert_eq!(ra.on_fault(101), 4);
        assert_eq!(ra.on_fault(106), 8);
        let off = Readahead::new(16, 0).with_fault_around(1);
        assert_eq!(off.on_fault(5), 0);
    }

    #[test]
    fn interleaved_scans_keep_their_own_streams() {
        let ra = Readahead::new(64, 0);
        ra.on_fault(0);
        ra.on_fault(1 << 20);
        assert_eq!(ra.on_fault(1), 4);
        assert_eq!(ra.on_fault((1 << 20) + 1), 4);
    }
}
