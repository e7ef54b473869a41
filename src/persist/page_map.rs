//! A snapshot's page map, read and checked chunk by chunk as pages are
//! needed, so that opening a snapshot costs the same whatever its size.
//!
//! The map holds one entry per granule (flags, crc32c of its bytes); a
//! version 2 file follows it with a chunk table, one crc32c per 512
//! entries, whose own crc is in the header. Opening reads and checks only
//! the chunk table. The first use of a chunk reads its 4 KiB of map, checks
//! it against the table, and keeps its entries; a chunk that does not match
//! is marked damaged for good, and every page it describes fails to fill
//! (so it is poisoned and reported), while the rest of the snapshot stays
//! usable. A version 1 file (no table) is read and checked whole at open,
//! as before.
//!
//! Loading runs wherever a page is filled, including the in-thread
//! driver's SIGBUS handler: it allocates nothing (entries live in lazily
//! allocated anonymous memory sized at open), reads with `pread`, and
//! waits for another thread's load of the same chunk by yielding.
//!
//! # Protocol of a chunk's state word
//!
//! ```text
//!   UNLOADED ──CAS (Acquire)──▶ LOADING ──store (Release)──▶ LOADED | DAMAGED
//!       ▲                          │
//!       └──── store (Release) ─────┘  (the read failed: try again later)
//! ```
//!
//! The loader writes the chunk's entries between its CAS and its Release
//! store; readers load the state with Acquire before reading entries.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use super::format::{self, MAP_CHUNK_ENTRIES, MAP_ENTRY, PRESENT, SnapshotDefect, SnapshotHeader};
use crate::error::{Error, Result};
use crate::populate::FillError;
use crate::sys::Errno;
use crate::sys::mman::ZeroedWords;

const UNLOADED: u8 = 0;
const LOADING: u8 = 1;
const LOADED: u8 = 2;
const DAMAGED: u8 = 3;

/// Bytes of one chunk of map.
const CHUNK_BYTES: usize = (MAP_CHUNK_ENTRIES * MAP_ENTRY) as usize;

/// What [`PageMap::entry`] says of a granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) flags: u32,
    pub(super) crc: u32,
}

/// The page map of one snapshot file.
#[derive(Debug)]
pub(super) struct PageMap {
    /// Per granule: flags (low half) and crc32c (high half), once its
    /// chunk is loaded.
    entries: ZeroedWords,
    /// Per chunk: the state word (see the module docs).
    states: Box<[AtomicU8]>,
    /// Per chunk: the crc32c its map bytes must have (empty for version 1).
    crcs: Box<[u32]>,
    map_offset: u64,
    granules: u64,
}

impl PageMap {
    /// Opens the map of the snapshot `header` describes: the chunk table is
    /// read and checked now (version 2), or the whole map (version 1).
    pub(super) fn open(file: &File, header: &SnapshotHeader, path: &Path) -> Result<PageMap> {
        let bad = |defect| Error::BadSnapshot {
            path: path.to_path_buf(),
            defect,
        };
        let chunks = header.chunks() as usize;
        let map_bytes = header.granules * MAP_ENTRY;
        let entries = ZeroedWords::new(header.granules as usize)
            .map_err(|_| bad(SnapshotDefect::MapTooLarge { bytes: map_bytes }))?;
        let mut states = Vec::new();
        states
            .try_reserve_exact(chunks)
            .map_err(|_| bad(SnapshotDefect::MapTooLarge { bytes: map_bytes }))?;
        let map = if header.version == format::VERSION_1 {
            states.resize_with(chunks, || AtomicU8::new(LOADED));
            let map = PageMap {
                entries,
                states: states.into_boxed_slice(),
                crcs: Box::new([]),
                map_offset: header.map_offset,
                granules: header.granules,
            };
            map.load_whole(file, header, path)?;
            map
        } else {
            states.resize_with(chunks, || AtomicU8::new(UNLOADED));
            let mut table = Vec::new();
            table
                .try_reserve_exact(chunks * 4)
                .map_err(|_| bad(SnapshotDefect::MapTooLarge { bytes: map_bytes }))?;
            table.resize(chunks * 4, 0);
            file.read_exact_at(&mut table, header.chunk_table_offset())
                .map_err(|e| Error::Io {
                    path: path.to_path_buf(),
                    source: e,
                })?;
            if crc32c::crc32c(&table) != header.map_crc {
                return Err(bad(SnapshotDefect::MapChecksum));
            }
            let crcs: Box<[u32]> = table
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            PageMap {
                entries,
                states: states.into_boxed_slice(),
                crcs,
                map_offset: header.map_offset,
                granules: header.granules,
            }
        };
        Ok(map)
    }

