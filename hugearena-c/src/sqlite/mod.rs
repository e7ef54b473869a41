//! SQLite's page cache on a hugearena arena.
//!
//! [`hugearena_sqlite_pcache_install`] (C) or [`install`] (Rust) gives
//! SQLite an implementation of `sqlite3_pcache_methods2` whose page buffers
//! live in one arena: huge-page backed where the kernel allows, so a large
//! cache costs fewer TLB misses. It must run before `sqlite3_initialize`
//! (which the first `sqlite3_open` calls), as SQLite requires of any
//! `SQLITE_CONFIG_PCACHE2`. SQLite is found in the running program
//! (`sqlite3_config` is looked up by name), so the library has no link
//! dependency on it: link the program against `-lsqlite3` as usual. A
//! program that builds SQLite in without exporting its symbols fills the
//! methods with [`hugearena_sqlite_pcache_methods`] and calls
//! `sqlite3_config` itself.
//!
//! The cache follows the contract of SQLite's default cache: pages pinned
//! while SQLite uses them, kept in LRU order once unpinned and recycled at
//! the cache size SQLite sets (`PRAGMA cache_size`), `xFetch`'s create
//! flags 0 (look up only), 1 (create unless 90 % of the cache is pinned)
//! and 2 (create), caches that are not purgeable (in-memory and temporary
//! databases) never dropping a page, `xTruncate` dropping pinned pages too,
//! `xShrink` dropping every unpinned page and giving empty chunks back to
//! the arena.
//! Pages are carved from the arena in chunks of about 128 KiB, populated
//! when carved (no page fault per page); when the arena is full, chunks
//! come from the heap instead, so SQLite never sees an error the default
//! cache would not give ([`hugearena_sqlite_get_stats`] counts both).

mod cache;

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, PoisonError};

use hugearena::populate::PopulateOptions;
use hugearena::{Arena, BackendKind, HugePages, RegionOptions};

use crate::error::{Failure, HUGEARENA_E_INVALID_ARGUMENT, guard};
use crate::ffi::{opt, put};
use crate::region::{backend_kind, huge_pages_policy};
use cache::{Cache, Create, Handle, PcachePage};

/// The region size when none is given: 256 MiB of address space, filled
/// as the caches grow.
pub const HUGEARENA_SQLITE_DEFAULT_REGION_BYTES: u64 = 256 << 20;

/// How to place SQLite's page cache. All zeroes (or a NULL pointer) are
/// the defaults.
#[repr(C)]
#[derive(Debug)]
pub struct hugearena_sqlite_options {
    /// Bytes of the arena's region: the most the caches of every
    /// connection hold in it together (beyond it, pages come from the
    /// heap). 0 for `HUGEARENA_SQLITE_DEFAULT_REGION_BYTES`.
    pub region_bytes: u64,
    /// `HUGEARENA_HUGE_PAGES_*` (default `TRY`).
    pub huge_pages: c_int,
    /// `HUGEARENA_BACKEND_*` (default `AUTO`).
    pub backend: c_int,
    /// A file for the region (hugetlbfs or tmpfs), or NULL for an
    /// anonymous one.
    pub path: *const c_char,
}

/// What the page caches have done, over every cache of the process.
#[repr(C)]
#[derive(Debug, Default)]
pub struct hugearena_sqlite_stats {
    /// Caches created (one per open database file, roughly).
    pub caches: u64,
    /// Fetches that found their page (a live cache adds its count every
    /// 1024 fetches, and the rest when SQLite destroys it).
    pub hits: u64,
    /// Fetches that did not (counted as `hits` are).
    pub misses: u64,
    /// Pages whose slot was reused for another page at the size limit.
    pub recycled: u64,
    /// Chunks of pages (about 128 KiB each) carved from the arena so far.
    pub arena_chunks: u64,
    /// Chunks of pages taken from the heap so far because the arena was
    /// full.
    pub heap_chunks: u64,
    /// `HUGEARENA_BACKEND_*` of the arena's region (0 before install).
    pub backend: c_int,
}

struct Counters {
    caches: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    recycled: AtomicU64,
    arena_chunks: AtomicU64,
    heap_chunks: AtomicU64,
}

static STATS: Counters = Counters {
    caches: AtomicU64::new(0),
    hits: AtomicU64::new(0),
    misses: AtomicU64::new(0),
    recycled: AtomicU64::new(0),
    arena_chunks: AtomicU64::new(0),
    heap_chunks: AtomicU64::new(0),
};

/// The arena new caches take their pages from.
static ARENA: Mutex<Option<Arc<Arena>>> = Mutex::new(None);

