//! Where the arena's tables live in the region's data, and its size
//! classes.
//!
//! ```text
//! offset 0          header (4 KiB): magic, version, state, geometry,
//!                   application roots, partial-stack heads, tag
//! blocks_offset     block words, one u64 per 2 MiB block, 64 bytes apart
//! bitmaps_offset    page bitmaps, 512 bits per block
//! runs_offset       run lengths, one u32 per 4 KiB page (pages of a run start)
//! spans_offset      span slots, one per 64 KiB: state u64, link u64 and
//!                   the class's divisor word (in a cache line of their
//!                   own), owner bitmap and remote-free bitmap of 4096
//!                   bits each
//! ledger_offset     the thread caches' ledger: 64 slots, each the holder
//!                   and its span per class
//! meta_len          (rounded up to whole blocks, marked META)
//! ... data blocks ...
//! ```
//!
//! The tables are zero in a fresh region (everything free) and are paged
//! in on first touch like all data, so a large arena costs resident memory
//! only for the parts of the tables that are used.

/// Bytes per page.
pub(crate) const PAGE: u64 = 4096;
/// Bytes per block.
pub(crate) const BLOCK: u64 = 2 << 20;
/// Bytes per small-object span.
pub(crate) const SPAN: u64 = 64 << 10;
/// Pages per span.
pub(crate) const SPAN_PAGES: u64 = SPAN / PAGE;
/// Words of a span's object bitmap (room for 4096 objects of 16 bytes).
pub(crate) const SPAN_BITMAP_WORDS: usize = 64;
/// Words before a span descriptor's bitmaps: the state and link words, in
/// a cache line of their own (remote frees write the state; the owner
/// writes its bitmap), and a line of padding, so that the descriptors of a
/// block's 32 spans fill exactly nine pages (`spans_offset` is
/// page-aligned): the descriptors of spans in different blocks never
/// share a page. Threads that carve their spans in blocks of their own
/// then write different pages, which matters more than it should: two
/// cores writing different lines of one page slow each other down by
/// half on this project's machines (the hardware prefetchers).
pub(crate) const SPAN_HEAD_WORDS: usize = 16;
/// The descriptor's word for its class's [`divisor_word`] (after the state
/// and link words, in their cache line), written before a carve publishes
/// the state; read only through `span::class_and_index`, whose check is
/// its protocol.
pub(crate) const SPAN_DIVISOR_WORD: usize = 2;
/// Bytes of one span slot's descriptor.
pub(crate) const SPAN_DESC: u64 = (SPAN_HEAD_WORDS + 2 * SPAN_BITMAP_WORDS) as u64 * 8;
/// [`SPAN_DESC`] in words.
pub(crate) const SPAN_DESC_WORDS: usize = (SPAN_DESC / 8) as usize;
/// Words from one block word to the next: each has a cache line of its
/// own, so threads working in neighbouring blocks (page runs) do not
/// bounce one line between their cores.
pub(crate) const BLOCK_WORD_STRIDE: usize = 8;
/// Bytes of the thread caches' ledger.
pub(crate) const LEDGER_BYTES: u64 = (super::ledger::SLOTS * super::ledger::SLOT_WORDS * 8) as u64;
/// Bytes of the header.
pub(crate) const HEADER: u64 = 4096;
/// The largest small object.
pub(crate) const SMALL_MAX: usize = 8192;

/// Size classes: 16-byte steps to 128, then four per doubling to 8 KiB.
pub(crate) const CLASSES: [u32; 32] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192,
];

/// The class serving `size` bytes aligned to `align`, if small. Classes
/// are placed at multiples of their size in 64 KiB-aligned spans, so a
/// power-of-two class is aligned to its size.
#[inline]
pub(crate) fn class_for(size: usize, align: usize) -> Option<u32> {
    let size = if align > 16 {
        if size == 0 {
            return None;
        }
        size.max(align).next_power_of_two()
    } else {
        size
    };
    // One compare for both ends: a zero size wraps past the largest.
    let last = size.wrapping_sub(1);
    if last >= SMALL_MAX {
        return None;
    }
    Some(u32::from(CLASS_OF_SIXTEENTHS[last / 16]))
}

