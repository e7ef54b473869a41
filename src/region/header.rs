//! The region header, in the on-disk header codec (`crate::codec`):
//!
//! ```text
//!  0 magic "HUGEAREN"      32 data_len         72 creator_pid
//!  8 version (u32) = 2     40 states_offset    80 created (Unix ms)
//! 12 state (u32, atomic)   48 states_len       88 reserved (0)
//! 16 backend code (u32)    56 data_offset
//! 20 huge page shift       64 file_len
//! 24 granule shift
//! 28 checksum (CRC-32C of bytes 0..96, checksum and state read as zero)
//! ```
//!
//! The creator writes everything with `state = INITIALISING`, then stores
//! `READY` with release ordering; openers load `state` with acquire
//! ordering before trusting the rest.
#![deny(unsafe_code)]

use std::path::Path;

use super::layout::Layout;
use crate::backend::{Backend, BackendKind};
use crate::codec::{Decoder, Encoder, HeaderDefect};
use crate::error::{Error, Result};
use crate::sys::size::PageSize;

/// Identifies a hugearena region file.
pub(crate) const MAGIC: [u8; 8] = *b"HUGEAREN";
/// The format version this build writes and reads (1 had an FNV-1a sum).
pub(crate) const VERSION: u32 = 2;
/// Bytes of encoded header.
pub(crate) const ENCODED_LEN: usize = 96;
/// Offset of the atomic `state` word.
pub(super) const STATE_OFFSET: usize = 12;
/// Offset of the checksum.
const CHECKSUM_OFFSET: usize = 28;
/// `state` while the creator is still initialising.
pub(crate) const INITIALISING: u32 = 0;
/// `state` once the region may be opened.
pub(crate) const READY: u32 = 1;

/// The state word changes after the header is sealed.
const LIVE: Option<std::ops::Range<usize>> = Some(STATE_OFFSET..STATE_OFFSET + 4);

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The layout (and so the backend) of the region.
    pub layout: Layout,
    /// The process that created the region.
    pub creator_pid: u32,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
}

impl Header {
    /// Encodes the header with `state = INITIALISING`.
    pub(crate) fn encode(&self) -> [u8; ENCODED_LEN] {
        let l = &self.layout;
        let b = l.backend();
        let mut out = [0u8; ENCODED_LEN];
        Encoder::new(&mut out)
            .bytes(0, &MAGIC)
            .u32(8, VERSION)
            .u32(STATE_OFFSET, INITIALISING)
            .u32(16, b.kind().code())
            .u32(20, b.mapping_unit().shift())
            .u32(24, b.granule().shift())
            .u64(32, l.data_len())
            .u64(40, l.states_offset())
            .u64(48, l.states_len())
            .u64(56, l.data_offset())
            .u64(64, l.file_len())
            .u64(72, u64::from(self.creator_pid))
            .u64(80, self.created_unix_ms)
            .seal(CHECKSUM_OFFSET, LIVE);
        out
    }

    /// Decodes and validates `bytes` read from `path` (used in messages).
    /// `state` is the value of the state word, loaded with acquire ordering.
    pub(crate) fn decode(bytes: &[u8; ENCODED_LEN], state: u32, path: &Path) -> Result<Header> {
        let path_buf = || path.to_path_buf();
        let d = Decoder::new(bytes, ENCODED_LEN).map_err(corrupt(path))?;
        match d.identify(MAGIC, 8, VERSION) {
            Ok(()) => {}
            Err(HeaderDefect::Magic { found }) => {
                return Err(Error::BadMagic {
                    path: path_buf(),
                    found,
                });
            }
            Err(HeaderDefect::Version { found, supported }) => {
                return Err(Error::UnsupportedVersion {
                    path: path_buf(),
                    found,
                    expected: supported,
                });
            }
            Err(other) => return Err(corrupt(path)(other)),
        }
        if state != READY {
            return Err(Error::NotReady { path: path_buf() });
        }
        Self::decode_fields(d).map_err(corrupt(path))
    }

    fn decode_fields(d: Decoder<'_>) -> std::result::Result<Header, HeaderDefect> {
        d.check_seal(CHECKSUM_OFFSET, LIVE)?;
        let field = |field, value| HeaderDefect::Field { field, value };
        if d.u64(88) != 0 {
            return Err(field("reserved", d.u64(88)));
        }
        let creator_pid = u32::try_from(d.u64(72)).map_err(|_| field("creator_pid", d.u64(72)))?;
        let kind =
            BackendKind::from_code(d.u32(16)).ok_or(field("backend", u64::from(d.u32(16))))?;
        let huge =
            page_size_of_shift(d.u32(20)).ok_or(field("huge_page_shift", u64::from(d.u32(20))))?;
        let backend = Backend::new(kind, huge);
        if backend.granule().shift() != d.u32(24) || backend.mapping_unit() != huge {
            return Err(field("granule_shift", u64::from(d.u32(24))));
        }
        let layout = Layout::new(backend, d.u64(32)).map_err(|_| field("data_len", d.u64(32)))?;
        let recorded = (d.u64(40), d.u64(48), d.u64(56), d.u64(64));
        let expected = (
            layout.states_offset(),
            layout.states_len(),
            layout.data_offset(),
            layout.file_len(),
        );
        if recorded != expected {
            return Err(HeaderDefect::Inconsistent(
                "the table and data offsets differ from the ones the size implies",
            ));
        }
        Ok(Header {
            layout,
            creator_pid,
            created_unix_ms: d.u64(80),
        })
    }
}

fn corrupt(path: &Path) -> impl Fn(HeaderDefect) -> Error + '_ {
    move |defect| Error::CorruptHeader {
        path: path.to_path_buf(),
        defect,
    }
}

fn page_size_of_shift(shift: u32) -> Option<PageSize> {
    PageSize::ALL.into_iter().find(|p| p.shift() == shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            layout: Layout::new(
                Backend::new(BackendKind::ShmemThp, PageSize::Huge2M),
                64 << 20,
            )
            .unwrap(),
            creator_pid: 42,
            created_unix_ms: 1,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(
            Header::decode(&h.encode(), READY, Path::new("x")).unwrap(),
            h
        );
    }

    #[test]
    fn damage_is_named() {
        let p = Path::new("x");
        let good = sample().encode();
        assert!(matches!(
            Header::decode(&good, INITIALISING, p),
            Err(Error::NotReady { .. })
        ));
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad, READY, p),
            Err(Error::BadMagic { .. })
        ));
        let mut bad = good;
        bad[8..12].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&bad, READY, p),
            Err(Error::UnsupportedVersion { found: 99, .. })
        ));
        let mut bad = good;
        bad[33] ^= 1;
        assert!(matches!(
            Header::decode(&bad, READY, p),
            Err(Error::CorruptHeader { .. })
        ));
    }
}
