//! The resolve routine shared by every driver: claim → fill through the
//! alias → publish `Present` → map into the primary with `UFFDIO_CONTINUE`
//! (one ioctl per contiguous run) → count towards promotion.
//!
//! Everything reachable from [`Core::resolve_fault`] is async-signal-safe,
//! because the in-thread driver runs it inside a SIGBUS handler: atomics,
//! system calls, the page source, and records that never allocate.

use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::bits::AtomicBits;
use super::promote::Promoter;
use super::readahead::Readahead;
use super::source::{FillError, PageSource, SourceError};
use super::state::{self, Claim, Owner, PageState};
use super::stats::{Counters, LatencyRecorder, RecordLog};
use crate::region::Region;
use crate::sys::memfd::{self, Fallocate};
use crate::sys::uffd::{CONTINUE_MODE_WP, MODE_DONTWAKE, Userfaultfd};
use crate::sys::{Errno, SysError, SysResult};

/// Source errors kept for [`Core::errors`]; later ones are only counted.
pub(crate) const KEPT_ERRORS: usize = 64;
/// Driver failures (unexpected system call errors) kept.
pub(crate) const KEPT_FAILURES: usize = 16;
/// Spins on a busy granule between liveness checks of its filler.
const SPINS_PER_LIVENESS_CHECK: u32 = 64;

/// What happened to one granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Present in the page cache: map it.
    Ready,
    /// Its fill failed: it is poisoned.
    Failed,
    /// Someone else is filling it (only when not waiting).
    Busy,
}

/// The state a populator shares with its driver threads and the SIGBUS
/// handler.
pub(crate) struct Core<S> {
    pub(crate) region: Arc<Region>,
    pub(crate) uffd: Userfaultfd,
    source: S,
    me: Owner,
    granule: usize,
    granules: usize,
    primary: usize,
    /// `MODE_DONTWAKE` when nobody parks (`UFFD_FEATURE_SIGBUS`), else 0.
    wake_mode: u64,
    /// `UFFDIO_CONTINUE` mode: the wake mode, plus `CONTINUE_MODE_WP` when
    /// writes are tracked (pages are mapped write-protected).
    continue_mode: u64,
    /// Granules whose pages were replaced behind write tracking (punched
    /// out and refilled); reported with the written ones.
    pub(crate) replaced: AtomicBits,
    pub(crate) counters: Counters,
    pub(crate) latency: LatencyRecorder,
    pub(crate) errors: RecordLog<SourceError, KEPT_ERRORS>,
    pub(crate) failures: RecordLog<SysError, KEPT_FAILURES>,
    readahead: Readahead,
    pub(crate) promoter: Option<Promoter>,
    /// Handler threads still running (handler-thread driver only).
    pub(crate) live_handlers: AtomicUsize,
}

impl<S: PageSource> Core<S> {
    pub(crate) fn new(
        region: Arc<Region>,
        uffd: Userfaultfd,
        source: S,
        me: Owner,
        wakes: bool,
        track_writes: bool,
        readahead_granules: u64,
        promoter: Option<Promoter>,
    ) -> Core<S> {
        let granule = region.granule().bytes();
        let granules = region.len() / granule;
        Core {
            granules,
            primary: region.primary().as_ptr() as usize,
            region,
            uffd,
            source,
            me,
            granule,
            wake_mode: if wakes { 0 } else { MODE_DONTWAKE },
            continue_mode: if wakes { 0 } else { MODE_DONTWAKE }
                | if track_writes { CONTINUE_MODE_WP } else { 0 },
            replaced: AtomicBits::new(granules),
            counters: Counters::default(),
            latency: LatencyRecorder::default(),
            errors: RecordLog::default(),
            failures: RecordLog::default(),
            readahead: Readahead::new(readahead_granules),
            promoter,
            live_handlers: AtomicUsize::new(0),
        }
    }

    pub(crate) fn granule(&self) -> usize {
        self.granule
    }

    pub(crate) fn source(&self) -> &S {
        &self.source
    }

