//! The snapshot file format (version 1), little-endian:
//!
//! ```text
//! 0      header, 4 KiB:
//!          0  magic "HASNAP\0\x01"   8  version u32      12 backend code u32
//!         16  huge page shift u32   20  granule shift u32
//!         24  data length u64       32  granules u64
//!         40  map offset u64        48  data offset u64
//!         56  present granules u64  64  map crc32c u32   68 header crc32c u32
//!         72  parent's header crc32c u32  76  parent name length u16
//!         78  parent file name (incremental snapshots; length 0 otherwise)
//!        (the header crc covers all 4096 bytes with its own field zeroed)
//! 4096   page map: per granule, u32 flags (bit 0: present here, bit 1:
//!        inherited from the parent) and u32 crc32c of the granule's bytes
//! data   granule i at data_offset + i × granule; absent granules are holes
//!        (never written), so the file is sparse
//! ```
//!
//! Everything is checked before anything is mapped: magic, version,
//! header checksum, geometry, file length, map checksum.

use crate::backend::BackendKind;
use crate::codec::{Decoder, Encoder, HeaderDefect};
use crate::error::{Error, Result};

/// The first 8 bytes of a snapshot.
pub(crate) const MAGIC: [u8; 8] = *b"HASNAP\0\x01";
/// The format version this build writes (it reads 1 too). Version 2 adds
/// the chunk table: the page map is checked chunk by chunk as restore
/// needs it, so opening a snapshot costs the same whatever its size.
pub(crate) const VERSION: u32 = 2;
/// The version without a chunk table (its whole map is checked at open).
pub(crate) const VERSION_1: u32 = 1;
/// Page-map entries per chunk: 4 KiB of map, one crc32c each in the
/// chunk table.
pub(crate) const MAP_CHUNK_ENTRIES: u64 = 512;
/// Bytes of the header.
pub const HEADER_LEN: u64 = 4096;
/// Bytes of one page-map entry.
pub(crate) const MAP_ENTRY: u64 = 8;
/// Page-map flag: the granule's bytes are in the file.
pub(crate) const PRESENT: u32 = 1;
/// Page-map flag: the granule's bytes are in the parent snapshot.
pub(crate) const INHERITED: u32 = 2;
/// Longest parent file name.
pub(crate) const MAX_PARENT_NAME: usize = 1024;

/// The snapshot an incremental snapshot builds on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// Its file name, in the same directory.
    pub name: String,
    /// Its header checksum, so a replaced parent is noticed.
    pub header_crc: u32,
}

/// A decoded, validated snapshot header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The backend of the region it was taken from.
    pub backend: BackendKind,
    /// Huge page shift of that region (0 if none).
    pub huge_page_shift: u32,
    /// Granule shift.
    pub granule_shift: u32,
    /// Bytes of data.
    pub data_len: u64,
    /// Granules.
    pub granules: u64,
    /// Where the page map starts.
    pub map_offset: u64,
    /// Where granule 0's bytes start.
    pub data_offset: u64,
    /// Granules present in the file.
    pub present: u64,
    /// crc32c of the chunk table (version 2), or of the whole page map
    /// (version 1).
    pub map_crc: u32,
    /// The format version of the file.
    pub version: u32,
    /// The parent, for an incremental snapshot.
    pub parent: Option<ParentRef>,
    /// The header's own checksum (set by `encode` and `decode`).
    pub header_crc: u32,
}

/// Offset of the header checksum.
const CHECKSUM_OFFSET: usize = 68;

