//! [`Populator`]: demand population of one region in this process, with a
//! choice of driver.
#![allow(unsafe_code)] // registering the in-thread resolver and the fork re-arm, and their entry points

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::engine::{Core, InSignalHandler, Settings};
use super::fork;
use super::handlers::HandlerPool;
use super::promote::{Promoter, Promotion};
use super::signal::{self, Registration};
use super::source::{FillError, PageSource, SignalSafeSource, SourceError};
use super::state::{self, Owner, PageState};
use super::stats::{Counters, Stats};
use crate::backend::BackendKind;
use crate::error::{Error, Result};
use crate::probe::KernelCaps;
use crate::region::Region;
use crate::sys::SysError;
use crate::sys::mman::{self, Advice};
use crate::sys::size::PageSize;
use crate::sys::uffd::{Features, OpenFlags, RegisterMode, Userfaultfd};

/// Who resolves a first touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// This many threads read fault events from the userfaultfd and
    /// resolve them while the faulting thread sleeps. Kernel-mode accesses
    /// (`read(2)` into an unpopulated page) are resolved too. Each fault
    /// costs a wake-up of the faulting thread, often on another CPU.
    HandlerThreads(usize),
    /// The faulting thread resolves its own fault in a SIGBUS handler
    /// (`UFFD_FEATURE_SIGBUS`): no thread switch, the fastest path. The
    /// handler is process-wide and chains to the previous one for every
    /// address that is not an arena's. A kernel-mode access to an
    /// unpopulated page fails with `EFAULT` instead: call
    /// [`Populator::populate`] on a range before passing it to a system
    /// call.
    InThread,
    /// The application calls [`Populator::populate`] on ranges before it
    /// touches them (no readahead). Faults that happen anyway are resolved
    /// in the faulting thread as with [`Driver::InThread`]: a page the
    /// application did not populate, or a mapping the kernel dropped
    /// because a process collapsed a block into a huge page (collapse
    /// removes 4 KiB page tables in every process mapping the block).
    Proactive,
}

impl Driver {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Driver::HandlerThreads(_) => "handler-threads",
            Driver::InThread => "in-thread",
            Driver::Proactive => "proactive",
        }
    }
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Driver::HandlerThreads(n) => write!(f, "handler-threads({n})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Default readahead cap in bytes: 64 granules of 4 KiB.
pub const DEFAULT_READAHEAD: usize = 256 << 10;

/// How a [`Populator`] works: the driver, readahead, promotion to huge
/// mappings, write tracking and how long to wait for another filler.
///
/// ```
/// use std::time::Duration;
/// use hugearena::populate::{Driver, PopulateOptions, Promotion};
/// let options = PopulateOptions::new()
///     .driver(Driver::HandlerThreads(2))
///     .readahead(1 << 20)
///     .promotion(Promotion::Inline)
///     .fill_timeout(Duration::from_secs(5));
/// # let _ = options;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PopulateOptions {
    driver: Option<Driver>,
    readahead: usize,
    promotion: Promotion,
    track_writes: bool,
    fill_timeout: Duration,
    handler_spin: Duration,
    whole_blocks: bool,
    fault_around: usize,
}

/// Default [`PopulateOptions::fill_timeout`].
pub const DEFAULT_FILL_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for PopulateOptions {
    fn default() -> Self {
        PopulateOptions {
            driver: None,
            readahead: DEFAULT_READAHEAD,
            promotion: Promotion::Background,
            track_writes: false,
            fill_timeout: DEFAULT_FILL_TIMEOUT,
            handler_spin: Duration::ZERO,
            whole_blocks: true,
            fault_around: 0,
        }
    }
}

