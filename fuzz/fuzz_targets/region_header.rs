//! Region headers come from files other processes wrote, and sizes come
//! from users. Two modes, picked by the first byte:
//! - raw: decoding any bytes returns a header or an error, never panics, and
//!   whatever decodes re-encodes to the same bytes;
//! - structured: any backend and size either lays out or errors, and a
//!   layout survives encode → decode unchanged.
#![no_main]

use hugearena::fuzzing::{REGION_HEADER_LEN, region_header_reencoded, region_header_round_trips};
use hugearena::{Backend, BackendKind, PageSize, RegionLayout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut bytes = [0u8; REGION_HEADER_LEN];
        let n = rest.len().min(bytes.len());
        bytes[..n].copy_from_slice(&rest[..n]);
        if let Some(again) = region_header_reencoded(&bytes) {
            assert_eq!(again, bytes);
        }
        return;
    }
    if rest.len() < 9 {
        return;
    }
    let kind = BackendKind::ALL[rest[0] as usize % BackendKind::ALL.len()];
    let huge = if rest[0] & 0x80 == 0 {
        PageSize::Huge2M
    } else {
        PageSize::Huge1G
    };
    let size = u64::from_le_bytes(rest[1..9].try_into().unwrap());
    let Ok(layout) = RegionLayout::new(Backend::new(kind, huge), size) else {
        return;
    };
    assert!(layout.data_offset() >= layout.states_offset() + layout.states_len());
    assert_eq!(layout.file_len(), layout.data_offset() + size);
    assert!(region_header_round_trips(layout));
});
