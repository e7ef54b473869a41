//! The memory behind a buffer pool, and how a frame of it is filled from
//! the data file, written back and dropped: hugearena (a region populated
//! from a `FileStore`), and the two ways a database does it without
//! hugearena: anonymous memory with `pread`/`pwrite` and
//! `MADV_DONTNEED` (vmcache without its kernel module), and a shared
//! mapping of the data file itself (LMDB's way: the page cache is the pool).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use hugearena::populate::{FileStore, PopulateOptions, Populator, Promotion};
use hugearena::{BackendKind, KernelCaps, Region, RegionOptions};

use super::pool::PAGE;

/// A pool's memory: page `p` at `base() + p * PAGE`, filled and dropped a
/// frame (`frame_len()` bytes) at a time.
pub trait Frames: Send + Sync {
    /// The first byte of page 0.
    fn base(&self) -> *mut u8;
    /// Bytes per frame: a multiple of [`PAGE`].
    fn frame_len(&self) -> usize;
    /// Makes frame `f` hold the data file's bytes.
    fn load(&self, f: usize) -> io::Result<()>;
    /// Writes page `p` to the data file.
    fn write_back(&self, p: usize) -> io::Result<()>;
    /// Drops the memory of frames `first..first + count` (their dirty
    /// pages were written back; the caller holds every page's lock).
    fn evict(&self, first: usize, count: usize) -> io::Result<()>;
    /// Whether frame `f` holds its bytes in memory (after a crash: a frame
    /// flagged resident may have been dropped by a dead evictor).
    fn is_resident(&self, f: usize) -> bool;
    /// Makes the written-back pages durable.
    fn sync(&self) -> io::Result<()>;
    /// What the memory is, and why.
    fn describe(&self) -> String;
    /// Bytes of memory the pool holds now (for the file-backed kinds, what
    /// the file system holds for the region's file).
    fn memory(&self) -> u64;
    /// What the memory's own counters say, if it has any.
    fn counters(&self) -> Option<String> {
        None
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The huge tmpfs where `ShmemThp` regions get a 2 MiB folio per block
/// (mounted when this process may), or `/dev/shm`.
fn shmem_thp_dir() -> &'static str {
    let mount = super::huge_tmpfs::HUGE_TMPFS;
    if mount.mount().is_ok() {
        mount.dir
    } else {
        "/dev/shm"
    }
}

/// Where the pool's metadata file lives: on 2 MiB folios where the huge
/// tmpfs can be had.
pub fn metadata_dir() -> &'static str {
    shmem_thp_dir()
}

/// Where a region file of `kind` lives.
pub fn region_dir(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Hugetlb | BackendKind::HugetlbHgm => "/dev/hugepages",
        BackendKind::ShmemThp => shmem_thp_dir(),
        _ => "/dev/shm",
    }
}

/// A hugearena region as large as the data file, populated from it.
pub struct HugearenaFrames {
    populator: Populator,
}

impl HugearenaFrames {
    /// Creates the region at `dir/name` (the directory that suits the
    /// backend; `kind` `None` lets hugearena choose) and populates it from
    /// `data`. `all_fit`: the pool's budget holds the whole file, so 2 MiB
    /// blocks may be allocated whole (one folio each, mapped huge without
    /// a copy once filled); otherwise each fill allocates only its page.
    pub fn create(
        kind: Option<BackendKind>,
        name: &str,
        data: &Path,
        all_fit: bool,
    ) -> io::Result<(HugearenaFrames, std::path::PathBuf)> {
        let store = FileStore::open(data)?;
        let mut options = RegionOptions::new(store.len());
        if let Some(kind) = kind {
            options = options.backend(kind);
        }
        let planned = options
            .plan(KernelCaps::cached())
            .map_err(other)?
            .backend
            .kind();
        let path = Path::new(region_dir(planned)).join(name);
        let _ = std::fs::remove_file(&path);
        let region = Region::create(options.path(&path)).map_err(other)?;
        Ok((Self::populate(region, store, all_fit)?, path))
    }

    /// Opens the region another process created, populated from `data`.
    pub fn open(region: &Path, data: &Path, all_fit: bool) -> io::Result<HugearenaFrames> {
        let store = FileStore::open(data)?;
        Self::populate(Region::open(region).map_err(other)?, store, all_fit)
    }

    fn populate(region: Region, store: FileStore, all_fit: bool) -> io::Result<HugearenaFrames> {
        if store.len() != region.len() as u64 {
            return Err(other(format!(
                "the data file has {} bytes and the region {}: open the pool's own data file",
                store.len(),
                region.len()
            )));
        }
        // No readahead, and blocks allocated whole and promoted to huge
        // mappings only if every page will be resident: otherwise the pool
        // decides what is resident, page by page, and a collapse would
        // copy blocks that eviction splits again.
        let promotion = if all_fit {
            Promotion::Background
        } else {
            Promotion::Off
        };
        let options = PopulateOptions::new()
            .readahead(0)
            .whole_blocks(all_fit)
            .promotion(promotion);
        let populator = Populator::with_options(Arc::new(region), store, options).map_err(other)?;
        Ok(HugearenaFrames { populator })
    }
}

impl Frames for HugearenaFrames {
    fn base(&self) -> *mut u8 {
        self.populator.region().primary().as_ptr()
    }

