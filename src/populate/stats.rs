//! What a populator counts and records, written from any thread, including
//! a SIGBUS handler: only atomics, no allocation, no locks. Readers turn the
//! records into plain numbers and an `hdrhistogram` when asked.
#![allow(unsafe_code)] // the write-once record slots

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Live counters of one populator (this process only).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Faults read from the userfaultfd by handler threads.
    pub faults_handler: AtomicU64,
    /// Faults resolved by the faulting thread in its SIGBUS handler.
    pub faults_in_thread: AtomicU64,
    /// `populate()` calls.
    pub populate_calls: AtomicU64,
    /// Granules this process filled from the source.
    pub fills: AtomicU64,
    /// `UFFDIO_CONTINUE` calls that mapped something.
    pub maps: AtomicU64,
    /// Granules filled or mapped ahead of a sequential run of faults.
    pub readahead: AtomicU64,
    /// Granules this process poisoned after a source error.
    pub poisoned: AtomicU64,
    /// Claims of dead processes this process took over.
    pub takeovers: AtomicU64,
    /// Fills tried again after a transient source error.
    pub fill_retries: AtomicU64,
    /// Present granules whose page had vanished from the file (punched
    /// behind the protocol's back) and were filled again.
    pub refills: AtomicU64,
    /// Granules dropped with `discard`.
    pub discards: AtomicU64,
    /// Blocks promoted to huge mappings with `MADV_COLLAPSE`.
    pub collapses: AtomicU64,
    /// `MADV_COLLAPSE` calls that failed (the block stays 4 KiB-mapped).
    pub collapse_failures: AtomicU64,
    /// Blocks given their memory in one step before their first fill.
    pub blocks_allocated: AtomicU64,
    /// Blocks whose one-step allocation failed (filled a run at a time).
    pub block_allocation_failures: AtomicU64,
}

/// The populator's counters at one moment, plus the fill latency
/// distribution.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Faults read from the userfaultfd by handler threads.
    pub faults_handler: u64,
    /// Faults resolved by the faulting thread in its SIGBUS handler.
    pub faults_in_thread: u64,
    /// `populate()` calls.
    pub populate_calls: u64,
    /// Granules this process filled from the source.
    pub fills: u64,
    /// `UFFDIO_CONTINUE` calls that mapped something.
    pub maps: u64,
    /// Granules filled or mapped ahead of a sequential run of faults.
    pub readahead: u64,
    /// Granules this process poisoned after a source error.
    pub poisoned: u64,
    /// Claims of dead processes this process took over.
    pub takeovers: u64,
    /// Fills tried again after a transient source error.
    pub fill_retries: u64,
    /// Present granules whose page had vanished from the file (punched
    /// behind the protocol's back) and were filled again.
    pub refills: u64,
    /// Granules dropped with `discard`.
    pub discards: u64,
    /// Blocks promoted to huge mappings with `MADV_COLLAPSE`.
    pub collapses: u64,
    /// `MADV_COLLAPSE` calls that failed (the block stays 4 KiB-mapped).
    pub collapse_failures: u64,
    /// Blocks given their memory in one step before their first fill
    /// (see [`BlockAllocation`](crate::BlockAllocation)).
    pub blocks_allocated: u64,
    /// Blocks whose one-step allocation failed (no free 2 MiB of memory,
    /// say): they were filled a run at a time.
    pub block_allocation_failures: u64,
    /// Time to fill one granule from the source, in nanoseconds (recorded
    /// at 1/8-octave resolution: values are within 12.5 %).
    pub fill_latency: hdrhistogram::Histogram<u64>,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, fill_latency: hdrhistogram::Histogram<u64>) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            faults_handler: get(&self.faults_handler),
            faults_in_thread: get(&self.faults_in_thread),
            populate_calls: get(&self.populate_calls),
            fills: get(&self.fills),
            maps: get(&self.maps),
            readahead: get(&self.readahead),
            poisoned: get(&self.poisoned),
            takeovers: get(&self.takeovers),
            fill_retries: get(&self.fill_retries),
            refills: get(&self.refills),
            discards: get(&self.discards),
            collapses: get(&self.collapses),
            collapse_failures: get(&self.collapse_failures),
            blocks_allocated: get(&self.blocks_allocated),
            block_allocation_failures: get(&self.block_allocation_failures),
            fill_latency,
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "faults: {} handler, {} in-thread; populate calls {}; fills {}; maps {}; \
             readahead {}; poisoned {}; takeovers {}; retries {}; refills {}; discards {}; \
             collapses {} ({} failed); blocks allocated {} ({} failed)",
            self.faults_handler,
            self.faults_in_thread,
            self.populate_calls,
            self.fills,
            self.maps,
            self.readahead,
            self.poisoned,
            self.takeovers,
            self.fill_retries,
            self.refills,
            self.discards,
            self.collapses,
            self.collapse_failures,
            self.blocks_allocated,
            self.block_allocation_failures
        )?;
        let h = &self.fill_latency;
        if !h.is_empty() {
            write!(
                f,
                "; fill latency p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                h.value_at_quantile(0.999) as f64 / 1e3,
                h.max() as f64 / 1e3
            )?;
        }
        Ok(())
    }
}

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) << SUB_BITS;