    /// The granule holding primary address `addr`, if it is in the region.
    pub(crate) fn index_of(&self, addr: usize) -> Option<usize> {
        let offset = addr.checked_sub(self.primary)?;
        (offset < self.granules * self.granule).then(|| offset / self.granule)
    }

    fn addr(&self, index: usize) -> *mut u8 {
        (self.primary + index * self.granule) as *mut u8
    }

    /// Resolves a fault on granule `index`, with readahead when it
    /// continues a sequential run. `Ok(false)`: the granule is poisoned.
    pub(crate) fn resolve_fault(&self, index: usize) -> SysResult<bool> {
        match self.resolve(index, true) {
            Outcome::Ready => {}
            Outcome::Failed => {
                self.poison(index)?;
                return Ok(false);
            }
            Outcome::Busy => unreachable!("a waiting resolve never reports Busy"),
        }
        let window = self.readahead.on_fault(index as u64) as usize;
        let limit = (index + 1 + window).min(self.granules);
        let mut end = index + 1;
        // Read ahead only what can be had without waiting.
        while end < limit && self.resolve(end, false) == Outcome::Ready {
            end += 1;
        }
        self.counters
            .readahead
            .fetch_add((end - index - 1) as u64, Ordering::Relaxed);
        self.map(index, end)?;
        Ok(true)
    }

    /// Populates granules `[first, last)`: fills what is absent, waits for
    /// what is being filled, maps contiguous runs, poisons failures.
    pub(crate) fn populate_range(&self, first: usize, last: usize) -> SysResult<()> {
        Counters::bump(&self.counters.populate_calls);
        let mut run_start = first;
        for index in first..last {
            if self.resolve(index, true) == Outcome::Failed {
                self.map(run_start, index)?;
                self.poison(index)?;
                run_start = index + 1;
            }
        }
        self.map(run_start, last)
    }

    /// Makes granule `index` present in the page cache (or poisoned). With
    /// `wait`, waits for a live filler and takes over a dead one's claim;
    /// without, reports `Busy`.
    pub(crate) fn resolve(&self, index: usize, wait: bool) -> Outcome {
        let slot = &self.region.page_states()[index];
        let mut spins = 0u32;
        loop {
            match state::claim(slot, self.me) {
                Claim::Won => return self.fill(index, slot),
                Claim::Present => return Outcome::Ready,
                Claim::Poisoned => return Outcome::Failed,
                Claim::Busy(_) if !wait => return Outcome::Busy,
                Claim::Busy(owner) => {
                    spins += 1;
                    if spins % SPINS_PER_LIVENESS_CHECK == 0
                        && !owner.is_alive()
                        && state::take_over(slot, owner, self.me)
                    {
                        Counters::bump(&self.counters.takeovers);
                        return self.fill(index, slot);
                    }
                    // A live filler publishes within one fill.
                    std::thread::yield_now();
                    match state::observe(slot) {
                        PageState::Present => return Outcome::Ready,
                        PageState::Poisoned => return Outcome::Failed,
                        _ => {}
                    }
                }
            }
        }
    }