impl PopulateOptions {
    /// The default driver, 256 KiB readahead, background promotion.
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses the driver (by default: in-thread for a
    /// [`SignalSafeSource`], one handler thread for any other source).
    pub fn driver(mut self, driver: Driver) -> Self {
        self.driver = Some(driver);
        self
    }

    /// Caps sequential readahead at `bytes` (at least one granule when not
    /// 0; 0 turns it off).
    pub fn readahead(mut self, bytes: usize) -> Self {
        self.readahead = bytes;
        self
    }

    /// On any fault, also populates the rest of the aligned `bytes`
    /// cluster it falls in (rounded down to whole granules; 0, the
    /// default, turns it off). For random access to a region whose pages
    /// will all be wanted, such as a hash table restored lazily: one trap
    /// per cluster reached instead of one per page, at the price of a
    /// longer first touch (the cluster's pages are read with it).
    /// Sequential readahead still applies where it reaches further.
    pub fn fault_around(mut self, bytes: usize) -> Self {
        self.fault_around = bytes;
        self
    }

    /// Tracks which pages this process writes (`UFFD_FEATURE_WP_ASYNC`:
    /// pages are mapped write-protected and the kernel notes the first
    /// write without a trap to user space), for
    /// [`take_changed`](Populator::take_changed) and incremental snapshots.
    /// Write-protected ranges cannot be collapsed into huge mappings, so
    /// this turns promotion off. On a kernel without `WP_ASYNC` (before
    /// Linux 6.7) the populator runs untracked and
    /// [`Populator::tracking_unavailable`] says why.
    pub fn track_writes(mut self, on: bool) -> Self {
        self.track_writes = on;
        self
    }

    /// Whether the first fill of a 2 MiB block allocates the whole block
    /// where the region allows it ([`BlockAllocation::PopulateAlias`]:
    /// one folio, no copy when the block is promoted). On by default. Turn
    /// it off where only some pages of a block will ever be resident, as
    /// in a buffer pool whose memory budget is smaller than its data: each
    /// fill then allocates only its own pages, and a block is promoted
    /// (with a copy) only once all of them are filled.
    ///
    /// [`BlockAllocation::PopulateAlias`]: crate::BlockAllocation::PopulateAlias
    pub fn whole_blocks(mut self, on: bool) -> Self {
        self.whole_blocks = on;
        self
    }

    /// How long a touch (or `populate`, or `discard`) waits for a page that
    /// another live process or thread is filling before it gives up (30 s
    /// by default). A touch that gives up raises SIGBUS for that page in
    /// this process and records [`FillError::Stuck`](super::FillError::Stuck)
    /// with the holder's pid; `populate` and `discard` return an error. A
    /// filler proven dead is taken over at once, whatever the timeout.
    pub fn fill_timeout(mut self, timeout: Duration) -> Self {
        self.fill_timeout = timeout;
        self
    }

    /// How long a handler thread keeps reading the userfaultfd after it
    /// runs dry before it sleeps (one thread at a time; 0, the default,
    /// sleeps at once). Faults come in bursts and a wake-up from sleep
    /// costs a cross-CPU interrupt: with spare cores, 50 µs here raised
    /// random first-touch throughput with one handler thread by about 65 %
    /// and halved its p99; on a machine whose cores the faulting threads
    /// already use, the spinning thread takes CPU from them and it can
    /// lose. Measure with `examples/populate`.
    pub fn handler_spin(mut self, spin: Duration) -> Self {
        self.handler_spin = spin;
        self
    }

    /// Chooses when full blocks are collapsed into huge mappings
    /// (`ShmemThp`, and `HugetlbHgm` where the kernel has it).
    pub fn promotion(mut self, promotion: Promotion) -> Self {
        self.promotion = promotion;
        self
    }
}

/// Populates one region's primary view in this process: first touches are
/// filled from `S` exactly once across all threads and processes, and
/// mapped with `UFFDIO_CONTINUE`.
///
/// Dropping it stops its threads and closes the userfaultfd, which turns
/// the primary back into plain shared memory. If the region is still held
/// elsewhere, the granules not present yet are poisoned in this process
/// first, so touching one later raises SIGBUS instead of reading a zero
/// page where the source has data; present ones keep reading their bytes.
///
/// ```
/// use std::sync::Arc;
/// use hugearena::populate::{FnSource, PopulateOptions, Populator, SignalSafe};
/// use hugearena::{BackendKind, Region, RegionOptions};
///
/// let region = Arc::new(Region::create(
///     RegionOptions::new(4 << 20).backend(BackendKind::Shmem),
/// )?);
/// // Page i is filled with the byte i, once, on its first touch in any process.
/// // SAFETY: the closure only writes into `dst`: no allocation, lock or panic.
/// let source = unsafe {
///     SignalSafe::new(FnSource(|i: u64, dst: &mut [u8]| {
///         dst.fill(i as u8);
///         Ok(())
///     }))
/// };
/// let populator = Populator::with_options(region.clone(), source, PopulateOptions::new())?;
/// let mut byte = [0u8; 1];
/// region.read_via_primary(7 * 4096, &mut byte)?;
/// assert_eq!(byte[0], 7);
/// assert_eq!(populator.stats().fills, 1 + populator.stats().readahead);
/// # Ok::<(), hugearena::Error>(())
/// ```
pub struct Populator {
    core: Arc<Core>,
    driver: Driver,
    tracking: bool,
    /// Why writes are not tracked although the options asked for it.
    untracked: Option<String>,
    handlers: Option<HandlerPool>,
    registration: Option<Registration>,
    collapser: Option<JoinHandle<()>>,
    /// Re-arms the core in forked children.
    watch: Option<fork::Watch>,
    /// [`fork::generation`] when created: a different one means this is a
    /// forked child's copy, whose threads are in the parent.
    generation: u64,
}

impl std::fmt::Debug for Populator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Populator")
            .field("region", &self.core.region.name())
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// A [`Promoter::hold`] for as long as it lives.
struct PromotionHold<'a>(&'a super::promote::Promoter);

