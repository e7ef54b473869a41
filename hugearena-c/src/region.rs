//! Regions, their population, and the page sources C can name.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use hugearena::persist::SnapshotSource;
use hugearena::populate::{
    Driver, FileSource, FileStore, FillError, FnSource, PopulateOptions, Populator, SignalSafe,
    ZeroSource,
};
use hugearena::{BackendKind, HugePages, PageSize, Region, RegionOptions};

use crate::error::{Failure, guard};
use crate::ffi::{arg, copy_out, opt, path, put};

/// `huge_pages`: hugetlb if possible, else the best shmem backend (the
/// default).
pub const HUGEARENA_HUGE_PAGES_TRY: c_int = 0;
/// `huge_pages`: hugetlb or an error naming the shortfall and its fix.
pub const HUGEARENA_HUGE_PAGES_ON: c_int = 1;
/// `huge_pages`: no hugetlb pages.
pub const HUGEARENA_HUGE_PAGES_OFF: c_int = 2;

/// `backend`: chosen by the huge page policy and what the kernel can do.
pub const HUGEARENA_BACKEND_AUTO: c_int = 0;
/// hugetlb with high-granularity mapping (kernels with the HGM series).
pub const HUGEARENA_BACKEND_HUGETLB_HGM: c_int = 1;
/// hugetlb, populated a whole huge page at a time.
pub const HUGEARENA_BACKEND_HUGETLB: c_int = 2;
/// shmem populated 4 KiB at a time, collapsed to 2 MiB mappings.
pub const HUGEARENA_BACKEND_SHMEM_THP: c_int = 3;
/// shmem populated and mapped 4 KiB at a time.
pub const HUGEARENA_BACKEND_SHMEM: c_int = 4;

/// `driver`: in-thread for a signal-safe source, one handler thread for
/// any other.
pub const HUGEARENA_DRIVER_DEFAULT: c_int = 0;
/// The faulting thread fills its own fault in a SIGBUS handler (the source
/// must be async-signal-safe). A system call that writes into an
/// unpopulated page fails with `EFAULT`: populate the range first.
pub const HUGEARENA_DRIVER_IN_THREAD: c_int = 1;
/// `handler_threads` threads serve faults; system calls are covered too.
pub const HUGEARENA_DRIVER_HANDLER_THREADS: c_int = 2;
/// Nothing is filled on touch: the program populates ranges before use.
pub const HUGEARENA_DRIVER_PROACTIVE: c_int = 3;

/// `kind` of a source: every page starts as zeroes.
pub const HUGEARENA_SOURCE_ZERO: c_int = 0;
/// Pages come from the file at `path` (read-only), from byte `offset`.
pub const HUGEARENA_SOURCE_FILE: c_int = 1;
/// Pages come from the file at `path`, and `hugearena_populator_write_back`
/// writes them back to it.
pub const HUGEARENA_SOURCE_FILE_STORE: c_int = 2;
/// Pages come from the snapshot file at `path` (and its parents).
pub const HUGEARENA_SOURCE_SNAPSHOT: c_int = 3;
/// Pages come from the callback `fill`.
pub const HUGEARENA_SOURCE_CALLBACK: c_int = 4;

/// Fills granule `index` into `dst` (`len` bytes, one granule). Returns 0,
/// or an `errno` value, which poisons the page (touching it raises SIGBUS;
/// `hugearena_populator_retry` makes it fillable again). Called from any
/// thread, possibly several at once; with `signal_safe` set, from inside a
/// SIGBUS handler too.
pub type hugearena_fill_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, index: u64, dst: *mut u8, len: usize) -> c_int>;

/// How to create a region. All zeroes (or a NULL pointer where one is
/// taken) means: the default huge page policy (`TRY`), backend chosen
/// automatically, 2 MiB huge pages, an anonymous memfd.
#[repr(C)]
#[derive(Debug)]
pub struct hugearena_region_options {
    /// Bytes of data; a multiple of the chosen backend's granule (4 KiB,
    /// or the huge page size on `HUGETLB`).
    pub size: u64,
    /// A new file to back the region (on hugetlbfs for the hugetlb
    /// backends, on a tmpfs for the shmem ones), so other processes open it
    /// by this path; NULL for an anonymous memfd (other processes open it
    /// through `hugearena_region_shareable_path`).
    pub path: *const c_char,
    /// `HUGEARENA_HUGE_PAGES_*`.
    pub huge_pages: c_int,
    /// `HUGEARENA_BACKEND_*`.
    pub backend: c_int,
    /// The hugetlb page size in bytes (2 MiB or 1 GiB); 0 for 2 MiB.
    pub huge_page_size: u64,
}

