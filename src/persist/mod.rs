//! Snapshots and lazy restore.
//!
//! A snapshot holds a region's populated granules, each with a crc32c, in
//! a sparse file (see [`SnapshotHeader`] for the layout). Restoring maps a new region whose page
//! source is the snapshot and returns at once: nothing is read until a
//! page is touched (or a background drain gets to it), and every page is
//! verified as it is filled; a corrupt page is poisoned and reported, the
//! rest stays usable.
//!
//! # Consistency
//!
//! [`snapshot`] copies each present granule once, in address order. The
//! snapshot is a consistent image of the region if **no thread of any
//! process writes the region while it runs** (the caller quiesces writers,
//! as a database does around a checkpoint); otherwise each granule is
//! internally whatever it held when copied, with no order across granules.
//!
//! # Crash safety
//!
//! The snapshot is written to a temporary file next to `path`, synced,
//! renamed over `path`, and the directory is synced: a crash at any point
//! leaves either the previous snapshot or the new one at `path`, never a
//! mix. A crash can leave the temporary file behind (`.NAME.tmp-PID`);
//! the next snapshot of the same path by that pid replaces it.
#![allow(unsafe_code)] // the snapshot source promises signal safety (`unsafe impl`)

pub(crate) mod format;
mod page_map;
pub use format::{HEADER_LEN, ParentRef, SnapshotDefect, SnapshotHeader};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::format::{MAP_ENTRY, PRESENT};
use self::page_map::{Entry, PageMap};
use crate::error::{Error, Result};
use crate::populate::state::{self, PageState};
use crate::populate::{FillError, PageSource, PopulateOptions, Populator};
use crate::region::{Region, RegionOptions};
use crate::sys::Errno;
use crate::sys::size::PageSize;

/// What [`snapshot`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot file.
    pub path: PathBuf,
    /// Granules in the region.
    pub granules: u64,
    /// Granules whose bytes this file holds.
    pub present: u64,
    /// Granules left to the parent snapshot (incremental snapshots).
    pub inherited: u64,
    /// Bytes of page data written.
    pub data_bytes: u64,
    /// The file's length (most of it holes if the region was sparse).
    pub file_len: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// Why a snapshot asked for as incremental is a full one (the
    /// populator does not track writes), or `None`.
    pub full_because: Option<String>,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Populates every granule that is absent but not zero in `populator`'s