impl<'a> PromotionHold<'a> {
    fn new(promoter: &'a super::promote::Promoter) -> Self {
        promoter.hold();
        PromotionHold(promoter)
    }
}

impl Drop for PromotionHold<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Populator {
    /// Populates `region` from `source` with the default options (the
    /// in-thread driver).
    pub fn new(region: Arc<Region>, source: impl SignalSafeSource + 'static) -> Result<Self> {
        Self::with_options(region, source, PopulateOptions::default())
    }

    /// Registers `region`'s primary view for minor faults and starts the
    /// driver the options name (in-thread by default). Any driver can run
    /// a [`SignalSafeSource`]; other sources go to
    /// [`with_handler_threads`](Populator::with_handler_threads).
    pub fn with_options(
        region: Arc<Region>,
        source: impl SignalSafeSource + 'static,
        options: PopulateOptions,
    ) -> Result<Self> {
        let driver = options.driver.unwrap_or(Driver::InThread);
        Self::start(region, Box::new(source), driver, options)
    }

    /// Populates `region` from any source, which only handler threads (and
    /// `populate`) call, never a signal handler: the driver is
    /// [`Driver::HandlerThreads`] (one thread unless the options name
    /// more). Asking for another driver is an error.
    pub fn with_handler_threads(
        region: Arc<Region>,
        source: impl PageSource + 'static,
        options: PopulateOptions,
    ) -> Result<Self> {
        let driver = options.driver.unwrap_or(Driver::HandlerThreads(1));
        if !matches!(driver, Driver::HandlerThreads(_)) {
            return Err(Error::InvalidOption {
                option: "PopulateOptions::driver",
                reason: format!(
                    "the {driver} driver runs the source inside a SIGBUS handler: it needs a \
                     SignalSafeSource (wrap a source you have checked in SignalSafe), or use \
                     Driver::HandlerThreads"
                ),
            });
        }
        Self::start(region, Box::new(source), driver, options)
    }

