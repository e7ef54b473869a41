//! Snapshot files come from disk, where anything can happen to them. Any
//! file either opens as a snapshot or gives an error before anything is
//! mapped, and the pages of one that opens fill or fail, never panic, hang
//! or allocate by a size the file claims. Two modes, picked by the first
//! byte:
//! - raw: the input is the file;
//! - forged: the input chooses every header field (geometry, offsets,
//!   counts, parent reference), the header checksum is made right (and the
//!   map checksum too, when the input says so), and the input's tail is the
//!   page map and data, with the file extended sparsely to the length the
//!   header claims when that is modest. This reaches the checks that come
//!   after the checksums: a hostile file with valid checksums.
#![no_main]

use std::io::Write;

use hugearena::BackendKind;
use hugearena::persist::SnapshotSource;
use hugearena::fuzzing::{
    blank_snapshot_header, snapshot_geometry, snapshot_header_decoded, snapshot_header_encoded,
};
use hugearena::persist::{HEADER_LEN, ParentRef};
use hugearena::populate::PageSource;
use libfuzzer_sys::fuzz_target;

/// Files longer than this are not extended to the length a header claims.
const SPARSE_LIMIT: u64 = 1 << 32;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

fn forge(input: &[u8]) -> Vec<u8> {
    let kinds = BackendKind::ALL;
    let kind = kinds[input.first().copied().unwrap_or(0) as usize % kinds.len()];
    let flags = input.get(1).copied().unwrap_or(0);
    let granule_shift = [12, 21, 30, u32::from(flags >> 3)][usize::from(flags & 3)];
    let huge_shift = [21, 30, 12, u32::from(flags >> 2)][usize::from(flags >> 6)];
    // Small data lengths mostly, so the forged file can hold its pages.
    let data_len = match flags & 4 {
        0 => u64_at(input, 2) % (64 << 20),
        _ => u64_at(input, 2),
    };
    // The geometry a writer would give these, computed here without
    // overflow (`SnapshotHeader::new` expects sane input), then each field
    // kept or replaced below.
    let mut h = blank_snapshot_header(kind);
    h.huge_page_shift = huge_shift;
    h.granule_shift = granule_shift;
    h.data_len = data_len;
    // Either format version: 1 (whole map checked at open) or 2 (chunk
    // table; the map checked chunk by chunk on fill).
    h.version = if flags & 0x10 != 0 { 1 } else { 2 };
    if let Some((granules, _, data_offset)) = snapshot_geometry(h.version, granule_shift, data_len)
    {
        (h.granules, h.data_offset) = (granules, data_offset);
    }
    // Each field kept, or replaced by the input.
    let pick = |field: u64, at: usize| {
        if input.get(at).is_some_and(|b| b & 1 == 1) {
            u64_at(input, at + 1)
        } else {
            field
        }
    };
    h.granules = pick(h.granules, 10);
    h.map_offset = pick(h.map_offset, 19);
    h.data_offset = pick(h.data_offset, 28);
    h.present = pick(h.present, 37);
    if input.get(46).is_some_and(|b| b & 1 == 1) {
        let len = usize::from(input.get(47).copied().unwrap_or(0)) % 64;
        let name: String = input
            .iter()
            .skip(48)
            .take(len)
            .map(|&b| char::from(b'a' + b % 26))
            .collect();
        h.parent = Some(ParentRef {
            name,
            header_crc: u64_at(input, 112) as u32,
        });
    }
    let tail = input.get(120..).unwrap_or(&[]);
    let map_len = (h.granules.saturating_mul(8)).min(tail.len() as u64) as usize;
    if flags & 0x20 != 0 {
        h.map_crc = crc32c::crc32c(&tail[..map_len]);
    }
    let mut file = snapshot_header_encoded(&mut h);
    let at = h.map_offset.min(1 << 20) as usize;
    file.resize(file.len().max(at), 0);
    file.truncate(at.max(HEADER_LEN as usize));
    file.extend_from_slice(tail);
    file
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (bytes, claimed) = if mode & 1 == 0 {
        (rest.to_vec(), 0)
    } else {
        let bytes = forge(rest);
        let claimed = snapshot_header_decoded(&bytes[..HEADER_LEN as usize], u64::MAX)
            .map_or(0, |h| h.file_len());
        (bytes, claimed)
    };
    let dir = std::env::temp_dir();
    let path = dir.join(format!("hugearena-fuzz-snapshot-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("temporary file");
    f.write_all(&bytes).expect("write the input");
    if claimed > bytes.len() as u64 && claimed <= SPARSE_LIMIT {
        f.set_len(claimed).expect("extend sparsely");
    }
    drop(f);
    if let Ok(source) = SnapshotSource::open(&path) {
        let h = source.header();
        let _ = source.region_options();
        let g = h.granule() as usize;
        if g <= 2 << 20 {
            let mut buf = vec![0u8; g];
            for index in [
                0,
                1,
                h.granules / 2,
                h.granules.saturating_sub(1),
                h.granules,
            ] {
                let _ = source.is_zero(index);
                let _ = source.fill(index, &mut buf);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