/// source, so that a snapshot of the region holds it. After a lazy restore,
/// pages nobody touched yet exist only in the old snapshot: a new snapshot
/// must not drop them.
pub(crate) fn fill_from_source(populator: &Populator) -> Result<()> {
    let region = populator.region();
    let g = region.granule().bytes();
    let states = region
        .all_page_states()
        .map_err(Error::sys("allocating the page-state table"))?;
    let needs = |i: usize| {
        state::observe(&states[i]) != PageState::Present && !populator.source().is_zero(i as u64)
    };
    let mut i = 0;
    while i < states.len() {
        if !needs(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < states.len() && needs(i) {
            i += 1;
        }
        populator.populate(start * g, (i - start) * g)?;
    }
    Ok(())
}

/// Writes a snapshot of the region `populator` fills, including pages its
/// source holds that were never touched (a lazily restored region's
/// pages still in the old snapshot are read in first).
pub fn snapshot_populator(populator: &Populator, path: impl AsRef<Path>) -> Result<SnapshotInfo> {
    fill_from_source(populator)?;
    snapshot(populator.region(), path)
}

/// Writes a snapshot of `region` to `path`, replacing any previous one
/// atomically. See the module docs for what it captures. Only populated
/// granules are written: for a region filled from a non-zero source, use
/// [`snapshot_populator`].
pub fn snapshot(region: &Region, path: impl AsRef<Path>) -> Result<SnapshotInfo> {
    write_atomically(region, path.as_ref(), None)
}

fn write_atomically(
    region: &Region,
    path: &Path,
    increment: Option<&Increment<'_>>,
) -> Result<SnapshotInfo> {
    let started = Instant::now();
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidOption {
            option: "snapshot path",
            reason: format!("{} has no file name", path.display()),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (tmp, file) = create_temporary(dir, &name)?;
    let result = write_snapshot(region, file, &tmp, increment);
    let renamed = result.and_then(|info| {
        std::fs::rename(&tmp, path)
            .map(|()| info)
            .map_err(io_error(path))
    });
    let mut info = match renamed {
        Ok(info) => info,
        Err(e) => {
            // Nothing is left behind: the old snapshot (if any) is intact.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    info.path = path.to_path_buf();
    info.elapsed = started.elapsed();
    Ok(info)
}

/// Creates the temporary a snapshot is written to, beside its final name:
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600, so a planted file or symlink is
/// never written through and no other user can read the pages.
fn create_temporary(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    remove_stale_temporaries(dir, name);
    let mut attempt = 0;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match File::options()
            .write(true)
            .create_new(true)
            .mode(SNAPSHOT_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            // A stale temporary of an earlier process with this pid, or a
            // planted one: pick another name, a few times.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(io_error(&tmp)(e)),
        }
    }
}

/// Removes the temporaries of snapshots to `name` whose writer is gone
/// (killed mid-snapshot: nobody else removes them). Best effort: a
/// temporary whose pid now belongs to another process stays, and errors
/// are ignored (a directory that cannot be listed still takes a snapshot).
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if gone && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The deepest chain of incremental snapshots a restore follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Permissions of snapshot files: the owner's only (they hold the region's
/// pages).
pub const SNAPSHOT_MODE: u32 = 0o600;

/// The parent of an incremental snapshot, and what changed since it.
struct Increment<'a> {
    parent: &'a SnapshotSource,
    name: String,
    /// Changed granules, sorted.
    changed: &'a [usize],
}

fn write_snapshot(
    region: &Region,
    file: File,
    tmp: &Path,
    increment: Option<&Increment<'_>>,
) -> Result<SnapshotInfo> {
    let backend = region.backend();
    let granule = region.granule();
    let mut header = SnapshotHeader::new(
        backend.kind(),
        backend.mapping_unit().shift(),
        granule.shift(),
        region.len() as u64,
    );
    if let Some(inc) = increment {
        let p = inc.parent.header();
        if (p.data_len, p.granule_shift, p.backend)
            != (header.data_len, header.granule_shift, header.backend)
        {
            return Err(Error::BadSnapshot {
                path: inc.parent.path().to_path_buf(),
                defect: SnapshotDefect::GeometryMismatch,
            });
        }
        header.parent = Some(format::ParentRef {
            name: inc.name.clone(),
            header_crc: p.header_crc,
        });
    }
    // Holes where nothing is written: the file is as sparse as the region.
    file.set_len(header.file_len()).map_err(io_error(tmp))?;
    let g = granule.bytes();
    let mut map = vec![0u8; (header.granules * MAP_ENTRY) as usize];
    // Copy runs of present granules up to 1 MiB at a time.
    let per_batch = ((1 << 20) / g).max(1);
    let mut buf = vec![0u8; per_batch * g];
    let states = region
        .all_page_states()
        .map_err(Error::sys("allocating the page-state table"))?;
    let mut i = 0;
    let mut data_bytes = 0;
    // A present granule the parent holds and nobody changed is inherited:
    // its map entry points to the parent, no bytes are written.
    let inherited = |i: usize| {
        increment.is_some_and(|inc| inc.parent.holds(i) && inc.changed.binary_search(&i).is_err())
    };
    let mut inherited_count = 0;
    while i < states.len() {
        if state::observe(&states[i]) != PageState::Present {
            i += 1;
            continue;
        }
        if inherited(i) {
            let at = i * MAP_ENTRY as usize;
            let crc = increment.map_or(0, |inc| inc.parent.entry(i as u64).map_or(0, |e| e.crc));
            map[at..at + 4].copy_from_slice(&format::INHERITED.to_le_bytes());
            map[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            inherited_count += 1;
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < states.len()
            && end - i < per_batch
            && state::observe(&states[end]) == PageState::Present
            && !inherited(end)
        {
            end += 1;
        }
        let bytes = &mut buf[..(end - i) * g];
        region.read_via_alias(i * g, bytes)?;
        for (k, page) in bytes.chunks(g).enumerate() {
            let at = (i + k) * MAP_ENTRY as usize;
            map[at..at + 4].copy_from_slice(&PRESENT.to_le_bytes());
            map[at + 4..at + 8].copy_from_slice(&crc32c::crc32c(page).to_le_bytes());
        }
        file.write_all_at(bytes, header.data_offset + (i * g) as u64)
            .map_err(io_error(tmp))?;
        header.present += (end - i) as u64;
        data_bytes += bytes.len() as u64;
        i = end;
    }
    // One crc per chunk of map, so a restore checks only what it reads;
    // the table's own crc goes in the header.
    let table: Vec<u8> = map
        .chunks((format::MAP_CHUNK_ENTRIES * MAP_ENTRY) as usize)
        .flat_map(|chunk| crc32c::crc32c(chunk).to_le_bytes())
        .collect();
    header.map_crc = crc32c::crc32c(&table);
    file.write_all_at(&map, header.map_offset)
        .map_err(io_error(tmp))?;
    file.write_all_at(&table, header.chunk_table_offset())
        .map_err(io_error(tmp))?;
    // The header last: a file without it is not a snapshot.
    file.write_all_at(&header.encode(), 0)
        .map_err(io_error(tmp))?;
    file.sync_all().map_err(io_error(tmp))?;
    Ok(SnapshotInfo {
        path: tmp.to_path_buf(),
        granules: header.granules,
        present: header.present,
        inherited: inherited_count,
        data_bytes,
        file_len: header.file_len(),
        elapsed: Duration::ZERO,
        full_because: None,
    })
}

/// A snapshot opened for restore: its header and page map, checked (and
/// its chain of parents) before anything is mapped. As a page source it
/// reads each page once, verifies its checksum, and poisons a page that
/// does not match.
///
/// ```
/// use hugearena::persist::{self, SnapshotSource};
/// use hugearena::populate::PopulateOptions;
/// use hugearena::{Arena, BackendKind, RegionOptions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let arena = Arena::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem), PopulateOptions::new())?;
/// let p = arena.alloc_bytes(64)?;
/// arena.write_bytes(p, 0, b"kept")?;
/// arena.snapshot(dir.path().join("a.snap"))?;
///
/// let source = SnapshotSource::open(dir.path().join("a.snap"))?;
/// println!("{} of {} pages present", source.header().present, source.header().granules);
/// // Returns at once: pages are read (and verified) on first touch.
/// let restored = Arena::attach(persist::restore_with(source.region_options()?, source, PopulateOptions::new())?)?;
/// let mut buf = [0u8; 4];
/// restored.read_bytes(p, 0, &mut buf)?;
/// assert_eq!(&buf, b"kept");
/// # Ok::<(), hugearena::Error>(())
/// ```
#[derive(Debug)]
pub struct SnapshotSource {
    path: PathBuf,
    file: File,
    header: SnapshotHeader,
    /// Per granule: flags and crc32c, loaded chunk by chunk.
    map: PageMap,
    /// The snapshot this one builds on, opened and checked.
    parent: Option<Box<SnapshotSource>>,
}

impl SnapshotSource {
    /// Opens and checks a snapshot: header, geometry, file length and page
    /// map. Nothing is mapped yet.
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotSource> {
        Self::open_chain(path.as_ref(), &mut Vec::new())
    }

    /// Opens a snapshot whose descendants (files `(device, inode)`) are in
    /// `chain`: a file met twice is a cycle, and chains are at most
    /// [`MAX_CHAIN_DEPTH`] deep, so a hostile chain ends in an error.
    fn open_chain(path: &Path, chain: &mut Vec<(u64, u64)>) -> Result<SnapshotSource> {
        use std::os::unix::fs::MetadataExt;
        let path = path.to_path_buf();
        let file = File::open(&path).map_err(io_error(&path))?;
        let meta = file.metadata().map_err(io_error(&path))?;
        let len = meta.len();
        let id = (meta.dev(), meta.ino());
        if chain.contains(&id) {
            return Err(Error::BadSnapshot {
                path,
                defect: SnapshotDefect::Cycle,
            });
        }
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::BadSnapshot {
                path,
                defect: SnapshotDefect::TooDeep(MAX_CHAIN_DEPTH),
            });
        }
        chain.push(id);
        let mut head = vec![0u8; HEADER_LEN.min(len) as usize];
        file.read_exact_at(&mut head, 0).map_err(io_error(&path))?;
        head.resize(HEADER_LEN as usize, 0);
        let header = SnapshotHeader::decode(&head, len, &path)?;
        // Only the chunk table is read now (the whole map of a version 1
        // file); the map's entries are read and checked as pages need them.
        let map = PageMap::open(&file, &header, &path)?;
        let parent = match &header.parent {
            None => None,
            Some(p) => {
                let parent_path = path.parent().unwrap_or(Path::new(".")).join(&p.name);
                let parent = SnapshotSource::open_chain(&parent_path, chain)?;
                let ph = parent.header();
                if ph.header_crc != p.header_crc
                    || (ph.data_len, ph.granule_shift) != (header.data_len, header.granule_shift)
                {
                    return Err(Error::BadSnapshot {
                        path,
                        defect: SnapshotDefect::ParentMismatch(parent_path.clone()),
                    });
                }
                Some(Box::new(parent))
            }
        };
        if parent.is_none() && !map.inherits_nothing_loaded() {
            return Err(Error::BadSnapshot {
                path,
                defect: SnapshotDefect::NoParent,
            });
        }
        Ok(SnapshotSource {
            path,
            file,
            header,
            map,
            parent,
        })
    }

    /// Whether granule `index` has bytes in this snapshot or its parents.
    fn holds(&self, index: usize) -> bool {
        self.map
            .entry(&self.file, index as u64)
            .is_ok_and(|e| e.flags & (PRESENT | format::INHERITED) != 0)
    }

    /// The entry of granule `index`, its chunk loaded and checked.
    fn entry(&self, index: u64) -> std::result::Result<Entry, FillError> {
        if index >= self.header.granules {
            return Err(FillError::PastEnd {
                len: self.header.data_len,
            });
        }
        self.map.entry(&self.file, index)
    }

    /// How many snapshots this one builds on.
    pub fn depth(&self) -> usize {
        self.parent.as_ref().map_or(0, |p| 1 + p.depth())
    }

    /// The header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Region options that recreate the snapshot's region: same size,
    /// backend and huge page size.
    pub fn region_options(&self) -> Result<RegionOptions> {
        let bytes = 1u64.checked_shl(self.header.huge_page_shift);
        let huge = bytes
            .and_then(PageSize::from_bytes)
            .ok_or_else(|| Error::BadSnapshot {
                path: self.path.clone(),
                defect: SnapshotDefect::HugePageShift(self.header.huge_page_shift),
            })?;
        let options = RegionOptions::new(self.header.data_len).backend(self.header.backend);
        Ok(if self.header.backend.uses_hugetlb() {
            options.huge_page_size(huge)
        } else {
            options
        })
    }
}

// SAFETY: `fill` looks entries up with `get`, follows parents (already
// open), reads with `pread(2)` and checks a crc: no allocation, lock or
// panic (errors carry an errno or a static message).
unsafe impl crate::populate::SignalSafeSource for SnapshotSource {}

impl PageSource for SnapshotSource {
    fn fill(&self, index: u64, dst: &mut [u8]) -> std::result::Result<(), FillError> {
        // One page is a run of one (the granule check included).
        self.fill_run(index, dst, dst.len())
    }

    fn fill_run(
        &self,
        first: u64,
        dst: &mut [u8],
        granule: usize,
    ) -> std::result::Result<(), FillError> {
        let g = self.header.granule() as usize;
        if granule != g || dst.len() % g != 0 {
            return Err(FillError::Failed(
                "the region's granule differs from the snapshot's",
            ));
        }
        let count = dst.len() / g;
        // Sub-runs of one kind: stored pages are read with one `pread` and
        // checked page by page; inherited ones come from the parent; holes
        // are zero.
        let kind = |i: usize| {
            self.entry(first + i as u64)
                .map(|e| e.flags & (PRESENT | format::INHERITED))
        };
        let mut at = 0;
        while at < count {
            let k = kind(at)?;
            let mut end = at + 1;
            while end < count && kind(end)? == k {
                end += 1;
            }
            let pages = &mut dst[at * g..end * g];
            let index = first + at as u64;
            if k & format::INHERITED != 0 {
                match &self.parent {
                    Some(parent) => parent.fill_run(index, pages, g)?,
                    None => {
                        return Err(FillError::Failed(
                            "snapshot page inherited from a missing parent",
                        ));
                    }
                }
            } else if k & PRESENT != 0 {
                self.file
                    .read_exact_at(pages, self.header.data_offset + index * g as u64)
                    .map_err(|e| {
                        FillError::Io(e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
                    })?;
                for (k, page) in pages.chunks(g).enumerate() {
                    if crc32c::crc32c(page) != self.entry(index + k as u64)?.crc {
                        return Err(FillError::Failed(
                            "snapshot page checksum mismatch (corrupt page)",
                        ));
                    }
                }
            } else {
                pages.fill(0);
            }
            at = end;
        }
        Ok(())
    }

    fn is_zero(&self, index: u64) -> bool {
        self.entry(index)
            .is_ok_and(|e| e.flags & (PRESENT | format::INHERITED) == 0)
    }
}

/// Restores a snapshot into a new region (anonymous, or at
/// `region.path(..)` if the options say so) and returns at once: pages
/// fill from the snapshot, verified, on first touch.
pub fn restore(path: impl AsRef<Path>, populate: PopulateOptions) -> Result<Populator> {
    let source = SnapshotSource::open(path)?;
    restore_with(source.region_options()?, source, populate)
}

/// [`restore`] with explicit region options (e.g. a named file); the size
/// and backend must match the snapshot's.
pub fn restore_with(
    options: RegionOptions,
    source: SnapshotSource,
    populate: PopulateOptions,
) -> Result<Populator> {
    let region = Region::create(options)?;
    let h = source.header().clone();
    if region.len() as u64 != h.data_len || region.granule().bytes() as u64 != h.granule() {
        return Err(Error::BadSnapshot {
            path: source.path().to_path_buf(),
            defect: SnapshotDefect::RegionMismatch {
                data_len: h.data_len,
                granule: h.granule(),
                region_len: region.len() as u64,
                region_granule: region.granule().bytes() as u64,
            },
        });
    }
    Populator::with_options(Arc::new(region), source, populate)
}

/// Takes full and incremental snapshots of one populator's region,
/// remembering the last one it wrote.
///
/// Incremental snapshots write only the granules that changed since the
/// previous snapshot by this snapshotter: pages this process wrote (seen
/// through [`PopulateOptions::track_writes`] and `PAGEMAP_SCAN`), pages it
/// replaced (released and refilled), and pages that were not in the
/// previous snapshot. Everything else points to the previous file, which
/// must stay next to the new one. Writes by *other* processes are in their
/// page tables, not ours: take incremental snapshots only of regions this
/// process alone writes, or take full ones.
#[derive(Debug, Default)]
pub struct Snapshotter {
    last: Option<PathBuf>,
}

impl Snapshotter {
    /// A snapshotter with no previous snapshot.
    pub fn new() -> Snapshotter {
        Snapshotter::default()
    }

    /// The last snapshot written.
    pub fn last(&self) -> Option<&Path> {
        self.last.as_deref()
    }

    /// A full snapshot; starts a new chain.
    pub fn full(&mut self, populator: &Populator, path: impl AsRef<Path>) -> Result<SnapshotInfo> {
        // What changed before a full snapshot is in it: start afresh.
        let changed = if populator.tracks_writes() {
            populator.take_changed()?
        } else {
            Vec::new()
        };
        let written =
            fill_from_source(populator).and_then(|()| snapshot(populator.region(), path.as_ref()));
        self.record(populator, &changed, written)
    }

    /// Remembers a written snapshot as the next parent, or, if writing
    /// failed, hands the changes back so the next snapshot includes them.
    fn record(
        &mut self,
        populator: &Populator,
        changed: &[usize],
        written: Result<SnapshotInfo>,
    ) -> Result<SnapshotInfo> {
        match written {
            Ok(info) => {
                self.last = Some(info.path.clone());
                Ok(info)
            }
            Err(e) => {
                populator.mark_changed(changed);
                Err(e)
            }
        }
    }

    /// An incremental snapshot on top of the last one, which must be in
    /// the same directory as `path`.
    pub fn incremental(
        &mut self,
        populator: &Populator,
        path: impl AsRef<Path>,
    ) -> Result<SnapshotInfo> {
        let path = path.as_ref();
        let last = self.last.clone().ok_or_else(|| Error::InvalidOption {
            option: "incremental snapshot",
            reason: "no previous snapshot by this snapshotter: take a full one first".into(),
        })?;
        let same_dir = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
        if same_dir(&last) != same_dir(path) || last.file_name() == path.file_name() {
            return Err(Error::InvalidOption {
                option: "incremental snapshot path",
                reason: format!(
                    "{} must be a new file in the directory of its parent {}",
                    path.display(),
                    last.display()
                ),
            });
        }
        if !populator.tracks_writes() {
            // Nothing says which pages changed: every page goes in, and
            // the new file starts a chain of its own.
            let why = populator
                .tracking_unavailable()
                .unwrap_or("the populator does not track writes (PopulateOptions::track_writes)")
                .to_string();
            let mut info = self.full(populator, path)?;
            info.full_because = Some(why);
            return Ok(info);
        }
        let parent = SnapshotSource::open(&last)?;
        // Writing over a file of the chain would make it its own ancestor
        // (a cycle) and lose the pages it holds for its descendants.
        let mut ancestor = Some(&parent);
        while let Some(a) = ancestor {
            if a.path().file_name() == path.file_name() {
                return Err(Error::InvalidOption {
                    option: "incremental snapshot path",
                    reason: format!(
                        "{} is part of the chain the new snapshot builds on: choose a new file",
                        path.display()
                    ),
                });
            }
            ancestor = a.parent.as_deref();
        }
        fill_from_source(populator)?;
        let changed = populator.take_changed()?;
        let increment = Increment {
            parent: &parent,
            name: last
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            changed: &changed,
        };
        let written = write_atomically(populator.region(), path, Some(&increment));
        self.record(populator, &changed, written)
    }
}
