//! A shared region: one backing file (anonymous memfd, or a named file on
//! hugetlbfs or tmpfs) mapped three times inside one address reservation:
//!
//! - **metadata** (header and page-state table), mapped plainly;
//! - **primary**: the data as users see it; the population engine registers
//!   it with userfaultfd so first touches can be caught;
//! - **alias**: the same data, never registered, through which pages are
//!   filled before the primary maps them.
//!
//! Another process opens the same region by path (or an inherited
//! descriptor) and gets the same layout from the header.
#![allow(unsafe_code)] // mapping the views, raw copies and atomic views of shared memory

mod blocks;
pub(crate) mod header;
mod layout;

use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use blocks::BlockAllocation;
pub(crate) use header::Header;
pub(crate) use layout::HEADER_BYTES;
pub use layout::Layout as RegionLayout;
pub(crate) use layout::Layout;

use crate::backend::{self, Backend, BackendChoice, BackendKind, BackendRequest};
use crate::error::{Error, Result};
use crate::probe::{HugePagePool, KernelCaps};
use crate::sys::memfd::{self, FileSystem};
use crate::sys::mman::{self, Advice, Protection, Reservation};
use crate::sys::size::PageSize;
use crate::sys::{Errno, SysError};

/// What region to create: its size, the huge page policy (or an exact
/// backend), the huge page size, and where its file lives.
///
/// ```
/// use hugearena::{HugePages, KernelCaps, RegionOptions};
/// let options = RegionOptions::new(1 << 30).huge_pages(HugePages::Try);
/// // What it would get here, and why, without creating anything:
/// let choice = options.plan(KernelCaps::cached())?;
/// println!("{}: {}", choice.backend.kind(), choice.reason);
/// # Ok::<(), hugearena::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RegionOptions {
    size: u64,
    request: BackendRequest,
    huge_page: PageSize,
    file: FileAt,
}

/// Where a region's backing file lives.
#[derive(Clone, Debug)]
enum FileAt {
    /// An anonymous memfd.
    Memfd,
    /// A new file at this path.
    Named(PathBuf),
    /// A file without a name (`O_TMPFILE`) in this directory.
    Unnamed(PathBuf),
}

impl RegionOptions {
    /// A region with `size` bytes of data, backend chosen by
    /// `HugePages::Try`, 2 MiB huge pages, anonymous (memfd).
    pub fn new(size: u64) -> RegionOptions {
        RegionOptions {
            size,
            request: BackendRequest::default(),
            huge_page: PageSize::Huge2M,
            file: FileAt::Memfd,
        }
    }

    /// Chooses the backend by policy.
    pub fn huge_pages(mut self, policy: crate::backend::HugePages) -> Self {
        self.request = BackendRequest::Policy(policy);
        self
    }

    /// Asks for exactly this backend.
    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.request = BackendRequest::Exact(kind);
        self
    }

    /// The hugetlb page size (2 MiB or 1 GiB) for the hugetlb backends.
    pub fn huge_page_size(mut self, size: PageSize) -> Self {
        self.huge_page = size;
        self
    }

    /// Backs the region by a new file at `path` (on hugetlbfs for the
    /// hugetlb backends, on tmpfs such as `/dev/shm` for the shmem ones),
    /// so other processes can open it by path.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = FileAt::Named(path.into());
        self
    }

    /// Backs the region by a file without a name (`O_TMPFILE`) in the
    /// directory `dir`. Like the default memfd it goes away with the last
    /// process that maps it, a crash included, and other processes open it
    /// by [`Region::shareable_path`]; but it lives on `dir`'s file system
    /// and takes that mount's options. On a tmpfs mounted `huge=always` (or
    /// `within_size`), a `ShmemThp` region gets one 2 MiB folio per block
    /// whatever `shmem_enabled` says, so its full blocks become huge pages
    /// without a copy. The file system must suit the backend, as for
    /// [`path`](Self::path).
    pub fn unnamed_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.file = FileAt::Unnamed(dir.into());
        self
    }
}