/// How a region is populated. All zeroes (or NULL) is the default.
#[repr(C)]
#[derive(Debug)]
pub struct hugearena_populate_options {
    /// `HUGEARENA_DRIVER_*`.
    pub driver: c_int,
    /// Handler threads for `HUGEARENA_DRIVER_HANDLER_THREADS` (0 means 1).
    pub handler_threads: u32,
    /// Bytes filled ahead of a sequential run of faults: 0 for the default
    /// (256 KiB), negative for none.
    pub readahead: i64,
    /// How long a thread waits for another process's fill of the same page
    /// before it gives up on it, in milliseconds; 0 for the default.
    pub fill_timeout_ms: u64,
}

/// Where pages come from.
#[repr(C)]
#[derive(Debug)]
pub struct hugearena_source {
    /// `HUGEARENA_SOURCE_*`.
    pub kind: c_int,
    /// The file of `FILE`, `FILE_STORE` and `SNAPSHOT`.
    pub path: *const c_char,
    /// Byte offset in the file of `FILE` and `FILE_STORE` where the
    /// region's first page is.
    pub offset: u64,
    /// The callback of `CALLBACK`.
    pub fill: hugearena_fill_fn,
    /// Passed to `fill` as is.
    pub ctx: *mut c_void,
    /// Nonzero promises that `fill` is async-signal-safe (no locks, no
    /// `malloc`, nothing `signal-safety(7)` does not list), so the
    /// in-thread driver may call it from a SIGBUS handler. Zero: the
    /// callback is served by handler threads only.
    pub signal_safe: c_int,
}

/// A region mapped in this process. Other processes map the same memory by
/// opening it.
#[derive(Debug)]
pub struct hugearena_region {
    pub(crate) region: Arc<Region>,
}

impl hugearena_region {
    /// A new handle, owned by C.
    fn boxed(region: Arc<Region>) -> *mut hugearena_region {
        Box::into_raw(Box::new(hugearena_region { region }))
    }
}

/// A region's population in this process: faults, fills, discards.
#[derive(Debug)]
pub struct hugearena_populator {
    pub(crate) populator: Populator,
}

/// What a region is made of.
#[repr(C)]
#[derive(Debug, Default)]
pub struct hugearena_backend_info {
    /// `HUGEARENA_BACKEND_*` (never `AUTO`).
    pub backend: c_int,
    /// Bytes filled at once on a first touch (4 KiB, or a huge page).
    pub granule: u64,
    /// Bytes one TLB entry covers once a block is populated.
    pub mapping_unit: u64,
    /// Bytes of data.
    pub size: u64,
}

/// Counters of one populator (this process only).
#[repr(C)]
#[derive(Debug, Default)]
pub struct hugearena_populate_stats {
    /// Faults served by handler threads.
    pub faults_handler: u64,
    /// Faults served by the faulting thread.
    pub faults_in_thread: u64,
    /// Granules filled from the source.
    pub fills: u64,
    /// Granules filled ahead of a sequential run of faults.
    pub readahead: u64,
    /// Granules poisoned after a source error.
    pub poisoned: u64,
    /// Dead processes' fills taken over.
    pub takeovers: u64,
    /// Granules dropped by discards.
    pub discards: u64,
    /// Blocks collapsed to huge mappings.
    pub collapses: u64,
    /// Granules present in the region (filled by any process).
    pub present_granules: u64,
}

/// The huge page policy named by a `HUGEARENA_HUGE_PAGES_*` code.
pub(crate) fn huge_pages_policy(code: c_int) -> Result<HugePages, Failure> {
    match code {
        HUGEARENA_HUGE_PAGES_TRY => Ok(HugePages::Try),
        HUGEARENA_HUGE_PAGES_ON => Ok(HugePages::On),
        HUGEARENA_HUGE_PAGES_OFF => Ok(HugePages::Off),
        other => Err(Failure::invalid(format!(
            "huge_pages {other} is not HUGEARENA_HUGE_PAGES_TRY, _ON or _OFF"
        ))),
    }
}

