//! The arena: a lock-free allocator over a demand-populated shared region,
//! addressed by offsets that mean the same in every process.
//!
//! Three size ranges:
//! - **small** (1 B – 8 KiB): 32 size classes, objects carved from 64 KiB
//!   spans; each thread owns up to one span per class and allocates and
//!   frees its objects with plain stores, other threads and processes free
//!   into it through a remote bitmap; unowned spans with room wait on a
//!   per-class lock-free stack;
//! - **page runs** (8 KiB – 2 MiB − 4 KiB): whole 4 KiB pages from a
//!   block's page bitmap, first fit by address from a process-local hint
//!   so that high blocks empty out;
//! - **large** (from 2 MiB): whole 2 MiB blocks.
//!
//! Allocation never writes into the memory it hands out: only the tables
//! (in the first blocks of the region) change, and the population engine
//! fills a page on its first touch. Every shared word follows a protocol
//! documented where it is declared (`block`, `bitmap`, `span`, `objects`,
//! `stack`, `ledger`).

pub(crate) mod bitmap;
pub(crate) mod block;
pub(crate) mod cache;
mod gate;
pub(crate) mod layout;
pub(crate) mod ledger;
#[cfg(all(test, loom))]
mod loom_model;
pub(crate) mod objects;
pub(crate) mod span;
pub(crate) mod stack;
mod tables;

use std::alloc::Layout as AllocLayout;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use self::block::{Kind, PAGES_PER_BLOCK};
use self::layout::{
    ArenaLayout, BLOCK, BLOCK_WORD_STRIDE, CLASSES, HEADER, PAGE, SPAN, SPAN_BITMAP_WORDS,
    SPAN_DESC_WORDS, SPAN_DIVISOR_WORD, SPAN_HEAD_WORDS, SPAN_PAGES,
};
use self::span::{BORROWED, GaveUp};
use crate::error::{Error, Result};
use crate::populate::{PopulateOptions, Populator, ZeroSource};
use crate::region::SharedBase;
use crate::region::{Region, RegionOptions};

/// An allocation: a byte offset into the region's data, the same in every
/// process that maps the region (like PostgreSQL's `dsa_pointer`), plus
/// the 16-bit tag of the arena that handed it out, so that a pointer of
/// one arena given to another is an error instead of that arena's memory.
/// Store it in shared memory as [`to_bits`](ShmPtr::to_bits) and read it
/// back with [`from_bits`](ShmPtr::from_bits) to keep the tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShmPtr(u64);

/// Bits of a [`ShmPtr`] holding the offset; the 16 above hold the tag.
const OFFSET_BITS: u32 = 48;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;

impl ShmPtr {
    /// No allocation (offset 0 holds the arena's header, never an object).
    pub const NULL: ShmPtr = ShmPtr(0);

    /// An untagged pointer for a byte offset: any arena takes it (and
    /// checks it against its tables only).
    #[inline]
    pub const fn from_offset(offset: u64) -> ShmPtr {
        ShmPtr(offset & OFFSET_MASK)
    }

    /// The byte offset.
    #[inline]
    pub const fn offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// The tag of the arena that handed it out (0: untagged).
    #[inline]
    pub const fn tag(self) -> u16 {
        (self.0 >> OFFSET_BITS) as u16
    }

    /// Offset and tag as one word, for storing in shared memory.
    #[inline]
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// The pointer [`to_bits`](ShmPtr::to_bits) gave `bits` for.
    #[inline]
    pub const fn from_bits(bits: u64) -> ShmPtr {
        ShmPtr(bits)
    }

    #[inline]
    const fn tagged(offset: u64, tag: u16) -> ShmPtr {
        ShmPtr((offset & OFFSET_MASK) | (tag as u64) << OFFSET_BITS)
    }

    /// Whether this is [`ShmPtr::NULL`].
    #[inline]
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// When blocks that became entirely free go back to the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReleasePolicy {
    /// Only on [`Arena::release_free_blocks`].
    #[default]
    OnRequest,
    /// As soon as a free empties a block (punching pages out costs a
    /// system call and refilling them a fault each: for arenas whose
    /// memory use swings widely).
    Eager,
}

/// Usage and fragmentation, from a scan of the tables.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArenaStats {
    /// Bytes of the region's data.
    pub data_bytes: u64,
    /// Bytes taken by the arena's tables.
    pub meta_bytes: u64,
    /// Blocks that hold page runs and spans.
    pub page_blocks: u64,
    /// Blocks of large allocations.
    pub large_blocks: u64,
    /// Free blocks whose pages may still be resident.
    pub free_dirty_blocks: u64,
    /// Free blocks with no resident pages.
    pub free_clean_blocks: u64,
    /// Live small objects (allocated and not freed).
    pub small_objects: u64,
    /// Bytes of live small objects (class sizes).
    pub small_bytes: u64,
    /// Spans carved.
    pub spans: u64,
    /// Live page runs.
    pub runs: u64,
    /// Bytes of live page runs.
    pub run_bytes: u64,
    /// Live large allocations.
    pub large_allocs: u64,
    /// Bytes of live large allocations.
    pub large_bytes: u64,
    /// Free small objects in spans that a thread cache owns (not counted
    /// in `small_objects`): only that thread allocates them, this
    /// process's until it flushes, another process's until that one
    /// flushes or exits. The arena's shared ledger records which spans
    /// each cache owns, so those of a process killed while owning spans go
    /// back when another process notices it is gone: when it attaches the
    /// arena, runs [`Arena::audit`], or starts a thread that needs a
    /// ledger slot.
    pub cached_objects: u64,
    /// Bytes of freed page runs that thread caches keep for their next
    /// allocation of the same size (not counted in `run_bytes`), this
    /// process's until it flushes, another's until that one flushes or
    /// exits (or is noticed gone, as for `cached_objects`).
    pub cached_run_bytes: u64,
    /// Bytes of freed large allocations (up to 8 MiB, 16 MiB a thread)
    /// that thread caches keep for their next allocation of as many
    /// blocks (not counted in `large_bytes`), kept as `cached_run_bytes`
    /// are. Not kept when the arena releases blocks eagerly.
    pub cached_large_bytes: u64,
    /// Pages that allocations cut short by a killed process left reserved
    /// in a block's free count but not marked, or marked but recorded by
    /// no run or span: leaked for good. Counted by [`Arena::audit`] only
    /// (0 from [`Arena::stats`]).
    pub leaked_pages: u64,
}

impl ArenaStats {
    /// Bytes handed out.
    pub fn in_use_bytes(&self) -> u64 {
        self.small_bytes + self.run_bytes + self.large_bytes
    }

    /// Bytes of blocks in use (page blocks, large blocks, and the blocks
    /// of large allocations thread caches keep).
    pub fn held_bytes(&self) -> u64 {
        (self.page_blocks + self.large_blocks) * BLOCK + self.cached_large_bytes
    }

    /// Share of held bytes not handed out: free pages in page blocks and
    /// free objects in spans (0 when nothing is held).
    pub fn fragmentation(&self) -> f64 {
        match self.held_bytes() {
            0 => 0.0,
            held => 1.0 - self.in_use_bytes() as f64 / held as f64,
        }
    }
}

const MAGIC: u64 = u64::from_le_bytes(*b"HAARENA\0");
/// Application root words in the header (see [`Arena::roots`]).
pub(crate) const ROOTS: usize = 4;
const VERSION: u64 = 3;
const READY: u64 = 1;

/// Header word indices (u64 words at offset 0 of the data).
mod hdr {
    pub(super) const MAGIC: usize = 0;
    pub(super) const VERSION: usize = 1;
    pub(super) const STATE: usize = 2;
    pub(super) const DATA_LEN: usize = 3;
    pub(super) const ROOTS: usize = 4;
    /// The head of each class's stack of unowned spans with room.
    pub(super) const PARTIAL: usize = 8;
    /// The tag in every `ShmPtr` the arena hands out (0 in arenas made
    /// before tags: their pointers are untagged).
    pub(super) const TAG: usize = PARTIAL + 32;
    pub(super) const WORDS: usize = TAG + 1;
}

/// Why a region does not hold a usable arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArenaDefect {
    /// Formatting a region that already holds data.
    #[error("the region already holds data: open it instead")]
    AlreadyFormatted,
    /// No arena header, or its creator has not finished writing it.
    #[error("no arena header (or its creator has not finished)")]
    NoHeader,
    /// Another format version.
    #[error("arena format version {found}, this build reads {supported}")]
    Version {
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u64,
    },
    /// The header's size is not the region's.
    #[error("the header says {header} bytes, the region has {region}")]
    Size {
        /// Bytes the header records.
        header: u64,
        /// Bytes of the region.
        region: u64,
    },
    /// The pointer tag word is damaged.
    #[error("pointer tag {0:#x} in the header is wider than 16 bits")]
    Tag(u64),
}

/// What claims a page, in an [`AuditError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOwner {
    /// A small-object span.
    Span,
    /// A page run.
    Run,
}

/// A disagreement between the arena's tables that could hand memory out
/// twice, found by [`Arena::audit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A block counts more free pages than its bitmap has clear bits.
    #[error("block {block}: {counted} free pages counted, bitmap has {in_use} in use")]
    FreeCount {
        /// The block.
        block: u64,
        /// Free pages its word counts.
        counted: u64,
        /// Pages its bitmap marks in use.
        in_use: u64,
    },
    /// A page claimed twice, or claimed but not marked in use.
    #[error("page {page} ({owner:?}) is double-booked or not marked in use")]
    PageConflict {
        /// The page.
        page: u64,
        /// What claims it.
        owner: PageOwner,
    },
}

/// A random non-zero pointer tag for a new arena.
fn fresh_tag() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.write_u32(std::process::id());
    (h.finish() % 0xFFFF) as u16 + 1
}

/// A lock-free allocator over a demand-populated shared region, addressed
/// by offsets ([`ShmPtr`]) that mean the same in every process.
///
/// Three size ranges: **small** (1 B – 8 KiB, 32 size classes carved from
/// 64 KiB spans), **page runs** (8 KiB – 2 MiB − 4 KiB, whole 4 KiB pages,
/// first fit by address from a hint, so high blocks empty out) and **large** (whole
/// 2 MiB blocks). Allocation never writes into the memory it hands out:
/// only the tables change, and the populator fills a page on its first
/// touch. A free is checked against the tables: a second free, an interior
/// or made-up pointer, and another arena's pointer are errors.
///
/// ```
/// use std::alloc::Layout;
/// use hugearena::populate::PopulateOptions;
/// use hugearena::{Arena, BackendKind, RegionOptions};
///
/// let arena = Arena::create(
///     RegionOptions::new(16 << 20).backend(BackendKind::Shmem),
///     PopulateOptions::new(),
/// )?;
/// let p = arena.alloc(Layout::new::<[u64; 8]>())?;
/// arena.write_bytes(p, 0, b"in shared memory")?;
/// // Another process opens the same arena and reads the same offset.
/// let other = Arena::open(arena.region().shareable_path(), PopulateOptions::new())?;
/// let mut buf = [0u8; 16];
/// other.read_bytes(p, 0, &mut buf)?;
/// assert_eq!(&buf, b"in shared memory");
/// arena.free(p)?;
/// assert!(arena.free(p).is_err(), "a second free is refused");
/// # Ok::<(), hugearena::Error>(())
/// ```
pub struct Arena {
    populator: Populator,
    layout: ArenaLayout,
    /// The tables in `populator`'s region, resolved once.
    tables: tables::Tables,
    /// Where page-run searches of a thread new to the arena start: the
    /// lowest block where this process freed room (0 at first).
    /// Process-local and only a hint (any value is correct; a search that
    /// finds nothing from it scans the blocks below it too before opening
    /// a new block). Threads keep their own in `RUN_HINT`.
    run_hint: AtomicU64,
    base: SharedBase,
    release: ReleasePolicy,
    caches: cache::Caches,
    /// The header's tag, read once.
    tag: u16,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("region", &self.region().name())
            .field("data_len", &self.layout.data_len)
            .finish_non_exhaustive()
    }
}