/// A latency histogram that records with one relaxed `fetch_add`: values
/// fall into 8 buckets per power of two (log-linear, like HdrHistogram with
/// one significant digit), so recording is safe in a signal handler.
pub(super) struct LatencyRecorder {
    buckets: Box<[AtomicU64]>,
}

impl std::fmt::Debug for LatencyRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyRecorder").finish_non_exhaustive()
    }
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The bucket of `v`: exact below 8, then 8 per octave.
fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let octave = (msb - SUB_BITS + 1) as usize;
    (octave << SUB_BITS) + ((v >> (msb - SUB_BITS)) & (SUB - 1)) as usize
}

/// The smallest value and the width of bucket `b`.
fn bucket_range(b: usize) -> (u64, u64) {
    if b < SUB as usize {
        return (b as u64, 1);
    }
    let octave = (b >> SUB_BITS) as u32;
    let sub = (b as u64) & (SUB - 1);
    ((SUB + sub) << (octave - 1), 1 << (octave - 1))
}

impl LatencyRecorder {
    /// Records one duration.
    pub(super) fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// The distribution so far, each bucket reported at its midpoint.
    pub(super) fn histogram(&self) -> hdrhistogram::Histogram<u64> {
        let mut h = hdrhistogram::Histogram::new(3).expect("3 significant digits is valid");
        for (b, count) in self.buckets.iter().enumerate() {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                let (low, width) = bucket_range(b);
                h.record_n(low.saturating_add(width / 2), n)
                    .expect("auto-resizing histograms accept any value");
            }
        }
        h
    }
}

/// An append-only log of the first `N` records, safe to append to from a
/// signal handler. Later records are only counted.
///
/// Protocol: an appender takes a unique index with `next.fetch_add`; if the
/// index is below `N` it writes that slot (nobody else ever will) and then
/// sets the slot's `ready` flag with `Release`. A reader reads a slot only
/// after loading its `ready` flag with `Acquire`.
pub(crate) struct RecordLog<T: Copy, const N: usize> {
    next: AtomicUsize,
    ready: [AtomicBool; N],
    slots: [UnsafeCell<MaybeUninit<T>>; N],
}

// SAFETY: each slot is written once, by the one appender that drew its
// index, before its `ready` flag is released; readers only read slots whose
// flag they acquired. `T: Send` because records move between threads.
unsafe impl<T: Copy + Send, const N: usize> Sync for RecordLog<T, N> {}

impl<T: Copy, const N: usize> Default for RecordLog<T, N> {
    fn default() -> Self {
        RecordLog {
            next: AtomicUsize::new(0),
            ready: std::array::from_fn(|_| AtomicBool::new(false)),
            slots: std::array::from_fn(|_| UnsafeCell::new(MaybeUninit::uninit())),
        }
    }
}

impl<T: Copy, const N: usize> RecordLog<T, N> {
    /// Appends `record` (or only counts it once the log is full).
    pub(crate) fn push(&self, record: T) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i < N {
            // SAFETY: `i` was handed out once, so this is the slot's only
            // writer, and no reader looks at it before `ready[i]` is set.
            unsafe { (*self.slots[i].get()).write(record) };
            self.ready[i].store(true, Ordering::Release);
        }
    }

    /// How many records were appended, kept or not.
    pub(crate) fn total(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// The records kept so far, in the order their indices were drawn.
    pub(crate) fn to_vec(&self) -> Vec<T> {
        (0..self.total().min(N))
            .filter(|&i| self.ready[i].load(Ordering::Acquire))
            // SAFETY: `ready[i]` was set after the slot was written and is
            // never cleared, so the slot is initialised and never written
            // again.
            .map(|i| unsafe { (*self.slots[i].get()).assume_init() })
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut expected_low = 0;
        for b in 0..BUCKETS {
            let (low, width) = bucket_range(b);
            assert_eq!(low, expected_low, "bucket {b}");
            assert_eq!(bucket_of(low), b);
            assert_eq!(bucket_of(low + (width - 1)), b);
            // Width is at most 1/8 of the bucket's lower bound.
            assert!(width == 1 || width * 8 <= low, "bucket {b}");
            expected_low = low.wrapping_add(width);
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn histogram_reports_percentiles_within_a_bucket() {
        let r = LatencyRecorder::default();
        for us in 1..=1000u64 {
            r.record(Duration::from_micros(us));
        }
        let h = r.histogram();
        assert_eq!(h.len(), 1000);
        let p50 = h.value_at_quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.13, "p50 {p50}");
    }

    #[test]
    fn the_log_keeps_the_first_records_and_counts_the_rest() {
        let log: RecordLog<u32, 4> = RecordLog::default();
        std::thread::scope(|s| {
            for t in 0..3 {
                let log = &log;
                s.spawn(move || (0..3).for_each(|i| log.push(t * 10 + i)));
            }
        });
        assert_eq!(log.total(), 9);
        assert_eq!(log.to_vec().len(), 4);
    }
}