    /// Version 1: reads the whole map, checks its crc and its present
    /// count.
    fn load_whole(&self, file: &File, header: &SnapshotHeader, path: &Path) -> Result<()> {
        let bad = |defect| Error::BadSnapshot {
            path: path.to_path_buf(),
            defect,
        };
        let words = self.entries.words();
        let mut buf = vec![0u8; CHUNK_BYTES * 256];
        let map_bytes = header.granules * MAP_ENTRY;
        let (mut crc, mut at, mut present) = (0, 0u64, 0u64);
        while at < map_bytes {
            let part = &mut buf[..(map_bytes - at).min((CHUNK_BYTES * 256) as u64) as usize];
            file.read_exact_at(part, header.map_offset + at)
                .map_err(|e| Error::Io {
                    path: path.to_path_buf(),
                    source: e,
                })?;
            crc = crc32c::crc32c_append(crc, part);
            for (k, e) in part.chunks_exact(8).enumerate() {
                let word = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                present += u64::from(word as u32 & PRESENT != 0);
                words[(at / MAP_ENTRY) as usize + k].store(word, Ordering::Relaxed);
            }
            at += part.len() as u64;
        }
        if crc != header.map_crc {
            return Err(bad(SnapshotDefect::MapChecksum));
        }
        if present != header.present {
            return Err(bad(SnapshotDefect::PresentCount {
                recorded: header.present,
                counted: present,
            }));
        }
        Ok(())
    }

    /// The entry of granule `index`, loading its chunk first if needed.
    /// Async-signal-safe.
    pub(super) fn entry(&self, file: &File, index: u64) -> std::result::Result<Entry, FillError> {
        if index >= self.granules {
            return Err(FillError::PastEnd { len: 0 });
        }
        self.ensure(file, (index / MAP_CHUNK_ENTRIES) as usize)?;
        let word = self.entries.words()[index as usize].load(Ordering::Relaxed);
        Ok(Entry {
            flags: word as u32,
            crc: (word >> 32) as u32,
        })
    }

    /// Whether every chunk loaded so far is free of inherited entries
    /// (version 1 files are loaded whole: for them this covers the map).
    pub(super) fn inherits_nothing_loaded(&self) -> bool {
        self.states
            .iter()
            .enumerate()
            .filter(|(_, s)| s.load(Ordering::Acquire) == LOADED)
            .all(|(c, _)| {
                let from = c * MAP_CHUNK_ENTRIES as usize;
                let to = (from + MAP_CHUNK_ENTRIES as usize).min(self.granules as usize);
                self.entries.words()[from..to]
                    .iter()
                    .all(|w| w.load(Ordering::Relaxed) as u32 & format::INHERITED == 0)
            })
    }

    /// Makes chunk `c` loaded (or reports it damaged).
    fn ensure(&self, file: &File, c: usize) -> std::result::Result<(), FillError> {
        let state = &self.states[c];
        loop {
            match state.load(Ordering::Acquire) {
                LOADED => return Ok(()),
                DAMAGED => {
                    return Err(FillError::Failed(
                        "snapshot page map chunk is corrupt (every page it describes is lost)",
                    ));
                }
                LOADING => std::thread::yield_now(),
                _ => {
                    if state
                        .compare_exchange(UNLOADED, LOADING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        let (next, result) = self.load(file, c);
                        state.store(next, Ordering::Release);
                        return result;
                    }
                }
            }
        }
    }