    fn start(
        region: Arc<Region>,
        source: Box<dyn PageSource>,
        driver: Driver,
        options: PopulateOptions,
    ) -> Result<Self> {
        if driver == Driver::HandlerThreads(0) {
            return Err(Error::InvalidOption {
                option: "Driver::HandlerThreads",
                reason: "needs at least one thread".into(),
            });
        }
        let handlers = matches!(driver, Driver::HandlerThreads(_));
        let kind = region.backend().kind();
        // A first touch is a MISSING fault if the page is not in the page
        // cache yet, a MINOR fault if another process (or the alias) put it
        // there: both are caught, and both are resolved by filling the page
        // cache through the alias and mapping it with UFFDIO_CONTINUE.
        let mut features = if kind.uses_hugetlb() {
            Features::MISSING_HUGETLBFS | Features::MINOR_HUGETLBFS
        } else {
            Features::MISSING_SHMEM | Features::MINOR_SHMEM
        };
        // A failed page gets a poison marker (UFFDIO_POISON, Linux 6.6).
        // Without it the page's shared state alone says it failed, and each
        // touch of it is answered with SIGBUS by the fault path: the
        // faulting thread's own handler chains, a handler thread signals
        // the faulting thread (whose id THREAD_ID gives).
        let offered = KernelCaps::cached().uffd.features;
        features = features
            | if offered.contains(Features::POISON) {
                Features::POISON
            } else {
                Features::THREAD_ID
            };
        if !handlers {
            features = features | Features::SIGBUS;
        }
        let mut mode = RegisterMode::MISSING | RegisterMode::MINOR;
        // Write tracking needs asynchronous write-protect faults and
        // PAGEMAP_SCAN (both Linux 6.7); without them the populator runs
        // untracked and says why (incremental snapshots are then full).
        let tracking_features = Features::WP_HUGETLBFS_SHMEM | Features::WP_ASYNC;
        let untracked = (options.track_writes && !offered.contains(tracking_features)).then(|| {
            format!(
                "write tracking is unavailable: this kernel's userfaultfd lacks {} (Linux 6.7)",
                Features(tracking_features.0 & !offered.0)
                    .names()
                    .join(" | ")
            )
        });
        let track_writes = options.track_writes && untracked.is_none();
        if track_writes {
            features = features | tracking_features;
            mode = mode | RegisterMode::WP;
        }
        check_features(driver, features)?;
        let flags = OpenFlags {
            nonblocking: handlers,
            ..OpenFlags::default()
        };
        let me = Owner::current().map_err(|errno| {
            Error::sys("reading this process's start time from /proc/self/stat")(SysError::new(
                "open(/proc/self/stat)",
                errno,
            ))
        })?;
        let (uffd, _) = Userfaultfd::open(flags).map_err(Error::userfaultfd)?;
        uffd.api(features)
            .map_err(Error::sys("userfaultfd API handshake"))?;
        let (primary, len) = (region.primary().as_ptr(), region.len());
        if kind == BackendKind::HugetlbHgm {
            // SAFETY: the primary is a shared hugetlb mapping owned by the
            // region; splitting only permits smaller mappings later.
            unsafe { mman::madvise(primary, len, Advice::Split) }.map_err(Error::sys(
                "allowing 4 KiB mappings of huge pages (MADV_SPLIT)",
            ))?;
        }
        uffd.register(primary, len, mode).map_err(Error::sys(
            "registering the primary view for missing and minor faults",
        ))?;

        let granule = region.granule().bytes();
        let block = match kind {
            BackendKind::ShmemThp => Some(PageSize::Huge2M.bytes()),
            BackendKind::HugetlbHgm => Some(region.backend().mapping_unit().bytes()),
            BackendKind::Hugetlb | BackendKind::Shmem => None,
        };
        let promoter = block
            .filter(|_| options.promotion != Promotion::Off && !track_writes)
            .map(|b| Promoter::new(options.promotion, primary as usize, len, b, granule));
        let readahead = match options.readahead {
            _ if driver == Driver::Proactive => 0,
            0 => 0,
            bytes => (bytes / granule).max(1) as u64,
        };
        let core = Arc::new(Core::new(
            Arc::clone(&region),
            uffd,
            source,
            promoter,
            Settings {
                me,
                features,
                register_mode: mode,
                wakes: handlers,
                track_writes,
                readahead_granules: readahead,
                fault_around_granules: match driver {
                    Driver::Proactive => 0,
                    _ => (options.fault_around / granule) as u64,
                },
                fill_timeout: options.fill_timeout,
                handler_spin: options.handler_spin,
                whole_blocks: options.whole_blocks,
            },
        ));
        let mut populator = Populator {
            core,
            driver,
            tracking: track_writes,
            untracked,
            handlers: None,
            registration: None,
            collapser: None,
            watch: None,
            generation: fork::generation(),
        };
        if populator
            .core
            .promoter
            .as_ref()
            .is_some_and(|p| p.mode() == Promotion::Background)
        {
            let core = Arc::clone(&populator.core);
            let worker = std::thread::Builder::new()
                .name("hugearena-collapse".into())
                .spawn(move || {
                    if let Some(p) = &core.promoter {
                        p.run_worker(&core.counters, &|b| core.block_complete(b));
                    }
                })
                .map_err(|source| Error::Spawn {
                    what: "background collapse",
                    source,
                })?;
            populator.collapser = Some(worker);
        }
        match driver {
            Driver::HandlerThreads(n) => {
                let pool =
                    HandlerPool::spawn(&populator.core, n).map_err(|source| Error::Spawn {
                        what: "userfaultfd handler",
                        source,
                    })?;
                populator.handlers = Some(pool);
            }
            Driver::InThread | Driver::Proactive => {
                let ctx = Arc::as_ptr(&populator.core).cast::<()>();
                let start = primary as usize;
                // SAFETY: `ctx` points into the `Arc` this populator holds
                // until after the registration is dropped (see `Drop`), and
                // the resolve routine is async-signal-safe (engine docs).
                let registration =
                    unsafe { signal::register(start, start + len, ctx, resolve_in_thread) }
                        .map_err(Error::sys("installing the in-thread fault handler"))?;
                populator.registration = Some(registration);
            }
        }
        let ctx = Arc::as_ptr(&populator.core).cast::<()>();
        // SAFETY: the populator holds the core until after the watch is
        // dropped (see `Drop`), and `rearm_in_child` makes system calls
        // and touches the core's atomics only.
        populator.watch = unsafe { fork::watch(ctx, rearm_in_child) };
        if populator.watch.is_none() {
            return Err(Error::sys("watching for forks")(
                SysError::new("registering a populator", crate::sys::Errno::ENOSPC)
                    .arg("capacity", fork::CAPACITY as u64),
            ));
        }
        Ok(populator)
    }

    /// The region.
    pub fn region(&self) -> &Arc<Region> {
        &self.core.region
    }

    /// The shared state of granule `index` (what every process sees), or
    /// `None` past the end: for monitoring and tests.
    pub fn page_state(&self, index: usize) -> Option<PageState> {
        let states = self.core.region.page_states_for(index, index + 1).ok()?;
        states.get(index).map(state::observe)
    }

