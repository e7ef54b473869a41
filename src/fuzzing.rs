//! Internals the fuzz targets drive directly (the `fuzzing` feature only;
//! not part of the API).

pub use crate::backend::Backend;
pub use crate::persist::format::{HEADER_LEN as SNAPSHOT_HEADER_LEN, ParentRef, SnapshotHeader};
pub use crate::region::{HEADER_ENCODED_LEN, Header, Layout, READY};

/// Bytes of an arena's tables (the words a damaged-table fuzzer patches).
pub fn arena_meta_len(arena: &crate::Arena) -> u64 {
    arena.layout().meta_len
}