impl Arena {
    /// Creates a region and an empty arena in it, populated with zero pages
    /// on first touch.
    pub fn create(region: RegionOptions, populate: PopulateOptions) -> Result<Arena> {
        let region = Arc::new(Region::create(region)?);
        let populator = Populator::with_options(region, ZeroSource, populate)?;
        Arena::format(populator)
    }

    /// Opens the arena in an existing region (another process's, by path).
    pub fn open(path: impl AsRef<Path>, populate: PopulateOptions) -> Result<Arena> {
        let region = Arc::new(Region::open(path)?);
        let populator = Populator::with_options(region, ZeroSource, populate)?;
        Arena::attach(populator)
    }
}

impl Arena {
    /// Restores an arena from a snapshot: returns at once, pages fill from
    /// the snapshot on first touch, and allocation continues where the
    /// snapshot left off.
    ///
    /// Spans the snapshotted processes' thread caches owned, and the page
    /// runs and large allocations they kept, go back to the arena here.
    /// (Attaching to a restored populator yourself gives back only those
    /// of processes that are gone.)
    pub fn restore(path: impl AsRef<Path>, populate: PopulateOptions) -> Result<Self> {
        let arena = Arena::attach(crate::persist::restore(path, populate)?)?;
        arena.reclaim_dead_caches(true);
        // No slot is held now: every kept large allocation left is one a
        // process was evicting when the snapshot was taken.
        arena.release_unrecorded_large();
        Ok(arena)
    }
}

impl Arena {
    fn new(populator: Populator) -> Result<Arena> {
        let data_len = populator.region().len() as u64;
        if data_len % BLOCK != 0 || data_len < 2 * BLOCK {
            return Err(Error::InvalidOption {
                option: "arena size",
                reason: format!(
                    "{data_len} bytes: an arena needs a multiple of 2 MiB and at least 4 MiB \
                     (one block of tables, one of data)"
                ),
            });
        }
        let layout = ArenaLayout::new(data_len);
        if layout.meta_blocks() >= layout.blocks {
            return Err(Error::InvalidOption {
                option: "arena size",
                reason: format!("{data_len} bytes leave no room after the tables"),
            });
        }
        let base = populator.region().primary_base();
        let tables = tables::Tables::new(populator.region(), &layout, hdr::WORDS)?;
        Ok(Arena {
            populator,
            layout,
            tables,
            run_hint: AtomicU64::new(0),
            base,
            release: ReleasePolicy::default(),
            caches: cache::Caches::new(true),
            tag: 0,
        })
    }

    /// Writes a fresh arena's header into a populator's (new, zeroed)
    /// region.
    pub fn format(populator: Populator) -> Result<Arena> {
        let mut arena = Arena::new(populator)?;
        let h = arena.header();
        if h[hdr::MAGIC].load(Ordering::Acquire) != 0 {
            return Err(Error::NotAnArena {
                defect: ArenaDefect::AlreadyFormatted,
            });
        }
        for b in 0..arena.layout.meta_blocks() {
            arena.block(b).store(block::META, Ordering::Relaxed);
        }
        let tag = fresh_tag();
        h[hdr::TAG].store(u64::from(tag), Ordering::Relaxed);
        h[hdr::VERSION].store(VERSION, Ordering::Relaxed);
        h[hdr::DATA_LEN].store(arena.layout.data_len, Ordering::Relaxed);
        h[hdr::MAGIC].store(MAGIC, Ordering::Relaxed);
        // Publishes everything above to openers that acquire READY.
        h[hdr::STATE].store(READY, Ordering::Release);
        arena.tag = tag;
        Ok(arena)
    }

    /// Attaches to the arena in a populator's region, checking its header.
    pub fn attach(populator: Populator) -> Result<Arena> {
        let mut arena = Arena::new(populator)?;
        let h = arena.header();
        if h[hdr::STATE].load(Ordering::Acquire) != READY
            || h[hdr::MAGIC].load(Ordering::Relaxed) != MAGIC
        {
            return Err(Error::NotAnArena {
                defect: ArenaDefect::NoHeader,
            });
        }
        let version = h[hdr::VERSION].load(Ordering::Relaxed);
        if version != VERSION {
            return Err(Error::NotAnArena {
                defect: ArenaDefect::Version {
                    found: version,
                    supported: VERSION,
                },
            });
        }
        let len = h[hdr::DATA_LEN].load(Ordering::Relaxed);
        if len != arena.layout.data_len {
            return Err(Error::NotAnArena {
                defect: ArenaDefect::Size {
                    header: len,
                    region: arena.layout.data_len,
                },
            });
        }
        let tag = h[hdr::TAG].load(Ordering::Relaxed);
        arena.tag = u16::try_from(tag).map_err(|_| Error::NotAnArena {
            defect: ArenaDefect::Tag(tag),
        })?;
        arena.reclaim_dead_caches(false);
        Ok(arena)
    }

    /// Four words in the arena's header for the application's own use,
    /// typically the `ShmPtr` of its root structure, so that another
    /// process (or a restore) finds it. Zero in a fresh arena.
    pub fn roots(&self) -> &[AtomicU64] {
        &self.header()[hdr::ROOTS..hdr::ROOTS + ROOTS]
    }

    /// Turns this process's per-thread caches on or off (on by default;
    /// double frees are detected either way). A thread without a cache
    /// takes a span for each small allocation and gives it back at once,
    /// several atomic operations each. Turning them off flushes them.
    pub fn set_thread_caches(&self, on: bool) {
        self.caches.set_enabled(on);
        if !on {
            self.flush_thread_caches();
        }
    }

    /// Gives up the spans this process's thread caches own, so that their
    /// free objects are anyone's again, and retires spans that became
    /// empty. Snapshots, `audit` and dropping the arena do it too; spans
    /// owned by other processes stay theirs.
    pub fn flush_thread_caches(&self) {
        self.caches.for_each(self.ledger(), |cache, slot| {
            let owner = cache.owner();
            for class in 0..CLASSES.len() as u32 {
                let c = class as usize;
                if let Some(span) = cache.spans[c].checked_sub(1) {
                    self.give_up_span(owner, Some(slot), class, u64::from(span));
                }
                cache.set_span(c, None);
            }
            self.release_kept(cache, slot);
        });
        self.retire_empty_spans();
    }

    /// Gives back what the thread caches of processes proven dead (killed,
    /// say) owned, as the arena's cache ledger records it; with `all`,
    /// what any process owned (a restored arena: the processes that
    /// allocated in it ran in another region) and spans that threads
    /// without a cache held. Attaching an arena and
    /// [`audit`](Self::audit) do it; so does a thread that finds no free
    /// ledger slot, which adopts a dead process's slot. Returns the spans
    /// given back.
    fn reclaim_dead_caches(&self, all: bool) -> u64 {
        let Some(me) = self.caches.me() else {
            return 0;
        };
        let mut returned = 0;
        for (i, slot) in ledger::slots(self.ledger()) {
            if ledger::take_over_from_dead(slot, me, all) {
                returned += self.release_recorded_spans(i, slot);
                ledger::give_up(slot);
            }
        }
        returned
    }

    /// Gives up the spans ledger slot `i` (whose words are `slot`, held by
    /// the caller) records. A record read from the shared ledger is
    /// checked first: a span whose state does not name the slot as its
    /// owner is skipped.
    fn release_recorded_spans(&self, i: usize, slot: &[AtomicU64]) -> u64 {
        let owner = i as u32 + 1;
        let mut returned = 0;
        for class in 0..CLASSES.len() as u32 {
            if let Some(span) = ledger::span(slot, class)
                && self.is_slot(span)
                && span::describe(self.span_state(span))
                    .is_some_and(|st| st.class == class && st.owner == owner)
            {
                self.give_up_span(owner, Some(slot), class, span);
                returned += 1;
            }
            ledger::record(slot, class, None);
        }
        self.release_recorded_runs(slot);
        returned
    }

    /// Spans held by threads without a cache of processes that are gone
    /// (only while nobody allocates: a restore, `audit`) go back to their
    /// stacks.
    fn reclaim_borrowed_spans(&self) {
        for span in self.layout.meta_len / SPAN..self.layout.data_len / SPAN {
            let state = self.span_state(span);
            if let Some(st) = span::describe(state)
                && span::unborrow(state)
            {
                stack::push(self.partial(st.class), &self.span_links(), span as u32);
            }
        }
    }

    fn ledger(&self) -> &[AtomicU64] {
        self.tables.ledger.get()
    }

    /// Sets when empty blocks go back to the kernel (this process).
    /// Switching to [`ReleasePolicy::Eager`] flushes this process's thread
    /// caches: the large allocations they keep go back to the kernel too.
    pub fn set_release_policy(&mut self, policy: ReleasePolicy) {
        self.release = policy;
        if policy == ReleasePolicy::Eager {
            self.flush_thread_caches();
        }
    }

    /// The region.
    pub fn region(&self) -> &Arc<Region> {
        self.populator.region()
    }

    /// The populator.
    pub fn populator(&self) -> &Populator {
        &self.populator
    }

    /// The tag in the pointers this arena hands out (see [`ShmPtr`]).
    pub fn tag(&self) -> u16 {
        self.tag
    }

    /// The offset `ptr` stands for, if it is untagged or this arena's.
    #[inline]
    fn offset_of(&self, ptr: ShmPtr) -> Result<u64> {
        match ptr.tag() {
            0 => Ok(ptr.offset()),
            tag if tag == self.tag => Ok(ptr.offset()),
            tag => Err(Error::ForeignPointer {
                offset: ptr.offset(),
                tag,
                arena_tag: self.tag,
            }),
        }
    }