/// The backend named by a `HUGEARENA_BACKEND_*` code (`None` for `AUTO`).
pub(crate) fn backend_kind(code: c_int) -> Result<Option<BackendKind>, Failure> {
    if code == HUGEARENA_BACKEND_AUTO {
        return Ok(None);
    }
    u32::try_from(code)
        .ok()
        .and_then(BackendKind::from_code)
        .map(Some)
        .ok_or_else(|| Failure::invalid(format!("backend {code} is not a HUGEARENA_BACKEND_*")))
}

pub(crate) fn region_options(
    o: Option<&hugearena_region_options>,
) -> Result<RegionOptions, Failure> {
    let Some(o) = o else {
        return Err(Failure::invalid(
            "the region options are NULL: the size is required",
        ));
    };
    let mut opts = RegionOptions::new(o.size).huge_pages(huge_pages_policy(o.huge_pages)?);
    if let Some(kind) = backend_kind(o.backend)? {
        opts = opts.backend(kind);
    }
    if o.huge_page_size != 0 {
        let size = PageSize::from_bytes(o.huge_page_size)
            .filter(|s| s.bytes() > 4096)
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "huge_page_size {} is not a huge page size (2 MiB or 1 GiB)",
                    o.huge_page_size
                ))
            })?;
        opts = opts.huge_page_size(size);
    }
    if !o.path.is_null() {
        // SAFETY: non-NULL: the caller passes a NUL-terminated string.
        opts = opts.path(unsafe { path(o.path, "the region path") }?);
    }
    Ok(opts)
}

pub(crate) fn populate_options(
    o: Option<&hugearena_populate_options>,
) -> Result<PopulateOptions, Failure> {
    let mut opts = PopulateOptions::new();
    let Some(o) = o else { return Ok(opts) };
    match o.driver {
        HUGEARENA_DRIVER_DEFAULT => {}
        HUGEARENA_DRIVER_IN_THREAD => opts = opts.driver(Driver::InThread),
        HUGEARENA_DRIVER_HANDLER_THREADS => {
            opts = opts.driver(Driver::HandlerThreads(o.handler_threads.max(1) as usize))
        }
        HUGEARENA_DRIVER_PROACTIVE => opts = opts.driver(Driver::Proactive),
        other => {
            return Err(Failure::invalid(format!(
                "driver {other} is not a HUGEARENA_DRIVER_*"
            )));
        }
    }
    if o.readahead < 0 {
        opts = opts.readahead(0);
    } else if o.readahead > 0 {
        let bytes =
            usize::try_from(o.readahead).map_err(|_| Failure::invalid("readahead is too large"))?;
        opts = opts.readahead(bytes);
    }
    if o.fill_timeout_ms > 0 {
        opts = opts.fill_timeout(Duration::from_millis(o.fill_timeout_ms));
    }
    Ok(opts)
}

/// The caller's callback and its context, shareable with handler threads.
struct Callback {
    fill: unsafe extern "C" fn(*mut c_void, u64, *mut u8, usize) -> c_int,
    ctx: *mut c_void,
}

// SAFETY: the header's contract for `hugearena_fill_fn`: the callback and
// its context may be used from any thread, several at once.
unsafe impl Send for Callback {}
// SAFETY: as above.
unsafe impl Sync for Callback {}

