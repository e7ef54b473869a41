//! The resolve routine shared by every driver: claim → fill through the
//! alias → publish `Present` → map into the primary with `UFFDIO_CONTINUE`
//! (one ioctl per contiguous run) → count towards promotion.
//!
//! Everything reachable from [`Core::resolve_fault`] is async-signal-safe,
//! because the in-thread driver runs it inside a SIGBUS handler: atomics,
//! system calls, the page source, and records that never allocate.
#![allow(unsafe_code)] // the alias write of a claimed granule

use std::cell::Cell;
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::bits::AtomicBits;
use super::blocks::BlockAllocator;
use super::owner::Liveness;
use super::promote::Promoter;
use super::readahead::Readahead;
use super::source::{FillError, PageSource, SourceError};
use super::state::{self, Claim, Discard, Owner, PageState};
use super::stats::{Counters, LatencyRecorder, RecordLog};
use crate::region::{BlockAllocation, Region};
use crate::sys::memfd::{self, Fallocate};
use crate::sys::mman::{self, Advice};
use crate::sys::uffd::{
    CONTINUE_MODE_WP, Features, MODE_DONTWAKE, OpenFlags, RangeError, RegisterMode, Userfaultfd,
};
use crate::sys::{Errno, SysError, SysResult, futex};

/// Source errors kept for [`Core::errors`]; later ones are only counted.
pub(crate) const KEPT_ERRORS: usize = 64;
/// Driver failures (unexpected system call errors) kept.
pub(crate) const KEPT_FAILURES: usize = 16;
/// Bytes `populate`, the drain and readahead fill with one allocation and
/// one source read at most (512 granules of 4 KiB; a huge-page granule is
/// its own run).
const RUN_BYTES: usize = 2 << 20;
/// Busy-granule checks that only yield before a waiter sleeps.
const YIELDS_BEFORE_SLEEP: u32 = 16;
/// A sleeping waiter wakes at least this often to check that the filler
/// still lives and that its deadline has not passed.
const WAIT_SLICE: Duration = Duration::from_millis(5);
/// Tries of a fill that failed with a transient error, before poisoning.
const TRANSIENT_TRIES: u32 = 4;
/// Recoveries of one granule whose page vanished under `UFFDIO_CONTINUE`
/// (`EFAULT`: discarded, or punched by someone else) before giving up.
const REFILL_TRIES: u32 = 8;
/// The granule of regions filled directly (`Core::direct_fills`).
const DIRECT_BYTES: usize = 4096;

/// A granule's bytes on the stack, page-aligned, for `UFFDIO_COPY`.
#[repr(C, align(4096))]
struct DirectPage([u8; DIRECT_BYTES]);

thread_local! {
    /// The granules this thread is filling, as (core address, first + 1,
    /// last + 1): a fault on one of them from inside its own fill can never
    /// be resolved.
    /// Const-initialised and without a destructor, so the SIGBUS handler
    /// may read it.
    static FILLING: Cell<(usize, usize, usize)> = const { Cell::new((0, 0, 0)) };

    /// Whether this thread is resolving a fault inside the SIGBUS handler
    /// (const-initialised, no destructor: readable there).
    static IN_SIGNAL_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as inside the SIGBUS handler while it lives,
/// so a source's panic aborts instead of unwinding there.
pub(crate) struct InSignalHandler {
    outer: bool,
}

impl InSignalHandler {
    pub(crate) fn enter() -> InSignalHandler {
        InSignalHandler {
            outer: IN_SIGNAL_HANDLER.replace(true),
        }
    }
}

impl Drop for InSignalHandler {
    fn drop(&mut self) {
        IN_SIGNAL_HANDLER.set(self.outer);
    }
}

/// Runs a source's fill. A panic is caught (the granule is then poisoned),
/// except inside the SIGBUS handler: a `SignalSafeSource` promised not to
/// panic, and if it does the process ends there rather than unwinding in
/// the handler.
fn call_source(fill: impl FnOnce() -> Result<(), FillError>) -> Result<(), FillError> {
    if IN_SIGNAL_HANDLER.get() {
        let _abort = AbortOnUnwind;
        return fill();
    }
    catch_unwind(AssertUnwindSafe(fill)).unwrap_or(Err(FillError::Panicked))
}

/// Aborts the process if dropped during a panic: a panic must not unwind
/// through a signal handler (unwinding allocates, and the interrupted code
/// may hold the allocator's lock).
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::process::abort();
        }
    }
}

/// What happened to one granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Present in the page cache: map it.
    Ready,
    /// Its fill failed: it is poisoned.
    Failed,
    /// Someone else is filling it (only when not waiting).
    Busy,
    /// Waiting was given up: the filler outlived the fill timeout, or this
    /// thread is the filler (its source touched the page). Recorded.
    Stuck,
}

/// How a direct fill (`Core::fill_and_map_claimed`) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direct {
    /// Filled, published and mapped in this process.
    Mapped,
    /// Filled the usual way (or not): mapped by nobody yet.
    Filled(Outcome),
}

/// How a wait for another filler's claim ended.
enum Waited {
    /// The word changed: look again.
    Changed,
    /// The owner was proven dead and the caller took its claim over.
    TookOver,
    /// The deadline passed.
    TimedOut,
}