    /// Fills a claimed granule through the alias and publishes it (or
    /// poisons it if the source fails or panics).
    fn fill(&self, index: usize, slot: &AtomicU64) -> Outcome {
        let started = Instant::now();
        let result = if self.source.is_zero(index as u64) {
            // Allocating the page is the whole fill: fresh pages are zero.
            let file_offset = self.region.layout().data_offset() + (index * self.granule) as u64;
            memfd::fallocate(
                self.region.fd().as_fd(),
                Fallocate::Allocate,
                file_offset,
                self.granule as u64,
            )
            .map_err(|e| FillError::Io(e.errno()))
        } else {
            // SAFETY: the claim makes this thread the granule's only writer,
            // and nobody reads it before `publish`; the alias is never
            // registered, so writing it cannot fault into userfaultfd.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    self.region.alias().as_ptr().add(index * self.granule),
                    self.granule,
                )
            };
            catch_unwind(AssertUnwindSafe(|| self.source.fill(index as u64, dst)))
                .unwrap_or(Err(FillError::Panicked))
        };
        match result {
            Ok(()) => {
                self.latency.record(started.elapsed());
                Counters::bump(&self.counters.fills);
                // A failed publish means a taker-over owns it now; it writes
                // the same bytes and publishes itself.
                let _ = state::publish(slot, self.me);
                Outcome::Ready
            }
            Err(error) => {
                self.errors.push(SourceError {
                    index: index as u64,
                    error,
                });
                let _ = state::poison(slot, self.me);
                Outcome::Failed
            }
        }
    }

    /// Maps granules `[from, to)`, all present, into the primary.
    pub(crate) fn map(&self, from: usize, to: usize) -> SysResult<()> {
        self.apply(from, to, true, |start, len| {
            // SAFETY: the range is inside the registered primary, and every
            // granule in it is present in the page cache (resolved first).
            unsafe { self.uffd.continue_range(start, len, self.continue_mode) }
        })
    }

    /// Poisons granule `index` in this process's mapping.
    fn poison(&self, index: usize) -> SysResult<()> {
        self.poison_range(index, index + 1)
    }

    fn poison_range(&self, from: usize, to: usize) -> SysResult<()> {
        self.apply(from, to, false, |start, len| {
            // SAFETY: the range is registered, and its granules are not
            // present (or their fill failed), so nobody relies on reading
            // them: an access raises SIGBUS instead of returning bytes.
            unsafe { self.uffd.poison(start, len, self.wake_mode) }
        })?;
        self.counters
            .poisoned
            .fetch_add((to - from) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Runs a `UFFDIO_CONTINUE`-like `op` over granules `[from, to)`:
    /// EAGAIN retries the rest, EEXIST skips the granule that is already
    /// mapped (waking anyone parked on it). `maps` says whether what `op`
    /// installs are pages (counted towards promotion) or poison markers.
    fn apply(
        &self,
        from: usize,
        to: usize,
        maps: bool,
        op: impl Fn(*mut u8, usize) -> SysResult<usize>,
    ) -> SysResult<()> {
        let installed = |a: usize, b: usize| {
            if maps && a < b {
                self.mapped(a, b);
            }
        };
        let g = self.granule;
        let mut at = from;
        while at < to {
            match op(self.addr(at), (to - at) * g) {
                Ok(n) => {
                    let done = (n / g).max(1);
                    installed(at, at + done);
                    at += done;
                }
                Err(e) if e.errno() == Errno::EAGAIN => {
                    // The mappings changed under the ioctl: keep what it
                    // did and retry the rest.
                    let done = e.arg_value("done").unwrap_or(0) as usize / g;
                    installed(at, at + done);
                    at += done;
                }
                Err(e) if e.errno() == Errno::EEXIST => {
                    // Someone mapped this granule first. A racing faulter
                    // could stay parked unless woken.
                    if self.wake_mode == 0 {
                        self.uffd.wake(self.addr(at), g)?;
                    }
                    at += 1;
                }
                Err(e) => {
                    self.failures.push(e);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn mapped(&self, from: usize, to: usize) {
        Counters::bump(&self.counters.maps);
        if let Some(p) = &self.promoter {
            p.on_mapped(from, to, &self.counters);
        }
    }

    /// Leaves no faulting thread parked once nobody resolves faults any
    /// more: maps every granule that is present, poisons the rest (in this
    /// process only), then wakes the whole range. A thread that touches an
    /// unpopulated page afterwards gets SIGBUS instead of hanging, and
    /// never reads bytes the source did not give.
    pub(crate) fn fail_closed(&self) {
        let mut at = 0;
        while at < self.granules {
            let present = state::observe(&self.region.page_states()[at]) == PageState::Present;
            let mut end = at + 1;
            while end < self.granules
                && (state::observe(&self.region.page_states()[end]) == PageState::Present)
                    == present
            {
                end += 1;
            }
            let done = if present {
                self.map(at, end)
            } else {
                self.poison_range(at, end)
            };
            if let Err(e) = done {
                self.failures.push(e);
            }
            at = end;
        }
        if let Err(e) = self.uffd.wake(self.addr(0), self.granules * self.granule) {
            self.failures.push(e);
        }
    }
}