fn current_arena() -> Option<Arc<Arena>> {
    ARENA.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The Rust form of [`hugearena_sqlite_options`].
#[derive(Clone, Debug, Default)]
pub struct PcacheOptions {
    /// Bytes of the region (0: the default, 256 MiB).
    pub region_bytes: u64,
    /// The huge page policy.
    pub huge_pages: HugePages,
    /// A backend to insist on.
    pub backend: Option<BackendKind>,
    /// A file for the region instead of an anonymous memfd.
    pub path: Option<PathBuf>,
}

/// Why the page cache could not be installed.
#[derive(Debug)]
pub struct InstallError {
    /// The `HUGEARENA_E_*` status.
    pub code: c_int,
    /// What went wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for InstallError {}

impl From<Failure> for InstallError {
    fn from(f: Failure) -> Self {
        InstallError {
            code: f.code,
            message: f.message,
        }
    }
}

/// SQLite's `sqlite3_pcache_methods2`.
#[repr(C)]
struct PcacheMethods2 {
    version: c_int,
    arg: *mut c_void,
    init: unsafe extern "C" fn(*mut c_void) -> c_int,
    shutdown: unsafe extern "C" fn(*mut c_void),
    create: unsafe extern "C" fn(c_int, c_int, c_int) -> *mut c_void,
    cachesize: unsafe extern "C" fn(*mut c_void, c_int),
    pagecount: unsafe extern "C" fn(*mut c_void) -> c_int,
    fetch: unsafe extern "C" fn(*mut c_void, c_uint, c_int) -> *mut PcachePage,
    unpin: unsafe extern "C" fn(*mut c_void, *mut PcachePage, c_int),
    rekey: unsafe extern "C" fn(*mut c_void, *mut PcachePage, c_uint, c_uint),
    truncate: unsafe extern "C" fn(*mut c_void, c_uint),
    destroy: unsafe extern "C" fn(*mut c_void),
    shrink: unsafe extern "C" fn(*mut c_void),
}

const SQLITE_OK: c_int = 0;
const SQLITE_MISUSE: c_int = 21;
const SQLITE_CONFIG_PCACHE2: c_int = 18;

fn methods() -> PcacheMethods2 {
    PcacheMethods2 {
        version: 1,
        arg: std::ptr::null_mut(),
        init: x_init,
        shutdown: x_shutdown,
        create: x_create,
        cachesize: x_cachesize,
        pagecount: x_pagecount,
        fetch: x_fetch,
        unpin: x_unpin,
        rekey: x_rekey,
        truncate: x_truncate,
        destroy: x_destroy,
        shrink: x_shrink,
    }
}

/// A cache as SQLite holds it. SQLite makes the calls on one cache one at
/// a time (its default cache takes no lock for them); the flag makes a
/// program that breaks that wait rather than corrupt the cache, for one
/// read-modify-write per call where a mutex costs two.
struct CacheBox {
    /// A call is inside: set (acquire) on entry, cleared (release) on exit.
    busy: AtomicBool,
    cache: UnsafeCell<Cache>,
}

// SAFETY: `cache` is reached only by the thread that set `busy`; `Cache`
// is `Send`.
unsafe impl Sync for CacheBox {}

/// Runs `f` on the cache behind SQLite's handle. A panic (a bug) must not
/// unwind into SQLite: it aborts.
///
/// # Safety
///
/// `cache` is a handle `x_create` returned and `x_destroy` has not freed.
unsafe fn with_cache<R>(cache: *mut c_void, f: impl FnOnce(&mut Cache) -> R) -> R {
    // SAFETY: the caller's contract.
    let cache = unsafe { &*cache.cast::<CacheBox>() };
    let mut spins = 0u32;
    while cache.busy.swap(true, Acquire) {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: this thread set `busy`: no other reaches the cache.
        f(unsafe { &mut *cache.cache.get() })
    }));
    cache.busy.store(false, Release);
    match result {
        Ok(r) => r,
        Err(_) => std::process::abort(),
    }
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

unsafe extern "C" fn x_create(
    page_size: c_int,
    extra_size: c_int,
    purgeable: c_int,
) -> *mut c_void {
    let (Ok(page_size), Ok(extra_size)) = (usize::try_from(page_size), usize::try_from(extra_size))
    else {
        return std::ptr::null_mut();
    };
    if page_size == 0 {
        return std::ptr::null_mut();
    }
    STATS.caches.fetch_add(1, Relaxed);
    let cache = Cache::new(page_size, extra_size, purgeable != 0, current_arena());
    let cache = CacheBox {
        busy: AtomicBool::new(false),
        cache: UnsafeCell::new(cache),
    };
    Box::into_raw(Box::new(cache)).cast()
}

unsafe extern "C" fn x_cachesize(cache: *mut c_void, pages: c_int) {
    // SAFETY: SQLite passes a live cache.
    unsafe {
        with_cache(cache, |c| {
            c.set_max_pages(usize::try_from(pages).unwrap_or(0))
        })
    }
}

unsafe extern "C" fn x_pagecount(cache: *mut c_void) -> c_int {
    // SAFETY: SQLite passes a live cache.
    unsafe { with_cache(cache, |c| c_int::try_from(c.pages()).unwrap_or(c_int::MAX)) }
}

unsafe extern "C" fn x_fetch(cache: *mut c_void, key: c_uint, create: c_int) -> *mut PcachePage {
    let create = match create {
        0 => Create::No,
        1 => Create::IfEasy,
        _ => Create::Always,
    };
    // SAFETY: SQLite passes a live cache.
    unsafe { with_cache(cache, |c| c.fetch(key, create).cast::<PcachePage>()) }
}

unsafe extern "C" fn x_unpin(cache: *mut c_void, page: *mut PcachePage, discard: c_int) {
    // SAFETY: SQLite passes a live cache and a page it fetched from it.
    unsafe { with_cache(cache, |c| c.unpin(c.slot_of(page), discard != 0)) }
}

unsafe extern "C" fn x_rekey(cache: *mut c_void, page: *mut PcachePage, old: c_uint, new: c_uint) {
    // SAFETY: SQLite passes a live cache and a page it fetched from it.
    unsafe { with_cache(cache, |c| c.rekey(c.slot_of(page), old, new)) }
}

unsafe extern "C" fn x_truncate(cache: *mut c_void, limit: c_uint) {
    // SAFETY: SQLite passes a live cache.
    unsafe { with_cache(cache, |c| c.truncate(limit)) }
}

unsafe extern "C" fn x_destroy(cache: *mut c_void) {
    if !cache.is_null() {
        // SAFETY: SQLite passes a cache from `x_create`, for the last time.
        drop(unsafe { Box::from_raw(cache.cast::<CacheBox>()) });
    }
}

unsafe extern "C" fn x_shrink(cache: *mut c_void) {
    // SAFETY: SQLite passes a live cache.
    unsafe { with_cache(cache, Cache::shrink) }
}

// Keeps the handle layout SQLite sees in one place.
const _: () = assert!(std::mem::offset_of!(Handle, page) == 0);

fn make_arena(o: &PcacheOptions) -> Result<Arena, Failure> {
    let bytes = if o.region_bytes == 0 {
        HUGEARENA_SQLITE_DEFAULT_REGION_BYTES
    } else {
        o.region_bytes
    };
    // Round up to whole 2 MiB blocks: every backend's granule divides it.
    let bytes = bytes.div_ceil(2 << 20) * (2 << 20);
    let mut ropts = RegionOptions::new(bytes).huge_pages(o.huge_pages);
    if let Some(kind) = o.backend {
        ropts = ropts.backend(kind);
    }
    if let Some(p) = &o.path {
        ropts = ropts.path(p);
    }
    Ok(Arena::create(ropts, PopulateOptions::new())?)
}

/// Creates the arena and hands SQLite the page cache methods. Must run
/// before `sqlite3_initialize` (the first `sqlite3_open` runs it).
pub fn install(options: &PcacheOptions) -> Result<(), InstallError> {
    let config = sqlite3_config()?;
    let arena = Arc::new(make_arena(options)?);
    let previous = ARENA
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .replace(arena);
    let methods = methods();
    // SAFETY: `sqlite3_config(SQLITE_CONFIG_PCACHE2, const
    // sqlite3_pcache_methods2 *)` is SQLite's documented call; it copies the
    // struct, whose functions follow the documented contract.
    let rc = unsafe { config(SQLITE_CONFIG_PCACHE2, &raw const methods) };
    if rc != SQLITE_OK {
        *ARENA.lock().unwrap_or_else(PoisonError::into_inner) = previous;
        let why = if rc == SQLITE_MISUSE {
            "SQLite is already initialized (SQLITE_MISUSE): install the page cache before \
             sqlite3_initialize and before the first sqlite3_open"
                .to_string()
        } else {
            format!("sqlite3_config(SQLITE_CONFIG_PCACHE2) returned {rc}")
        };
        return Err(InstallError {
            code: HUGEARENA_E_INVALID_ARGUMENT,
            message: why,
        });
    }
    Ok(())
}

/// The counters of every cache so far.
pub fn stats() -> hugearena_sqlite_stats {
    hugearena_sqlite_stats {
        caches: STATS.caches.load(Relaxed),
        hits: STATS.hits.load(Relaxed),
        misses: STATS.misses.load(Relaxed),
        recycled: STATS.recycled.load(Relaxed),
        arena_chunks: STATS.arena_chunks.load(Relaxed),
        heap_chunks: STATS.heap_chunks.load(Relaxed),
        backend: current_arena().map_or(0, |a| {
            crate::region::backend_code(a.region().backend().kind())
        }),
    }
}

type ConfigFn = unsafe extern "C" fn(c_int, ...) -> c_int;

/// SQLite's `sqlite3_config`, found in the running program.
fn sqlite3_config() -> Result<ConfigFn, Failure> {
    // SAFETY: `dlsym` with a NUL-terminated name; RTLD_DEFAULT searches the
    // program and the libraries it loaded.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"sqlite3_config".as_ptr()) };
    if sym.is_null() {
        return Err(Failure::invalid(
            "sqlite3_config is not in this program: link it against SQLite (-lsqlite3), or fill \
             the methods with hugearena_sqlite_pcache_methods and call sqlite3_config yourself",
        ));
    }
    // SAFETY: the symbol is SQLite's `int sqlite3_config(int, ...)`.
    Ok(unsafe { std::mem::transmute::<*mut c_void, ConfigFn>(sym) })
}

fn options_from_c(o: Option<&hugearena_sqlite_options>) -> Result<PcacheOptions, Failure> {
    let Some(o) = o else {
        return Ok(PcacheOptions::default());
    };
    let huge_pages = huge_pages_policy(o.huge_pages)?;
    let backend = backend_kind(o.backend)?;
    let path = if o.path.is_null() {
        None
    } else {
        // SAFETY: non-NULL: the caller passes a NUL-terminated string.
        Some(unsafe { crate::ffi::path(o.path, "path") }?)
    };
    Ok(PcacheOptions {
        region_bytes: o.region_bytes,
        huge_pages,
        backend,
        path,
    })
}

/// Puts SQLite's page cache on a hugearena arena: creates the arena (NULL
/// options: an anonymous region of `HUGEARENA_SQLITE_DEFAULT_REGION_BYTES`,
/// huge pages `TRY`) and calls
/// `sqlite3_config(SQLITE_CONFIG_PCACHE2, ...)`. Call it before
/// `sqlite3_initialize` and before the first `sqlite3_open`. Returns 0, or
/// a status with the reason in `hugearena_last_error()`.
///
/// # Safety
///
/// `opts` is NULL or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_sqlite_pcache_install(
    opts: *const hugearena_sqlite_options,
) -> c_int {
    guard("hugearena_sqlite_pcache_install", || {
        // SAFETY: the caller's contract.
        let options = options_from_c(unsafe { opt(opts) })?;
        install(&options).map_err(|e| Failure {
            code: e.code,
            message: e.message,
        })
    })
}

