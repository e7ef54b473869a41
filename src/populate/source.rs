//! Page sources: what a granule is filled with on first touch.
#![allow(unsafe_code)] // the provided sources' signal-safety promises, and mapping a file

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sys::Errno;

/// Why a page source could not fill a page. Small and `Copy`, so sources
/// can report failures from a signal handler without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FillError {
    /// Reading the source failed.
    #[error("reading the source failed: {0}")]
    Io(Errno),
    /// The page starts past the end of the source.
    #[error(
        "the page starts past the end of the source ({len} bytes): the source is shorter than the region"
    )]
    PastEnd {
        /// The source's length in bytes.
        len: u64,
    },
    /// A custom source failed for the reason given.
    #[error("{0}")]
    Failed(&'static str),
    /// The source panicked; the populator caught it.
    #[error("the page source panicked")]
    Panicked,
    /// Another process (or thread of this one) holds the page's fill claim
    /// past the fill timeout: it is stopped, or stuck in its source. The
    /// page raises SIGBUS in this process until `Populator::retry`.
    #[error(
        "pid {pid} has been filling the page for longer than the fill timeout (stopped, or stuck in its source)"
    )]
    Stuck {
        /// The process holding the claim.
        pid: u32,
    },
    /// The source touched the page it was filling (through the region's
    /// primary view), which can never complete.
    #[error("the page source touched the page it was filling")]
    Recursive,
}

impl FillError {
    /// Whether trying the same fill again soon may succeed (interrupted,
    /// out of memory or space, an I/O error).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FillError::Io(
                Errno::EINTR | Errno::EAGAIN | Errno::ENOMEM | Errno::ENOSPC | Errno::EIO
            )
        )
    }
}

/// A failed fill: which granule, and why. Its granule is poisoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("page {index}: {error}")]
pub struct SourceError {
    /// The granule index in the region.
    pub index: u64,
    /// Why it failed.
    #[source]
    pub error: FillError,
}

/// Fills granules on demand. Called from whichever thread populates the
/// page: a handler thread, or a thread calling `populate`, so a source
/// must be `Send + Sync` and must not touch the region's unpopulated pages
/// itself. Only a [`SignalSafeSource`] is also called inside a SIGBUS
/// handler (the in-thread and proactive drivers).
///
/// ```
/// use std::sync::Arc;
/// use hugearena::populate::{FillError, PageSource, PopulateOptions, Populator};
/// use hugearena::{BackendKind, Region, RegionOptions};
///
/// /// Every 8-byte word of page `i` holds `i`.
/// struct Counting;
///
/// impl PageSource for Counting {
///     fn fill(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError> {
///         for word in dst.chunks_exact_mut(8) {
///             word.copy_from_slice(&index.to_le_bytes());
///         }
///         Ok(())
///     }
/// }
///
/// // No signal-safety promise: handler threads serve it.
/// let region = Arc::new(Region::create(RegionOptions::new(2 << 20).backend(BackendKind::Shmem))?);
/// let _p = Populator::with_handler_threads(region.clone(), Counting, PopulateOptions::new())?;
/// let mut word = [0u8; 8];
/// region.read_via_primary(3 * 4096 + 8, &mut word)?;
/// assert_eq!(u64::from_le_bytes(word), 3);
/// # Ok::<(), hugearena::Error>(())
/// ```
pub trait PageSource: Send + Sync {
    /// Writes the content of granule `index` into `dst` (one granule long;
    /// its prior content is unspecified).
    fn fill(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError>;

    /// Writes granules `first..` into `dst`, `granule` bytes each (`dst`
    /// holds a whole number of them): what `populate` and the drain call
    /// for a run of absent granules, so a source can read them with one
    /// large read. The default fills them one by one. An error fails the
    /// whole run; the populator then fills its granules one by one, so only
    /// the ones that fail alone are poisoned.
    fn fill_run(&self, first: u64, dst: &mut [u8], granule: usize) -> Result<(), FillError> {
        for (i, page) in dst.chunks_mut(granule).enumerate() {
            self.fill(first + i as u64, page)?;
        }
        Ok(())
    }

    /// Whether every page is all zeroes, so that a fresh (zero) page needs
    /// no fill at all.
    fn fills_zero(&self) -> bool {
        false
    }

    /// Whether granule `index` is all zeroes (a hole in a sparse
    /// snapshot, say), so that allocating the page is its whole fill.
    fn is_zero(&self, _index: u64) -> bool {
        self.fills_zero()
    }

    /// The same source as a [`PageStore`], if pages can be written back to
    /// it: what [`Populator::write_back`](super::Populator::write_back)
    /// writes to. `None` (the default) for a read-only source.
    fn as_store(&self) -> Option<&dyn PageStore> {
        None
    }

    /// Where granule `index`'s `len` bytes already are in this process's
    /// memory (a mapping of the source file), so that a fill can have the
    /// kernel copy them straight into the new page with one call instead
    /// of reading them into a buffer first. The address is only ever handed
    /// to the kernel, which fails the copy (`EFAULT`) if it cannot read it
    /// (a file truncated since, say); the fill then falls back to
    /// [`fill`](Self::fill), which reports the error. `None` (the default):
    /// always use `fill`. Async-signal-safe in a [`SignalSafeSource`].
    fn mapped(&self, _index: u64, _len: usize) -> Option<*const u8> {
        None
    }
}

/// A page source that takes pages back: a database's data file under a
/// buffer pool. A page written back with [`write_back`](Self::write_back)
/// is what a later [`fill`](PageSource::fill) of it reads, so a page can
/// leave memory (`Populator::discard`) and come back with the same bytes.
/// A store returns itself from [`PageSource::as_store`].
pub trait PageStore: PageSource {
    /// Writes `src`, the region's bytes at byte `offset`, to where `fill`
    /// reads them from. The store does not grow: bytes past its end are an
    /// error ([`FillError::PastEnd`]).
    fn write_back(&self, offset: u64, src: &[u8]) -> Result<(), FillError>;