impl Callback {
    fn call(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError> {
        // SAFETY: `dst` is valid for `dst.len()` bytes; the callback
        // promises to write only there.
        match unsafe { (self.fill)(self.ctx, index, dst.as_mut_ptr(), dst.len()) } {
            0 => Ok(()),
            errno if errno > 0 => Err(FillError::Io(hugearena::Errno::from_raw(errno))),
            _ => Err(FillError::Failed(
                "the fill callback returned a negative value",
            )),
        }
    }
}

/// Builds the populator for `source`, routing a callback that is not
/// signal-safe to handler threads.
fn new_populator(
    region: Arc<Region>,
    source: Option<&hugearena_source>,
    opts: Option<&hugearena_populate_options>,
) -> Result<Populator, Failure> {
    let popts = populate_options(opts)?;
    let Some(s) = source else {
        return Ok(Populator::with_options(region, ZeroSource, popts)?);
    };
    let file = || {
        // SAFETY: the header requires `path` to be NUL-terminated where the
        // kind reads it; NULL is refused.
        unsafe { path(s.path, "the source's path") }
    };
    let populator = match s.kind {
        HUGEARENA_SOURCE_ZERO => Populator::with_options(region, ZeroSource, popts)?,
        HUGEARENA_SOURCE_FILE => {
            let f = FileSource::open(file()?)?.with_offset(s.offset);
            Populator::with_options(region, f, popts)?
        }
        HUGEARENA_SOURCE_FILE_STORE => {
            let f = FileStore::open(file()?)?.with_offset(s.offset);
            Populator::with_options(region, f, popts)?
        }
        HUGEARENA_SOURCE_SNAPSHOT => {
            Populator::with_options(region, SnapshotSource::open(file()?)?, popts)?
        }
        HUGEARENA_SOURCE_CALLBACK => {
            let fill = s.fill.ok_or_else(|| {
                Failure::invalid("a HUGEARENA_SOURCE_CALLBACK source has no fill callback")
            })?;
            let cb = Callback { fill, ctx: s.ctx };
            let source = FnSource(move |index: u64, dst: &mut [u8]| cb.call(index, dst));
            if s.signal_safe != 0 {
                // SAFETY: the caller promised, through `signal_safe`, that
                // the callback is async-signal-safe; `Callback::call` adds
                // nothing that is not (no allocation, no lock).
                let source = unsafe { SignalSafe::new(source) };
                Populator::with_options(region, source, popts)?
            } else {
                if opts.is_some_and(|o| o.driver == HUGEARENA_DRIVER_IN_THREAD) {
                    return Err(Failure::invalid(
                        "the in-thread driver calls the source from a SIGBUS handler: set signal_safe \
                         if the callback is async-signal-safe, or use HUGEARENA_DRIVER_HANDLER_THREADS",
                    ));
                }
                Populator::with_handler_threads(region, source, popts)?
            }
        }
        other => {
            return Err(Failure::invalid(format!(
                "source kind {other} is not a HUGEARENA_SOURCE_*"
            )));
        }
    };
    Ok(populator)
}

pub(crate) fn backend_code(kind: BackendKind) -> c_int {
    kind.code() as c_int
}

/// Creates a region. On success `*out` is the new region, to be released
/// with `hugearena_region_free`.
///
/// # Safety
///
/// `opts` is NULL or valid; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_create(
    opts: *const hugearena_region_options,
    out: *mut *mut hugearena_region,
) -> c_int {
    guard("hugearena_region_create", || {
        // SAFETY: the caller's contract.
        let ropts = region_options(unsafe { opt(opts) })?;
        let region = Arc::new(Region::create(ropts)?);
        // SAFETY: the caller's contract.
        unsafe { put(out, hugearena_region::boxed(region), "out") }
    })
}

/// Opens a region another process created, by the path it was created at
/// or its `hugearena_region_shareable_path`.
///
/// # Safety
///
/// `path` is a NUL-terminated string; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_open(
    region_path: *const c_char,
    out: *mut *mut hugearena_region,
) -> c_int {
    guard("hugearena_region_open", || {
        // SAFETY: the caller's contract.
        let p = unsafe { path(region_path, "path") }?;
        let region = Arc::new(Region::open(p)?);
        // SAFETY: the caller's contract.
        unsafe { put(out, hugearena_region::boxed(region), "out") }
    })
}

/// Releases this handle. The mapping stays while a populator or arena made
/// from it lives. NULL is ignored.
///
/// # Safety
///
/// `region` is NULL or a handle from this library, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_free(region: *mut hugearena_region) {
    if !region.is_null() {
        // SAFETY: the caller's contract: a handle from `Box::into_raw`.
        drop(unsafe { Box::from_raw(region) });
    }
}

/// Where the region's data starts in this process.
///
/// # Safety
///
/// `region` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_base(region: *const hugearena_region) -> *mut u8 {
    // SAFETY: the caller's contract.
    match unsafe { opt(region) } {
        Some(r) => r.region.primary().as_ptr(),
        None => std::ptr::null_mut(),
    }
}