/// What is wrong with a snapshot file (or chain), found before anything is
/// mapped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotDefect {
    /// The header does not decode.
    #[error("header: {0}")]
    Header(#[from] HeaderDefect),
    /// The file is not as long as its header says.
    #[error(
        "{len} bytes, but its header describes a file of {expected} bytes (truncated or extended)"
    )]
    Length {
        /// The file's length.
        len: u64,
        /// The length the header implies.
        expected: u64,
    },
    /// The page map's checksum does not match.
    #[error("page map checksum mismatch: the map is corrupt")]
    MapChecksum,
    /// The page map counts another number of present pages than the header.
    #[error("the header counts {recorded} present pages, the map {counted}")]
    PresentCount {
        /// The header's count.
        recorded: u64,
        /// The map's.
        counted: u64,
    },
    /// The page map is larger than this process can hold.
    #[error("cannot hold its page map of {bytes} bytes in memory")]
    MapTooLarge {
        /// Bytes of map.
        bytes: u64,
    },
    /// The map inherits pages but the header names no parent.
    #[error("the map inherits pages but there is no parent")]
    NoParent,
    /// The parent named in the header was replaced, or does not match.
    #[error("its parent {0} was replaced or does not match (this snapshot builds on another one)")]
    ParentMismatch(std::path::PathBuf),
    /// The chain of parents leads back to a file already in it.
    #[error("the chain of parent snapshots loops back to this file")]
    Cycle,
    /// The chain of parents is deeper than [`MAX_CHAIN_DEPTH`](super::MAX_CHAIN_DEPTH).
    #[error("the chain of parent snapshots is deeper than {0}")]
    TooDeep(usize),
    /// A parent's geometry differs from the region's.
    #[error("its geometry differs from the region's: it cannot be a parent")]
    GeometryMismatch,
    /// The region to restore into has another size or granule.
    #[error(
        "it holds {data_len} bytes in {granule}-byte granules; the region has {region_len} bytes in {region_granule}-byte granules"
    )]
    RegionMismatch {
        /// The snapshot's data bytes.
        data_len: u64,
        /// Its granule.
        granule: u64,
        /// The region's data bytes.
        region_len: u64,
        /// The region's granule.
        region_granule: u64,
    },
    /// The header's huge page size is none this build knows.
    #[error("unknown huge page shift {0}")]
    HugePageShift(u32),
}

/// Where a snapshot of `data_len` bytes in granules of `1 << granule_shift`
/// keeps its map and data: `(granules, map_offset, data_offset)`, or `None`
/// when the numbers do not fit in 64 bits (a hostile header).
pub(crate) fn geometry(version: u32, granule_shift: u32, data_len: u64) -> Option<(u64, u64, u64)> {
    let granule = 1u64.checked_shl(granule_shift)?;
    let granules = data_len / granule;
    let map_offset = HEADER_LEN;
    let chunk_table = match version {
        VERSION_1 => 0,
        _ => granules.div_ceil(MAP_CHUNK_ENTRIES).checked_mul(4)?,
    };
    let data_offset = granules
        .checked_mul(MAP_ENTRY)?
        .checked_add(map_offset)?
        .checked_add(chunk_table)?
        .checked_next_multiple_of(granule.max(HEADER_LEN))?;
    Some((granules, map_offset, data_offset))
}

impl SnapshotHeader {
    /// The geometry for `data_len` bytes in granules of `1 << granule_shift`.
    pub(crate) fn new(
        backend: BackendKind,
        huge_page_shift: u32,
        granule_shift: u32,
        data_len: u64,
    ) -> Self {
        let (granules, map_offset, data_offset) = geometry(VERSION, granule_shift, data_len)
            .expect("a snapshot's geometry fits in 64 bits (granule shift 12..=30)");
        SnapshotHeader {
            backend,
            huge_page_shift,
            granule_shift,
            data_len,
            granules,
            map_offset,
            data_offset,
            present: 0,
            map_crc: 0,
            version: VERSION,
            parent: None,
            header_crc: 0,
        }
    }

    /// The length a complete snapshot file has, if it fits in 64 bits.
    fn checked_file_len(&self) -> Option<u64> {
        self.data_offset.checked_add(self.data_len)
    }

    /// Where the chunk table starts (version 2): right after the map.
    pub(crate) fn chunk_table_offset(&self) -> u64 {
        self.map_offset + self.granules * MAP_ENTRY
    }

    /// Chunks of the page map.
    pub(crate) fn chunks(&self) -> u64 {
        self.granules.div_ceil(MAP_CHUNK_ENTRIES)
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        1 << self.granule_shift
    }