/// The state a populator shares with its driver threads and the SIGBUS
/// handler.
pub(crate) struct Core {
    pub(crate) region: Arc<Region>,
    pub(crate) uffd: Userfaultfd,
    source: Box<dyn PageSource>,
    /// This process as a claim owner ([`Owner::to_bits`]); a forked child
    /// stores its own.
    me: AtomicU64,
    /// The userfaultfd features and registration mode of the primary, for
    /// a forked child to register its copy the same way.
    features: Features,
    register_mode: RegisterMode,
    /// Faults park in the kernel until a handler thread resolves them.
    handler_threads: bool,
    /// In a forked child of a handler-thread process: the in-thread
    /// registration the child made for itself, as slot + 1 (0: none).
    child_registration: AtomicUsize,
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
    /// Gives `ShmemThp` blocks their memory before their first fill.
    blocks: Option<BlockAllocator>,
    /// Failed granules get `UFFDIO_POISON` markers (Linux 6.6+); without
    /// them, see [`Core::fence`].
    poison_markers: bool,
    /// Whether this process ever installed a marker (poison, or uffd-wp
    /// under write tracking) in its primary. A punched page's markers
    /// survive the punch; only then does a discard also drop this
    /// process's mappings (a second TLB flush).
    markers_installed: AtomicBool,
    /// A granule filled alone may be allocated, filled and mapped by the
    /// kernel in one call (`UFFDIO_ZEROPAGE`, or `UFFDIO_COPY` from a buffer
    /// the source filled): 4 KiB shmem allocated a run at a time, registered
    /// for missing faults, pages not mapped write-protected for tracking.
    direct_fills: bool,
    /// Handler threads still running (handler-thread driver only).
    pub(crate) live_handlers: AtomicUsize,
    /// How long a handler thread spins before it sleeps, and whether one
    /// is spinning now (one at a time).
    pub(crate) handler_spin: Duration,
    pub(crate) handler_spinning: std::sync::atomic::AtomicBool,
    /// How long a toucher waits for another filler before giving up.
    fill_timeout: Duration,
}

/// How a [`Core`] works, decided by the populator from its options.
pub(crate) struct Settings {
    /// This process as a claim owner.
    pub(crate) me: Owner,
    /// The userfaultfd features the primary was registered with.
    pub(crate) features: Features,
    /// Its registration mode.
    pub(crate) register_mode: RegisterMode,
    /// Faulting threads park until woken (handler threads), rather than
    /// retrying after a SIGBUS.
    pub(crate) wakes: bool,
    /// Pages are mapped write-protected for write tracking.
    pub(crate) track_writes: bool,
    /// Readahead cap in granules (0: off).
    pub(crate) readahead_granules: u64,
    /// Fault-around cluster in granules (0: off).
    pub(crate) fault_around_granules: u64,
    /// How long to wait for another filler.
    pub(crate) fill_timeout: Duration,
    /// How long a handler thread spins before it sleeps.
    pub(crate) handler_spin: Duration,
    /// Blocks are allocated whole where the region allows it.
    pub(crate) whole_blocks: bool,
}

impl Core {
    pub(crate) fn new(
        region: Arc<Region>,
        uffd: Userfaultfd,
        source: Box<dyn PageSource>,
        promoter: Option<Promoter>,
        settings: Settings,
    ) -> Core {
        let Settings {
            me,
            features,
            register_mode,
            wakes,
            track_writes,
            readahead_granules,
            fault_around_granules,
            fill_timeout,
            handler_spin,
            whole_blocks,
        } = settings;
        let granule = region.granule().bytes();
        let granules = region.len() / granule;
        let blocks = BlockAllocator::new(
            if whole_blocks {
                region.block_allocation()
            } else {
                BlockAllocation::ByRun
            },
            region.alias().as_ptr() as usize,
            region.len(),
            region.backend().mapping_unit().bytes(),
            granule,
        );
        // Where blocks are allocated whole, the block's folio comes first
        // (a 4 KiB page from UFFDIO_ZEROPAGE or UFFDIO_COPY would be in
        // its way).
        let direct_fills = !region.backend().kind().uses_hugetlb()
            && granule == DIRECT_BYTES
            && !track_writes
            && register_mode.contains(RegisterMode::MISSING)
            && blocks.is_none();
        Core {
            poison_markers: features.contains(Features::POISON),
            // Write tracking leaves uffd-wp markers where pages are punched.
            markers_installed: AtomicBool::new(track_writes),
            granules,
            primary: region.primary().as_ptr() as usize,
            region,
            uffd,
            source,
            me: AtomicU64::new(me.to_bits()),
            features,
            register_mode,
            handler_threads: wakes,
            child_registration: AtomicUsize::new(0),
            granule,
            wake_mode: if wakes { 0 } else { MODE_DONTWAKE },
            continue_mode: if wakes { 0 } else { MODE_DONTWAKE }
                | if track_writes { CONTINUE_MODE_WP } else { 0 },
            replaced: AtomicBits::new(granules),
            counters: Counters::default(),
            latency: LatencyRecorder::default(),
            errors: RecordLog::default(),
            failures: RecordLog::default(),
            // Where blocks are allocated whole, a scan maps them whole.
            readahead: Readahead::new(
                readahead_granules,
                match (&blocks, &promoter) {
                    (Some(_), Some(p)) => p.granules_per_block() as u64,
                    _ => 0,
                },
            )
            .with_fault_around(fault_around_granules),
            direct_fills,
            promoter,
            blocks,
            live_handlers: AtomicUsize::new(0),
            handler_spin,
            handler_spinning: std::sync::atomic::AtomicBool::new(false),
            fill_timeout,
        }
    }

    pub(crate) fn granule(&self) -> usize {
        self.granule
    }

    /// Whether failed granules get `UFFDIO_POISON` markers.
    pub(crate) fn poison_markers(&self) -> bool {
        self.poison_markers
    }

    fn me(&self) -> Owner {
        Owner::from_bits(self.me.load(Ordering::Relaxed))
    }