/// A shared region: one backing file (an anonymous memfd, or a named file
/// on hugetlbfs or tmpfs) mapped three times inside one address
/// reservation: the metadata (header and page-state table); the
/// **primary** view, the data as users see it, which a [`Populator`]
/// registers with userfaultfd so first touches are caught; and the
/// **alias**, the same data never registered, through which pages are
/// filled before the primary maps them. Another process opens the same
/// region by path (or an inherited descriptor) and gets the same layout
/// from the header.
///
/// Without a populator the primary is plain shared memory:
///
/// ```
/// use hugearena::{BackendKind, Region, RegionOptions};
/// let region = Region::create(RegionOptions::new(4 << 20).backend(BackendKind::Shmem))?;
/// region.write_via_primary(100, b"hello")?;
/// let other = Region::open(region.shareable_path())?; // as another process would
/// let mut buf = [0u8; 5];
/// other.read_via_primary(100, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), hugearena::Error>(())
/// ```
///
/// [`Populator`]: crate::populate::Populator
#[derive(Debug)]
pub struct Region {
    file: OwnedFd,
    name: PathBuf,
    choice: BackendChoice,
    /// How this process allocates the pages of a block before filling it.
    blocks: BlockAllocation,
    header: Header,
    created: bool,
    meta: SharedBase,
    primary: SharedBase,
    alias: SharedBase,
    /// Which 4 KiB pages of the metadata (header and page-state table)
    /// this process has made sure are allocated in the file, one bit each.
    states_ready: Box<[AtomicU64]>,
    /// Userfaultfds kept open after their populator went away, so that
    /// their registration (with `UFFD_FEATURE_SIGBUS`) keeps answering a
    /// touch of an unfilled page with SIGBUS where the kernel has no
    /// poison markers (before Linux 6.6). Closed with the region.
    fences: std::sync::Mutex<Vec<OwnedFd>>,
    // Declared last: unmapped after the pointers above are gone.
    reservation: Reservation,
}

/// The first byte of a mapping of shared memory. The address carries no
/// thread-bound state, and what lies behind it is memory meant for
/// concurrent use from any thread or process (reached through raw copies
/// and atomics, never Rust references to mutable shared bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SharedBase(NonNull<u8>);

// SAFETY: see the type's documentation: moving the address to another
// thread moves no state, and every access behind it is made for sharing.
unsafe impl Send for SharedBase {}
// SAFETY: as above.
unsafe impl Sync for SharedBase {}

impl SharedBase {
    pub(crate) fn get(self) -> NonNull<u8> {
        self.0
    }

    pub(crate) fn as_ptr(self) -> *mut u8 {
        self.0.as_ptr()
    }
}

impl RegionOptions {
    /// The backend a region made with these options would get on a kernel
    /// with `caps`, and why (each better candidate passed over is named),
    /// without creating anything.
    ///
    /// ```
    /// use hugearena::{KernelCaps, RegionOptions};
    /// let choice = RegionOptions::new(64 << 20).plan(KernelCaps::cached());
    /// # let _ = choice;
    /// ```
    pub fn plan(&self, caps: &KernelCaps) -> Result<BackendChoice> {
        if !matches!(self.huge_page, PageSize::Huge2M | PageSize::Huge1G) {
            return Err(Error::BackendUnavailable {
                backend: BackendKind::Hugetlb,
                reason: format!("{} is not a huge page size", self.huge_page),
                fix: "use PageSize::Huge2M or PageSize::Huge1G".into(),
            });
        }
        backend::select(self.request, self.huge_page, caps, |b| {
            Layout::new(b, self.size).map(|l| l.hugetlb_pages())
        })
    }
}

impl Region {
    /// Creates a region as `options` say.
    pub fn create(options: RegionOptions) -> Result<Region> {
        Self::create_with(options, KernelCaps::cached())
    }