    /// Makes what was written back durable (`fdatasync(2)` for a file).
    fn sync(&self) -> Result<(), FillError>;
}

/// A [`PageSource`] that may run inside a SIGBUS handler, in the faulting
/// thread, which the signal interrupted at an arbitrary instruction: the
/// in-thread and proactive drivers need one.
///
/// # Safety
///
/// [`fill`](PageSource::fill), [`fills_zero`](PageSource::fills_zero) and
/// [`is_zero`](PageSource::is_zero) must be async-signal-safe: no heap
/// allocation or deallocation, no lock the interrupted code could hold
/// (including `std`'s stdout and environment locks), no thread-local with
/// a destructor, and no panic (a panic inside the handler aborts the
/// process). System calls such as `pread(2)` and plain memory copies are
/// fine. [`ZeroSource`], [`FileSource`] and the snapshot source are; wrap a
/// source you have checked in [`SignalSafe`].
pub unsafe trait SignalSafeSource: PageSource {}

/// Declares a source async-signal-safe: the in-thread and proactive
/// drivers accept it.
///
/// ```
/// use hugearena::populate::{FnSource, SignalSafe};
/// // SAFETY: the closure only writes into `dst`: no allocation, no lock,
/// // no panic.
/// let source = unsafe {
///     SignalSafe::new(FnSource(|index: u64, dst: &mut [u8]| {
///         dst.fill(index as u8);
///         Ok(())
///     }))
/// };
/// # let _ = source;
/// ```
#[derive(Debug)]
pub struct SignalSafe<S>(S);

impl<S: PageSource> SignalSafe<S> {
    /// Wraps `source`.
    ///
    /// # Safety
    ///
    /// `source` meets the contract of [`SignalSafeSource`].
    pub unsafe fn new(source: S) -> SignalSafe<S> {
        SignalSafe(source)
    }