/// The backend, granule and size.
///
/// # Safety
///
/// `region` is a valid handle; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_backend(
    region: *const hugearena_region,
    out: *mut hugearena_backend_info,
) -> c_int {
    guard("hugearena_region_backend", || {
        // SAFETY: the caller's contract.
        let r = unsafe { arg(region, "region") }?;
        // SAFETY: the caller's contract.
        unsafe { put(out, backend_info(&r.region), "out") }
    })
}

pub(crate) fn backend_info(region: &Region) -> hugearena_backend_info {
    let b = region.backend();
    hugearena_backend_info {
        backend: backend_code(b.kind()),
        granule: b.granule().bytes() as u64,
        mapping_unit: b.mapping_unit().bytes() as u64,
        size: region.len() as u64,
    }
}

/// Why this backend was chosen (and why better ones were passed over),
/// copied into `buf` as `snprintf` does. Returns the length of the whole
/// text.
///
/// # Safety
///
/// `region` is a valid handle; `buf` is NULL or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_choice(
    region: *const hugearena_region,
    buf: *mut c_char,
    len: usize,
) -> usize {
    // SAFETY: the caller's contract.
    match unsafe { opt(region) } {
        // SAFETY: the caller's contract.
        Some(r) => unsafe { copy_out(&r.region.choice().reason, buf, len) },
        None => 0,
    }
}

/// The path another process opens this region by, copied into `buf` as
/// `snprintf` does. Returns the length of the whole path.
///
/// # Safety
///
/// `region` is a valid handle; `buf` is NULL or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_region_shareable_path(
    region: *const hugearena_region,
    buf: *mut c_char,
    len: usize,
) -> usize {
    // SAFETY: the caller's contract.
    match unsafe { opt(region) } {
        // SAFETY: the caller's contract.
        Some(r) => unsafe { copy_out(&r.region.shareable_path().to_string_lossy(), buf, len) },
        None => 0,
    }
}

/// Starts populating `region` in this process from `source` (NULL:
/// zeroes). The first touch of each page fills it, exactly once across
/// every process sharing the region.
///
/// # Safety
///
/// `region` is a valid handle; `source` and `opts` are NULL or valid;
/// `out` is valid for a write. A callback source's `ctx` must stay valid
/// until the populator is freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_new(
    region: *const hugearena_region,
    source: *const hugearena_source,
    opts: *const hugearena_populate_options,
    out: *mut *mut hugearena_populator,
) -> c_int {
    guard("hugearena_populator_new", || {
        // SAFETY: the caller's contract.
        let r = unsafe { arg(region, "region") }?;
        // SAFETY: the caller's contract.
        let populator = new_populator(r.region.clone(), unsafe { opt(source) }, unsafe {
            opt(opts)
        })?;
        let handle = Box::into_raw(Box::new(hugearena_populator { populator }));
        // SAFETY: the caller's contract.
        unsafe { put(out, handle, "out") }
    })
}

/// Stops populating: pages not filled yet are poisoned in this process
/// (they never read as zeroes). NULL is ignored.
///
/// # Safety
///
/// `populator` is NULL or a handle from this library, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_free(populator: *mut hugearena_populator) {
    if !populator.is_null() {
        // SAFETY: the caller's contract: a handle from `Box::into_raw`.
        drop(unsafe { Box::from_raw(populator) });
    }
}

fn range_call(
    op: &str,
    populator: *const hugearena_populator,
    offset: u64,
    len: u64,
    call: impl FnOnce(&Populator, usize, usize) -> hugearena::Result<()>,
) -> c_int {
    guard(op, || {
        // SAFETY: each caller's contract: `populator` is a valid handle.
        let p = unsafe { arg(populator, "populator") }?;
        let offset =
            usize::try_from(offset).map_err(|_| Failure::invalid("offset is too large"))?;
        let len = usize::try_from(len).map_err(|_| Failure::invalid("len is too large"))?;
        call(&p.populator, offset, len)?;
        Ok(())
    })
}