    /// Creates a region using an existing probe of the kernel.
    pub fn create_with(options: RegionOptions, caps: &KernelCaps) -> Result<Region> {
        let choice = options.plan(caps)?;
        let layout = Layout::new(choice.backend, options.size)?;
        let (file, name, cleanup) = match &options.file {
            FileAt::Memfd => {
                let fd = memfd::memfd_create("hugearena", choice.backend.memfd_kind())
                    .map_err(Error::sys("creating the backing memfd"))?;
                (fd, PathBuf::from("<memfd>"), None)
            }
            FileAt::Named(path) => {
                let fd = create_file(path, false)?;
                let guard = UnlinkOnError(Some(path.clone()));
                check_file_system(fd.as_fd(), path, choice.backend)?;
                (fd, path.clone(), Some(guard))
            }
            FileAt::Unnamed(dir) => {
                let fd = create_file(dir, true)?;
                check_file_system(fd.as_fd(), dir, choice.backend)?;
                // Not a path another process could open: `shareable_path`
                // gives the descriptor's.
                (
                    fd,
                    PathBuf::from(format!("<unnamed in {}>", dir.display())),
                    None,
                )
            }
        };
        memfd::set_len(file.as_fd(), layout.file_len()).map_err(|e| match e.errno() {
            Errno::ENOMEM | Errno::ENOSPC => short_pool_error(&layout, e),
            _ => Error::sys("sizing the backing file")(e),
        })?;
        // The header gets its memory now, and so does a hugetlb region's
        // page-state table (a few huge pages, counted against the pool at
        // creation). A shmem region's table is allocated page by page as
        // it is used (`page_states_for`): a large region costs nothing
        // until it is touched.
        let table_now = if layout.backend().kind().uses_hugetlb() {
            layout.data_offset()
        } else {
            header::ENCODED_LEN as u64
        };
        memfd::fallocate(file.as_fd(), memfd::Fallocate::Allocate, 0, table_now).map_err(|e| {
            match e.errno() {
                Errno::ENOMEM | Errno::ENOSPC if layout.backend().kind().uses_hugetlb() => {
                    short_pool_error(&layout, e)
                }
                _ => Error::sys("allocating the region's page-state table")(e),
            }
        })?;
        let header = Header {
            layout,
            creator_pid: std::process::id(),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let region = Self::map(file, name, choice, header, true)?;
        region.publish_header();
        if let Some(mut guard) = cleanup {
            guard.0 = None;
        }
        Ok(region)
    }

    /// Opens the region stored at `path` (a hugetlbfs or tmpfs file, or
    /// `/proc/PID/fd/N` of another process's memfd).
    pub fn open(path: impl AsRef<Path>) -> Result<Region> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound {
                    path: path.to_path_buf(),
                },
                _ => Error::Io {
                    path: path.to_path_buf(),
                    source: e,
                },
            })?;
        Self::open_file(file.into(), path.to_path_buf())
    }

    /// Opens the region behind an inherited or received descriptor.
    pub fn from_fd(fd: OwnedFd) -> Result<Region> {
        let name = PathBuf::from(format!("<fd {}>", std::os::fd::AsRawFd::as_raw_fd(&fd)));
        Self::open_file(fd, name)
    }

    fn open_file(file: OwnedFd, name: PathBuf) -> Result<Region> {
        let header = read_header(file.as_fd(), &name)?;
        let len = memfd::file_len(file.as_fd()).map_err(Error::sys("reading the region's size"))?;
        if len < header.layout.file_len() {
            return Err(Error::Truncated {
                path: name,
                len,
                expected: header.layout.file_len(),
            });
        }
        let choice = BackendChoice {
            backend: header.layout.backend(),
            reason: format!(
                "opened an existing region created by pid {} with the {} backend",
                header.creator_pid,
                header.layout.backend().kind()
            ),
        };
        Self::map(file, name, choice, header, false)
    }

    /// Lays out the reservation: metadata, then primary, then alias.
    fn map(
        file: OwnedFd,
        name: PathBuf,
        mut choice: BackendChoice,
        header: Header,
        created: bool,
    ) -> Result<Region> {
        let layout = header.layout;
        let (blocks, why) = BlockAllocation::choose(layout.backend().kind(), file.as_fd());
        if layout.backend().kind() == BackendKind::ShmemThp {
            choice.reason.push_str("; blocks: ");
            choice.reason.push_str(&why);
        }
        let meta_len = layout.data_offset() as usize;
        let span = layout.data_span();
        let data_len = layout.data_len() as usize;
        // The views start on 2 MiB boundaries whatever the backend, so an
        // offset aligned to up to 2 MiB (the arena's largest alignment) is
        // as aligned in memory, and shmem blocks can be PMD-mapped.
        let unit = layout.backend().mapping_unit().max(PageSize::Huge2M);
        let round = |n: usize| unit.round_up(n).expect("bounded by MAX_DATA_LEN");
        let primary_at = round(meta_len);
        let span = round(span);
        let reservation = Reservation::new(primary_at + 2 * span, unit)
            .map_err(Error::sys("reserving address space for the region"))?;
        let fd = file.as_fd();
        let place = |offset: usize, len: usize, file_offset: u64| {
            // SAFETY: the reservation is fresh and owned here; each placement
            // covers a distinct, in-bounds part of it.
            unsafe {
                reservation.place_shared(offset, len, fd, file_offset, Protection::ReadWrite, 0)
            }
            .map_err(|e| match e.errno() {
                Errno::ENOMEM if layout.backend().kind().uses_hugetlb() => {
                    short_pool_error(&layout, e)
                }
                _ => Error::sys("mapping the region")(e),
            })
        };
        let meta = SharedBase(place(primary_at - meta_len, meta_len, 0)?);
        let primary = SharedBase(place(primary_at, data_len, layout.data_offset())?);
        let alias = SharedBase(place(primary_at + span, data_len, layout.data_offset())?);
        match layout.backend().kind() {
            BackendKind::ShmemThp => {
                // Filling through a huge-page-advised alias allocates 2 MiB
                // folios, so collapsing the primary later needs no copy.
                // SAFETY: the alias is ours; the advice keeps contents.
                unsafe { mman::madvise(alias.as_ptr(), data_len, Advice::HugePage) }
                    .map_err(Error::sys("advising the alias to use huge pages"))?;
            }
            BackendKind::Shmem => {
                for view in [primary, alias] {
                    // SAFETY: the view is ours; the advice keeps contents.
                    unsafe { mman::madvise(view.as_ptr(), data_len, Advice::NoHugePage) }
                        .map_err(Error::sys("keeping shmem at 4 KiB pages"))?;
                }
            }
            BackendKind::Hugetlb | BackendKind::HugetlbHgm => {}
        }
        Ok(Region {
            file,
            name,
            choice,
            blocks,
            header,
            created,
            meta,
            primary,
            alias,
            states_ready: {
                // A hugetlb region's table is allocated whole at creation.
                let ready = if layout.backend().kind().uses_hugetlb() {
                    u64::MAX
                } else {
                    0
                };
                let pages = (layout.states_offset() + layout.states_len()).div_ceil(4096);
                (0..pages.div_ceil(64))
                    .map(|_| AtomicU64::new(ready))
                    .collect()
            },
            fences: std::sync::Mutex::new(Vec::new()),
            reservation,
        })
    }

    /// Keeps `fd` (a userfaultfd registered over the primary) open for as
    /// long as the region is mapped in this process.
    pub(crate) fn keep_fence(&self, fd: OwnedFd) {
        self.fences
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(fd);
    }

    /// Writes the header, then marks it ready (release) for openers.
    fn publish_header(&self) {
        let bytes = self.header.encode();
        // SAFETY: the metadata mapping is at least HEADER_BYTES long and
        // nobody reads the header before `state` says READY.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.meta.as_ptr(), bytes.len()) };
        self.header_state().store(header::READY, Ordering::Release);
    }

    fn header_state(&self) -> &AtomicU32 {
        // SAFETY: STATE_OFFSET is 4-byte aligned within the page-aligned
        // metadata mapping, which lives as long as `self`; the word is only
        // ever accessed atomically.
        unsafe {
            &*self
                .meta
                .as_ptr()
                .add(header::STATE_OFFSET)
                .cast::<AtomicU32>()
        }
    }

    /// The backend and why it was chosen.
    pub fn choice(&self) -> &BackendChoice {
        &self.choice
    }

    /// How this process gives a block its memory before filling its first
    /// page (the reason is part of [`Region::choice`]).
    pub fn block_allocation(&self) -> BlockAllocation {
        self.blocks
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.choice.backend
    }

    /// The population granule.
    pub fn granule(&self) -> PageSize {
        self.backend().granule()
    }

    /// The file layout.
    pub fn layout(&self) -> &Layout {
        &self.header.layout
    }

    /// Bytes of data.
    pub fn len(&self) -> usize {
        self.header.layout.data_len() as usize
    }

    /// Bytes of address space the region occupies in this process
    /// (metadata, primary and alias).
    pub fn address_space(&self) -> usize {
        self.reservation.len()
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether this process created the region (rather than opened it).
    pub fn created_here(&self) -> bool {
        self.created
    }

    /// The path the region was created at or opened from, or `<memfd>`.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The backing file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A path another process can open this region by: the file's own path,
    /// or `/proc/PID/fd/N` for a memfd (valid while this process lives).
    pub fn shareable_path(&self) -> PathBuf {
        if self.name.is_absolute() && !self.name.starts_with("/proc") {
            self.name.clone()
        } else {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
            PathBuf::from(format!("/proc/{}/fd/{fd}", std::process::id()))
        }
    }

    /// The first byte of the primary view (what users touch).
    pub fn primary(&self) -> NonNull<u8> {
        self.primary.get()
    }

    /// The primary view's base, for views that hand out addresses in it.
    pub(crate) fn primary_base(&self) -> SharedBase {
        self.primary
    }

    /// The first byte of the alias view (what fills go through).
    pub(crate) fn alias(&self) -> NonNull<u8> {
        self.alias.get()
    }

    /// The page-state table: one word per granule, shared by every process.
    /// The page-state table, with the words of granules `[from, to)`
    /// backed by memory (only those may be touched). The table's pages are
    /// allocated in the file on first use in each process, one `fallocate`
    /// per 512 granules, so a full file system is an error here and never
    /// a SIGBUS on a word. Async-signal-safe.
    pub(crate) fn page_states_for(
        &self,
        from: usize,
        to: usize,
    ) -> crate::sys::SysResult<&[AtomicU64]> {
        let layout = &self.header.layout;
        let to = to.min(layout.granules() as usize);
        if from < to {
            let first = (layout.states_offset() + from as u64 * 8) / 4096;
            let last = (layout.states_offset() + to as u64 * 8 - 1) / 4096;
            let mut page = first;
            while page <= last {
                if self.state_page_ready(page) {
                    page += 1;
                    continue;
                }
                // A run of pages not yet known to be allocated: one call.
                let mut end = page + 1;
                while end <= last && !self.state_page_ready(end) {
                    end += 1;
                }
                memfd::fallocate(
                    self.file.as_fd(),
                    memfd::Fallocate::Allocate,
                    page * 4096,
                    (end - page) * 4096,
                )?;
                for p in page..end {
                    self.states_ready[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
                }
                page = end;
            }
        }
        Ok(self.page_states())
    }

    /// The whole page-state table, every page of it backed by memory.
    pub(crate) fn all_page_states(&self) -> crate::sys::SysResult<&[AtomicU64]> {
        self.page_states_for(0, self.header.layout.granules() as usize)
    }

    /// The granule ranges whose page-state words have memory behind them in
    /// the file, in order (read them through `page_states_for`). Outside them no
    /// process ever claimed a granule: all are absent. Lets whole-table
    /// scans of a large, mostly untouched region skip the rest without
    /// allocating it.
    pub(crate) fn backed_state_ranges(&self) -> crate::sys::SysResult<Vec<std::ops::Range<usize>>> {
        let layout = &self.header.layout;
        let granules = layout.granules() as usize;
        if layout.backend().kind().uses_hugetlb() {
            return Ok(std::iter::once(0..granules).collect());
        }
        let (start, end) = (
            layout.states_offset(),
            layout.states_offset() + layout.states_len(),
        );
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        for (from, to) in memfd::data_extents(self.file.as_fd(), start, end)? {
            // Whole pages of words: a partly described granule counts.
            let first = ((from.max(start) - start) / 8) as usize;
            let last = ((to - start).div_ceil(8) as usize).min(granules);
            if first < last {
                match ranges.last_mut() {
                    Some(r) if r.end >= first => r.end = r.end.max(last),
                    _ => ranges.push(first..last),
                }
            }
        }
        Ok(ranges)
    }

    fn state_page_ready(&self, page: u64) -> bool {
        self.states_ready[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// The page-state table, unchecked: callers touch only words
    /// [`page_states_for`](Region::page_states_for) made sure of.
    fn page_states(&self) -> &[AtomicU64] {
        let layout = &self.header.layout;
        // SAFETY: the table lies inside the metadata mapping, which lives as
        // long as `self`; `states_offset` is 8-byte aligned; its words are
        // only accessed atomically.
        unsafe {
            std::slice::from_raw_parts(
                self.meta
                    .as_ptr()
                    .add(layout.states_offset() as usize)
                    .cast::<AtomicU64>(),
                layout.granules() as usize,
            )
        }
    }

    /// `count` atomic words of the data at `offset`, through the primary
    /// view: shared structures (the arena's tables) live there. Touching
    /// them populates their pages like any other access.
    pub(crate) fn shared_atomics<T: SharedAtomic>(
        &self,
        offset: usize,
        count: usize,
    ) -> Result<&[T]> {
        let bytes = count
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(Error::OutOfBounds {
                offset: offset as u64,
                len: u64::MAX,
                region_len: self.len() as u64,
            })?;
        self.check_bounds(offset, bytes)?;
        if offset % std::mem::align_of::<T>() != 0 {
            return Err(Error::Misaligned {
                offset: offset as u64,
                align: std::mem::align_of::<T>(),
            });
        }
        // SAFETY: in bounds and aligned (checked); the primary view lives as
        // long as `self`; `SharedAtomic` types have no invalid bit patterns
        // and are only accessed atomically, so sharing them with other
        // threads and processes is sound.
        Ok(unsafe {
            std::slice::from_raw_parts(self.primary.as_ptr().add(offset).cast::<T>(), count)
        })
    }

    /// Copies `bytes` into the data at `offset` through the primary view
    /// (what users touch: unpopulated pages are populated first).
    pub fn write_via_primary(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        self.copy_in(self.primary, offset, bytes)
    }

    /// Copies data at `offset` into `buf` through the alias view, which is
    /// never registered: reading a page that was never populated reads
    /// zeroes (and allocates it), so read only populated pages this way.
    pub(crate) fn read_via_alias(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.copy_out(self.alias, offset, buf)
    }

    /// Copies data at `offset` into `buf` through the primary view. Touching
    /// unpopulated pages of a registered region waits for population.
    pub fn read_via_primary(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.copy_out(self.primary, offset, buf)
    }

    /// Copies `bytes` to `offset` of `view` (the primary or the alias).
    fn copy_in(&self, view: SharedBase, offset: usize, bytes: &[u8]) -> Result<()> {
        self.check_bounds(offset, bytes.len())?;
        // SAFETY: `view` is one of this region's data views, mapped for
        // `len()` bytes as long as `self` lives; in bounds (checked). Shared
        // bytes are copied raw, never borrowed. (Through the alias, which is
        // never registered, the copy cannot block on userfaultfd.)
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), view.as_ptr().add(offset), bytes.len())
        };
        Ok(())
    }

    /// Copies from `offset` of `view` (the primary or the alias) into `buf`.
    fn copy_out(&self, view: SharedBase, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check_bounds(offset, buf.len())?;
        // SAFETY: as in `copy_in`.
        unsafe {
            std::ptr::copy_nonoverlapping(view.as_ptr().add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn check_bounds(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                region_len: self.len() as u64,
            }),
        }
    }
}