    /// Re-arms this core in a freshly forked child, where no other thread
    /// runs and the kernel has dropped the primary's registration: claims
    /// carry the child's identity, and a new userfaultfd with the same
    /// registration plus `UFFD_FEATURE_SIGBUS` takes the old descriptor's
    /// number, so faults are resolved in the faulting thread. The caller
    /// gives handler-thread cores an in-thread registration
    /// ([`Core::needs_child_registration`]). Makes system calls only.
    pub(crate) fn rearm_in_child(&self) -> SysResult<()> {
        self.live_handlers.store(0, Ordering::Relaxed);
        if let Some(p) = &self.promoter {
            p.after_fork();
        }
        let me = Owner::current().map_err(|e| SysError::new("open(/proc/self/stat)", e))?;
        self.me.store(me.to_bits(), Ordering::Relaxed);
        let (uffd, _) = Userfaultfd::open(OpenFlags::default()).map_err(|e| e.syscall)?;
        uffd.api(self.features | Features::SIGBUS)?;
        uffd.register(
            self.addr(0),
            self.granules * self.granule,
            self.register_mode,
        )?;
        self.uffd.replace_with(uffd)
    }

    /// Whether a forked child must register this core for in-thread
    /// resolution itself (the parent's handler threads are not there).
    pub(crate) fn needs_child_registration(&self) -> bool {
        self.handler_threads && self.child_registration.load(Ordering::Relaxed) == 0
    }

    /// Records the child's own in-thread registration (`slot + 1`).
    pub(crate) fn set_child_registration(&self, slot: usize) {
        self.child_registration.store(slot + 1, Ordering::Relaxed);
    }

    /// Takes the child's own in-thread registration back.
    pub(crate) fn take_child_registration(&self) -> Option<usize> {
        self.child_registration
            .swap(0, Ordering::Relaxed)
            .checked_sub(1)
    }

    pub(crate) fn source(&self) -> &dyn PageSource {
        &*self.source
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
        let mapped = self.fill_and_map(index);
        if !mapped {
            match self.resolve(index, true) {
                Outcome::Ready => {}
                // Stuck: SIGBUS in this process only, until `retry`; the
                // shared state stays with the filler.
                Outcome::Failed | Outcome::Stuck | Outcome::Busy => {
                    self.poison(index)?;
                    return Ok(false);
                }
            }
        }
        let window = self.readahead.on_fault(index as u64) as usize;
        let limit = (index + 1 + window).min(self.granules);
        let mut end = index + 1;
        // Read ahead only what can be had without waiting: the absent
        // granules right behind in runs (one allocation, one read each),
        // then whatever else is ready.
        while end < limit {
            let claimed = self.claim_run(end, limit);
            if claimed > 1 && self.fill_run(end, end + claimed) {
                end += claimed;
                continue;
            }
            // `claim_run` made these words' pages ready.
            let states = self.region.page_states_for(end, end + claimed)?;
            let from = end;
            let mut ready = true;
            for (i, slot) in states.iter().enumerate().skip(from).take(claimed) {
                // Every claim must be filled; the window stops at the
                // first that fails.
                ready &= self.fill(i, slot) == Outcome::Ready;
                if ready {
                    end = i + 1;
                }
            }
            if !ready || claimed <= 1 {
                break;
            }
        }
        while end < limit && self.resolve(end, false) == Outcome::Ready {
            end += 1;
        }
        self.counters
            .readahead
            .fetch_add((end - index - 1) as u64, Ordering::Relaxed);
        if self.completes_block(index, end) {
            return Ok(true);
        }
        // Only the faulting granule must be mapped; the readahead behind
        // it is dropped if its pages vanish meanwhile (a discard).
        let from = if mapped { index + 1 } else { index };
        self.map_needed(from, end, index + 1)?;
        Ok(true)
    }

    /// If the region allows direct fills and granule `index` is absent:
    /// claims it and fills and maps it with one call (see
    /// [`fill_and_map_claimed`](Self::fill_and_map_claimed)). Whether it is
    /// mapped; if not, the caller resolves it as usual.
    fn fill_and_map(&self, index: usize) -> bool {
        if !self.direct_fills {
            return false;
        }
        let Ok(states) = self.region.page_states_for(index, index + 1) else {
            return false;
        };
        let slot = &states[index];
        state::claim(slot, self.me()) == Claim::Won
            && self.fill_and_map_claimed(index, slot) == Direct::Mapped
    }

    /// Fills claimed granule `index` and maps it in this process with one
    /// call, then publishes it: `UFFDIO_ZEROPAGE` where its source gives
    /// zeroes, else `UFFDIO_COPY` from a stack buffer the source filled.
    /// The kernel allocates the page itself: no `fallocate` (which takes the
    /// file's lock) and no write through the alias (whose mapping of the
    /// page would cost a second TLB flush when the page is discarded). If
    /// the source or the call fails, the granule is filled the usual way
    /// (which retries, or reports why and poisons it): `Direct::Filled`
    /// with its outcome, mapped by nobody yet.
    fn fill_and_map_claimed(&self, index: usize, slot: &AtomicU64) -> Direct {
        debug_assert!(self.direct_fills && self.granule == DIRECT_BYTES);
        let started = Instant::now();
        Counters::bump(&self.counters.fills);
        let result = if self.source.is_zero(index as u64) {
            // SAFETY: the primary is registered for missing faults, and the
            // claim makes this thread the granule's filler: its content is
            // zeroes, which is what the kernel maps.
            unsafe {
                self.uffd
                    .zeropage(self.addr(index), DIRECT_BYTES, MODE_DONTWAKE)
            }
            .is_ok()
        } else if let Some(src) = self.source.mapped(index as u64, DIRECT_BYTES) {
            // SAFETY: as above, with the source's bytes for the content; the
            // kernel reads `src` (a bad address fails the call).
            unsafe {
                self.uffd
                    .copy(self.addr(index), src, DIRECT_BYTES, MODE_DONTWAKE)
            }
            .is_ok()
        } else {
            let mut page = DirectPage([0; DIRECT_BYTES]);
            let outer = FILLING.replace((self as *const _ as usize, index + 1, index + 2));
            let filled = call_source(|| self.source.fill(index as u64, &mut page.0));
            FILLING.set(outer);
            // SAFETY: as above, with the source's bytes for the content;
            // the buffer is readable for a whole granule.
            filled.is_ok()
                && unsafe {
                    self.uffd.copy(
                        self.addr(index),
                        page.0.as_ptr(),
                        DIRECT_BYTES,
                        MODE_DONTWAKE,
                    )
                }
                .is_ok()
        };
        if !result {
            // The page exists already (EEXIST), no memory or space, or the
            // source failed: the usual path allocates (or reports why not)
            // and publishes.
            self.counters.fills.fetch_sub(1, Ordering::Relaxed);
            return Direct::Filled(self.fill(index, slot));
        }
        self.latency.record(started.elapsed());
        if state::publish(slot, self.me()) == Ok(true) {
            self.wake_waiters(slot);
        }
        // The faulting thread is woken only now, after the publish: woken
        // by the copy, it could write the page while it still reads as
        // being filled, and a write-back or snapshot that skips pages not
        // present would miss what it wrote.
        if self.wake_mode == 0
            && let Err(e) = self.uffd.wake(self.addr(index), DIRECT_BYTES)
        {
            self.failures.push(e);
        }
        self.mapped(index, index + 1);
        Direct::Mapped
    }