    /// The length a complete snapshot file has.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.data_len
    }

    /// The encoded header; records its checksum in `header_crc`.
    pub(crate) fn encode(&mut self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        let mut e = Encoder::new(&mut b);
        e.bytes(0, &MAGIC)
            .u32(8, self.version)
            .u32(12, self.backend.code())
            .u32(16, self.huge_page_shift)
            .u32(20, self.granule_shift)
            .u64(24, self.data_len)
            .u64(32, self.granules)
            .u64(40, self.map_offset)
            .u64(48, self.data_offset)
            .u64(56, self.present)
            .u32(64, self.map_crc);
        if let Some(parent) = &self.parent {
            let name = parent.name.as_bytes();
            assert!(name.len() <= MAX_PARENT_NAME, "parent name too long");
            e.u32(72, parent.header_crc)
                .u16(76, name.len() as u16)
                .bytes(78, name);
        }
        self.header_crc = e.seal(CHECKSUM_OFFSET, None);
        b
    }

    /// Decodes and checks a header read from `path`, whose length is
    /// `file_len`.
    pub(crate) fn decode(
        b: &[u8],
        file_len: u64,
        path: &std::path::Path,
    ) -> Result<SnapshotHeader> {
        Self::decode_checked(b, file_len).map_err(|defect| Error::BadSnapshot {
            path: path.to_path_buf(),
            defect,
        })
    }

    fn decode_checked(
        b: &[u8],
        file_len: u64,
    ) -> std::result::Result<SnapshotHeader, SnapshotDefect> {
        if file_len < HEADER_LEN {
            return Err(HeaderDefect::Truncated {
                len: file_len,
                need: HEADER_LEN,
            }
            .into());
        }
        let d = Decoder::new(b, HEADER_LEN as usize)?;
        let version = match d.identify(MAGIC, 8, VERSION) {
            Ok(()) => VERSION,
            Err(HeaderDefect::Version {
                found: VERSION_1, ..
            }) => VERSION_1,
            Err(e) => return Err(e.into()),
        };
        d.check_seal(CHECKSUM_OFFSET, None)?;
        let field = |field, value| HeaderDefect::Field { field, value };
        let name_len = usize::from(d.u16(76));
        let parent = match name_len {
            0 => None,
            n if n <= MAX_PARENT_NAME => Some(ParentRef {
                name: std::str::from_utf8(d.slice(78, n))
                    .map_err(|_| field("parent_name (not UTF-8)", n as u64))?
                    .to_owned(),
                header_crc: d.u32(72),
            }),
            n => return Err(field("parent_name_len", n as u64).into()),
        };
        let backend =
            BackendKind::from_code(d.u32(12)).ok_or(field("backend", u64::from(d.u32(12))))?;
        let h = SnapshotHeader {
            backend,
            huge_page_shift: d.u32(16),
            granule_shift: d.u32(20),
            data_len: d.u64(24),
            granules: d.u64(32),
            map_offset: d.u64(40),
            data_offset: d.u64(48),
            present: d.u64(56),
            map_crc: d.u32(64),
            version,
            parent,
            header_crc: d.u32(CHECKSUM_OFFSET),
        };
        if !(12..=30).contains(&h.granule_shift) {
            return Err(field("granule_shift", u64::from(h.granule_shift)).into());
        }
        let consistent = h.data_len % h.granule() == 0
            && geometry(h.version, h.granule_shift, h.data_len)
                == Some((h.granules, h.map_offset, h.data_offset))
            && h.present <= h.granules
            && h.checked_file_len().is_some();
        if !consistent {
            return Err(HeaderDefect::Inconsistent(
                "geometry (sizes, counts and offsets) that does not follow from the data length",
            )
            .into());
        }
        if file_len != h.file_len() {
            return Err(SnapshotDefect::Length {
                len: file_len,
                expected: h.file_len(),
            });
        }
        Ok(h)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn geometry_that_overflows_is_an_error_even_with_a_valid_checksum() {
        let p = Path::new("snap");
        for (shift, data_len) in [(63, 1 << 63), (12, !4095), (30, u64::MAX << 30)] {
            let mut h = SnapshotHeader::new(BackendKind::Shmem, 21, 12, 0);
            h.granule_shift = shift;
            h.data_len = data_len;
            h.granules = data_len >> shift;
            let b = h.encode();
            let err = SnapshotHeader::decode(&b, 1 << 20, p).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("geometry") || text.contains("granule_shift"),
                "{text}"
            );
        }
    }

    #[test]
    fn headers_round_trip_and_damage_is_named() {
        let mut h = SnapshotHeader::new(BackendKind::ShmemThp, 21, 12, 64 << 20);
        h.present = 17;
        h.map_crc = 0xDEAD_BEEF;
        h.parent = Some(ParentRef {
            name: "base.snap".into(),
            header_crc: 42,
        });
        let b = h.encode();
        let p = Path::new("snap");
        assert_eq!(SnapshotHeader::decode(&b, h.file_len(), p).unwrap(), h);
        let err = SnapshotHeader::decode(&b, h.file_len() - 1, p).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut v = b;
        v[8] = 9;
        assert!(
            SnapshotHeader::decode(&v, h.file_len(), p)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        let mut c = b;
        c[80] ^= 1;
        assert!(
            SnapshotHeader::decode(&c, h.file_len(), p)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        let mut m = b;
        m[0] = b'X';
        assert!(
            SnapshotHeader::decode(&m, h.file_len(), p)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
    }
}