/// Atomic integer types that can be viewed in shared memory: any bit
/// pattern is valid, and all access is atomic.
pub(crate) trait SharedAtomic: sealed::Sealed + Sync {}
impl SharedAtomic for AtomicU64 {}
impl SharedAtomic for std::sync::atomic::AtomicU32 {}

mod sealed {
    pub(crate) trait Sealed {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
    impl Sealed for std::sync::atomic::AtomicU32 {}
}

/// Removes a half-created region file unless disarmed, so a failed create
/// leaves nothing behind.
struct UnlinkOnError(Option<PathBuf>);

impl Drop for UnlinkOnError {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A new file at `path`, or with `unnamed` a file without a name in the
/// directory `path`.
fn create_file(path: &Path, unnamed: bool) -> Result<OwnedFd> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    if unnamed {
        options.custom_flags(libc::O_TMPFILE);
    } else {
        options.create_new(true);
    }
    options
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::AlreadyExists {
                path: path.to_path_buf(),
            },
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_path_buf(),
            },
            _ => Error::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })
}

fn check_file_system(fd: BorrowedFd<'_>, path: &Path, backend: Backend) -> Result<()> {
    let found = memfd::file_system(fd).map_err(Error::sys("identifying the file system"))?;
    let wrong = |found: String, needed: String, fix: String| Error::WrongFileSystem {
        path: path.to_path_buf(),
        backend: backend.kind(),
        found,
        needed,
        fix,
    };
    let describe = |fs: FileSystem| match fs {
        FileSystem::Hugetlbfs(Some(p)) => format!("hugetlbfs with {p} pages"),
        FileSystem::Hugetlbfs(None) => "hugetlbfs".to_string(),
        FileSystem::Tmpfs => "tmpfs".to_string(),
        FileSystem::Other(magic) => format!("a file system with magic {magic:#x}"),
    };
    if backend.kind().uses_hugetlb() {
        let page = backend.mapping_unit();
        if found != FileSystem::Hugetlbfs(Some(page)) {
            return Err(wrong(
                describe(found),
                format!("hugetlbfs with {page} pages"),
                format!(
                    "put the file on a hugetlbfs mount (`sudo mount -t hugetlbfs -o pagesize={} none /dev/hugepages`), or omit the path for an anonymous memfd",
                    if page == PageSize::Huge1G { "1G" } else { "2M" }
                ),
            ));
        }
    } else if found != FileSystem::Tmpfs {
        return Err(wrong(
            describe(found),
            "tmpfs (shmem)".into(),
            "put the file under /dev/shm, or omit the path for an anonymous memfd".into(),
        ));
    }
    Ok(())
}