    fn frame_len(&self) -> usize {
        // What a discard drops at once: a granule, or a whole huge page on
        // HugetlbHgm (which fills 4 KiB pieces but cannot evict them).
        self.populator.discard_unit().max(PAGE)
    }

    fn load(&self, f: usize) -> io::Result<()> {
        let len = self.frame_len();
        self.populator.populate(f * len, len).map_err(other)
    }

    fn write_back(&self, p: usize) -> io::Result<()> {
        self.populator.write_back(p * PAGE, PAGE).map_err(other)
    }

    fn evict(&self, first: usize, count: usize) -> io::Result<()> {
        let len = self.frame_len();
        self.populator
            .discard(first * len, count * len)
            .map_err(other)
    }

    fn is_resident(&self, f: usize) -> bool {
        self.populator.is_present(f * self.frame_len())
    }

    fn sync(&self) -> io::Result<()> {
        self.populator.sync().map_err(other)
    }

    fn describe(&self) -> String {
        let region = self.populator.region();
        format!(
            "hugearena {} ({} frames, block allocation {:?}): {}",
            region.backend().kind(),
            super::human::bytes(self.frame_len() as u64),
            region.block_allocation(),
            region.choice().reason
        )
    }

    fn memory(&self) -> u64 {
        let fd = self.populator.region().fd().try_clone_to_owned();
        fd.and_then(|fd| std::fs::File::from(fd).metadata())
            .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
    }

    fn counters(&self) -> Option<String> {
        let s = self.populator.stats();
        Some(format!(
            "{} fills, {} discards, {} blocks collapsed to huge mappings",
            s.fills, s.discards, s.collapses
        ))
    }
}

/// Anonymous memory: `pread` into the frame on a miss, `pwrite` to write
/// back, `MADV_DONTNEED` to evict. One process.
pub struct AnonFrames {
    map: memmap2::MmapMut,
    file: File,
}

impl AnonFrames {
    /// Anonymous memory as large as `data`.
    pub fn new(data: &Path) -> io::Result<AnonFrames> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(data)?;
        let map = memmap2::MmapMut::map_anon(file.metadata()?.len() as usize)?;
        Ok(AnonFrames { map, file })
    }
}

impl Frames for AnonFrames {
    fn base(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    fn frame_len(&self) -> usize {
        PAGE
    }

    fn load(&self, f: usize) -> io::Result<()> {
        // SAFETY: the page lies in the mapping; the pool holds its lock, and
        // optimistic readers read it through atomics (and throw away what
        // they read while it changes), so the kernel's write aliases no
        // Rust reference that relies on it.
        let page = unsafe { std::slice::from_raw_parts_mut(self.base().add(f * PAGE), PAGE) };
        self.file.read_exact_at(page, (f * PAGE) as u64)
    }

    fn write_back(&self, p: usize) -> io::Result<()> {
        self.file
            .write_all_at(&self.map[p * PAGE..(p + 1) * PAGE], (p * PAGE) as u64)
    }

    fn evict(&self, first: usize, count: usize) -> io::Result<()> {
        dont_need(self.base(), first * PAGE, count * PAGE)
    }

    fn is_resident(&self, _f: usize) -> bool {
        true
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn memory(&self) -> u64 {
        resident_bytes(self.base(), self.map.len())
    }

    fn describe(&self) -> String {
        "anonymous memory, pread on a miss, MADV_DONTNEED to evict (vmcache without its kernel module)".into()
    }
}

/// A shared mapping of the data file: a miss is the kernel's page fault
/// from the page cache, eviction `MADV_DONTNEED` (the page cache keeps the
/// page and writes it back itself).
pub struct MmapFrames {
    map: memmap2::MmapMut,
}

impl MmapFrames {
    /// Maps `data` shared.
    pub fn new(data: &Path) -> io::Result<MmapFrames> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(data)?;
        // SAFETY: the data file belongs to this pool; nothing truncates it.
        let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        Ok(MmapFrames { map })
    }
}

impl Frames for MmapFrames {
    fn base(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    fn frame_len(&self) -> usize {
        PAGE
    }

    fn load(&self, _f: usize) -> io::Result<()> {
        Ok(())
    }

    fn write_back(&self, _p: usize) -> io::Result<()> {
        Ok(())
    }

    fn evict(&self, first: usize, count: usize) -> io::Result<()> {
        dont_need(self.base(), first * PAGE, count * PAGE)
    }

    fn is_resident(&self, _f: usize) -> bool {
        true
    }

    fn sync(&self) -> io::Result<()> {
        self.map.flush()
    }

    fn memory(&self) -> u64 {
        resident_bytes(self.base(), self.map.len())
    }

    fn describe(&self) -> String {
        "mmap of the data file: page-cache faults, MADV_DONTNEED to evict (LMDB's way)".into()
    }
}

fn dont_need(base: *mut u8, at: usize, len: usize) -> io::Result<()> {
    // SAFETY: pages of the pool's own mapping; their bytes are in the data
    // file (written back, or the page cache's) and they are locked.
    let r = unsafe { libc::madvise(base.add(at).cast(), len, libc::MADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes of `[base, base + len)` mapped resident in this process
/// (`mincore(2)`).
fn resident_bytes(base: *mut u8, len: usize) -> u64 {
    let pages = len.div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is one mapping of this process; `vec` has a byte
    // per page.
    if unsafe { libc::mincore(base.cast(), len, vec.as_mut_ptr()) } != 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64
}