    /// The wrapped source.
    pub fn get(&self) -> &S {
        &self.0
    }
}

impl<S: PageSource> PageSource for SignalSafe<S> {
    fn fill(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError> {
        self.0.fill(index, dst)
    }

    fn fill_run(&self, first: u64, dst: &mut [u8], granule: usize) -> Result<(), FillError> {
        self.0.fill_run(first, dst, granule)
    }

    fn fills_zero(&self) -> bool {
        self.0.fills_zero()
    }

    fn is_zero(&self, index: u64) -> bool {
        self.0.is_zero(index)
    }

    fn as_store(&self) -> Option<&dyn PageStore> {
        self.0.as_store()
    }

    fn mapped(&self, index: u64, len: usize) -> Option<*const u8> {
        self.0.mapped(index, len)
    }
}

// SAFETY: `SignalSafe::new`'s caller vouched for the source.
unsafe impl<S: PageSource> SignalSafeSource for SignalSafe<S> {}

/// Every page reads as zero. Fresh pages already are, so it copies nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn fill(&self, _index: u64, dst: &mut [u8]) -> Result<(), FillError> {
        dst.fill(0);
        Ok(())
    }

    fn fills_zero(&self) -> bool {
        true
    }
}

// SAFETY: filling a slice allocates nothing, locks nothing, cannot panic.
unsafe impl SignalSafeSource for ZeroSource {}

/// How a [`FileSource`] reads.
#[derive(Debug)]
enum Reader {
    Pread(File),
    Mapped(memmap2::Mmap),
}

/// Pages come from a file (a snapshot, say): page `i` is the `granule`
/// bytes at `offset + i * granule`. A last, partial page is padded with
/// zeroes; a page starting past the end is an error.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    reader: Reader,
    /// With a `pread` reader, a read-only shared mapping of the file that
    /// only the kernel reads (the source of `UFFDIO_COPY`, see
    /// `PageSource::mapped`).
    copy_from: Option<memmap2::Mmap>,
    offset: u64,
    len: u64,
}

impl FileSource {
    /// Reads pages with `pread(2)`: robust if the file changes underneath.
    ///
    /// The file is also mapped read-only, for the kernel alone: a page
    /// filled on its own (a fault, or `populate` of one page, on 4 KiB
    /// shmem) is copied by the kernel straight from the page cache
    /// ([`PageSource::mapped`]). The page-cache pages it copied from stay
    /// mapped in this process (they are counted in its RSS, though they
    /// are the page cache's either way).
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<FileSource> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        Ok(FileSource::new(path, Reader::Pread(file), len))
    }

    /// Reads pages by copying from a read-only `memmap2` mapping of the
    /// file: one copy, no system call per page.
    ///
    /// # Safety
    ///
    /// The file must not be truncated or modified while the source lives:
    /// reading a truncated mapping raises SIGBUS in the populating thread.
    pub unsafe fn open_mapped(path: impl AsRef<Path>) -> std::io::Result<FileSource> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        // SAFETY: the caller guarantees the file stays as it is while mapped.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(FileSource::new(path, Reader::Mapped(map), len))
    }

    /// A source reading `len` bytes of the file at `path` with `reader`. A
    /// `pread` reader gets a mapping of the file for the kernel to copy
    /// from; a mapped reader's own mapping serves that too.
    fn new(path: PathBuf, reader: Reader, len: u64) -> FileSource {
        let copy_from = match &reader {
            Reader::Pread(file) => copy_mapping(file),
            Reader::Mapped(_) => None,
        };
        FileSource {
            path,
            reader,
            copy_from,
            offset: 0,
            len,
        }
    }

    /// Starts page 0 at byte `offset` of the file (e.g. after a header).
    pub fn with_offset(mut self, offset: u64) -> FileSource {
        self.offset = offset;
        self
    }
}

