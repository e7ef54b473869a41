//! The region header: encoded and decoded as bytes at fixed little-endian
//! offsets, so reading it needs no unsafe code and no trust in the file.
//!
//! ```text
//!  0 magic "HUGEAREN"      32 data_len         72 creator_pid
//!  8 version (u32)         40 states_offset    80 created (Unix ms)
//! 12 state (u32, atomic)   48 states_len       88 checksum (FNV-1a of all
//! 16 backend code (u32)    56 data_offset         other bytes in 0..88,
//! 20 huge page shift       64 file_len            state excluded)
//! 24 granule shift
//! 28 reserved (0)
//! ```
//!
//! The creator writes everything with `state = INITIALISING`, then stores
//! `READY` with release ordering; openers load `state` with acquire
//! ordering before trusting the rest.
#![deny(unsafe_code)]

use std::path::Path;

use super::layout::Layout;
use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::sys::size::PageSize;

/// Identifies a hugearena region file.
pub(crate) const MAGIC: [u8; 8] = *b"HUGEAREN";
/// The format version this build writes and reads.
pub(crate) const VERSION: u32 = 1;
/// Bytes of encoded header.
pub(crate) const ENCODED_LEN: usize = 96;
/// Offset of the atomic `state` word.
pub(super) const STATE_OFFSET: usize = 12;
/// `state` while the creator is still initialising.
pub(crate) const INITIALISING: u32 = 0;
/// `state` once the region may be opened.
pub(crate) const READY: u32 = 1;

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
        out[0..8].copy_from_slice(&MAGIC);
        put32(&mut out, 8, VERSION);
        put32(&mut out, STATE_OFFSET, INITIALISING);
        put32(&mut out, 16, b.kind().code());
        put32(&mut out, 20, b.mapping_unit().shift());
        put32(&mut out, 24, b.granule().shift());
        put64(&mut out, 32, l.data_len());
        put64(&mut out, 40, l.states_offset());
        put64(&mut out, 48, l.states_len());
        put64(&mut out, 56, l.data_offset());
        put64(&mut out, 64, l.file_len());
        put64(&mut out, 72, u64::from(self.creator_pid));
        put64(&mut out, 80, self.created_unix_ms);
        let sum = checksum(&out);
        put64(&mut out, 88, sum);
        out
    }

    /// Decodes and validates `bytes` read from `path` (used in messages).
    /// `state` is the value of the state word, loaded with acquire ordering.
    pub(crate) fn decode(bytes: &[u8; ENCODED_LEN], state: u32, path: &Path) -> Result<Header> {
        let path_buf = || path.to_path_buf();
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(Error::BadMagic {
                path: path_buf(),
                found: magic,
            });
        }
        let version = get32(bytes, 8);
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                path: path_buf(),
                found: version,
                expected: VERSION,
            });
        }
        if state != READY {
            return Err(Error::NotReady { path: path_buf() });
        }
        let corrupt = |what: String| Error::CorruptHeader {
            path: path_buf(),
            what,
        };
        if checksum(bytes) != get64(bytes, 88) {
            return Err(corrupt("checksum mismatch".into()));
        }
        if get32(bytes, 28) != 0 {
            return Err(corrupt("reserved bytes are not zero".into()));
        }
        let creator_pid = u32::try_from(get64(bytes, 72))
            .map_err(|_| corrupt(format!("creator pid {} is out of range", get64(bytes, 72))))?;
        let kind = BackendKind::from_code(get32(bytes, 16))
            .ok_or_else(|| corrupt(format!("unknown backend code {}", get32(bytes, 16))))?;
        let huge = page_size_of_shift(get32(bytes, 20))
            .ok_or_else(|| corrupt(format!("bad huge page shift {}", get32(bytes, 20))))?;
        let backend = Backend::new(kind, huge);
        if backend.granule().shift() != get32(bytes, 24) || backend.mapping_unit() != huge {
            return Err(corrupt("granule does not match the backend".into()));
        }
        let layout = Layout::new(backend, get64(bytes, 32)).map_err(|e| corrupt(e.to_string()))?;
        let recorded = (
            get64(bytes, 40),
            get64(bytes, 48),
            get64(bytes, 56),
            get64(bytes, 64),
        );
        let expected = (
            layout.states_offset(),
            layout.states_len(),
            layout.data_offset(),
            layout.file_len(),
        );
        if recorded != expected {
            return Err(corrupt(format!(
                "layout {recorded:?} differs from the one its size implies {expected:?}"
            )));
        }
        Ok(Header {
            layout,
            creator_pid,
            created_unix_ms: get64(bytes, 80),
        })
    }
}

fn page_size_of_shift(shift: u32) -> Option<PageSize> {
    PageSize::ALL.into_iter().find(|p| p.shift() == shift)
}

/// FNV-1a over bytes 0..88, with the state word read as zero.
fn checksum(bytes: &[u8; ENCODED_LEN]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &byte) in bytes[..88].iter().enumerate() {
        let byte = if (STATE_OFFSET..STATE_OFFSET + 4).contains(&i) {
            0
        } else {
            byte
        };
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn get64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Test support: build header bytes with chosen damage.
#[cfg(test)]
pub(crate) fn put32_for_tests(buf: &mut [u8], at: usize, v: u32) {
    put32(buf, at, v)
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
        put32_for_tests(&mut bad, 8, 99);
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
