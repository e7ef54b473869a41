//! Entry points for the fuzz targets into decoders that are not part of the
//! API (the `fuzzing` feature only).

use std::path::Path;

use crate::region::RegionLayout;
use crate::region::header::{ENCODED_LEN as HEADER_ENCODED_LEN, Header, READY};

/// Bytes of an encoded region header.
pub const REGION_HEADER_LEN: usize = HEADER_ENCODED_LEN;

/// Decodes `bytes` as a ready region header; if that succeeds, returns the
/// header encoded again (with the input's state word), which must equal
/// the input.
pub fn region_header_reencoded(bytes: &[u8; REGION_HEADER_LEN]) -> Option<[u8; REGION_HEADER_LEN]> {
    let header = Header::decode(bytes, READY, Path::new("fuzz")).ok()?;
    let mut again = header.encode();
    // `encode` writes the state word as INITIALISING; the input said READY.
    again[12..16].copy_from_slice(&bytes[12..16]);
    Some(again)
}

/// Whether a header for `layout` decodes back to itself.
pub fn region_header_round_trips(layout: RegionLayout) -> bool {
    let header = Header {
        layout,
        creator_pid: 1,
        created_unix_ms: 2,
    };
    Header::decode(&header.encode(), READY, Path::new("fuzz")).is_ok_and(|h| h == header)
}

/// Encodes a snapshot header as written (computing its checksum), for
/// forging files with valid checksums.
pub fn snapshot_header_encoded(header: &mut crate::persist::SnapshotHeader) -> Vec<u8> {
    header.encode().to_vec()
}

/// Decodes and checks a snapshot header read from a file of `file_len`
/// bytes.
pub fn snapshot_header_decoded(
    bytes: &[u8],
    file_len: u64,
) -> Option<crate::persist::SnapshotHeader> {
    crate::persist::SnapshotHeader::decode(bytes, file_len, Path::new("fuzz")).ok()
}

/// A snapshot header with every field zero but the backend.
pub fn blank_snapshot_header(backend: crate::BackendKind) -> crate::persist::SnapshotHeader {
    crate::persist::SnapshotHeader::new(backend, 21, 12, 0)
}

/// Where a snapshot of this format version, granule and size keeps its
/// map and data: `(granules, map_offset, data_offset)`.
pub fn snapshot_geometry(
    version: u32,
    granule_shift: u32,
    data_len: u64,
) -> Option<(u64, u64, u64)> {
    crate::persist::format::geometry(version, granule_shift, data_len)
}