    /// How many granules are present in the page cache (filled by any
    /// process): a scan of the page-state table (0 if the table cannot be
    /// allocated).
    pub fn present_granules(&self) -> usize {
        let region = &self.core.region;
        region.backed_state_ranges().map_or(0, |ranges| {
            ranges
                .into_iter()
                .filter_map(|r| {
                    let states = region.page_states_for(r.start, r.end).ok()?;
                    Some(
                        states[r]
                            .iter()
                            .filter(|w| state::observe(*w) == PageState::Present)
                            .count(),
                    )
                })
                .sum()
        })
    }

    /// The page source.
    pub fn source(&self) -> &dyn PageSource {
        self.core.source()
    }

    /// The driver.
    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// Populates every granule overlapping `[offset, offset + len)` of the
    /// primary view, so touching it never faults: one fill per absent
    /// granule, one `UFFDIO_CONTINUE` per contiguous run. A granule whose
    /// fill fails is poisoned and reported by [`errors`](Self::errors).
    pub fn populate(&self, offset: usize, len: usize) -> Result<()> {
        let (first, last) = self.granules(offset, len)?;
        self.core
            .populate_range(first, last)
            .map_err(Error::sys("populating a range"))
    }

    /// The counters and the fill latency distribution, now.
    pub fn stats(&self) -> Stats {
        self.core.counters.snapshot(self.core.latency.histogram())
    }

    /// The first source errors (up to 64); their granules are poisoned.
    pub fn errors(&self) -> Vec<SourceError> {
        self.core.errors.to_vec()
    }

    /// How many fills failed, including those not kept by
    /// [`errors`](Self::errors).
    pub fn error_count(&self) -> usize {
        self.core.errors.total()
    }

    /// Unexpected system call failures of the driver (up to 16), e.g. a
    /// handler thread that died. Empty in normal operation.
    pub fn failures(&self) -> Vec<SysError> {
        self.core.failures.to_vec()
    }

    /// Handler threads still running.
    pub fn live_handlers(&self) -> usize {
        self.core.live_handlers.load(Ordering::Acquire)
    }

    /// Collapses the blocks waiting for the background thread now, in the
    /// calling thread.
    pub fn flush_promotions(&self) {
        if let Some(p) = &self.core.promoter {
            p.flush(&self.core.counters, &|b| self.core.block_complete(b));
        }
    }

    /// Starts populating the whole region in a background thread at the
    /// lowest priority, `chunk` bytes at a time (rounded to granules), in
    /// address order; faults keep being served meanwhile. Aligned 2 MiB
    /// runs of holes in a source with data (a snapshot's never-written
    /// pages: [`PageSource::is_zero`](super::PageSource::is_zero)) are
    /// left to their first touch: they need no read, and allocating them
    /// would spend memory nobody may touch. A source of zeroes only
    /// ([`fills_zero`](super::PageSource::fills_zero)) is allocated whole,
    /// the one thing its drain is for. With
    /// [`Promotion::Background`], blocks are not collapsed while it runs
    /// (a collapse that copies stalls the accesses the drain is there to
    /// serve) but when it ends. The returned [`Drain`] reports progress
    /// and stops the thread when dropped.
    pub fn start_drain(&self, chunk: usize) -> Result<Drain> {
        let core = Arc::clone(&self.core);
        let per_chunk = (chunk / core.granule()).max(1);
        let total = self.core.region.len() / core.granule();
        let progress = Arc::new(DrainProgress {
            done: AtomicU64::new(0),
            total: total as u64,
            stop: AtomicBool::new(false),
        });
        let shared = Arc::clone(&progress);
        let handle = std::thread::Builder::new()
            .name("hugearena-drain".into())
            .spawn(move || -> std::result::Result<(), SysError> {
                // Best effort: a drain at normal priority is still correct.
                let _ = crate::sys::thread::lower_priority();
                // No collapses while it runs (see `Promoter::hold`); ended
                // however the thread ends.
                let _held = core.promoter.as_ref().map(PromotionHold::new);
                let mut at = 0;
                while at < total && !shared.stop.load(Ordering::Acquire) {
                    let end = (at + per_chunk).min(total);
                    core.populate_sourced(at, end)?;
                    shared.done.store(end as u64, Ordering::Release);
                    at = end;
                }
                Ok(())
            })
            .map_err(|source| Error::Spawn {
                what: "background drain",
                source,
            })?;
        Ok(Drain {
            progress,
            handle: Some(handle),
            generation: fork::generation(),
        })
    }