    /// The local address of `ptr` in this process; an error if `ptr` lies
    /// outside the arena or carries another arena's tag.
    #[allow(unsafe_code)] // offset to pointer, bounds-checked
    pub fn local(&self, ptr: ShmPtr) -> Result<NonNull<u8>> {
        let offset = self.offset_of(ptr)?;
        if offset >= self.layout.data_len {
            return Err(Error::OutOfBounds {
                offset,
                len: 1,
                region_len: self.layout.data_len,
            });
        }
        // SAFETY: in bounds of the primary view (checked).
        Ok(unsafe { self.base.get().add(offset as usize) })
    }

    /// The bytes of the live allocation `ptr` starts: the size class of a
    /// small object, whole pages of a page run, whole blocks of a large
    /// allocation (at least what was asked for). An error if `ptr` is not
    /// the start of a live allocation of this arena.
    pub fn usable_size(&self, ptr: ShmPtr) -> Result<usize> {
        let offset = self.offset_of(ptr)?;
        let invalid = |reason| Error::InvalidPointer { offset, reason };
        if offset < self.layout.meta_len || offset >= self.layout.data_len {
            return Err(invalid("outside the arena's allocatable blocks"));
        }
        let b = offset / BLOCK;
        let st = block::observe(self.block(b));
        match st.kind {
            Kind::LargeHead if offset % BLOCK == 0 => {
                let blocks = st.blocks.clamp(1, self.layout.blocks - b);
                Ok((blocks * BLOCK) as usize)
            }
            Kind::Pages => {
                let slot = offset / SPAN;
                if let Some(st) = span::describe(self.span_state(slot)) {
                    let class = st.class;
                    let index = Self::object_index(slot, class, offset)
                        .ok_or(invalid("not the start of an object"))?;
                    let (owned, remote) = self.span_objects(slot);
                    if !objects::is_live(owned, remote, index) {
                        return Err(invalid("object not allocated"));
                    }
                    return Ok(CLASSES[class as usize] as usize);
                }
                let page = offset / PAGE;
                let run = u64::from(self.run_len(page).load(Ordering::Acquire));
                if offset % PAGE != 0 || run == 0 {
                    return Err(invalid("not the start of an allocation"));
                }
                Ok((run.min(PAGES_PER_BLOCK - page % PAGES_PER_BLOCK) * PAGE) as usize)
            }
            _ => Err(invalid("not in an allocated block")),
        }
    }

    /// The first `count` words of the live allocation `ptr` as atomics,
    /// for structures that several threads and processes share (lock
    /// words, links, counters). Checked: `ptr` must start a live
    /// allocation of this arena, be 8-byte aligned, and hold `count` words.
    ///
    /// ```
    /// use std::alloc::Layout;
    /// use std::sync::atomic::Ordering;
    /// # use hugearena::{Arena, RegionOptions, BackendKind};
    /// # use hugearena::populate::PopulateOptions;
    /// # let arena = Arena::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem), PopulateOptions::new())?;
    /// let p = arena.alloc(Layout::new::<[u64; 4]>())?;
    /// let words = arena.atomics(p, 4)?;
    /// words[3].fetch_add(1, Ordering::Relaxed);
    /// assert!(arena.atomics(p, 1 << 20).is_err(), "past the allocation");
    /// # Ok::<(), hugearena::Error>(())
    /// ```
    #[allow(unsafe_code)] // a checked slice of atomics over shared memory
    pub fn atomics(&self, ptr: ShmPtr, count: usize) -> Result<&[AtomicU64]> {
        let size = self.usable_size(ptr)?;
        let offset = ptr.offset();
        if offset % 8 != 0 {
            return Err(Error::Misaligned { offset, align: 8 });
        }
        if count.checked_mul(8).is_none_or(|bytes| bytes > size) {
            return Err(Error::OutOfBounds {
                offset,
                len: count.saturating_mul(8) as u64,
                region_len: size as u64,
            });
        }
        let at = self.local(ptr)?.cast::<AtomicU64>();
        // SAFETY: `count` words from an 8-byte-aligned start lie inside a
        // live allocation (checked above) of the primary view, which lives
        // as long as `self`; shared memory is only reached through atomics
        // here, and any bit pattern is a valid `AtomicU64`.
        Ok(unsafe { std::slice::from_raw_parts(at.as_ptr(), count) })
    }

    /// Copies `bytes` into the live allocation `ptr` at byte `at` (a raw
    /// copy: readers in other threads see the bytes once they synchronise
    /// with this thread, e.g. through an atomic published after it).
    #[allow(unsafe_code)] // a checked raw copy into shared memory
    pub fn write_bytes(&self, ptr: ShmPtr, at: usize, bytes: &[u8]) -> Result<()> {
        let dst = self.checked_range(ptr, at, bytes.len())?;
        // SAFETY: `[dst, dst + len)` lies inside a live allocation (checked);
        // the copy is raw, no reference to shared bytes is formed.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
        Ok(())
    }

