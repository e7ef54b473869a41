//! The crate's error type. Each variant's message says what went wrong and
//! how to fix it.

use std::path::PathBuf;

use crate::backend::BackendKind;
use crate::probe::HugePagePool;
use crate::sys::SysError;
use crate::sys::size::PageSize;
use crate::sys::uffd::OpenError;

/// Result of a hugearena operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong creating, opening or using a region.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The requested size is zero.
    #[error("region size is 0: ask for at least one population granule ({granule})")]
    ZeroSize {
        /// The backend's granule.
        granule: PageSize,
    },

    /// The requested size is not a whole number of granules.
    #[error(
        "region size {size} bytes is not a multiple of {granule}, the size unit of the \
         {backend} backend: round it up to {rounded} bytes"
    )]
    SizeNotGranuleMultiple {
        /// The requested size.
        size: u64,
        /// The backend that was chosen.
        backend: BackendKind,
        /// Its granule.
        granule: PageSize,
        /// The next valid size.
        rounded: u64,
    },

    /// The requested size exceeds what a region can address.
    #[error(
        "region size {size} bytes is larger than the maximum of {max} bytes: split the data over several regions"
    )]
    SizeTooLarge {
        /// The requested size.
        size: u64,
        /// The largest size accepted.
        max: u64,
    },

    /// The huge page pool cannot back the region.
    #[error(
        "not enough {page_size} huge pages: the region needs {needed}, the pool has {available} \
         available ({total} total, {free} free, {reserved} reserved by other mappings); \
         reserve huge pages: `{fix}`"
    )]
    HugePagesShort {
        /// Huge page size.
        page_size: PageSize,
        /// Pages the region needs.
        needed: u64,
        /// Pages free and unreserved.
        available: u64,
        /// Pool size.
        total: u64,
        /// Free pages.
        free: u64,
        /// Reserved pages.
        reserved: u64,
        /// The command that grows the pool enough.
        fix: String,
    },

    /// HugeTLB high-granularity mapping was requested but does not work here.
    #[error(
        "HugeTLB high-granularity mapping (HGM) is unavailable: {reason}. Use \
         BackendKind::Hugetlb (populates whole huge pages) or BackendKind::ShmemThp (4 KiB \
         population, 2 MiB TLB reach once a block is full), or HugePages::Try to fall back \
         automatically"
    )]
    HgmUnavailable {
        /// What the probe found.
        reason: String,
    },

    /// An option value makes no sense.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong and what would be valid.
        reason: String,
    },

    /// The userfaultfd lacks a feature the chosen population driver needs.
    #[error(
        "this kernel's userfaultfd lacks {missing} (offered: {offered}), which the {driver} \
         driver needs: run `cargo run --example probe` to see what this kernel supports, and \
         use a driver or backend that it does"
    )]
    FeatureMissing {
        /// The driver.
        driver: &'static str,
        /// The missing feature names.
        missing: String,
        /// The features the kernel offers.
        offered: String,
    },

    /// A backend needs something this kernel or machine lacks.
    #[error("the {backend} backend is unavailable here: {reason}; fix: {fix}")]
    BackendUnavailable {
        /// The backend.
        backend: BackendKind,
        /// What is missing.
        reason: String,
        /// How to provide it.
        fix: String,
    },

    /// This process may not use userfaultfd.
    #[error(
        "userfaultfd is not permitted for this process ({detail}): run as root, or let this \
         user open /dev/userfaultfd (e.g. `sudo setfacl -m u:$USER:rw /dev/userfaultfd`), or \
         `sudo sysctl vm.unprivileged_userfaultfd=1`; in a container, allow userfaultfd in \
         the seccomp profile"
    )]
    UserfaultfdDenied {
        /// Both attempts and their errnos.
        detail: Box<OpenError>,
    },

    /// The kernel has no userfaultfd.
    #[error("userfaultfd is not available ({detail}): use a kernel built with CONFIG_USERFAULTFD")]
    UserfaultfdUnsupported {
        /// Both attempts and their errnos.
        detail: Box<OpenError>,
    },

    /// The region file does not exist.
    #[error("region file {} does not exist: check the path, or create the region first", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },

    /// The region file exists already.
    #[error("{} already exists: open it with Region::open, or remove it before creating a new region", path.display())]
    AlreadyExists {
        /// The path.
        path: PathBuf,
    },

    /// The file is on a file system the backend cannot use.
    #[error("{} is on {found}, but the {backend} backend needs {needed}: {fix}", path.display())]
    WrongFileSystem {
        /// The path.
        path: PathBuf,
        /// The backend.
        backend: BackendKind,
        /// The file system found.
        found: String,
        /// The file system needed.
        needed: String,
        /// Where to put the file instead.
        fix: String,
    },

    /// The file is shorter than its header says, or than a header.
    #[error(
        "region file {} is truncated: {len} bytes, expected {expected}; it was cut short or is \
         not a region: restore it from a snapshot or create the region again",
        path.display()
    )]
    Truncated {
        /// The path.
        path: PathBuf,
        /// Actual length.
        len: u64,
        /// Expected length.
        expected: u64,
    },

    /// The file does not start with the region magic.
    #[error("{} is not a hugearena region (magic {found:02x?}): check the path", path.display())]
    BadMagic {
        /// The path.
        path: PathBuf,
        /// The first bytes found.
        found: [u8; 8],
    },

    /// The header's format version is not this build's.
    #[error(
        "region {} has format version {found}, this build of hugearena reads version {expected}: \
         open it with a matching hugearena version",
        path.display()
    )]
    UnsupportedVersion {
        /// The path.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build writes.
        expected: u32,
    },

    /// The creator has not finished initialising the region.
    #[error(
        "region {} is not ready: its creator has not finished initialising it (or died while \
         doing so): retry shortly, or remove the file and create the region again",
        path.display()
    )]
    NotReady {
        /// The path.
        path: PathBuf,
    },

    /// The header is inconsistent.
    #[error("region {} has a corrupt header ({defect}): remove the file and create the region again", path.display())]
    CorruptHeader {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        defect: crate::codec::HeaderDefect,
    },

    /// An access outside the region's data.
    #[error("bytes {offset}..{offset}+{len} are outside the region's {region_len} bytes of data")]
    OutOfBounds {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Data bytes in the region.
        region_len: u64,
    },

    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        /// What hugearena was doing.
        context: &'static str,
        /// The failed call.
        #[source]
        source: Box<SysError>,
    },

    /// An allocation of zero bytes.
    #[error("allocation of 0 bytes: ask for at least 1 byte")]
    ZeroAllocation,

    /// A shared word was asked for at an offset not aligned for it.
    #[error("offset {offset:#x} is not aligned to {align} bytes, as the shared words there need")]
    Misaligned {
        /// The offset asked for.
        offset: u64,
        /// The alignment the words need.
        align: usize,
    },

    /// The requested alignment is more than an arena can give.
    #[error("alignment {align} is larger than the arena's largest (2 MiB, one block)")]
    AlignmentTooLarge {
        /// The requested alignment.
        align: usize,
    },

    /// The arena has no room for the request.
    #[error(
        "the arena is out of memory: no room for {size} bytes (in use {in_use} of {capacity} \
         bytes); free memory, call release_free_blocks() if other processes hold empty blocks, \
         or create a larger arena"
    )]
    ArenaExhausted {
        /// The requested size.
        size: usize,
        /// Bytes of pages and blocks allocated when it failed (a small
        /// object's whole span counts).
        in_use: u64,
        /// Bytes the arena can hand out.
        capacity: u64,
    },

    /// `free` was given something that is not a live allocation.
    #[error("invalid free of offset {offset:#x}: {reason}")]
    InvalidFree {
        /// The offset passed.
        offset: u64,
        /// Why it is not a live allocation.
        reason: &'static str,
    },

    /// A `ShmPtr` that does not start a live allocation.
    #[error("offset {offset:#x} is not a live allocation: {reason}")]
    InvalidPointer {
        /// The pointer's offset.
        offset: u64,
        /// Why.
        reason: &'static str,
    },

    /// A `ShmPtr` handed out by another arena.
    #[error(
        "offset {offset:#x} carries arena tag {tag:#x}, this arena's is {arena_tag:#x}: \
         a pointer of another arena"
    )]
    ForeignPointer {
        /// The pointer's offset.
        offset: u64,
        /// The pointer's tag.
        tag: u16,
        /// This arena's tag.
        arena_tag: u16,
    },

    /// The region does not hold an arena, or one of another layout.
    #[error("not a hugearena arena: {defect}")]
    NotAnArena {
        /// What was found.
        defect: crate::arena::ArenaDefect,
    },

    /// A snapshot file is damaged, truncated, or of another format.
    #[error("snapshot {}: {defect}; nothing was mapped: take a new snapshot or restore another", path.display())]
    BadSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        defect: crate::persist::SnapshotDefect,
    },

    /// Writing pages back to the populator's store failed. The pages are
    /// still in memory with their bytes (nothing was discarded).
    #[error(
        "writing back bytes {offset}..{offset}+{len} failed: {source}; the pages are still in \
         memory: make room or fix the store's file, then write them back again before \
         discarding them"
    )]
    WriteBack {
        /// Region offset of the first byte that was not written.
        offset: u64,
        /// Bytes in the range that was being written.
        len: u64,
        /// Why.
        #[source]
        source: crate::populate::FillError,
    },

    /// A discard would drop part of a huge page of a `HugetlbHgm` region.
    #[error(
        "discarding bytes {offset}..{offset}+{len} would punch part of a {huge_page} huge page: \
         on HugetlbHgm the kernel zeroes a punched piece of a huge page without unmapping it from \
         the processes that map it, so discard whole huge pages (Populator::discard_unit), or use \
         ShmemThp to evict 4 KiB pages"
    )]
    PartialHugePage {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The region's huge page size.
        huge_page: PageSize,
    },

    /// Pages were to be written back to a source that cannot take them.
    #[error(
        "the populator's source cannot take pages back: populate from a PageStore \
         (hugearena::populate::FileStore) to write pages back"
    )]
    ReadOnlySource,

    /// A thread could not be started.
    #[error(
        "starting the {what} thread failed: {source}; the process may be at its thread or \
         memory limit (see `ulimit -u` and /proc/sys/kernel/threads-max)"
    )]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// File I/O failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The pool cannot give `needed` pages of its size; `available` is the
    /// number to report as still obtainable.
    pub(crate) fn huge_pages_short(pool: &HugePagePool, needed: u64, available: u64) -> Error {
        Error::HugePagesShort {
            page_size: pool.size,
            needed,
            available,
            total: pool.total,
            free: pool.free,
            reserved: pool.reserved,
            fix: HugePagePool::reserve_command(
                pool.size,
                pool.total + needed.saturating_sub(available),
            ),
        }
    }

    /// Wraps a syscall failure with what hugearena was doing.
    pub(crate) fn sys(context: &'static str) -> impl FnOnce(SysError) -> Error {
        move |source| Error::Sys {
            context,
            source: Box::new(source),
        }
    }

    /// Interprets a userfaultfd open failure: permission or absence.
    pub(crate) fn userfaultfd(detail: OpenError) -> Error {
        use crate::sys::Errno;
        let denied = |e: &SysError| matches!(e.errno(), Errno::EPERM | Errno::EACCES);
        if denied(&detail.device) || denied(&detail.syscall) {
            Error::UserfaultfdDenied {
                detail: Box::new(detail),
            }
        } else {
            Error::UserfaultfdUnsupported {
                detail: Box::new(detail),
            }
        }
    }
}