    /// Drops the pages of every granule overlapping `[offset, offset +
    /// len)` from every process and from the backing file, so their memory
    /// goes back to the kernel and the next touch, in any process, fills
    /// them again from the source. A fill in progress is waited for (up to
    /// the fill timeout) and then dropped too; poisoned granules become
    /// fillable again. Crash-safe: a process killed during a discard
    /// leaves its granules claimed by a dead process, and the next toucher
    /// takes them over and fills them from the source.
    ///
    /// The caller must not need the bytes: a concurrent reader of a
    /// discarded page sees either its old bytes or the source's.
    ///
    /// The range must be made of whole [`discard_unit`](Self::discard_unit)s
    /// (granules, except on `HugetlbHgm`), or it is refused with
    /// [`Error::PartialHugePage`] and nothing is dropped.
    pub fn discard(&self, offset: usize, len: usize) -> Result<()> {
        let unit = self.discard_unit();
        let end = offset.saturating_add(len);
        if unit > self.core.granule()
            && (offset % unit != 0 || (end % unit != 0 && end != self.core.region.len()))
        {
            return Err(Error::PartialHugePage {
                offset: offset as u64,
                len: len as u64,
                huge_page: self.core.region.backend().mapping_unit(),
            });
        }
        let (first, last) = self.granules(offset, len)?;
        self.core
            .discard_range(first, last)
            .map_err(Error::sys("discarding pages"))?;
        self.core
            .counters
            .discards
            .fetch_add((last - first) as u64, Ordering::Relaxed);
        if self.tracking {
            for i in first..last {
                self.core.replaced.insert(i);
            }
        }
        Ok(())
    }

    /// Writes the bytes of `[offset, offset + len)` back to the populator's
    /// [`PageStore`](super::PageStore), straight from the region (one
    /// `pwrite` per present granule in the range; a granule that is not
    /// present has no bytes of its own to write and is skipped).
    ///
    /// With [`discard`](Self::discard) this is a buffer pool's eviction of a
    /// dirty page: a write-back that returns before a discard of the same
    /// page begins is read by every fill of the page after the discard, in
    /// any process (see the page-state protocol). The caller keeps writers
    /// of the range out from the write-back to the end of the discard (a
    /// buffer pool's exclusive page latch); bytes written in between are
    /// lost with the page. On error nothing is discarded and the range can
    /// be written back again.
    pub fn write_back(&self, offset: usize, len: usize) -> Result<()> {
        let store = self.core.source().as_store().ok_or(Error::ReadOnlySource)?;
        let (first, last) = self.granules(offset, len)?;
        let g = self.core.granule();
        let end = offset + len;
        let primary = self.core.region.primary().as_ptr();
        for index in first..last {
            if self.page_state(index) != Some(PageState::Present) {
                continue;
            }
            let from = offset.max(index * g);
            let to = end.min((index + 1) * g);
            // SAFETY: `from..to` lies in the primary, and the granule is
            // present, so reading it takes at most a minor fault. Writers
            // are kept out by the caller (documented above); a racing
            // writer makes the bytes stale, never unsound to read as `u8`.
            let bytes = unsafe { std::slice::from_raw_parts(primary.add(from), to - from) };
            let mut written = store.write_back(from as u64, bytes);
            if written == Err(FillError::Io(crate::sys::Errno::EFAULT)) {
                // Not mapped in this process (filled by another, or its
                // mapping dropped by a collapse): the kernel's read of it is
                // a minor fault, which the in-thread drivers cannot serve in
                // kernel mode. Reading it here, in user mode, is served.
                written = write_back_through_buffer(store, from, bytes);
            }
            written.map_err(|source| Error::WriteBack {
                offset: from as u64,
                len: (to - from) as u64,
                source,
            })?;
        }
        Ok(())
    }

    /// Makes the pages written back so far durable: the store's `sync`
    /// (`fdatasync(2)` for a [`FileStore`](super::FileStore)).
    pub fn sync(&self) -> Result<()> {
        let store = self.core.source().as_store().ok_or(Error::ReadOnlySource)?;
        store.sync().map_err(|source| Error::WriteBack {
            offset: 0,
            len: self.core.region.len() as u64,
            source,
        })
    }

    /// Whether the granule holding byte `offset` is present: filled by some
    /// process, so that touching it costs at most a minor fault and reads
    /// no source. One load of its shared state word; `false` past the end.
    pub fn is_present(&self, offset: usize) -> bool {
        offset < self.core.region.len()
            && self.page_state(offset / self.core.granule()) == Some(PageState::Present)
    }

    /// The unit [`discard`](Self::discard) drops memory in: a granule, but
    /// a whole huge page on `HugetlbHgm`, where the kernel can only zero a
    /// punched 4 KiB piece of a huge page, not unmap it from the processes
    /// that map it (they would read zeroes).
    pub fn discard_unit(&self) -> usize {
        let backend = self.core.region.backend();
        if backend.kind().uses_hugetlb() {
            backend.mapping_unit().bytes()
        } else {
            self.core.granule()
        }
    }