fn short_pool_error(layout: &Layout, e: SysError) -> Error {
    let size = layout.backend().mapping_unit();
    match HugePagePool::read(size) {
        Some(pool) if layout.backend().kind().uses_hugetlb() => {
            let needed = layout.hugetlb_pages();
            // The pool looked big enough a moment ago but the kernel refused:
            // another mapping took pages in between. Report it as a shortfall.
            let shown = pool.available().min(needed.saturating_sub(1));
            Error::huge_pages_short(&pool, needed, shown)
        }
        _ => Error::sys("allocating the region's memory")(e),
    }
}

/// Reads and validates the header of an existing region file without
/// mapping more than its first page.
fn read_header(fd: BorrowedFd<'_>, name: &Path) -> Result<Header> {
    let len = memfd::file_len(fd).map_err(Error::sys("reading the region's size"))?;
    let fs = memfd::file_system(fd).map_err(Error::sys("identifying the file system"))?;
    // hugetlbfs maps in whole huge pages; elsewhere one 4 KiB page will do.
    let first_page = match fs {
        FileSystem::Hugetlbfs(Some(p)) => p.bytes(),
        _ => HEADER_BYTES as usize,
    };
    if len < first_page as u64 {
        return Err(Error::Truncated {
            path: name.to_path_buf(),
            len,
            expected: first_page as u64,
        });
    }
    let view = mman::map_probe(fd, first_page).map_err(Error::sys("mapping the region header"))?;
    // SAFETY: the state word is 4-byte aligned inside the mapping and only
    // ever accessed atomically.
    let state = unsafe { &*view.addr().add(header::STATE_OFFSET).cast::<AtomicU32>() }
        .load(Ordering::Acquire);
    let mut bytes = [0u8; header::ENCODED_LEN];
    // SAFETY: the mapping is at least 4 KiB; the bytes are copied raw.
    unsafe { std::ptr::copy_nonoverlapping(view.addr(), bytes.as_mut_ptr(), bytes.len()) };
    Header::decode(&bytes, state, name)
}