impl FileSource {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PageSource for FileSource {
    fn fill(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError> {
        self.read_pages(index, dst, dst.len())
    }

    fn fill_run(&self, first: u64, dst: &mut [u8], granule: usize) -> Result<(), FillError> {
        self.read_pages(first, dst, granule)
    }

    fn mapped(&self, index: u64, len: usize) -> Option<*const u8> {
        let map = match &self.reader {
            Reader::Mapped(map) => map,
            Reader::Pread(_) => self.copy_from.as_ref()?,
        };
        let start = index.checked_mul(len as u64)?.checked_add(self.offset)?;
        let end = start.checked_add(len as u64)?;
        // A last, partial page is padded with zeroes by `fill`: not mapped.
        (end <= self.len.min(map.len() as u64)).then(|| map.as_ptr().wrapping_add(start as usize))
    }
}

/// A file's I/O error as a fill error: an OS error carries its errno
/// without allocating; one without (a short read: the file shrank under
/// us) is `EIO`.
fn io_error(e: &std::io::Error) -> FillError {
    FillError::Io(e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
}

/// A read-only shared mapping of `file` for the kernel to copy pages from
/// (`PageSource::mapped`), advised random (no read-around I/O on a miss);
/// `None` if the file cannot be mapped (empty, or no address space left),
/// and then pages are read with `pread`.
fn copy_mapping(file: &File) -> Option<memmap2::Mmap> {
    // SAFETY: the mapping is never read by Rust code, only handed to the
    // kernel as the source of a copy, which fails with EFAULT (instead of
    // raising SIGBUS) where the file was truncated since.
    let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
    let _ = map.advise(memmap2::Advice::Random);
    Some(map)
}

impl FileSource {
    /// Reads the granules from `index` on into `dst` with one read.
    fn read_pages(&self, index: u64, dst: &mut [u8], granule: usize) -> Result<(), FillError> {
        let past_end = FillError::PastEnd { len: self.len };
        let start = index
            .checked_mul(granule as u64)
            .and_then(|s| s.checked_add(self.offset))
            .filter(|&s| s < self.len)
            .ok_or(past_end)?;
        // Every page of a run must start before the end, as one page must.
        if (dst.len() - granule) as u64 >= self.len - start && dst.len() > granule {
            return Err(past_end);
        }
        let available = ((self.len - start) as usize).min(dst.len());
        let (data, padding) = dst.split_at_mut(available);
        match &self.reader {
            Reader::Pread(file) => file.read_exact_at(data, start).map_err(|e| io_error(&e))?,
            Reader::Mapped(map) => {
                data.copy_from_slice(&map[start as usize..start as usize + available])
            }
        }
        padding.fill(0);
        Ok(())
    }
}

// SAFETY: `fill` is a `pread(2)` loop (an error carries its errno, a short
// read a static error: neither allocates) or a copy from a mapping, with
// checked arithmetic: no allocation, lock or panic.
unsafe impl SignalSafeSource for FileSource {}

/// A database file that pages are filled from and written back to: byte
/// `b` of a region populated from it is byte `offset + b` of the file,
/// read with `pread(2)` and written with `pwrite(2)`. The file keeps its
/// length: it is the whole database, and the region is as large as it (a
/// buffer pool's address space), with only the pages in use resident.
///
/// ```no_run
/// use std::sync::Arc;
/// use hugearena::populate::{FileStore, PopulateOptions, Populator};
/// use hugearena::{Region, RegionOptions};
///
/// let store = FileStore::open("data.db")?;
/// let region = Arc::new(Region::create(RegionOptions::new(store.len()))?);
/// let pool = Populator::with_options(region, store, PopulateOptions::new())?;
/// pool.populate(0, 4096)?; // a miss: page 0 is read from the file
/// pool.region().write_via_primary(0, b"new bytes")?;
/// pool.write_back(0, 4096)?; // the page is dirty: write it back first
/// pool.discard(0, 4096)?; // evicted: its memory goes back to the kernel
/// pool.populate(0, 4096)?; // and it comes back with the written bytes
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FileStore {
    file: FileSource,
    /// The same open file as `file`'s reader (a `dup`), for writing.
    writer: File,
}

impl FileStore {
    /// Opens an existing file for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<FileStore> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        Ok(FileStore {
            writer: file.try_clone()?,
            file: FileSource::new(path, Reader::Pread(file), len),
        })
    }