    /// Lets the poisoned granules overlapping `[offset, offset + len)` be
    /// filled again (after a transient failure of the source: a full disk
    /// that has space again, a file that is readable again). Their shared
    /// state goes back to absent, and this process's SIGBUS markers on the
    /// range are dropped (also those of pages it gave up waiting for);
    /// another process that holds markers calls `retry` too. Returns how
    /// many granules were poisoned.
    pub fn retry(&self, offset: usize, len: usize) -> Result<usize> {
        let (first, last) = self.granules(offset, len)?;
        self.core
            .retry_range(first, last)
            .map_err(Error::sys("clearing poisoned pages"))
    }

    fn granules(&self, offset: usize, len: usize) -> Result<(usize, usize)> {
        let g = self.core.granule();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.core.region.len())
            .ok_or(Error::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                region_len: self.core.region.len() as u64,
            })?;
        Ok((offset / g, end.div_ceil(g)))
    }

    /// The granules this process wrote (or whose pages it replaced) since
    /// the previous call, in order; write-protects them again. Needs
    /// [`PopulateOptions::track_writes`]. Writes by other processes are
    /// tracked in their own page tables and not seen here.
    pub fn take_changed(&self) -> Result<Vec<usize>> {
        if !self.tracking {
            return Err(Error::InvalidOption {
                option: "PopulateOptions::track_writes",
                reason: "write tracking is off for this populator: enable it to ask what changed"
                    .into(),
            });
        }
        let start = self.core.region.primary().as_ptr() as u64;
        let end = start + self.core.region.len() as u64;
        let written = crate::sys::pagemap::take_written(start, end).map_err(Error::sys(
            "asking the kernel which pages were written (PAGEMAP_SCAN)",
        ))?;
        let g = self.core.granule() as u64;
        let mut changed: Vec<usize> = written
            .into_iter()
            .flat_map(|(a, b)| ((a - start) / g) as usize..((b - start).div_ceil(g)) as usize)
            .collect();
        self.core.replaced.take(|i| changed.push(i));
        changed.sort_unstable();
        changed.dedup();
        Ok(changed)
    }

    /// Reports granules as changed at the next
    /// [`take_changed`](Self::take_changed) (e.g. after a snapshot that
    /// took them failed).
    pub fn mark_changed(&self, granules: &[usize]) {
        for &i in granules {
            self.core.replaced.insert(i);
        }
    }

    /// Whether this populator tracks writes.
    pub fn tracks_writes(&self) -> bool {
        self.tracking
    }

    /// Why this populator does not track writes although
    /// [`PopulateOptions::track_writes`] asked for it (the kernel lacks
    /// what tracking needs), or `None`.
    pub fn tracking_unavailable(&self) -> Option<&str> {
        self.untracked.as_deref()
    }

    /// Stops the handler threads after they resolve what is pending, and
    /// fails closed: present pages are mapped, unpopulated ones poisoned in
    /// this process, so a later touch raises SIGBUS instead of sleeping
    /// forever. Does nothing for other drivers.
    pub fn stop_handlers(&mut self) {
        if let Some(mut pool) = self.handlers.take() {
            if self.forked() {
                // The threads are the parent's; this child resolves its
                // own faults.
                pool.forget();
                return;
            }
            pool.stop();
            self.core.fail_closed();
        }
    }

    /// Whether this is a forked child's copy of a parent's populator.
    fn forked(&self) -> bool {
        self.generation != fork::generation()
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        // First, so that a child forked from now on does not re-arm a core
        // on its way out.
        drop(self.watch.take());
        if self.forked() {
            // The parent's threads are not in this process: stopping them
            // would stop the parent's (the stop descriptor is shared), and
            // joining them would wait forever.
            if let Some(pool) = self.handlers.take() {
                pool.forget();
            }
            if let Some(worker) = self.collapser.take() {
                std::mem::forget(worker);
            }
            if let Some(slot) = self.core.take_child_registration() {
                // SAFETY: the child's re-arm stored this slot, once.
                drop(unsafe { Registration::from_slot(slot) });
            }
            drop(self.registration.take());
            return;
        }
        if let Some(mut pool) = self.handlers.take() {
            pool.stop();
        }
        // Waits for signal handlers inside this populator to leave.
        drop(self.registration.take());
        // Someone else still maps the region (the application holds it):
        // untouched pages must not read as zeroes once the userfaultfd is
        // closed.
        if Arc::strong_count(&self.core.region) > 1 {
            self.core.poison_unfilled();
        }
        if let Some(worker) = self.collapser.take() {
            if let Some(p) = &self.core.promoter {
                p.stop();
            }
            let _ = worker.join();
        }
    }
}

