//! Region headers come from files other processes wrote, and sizes come
//! from users. Two modes, picked by the first byte:
//! - raw: decoding any bytes returns a header or an error, never panics, and
//!   whatever decodes re-encodes to the same bytes;
//! - structured: any backend and size either lays out or errors, and a
//!   layout survives encode → decode unchanged.
#![no_main]

use std::path::Path;

use hugearena::region::{HEADER_ENCODED_LEN, Header, Layout, READY};
use hugearena::{Backend, BackendKind, PageSize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut bytes = [0u8; HEADER_ENCODED_LEN];
        let n = rest.len().min(bytes.len());
        bytes[..n].copy_from_slice(&rest[..n]);
        if let Ok(header) = Header::decode(&bytes, READY, Path::new("fuzz")) {
            let mut again = header.encode();
            // encode() writes the state word as INITIALISING; the input said READY.
            again[12..16].copy_from_slice(&bytes[12..16]);
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
    let Ok(layout) = Layout::new(Backend::new(kind, huge), size) else {
        return;
    };
    assert!(layout.data_offset() >= layout.states_offset() + layout.states_len());
    assert_eq!(layout.file_len(), layout.data_offset() + size);
    let header = Header {
        layout,
        creator_pid: 1,
        created_unix_ms: 2,
    };
    let decoded = Header::decode(&header.encode(), READY, Path::new("fuzz")).unwrap();
    assert_eq!(decoded, header);
});