    /// Reads and checks chunk `c`: the state it ends in, and the outcome.
    fn load(&self, file: &File, c: usize) -> (u8, std::result::Result<(), FillError>) {
        let first = c as u64 * MAP_CHUNK_ENTRIES;
        let n = (self.granules - first).min(MAP_CHUNK_ENTRIES) as usize;
        let mut buf = [0u8; CHUNK_BYTES];
        let bytes = &mut buf[..n * MAP_ENTRY as usize];
        if let Err(e) = file.read_exact_at(bytes, self.map_offset + first * MAP_ENTRY) {
            // Perhaps transient: leave the chunk to the next try.
            let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
            return (UNLOADED, Err(FillError::Io(errno)));
        }
        let valid = |flags: u32| matches!(flags, 0 | PRESENT | format::INHERITED);
        let sound = crc32c::crc32c(bytes) == self.crcs[c]
            && bytes
                .chunks_exact(8)
                .all(|e| valid(u32::from_le_bytes(e[..4].try_into().expect("4 bytes"))));
        if !sound {
            return (
                DAMAGED,
                Err(FillError::Failed(
                    "snapshot page map chunk is corrupt (every page it describes is lost)",
                )),
            );
        }
        let words = &self.entries.words()[first as usize..first as usize + n];
        for (word, e) in words.iter().zip(bytes.chunks_exact(8)) {
            word.store(
                u64::from_le_bytes(e.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        (LOADED, Ok(()))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::SnapshotSource;
    use super::super::format::{self, SnapshotHeader};
    use crate::BackendKind;
    use crate::populate::PageSource;
    use std::os::unix::fs::FileExt;

    /// Files written before the chunk table (format version 1) still open:
    /// their whole map is read and checked at open, and pages fill.
    #[test]
    fn version_1_files_still_open_and_fill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.snap");
        let g = 4096usize;
        let mut h = SnapshotHeader::new(BackendKind::Shmem, 21, 12, 4 * g as u64);
        h.version = format::VERSION_1;
        let (granules, map_offset, data_offset) = format::geometry(1, 12, h.data_len).unwrap();
        (h.granules, h.map_offset, h.data_offset) = (granules, map_offset, data_offset);
        let pages: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; g]).collect();
        let mut map = Vec::new();
        for (i, page) in pages.iter().enumerate() {
            let flags = if i % 2 == 0 { format::PRESENT } else { 0 };
            let crc = if flags == 0 { 0 } else { crc32c::crc32c(page) };
            map.extend_from_slice(&flags.to_le_bytes());
            map.extend_from_slice(&crc.to_le_bytes());
        }
        h.present = 2;
        h.map_crc = crc32c::crc32c(&map);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(h.file_len()).unwrap();
        file.write_all_at(&map, h.map_offset).unwrap();
        for i in [0, 2] {
            file.write_all_at(&pages[i], h.data_offset + (i * g) as u64)
                .unwrap();
        }
        file.write_all_at(&h.encode(), 0).unwrap();
        drop(file);

        let source = SnapshotSource::open(&path).unwrap();
        assert_eq!(source.header().version, 1);
        let mut buf = vec![0u8; g];
        source.fill(2, &mut buf).unwrap();
        assert_eq!(buf, pages[2]);
        assert!(source.is_zero(1) && !source.is_zero(0));
        let mut run = vec![0u8; 4 * g];
        source.fill_run(0, &mut run, g).unwrap();
        assert_eq!(&run[..g], &pages[0][..]);
        assert!(run[g..2 * g].iter().all(|&b| b == 0));
    }
}