/// The class of a size, by its last byte's 16-byte unit (every class is a
/// multiple of 16): one load instead of a search.
static CLASS_OF_SIXTEENTHS: [u8; SMALL_MAX / 16] = {
    let mut table = [0u8; SMALL_MAX / 16];
    let (mut unit, mut class) = (0, 0);
    while unit < table.len() {
        while (CLASSES[class] as usize) < (unit + 1) * 16 {
            class += 1;
        }
        table[unit] = class as u8;
        unit += 1;
    }
    table
};

/// The index of the object of `class` at `offset` (a byte offset inside
/// a span), if `offset` is an object's first byte and the object is one
/// of the span's; `None` for any other offset.
#[inline(always)]
pub(crate) fn object_at(offset: u64, class: u32) -> Option<usize> {
    object_at_with(divisor_word(class), offset)
}

/// [`object_at`] with the class's [`divisor_word`]: one multiply and one
/// rotate, by the exact-division test (Granlund and Montgomery): with the
/// size an odd factor times `2^shift`, multiplying a multiple of the size
/// by the odd factor's inverse modulo `2^32` gives the multiple of
/// `2^shift` exactly, which the rotate turns into the quotient; any other
/// offset below `2^32` comes out at least `2^32 / size`, above every
/// capacity. Whatever the word, the index is below 4096, in a span's
/// bitmaps (a damaged word gives a wrong index, never one out of bounds).
#[inline(always)]
pub(crate) fn object_at_with(divisor: u64, offset: u64) -> Option<usize> {
    debug_assert!(offset < SPAN);
    let q = (offset as u32)
        .wrapping_mul(divisor as u32)
        .rotate_right((divisor >> 32) as u32);
    (q <= (divisor >> 40) as u32 & 0xFFF).then_some(q as usize)
}

/// A class's divisor word, which a span's descriptor also holds (so that
/// a free finds it from the offset alone, without waiting for the class):
/// the inverse modulo `2^32` of the size's odd factor (bits 0–31), the
/// size's power of two (bits 32–39), the last object's index (bits 40–51)
/// and the class plus one (bits 56–63; 0: no word).
#[inline(always)]
pub(crate) fn divisor_word(class: u32) -> u64 {
    DIVISOR_WORDS[class as usize]
}

/// The class a divisor word names, if any.
#[inline(always)]
pub(crate) fn divisor_class(divisor: u64) -> Option<u32> {
    ((divisor >> 56) as u32).checked_sub(1)
}

static DIVISOR_WORDS: [u64; CLASSES.len()] = {
    let mut d = [0u64; CLASSES.len()];
    let mut i = 0;
    while i < CLASSES.len() {
        let shift = CLASSES[i].trailing_zeros();
        let odd = CLASSES[i] >> shift;
        // Newton's iteration doubles the correct low bits each step: an
        // odd number is its own inverse to 3 bits, so 4 steps give 48.
        let mut inverse = odd;
        let mut step = 0;
        while step < 4 {
            inverse = inverse.wrapping_mul(2u32.wrapping_sub(odd.wrapping_mul(inverse)));
            step += 1;
        }
        let last = SPAN / CLASSES[i] as u64 - 1;
        d[i] = inverse as u64 | (shift as u64) << 32 | last << 40 | (i as u64 + 1) << 56;
        i += 1;
    }
    d
};

/// Objects of class `class` per span.
#[inline]
pub(crate) fn capacity(class: u32) -> u64 {
    CAPACITIES[class as usize]
}

static CAPACITIES: [u64; CLASSES.len()] = {
    let mut c = [0u64; CLASSES.len()];
    let mut i = 0;
    while i < CLASSES.len() {
        c[i] = SPAN / CLASSES[i] as u64;
        i += 1;
    }
    c
};

/// Byte offsets of the tables for a data area of `data_len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ArenaLayout {
    /// Bytes of data (the region's length).
    pub data_len: u64,
    /// 2 MiB blocks.
    pub blocks: u64,
    /// Block words.
    pub blocks_offset: u64,
    /// Page bitmaps.
    pub bitmaps_offset: u64,
    /// Run lengths.
    pub runs_offset: u64,
    /// Span slots.
    pub spans_offset: u64,
    /// The thread caches' ledger (`ledger`).
    pub ledger_offset: u64,
    /// Bytes of metadata, a whole number of blocks.
    pub meta_len: u64,
}