    /// [`populate_range`](Self::populate_range) of `[first, last)`,
    /// leaving out every aligned run of [`RUN_BYTES`] that a source with
    /// data says is all zeroes (a snapshot's never-written pages):
    /// allocating them would be their whole fill, memory spent on pages
    /// nobody may touch, and their first touch does it just as well. A
    /// source of zeroes only has nothing else to populate: all of it is.
    pub(crate) fn populate_sourced(&self, first: usize, last: usize) -> SysResult<()> {
        if self.source.fills_zero() {
            return self.populate_range(first, last);
        }
        let per_run = (RUN_BYTES / self.granule).max(1);
        let mut pending = first;
        let mut at = first;
        while at < last {
            let end = ((at / per_run + 1) * per_run).min(last);
            if (at..end).all(|i| self.source.is_zero(i as u64)) {
                if pending < at {
                    self.populate_range(pending, at)?;
                }
                pending = end;
            }
            at = end;
        }
        if pending < last {
            self.populate_range(pending, last)?;
        }
        Ok(())
    }

    /// Populates granules `[first, last)`: fills what is absent, waits for
    /// what is being filled, maps contiguous runs, poisons failures.
    pub(crate) fn populate_range(&self, first: usize, last: usize) -> SysResult<()> {
        Counters::bump(&self.counters.populate_calls);
        let states = self.region.page_states_for(first, last)?;
        let mut run_start = first;
        let mut stuck = None;
        let mut index = first;
        while index < last {
            // Absent granules in a row are claimed together and filled
            // with one allocation and one source read.
            let claimed = self.claim_run(index, last);
            if claimed > 1 && self.fill_run(index, index + claimed) {
                if self.is_whole_block(index, claimed) {
                    self.map(run_start, index)?;
                    run_start = if self.map_whole_block(index) {
                        index + claimed
                    } else {
                        index
                    };
                }
                index += claimed;
                continue;
            }
            // One at a time: what could not be claimed (present, poisoned,
            // or another filler's), and a run whose read failed (so only
            // the granules that fail alone are poisoned).
            let end = index + claimed.max(1);
            for (i, slot) in states.iter().enumerate().take(end).skip(index) {
                let outcome = if i >= index + claimed {
                    self.resolve(i, true)
                } else if !self.direct_fills {
                    self.fill(i, slot)
                } else {
                    match self.fill_and_map_claimed(i, slot) {
                        Direct::Filled(outcome) => outcome,
                        Direct::Mapped => {
                            // Mapped already: the run to map ends before it.
                            self.map(run_start, i)?;
                            run_start = i + 1;
                            continue;
                        }
                    }
                };
                match outcome {
                    Outcome::Ready => continue,
                    Outcome::Failed => {}
                    Outcome::Stuck | Outcome::Busy => stuck = stuck.or(Some(i)),
                }
                self.map(run_start, i)?;
                self.poison(i)?;
                run_start = i + 1;
            }
            index = end;
        }
        self.map(run_start, last)?;
        match stuck {
            None => Ok(()),
            Some(index) => Err(
                SysError::new("waiting for another filler", Errno::ETIMEDOUT)
                    .arg("granule", index as u64)
                    .arg("timeout_ms", self.fill_timeout.as_millis() as u64),
            ),
        }
    }

    /// Makes granule `index` present in the page cache (or poisoned). With
    /// `wait`, waits for a live filler (up to the fill timeout) and takes
    /// over a dead one's claim; without, reports `Busy`.
    pub(crate) fn resolve(&self, index: usize, wait: bool) -> Outcome {
        let slot = match self.region.page_states_for(index, index + 1) {
            Ok(states) => &states[index],
            Err(e) => {
                // No memory for the state table: this granule cannot be
                // claimed; it fails here (poisoned in this process).
                self.failures.push(e);
                self.record_error(index, FillError::Io(e.errno()));
                return Outcome::Failed;
            }
        };
        let mut deadline = None;
        let mut checks = 0u32;
        loop {
            match state::claim(slot, self.me()) {
                Claim::Won => return self.fill(index, slot),
                Claim::Present => return Outcome::Ready,
                Claim::Poisoned => return Outcome::Failed,
                Claim::Busy(_) if !wait => return Outcome::Busy,
                Claim::Busy(owner) => {
                    if self.filled_by_this_thread(owner, index) {
                        self.record_error(index, FillError::Recursive);
                        return Outcome::Stuck;
                    }
                    let deadline =
                        *deadline.get_or_insert_with(|| Instant::now() + self.fill_timeout);
                    match self.wait_for(slot, owner, deadline, &mut checks) {
                        Waited::Changed => {}
                        Waited::TookOver => return self.fill(index, slot),
                        Waited::TimedOut => {
                            self.record_error(index, FillError::Stuck { pid: owner.pid });
                            return Outcome::Stuck;
                        }
                    }
                }
            }
        }
    }

