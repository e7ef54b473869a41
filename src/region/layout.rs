//! Where things live in a region's file, and the header that records it.
//!
//! ```text
//! file offset 0                 states_offset        data_offset                 file_len
//! | header (4 KiB) | pad        | page states: one u64 | pad to mapping unit | data ...       |
//! |<------------------------ metadata (mapped plainly) --------------->|<- primary/alias ->|
//! ```
//!
//! The metadata is a whole number of mapping units (huge pages for the
//! hugetlb backends, 2 MiB for ShmemThp, 4 KiB for Shmem), so the data area
//! starts aligned in the file and in memory, and huge pages never straddle
//! metadata and data.
#![deny(unsafe_code)]

use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::sys::size::PageSize;

/// Bytes reserved for the header at the start of the file.
pub(crate) const HEADER_BYTES: u64 = 4096;
/// The largest data area a region accepts (64 TiB).
pub(crate) const MAX_DATA_LEN: u64 = 1 << 46;
/// Bytes of page-state table per granule.
pub(super) const STATE_BYTES: u64 = 8;

/// The file layout of a region. Every offset is a multiple of the backend's
/// mapping unit except `states_offset`, which follows the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    backend: Backend,
    data_len: u64,
    states_offset: u64,
    states_len: u64,
    data_offset: u64,
    file_len: u64,
}

impl Layout {
    /// Lays out a region of `data_len` bytes of data on `backend`.
    pub fn new(backend: Backend, data_len: u64) -> Result<Layout> {
        let unit = size_unit(backend);
        if data_len == 0 {
            return Err(Error::ZeroSize { granule: unit });
        }
        if data_len > MAX_DATA_LEN {
            return Err(Error::SizeTooLarge {
                size: data_len,
                max: MAX_DATA_LEN,
            });
        }
        if !unit.divides(data_len as usize) {
            return Err(Error::SizeNotGranuleMultiple {
                size: data_len,
                backend: backend.kind(),
                granule: unit,
                rounded: unit
                    .round_up(data_len as usize)
                    .expect("bounded by MAX_DATA_LEN") as u64,
            });
        }
        let granules = data_len >> backend.granule().shift();
        let states_len = granules * STATE_BYTES;
        let map_unit = backend.mapping_unit();
        let data_offset = map_unit
            .round_up((HEADER_BYTES + states_len) as usize)
            .expect("bounded by MAX_DATA_LEN") as u64;
        Ok(Layout {
            backend,
            data_len,
            states_offset: HEADER_BYTES,
            states_len,
            data_offset,
            file_len: data_offset + data_len,
        })
    }

    /// The backend the layout is for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Bytes of data (what users allocate from).
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Where the page-state table starts in the file.
    pub fn states_offset(&self) -> u64 {
        self.states_offset
    }

    /// Length of the page-state table.
    pub fn states_len(&self) -> u64 {
        self.states_len
    }

    /// Where the data area starts in the file (= the metadata's length).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Total file length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Population granules in the data area.
    pub fn granules(&self) -> u64 {
        self.data_len >> self.backend.granule().shift()
    }

    /// Huge pages the file takes from the hugetlb pool (0 for shmem).
    pub fn hugetlb_pages(&self) -> u64 {
        if self.backend.kind().uses_hugetlb() {
            self.file_len >> self.backend.mapping_unit().shift()
        } else {
            0
        }
    }

    /// The data area rounded up to whole mapping units, as placed in memory.
    pub fn data_span(&self) -> usize {
        self.backend
            .mapping_unit()
            .round_up(self.data_len as usize)
            .expect("bounded by MAX_DATA_LEN")
    }
}

/// The unit a region's data size must be a multiple of: the huge page for
/// hugetlb files (hugetlbfs sizes files in whole pages), else the granule.
pub(super) fn size_unit(backend: Backend) -> PageSize {
    match backend.kind() {
        BackendKind::HugetlbHgm | BackendKind::Hugetlb => backend.mapping_unit(),
        BackendKind::ShmemThp | BackendKind::Shmem => backend.granule(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_starts_on_a_mapping_unit() {
        let thp = Layout::new(
            Backend::new(BackendKind::ShmemThp, PageSize::Huge2M),
            64 << 20,
        )
        .unwrap();
        assert_eq!(thp.data_offset(), 2 << 20);
        assert_eq!(thp.granules(), (64 << 20) / 4096);
        assert_eq!(thp.states_len(), thp.granules() * 8);
        let shmem =
            Layout::new(Backend::new(BackendKind::Shmem, PageSize::Huge2M), 1 << 20).unwrap();
        assert_eq!(shmem.data_offset(), 4096 + 4096);
        let huge = Layout::new(
            Backend::new(BackendKind::Hugetlb, PageSize::Huge2M),
            8 << 20,
        )
        .unwrap();
        assert_eq!(huge.data_offset(), 2 << 20);
        assert_eq!(huge.hugetlb_pages(), 5);
        assert_eq!(huge.granules(), 4);
    }

    #[test]
    fn big_state_tables_push_the_data_further() {
        // 8 GiB of 4 KiB granules = 16 MiB of states.
        let l = Layout::new(
            Backend::new(BackendKind::ShmemThp, PageSize::Huge2M),
            8 << 30,
        )
        .unwrap();
        assert_eq!(l.states_len(), 16 << 20);
        assert_eq!(l.data_offset(), 18 << 20);
    }
}