impl ArenaLayout {
    /// The layout for `data_len` bytes (a multiple of 2 MiB).
    pub(crate) fn new(data_len: u64) -> ArenaLayout {
        let blocks = data_len / BLOCK;
        let pages = data_len / PAGE;
        let slots = data_len / SPAN;
        let blocks_offset = HEADER;
        let bitmaps_offset = blocks_offset + blocks * BLOCK_WORD_STRIDE as u64 * 8;
        let runs_offset = bitmaps_offset + blocks * 64;
        let spans_offset = (runs_offset + pages * 4).next_multiple_of(PAGE);
        let ledger_offset = (spans_offset + slots * SPAN_DESC).next_multiple_of(PAGE);
        let end = ledger_offset + LEDGER_BYTES;
        ArenaLayout {
            data_len,
            blocks,
            blocks_offset,
            bitmaps_offset,
            runs_offset,
            spans_offset,
            ledger_offset,
            meta_len: end.next_multiple_of(BLOCK),
        }
    }

    /// Blocks taken by metadata.
    pub(crate) fn meta_blocks(&self) -> u64 {
        self.meta_len / BLOCK
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_small_sizes_with_bounded_waste() {
        assert_eq!(class_for(1, 1), Some(0));
        assert_eq!(class_for(16, 8), Some(0));
        assert_eq!(class_for(17, 8), Some(1));
        assert_eq!(CLASSES[class_for(8192, 8).unwrap() as usize], 8192);
        assert_eq!(class_for(8193, 8), None);
        assert_eq!((class_for(0, 8), class_for(0, 64)), (None, None), "zero");
        // Over-aligned requests take a power-of-two class of at least align.
        assert_eq!(CLASSES[class_for(8, 64).unwrap() as usize], 64);
        assert_eq!(CLASSES[class_for(100, 128).unwrap() as usize], 128);
        assert_eq!(class_for(8, 16384), None);
        for w in CLASSES.windows(2) {
            assert!(w[1] > w[0] && (w[1] - w[0]) * 4 <= w[0].max(64), "{w:?}");
        }
        assert!(capacity(0) as usize <= SPAN_BITMAP_WORDS * 64);
    }

    #[test]
    fn an_offset_gives_an_object_exactly_when_it_is_an_objects_first_byte() {
        for class in 0..CLASSES.len() as u32 {
            let size = u64::from(CLASSES[class as usize]);
            assert_eq!(divisor_class(divisor_word(class)), Some(class));
            for offset in 0..SPAN {
                let expected = (offset % size == 0 && offset / size < capacity(class))
                    .then_some((offset / size) as usize);
                assert_eq!(object_at(offset, class), expected, "{offset} / {size}");
            }
        }
        assert_eq!(divisor_class(0), None, "no word");
    }

    #[test]
    fn the_class_table_gives_the_smallest_class_that_fits() {
        for size in 1..=SMALL_MAX {
            let class = class_for(size, 1).unwrap() as usize;
            assert!(CLASSES[class] as usize >= size, "{size}");
            assert!(class == 0 || (CLASSES[class - 1] as usize) < size, "{size}");
        }
    }

    #[test]
    fn metadata_is_small_and_block_aligned() {
        let l = ArenaLayout::new(1 << 30);
        assert_eq!(l.blocks, 512);
        assert_eq!(l.meta_len % BLOCK, 0);
        assert!(l.meta_len * 50 <= 1 << 30, "metadata ≤ 2 % of 1 GiB");
        assert!(l.spans_offset % PAGE == 0 && l.runs_offset % 4 == 0);
        assert_eq!(
            (BLOCK / SPAN) * SPAN_DESC % PAGE,
            0,
            "a block's descriptors: whole pages"
        );
        let small = ArenaLayout::new(4 << 20);
        assert_eq!(small.meta_blocks(), 1);
    }
}