    fn record_error(&self, index: usize, error: FillError) {
        self.errors.push(SourceError {
            index: index as u64,
            error,
        });
    }

    /// Whether `owner`'s claim on granule `index` is this very thread's
    /// fill in progress (its source touched the page, or discards it):
    /// waiting for it would never end.
    fn filled_by_this_thread(&self, owner: Owner, index: usize) -> bool {
        let (core, first, last) = FILLING.get();
        owner == self.me()
            && core == self as *const _ as usize
            && (first..last).contains(&(index + 1))
    }

    /// One step of waiting for `owner`'s claim on `slot` to end: a few
    /// yields first (fills are short), then sleeps on the word in slices,
    /// checking between them whether the owner still lives (taking its
    /// claim over if it is proven dead) and whether `deadline` passed.
    fn wait_for(
        &self,
        slot: &AtomicU64,
        owner: Owner,
        deadline: Instant,
        checks: &mut u32,
    ) -> Waited {
        *checks += 1;
        if *checks <= YIELDS_BEFORE_SLEEP {
            std::thread::yield_now();
            return Waited::Changed;
        }
        if owner.liveness() == Liveness::Dead && state::take_over(slot, owner, self.me()) {
            Counters::bump(&self.counters.takeovers);
            return Waited::TookOver;
        }
        let now = Instant::now();
        if now >= deadline {
            return Waited::TimedOut;
        }
        if let Some(word) = state::announce_waiter(slot, owner) {
            let slice = WAIT_SLICE.min(deadline - now);
            if let Err(e) = futex::wait_high(slot, word, slice) {
                // Cannot sleep: fall back to yielding.
                self.failures.push(e);
                std::thread::yield_now();
            }
        }
        Waited::Changed
    }

    /// Fills a claimed granule through the alias and publishes it (or
    /// poisons it if the source fails or panics). Transient failures are
    /// tried again a few times first.
    fn fill(&self, index: usize, slot: &AtomicU64) -> Outcome {
        let started = Instant::now();
        let outer = FILLING.replace((self as *const _ as usize, index + 1, index + 2));
        let mut tries = 0;
        let result = loop {
            tries += 1;
            match self.fill_once(index) {
                Err(e) if e.is_transient() && tries < TRANSIENT_TRIES => {
                    Counters::bump(&self.counters.fill_retries);
                    std::thread::sleep(Duration::from_millis(1 << (2 * tries)));
                }
                done => break done,
            }
        };
        FILLING.set(outer);
        let ended = match result {
            Ok(()) => {
                self.latency.record(started.elapsed());
                Counters::bump(&self.counters.fills);
                // A failed publish means a taker-over owns it now; it writes
                // the same bytes and publishes itself.
                state::publish(slot, self.me())
            }
            Err(error) => {
                self.record_error(index, error);
                state::poison(slot, self.me())
            }
        };
        if ended == Ok(true) {
            self.wake_waiters(slot);
        }
        if result.is_ok() {
            Outcome::Ready
        } else {
            Outcome::Failed
        }
    }

    /// If granules `[index, end)`, just resolved by a fault and its
    /// readahead, reach the end of a block whose every granule is present
    /// now: maps the whole block with one huge-page entry (the faulting
    /// granule included) and says so.
    fn completes_block(&self, index: usize, end: usize) -> bool {
        if self.blocks.is_none() {
            return false;
        }
        let Some(p) = &self.promoter else {
            return false;
        };
        let block = index / p.granules_per_block();
        end == (block + 1) * p.granules_per_block()
            && self.block_complete(block)
            && self.collapse_filled(block)
    }

    /// Maps block `block`, every granule of which is present, with one
    /// `MADV_COLLAPSE`, and wakes whoever is parked on a page of it (a
    /// collapse, unlike `UFFDIO_CONTINUE`, wakes nobody). Whether it did.
    fn collapse_filled(&self, block: usize) -> bool {
        let Some(p) = &self.promoter else {
            return false;
        };
        if !p.collapse_filled(block, &self.counters) {
            return false;
        }
        if self.wake_mode == 0 {
            let per = p.granules_per_block();
            let (from, to) = (block * per, ((block + 1) * per).min(self.granules));
            if let Err(e) = self.uffd.wake(self.addr(from), (to - from) * self.granule) {
                self.failures.push(e);
            }
        }
        true
    }

    /// Whether granules `[from, from + n)` are exactly one promotion block.
    fn is_whole_block(&self, from: usize, n: usize) -> bool {
        self.promoter.as_ref().is_some_and(|p| {
            let per = p.granules_per_block();
            n == per && from % per == 0
        })
    }

    /// Maps the whole block starting at granule `from`, every granule of
    /// which this thread just filled and published, with one huge-page
    /// entry (`MADV_COLLAPSE`, which maps every page of the block) instead
    /// of 4 KiB entries now and a collapse later. Whether it did.
    fn map_whole_block(&self, from: usize) -> bool {
        self.promoter
            .as_ref()
            .is_some_and(|p| self.collapse_filled(from / p.granules_per_block()))
    }

    /// Claims the absent granules from `from` on, up to `limit` and the
    /// end of the [`RUN_BYTES`]-aligned run `from` is in (runs line up with
    /// promotion blocks): how many it claimed (they are this thread's to
    /// fill and publish).
    fn claim_run(&self, from: usize, limit: usize) -> usize {
        let per_run = (RUN_BYTES / self.granule).max(1);
        let limit = limit.min((from / per_run + 1) * per_run);
        let Ok(states) = self.region.page_states_for(from, limit) else {
            // One at a time then, where the error is reported.
            return 0;
        };
        let mut n = 0;
        while from + n < limit && state::claim(&states[from + n], self.me()) == Claim::Won {
            n += 1;
        }
        n
    }

