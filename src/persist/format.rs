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
use crate::error::{Error, Result};

/// The first 8 bytes of a snapshot.
pub(crate) const MAGIC: [u8; 8] = *b"HASNAP\0\x01";
/// The format version this build writes and reads.
pub(crate) const VERSION: u32 = 1;
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
    /// crc32c of the page map.
    pub map_crc: u32,
    /// The parent, for an incremental snapshot.
    pub parent: Option<ParentRef>,
    /// The header's own checksum (set by `encode` and `decode`).
    pub header_crc: u32,
}

/// Where a snapshot of `data_len` bytes in granules of `1 << granule_shift`
/// keeps its map and data: `(granules, map_offset, data_offset)`, or `None`
/// when the numbers do not fit in 64 bits (a hostile header).
fn geometry(granule_shift: u32, data_len: u64) -> Option<(u64, u64, u64)> {
    let granule = 1u64.checked_shl(granule_shift)?;
    let granules = data_len / granule;
    let map_offset = HEADER_LEN;
    let data_offset = granules
        .checked_mul(MAP_ENTRY)?
        .checked_add(map_offset)?
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
        let (granules, map_offset, data_offset) = geometry(granule_shift, data_len)
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
            parent: None,
            header_crc: 0,
        }
    }

    /// The length a complete snapshot file has, if it fits in 64 bits.
    fn checked_file_len(&self) -> Option<u64> {
        self.data_offset.checked_add(self.data_len)
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
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.backend.code().to_le_bytes());
        b[16..20].copy_from_slice(&self.huge_page_shift.to_le_bytes());
        b[20..24].copy_from_slice(&self.granule_shift.to_le_bytes());
        for (at, v) in [
            (24, self.data_len),
            (32, self.granules),
            (40, self.map_offset),
            (48, self.data_offset),
            (56, self.present),
        ] {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[64..68].copy_from_slice(&self.map_crc.to_le_bytes());
        if let Some(parent) = &self.parent {
            let name = parent.name.as_bytes();
            assert!(name.len() <= MAX_PARENT_NAME, "parent name too long");
            b[72..76].copy_from_slice(&parent.header_crc.to_le_bytes());
            b[76..78].copy_from_slice(&(name.len() as u16).to_le_bytes());
            b[78..78 + name.len()].copy_from_slice(name);
        }
        self.header_crc = crc32c::crc32c(&b);
        b[68..72].copy_from_slice(&self.header_crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header read from `path`, whose length is
    /// `file_len`.
    pub(crate) fn decode(
        b: &[u8],
        file_len: u64,
        path: &std::path::Path,
    ) -> Result<SnapshotHeader> {
        let bad = |reason: String| Error::BadSnapshot {
            path: path.to_path_buf(),
            reason,
        };
        if b.len() < HEADER_LEN as usize || file_len < HEADER_LEN {
            return Err(bad(format!(
                "truncated: {file_len} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        if b[0..8] != MAGIC {
            return Err(bad("wrong magic: not a hugearena snapshot".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {VERSION}"
            )));
        }
        let mut zeroed = b[..HEADER_LEN as usize].to_vec();
        zeroed[68..72].fill(0);
        let header_crc = u32_at(68);
        if crc32c::crc32c(&zeroed) != header_crc {
            return Err(bad("header checksum mismatch: the header is corrupt".into()));
        }
        let name_len = u16::from_le_bytes([b[76], b[77]]) as usize;
        let parent = match name_len {
            0 => None,
            n if n <= MAX_PARENT_NAME => Some(ParentRef {
                name: String::from_utf8(b[78..78 + n].to_vec())
                    .map_err(|_| bad("the parent's name is not UTF-8".into()))?,
                header_crc: u32_at(72),
            }),
            n => return Err(bad(format!("parent name of {n} bytes"))),
        };
        let backend = BackendKind::from_code(u32_at(12))
            .ok_or_else(|| bad(format!("unknown backend code {}", u32_at(12))))?;
        let h = SnapshotHeader {
            backend,
            huge_page_shift: u32_at(16),
            granule_shift: u32_at(20),
            data_len: u64_at(24),
            granules: u64_at(32),
            map_offset: u64_at(40),
            data_offset: u64_at(48),
            present: u64_at(56),
            map_crc: u32_at(64),
            parent,
            header_crc,
        };
        let consistent = (12..=30).contains(&h.granule_shift)
            && h.data_len % h.granule() == 0
            && geometry(h.granule_shift, h.data_len)
                == Some((h.granules, h.map_offset, h.data_offset))
            && h.present <= h.granules
            && h.checked_file_len().is_some();
        if !consistent {
            return Err(bad("inconsistent geometry in the header".into()));
        }
        if file_len != h.file_len() {
            return Err(bad(format!(
                "{} bytes: a snapshot of {} bytes of data is {} bytes long (truncated or extended)",
                file_len,
                h.data_len,
                h.file_len()
            )));
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
            assert!(err.to_string().contains("geometry"), "{err}");
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
