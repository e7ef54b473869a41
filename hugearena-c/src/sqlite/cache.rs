//! One SQLite page cache: pages keyed by page number, pinned while SQLite
//! uses them, kept in LRU order once unpinned, recycled at the cache's size
//! limit. The rules are those SQLite documents for `sqlite3_pcache_methods2`
//! (and its default cache follows); [`super`] adapts them to the C calls.
//!
//! Page buffers live in chunks of a few dozen slots carved from a hugearena
//! arena (or the heap, once the arena is full): one allocation per chunk,
//! not per page. A slot's buffer and extra bytes never move, so the
//! `sqlite3_pcache_page` handed to SQLite stays valid until the slot is
//! released.

use std::alloc::Layout;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use hugearena::{Arena, ShmPtr};

use super::STATS;

/// SQLite's `sqlite3_pcache_page`: the page's buffer and its extra bytes.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct PcachePage {
    pub(crate) buf: *mut u8,
    pub(crate) extra: *mut u8,
}

/// What SQLite holds: the page, and (after it, never read by SQLite) which
/// slot it is. Immutable once its chunk is made.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) page: PcachePage,
    slot: u32,
}

/// A slot's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Pinned,
    Unpinned,
}

/// No slot (the end of the LRU list).
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Meta {
    key: u32,
    state: State,
    /// LRU neighbours, while `Unpinned`.
    older: u32,
    newer: u32,
}

const FREE: Meta = Meta {
    key: 0,
    state: State::Free,
    older: NIL,
    newer: NIL,
};

/// Where a chunk's bytes came from.
#[derive(Debug)]
enum Backing {
    Arena(ShmPtr),
    Heap(Layout),
}

#[derive(Debug)]
struct Chunk {
    handles: Box<[Handle]>,
    memory: NonNull<u8>,
    backing: Backing,
    /// Slots not free.
    used: u32,
}

/// A page number hashes to itself, spread by a multiply: page numbers are
/// dense small integers and need no defence against collisions by design.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, key: u32) {
        self.0 = u64::from(key).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A cache's pages, behind the cache's mutex.
#[derive(Debug)]
pub(crate) struct Cache {
    page_size: usize,
    extra_size: usize,
    /// Extra bytes per slot, rounded up to 8.
    extra_stride: usize,
    slots_per_chunk: u32,
    purgeable: bool,
    /// The size limit (purgeable caches only).
    max_pages: usize,
    /// Pinned pages above which a "create if easy" fetch fails, so SQLite
    /// spills dirty pages first.
    max_pinned: usize,
    map: HashMap<u32, u32, BuildHasherDefault<KeyHasher>>,
    meta: Vec<Meta>,
    chunks: Vec<Option<Chunk>>,
    free: Vec<u32>,
    /// Least recently unpinned (recycled first).
    lru_oldest: u32,
    lru_newest: u32,
    pinned: usize,
    arena: Option<Arc<Arena>>,
    /// Hits and misses not yet added to the process's counters (added in
    /// batches: an atomic add per fetch costs more than the fetch).
    hits: u64,
    misses: u64,
}

// SAFETY: the raw pointers are to chunk memory this cache owns (the arena's
// or the heap's); SQLite serializes calls on one cache, and the cache sits
// behind a mutex besides.
unsafe impl Send for Cache {}

/// How eager a fetch is to create a missing page (SQLite's `createFlag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Create {
    /// Only look the page up.
    No,
    /// Create it if that is easy: not when most of the cache is pinned.
    IfEasy,
    /// Create it unless that is impossible.
    Always,
}

impl Cache {
    /// Chunks are about this many bytes.
    const CHUNK_BYTES: usize = 128 << 10;

    pub(crate) fn new(
        page_size: usize,
        extra_size: usize,
        purgeable: bool,
        arena: Option<Arc<Arena>>,
    ) -> Cache {
        let extra_stride = extra_size.div_ceil(8) * 8;
        let slots_per_chunk =
            (Self::CHUNK_BYTES / (page_size + extra_stride).max(1)).clamp(4, 1024) as u32;
        Cache {
            page_size,
            extra_size,
            extra_stride,
            slots_per_chunk,
            purgeable,
            max_pages: 100,
            max_pinned: 90,
            map: HashMap::default(),
            meta: Vec::new(),
            chunks: Vec::new(),
            free: Vec::new(),
            lru_oldest: NIL,
            lru_newest: NIL,
            pinned: 0,
            arena,
            hits: 0,
            misses: 0,
        }
    }