    /// Fills the claimed granules `from..to` with one allocation and one
    /// source read and publishes them; `false` (nothing published, every
    /// claim still held) if the allocation or the read failed.
    fn fill_run(&self, from: usize, to: usize) -> bool {
        let started = Instant::now();
        let outer = FILLING.replace((self as *const _ as usize, from + 1, to + 1));
        let result = self.fill_run_once(from, to);
        FILLING.set(outer);
        if result.is_err() {
            return false;
        }
        let n = (to - from) as u32;
        let each = started.elapsed() / n;
        // Claimed, so their words' pages are ready (if not, the caller
        // fills them one by one, which reports the error).
        let Ok(states) = self.region.page_states_for(from, to) else {
            return false;
        };
        for slot in &states[from..to] {
            self.latency.record(each);
            if state::publish(slot, self.me()) == Ok(true) {
                self.wake_waiters(slot);
            }
        }
        self.counters
            .fills
            .fetch_add(u64::from(n), Ordering::Relaxed);
        true
    }

    fn fill_run_once(&self, from: usize, to: usize) -> Result<(), FillError> {
        let g = self.granule;
        let alias = self.region.alias().as_ptr().wrapping_add(from * g);
        let len = (to - from) * g;
        let block_allocated = self.allocate_blocks(from, to);
        if self.source.fills_zero() {
            // Allocating the pages is the whole fill.
            return if block_allocated {
                Ok(())
            } else {
                self.allocate(from, to)
            };
        }
        // Allocate and map the alias run in one call, so the read below
        // takes no fault per page (only a page-table walk where the block
        // is allocated and mapped already, but a discard in another process
        // may have punched a page out since).
        // SAFETY: the alias is never registered and the claimed granules
        // are this thread's: populating them changes no byte anyone reads.
        if unsafe { mman::madvise(alias, len, Advice::PopulateWrite) }.is_err() {
            // Where a touch would raise SIGBUS: learn why (ENOSPC, say)
            // from an allocation, which also makes the pages exist.
            self.allocate(from, to)?;
        }
        // SAFETY: the claims make this thread the only writer of these
        // granules, nobody reads them before they are published, the alias
        // is never registered, and their pages exist (allocated above).
        let dst = unsafe { std::slice::from_raw_parts_mut(alias, len) };
        call_source(|| self.source.fill_run(from as u64, dst, g))
    }

    /// Gives the blocks of granules `from..to` their memory (`ShmemThp`)
    /// unless this process did already: whether they all have it.
    fn allocate_blocks(&self, from: usize, to: usize) -> bool {
        self.blocks
            .as_ref()
            .is_some_and(|b| b.ensure(from, to, &self.counters))
    }

    /// Allocates the pages of granules `from..to` in the file.
    fn allocate(&self, from: usize, to: usize) -> Result<(), FillError> {
        let g = self.granule as u64;
        match memfd::fallocate(
            self.region.fd().as_fd(),
            Fallocate::Allocate,
            self.region.layout().data_offset() + from as u64 * g,
            (to - from) as u64 * g,
        ) {
            Ok(()) => Ok(()),
            // Some kernels (hugetlb on 6.3) report pages already allocated
            // as EEXIST: they are there, which is all this needs.
            Err(e) if e.errno() == Errno::EEXIST => Ok(()),
            Err(e) => Err(FillError::Io(e.errno())),
        }
    }

    fn wake_waiters(&self, slot: &AtomicU64) {
        if let Err(e) = futex::wake_high(slot) {
            self.failures.push(e);
        }
    }