/// Progress of a background drain.
#[derive(Debug)]
struct DrainProgress {
    done: AtomicU64,
    total: u64,
    stop: AtomicBool,
}

/// A background drain started by [`Populator::start_drain`].
#[derive(Debug)]
pub struct Drain {
    progress: Arc<DrainProgress>,
    handle: Option<JoinHandle<std::result::Result<(), SysError>>>,
    /// [`fork::generation`] when started (the thread is not in a child).
    generation: u64,
}

impl Drain {
    /// Granules done so far (populated, or left to their first touch as a
    /// run of holes) and in all.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.progress.done.load(Ordering::Acquire),
            self.progress.total,
        )
    }

    /// Whether the drain has finished (or failed). In a forked child: its
    /// thread is in the parent, and this says `true`.
    pub fn is_finished(&self) -> bool {
        self.generation != fork::generation()
            || self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for the drain to finish.
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        if self.generation != fork::generation() {
            // A forked child's copy: the thread runs in the parent only.
            std::mem::forget(self.handle.take());
            return Err(Error::sys("waiting for a drain")(SysError::new(
                "the drain thread runs in the parent process",
                crate::sys::Errno::ECHILD,
            )));
        }
        match self.handle.take().map(|h| h.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Error::sys("draining the region")(e)),
            Some(Err(_)) => Err(Error::sys("draining the region")(SysError::new(
                "drain thread panicked",
                crate::sys::Errno::ECANCELED,
            ))),
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.progress.stop.store(true, Ordering::Release);
        let _ = self.join();
    }
}

/// Re-arms a populator's core in a forked child (see [`fork`]). On any
/// failure the child's copy of the primary becomes inaccessible, so a touch
/// faults instead of reading zeroes where the source has data.
///
/// # Safety
///
/// `ctx` must point to a live `Core`, and no other thread may run.
unsafe fn rearm_in_child(ctx: *const ()) {
    // SAFETY: the fork watch's contract keeps `ctx` alive.
    let core = unsafe { &*ctx.cast::<Core>() };
    let (start, len) = (core.region.primary().as_ptr(), core.region.len());
    let mut armed = core.rearm_in_child();
    if armed.is_ok() && core.needs_child_registration() {
        let from = start as usize;
        // SAFETY: `ctx` lives until the populator's drop, which takes this
        // registration back first; the resolver is async-signal-safe.
        armed = unsafe { signal::register(from, from + len, ctx, resolve_in_thread) }
            .map(|r| core.set_child_registration(r.into_slot()));
    }
    if let Err(e) = armed {
        core.failures.push(e);
        // SAFETY: the primary is the region's own mapping; a touch now
        // faults, which is the point.
        let _ = unsafe { mman::protect_none(start, len) };
    }
}

/// The in-thread driver's entry from the SIGBUS handler.
///
/// # Safety
///
/// `ctx` must point to a live `Core`.
unsafe fn resolve_in_thread(ctx: *const (), addr: usize) -> bool {
    // SAFETY: the registration's contract keeps `ctx` alive while entered.
    let core = unsafe { &*ctx.cast::<Core>() };
    let _in_handler = InSignalHandler::enter();
    let Some(index) = core.index_of(addr) else {
        return false;
    };
    Counters::bump(&core.counters.faults_in_thread);
    matches!(core.resolve_fault(index), Ok(true))
}

fn check_features(driver: Driver, wanted: Features) -> Result<()> {
    let offered = KernelCaps::cached().uffd.features;
    let missing = Features(wanted.0 & !offered.0);
    if missing.0 == 0 || offered.0 == 0 {
        // Nothing missing, or userfaultfd unusable: opening it reports why.
        return Ok(());
    }
    Err(Error::FeatureMissing {
        driver: driver.name(),
        missing: missing.names().join(" | "),
        offered: offered.names().join(" | "),
    })
}

/// Writes `bytes` (region bytes at `offset`, in the primary) to `store`
/// through a stack buffer, 64 KiB at a time: the copy into the buffer is
/// a user-mode read, which the driver resolves like any touch.
fn write_back_through_buffer(
    store: &dyn super::PageStore,
    offset: usize,
    bytes: &[u8],
) -> std::result::Result<(), FillError> {
    const STAGE: usize = 64 << 10;
    let mut buffer = [0u8; STAGE];
    for (i, chunk) in bytes.chunks(STAGE).enumerate() {
        let staged = &mut buffer[..chunk.len()];
        staged.copy_from_slice(chunk);
        store.write_back((offset + i * STAGE) as u64, staged)?;
    }
    Ok(())
}