    /// Copies `buf.len()` bytes of the live allocation `ptr`, from byte
    /// `at`, into `buf`.
    #[allow(unsafe_code)] // a checked raw copy out of shared memory
    pub fn read_bytes(&self, ptr: ShmPtr, at: usize, buf: &mut [u8]) -> Result<()> {
        let src = self.checked_range(ptr, at, buf.len())?;
        // SAFETY: as in `write_bytes`.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// The local address of `[at, at + len)` of the live allocation `ptr`.
    fn checked_range(&self, ptr: ShmPtr, at: usize, len: usize) -> Result<*mut u8> {
        let size = self.usable_size(ptr)?;
        if at.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds {
                offset: ptr.offset() + at as u64,
                len: len as u64,
                region_len: size as u64,
            });
        }
        Ok(self.local(ptr)?.as_ptr().wrapping_add(at))
    }

    /// The `ShmPtr` of a local address inside the arena.
    pub fn shm_ptr(&self, local: *const u8) -> Option<ShmPtr> {
        let offset = (local as usize).checked_sub(self.base.as_ptr() as usize)?;
        ((offset as u64) < self.layout.data_len).then_some(ShmPtr::tagged(offset as u64, self.tag))
    }

    /// A typed reference to the `T` at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must be a live allocation of at least `size_of::<T>()` bytes,
    /// aligned for `T`, holding a valid `T`, and nothing may write it (in
    /// any process) while the reference lives, unless `T` is itself made
    /// of atomics or cells meant for sharing.
    #[allow(unsafe_code)] // the caller vouches for what lies at `ptr`
    pub unsafe fn get<T>(&self, ptr: ShmPtr) -> &T {
        let local = self
            .local(ptr)
            .expect("the caller's contract: a live allocation");
        // SAFETY: the caller's contract.
        unsafe { local.cast::<T>().as_ref() }
    }

    fn header(&self) -> &[AtomicU64] {
        self.tables.header.get()
    }

    fn blocks(&self) -> &[AtomicU64] {
        self.tables.blocks.get()
    }

    #[inline]
    fn block(&self, b: u64) -> &AtomicU64 {
        &self.blocks()[b as usize * BLOCK_WORD_STRIDE]
    }

    fn page_bitmap(&self, b: u64) -> &[AtomicU64] {
        let at = b as usize * 8;
        &self.tables.bitmaps.get()[at..at + 8]
    }

    fn run_len(&self, page: u64) -> &AtomicU32 {
        &self.tables.runs.get()[page as usize]
    }

    /// Whether `slot` names a span slot of the arena (words read from the
    /// shared tables are checked before they index anything).
    fn is_slot(&self, slot: u64) -> bool {
        slot < self.layout.data_len / SPAN
    }

    /// Span slot `slot`'s descriptor: state, link, owner and remote
    /// bitmaps. An array: one bounds check here, none where its words are
    /// read.
    #[inline]
    fn span_desc(&self, slot: u64) -> &[AtomicU64; SPAN_DESC_WORDS] {
        self.tables
            .span_desc(slot)
            .unwrap_or_else(|| panic!("span slot {slot} past the span table"))
    }

    /// Where span slot `slot`'s descriptor starts in the span table.
    #[inline]
    fn span_desc_at(slot: u64) -> usize {
        slot as usize * SPAN_DESC_WORDS
    }

    #[inline]
    fn span_state(&self, slot: u64) -> &AtomicU64 {
        &self.span_desc(slot)[0]
    }

    fn span_links(&self) -> SpanLinks<'_> {
        SpanLinks(self)
    }

    /// Span `slot`'s owner bitmap and remote-free bitmap (`objects`).
    #[inline]
    fn span_objects(&self, slot: u64) -> (&[AtomicU64], &[AtomicU64]) {
        Self::objects_of(self.span_desc(slot))
    }

    /// A span descriptor's owner bitmap and remote-free bitmap.
    #[inline]
    fn objects_of(desc: &[AtomicU64; SPAN_DESC_WORDS]) -> (&[AtomicU64], &[AtomicU64]) {
        desc[SPAN_HEAD_WORDS..].split_at(SPAN_BITMAP_WORDS)
    }

    fn partial(&self, class: u32) -> &AtomicU64 {
        &self.header()[hdr::PARTIAL + class as usize]
    }

    /// The error of a failed allocation. One pass over the block words
    /// (not `stats()`, which scans every bitmap and span): a buffer pool
    /// that evicts when the arena is full gets this in a loop.
    #[cold]
    #[inline(never)]
    fn exhausted(&self, size: usize) -> Error {
        let in_use = (self.layout.meta_blocks()..self.layout.blocks)
            .map(|b| {
                let st = block::observe(self.block(b));
                match st.kind {
                    Kind::Pages => (PAGES_PER_BLOCK - st.free_pages.min(PAGES_PER_BLOCK)) * PAGE,
                    Kind::LargeHead | Kind::LargeTail | Kind::LargeCached => BLOCK,
                    _ => 0,
                }
            })
            .sum();
        Error::ArenaExhausted {
            size,
            in_use,
            capacity: self.layout.data_len - self.layout.meta_len,
        }
    }

    /// Allocates `layout.size()` bytes aligned to `layout.align()` (at most
    /// 2 MiB). The memory is not touched: it reads as whatever was freed
    /// there last (zero when fresh), and its pages fill on first touch.
    #[inline(always)]
    pub fn alloc(&self, layout: AllocLayout) -> Result<ShmPtr> {
        let size = layout.size();
        // Small objects from the word this thread's cache copied take the
        // short path; everything else, errors included, is a tail call
        // out of line, so that this one needs few registers (no saves, no
        // spills).
        // (`class_for` has no class for a zero size.)
        match layout::class_for(size, layout.align()) {
            Some(class) => {
                if let Some(mut cache) = self.caches.open_last()
                    && let Some(p) = self.alloc_from_next_word(cache.contents(), class)
                {
                    // An offset in the arena needs no masking.
                    debug_assert!(p.0 < self.layout.data_len);
                    return Ok(ShmPtr(p.0 | u64::from(self.tag) << OFFSET_BITS));
                }
                self.alloc_small_slow(class, size)
            }
            _ => self.alloc_pages_or_blocks(layout),
        }
    }

    /// A small allocation past the cache's copied word: the span's other
    /// words, another span, or a span borrowed without a cache; once more
    /// after this thread's cache gave back the runs and blocks it keeps if
    /// that finds no room.
    #[inline(never)]
    fn alloc_small_slow(&self, class: u32, size: usize) -> Result<ShmPtr> {
        let found = self.alloc_small(class).or_else(|| {
            self.release_own_cache()
                .then(|| self.alloc_small(class))
                .flatten()
        });
        found
            .map(|p| ShmPtr::tagged(p.0, self.tag))
            .ok_or_else(|| self.exhausted(size))
    }

    /// [`alloc`](Self::alloc) of anything but a small object.
    #[inline(never)]
    fn alloc_pages_or_blocks(&self, layout: AllocLayout) -> Result<ShmPtr> {
        let (size, align) = (layout.size(), layout.align());
        if size == 0 {
            return Err(Error::ZeroAllocation);
        }
        if align as u64 > BLOCK {
            return Err(Error::AlignmentTooLarge { align });
        }
        let pages = (size as u64).div_ceil(PAGE);
        let attempt = || {
            if pages < PAGES_PER_BLOCK {
                let align_pages = (align as u64 / PAGE).max(1);
                self.alloc_run(pages, align_pages)
                    .map(|page| ShmPtr(page * PAGE))
            } else {
                self.alloc_large((size as u64).div_ceil(BLOCK))
            }
        };
        // What this thread's cache keeps may be what the allocation needs.
        let found = attempt().or_else(|| self.release_own_cache().then(attempt).flatten());
        found
            .map(|p| ShmPtr::tagged(p.0, self.tag))
            .ok_or_else(|| self.exhausted(size))
    }

    /// Allocates `bytes` bytes with 16-byte alignment.
    pub fn alloc_bytes(&self, bytes: usize) -> Result<ShmPtr> {
        let layout =
            AllocLayout::from_size_align(bytes, 16).map_err(|_| Error::ArenaExhausted {
                size: bytes,
                in_use: 0,
                capacity: self.layout.data_len,
            })?;
        self.alloc(layout)
    }

    /// `n` whole blocks: one of as many blocks this thread's cache keeps,
    /// or the first free ones by address.
    fn alloc_large(&self, n: u64) -> Option<ShmPtr> {
        if self.caches_large(n)
            && let Some(b) = self
                .with_cache(|cache| self.take_cached_large(cache, n))
                .flatten()
        {
            return Some(ShmPtr(b * BLOCK));
        }
        let blocks = self.blocks();
        let first = self.layout.meta_blocks();
        let mut b = first;
        while b + n <= self.layout.blocks {
            let range =
                &blocks[b as usize * BLOCK_WORD_STRIDE..(b + n) as usize * BLOCK_WORD_STRIDE];
            match range
                .iter()
                .step_by(BLOCK_WORD_STRIDE)
                .rposition(|w| block::observe(w).kind != Kind::Free)
            {
                Some(taken) => b += taken as u64 + 1,
                None if block::claim_large(range, BLOCK_WORD_STRIDE) => {
                    return Some(ShmPtr(b * BLOCK));
                }
                None => b += 1,
            }
        }
        None
    }

    /// Whether thread caches keep freed large allocations of `n` blocks:
    /// not too large, and not when freed blocks go back to the kernel at
    /// once.
    #[inline]
    fn caches_large(&self, n: u64) -> bool {
        (1..=cache::LARGE_MAX).contains(&n) && self.release == ReleasePolicy::OnRequest
    }

    /// A large allocation of exactly `n` blocks from the cache, made live
    /// (its head uncached before its ledger entry is emptied: see
    /// `ledger`). Returns its first block.
    fn take_cached_large(&self, cache: &mut cache::ThreadCache, n: u64) -> Option<u64> {
        let pages = n * PAGES_PER_BLOCK;
        let entry = cache.runs.iter().position(|&(_, p)| p == pages)?;
        let (page, _) = cache.runs[entry];
        let slot = ledger::slot(self.ledger(), cache.slot)?;
        let b = page / PAGES_PER_BLOCK;
        let live = block::uncache_large(self.block(b), n);
        // Dropped either way: an entry whose head is not cached (a damaged
        // word) is not ours to hand out.
        ledger::record_run(slot, entry, None);
        cache.runs[entry] = (0, 0);
        live.then_some(b)
    }

    /// [`free_large`](Self::free_large) into the cache: recorded in the
    /// ledger, then its head cached (see `ledger`), the large allocations
    /// the cache keeps going back to the blocks in turn (round robin over
    /// its entries) while it would keep more than [`cache::LARGE_BLOCKS`].
    fn cache_freed_large(
        &self,
        cache: &mut cache::ThreadCache,
        b: u64,
        n: u64,
    ) -> Result<(), &'static str> {
        let Some(slot) = ledger::slot(self.ledger(), cache.slot) else {
            return Err("the cache ledger is smaller than its slots");
        };
        let kept = |cache: &cache::ThreadCache| -> u64 {
            cache
                .runs
                .iter()
                .filter(|&&(_, p)| p >= PAGES_PER_BLOCK)
                .map(|&(_, p)| p / PAGES_PER_BLOCK)
                .sum()
        };
        while kept(cache) + n > cache::LARGE_BLOCKS {
            let Some(next) = (0..ledger::RUNS)
                .map(|i| (cache.next_eviction + i) % ledger::RUNS)
                .find(|&e| cache.runs[e].1 >= PAGES_PER_BLOCK)
            else {
                break;
            };
            self.evict(cache, slot, next);
        }
        let entry = self.empty_entry(cache, slot);
        let (page, pages) = (b * PAGES_PER_BLOCK, n * PAGES_PER_BLOCK);
        ledger::record_run(slot, entry, Some((page, pages)));
        match block::cache_large(self.block(b)) {
            Some(m) if m == n => {
                cache.runs[entry] = (page, pages);
                Ok(())
            }
            Some(_) => {
                // Freed and allocated again with another size since we
                // read it (a free racing a reuse): freed, not kept.
                ledger::record_run(slot, entry, None);
                self.release_large(b, Kind::LargeCached);
                Ok(())
            }
            None => {
                ledger::record_run(slot, entry, None);
                Err("already freed")
            }
        }
    }

    /// An empty run entry of `cache`: the first, or the one
    /// `next_eviction` names after evicting what it keeps.
    fn empty_entry(&self, cache: &mut cache::ThreadCache, slot: &[AtomicU64]) -> usize {
        if let Some(entry) = cache.runs.iter().position(|&(_, pages)| pages == 0) {
            return entry;
        }
        let entry = cache.next_eviction;
        self.evict(cache, slot, entry);
        entry
    }

    /// Gives what run entry `entry` keeps back to the blocks, forgotten
    /// before it is freed: a kill in between leaks it, never frees it
    /// twice.
    fn evict(&self, cache: &mut cache::ThreadCache, slot: &[AtomicU64], entry: usize) {
        cache.next_eviction = (entry + 1) % ledger::RUNS;
        let (page, pages) = cache.runs[entry];
        ledger::record_run(slot, entry, None);
        cache.runs[entry] = (0, 0);
        if pages == 0 {
            return;
        }
        if pages < PAGES_PER_BLOCK {
            self.free_pages(page, pages);
        } else {
            self.release_large(page / PAGES_PER_BLOCK, Kind::LargeCached);
        }
    }

    /// Gives back everything this thread's cache keeps (runs and large
    /// allocations; its spans stay): before an allocation reports the
    /// arena full. Whether it kept anything.
    #[cold]
    #[inline(never)]
    fn release_own_cache(&self) -> bool {
        self.caches
            .with_local(|cache| {
                let kept = cache.runs.iter().any(|&(_, pages)| pages != 0);
                if let Some(slot) = ledger::slot(self.ledger(), cache.slot) {
                    self.release_kept(cache, slot);
                }
                kept
            })
            .unwrap_or(false)
    }

    /// Gives back the runs and large allocations `cache` keeps (recorded in
    /// its ledger slot `slot`) and empties its entries.
    fn release_kept(&self, cache: &mut cache::ThreadCache, slot: &[AtomicU64]) {
        self.release_recorded_runs(slot);
        cache.runs = [(0, 0); ledger::RUNS];
    }

    /// A run of `n` pages aligned to `align` pages, live (its length set):
    /// one this thread's cache keeps, or one claimed from the blocks.
    fn alloc_run(&self, n: u64, align: u64) -> Option<u64> {
        let cached = self
            .with_cache(|cache| self.take_cached_run(cache, n, align))
            .flatten();
        if cached.is_some() {
            return cached;
        }
        let page = self.alloc_pages(n, align)?;
        self.run_len(page).store(n as u32, Ordering::Release);
        Some(page)
    }

    /// A run of exactly `n` pages aligned to `align` from the cache, made
    /// live (its length set before its ledger entry is emptied: see
    /// `ledger`).
    fn take_cached_run(&self, cache: &mut cache::ThreadCache, n: u64, align: u64) -> Option<u64> {
        let entry = cache
            .runs
            .iter()
            .position(|&(page, pages)| pages == n && page % align == 0 && pages != 0)?;
        let (page, _) = cache.runs[entry];
        let slot = ledger::slot(self.ledger(), cache.slot)?;
        self.run_len(page).store(n as u32, Ordering::Release);
        ledger::record_run(slot, entry, None);
        cache.runs[entry] = (0, 0);
        Some(page)
    }

    /// Frees the run starting at `page`: into this thread's cache if it
    /// has one (evicting the entry the cache kept longest when it is
    /// full), else back to its block. The run's length, cleared by one
    /// swap, refuses a second free in any thread or process.
    fn free_run(&self, page: u64) -> Result<(), &'static str> {
        let n = u64::from(self.run_len(page).load(Ordering::Acquire));
        if n == 0 {
            return Err("not the start of a live allocation (never allocated or already freed)");
        }
        if !self.is_run(page, n) {
            return Err("the run's length in the tables is damaged");
        }
        if let Some(freed) = self
            .caches
            .with_local(|cache| self.cache_freed_run(cache, page, n))
        {
            return freed;
        }
        let n = self.take_run_len(page)?;
        self.free_pages(page, n);
        Ok(())
    }

    /// Clears the length of the run at `page` (one swap: of two frees,
    /// one gets it) and returns it. It may differ from what the caller
    /// read if the run was freed and another allocated there meanwhile:
    /// then this frees the new one, as a free after a reuse does.
    fn take_run_len(&self, page: u64) -> Result<u64, &'static str> {
        match u64::from(self.run_len(page).swap(0, Ordering::AcqRel)) {
            0 => Err("not the start of a live allocation (freed by another thread meanwhile)"),
            n if !self.is_run(page, n) => Err("the run's length in the tables is damaged"),
            n => Ok(n),
        }
    }

    /// Whether `n` pages from `page` (numbers read from shared memory)
    /// can be a run: in the data blocks, 1 to the pages left in the block.
    fn is_run(&self, page: u64, n: u64) -> bool {
        let data =
            self.layout.meta_blocks() * PAGES_PER_BLOCK..self.layout.blocks * PAGES_PER_BLOCK;
        data.contains(&page)
            && n > 0
            && n < PAGES_PER_BLOCK
            && n <= PAGES_PER_BLOCK - page % PAGES_PER_BLOCK
    }

    /// [`free_run`](Self::free_run) into the cache: the run is recorded in
    /// the ledger, then its length cleared (see `ledger`).
    fn cache_freed_run(
        &self,
        cache: &mut cache::ThreadCache,
        page: u64,
        n: u64,
    ) -> Result<(), &'static str> {
        let Some(slot) = ledger::slot(self.ledger(), cache.slot) else {
            return Err("the cache ledger is smaller than its slots");
        };
        let entry = self.empty_entry(cache, slot);
        ledger::record_run(slot, entry, Some((page, n)));
        let n = match self.take_run_len(page) {
            Ok(taken) if taken == n => n,
            Ok(taken) => {
                ledger::record_run(slot, entry, Some((page, taken)));
                taken
            }
            Err(e) => {
                ledger::record_run(slot, entry, None);
                return Err(e);
            }
        };
        cache.runs[entry] = (page, n);
        Ok(())
    }

    /// Frees the runs and large allocations a ledger slot records (held by
    /// the caller: a flush, its own thread, or a dead process's slot), each
    /// checked first: an entry that names no possible run or large
    /// allocation is dropped.
    fn release_recorded_runs(&self, slot: &[AtomicU64]) {
        for entry in 0..ledger::RUNS {
            let Some((page, n)) = ledger::run(slot, entry) else {
                continue;
            };
            ledger::record_run(slot, entry, None);
            if self.is_run(page, n) {
                // Recorded and still live: its thread was freeing it
                // (or handing it out) when it stopped.
                self.run_len(page).store(0, Ordering::Release);
                self.free_pages(page, n);
            } else if let Some((b, blocks)) = self.is_large(page, n) {
                // Cached, or live with the recorded size: its thread was
                // freeing it (or handing it out) when it stopped.
                let st = block::observe(self.block(b));
                if st.blocks == blocks && matches!(st.kind, Kind::LargeCached | Kind::LargeHead) {
                    self.release_large(b, st.kind);
                }
            }
        }
    }

    /// Whether `pages` pages from `page` (numbers read from shared memory)
    /// can be a large allocation: whole data blocks. `Some((first block,
    /// blocks))`.
    fn is_large(&self, page: u64, pages: u64) -> Option<(u64, u64)> {
        let (b, n) = (page / PAGES_PER_BLOCK, pages / PAGES_PER_BLOCK);
        (page % PAGES_PER_BLOCK == 0
            && pages % PAGES_PER_BLOCK == 0
            && n > 0
            && b >= self.layout.meta_blocks()
            && b.checked_add(n)
                .is_some_and(|end| end <= self.layout.blocks))
        .then_some((b, n))
    }

    /// Claims `n` pages (`n` < 512) aligned to `align` pages, first fit by
    /// address from a hint, then below it; a new block is opened only when
    /// no page block has a fitting run. Returns the first page's index.
    ///
    /// The hint is this thread's (the block where it last found or freed
    /// room, moved past a block where it lost a race to another thread, so
    /// that threads drift apart instead of fighting over one bitmap), or,
    /// for a thread new to the arena, the process's (lowered by frees).
    fn alloc_pages(&self, n: u64, align: u64) -> Option<u64> {
        let first = self.layout.meta_blocks();
        let id = self.caches.id();
        loop {
            // `try_with`: a thread-local destructor may allocate.
            let hint = RUN_HINT
                .try_with(|h| {
                    let (arena, block) = h.get();
                    (arena == id).then_some(block)
                })
                .ok()
                .flatten()
                .unwrap_or_else(|| self.run_hint.load(Ordering::Relaxed))
                .clamp(first, self.layout.blocks);
            let mut lowest_free = None;
            for b in (hint..self.layout.blocks).chain(first..hint) {
                let slot = self.block(b);
                let state = block::observe(slot);
                if state.kind == Kind::Free {
                    lowest_free = Some(lowest_free.map_or(b, |f: u64| f.min(b)));
                }
                if state.kind != Kind::Pages || state.free_pages < n {
                    continue;
                }
                match self.claim_run_in(b, n, align) {
                    Claim::Won(page) => {
                        let _ = RUN_HINT.try_with(|h| h.set((id, b)));
                        return Some(page);
                    }
                    Claim::Lost => {
                        let _ = RUN_HINT.try_with(|h| h.set((id, b + 1)));
                    }
                    Claim::NoRoom => {}
                }
            }
            // No page block fits: open a new one (first free by address).
            let b = lowest_free?;
            block::to_pages(self.block(b));
        }
    }

    /// Claims a run of `n` pages aligned to `align` in page block `b`.
    fn claim_run_in(&self, b: u64, n: u64, align: u64) -> Claim {
        let slot = self.block(b);
        let bits = self.page_bitmap(b);
        let find =
            || bitmap::find_clear_run(bits, PAGES_PER_BLOCK as usize, n as usize, align as usize);
        // Look before reserving: a block with enough free pages but no run
        // that fits costs no read-modify-write.
        let Some(mut start) = find() else {
            return Claim::NoRoom;
        };
        if !block::reserve_pages(slot, n) {
            return Claim::Lost;
        }
        // A few tries: a concurrent claim may take the run we found.
        for _ in 0..4 {
            if bitmap::claim_range(bits, start, n as usize) {
                return Claim::Won(b * PAGES_PER_BLOCK + start as u64);
            }
            match find() {
                Some(next) => start = next,
                None => break,
            }
        }
        block::unreserve_pages(slot, n);
        Claim::Lost
    }

    fn free_pages(&self, page: u64, n: u64) {
        let b = page / PAGES_PER_BLOCK;
        let released = bitmap::release_range(
            self.page_bitmap(b),
            (page % PAGES_PER_BLOCK) as usize,
            n as usize,
        );
        if !released {
            // Damaged tables: change nothing rather than free pages twice.
            return;
        }
        let free = block::unreserve_pages(self.block(b), n);
        // Written only when it moves: threads share its cache line.
        if b < self.run_hint.load(Ordering::Relaxed) {
            self.run_hint.fetch_min(b, Ordering::Relaxed);
        }
        let id = self.caches.id();
        let _ = RUN_HINT.try_with(|h| {
            if h.get().0 == id && h.get().1 > b {
                h.set((id, b));
            }
        });
        if free == PAGES_PER_BLOCK && self.release == ReleasePolicy::Eager {
            self.release_block(b);
        }
    }

    /// A small object from this thread's cache (the copied word first),
    /// or from a span borrowed without a cache.
    fn alloc_small(&self, class: u32) -> Option<ShmPtr> {
        self.with_cache(|cache| self.alloc_owned(cache, class))
            .unwrap_or_else(|| self.alloc_borrowed(class))
    }

    /// The next free object of the word the cache copied, if any.
    #[inline(always)]
    fn alloc_from_next_word(&self, cache: &mut cache::ThreadCache, class: u32) -> Option<ShmPtr> {
        // Every class is below `CLASSES.len()`, a power of two: the
        // remainder (a mask) leaves no bounds check.
        let c = class as usize % CLASSES.len();
        let at = cache.next[c].at_if_free()?;
        let (owned, remote) = self.owner_and_remote_word(at)?;
        objects::take_next(&mut cache.next[c], owned, remote).map(ShmPtr)
    }

    /// Runs `f` on this thread's cache, giving a thread new to the arena
    /// one first; `None` if there is none to be had.
    #[inline]
    fn with_cache<R>(&self, f: impl Fn(&mut cache::ThreadCache) -> R + Copy) -> Option<R> {
        self.caches.with_local(f).or_else(|| self.with_new_cache(f))
    }

    /// Runs `f` on this thread's cache after giving a thread new to the
    /// arena one (taking over a dead process's ledger slot gives up what
    /// it recorded first); `None` if there is none to be had.
    #[cold]
    fn with_new_cache<R>(&self, f: impl FnOnce(&mut cache::ThreadCache) -> R) -> Option<R> {
        let mut release = |i, slot: &[AtomicU64]| {
            self.release_recorded_spans(i, slot);
        };
        if self.caches.prepare(self.ledger(), &mut release) {
            self.caches.with_local(f)
        } else {
            None
        }
    }

    /// Allocates from the cache's span of `class` (the hot path: plain
    /// loads and stores in the span's owner bitmap, from the cache's copy
    /// of the word it allocates from), collecting remote frees or taking
    /// another span when it is full.
    #[inline]
    fn alloc_owned(&self, cache: &mut cache::ThreadCache, class: u32) -> Option<ShmPtr> {
        let c = class as usize;
        if let Some(p) = self.alloc_from_next_word(cache, class) {
            return Some(p);
        }
        if let Some(span) = cache.spans[c].checked_sub(1) {
            let from = cache.cursor[c] as usize;
            if let Some(p) = self.take_object(cache, class, u64::from(span), from) {
                return Some(p);
            }
        }
        self.alloc_owned_slow(cache, class)
    }

    /// Owner bitmap word `at` of the span table (as a [`objects::NextWord`]
    /// places it) and its remote word.
    #[inline(always)]
    fn owner_and_remote_word(&self, at: usize) -> Option<(&AtomicU64, &AtomicU64)> {
        // One bounds check for both (`at` is below 2^32: no overflow).
        debug_assert!(at <= u32::MAX as usize);
        let words = self.tables.spans.get().get(at..=at + SPAN_BITMAP_WORDS)?;
        Some((&words[0], &words[SPAN_BITMAP_WORDS]))
    }

    /// Where owner bitmap word `w` of span `span` lies in the span table.
    #[inline]
    fn owner_word_at(span: u64, w: usize) -> usize {
        Self::span_desc_at(span) + SPAN_HEAD_WORDS + w
    }

    /// The owner takes the lowest free object of its span `span` of
    /// `class` at or after bitmap word `from`, and moves the cache's
    /// cursor there, with a copy of the word for the next allocations.
    #[inline]
    fn take_object(
        &self,
        cache: &mut cache::ThreadCache,
        class: u32,
        span: u64,
        from: usize,
    ) -> Option<ShmPtr> {
        let (owned, remote) = self.span_objects(span);
        let capacity = layout::capacity(class) as usize;
        let (i, _, bits) = objects::take(owned, remote, capacity, from)?;
        let (w, _) = objects::word_and_bit(i);
        let c = class as usize;
        cache.cursor[c] = w as u8;
        cache.next[c] = objects::NextWord::new(
            bits,
            w,
            capacity,
            span * SPAN,
            u64::from(CLASSES[c]),
            Self::owner_word_at(span, w),
        );
        Some(Self::object_ptr(span, class, i))
    }

    /// The object at index `i` of span `span` of `class` (the inverse of
    /// [`object_index`](Self::object_index)).
    #[inline]
    fn object_ptr(span: u64, class: u32, i: usize) -> ShmPtr {
        ShmPtr(span * SPAN + i as u64 * u64::from(CLASSES[class as usize]))
    }

    /// [`alloc_owned`](Self::alloc_owned) when the cache's span of the
    /// class is missing, or full from the cursor on (everything below the
    /// cursor is taken): collect its remote frees and look again, else
    /// take another span.
    #[cold]
    fn alloc_owned_slow(&self, cache: &mut cache::ThreadCache, class: u32) -> Option<ShmPtr> {
        let c = class as usize;
        // The cache's slot index is its own (process-local), so this is
        // in bounds unless the ledger is smaller than its slots.
        let slot = ledger::slot(self.ledger(), cache.slot)?;
        let mut current = cache.spans[c].checked_sub(1).map(u64::from);
        loop {
            if let Some(span) = current {
                if span::take_pending(self.span_state(span)) {
                    let (owned, remote) = self.span_objects(span);
                    // The copy goes first: the collect clears owner bits.
                    cache.next[c] = objects::NextWord::default();
                    objects::collect(owned, remote, layout::capacity(class) as usize);
                    if let Some(p) = self.take_object(cache, class, span, 0) {
                        return Some(p);
                    }
                }
                // Full: a remote free lists it again.
                self.give_up_span(cache.owner(), Some(slot), class, span);
                cache.set_span(c, None);
            }
            let span = self.adopt_or_carve(
                class,
                cache.owner(),
                Some(slot),
                Some(&mut cache.span_block),
            )?;
            cache.set_span(c, Some(span));
            // Adopted or carved with room: this finds an object unless the
            // tables are damaged (then the span is given up above).
            if let Some(p) = self.take_object(cache, class, span, 0) {
                return Some(p);
            }
            current = Some(span);
        }
    }

    /// A small allocation by a thread without a cache: it owns a span for
    /// this one allocation.
    fn alloc_borrowed(&self, class: u32) -> Option<ShmPtr> {
        let capacity = layout::capacity(class) as usize;
        loop {
            let span = self.adopt_or_carve(class, BORROWED, None, None)?;
            let (owned, remote) = self.span_objects(span);
            let found = objects::take(owned, remote, capacity, 0);
            self.give_up_span(BORROWED, None, class, span);
            if let Some((i, _, _)) = found {
                return Some(Self::object_ptr(span, class, i));
            }
        }
    }

    /// A span of `class` for `owner` (recorded in its ledger `slot`, if it
    /// has one) with a free object: an unowned one from the class's stack
    /// (its remote frees collected), or a freshly carved one (in the
    /// cache's own `block`, if it has one: see [`span_pages`](Self::span_pages)).
    fn adopt_or_carve(
        &self,
        class: u32,
        owner: u32,
        slot: Option<&[AtomicU64]>,
        block: Option<&mut u64>,
    ) -> Option<u64> {
        let capacity = layout::capacity(class) as usize;
        let record = |span| {
            if let Some(slot) = slot {
                ledger::record(slot, class, span);
            }
        };
        while let Some(span) = stack::pop(self.partial(class), &self.span_links()) {
            let span = u64::from(span);
            if !self.is_slot(span) {
                // A damaged stack head: carve instead.
                break;
            }
            // Recorded before it is ours, forgotten after it is not: a
            // reclaimer finds every span the slot owns.
            record(Some(span));
            let state = self.span_state(span);
            if !span::adopt(state, class, owner) {
                record(None);
                continue;
            }
            let (owned, remote) = self.span_objects(span);
            if span::take_pending(state) {
                objects::collect(owned, remote, capacity);
            }
            if objects::room_and_empty(owned, capacity).0 {
                return Some(span);
            }
            // Listed, but full: unlisted until a remote free makes room.
            self.give_up_span(owner, slot, class, span);
        }
        // Carve a new span. Its pages are ours; its bitmaps may hold
        // what the last span there left.
        let page = self.span_pages(block)?;
        let span = page / SPAN_PAGES;
        let desc = self.span_desc(span);
        let (owned, remote) = Self::objects_of(desc);
        objects::clear(owned, remote);
        desc[SPAN_DIVISOR_WORD].store(layout::divisor_word(class), Ordering::Relaxed);
        record(Some(span));
        span::carve(&desc[0], class, owner);
        Some(span)
    }

    /// The pages of a new span. A thread cache carves its spans in a block
    /// of its own (`block`, opened when it has none or it is full) while
    /// there are free blocks, so that the span descriptors two threads
    /// write are in different pages (see `layout::SPAN_HEAD_WORDS`); then
    /// anywhere, first fit.
    fn span_pages(&self, block: Option<&mut u64>) -> Option<u64> {
        let Some(own) = block else {
            return self.alloc_pages(SPAN_PAGES, SPAN_PAGES);
        };
        for _ in 0..2 {
            let b = *own;
            if (self.layout.meta_blocks()..self.layout.blocks).contains(&b)
                && block::observe(self.block(b)).kind == Kind::Pages
                && let Claim::Won(page) = self.claim_run_in(b, SPAN_PAGES, SPAN_PAGES)
            {
                return Some(page);
            }
            // Full (or taken back): open a free block, the lowest.
            *own = (self.layout.meta_blocks()..self.layout.blocks)
                .find(|&b| block::to_pages(self.block(b)))?;
        }
        let page = self.alloc_pages(SPAN_PAGES, SPAN_PAGES)?;
        *own = page / PAGES_PER_BLOCK;
        Some(page)
    }

    /// `owner` gives span `span` up (and forgets it in its ledger `slot`):
    /// listed if it has room, retired if it is empty, left unlisted if it
    /// is full.
    fn give_up_span(&self, owner: u32, slot: Option<&[AtomicU64]>, class: u32, span: u64) {
        let capacity = layout::capacity(class) as usize;
        let state = self.span_state(span);
        let (owned, remote) = self.span_objects(span);
        if span::take_pending(state) {
            objects::collect(owned, remote, capacity);
        }
        let (room, empty) = objects::room_and_empty(owned, capacity);
        match span::give_up(state, owner, room, empty) {
            GaveUp::List => stack::push(self.partial(class), &self.span_links(), span as u32),
            GaveUp::Retire => self.free_pages(span * SPAN_PAGES, SPAN_PAGES),
            GaveUp::Unowned | GaveUp::NotOwner => {}
        }
        if let Some(slot) = slot {
            ledger::record(slot, class, None);
        }
    }

    /// Retires the unowned spans on the stacks that are empty (a flush,
    /// after giving this process's spans up): spans whose objects other
    /// threads freed stay listed until a thread adopts them, and memory
    /// freed that way would otherwise stay in spans.
    fn retire_empty_spans(&self) {
        for class in 0..CLASSES.len() as u32 {
            let mut keep = Vec::new();
            while let Some(span) = stack::pop(self.partial(class), &self.span_links()) {
                let span = u64::from(span);
                if !self.is_slot(span) {
                    break;
                }
                if span::adopt(self.span_state(span), class, BORROWED) {
                    keep.push(span);
                }
            }
            // Given up after the pops: a span pushed back is not popped
            // again by this loop.
            for span in keep {
                self.give_up_span(BORROWED, None, class, span);
            }
        }
    }

    /// Frees an allocation. Pointers that are not live allocations (never
    /// allocated, freed already, or pointing inside an allocation) are
    /// rejected with [`Error::InvalidFree`] and change nothing.
    #[inline(always)]
    pub fn free(&self, ptr: ShmPtr) -> Result<()> {
        // A small object of a span this thread's cache owns takes the
        // short path; everything else, errors included, is a tail call out
        // of line (which looks again), so that this one needs few
        // registers. An active span's state says enough: it lies in a
        // page block whose pages it holds (`span`'s protocol), so the
        // block's word is not read here.
        if let Ok(offset) = self.offset_of(ptr)
            && offset >= self.layout.meta_len
        {
            let slot = offset / SPAN;
            // The index from the descriptor's divisor word, which the load
            // of the state word does not delay (`span::class_and_index`).
            if let Some(desc) = self.tables.span_desc(slot)
                && let Some((class, index)) =
                    span::class_and_index(&desc[0], &desc[SPAN_DIVISOR_WORD], offset - slot * SPAN)
                && let Some(mut cache) = self.caches.open_last()
                && let Some(Ok(())) =
                    Self::free_if_owned(cache.contents(), desc, slot, class, index)
            {
                return Ok(());
            }
        }
        self.free_other(ptr)
    }

    /// [`free`](Self::free) of anything but an object of a span this
    /// thread's cache owns, and of refused frees.
    #[inline(never)]
    fn free_other(&self, ptr: ShmPtr) -> Result<()> {
        let offset = self.offset_of(ptr)?;
        let invalid = |reason| Error::InvalidFree { offset, reason };
        if offset < self.layout.meta_len || offset >= self.layout.data_len {
            return Err(invalid("outside the arena's allocatable blocks"));
        }
        let slot = offset / SPAN;
        let desc = self.span_desc(slot);
        if let Some(st) = span::describe(&desc[0]) {
            return self
                .free_small(desc, slot, st.class, offset)
                .map_err(invalid);
        }
        let b = offset / BLOCK;
        match block::observe(self.block(b)).kind {
            Kind::LargeHead if offset % BLOCK == 0 => self.free_large(b).map_err(invalid),
            Kind::LargeCached if offset % BLOCK == 0 => Err(invalid("already freed")),
            // Not in an active span (looked above): a page run or nothing.
            Kind::Pages if offset % PAGE != 0 => Err(invalid("not the start of an allocation")),
            Kind::Pages => self.free_run(offset / PAGE).map_err(invalid),
            Kind::LargeHead | Kind::LargeTail => Err(invalid("inside a large allocation")),
            _ => Err(invalid("in a block with no live allocation")),
        }
    }

    /// The index in its span of the object of `class` at `offset`, if
    /// `offset` is an object boundary.
    #[inline(always)]
    fn object_index(slot: u64, class: u32, offset: u64) -> Option<usize> {
        layout::object_at(offset - slot * SPAN, class)
    }

    /// Frees a small object: with plain stores in the span's owner bitmap
    /// if this thread's cache owns the span, else by setting its bit in
    /// the remote bitmap (`objects`, which also says which double frees
    /// are refused).
    fn free_small(
        &self,
        desc: &[AtomicU64; SPAN_DESC_WORDS],
        span: u64,
        class: u32,
        offset: u64,
    ) -> Result<(), &'static str> {
        let index = Self::object_index(span, class, offset).ok_or("not the start of an object")?;
        let by_owner = self
            .caches
            .with_local(|cache| Self::free_if_owned(cache, desc, span, class, index))
            .flatten();
        match by_owner {
            Some(freed) => freed,
            None => self.free_remote_small(span, class, index),
        }
    }

    /// The owner's free of object `index` of span `span` of `class`, if
    /// `cache` owns the span (`None`: it does not, nothing changed). The
    /// cache's own record decides, not the shared state word: a flush may
    /// have given the span up since that was read.
    #[inline(always)]
    fn free_if_owned(
        cache: &mut cache::ThreadCache,
        desc: &[AtomicU64; SPAN_DESC_WORDS],
        span: u64,
        class: u32,
        index: usize,
    ) -> Option<Result<(), &'static str>> {
        // No closure: the free's fast path inlines all of this.
        if cache.spans[class as usize] != span as u32 + 1 {
            return None;
        }
        let (owned, remote) = Self::objects_of(desc);
        if let Err(reason) = objects::free_owned(owned, remote, index) {
            return Some(Err(reason));
        }
        Self::note_owner_free(cache, span, class, index);
        Some(Ok(()))
    }

    /// The owner freed object `index` of its span `span` of `class`: its
    /// next allocation looks from that object's word, or its copy of the
    /// word it allocates from stays exact.
    #[inline(always)]
    fn note_owner_free(cache: &mut cache::ThreadCache, span: u64, class: u32, index: usize) {
        let c = class as usize;
        let (w, bit) = objects::word_and_bit(index);
        if w < usize::from(cache.cursor[c]) {
            cache.cursor[c] = w as u8;
            cache.next[c] = objects::NextWord::default();
        } else {
            cache.next[c].note_owner_free(Self::owner_word_at(span, w), bit);
        }
    }

    /// [`free_small`](Self::free_small) by a thread that does not own the
    /// span: sets the object's remote bit, and lists the span when enough
    /// of it is free again. Out of line: the owner's path stays small.
    #[inline(never)]
    fn free_remote_small(&self, span: u64, class: u32, index: usize) -> Result<(), &'static str> {
        let capacity = layout::capacity(class) as usize;
        let objects = self.span_objects(span);
        if span::free_remotely(self.span_state(span), class, capacity, objects, index)? {
            stack::push(self.partial(class), &self.span_links(), span as u32);
        }
        Ok(())
    }

    /// Frees the large allocation whose head is block `b`: into this
    /// thread's cache if it keeps such, else back to the blocks. Its head's
    /// CAS refuses a second free in any thread or process.
    fn free_large(&self, b: u64) -> Result<(), &'static str> {
        let n = block::observe(self.block(b)).blocks;
        if self.caches_large(n)
            && b + n <= self.layout.blocks
            && let Some(freed) = self
                .caches
                .with_local(|cache| self.cache_freed_large(cache, b, n))
        {
            return freed;
        }
        if self.release_large(b, Kind::LargeHead) {
            Ok(())
        } else {
            Err("already freed")
        }
    }

    /// Frees the large allocation whose head, block `b`, is `from` (live
    /// or kept by a cache): its head taken by one CAS (of two callers, one
    /// gets it), then its pages punched out if the arena releases eagerly
    /// and its blocks made free. Whether this call freed it.
    fn release_large(&self, b: u64, from: Kind) -> bool {
        let Some(n) = block::begin_free_large(self.block(b), from) else {
            return false;
        };
        // A damaged count frees no block that is not there.
        let n = n.clamp(1, self.layout.blocks - b);
        let punch = self.release == ReleasePolicy::Eager;
        if punch {
            self.punch(b, n);
        }
        // Tails first: the head stays RELEASING (ours) until the end.
        for t in b + 1..b + n {
            block::finish(self.block(t), !punch);
        }
        block::finish(self.block(b), !punch);
        true
    }

    /// Writes a snapshot of the arena (its tables and all its data,
    /// including pages of a restored arena not touched since) to `path`;
    /// see [`crate::persist`] for the consistency contract.
    pub fn snapshot(&self, path: impl AsRef<Path>) -> Result<crate::persist::SnapshotInfo> {
        self.flush_thread_caches();
        crate::persist::snapshot_populator(&self.populator, path)
    }

    /// Gives every entirely free block's pages back to the kernel (punch
    /// hole, and their population state goes back to absent, so the next
    /// touch fills them again), after flushing this process's thread
    /// caches (the runs they keep, and their spans, hold blocks). Returns
    /// the number of blocks released.
    pub fn release_free_blocks(&self) -> usize {
        self.flush_thread_caches();
        (self.layout.meta_blocks()..self.layout.blocks)
            .filter(|&b| self.release_block(b))
            .count()
    }

    fn release_block(&self, b: u64) -> bool {
        let slot = self.block(b);
        if !block::begin_release(slot) {
            return false;
        }
        self.punch(b, 1);
        block::finish(slot, false);
        true
    }

    /// Gives blocks `[b, b + n)` back to the kernel: their pages leave
    /// every process and the file, and fill again on their next touch.
    fn punch(&self, b: u64, n: u64) {
        // An error leaves the blocks free and correct; only their memory
        // stays resident (a stuck filler kept some of it). The populator's
        // `failures()` records what failed.
        let _ = self
            .populator
            .discard((b * BLOCK) as usize, (n * BLOCK) as usize);
    }

    /// Checks that the tables agree with each other, for tests and
    /// debugging; call it while nobody allocates or frees. Every page of a
    /// page block must be free, in exactly one live run, or in one span;
    /// each block's free count must not exceed its bitmap's free pages.
    /// Spans that dead processes owned go back first (see
    /// [`ArenaStats::cached_objects`]), and so do spans that threads
    /// without a cache were killed holding, and kept large allocations
    /// that no cache records. Pages reserved but not marked, or
    /// marked but recorded by no run or span, are counted as
    /// [`ArenaStats::leaked_pages`], not an error: a process killed inside
    /// an allocation leaves them. Returns the first disagreement.
    pub fn audit(&self) -> std::result::Result<ArenaStats, AuditError> {
        self.reclaim_dead_caches(false);
        self.reclaim_borrowed_spans();
        self.flush_thread_caches();
        self.release_unrecorded_large();
        let cached_runs = self.cached_runs();
        let mut leaked = 0;
        for b in self.layout.meta_blocks()..self.layout.blocks {
            let st = block::observe(self.block(b));
            if st.kind != Kind::Pages {
                continue;
            }
            let bits = self.page_bitmap(b);
            let set = bitmap::count_set(bits, PAGES_PER_BLOCK as usize) as u64;
            // Fewer counted free than marked free: a reservation whose
            // process died before marking its pages (leaked). More: pages
            // marked that nothing reserved.
            if st.free_pages > PAGES_PER_BLOCK - set {
                return Err(AuditError::FreeCount {
                    block: b,
                    counted: st.free_pages,
                    in_use: set,
                });
            }
            leaked += PAGES_PER_BLOCK - set - st.free_pages;
            let first = b * PAGES_PER_BLOCK;
            let mut covered = vec![false; PAGES_PER_BLOCK as usize];
            let mut cover = |from: u64, n: u64, owner: PageOwner| {
                for p in from..from + n {
                    let i = (p - first) as usize;
                    if i >= covered.len() || covered[i] || !bitmap::is_set(bits, i) {
                        return Err(AuditError::PageConflict { page: p, owner });
                    }
                    covered[i] = true;
                }
                Ok(())
            };
            for slot in first / SPAN_PAGES..(first + PAGES_PER_BLOCK) / SPAN_PAGES {
                if span::describe(self.span_state(slot)).is_some() {
                    cover(slot * SPAN_PAGES, SPAN_PAGES, PageOwner::Span)?;
                }
            }
            for p in first..first + PAGES_PER_BLOCK {
                let n = u64::from(self.run_len(p).load(Ordering::Acquire));
                if n != 0 {
                    cover(p, n, PageOwner::Run)?;
                }
            }
            for &(p, n) in cached_runs.iter().filter(|(p, _)| p / PAGES_PER_BLOCK == b) {
                cover(p, n, PageOwner::Run)?;
            }
            leaked += covered
                .iter()
                .enumerate()
                .filter(|&(i, &c)| !c && bitmap::is_set(bits, i))
                .count() as u64;
        }
        Ok(ArenaStats {
            leaked_pages: leaked,
            ..self.stats()
        })
    }

    /// The page runs every held ledger slot records, `(first page,
    /// pages)`, those that name no possible run left out.
    fn cached_runs(&self) -> Vec<(u64, u64)> {
        self.recorded_entries()
            .filter(|&(p, n)| self.is_run(p, n))
            .collect()
    }

    /// Every run entry of every held ledger slot, unvalidated.
    fn recorded_entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        ledger::slots(self.ledger())
            .filter(|(_, slot)| ledger::holder(slot).is_some())
            .flat_map(|(_, slot)| (0..ledger::RUNS).filter_map(|e| ledger::run(slot, e)))
    }

    /// Gives back the kept large allocations that no held ledger slot
    /// records: a process killed between forgetting one it evicted and
    /// freeing it leaves it so. Only while nobody allocates (`audit`, a
    /// restore).
    fn release_unrecorded_large(&self) {
        let recorded: Vec<u64> = self
            .recorded_entries()
            .filter_map(|(p, n)| self.is_large(p, n))
            .map(|(b, _)| b)
            .collect();
        for b in self.layout.meta_blocks()..self.layout.blocks {
            if block::observe(self.block(b)).kind == Kind::LargeCached && !recorded.contains(&b) {
                self.release_large(b, Kind::LargeCached);
            }
        }
    }

    /// Scans the tables. Not atomic as a whole: under concurrent use the
    /// numbers are each right at some moment of the scan.
    pub fn stats(&self) -> ArenaStats {
        let mut s = ArenaStats {
            data_bytes: self.layout.data_len,
            meta_bytes: self.layout.meta_len,
            cached_run_bytes: self.cached_runs().iter().map(|(_, n)| n * PAGE).sum(),
            ..ArenaStats::default()
        };
        for b in self.layout.meta_blocks()..self.layout.blocks {
            let st = block::observe(self.block(b));
            match st.kind {
                Kind::Pages => {
                    s.page_blocks += 1;
                    let first_slot = b * BLOCK / SPAN;
                    let mut span_pages = 0;
                    for slot in first_slot..first_slot + BLOCK / SPAN {
                        if let Some(st) = span::describe(self.span_state(slot)) {
                            let capacity = layout::capacity(st.class);
                            let (owned, remote) = self.span_objects(slot);
                            let live = objects::live(owned, remote, capacity as usize);
                            s.spans += 1;
                            s.small_objects += live;
                            s.small_bytes += live * u64::from(CLASSES[st.class as usize]);
                            if st.owner != 0 {
                                s.cached_objects += capacity - live;
                            }
                            span_pages += SPAN_PAGES;
                        }
                    }
                    let used_pages =
                        bitmap::count_set(self.page_bitmap(b), PAGES_PER_BLOCK as usize) as u64;
                    s.run_bytes += (used_pages.saturating_sub(span_pages)) * PAGE;
                    let first_page = b * PAGES_PER_BLOCK;
                    s.runs += (first_page..first_page + PAGES_PER_BLOCK)
                        .filter(|&p| self.run_len(p).load(Ordering::Relaxed) != 0)
                        .count() as u64;
                }
                Kind::LargeHead => {
                    s.large_allocs += 1;
                    s.large_blocks += st.blocks;
                    s.large_bytes += st.blocks * BLOCK;
                }
                Kind::LargeCached => s.cached_large_bytes += st.blocks * BLOCK,
                Kind::Free if st.dirty => s.free_dirty_blocks += 1,
                Kind::Free => s.free_clean_blocks += 1,
                _ => {}
            }
        }
        // The cached runs' pages are marked in their blocks.
        s.run_bytes = s.run_bytes.saturating_sub(s.cached_run_bytes);
        s
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        self.flush_thread_caches();
        self.caches.give_up_slots(self.ledger());
    }
}