    /// Allocates the granule's page in the file, then (unless the source
    /// says it is zero: fresh pages are) fills it through the alias.
    /// Allocating first turns a full file system or an empty huge page pool
    /// into `ENOSPC` here; a write through the alias would get SIGBUS.
    fn fill_once(&self, index: usize) -> Result<(), FillError> {
        let block_allocated = self.allocate_blocks(index, index + 1);
        if self.source.is_zero(index as u64) {
            if block_allocated {
                // The page is there, zeroed: nothing to do (if another
                // process punched it out since, mapping it finds that out
                // and it is filled again).
                return Ok(());
            }
            return self.allocate(index, index + 1);
        }
        self.allocate(index, index + 1)?;
        // SAFETY: the claim makes this thread the granule's only writer,
        // and nobody reads it before `publish`; the alias is never
        // registered, so writing it cannot fault into userfaultfd, and the
        // page exists, so the write cannot fail.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                self.region.alias().as_ptr().add(index * self.granule),
                self.granule,
            )
        };
        call_source(|| self.source.fill(index as u64, dst))
    }

    /// A granule whose page was gone when it was mapped (`EFAULT`): if its
    /// word still says `Present` the page was punched behind the protocol's
    /// back, so fill it again; otherwise it is being discarded or refilled:
    /// resolve it as a fault would.
    fn refill_vanished(&self, index: usize) -> Outcome {
        let Ok(states) = self.region.page_states_for(index, index + 1) else {
            return self.resolve(index, true);
        };
        let slot = &states[index];
        if let Some(b) = &self.blocks {
            // Its block lost a page: fill it page by page from now on.
            b.discarded(index, index + 1);
        }
        if state::observe(slot) == PageState::Present
            && state::begin_discard(slot, self.me()) == Discard::Claimed
        {
            Counters::bump(&self.counters.refills);
            return self.fill(index, slot);
        }
        self.resolve(index, true)
    }

    /// Drops granules `[first, last)` everywhere: claims each (waiting for
    /// fills in progress), punches their pages out of the file (which
    /// unmaps them in every process), clears this process's mappings and
    /// poison markers, then marks them absent. On a timeout (or an error)
    /// the granules claimed so far are still discarded, and the error is
    /// returned.
    pub(crate) fn discard_range(&self, first: usize, last: usize) -> SysResult<()> {
        let states = self.region.page_states_for(first, last)?;
        let mut claimed = first;
        let mut failed = None;
        'claim: while claimed < last {
            let slot = &states[claimed];
            let mut deadline = None;
            let mut checks = 0;
            loop {
                match state::begin_discard(slot, self.me()) {
                    Discard::Claimed => break,
                    Discard::Busy(owner) if self.filled_by_this_thread(owner, claimed) => {
                        failed = Some(
                            SysError::new("discarding a page this thread fills", Errno::EDEADLK)
                                .arg("granule", claimed as u64),
                        );
                        break 'claim;
                    }
                    Discard::Busy(owner) => {
                        let deadline =
                            *deadline.get_or_insert_with(|| Instant::now() + self.fill_timeout);
                        match self.wait_for(slot, owner, deadline, &mut checks) {
                            Waited::Changed => {}
                            // The dead filler's claim is ours now: discard it.
                            Waited::TookOver => break,
                            Waited::TimedOut => {
                                failed = Some(
                                    SysError::new("waiting for another filler", Errno::ETIMEDOUT)
                                        .arg("granule", claimed as u64)
                                        .arg("pid", u64::from(owner.pid)),
                                );
                                break 'claim;
                            }
                        }
                    }
                }
            }
            claimed += 1;
        }
        if claimed > first {
            let g = self.granule;
            let punched = memfd::fallocate(
                self.region.fd().as_fd(),
                Fallocate::PunchHole,
                self.region.layout().data_offset() + (first * g) as u64,
                ((claimed - first) * g) as u64,
            );
            // The punch unmapped the pages from every process; poison
            // markers this process installed survive it, so they are
            // dropped with this process's mappings (another TLB flush,
            // skipped by a process that never installed one).
            let zapped = if self.markers_installed.load(Ordering::Relaxed) {
                // SAFETY: the range lies in the primary, which this process
                // owns; the granules are claimed, so nobody relies on their
                // bytes.
                unsafe { mman::madvise(self.addr(first), (claimed - first) * g, Advice::DontNeed) }
            } else {
                Ok(())
            };
            for slot in &states[first..claimed] {
                if state::finish_discard(slot, self.me()) == Ok(true) {
                    self.wake_waiters(slot);
                }
            }
            if let Some(p) = &self.promoter {
                p.forget(first * g, (claimed - first) * g);
            }
            if let Some(b) = &self.blocks {
                b.discarded(first, claimed);
            }
            if let Err(e) = punched.and(zapped) {
                // The granules are absent and will be filled again from the
                // source; only the memory was not given back.
                self.failures.push(e);
                failed = failed.or(Some(e));
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Lets poisoned granules of `[first, last)` be filled again: their
    /// words go back to `Absent` and this process's poison markers are
    /// dropped. Returns how many were poisoned.
    pub(crate) fn retry_range(&self, first: usize, last: usize) -> SysResult<usize> {
        let states = self.region.page_states_for(first, last)?;
        let retried = states[first..last]
            .iter()
            .filter(|s| state::unpoison(*s))
            .count();
        // SAFETY: the range lies in the primary, which this process owns;
        // present pages stay in the file and are mapped again on their next
        // touch, so no byte is lost.
        unsafe {
            mman::madvise(
                self.addr(first),
                (last - first) * self.granule,
                Advice::DontNeed,
            )
        }?;
        Ok(retried)
    }

    /// Maps granules `[from, to)`, all present, into the primary.
    pub(crate) fn map(&self, from: usize, to: usize) -> SysResult<()> {
        self.map_needed(from, to, to)
    }

    /// Maps granules `[from, to)`, of which `[from, needed)` must be
    /// mapped; from `needed` on, mapping stops at the first granule whose
    /// page has vanished.
    fn map_needed(&self, from: usize, to: usize, needed: usize) -> SysResult<()> {
        self.apply(from, to, Some(needed), |start, len| {
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
        if self.poison_markers {
            self.markers_installed.store(true, Ordering::Relaxed);
            self.apply(from, to, None, |start, len| {
                // SAFETY: the range is registered, and its granules are not
                // present (or their fill failed), so nobody relies on
                // reading them: an access raises SIGBUS instead of
                // returning bytes.
                unsafe { self.uffd.poison(start, len, self.wake_mode) }
            })?;
        }
        // Without markers the granules stay unmapped and registered: a
        // touch faults, finds them failed (or absent with nobody to fill
        // them) and is answered with SIGBUS by the fault path.
        self.counters
            .poisoned
            .fetch_add((to - from) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Runs a `UFFDIO_CONTINUE`-like `op` over granules `[from, to)`:
    /// EAGAIN retries the rest, EEXIST skips the granule that is already
    /// mapped (waking anyone parked on it). `needed` is `Some` when `op`
    /// installs pages (counted towards promotion): granules before it
    /// whose page vanished (`EFAULT`) are filled again, those after it are
    /// left unmapped. `None`: `op` installs poison markers.
    fn apply(
        &self,
        from: usize,
        to: usize,
        needed: Option<usize>,
        op: impl Fn(*mut u8, usize) -> Result<usize, RangeError>,
    ) -> SysResult<()> {
        let maps = needed.is_some();
        let installed = |a: usize, b: usize| {
            if maps && a < b {
                self.mapped(a, b);
            }
        };
        let g = self.granule;
        let mut at = from;
        // Consecutive vanishings of one granule: (granule, count).
        let mut vanished = (usize::MAX, 0);
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
                    let done = e.done / g;
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
                Err(e) if maps && e.errno() == Errno::EFAULT => {
                    // The page left the page cache after it was resolved:
                    // a discard, or a punch behind the protocol's back.
                    if needed.is_some_and(|n| at >= n) {
                        return Ok(());
                    }
                    vanished = if vanished.0 == at {
                        (at, vanished.1 + 1)
                    } else {
                        (at, 1)
                    };
                    if vanished.1 > REFILL_TRIES {
                        self.failures.push(e.sys());
                        self.poison(at)?;
                        at += 1;
                    } else if self.refill_vanished(at) != Outcome::Ready {
                        // Poisoned or given up on (recorded): SIGBUS here.
                        self.poison(at)?;
                        at += 1;
                    }
                }
                Err(e) => {
                    self.failures.push(e.sys());
                    return Err(e.sys());
                }
            }
        }
        Ok(())
    }

    fn mapped(&self, from: usize, to: usize) {
        Counters::bump(&self.counters.maps);
        if let Some(p) = &self.promoter {
            p.on_mapped(from, to, &self.counters, &|block| {
                self.block_complete(block)
            });
        }
    }

    /// Whether every granule of promotion block `block` is present.
    /// Signal-safe.
    pub(crate) fn block_complete(&self, block: usize) -> bool {
        let Some(p) = &self.promoter else {
            return false;
        };
        let per = p.granules_per_block();
        let (from, to) = (block * per, ((block + 1) * per).min(self.granules));
        self.region.page_states_for(from, to).is_ok_and(|states| {
            states[from..to]
                .iter()
                .all(|s| state::observe(s) == PageState::Present)
        })
    }

    /// Before this process's registration goes away while the region
    /// stays mapped: makes sure a later touch of a granule that is not
    /// present raises a fault instead of reading a fresh zero page (see
    /// [`Core::fence`]). Present granules need nothing: without a
    /// registration they map as ordinary shared memory.
    pub(crate) fn poison_unfilled(&self) {
        self.fence(false);
    }

    /// Leaves no faulting thread parked once nobody resolves faults any
    /// more: maps every granule that is present, fences the rest (in this
    /// process only), then wakes the whole range. A thread that touches an
    /// unpopulated page afterwards gets a fault instead of hanging, and
    /// never reads bytes the source did not give.
    pub(crate) fn fail_closed(&self) {
        self.fence(true);
        if let Err(e) = self.uffd.wake(self.addr(0), self.granules * self.granule) {
            self.failures.push(e);
        }
    }

    /// Closes every granule that is not present in this process, and maps
    /// the present ones if `map_present`:
    /// - with poison markers (Linux 6.6+), each gets one: SIGBUS on touch;
    /// - without, under `UFFD_FEATURE_SIGBUS` (the in-thread driver), the
    ///   present granules are all mapped and the userfaultfd is kept open
    ///   with the region: its registration answers a touch of any other
    ///   granule with SIGBUS;
    /// - without, under handler threads, the granules are made
    ///   inaccessible (`PROT_NONE`): SIGSEGV on touch (the whole primary,
    ///   if the kernel runs out of mappings for the pieces).
    fn fence(&self, map_present: bool) {
        if self.poison_markers {
            return self.settle(map_present, Fence::Markers);
        }
        if self.features.contains(Features::SIGBUS) {
            self.settle(true, Fence::Nothing);
            match self.uffd.duplicate() {
                Ok(fd) => return self.region.keep_fence(fd),
                Err(e) => self.failures.push(e),
            }
        }
        self.settle(map_present, Fence::Protect);
    }

    /// Closes granules `[from, to)` of this process's primary as `fence`
    /// says.
    fn close(&self, from: usize, to: usize, fence: Fence) -> SysResult<()> {
        match fence {
            Fence::Markers => self.poison_range(from, to),
            Fence::Nothing => Ok(()),
            Fence::Protect => {
                // SAFETY: the range lies in this process's primary, and its
                // granules are not present: nobody can rely on reading them.
                let closed =
                    unsafe { mman::protect_none(self.addr(from), (to - from) * self.granule) };
                if let Err(e) = closed {
                    // Out of mappings for the pieces, say: close it all
                    // rather than let a touch read a zero page.
                    self.failures.push(e);
                    // SAFETY: as above, for the whole primary: what is
                    // present becomes unreadable too, never wrong.
                    unsafe { mman::protect_none(self.addr(0), self.granules * self.granule) }?;
                }
                Ok(())
            }
        }
    }

    /// Closes, in this process, every granule not present as `fence` says
    /// (and maps the present ones if `map_present`). Granules whose
    /// page-state words have no memory behind them were never claimed by
    /// anyone: they are closed without allocating their part of the table.
    fn settle(&self, map_present: bool, fence: Fence) {
        let backed = match self.region.backed_state_ranges() {
            Ok(backed) => backed,
            Err(e) => {
                self.failures.push(e);
                return;
            }
        };
        let record = |done: SysResult<()>| {
            if let Err(e) = done {
                self.failures.push(e);
            }
        };
        let mut at = 0;
        for range in backed
            .into_iter()
            .chain(std::iter::once(self.granules..self.granules))
        {
            if at < range.start {
                record(self.close(at, range.start, fence));
            }
            let states = match self.region.page_states_for(range.start, range.end) {
                Ok(states) => states,
                Err(e) => {
                    record(Err(e));
                    at = range.end;
                    continue;
                }
            };
            let mut i = range.start;
            while i < range.end {
                let present = state::observe(&states[i]) == PageState::Present;
                let mut end = i + 1;
                while end < range.end
                    && (state::observe(&states[end]) == PageState::Present) == present
                {
                    end += 1;
                }
                if !present {
                    record(self.close(i, end, fence));
                } else if map_present {
                    record(self.map(i, end));
                }
                i = end;
            }
            at = range.end;
        }
    }
}

/// How [`Core::settle`] closes granules that are not present.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fence {
    /// `UFFDIO_POISON` markers.
    Markers,
    /// Nothing: a kept registration with `UFFD_FEATURE_SIGBUS` does it.
    Nothing,
    /// `PROT_NONE`.
    Protect,
}