    /// Pages in the cache, pinned or not.
    pub(crate) fn pages(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn set_max_pages(&mut self, n: usize) {
        if self.purgeable {
            self.max_pages = n;
            self.max_pinned = n * 9 / 10;
            self.enforce_limit(self.max_pages);
        }
    }

    fn handle(&self, slot: u32) -> *mut Handle {
        let chunk = self.chunks[(slot / self.slots_per_chunk) as usize]
            .as_ref()
            .expect("a used slot's chunk exists");
        std::ptr::from_ref(&chunk.handles[(slot % self.slots_per_chunk) as usize]).cast_mut()
    }

    /// The slot a handle SQLite gave back is.
    ///
    /// # Safety
    ///
    /// `page` is a handle this cache returned from `fetch`, not released.
    pub(crate) unsafe fn slot_of(&self, page: *const PcachePage) -> u32 {
        // SAFETY: `PcachePage` is the first field of the `repr(C)` `Handle`
        // it came from; handles are immutable while their chunk lives.
        unsafe { (*page.cast::<Handle>()).slot }
    }

    pub(crate) fn fetch(&mut self, key: u32, create: Create) -> *mut Handle {
        if let Some(&slot) = self.map.get(&key) {
            if self.meta[slot as usize].state == State::Unpinned {
                self.lru_unlink(slot);
                self.meta[slot as usize].state = State::Pinned;
                self.pinned += 1;
            }
            self.count(true);
            return self.handle(slot);
        }
        self.count(false);
        match create {
            Create::No => return std::ptr::null_mut(),
            Create::IfEasy if self.purgeable && self.pinned >= self.max_pinned => {
                return std::ptr::null_mut();
            }
            _ => {}
        }
        let slot =
            if self.purgeable && self.lru_oldest != NIL && self.map.len() + 1 >= self.max_pages {
                let victim = self.lru_oldest;
                self.lru_unlink(victim);
                self.map.remove(&self.meta[victim as usize].key);
                STATS.recycled.fetch_add(1, Relaxed);
                victim
            } else {
                match self.free.pop().or_else(|| self.add_chunk()) {
                    Some(slot) => {
                        self.chunk_of(slot).used += 1;
                        slot
                    }
                    None => return std::ptr::null_mut(),
                }
            };
        self.meta[slot as usize] = Meta {
            key,
            state: State::Pinned,
            older: NIL,
            newer: NIL,
        };
        self.map.insert(key, slot);
        self.pinned += 1;
        let handle = self.handle(slot);
        // SAFETY: the slot's extra bytes are this cache's; SQLite reads a
        // new page's extra bytes as its header, which must start zeroed.
        unsafe { std::ptr::write_bytes((*handle).page.extra, 0, self.extra_size) };
        handle
    }

    fn count(&mut self, hit: bool) {
        if hit {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        if self.hits + self.misses >= 1024 {
            self.flush_counts();
        }
    }

    fn flush_counts(&mut self) {
        STATS
            .hits
            .fetch_add(std::mem::take(&mut self.hits), Relaxed);
        STATS
            .misses
            .fetch_add(std::mem::take(&mut self.misses), Relaxed);
    }

    /// SQLite is done with the page: keep it (unpinned, most recently
    /// used) or, with `discard` or over the limit, drop it.
    pub(crate) fn unpin(&mut self, slot: u32, discard: bool) {
        if self.meta[slot as usize].state != State::Pinned {
            return;
        }
        self.pinned -= 1;
        if discard || (self.purgeable && self.map.len() > self.max_pages) {
            self.map.remove(&self.meta[slot as usize].key);
            self.release(slot);
        } else {
            self.meta[slot as usize].state = State::Unpinned;
            self.lru_push_newest(slot);
        }
    }

    /// The page's number changes; a page already at `new` (never pinned,
    /// SQLite promises) is dropped.
    pub(crate) fn rekey(&mut self, slot: u32, old: u32, new: u32) {
        if old == new {
            return;
        }
        if let Some(other) = self.map.remove(&new) {
            if other != slot {
                self.drop_slot(other);
            }
        }
        self.map.remove(&old);
        self.map.insert(new, slot);
        self.meta[slot as usize].key = new;
    }

    /// Drops every page numbered `limit` or more, pinned ones included.
    pub(crate) fn truncate(&mut self, limit: u32) {
        let doomed: Vec<u32> = self
            .map
            .iter()
            .filter(|&(&k, _)| k >= limit)
            .map(|(_, &s)| s)
            .collect();
        for slot in doomed {
            self.map.remove(&self.meta[slot as usize].key);
            self.drop_slot(slot);
        }
    }

    /// Drops every unpinned page and gives entirely free chunks back to the
    /// arena, for any cache to carve again. Their memory stays resident (as
    /// pages the default cache frees stay in `malloc`'s heap): punching it
    /// out would cost a refill (zeroing a huge page) the next time SQLite
    /// grows a cache, and SQLite shrinks often.
    pub(crate) fn shrink(&mut self) {
        if self.purgeable {
            self.enforce_limit(0);
        }
        let mut gave_back = false;
        for c in 0..self.chunks.len() {
            if self.chunks[c].as_ref().is_some_and(|chunk| chunk.used == 0) {
                let chunk = self.chunks[c].take().expect("checked");
                self.free_chunk(chunk);
                gave_back = true;
            }
        }
        if gave_back {
            let spc = self.slots_per_chunk;
            let chunks = &self.chunks;
            self.free.retain(|&s| chunks[(s / spc) as usize].is_some());
        }
    }

    /// Evicts unpinned pages, oldest first, until at most `limit` remain.
    fn enforce_limit(&mut self, limit: usize) {
        while self.map.len() > limit && self.lru_oldest != NIL {
            let victim = self.lru_oldest;
            self.map.remove(&self.meta[victim as usize].key);
            self.drop_slot(victim);
        }
    }

    /// Releases a slot already removed from the map, whatever its state.
    fn drop_slot(&mut self, slot: u32) {
        match self.meta[slot as usize].state {
            State::Unpinned => self.lru_unlink(slot),
            State::Pinned => self.pinned -= 1,
            State::Free => return,
        }
        self.release(slot);
    }

    fn release(&mut self, slot: u32) {
        self.meta[slot as usize] = FREE;
        self.chunk_of(slot).used -= 1;
        self.free.push(slot);
    }

    fn chunk_of(&mut self, slot: u32) -> &mut Chunk {
        self.chunks[(slot / self.slots_per_chunk) as usize]
            .as_mut()
            .expect("a slot's chunk exists")
    }

    fn lru_unlink(&mut self, slot: u32) {
        let Meta { older, newer, .. } = self.meta[slot as usize];
        match older {
            NIL => self.lru_oldest = newer,
            o => self.meta[o as usize].newer = newer,
        }
        match newer {
            NIL => self.lru_newest = older,
            n => self.meta[n as usize].older = older,
        }
    }

    fn lru_push_newest(&mut self, slot: u32) {
        self.meta[slot as usize].older = self.lru_newest;
        self.meta[slot as usize].newer = NIL;
        match self.lru_newest {
            NIL => self.lru_oldest = slot,
            n => self.meta[n as usize].newer = slot,
        }
        self.lru_newest = slot;
    }

    /// Makes a chunk of free slots; returns one of them (taken).
    fn add_chunk(&mut self) -> Option<u32> {
        let spc = self.slots_per_chunk as usize;
        let bytes = spc * (self.page_size + self.extra_stride);
        let (memory, backing) = self.chunk_memory(bytes)?;
        let position = self
            .chunks
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.chunks.len());
        let first = (position * spc) as u32;
        let extras = spc * self.page_size;
        let handles = (0..spc)
            .map(|i| Handle {
                page: PcachePage {
                    // SAFETY: in bounds of the chunk's `bytes`.
                    buf: unsafe { memory.as_ptr().add(i * self.page_size) },
                    // SAFETY: as above.
                    extra: unsafe { memory.as_ptr().add(extras + i * self.extra_stride) },
                },
                slot: first + i as u32,
            })
            .collect();
        let chunk = Chunk {
            handles,
            memory,
            backing,
            used: 0,
        };
        if position == self.chunks.len() {
            self.chunks.push(Some(chunk));
            self.meta.resize(self.chunks.len() * spc, FREE);
        } else {
            self.chunks[position] = Some(chunk);
        }
        // Lowest slots first: neighbours in memory are used together.
        self.free.extend((first + 1..first + spc as u32).rev());
        Some(first)
    }

    /// Memory for a chunk: from the arena, populated up front (one call,
    /// not a fault per page); from the heap once the arena is full.
    fn chunk_memory(&self, bytes: usize) -> Option<(NonNull<u8>, Backing)> {
        let layout = Layout::from_size_align(bytes, 4096).ok()?;
        if let Some(arena) = &self.arena {
            if let Ok(ptr) = arena.alloc(layout) {
                let populated = arena.populator().populate(ptr.offset() as usize, bytes);
                match (populated, arena.local(ptr)) {
                    (Ok(()), Ok(local)) => {
                        STATS.arena_chunks.fetch_add(1, Relaxed);
                        return Some((local, Backing::Arena(ptr)));
                    }
                    _ => {
                        let _ = arena.free(ptr);
                    }
                }
            }
        }
        // SAFETY: `layout` has a nonzero size (at least 4 slots of a page).
        let memory = NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        STATS.heap_chunks.fetch_add(1, Relaxed);
        Some((memory, Backing::Heap(layout)))
    }

    fn free_chunk(&self, chunk: Chunk) {
        match chunk.backing {
            Backing::Arena(ptr) => {
                if let Some(arena) = &self.arena {
                    let _ = arena.free(ptr);
                }
            }
            Backing::Heap(layout) => {
                // SAFETY: allocated in `chunk_memory` with this layout.
                unsafe { std::alloc::dealloc(chunk.memory.as_ptr(), layout) };
            }
        }
    }

    /// Checks the bookkeeping (tests).
    #[cfg(test)]
    fn check(&self) {
        let unpinned = self
            .meta
            .iter()
            .filter(|m| m.state == State::Unpinned)
            .count();
        let pinned = self
            .meta
            .iter()
            .filter(|m| m.state == State::Pinned)
            .count();
        assert_eq!(pinned, self.pinned);
        assert_eq!(pinned + unpinned, self.map.len());
        let mut n = 0;
        let mut s = self.lru_oldest;
        while s != NIL {
            assert_eq!(self.meta[s as usize].state, State::Unpinned);
            n += 1;
            s = self.meta[s as usize].newer;
        }
        assert_eq!(n, unpinned);
        for (&k, &s) in &self.map {
            assert_eq!(self.meta[s as usize].key, k);
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.flush_counts();
        for chunk in std::mem::take(&mut self.chunks).into_iter().flatten() {
            self.free_chunk(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(cache: &Cache, h: *mut Handle) -> u32 {
        assert!(!h.is_null());
        // SAFETY: a live handle of `cache`.
        unsafe { cache.slot_of(&(*h).page) }
    }

    fn get(c: &mut Cache, key: u32, create: Create) -> u32 {
        let h = c.fetch(key, create);
        page(c, h)
    }

    #[test]
    fn a_fetched_page_keeps_its_bytes_until_recycled_at_the_limit() {
        let mut c = Cache::new(4096, 120, true, None);
        c.set_max_pages(10);
        for key in 1..=9u32 {
            let h = c.fetch(key, Create::Always);
            // SAFETY: a live page buffer of 4096 bytes.
            unsafe { (*h).page.buf.write_bytes(key as u8, 4096) };
            c.unpin(page(&c, h), false);
        }
        c.check();
        assert_eq!(c.pages(), 9);
        let h = c.fetch(3, Create::No);
        // SAFETY: a live page buffer.
        assert_eq!(unsafe { *(*h).page.buf.add(4095) }, 3);
        c.unpin(page(&c, h), false);
        // The tenth page recycles the least recently unpinned: page 1.
        assert!(!c.fetch(10, Create::IfEasy).is_null());
        assert!(c.fetch(1, Create::No).is_null());
        assert!(!c.fetch(2, Create::No).is_null());
        c.check();
    }

    #[test]
    fn a_new_page_has_zeroed_extra_bytes_even_in_a_recycled_slot() {
        let mut c = Cache::new(1024, 48, true, None);
        c.set_max_pages(2);
        let h = c.fetch(1, Create::Always);
        // SAFETY: a live page's extra bytes.
        unsafe { (*h).page.extra.write_bytes(0xAB, 48) };
        c.unpin(page(&c, h), false);
        let h = c.fetch(2, Create::Always);
        // SAFETY: a live page's extra bytes.
        let extra = unsafe { std::slice::from_raw_parts((*h).page.extra, 48) };
        assert!(extra.iter().all(|&b| b == 0));
    }

    #[test]
    fn create_if_easy_fails_when_nine_tenths_are_pinned_and_always_does_not() {
        let mut c = Cache::new(512, 8, true, None);
        c.set_max_pages(10);
        for key in 0..9 {
            assert!(!c.fetch(key, Create::Always).is_null());
        }
        assert!(c.fetch(100, Create::IfEasy).is_null());
        assert!(!c.fetch(100, Create::Always).is_null());
        c.check();
    }

    #[test]
    fn unpin_with_discard_rekey_and_truncate_drop_what_they_say() {
        let mut c = Cache::new(512, 8, true, None);
        c.set_max_pages(100);
        for key in 0..20 {
            get(&mut c, key, Create::Always);
        }
        let s5 = get(&mut c, 5, Create::No);
        c.unpin(s5, true);
        assert!(c.fetch(5, Create::No).is_null());
        // 7 moves onto 8, whose unpinned page is dropped.
        let s8 = get(&mut c, 8, Create::No);
        c.unpin(s8, false);
        let s7 = get(&mut c, 7, Create::No);
        c.rekey(s7, 7, 8);
        assert!(c.fetch(7, Create::No).is_null());
        assert_eq!(get(&mut c, 8, Create::No), s7);
        c.truncate(10);
        // 0-4, 6, 8 (was 7) and 9 remain.
        assert_eq!(c.pages(), 8);
        assert!(c.fetch(15, Create::No).is_null());
        c.check();
    }

    #[test]
    fn shrink_drops_unpinned_pages_and_gives_empty_chunks_back() {
        let mut c = Cache::new(4096, 64, true, None);
        c.set_max_pages(1000);
        for key in 0..200 {
            let h = c.fetch(key, Create::Always);
            c.unpin(page(&c, h), false);
        }
        let pinned = get(&mut c, 0, Create::No);
        c.shrink();
        assert_eq!(c.pages(), 1);
        assert_eq!(
            c.chunks.iter().flatten().count(),
            1,
            "only the pinned page's chunk is kept"
        );
        c.unpin(pinned, false);
        c.check();
        // Fetching again after the shrink works.
        for key in 0..50 {
            assert!(!c.fetch(key, Create::Always).is_null());
        }
        c.check();
    }

    #[test]
    fn a_cache_that_is_not_purgeable_never_drops_an_unpinned_page() {
        let mut c = Cache::new(512, 8, false, None);
        c.set_max_pages(5);
        for key in 0..50 {
            let h = c.fetch(key, Create::IfEasy);
            c.unpin(page(&c, h), false);
        }
        assert_eq!(c.pages(), 50);
        c.check();
    }

    #[test]
    fn the_cache_follows_a_model_over_random_operations() {
        // A model of the documented contract: which keys are cached.
        let mut c = Cache::new(512, 16, true, None);
        c.set_max_pages(16);
        let mut pinned: HashMap<u32, u32> = HashMap::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 40) as u32;
            match (x >> 8) % 6 {
                0 | 1 => {
                    let h = c.fetch(key, Create::IfEasy);
                    if !h.is_null() {
                        let slot = page(&c, h);
                        if let Some(&s) = pinned.get(&key) {
                            assert_eq!(s, slot, "a pinned page is fetched again as itself");
                        }
                        pinned.insert(key, slot);
                    }
                }
                2 | 3 => {
                    if let Some(slot) = pinned.remove(&key) {
                        c.unpin(slot, (x >> 20) % 4 == 0);
                    }
                }
                4 => {
                    let new = ((x >> 24) % 40) as u32;
                    if let Some(slot) = pinned.remove(&key) {
                        if !pinned.contains_key(&new) {
                            c.rekey(slot, key, new);
                            pinned.insert(new, slot);
                        } else {
                            pinned.insert(key, slot);
                        }
                    }
                }
                _ => {
                    if (x >> 30) % 50 == 0 {
                        c.truncate(30);
                        pinned.retain(|&k, _| k < 30);
                    }
                }
            }
            c.check();
            assert!(c.pages() <= 16.max(pinned.len() + 1));
        }
    }
}