/// The span slots' link words, as the stack's link table.
struct SpanLinks<'a>(&'a Arena);

impl stack::Links for SpanLinks<'_> {
    type Slot = AtomicU64;
    fn link(&self, slot: u32) -> Option<&AtomicU64> {
        self.0
            .is_slot(u64::from(slot))
            .then(|| &self.0.span_desc(u64::from(slot))[1])
    }
}

const _: () = assert!(HEADER as usize >= hdr::WORDS * 8);

/// What a page-run search found in one block.
enum Claim {
    /// The run starting at this page is the caller's.
    Won(u64),
    /// A run fit, but another thread took it or the block's pages first.
    Lost,
    /// No run fits.
    NoRoom,
}

thread_local! {
    /// This thread's page-run hint: (arena id, block). One arena's at a
    /// time (a thread using several starts from the process's hint in the
    /// others).
    static RUN_HINT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

#[allow(unsafe_code)] // the allocator trait is unsafe to implement
// SAFETY: `allocate` returns memory of at least `layout.size()` bytes with
// `layout.align()` alignment that no other allocation overlaps until it is
// passed to `deallocate`; the arena (and so its mapping) outlives every use
// through `&self`. Zero-sized requests get a dangling aligned pointer.
unsafe impl allocator_api2::alloc::Allocator for Arena {
    fn allocate(
        &self,
        layout: AllocLayout,
    ) -> std::result::Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            let dangling = NonNull::new(layout.align() as *mut u8).expect("align is non-zero");
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        let ptr = self
            .alloc(layout)
            .map_err(|_| allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(
            self.local(ptr)
                .map_err(|_| allocator_api2::alloc::AllocError)?,
            layout.size(),
        ))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: AllocLayout) {
        if layout.size() == 0 {
            return;
        }
        let shm = self
            .shm_ptr(ptr.as_ptr())
            .expect("deallocate of a pointer from another allocator");
        if let Err(e) = self.free(shm) {
            panic!("deallocate: {e}");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::BackendKind;
    use crate::populate::state::Owner;
    use std::sync::Barrier;

    /// An alloc and a free of a small object in a new thread, while
    /// `busy` other new threads hold their caches: 1 if a cache owns the
    /// object's span afterwards, 0 if not.
    fn round_trip(a: &Arena, busy: usize) -> u64 {
        a.flush_thread_caches();
        let (held, done) = (Barrier::new(busy + 1), Barrier::new(busy + 1));
        std::thread::scope(|s| {
            for _ in 0..busy {
                s.spawn(|| {
                    a.free(a.alloc_bytes(40).unwrap()).unwrap();
                    held.wait();
                    done.wait();
                });
            }
            held.wait();
            let owned = s
                .spawn(|| {
                    let p = a.alloc_bytes(4000).unwrap();
                    a.free(p).unwrap();
                    let st = span::describe(a.span_state(p.offset() / SPAN));
                    u64::from(st.is_some_and(|st| st.owner != 0))
                })
                .join()
                .unwrap();
            done.wait();
            owned
        })
    }

    #[test]
    fn a_thread_without_a_free_ledger_slot_adopts_a_dead_processs_or_goes_uncached() {
        let a = Arena::create(
            RegionOptions::new(8 << 20).backend(BackendKind::Shmem),
            PopulateOptions::new(),
        )
        .unwrap();
        assert_eq!(round_trip(&a, 0), 1, "a free slot: cached");
        // Every other slot held by a live process (this one, as another
        // arena handle would hold it).
        let me = Owner::current().unwrap();
        for i in 0..ledger::SLOTS {
            ledger::claim(ledger::slot(a.ledger(), i).unwrap(), me);
        }
        assert_eq!(round_trip(&a, 0), 1, "the exited thread's cache is reused");
        assert_eq!(round_trip(&a, 1), 0, "no slot: uncached");
        // One slot held by a process proven dead (a pid past any
        // `pid_max`, which `kill` reports as absent): adopted.
        let pid = 1 << 30;
        let slot = ledger::slot(a.ledger(), 7).unwrap();
        ledger::give_up(slot);
        assert!(ledger::claim(slot, Owner::new(pid, 1)));
        assert_eq!(round_trip(&a, 1), 1, "the dead process's slot adopted");
        assert_eq!(ledger::holder(slot), Some(me));
        a.flush_thread_caches();
        assert_eq!(a.stats().cached_objects, 0);
        assert_eq!(a.audit().unwrap().spans, 0, "every span empty and retired");
    }

    /// A span's divisor word only speeds a free up: without one (a span
    /// carved before the word was kept) or naming another class, frees
    /// take the table's division, free the right object and refuse double
    /// frees, in the owner's thread and others. A word damaged past its
    /// class (as any shared word can be) never indexes out of bounds.
    #[test]
    fn frees_take_the_tables_division_when_a_spans_divisor_word_is_missing_or_wrong() {
        let a = Arena::create(
            RegionOptions::new(8 << 20).backend(BackendKind::Shmem),
            PopulateOptions::new(),
        )
        .unwrap();
        // Objects 0 and 1 stay allocated until the end: a free that took
        // a missing word's index (0) would free one of them.
        let ps: Vec<ShmPtr> = (0..6).map(|_| a.alloc_bytes(48).unwrap()).collect();
        let slot = ps[0].offset() / SPAN;
        let class = span::describe(a.span_state(slot)).unwrap().class;
        let word = &a.span_desc(slot)[SPAN_DIVISOR_WORD];
        assert_eq!(word.load(Ordering::Relaxed), layout::divisor_word(class));
        for (i, bad) in [0, layout::divisor_word(class + 1)].into_iter().enumerate() {
            word.store(bad, Ordering::Relaxed);
            let (mine, theirs) = (ps[2 * i + 2], ps[2 * i + 3]);
            a.free(mine).unwrap();
            assert!(matches!(a.free(mine), Err(Error::InvalidFree { .. })));
            std::thread::scope(|s| {
                s.spawn(|| {
                    a.free(theirs).unwrap();
                    assert!(a.free(theirs).is_err());
                });
            });
            assert!(a.free(ShmPtr::from_offset(mine.offset() + 16)).is_err());
        }
        word.store(layout::divisor_word(class), Ordering::Relaxed);
        a.free(ps[0]).unwrap();
        a.free(ps[1]).unwrap();
        a.flush_thread_caches();
        let stats = a.audit().unwrap();
        assert_eq!((stats.small_objects, stats.in_use_bytes()), (0, 0));
        let ps: Vec<ShmPtr> = (0..64).map(|_| a.alloc_bytes(48).unwrap()).collect();
        let slot = ps[0].offset() / SPAN;
        let word = &a.span_desc(slot)[SPAN_DIVISOR_WORD];
        for (i, p) in ps.iter().enumerate() {
            let damage = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8;
            word.store(layout::divisor_word(class) ^ damage, Ordering::Relaxed);
            let _ = a.free(*p);
        }
    }

    /// A 32 MiB arena without thread caches and the head blocks of `n`
    /// large allocations of `bytes` in it.
    fn arena_with_large(n: usize, bytes: usize) -> (Arena, Vec<u64>) {
        let a = Arena::create(
            RegionOptions::new(32 << 20).backend(BackendKind::Shmem),
            PopulateOptions::new(),
        )
        .unwrap();
        a.set_thread_caches(false);
        let heads = (0..n)
            .map(|_| a.alloc_bytes(bytes).unwrap().offset() / BLOCK)
            .collect();
        (a, heads)
    }

    /// What a process killed at each step of keeping large allocations
    /// leaves: one kept (recorded, cached), one being handed out or freed
    /// (recorded, live), one being evicted (cached, no longer recorded).
    /// A fresh audit gives all three back.
    #[test]
    fn large_allocations_a_killed_process_kept_or_was_moving_go_back() {
        let (a, heads) = arena_with_large(3, 2 << 20);
        let slot = ledger::slot(a.ledger(), 9).unwrap();
        // A pid past any `pid_max`: proven dead.
        assert!(ledger::claim(slot, Owner::new(1 << 30, 1)));
        ledger::record_run(slot, 0, Some((heads[0] * PAGES_PER_BLOCK, PAGES_PER_BLOCK)));
        assert_eq!(block::cache_large(a.block(heads[0])), Some(1));
        ledger::record_run(slot, 1, Some((heads[1] * PAGES_PER_BLOCK, PAGES_PER_BLOCK)));
        assert_eq!(block::cache_large(a.block(heads[2])), Some(1));
        let before = a.stats();
        assert_eq!(
            (before.large_allocs, before.cached_large_bytes),
            (1, 2 * BLOCK)
        );
        let after = a.audit().unwrap();
        assert_eq!((after.large_allocs, after.cached_large_bytes), (0, 0));
        assert_eq!((after.in_use_bytes(), after.leaked_pages), (0, 0));
        assert_eq!(
            ledger::holder(slot),
            None,
            "the dead process's slot is free"
        );
        assert_eq!(ledger::run(slot, 0), None);
    }

    /// A snapshot taken while another process's cache keeps a large
    /// allocation (recorded) and while it evicts one (not recorded): the
    /// restored arena has neither.
    #[test]
    fn a_restore_gives_back_the_large_allocations_caches_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let (a, heads) = arena_with_large(2, 4 << 20);
        let slot = ledger::slot(a.ledger(), 3).unwrap();
        // Held by a living process (this one, as another would hold it).
        assert!(ledger::claim(slot, Owner::current().unwrap()));
        ledger::record_run(
            slot,
            0,
            Some((heads[0] * PAGES_PER_BLOCK, 2 * PAGES_PER_BLOCK)),
        );
        for &b in &heads {
            assert_eq!(block::cache_large(a.block(b)), Some(2));
        }
        a.snapshot(&path).unwrap();
        assert_eq!(
            a.stats().cached_large_bytes,
            4 * BLOCK,
            "kept by the caches"
        );
        let restored = Arena::restore(&path, PopulateOptions::new()).unwrap();
        let stats = restored.stats();
        assert_eq!((stats.cached_large_bytes, stats.large_allocs), (0, 0));
        assert_eq!(stats.held_bytes(), 0, "both given back at the restore");
        assert_eq!(restored.audit().unwrap().in_use_bytes(), 0);
    }
}