/// Fills every absent page of `[offset, offset + len)` now, so touching it
/// never faults (and system calls can write into it).
///
/// # Safety
///
/// `populator` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_populate(
    populator: *const hugearena_populator,
    offset: u64,
    len: u64,
) -> c_int {
    range_call(
        "hugearena_populator_populate",
        populator,
        offset,
        len,
        Populator::populate,
    )
}

/// Drops the pages of `[offset, offset + len)` from every process and from
/// memory; the next touch fills them again from the source. Write back
/// what must survive first.
///
/// # Safety
///
/// `populator` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_discard(
    populator: *const hugearena_populator,
    offset: u64,
    len: u64,
) -> c_int {
    range_call(
        "hugearena_populator_discard",
        populator,
        offset,
        len,
        Populator::discard,
    )
}

/// Writes the present pages of `[offset, offset + len)` to a `FILE_STORE`
/// source.
///
/// # Safety
///
/// `populator` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_write_back(
    populator: *const hugearena_populator,
    offset: u64,
    len: u64,
) -> c_int {
    range_call(
        "hugearena_populator_write_back",
        populator,
        offset,
        len,
        Populator::write_back,
    )
}

/// Makes the poisoned pages of `[offset, offset + len)` fillable again
/// (after a transient source failure). `*retried` (if not NULL) is how many
/// were.
///
/// # Safety
///
/// `populator` is a valid handle; `retried` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_retry(
    populator: *const hugearena_populator,
    offset: u64,
    len: u64,
    retried: *mut u64,
) -> c_int {
    guard("hugearena_populator_retry", || {
        // SAFETY: the caller's contract.
        let p = unsafe { arg(populator, "populator") }?;
        let n = p.populator.retry(offset as usize, len as usize)?;
        if !retried.is_null() {
            // SAFETY: the caller's contract.
            unsafe { put(retried, n as u64, "retried") }?;
        }
        Ok(())
    })
}

/// `fdatasync`s a `FILE_STORE` source.
///
/// # Safety
///
/// `populator` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_sync(populator: *const hugearena_populator) -> c_int {
    guard("hugearena_populator_sync", || {
        // SAFETY: the caller's contract.
        unsafe { arg(populator, "populator") }?.populator.sync()?;
        Ok(())
    })
}

/// Whether the granule holding `offset` is present (1) or not (0).
///
/// # Safety
///
/// `populator` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_is_present(
    populator: *const hugearena_populator,
    offset: u64,
) -> c_int {
    // SAFETY: the caller's contract.
    match unsafe { opt(populator) } {
        Some(p) => c_int::from(p.populator.is_present(offset as usize)),
        None => 0,
    }
}

/// The populator's counters.
///
/// # Safety
///
/// `populator` is a valid handle; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_get_stats(
    populator: *const hugearena_populator,
    out: *mut hugearena_populate_stats,
) -> c_int {
    guard("hugearena_populator_get_stats", || {
        // SAFETY: the caller's contract.
        let p = unsafe { arg(populator, "populator") }?;
        // SAFETY: the caller's contract.
        unsafe { put(out, populate_stats(&p.populator), "out") }
    })
}

pub(crate) fn populate_stats(p: &Populator) -> hugearena_populate_stats {
    let s = p.stats();
    hugearena_populate_stats {
        faults_handler: s.faults_handler,
        faults_in_thread: s.faults_in_thread,
        fills: s.fills,
        readahead: s.readahead,
        poisoned: s.poisoned,
        takeovers: s.takeovers,
        discards: s.discards,
        collapses: s.collapses,
        present_granules: p.present_granules() as u64,
    }
}

/// The message of each page source failure so far, one per line, copied
/// into `buf` as `snprintf` does. Returns the length of the whole text.
///
/// # Safety
///
/// `populator` is a valid handle; `buf` is NULL or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_populator_errors(
    populator: *const hugearena_populator,
    buf: *mut c_char,
    len: usize,
) -> usize {
    // SAFETY: the caller's contract.
    let Some(p) = (unsafe { opt(populator) }) else {
        return 0;
    };
    let text: String = p
        .populator
        .errors()
        .iter()
        .map(|e| format!("{e}\n"))
        .collect();
    // SAFETY: the caller's contract.
    unsafe { copy_out(&text, buf, len) }
}