    /// Starts page 0 at byte `offset` of the file (e.g. after a header).
    pub fn with_offset(mut self, offset: u64) -> FileStore {
        self.file.offset = offset;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Bytes of pages in the file (its length past the offset).
    pub fn len(&self) -> u64 {
        self.file.len.saturating_sub(self.file.offset)
    }

    /// Whether the file holds no page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PageSource for FileStore {
    fn fill(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError> {
        self.file.fill(index, dst)
    }

    fn fill_run(&self, first: u64, dst: &mut [u8], granule: usize) -> Result<(), FillError> {
        self.file.fill_run(first, dst, granule)
    }

    fn as_store(&self) -> Option<&dyn PageStore> {
        Some(self)
    }

    fn mapped(&self, index: u64, len: usize) -> Option<*const u8> {
        self.file.mapped(index, len)
    }
}

impl PageStore for FileStore {
    fn write_back(&self, offset: u64, src: &[u8]) -> Result<(), FillError> {
        let len = self.file.len;
        let start = offset
            .checked_add(self.file.offset)
            .filter(|&s| {
                s.checked_add(src.len() as u64)
                    .is_some_and(|end| end <= len)
            })
            .ok_or(FillError::PastEnd { len })?;
        self.writer
            .write_all_at(src, start)
            .map_err(|e| io_error(&e))
    }

    fn sync(&self) -> Result<(), FillError> {
        self.writer.sync_data().map_err(|e| io_error(&e))
    }
}

// SAFETY: `fill` is `FileSource`'s `pread(2)` path, which is
// async-signal-safe (see there); `write_back` and `sync` are never called
// from a signal handler.
unsafe impl SignalSafeSource for FileStore {}

/// Pages come from a closure `(index, dst) -> Result`. The closure can do
/// anything, so the source is served by handler threads only, unless
/// wrapped in [`SignalSafe`].
pub struct FnSource<F>(pub F);

impl<F> PageSource for FnSource<F>
where
    F: Fn(u64, &mut [u8]) -> Result<(), FillError> + Send + Sync,
{
    fn fill(&self, index: u64, dst: &mut [u8]) -> Result<(), FillError> {
        (self.0)(index, dst)
    }
}

impl<F> std::fmt::Debug for FnSource<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnSource(..)")
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::io::Write;

    fn patterned_file(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        f
    }

    #[test]
    fn file_pages_match_the_file_and_pad_the_tail() {
        let f = patterned_file(4096 * 2 + 100);
        // SAFETY: the temporary file is not modified while mapped.
        let mapped = unsafe { FileSource::open_mapped(f.path()) }.unwrap();
        for source in [FileSource::open(f.path()).unwrap(), mapped] {
            let mut page = vec![0xFFu8; 4096];
            source.fill(1, &mut page).unwrap();
            assert!(
                page.iter()
                    .enumerate()
                    .all(|(i, &b)| b == ((4096 + i) % 251) as u8)
            );
            source.fill(2, &mut page).unwrap();
            assert_eq!(page[99], ((8192 + 99) % 251) as u8);
            assert!(page[100..].iter().all(|&b| b == 0), "tail is zero-padded");
            let err = source.fill(3, &mut page).unwrap_err();
            assert_eq!(
                err,
                FillError::PastEnd {
                    len: 4096 * 2 + 100
                }
            );
            assert!(err.to_string().contains("shorter than the region"));
        }
    }

    #[test]
    fn offsets_skip_a_header() {
        let f = patterned_file(8192);
        let source = FileSource::open(f.path()).unwrap().with_offset(10);
        let mut page = vec![0u8; 4096];
        source.fill(0, &mut page).unwrap();
        assert_eq!(page[0], 10);
    }

    #[test]
    fn closures_and_zero_sources() {
        let source = FnSource(|index: u64, dst: &mut [u8]| {
            if index == 7 {
                return Err(FillError::Failed("unlucky page"));
            }
            dst.fill(index as u8);
            Ok(())
        });
        let mut page = [0u8; 64];
        source.fill(3, &mut page).unwrap();
        assert_eq!(page, [3u8; 64]);
        let error = source.fill(7, &mut page).unwrap_err();
        assert_eq!(
            SourceError { index: 7, error }.to_string(),
            "page 7: unlucky page"
        );
        assert!(ZeroSource.fills_zero());
        ZeroSource.fill(0, &mut page).unwrap();
        assert_eq!(page, [0u8; 64]);
    }
}
