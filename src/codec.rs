//! The one codec of the on-disk headers (the region file's and the
//! snapshot's): fields at fixed little-endian offsets, one CRC-32C over the
//! encoded header with its checksum field (and any word that changes after
//! sealing, such as the region's state) read as zero, and typed reasons
//! when decoding fails. Reading needs no unsafe code and no trust in the
//! file: every field is read from a buffer whose length was checked first.
//!
//! (The arena's header is different in kind: live words that several
//! processes update atomically, checked by the arena when it attaches.)

use std::ops::Range;

/// Why a header did not decode. Small and `Copy`, with the values found,
/// so an error names exactly what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderDefect {
    /// Fewer bytes than a header holds.
    #[error("truncated: {len} bytes, shorter than the {need}-byte header")]
    Truncated {
        /// Bytes available.
        len: u64,
        /// Bytes a header needs.
        need: u64,
    },
    /// The magic bytes are not this format's.
    #[error("wrong magic bytes {found:02x?}")]
    Magic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// A version this build does not read.
    #[error("format version {found}; this build reads version {supported}")]
    Version {
        /// The version found.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The checksum does not match the bytes.
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is corrupt"
    )]
    Checksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// A field holds a value that cannot be right.
    #[error("field `{field}` holds {value:#x}, which is invalid")]
    Field {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// Fields contradict each other (sizes and offsets that do not follow
    /// from the geometry, say).
    #[error("inconsistent header: {0}")]
    Inconsistent(&'static str),
}

/// Writes fields into a header buffer, then seals it with its checksum.
pub(crate) struct Encoder<'a> {
    buf: &'a mut [u8],
}

impl<'a> Encoder<'a> {
    /// Starts encoding into a zeroed `buf`.
    pub(crate) fn new(buf: &'a mut [u8]) -> Encoder<'a> {
        buf.fill(0);
        Encoder { buf }
    }

    pub(crate) fn bytes(&mut self, at: usize, bytes: &[u8]) -> &mut Self {
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    pub(crate) fn u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.bytes(at, &v.to_le_bytes())
    }

    pub(crate) fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.bytes(at, &v.to_le_bytes())
    }

    pub(crate) fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.bytes(at, &v.to_le_bytes())
    }

    /// Computes the checksum (see [`checksum`]) and stores it at `crc_at`;
    /// returns it.
    pub(crate) fn seal(&mut self, crc_at: usize, live: Option<Range<usize>>) -> u32 {
        let crc = checksum(self.buf, crc_at, live);
        self.u32(crc_at, crc);
        crc
    }
}

/// Reads fields from a header buffer of a checked length.
#[derive(Clone, Copy)]
pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder over the first `len` bytes of `buf`, or `Truncated`.
    pub(crate) fn new(buf: &'a [u8], len: usize) -> Result<Decoder<'a>, HeaderDefect> {
        buf.get(..len)
            .map(|buf| Decoder { buf })
            .ok_or(HeaderDefect::Truncated {
                len: buf.len() as u64,
                need: len as u64,
            })
    }

    pub(crate) fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[at..at + N]);
        out
    }

    pub(crate) fn slice(&self, at: usize, len: usize) -> &'a [u8] {
        &self.buf[at..at + len]
    }

    pub(crate) fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.bytes(at))
    }

    pub(crate) fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes(at))
    }

    pub(crate) fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(at))
    }

    /// Checks the magic bytes at offset 0 and the version word at
    /// `version_at`.
    pub(crate) fn identify(
        &self,
        magic: [u8; 8],
        version_at: usize,
        version: u32,
    ) -> Result<(), HeaderDefect> {
        let found = self.bytes::<8>(0);
        if found != magic {
            return Err(HeaderDefect::Magic { found });
        }
        match self.u32(version_at) {
            v if v == version => Ok(()),
            found => Err(HeaderDefect::Version {
                found,
                supported: version,
            }),
        }
    }

    /// Checks the checksum stored at `crc_at` (see [`checksum`]).
    pub(crate) fn check_seal(
        &self,
        crc_at: usize,
        live: Option<Range<usize>>,
    ) -> Result<(), HeaderDefect> {
        let stored = self.u32(crc_at);
        let computed = checksum(self.buf, crc_at, live);
        if stored == computed {
            Ok(())
        } else {
            Err(HeaderDefect::Checksum { stored, computed })
        }
    }
}

/// CRC-32C of `buf` with the 4-byte checksum field at `crc_at` and the
/// `live` bytes (a word updated after sealing, at most 8 bytes, apart from
/// the checksum) read as zero.
fn checksum(buf: &[u8], crc_at: usize, live: Option<Range<usize>>) -> u32 {
    const ZEROS: [u8; 8] = [0; 8];
    let crc_field = crc_at..crc_at + 4;
    let (first, second) = match live {
        Some(live) if live.start < crc_at => (live, Some(crc_field)),
        Some(live) => (crc_field, Some(live)),
        None => (crc_field, None),
    };
    let mut crc = 0;
    let mut at = 0;
    for hole in std::iter::once(first).chain(second) {
        crc = crc32c::crc32c_append(crc, &buf[at..hole.start]);
        crc = crc32c::crc32c_append(crc, &ZEROS[..hole.len()]);
        at = hole.end;
    }
    crc32c::crc32c_append(crc, &buf[at..])
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn sealed_headers_check_and_damage_is_named() {
        let mut buf = [0u8; 64];
        let mut e = Encoder::new(&mut buf);
        e.bytes(0, b"TESTMAGC").u32(8, 3).u64(16, 0xDEAD_BEEF);
        e.seal(24, Some(12..16));
        let d = Decoder::new(&buf, 64).unwrap();
        d.identify(*b"TESTMAGC", 8, 3).unwrap();
        d.check_seal(24, Some(12..16)).unwrap();
        assert_eq!(d.u64(16), 0xDEAD_BEEF);
        // The live word may change after sealing; nothing else may.
        let mut live = buf;
        live[13] = 7;
        Decoder::new(&live, 64)
            .unwrap()
            .check_seal(24, Some(12..16))
            .unwrap();
        let mut bad = buf;
        bad[40] ^= 1;
        assert!(matches!(
            Decoder::new(&bad, 64).unwrap().check_seal(24, Some(12..16)),
            Err(HeaderDefect::Checksum { .. })
        ));
        assert_eq!(
            Decoder::new(&buf, 100).err(),
            Some(HeaderDefect::Truncated { len: 64, need: 100 })
        );
        assert_eq!(
            d.identify(*b"OTHERMAG", 8, 3).unwrap_err().to_string(),
            "wrong magic bytes [54, 45, 53, 54, 4d, 41, 47, 43]"
        );
        assert!(
            d.identify(*b"TESTMAGC", 8, 4)
                .unwrap_err()
                .to_string()
                .contains("version 3")
        );
    }
}