/// For programs whose SQLite is not found by name: creates the arena as
/// `hugearena_sqlite_pcache_install` does and writes the methods into
/// `*methods` (a `sqlite3_pcache_methods2`), for the program to pass to
/// `sqlite3_config(SQLITE_CONFIG_PCACHE2, methods)` itself.
///
/// # Safety
///
/// `opts` is NULL or valid; `methods` is valid for a write of a
/// `sqlite3_pcache_methods2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_sqlite_pcache_methods(
    opts: *const hugearena_sqlite_options,
    methods: *mut c_void,
) -> c_int {
    guard("hugearena_sqlite_pcache_methods", || {
        // SAFETY: the caller's contract.
        let options = options_from_c(unsafe { opt(opts) })?;
        if methods.is_null() {
            return Err(Failure::invalid("methods is NULL"));
        }
        let arena = Arc::new(make_arena(&options)?);
        *ARENA.lock().unwrap_or_else(PoisonError::into_inner) = Some(arena);
        // SAFETY: the caller's contract.
        unsafe { put(methods.cast::<PcacheMethods2>(), self::methods(), "methods") }
    })
}

/// The page caches' counters.
///
/// # Safety
///
/// `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_sqlite_get_stats(out: *mut hugearena_sqlite_stats) -> c_int {
    guard("hugearena_sqlite_get_stats", || {
        // SAFETY: the caller's contract.
        unsafe { put(out, stats(), "out") }
    })
}
