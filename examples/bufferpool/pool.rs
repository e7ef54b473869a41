//! The buffer manager, in the style of vmcache (Leis et al., SIGMOD'23):
//! the pool's memory is as large as the data file, page `p` lives at byte
//! `p * PAGE` of it, and one shared state word per page says whether the
//! page is resident and who may write it. Readers are optimistic (read,
//! then check the word did not change); writers take the word exclusively;
//! eviction is second-chance clock over frames, in batches, and never
//! blocks a reader of another page. Everything shared lives in one
//! metadata file mapped by every process of the pool.
//!
//! A frame is the unit the memory behind the pool is filled and dropped in:
//! one page where the backend has 4 KiB granules, a whole huge page where
//! it has 2 MiB ones (`Hugetlb`). Residency is counted in frames.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};

use super::frames::Frames;
use super::liveness::{self, ProcessId};

/// Bytes per database page.
pub const PAGE: usize = 4096;
/// 64-bit words per page.
pub const PAGE_WORDS: usize = PAGE / 8;
/// Processes that can attach to one pool at a time.
pub const MAX_PROCESSES: usize = 64;
/// Threads per process that can update pages (each has an intent record).
pub const MAX_THREADS: usize = 16;

const MAGIC: u64 = u64::from_le_bytes(*b"HApool01");

// # The page state word
//
// ```text
//   bits 24..64  version: bumped by every unlock, so an optimistic reader
//                that saw version v and sees v again read a stable page
//   bit  16      dirty: the page differs from the data file
//   bits 8..16   owner: the process slot holding the lock (Locked only)
//   bits 0..8    state: Unlocked 0 (resident), Locked 1, Evicted 2
// ```
//
// - **Evicted → Locked(me)** (CAS): the locker makes the page's frame
//   resident, then unlocks. **Unlocked → Locked(me)** (CAS): a writer or an
//   evictor. **Locked(me) → Unlocked | Evicted** (store, Release): the
//   owner, with the version bumped.
// - A writer issues a `Release` fence after taking the lock and before
//   writing, and a reader an `Acquire` fence after reading and before it
//   loads the word again (a seqlock): a reader that read a byte the writer
//   wrote sees the word locked or its version changed, and retries.
// - A lock whose owner process is dead (checked by pid and start time after
//   a bounded spin) is taken over by one CAS; the new owner repairs the page
//   (redoes the dead thread's update from its intent record) and decides its
//   residency from the backend, not from the dead owner's progress.
const STATE_MASK: u64 = 0xFF;
const UNLOCKED: u64 = 0;
const LOCKED: u64 = 1;
const EVICTED: u64 = 2;
const OWNER_SHIFT: u32 = 8;
const DIRTY: u64 = 1 << 16;
const VERSION_SHIFT: u32 = 24;

fn state_of(word: u64) -> u64 {
    word & STATE_MASK
}

fn version_of(word: u64) -> u64 {
    word >> VERSION_SHIFT
}

fn owner_of(word: u64) -> usize {
    ((word >> OWNER_SHIFT) & 0xFF) as usize
}

fn locked(word: u64, slot: usize) -> u64 {
    (word & !(STATE_MASK | (0xFF << OWNER_SHIFT))) | LOCKED | ((slot as u64) << OWNER_SHIFT)
}

/// The word an owner leaves: `state`, the version bumped, dirty as given.
fn released(word: u64, state: u64, dirty: bool) -> u64 {
    ((version_of(word) + 1) << VERSION_SHIFT) | if dirty { DIRTY } else { 0 } | state
}

// Frame words: whether the frame's memory is resident, and the clock's mark.
const FRAME_ABSENT: u8 = 0;
const FRAME_RESIDENT: u8 = 1;
/// Resident, and passed once by the clock without being used since: the
/// next pass evicts it.
const FRAME_MARKED: u8 = 2;

/// One thread's update in progress, for whoever takes its lock over if the
/// process dies: the redo record of a one-record write-ahead log.
#[repr(C)]
struct Intent {
    /// 1 while the update runs.
    active: AtomicU64,
    page: AtomicU64,
    record: AtomicU64,
    key: AtomicU64,
    version: AtomicU64,
    lsn: AtomicU64,
}

/// The metadata file's header.
#[repr(C)]
struct Header {
    magic: u64,
    pages: u64,
    frame_pages: u64,
    budget_frames: u64,
    /// Frames resident now.
    resident: AtomicU64,
    /// The clock hand, in frames (wraps).
    hand: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
    write_backs: AtomicU64,
    takeovers: AtomicU64,
    /// Set by the launcher when every process may start.
    start: AtomicU64,
    /// Process slots: `ProcessId::to_word`, 0 when free.
    slots: [AtomicU64; MAX_PROCESSES],
    intents: [[Intent; MAX_THREADS]; MAX_PROCESSES],
}

/// Counters of the pool, shared by its processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolCounters {
    /// Frames made resident (misses).
    pub loads: u64,
    /// Frames evicted.
    pub evictions: u64,
    /// Dirty pages written back.
    pub write_backs: u64,
    /// Locks of dead processes taken over.
    pub takeovers: u64,
    /// Frames resident now.
    pub resident: u64,
}

/// A page's bytes as words: relaxed atomic loads and stores, so optimistic
/// readers racing a writer read stale words, never undefined behaviour.
pub struct PageView<'a>(&'a [AtomicU64]);

impl PageView<'_> {
    /// Word `i` of the page.
    pub fn get(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }

    /// Sets word `i` (writers hold the page's lock).
    pub fn set(&self, i: usize, value: u64) {
        self.0[i].store(value, Ordering::Relaxed)
    }
}

/// The shared metadata: header, page words, committed LSNs, frame words.
struct Meta {
    map: memmap2::MmapMut,
    pages: usize,
    frames: usize,
}

impl Meta {
    fn layout(pages: usize, frames: usize) -> (usize, usize, usize, usize) {
        let header = std::mem::size_of::<Header>().next_multiple_of(64);
        let states = header;
        let committed = states + pages * 8;
        let frame_words = committed + pages * 8;
        (states, committed, frame_words, frame_words + frames)
    }

    fn header(&self) -> &Header {
        // SAFETY: the map is at least `size_of::<Header>()` long (checked
        // at open), page-aligned, and every field that changes is atomic.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn words(&self, at: usize, count: usize) -> &[AtomicU64] {
        // SAFETY: `at..at + count * 8` lies in the map (from `layout`,
        // checked at open) and is 8-aligned; the words are only accessed
        // atomically.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at) as *const AtomicU64, count) }
    }

    fn states(&self) -> &[AtomicU64] {
        self.words(Self::layout(self.pages, self.frames).0, self.pages)
    }

    fn committed(&self) -> &[AtomicU64] {
        self.words(Self::layout(self.pages, self.frames).1, self.pages)
    }

    fn frame_words(&self) -> &[AtomicU8] {
        let at = Self::layout(self.pages, self.frames).2;
        // SAFETY: as `words`, with byte-sized atomics.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(at) as *const AtomicU8, self.frames)
        }
    }
}

/// One process's handle on a pool shared by several processes.
pub struct BufferPool {
    meta: Meta,
    frames: Box<dyn Frames>,
    frame_pages: usize,
    budget: u64,
    slot: usize,
}

/// Why an operation on the pool failed.
pub type PoolResult<T> = io::Result<T>;

impl BufferPool {
    /// Creates the metadata file of a pool over `pages` pages with room for
    /// `budget_frames` resident frames, and attaches to it.
    pub fn create(
        meta_path: &Path,
        pages: usize,
        budget_frames: usize,
        frames: Box<dyn Frames>,
    ) -> PoolResult<BufferPool> {
        let frame_pages = frames.frame_len() / PAGE;
        let nframes = pages.div_ceil(frame_pages);
        let len = Meta::layout(pages, nframes).3;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(meta_path)?;
        file.set_len(len as u64)?;
        let meta = map_meta(&file, pages, nframes)?;
        // SAFETY: the file was just created and is mapped only here; the
        // header's plain fields are written before anyone else can open it
        // (the launcher starts the other processes afterwards).
        unsafe {
            let h = meta.map.as_ptr() as *mut Header;
            (*h).magic = MAGIC;
            (*h).pages = pages as u64;
            (*h).frame_pages = frame_pages as u64;
            (*h).budget_frames = budget_frames as u64;
        }
        for w in meta.states() {
            w.store(EVICTED, Ordering::Relaxed);
        }
        Self::attach_meta(meta, frames)
    }

    /// Attaches to the pool whose metadata is at `meta_path`.
    pub fn open(meta_path: &Path, frames: Box<dyn Frames>) -> PoolResult<BufferPool> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(meta_path)?;
        let len = file.metadata()?.len() as usize;
        if len < std::mem::size_of::<Header>() {
            return Err(invalid("the pool's metadata file is too short"));
        }
        // SAFETY: as in `Meta::header`; a first look at the geometry.
        let probe = map_meta(&file, 0, 0)?;
        let (magic, pages, frame_pages) = {
            let h = probe.header();
            (h.magic, h.pages as usize, h.frame_pages as usize)
        };
        if magic != MAGIC || frame_pages == 0 || frame_pages * PAGE != frames.frame_len() {
            return Err(invalid(
                "not a pool's metadata file, or one with other frames",
            ));
        }
        let nframes = pages.div_ceil(frame_pages);
        if Meta::layout(pages, nframes).3 != len {
            return Err(invalid("the pool's metadata file has the wrong length"));
        }
        Self::attach_meta(map_meta(&file, pages, nframes)?, frames)
    }

    fn attach_meta(meta: Meta, frames: Box<dyn Frames>) -> PoolResult<BufferPool> {
        let h = meta.header();
        let (frame_pages, budget) = (h.frame_pages as usize, h.budget_frames);
        let mut pool = BufferPool {
            meta,
            frames,
            frame_pages,
            budget,
            slot: usize::MAX,
        };
        pool.slot = pool.claim_slot()?;
        Ok(pool)
    }

    /// Takes a free process slot, or the slot of a dead process after taking
    /// over every lock it still held.
    fn claim_slot(&self) -> PoolResult<usize> {
        let me = liveness::me()?.to_word();
        let slots = &self.meta.header().slots;
        for (i, s) in slots.iter().enumerate() {
            if s.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(i);
            }
        }
        for (i, s) in slots.iter().enumerate() {
            let word = s.load(Ordering::Acquire);
            if !ProcessId::from_word(word).is_alive() {
                self.recover_slot(i);
                if s.compare_exchange(word, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(i);
                }
            }
        }
        Err(io::Error::other(format!(
            "all {MAX_PROCESSES} process slots of the pool are taken by live processes"
        )))
    }

    /// Takes over every page lock the (dead) process in `slot` holds.
    fn recover_slot(&self, slot: usize) {
        for (p, w) in self.meta.states().iter().enumerate() {
            let word = w.load(Ordering::Acquire);
            if state_of(word) == LOCKED && owner_of(word) == slot {
                self.take_over(p, word, slot);
            }
        }
    }

    /// Takes over the locks of every dead process (the launcher, at the end).
    pub fn recover_dead(&self) -> usize {
        let mut dead = 0;
        for (i, s) in self.meta.header().slots.iter().enumerate() {
            let word = s.load(Ordering::Acquire);
            if word != 0 && i != self.slot && !ProcessId::from_word(word).is_alive() {
                self.recover_slot(i);
                let _ = s.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed);
                dead += 1;
            }
        }
        dead
    }

    /// Pages in the pool (and in the data file).
    pub fn pages(&self) -> usize {
        self.meta.pages
    }

    /// Processes attached now.
    pub fn attached(&self) -> usize {
        self.meta
            .header()
            .slots
            .iter()
            .filter(|s| s.load(Ordering::Acquire) != 0)
            .count()
    }

    /// Releases every process to start (the launcher).
    pub fn signal_start(&self) {
        self.meta.header().start.store(1, Ordering::Release);
    }

    /// Whether the launcher released the processes.
    pub fn started(&self) -> bool {
        self.meta.header().start.load(Ordering::Acquire) != 0
    }

    /// The shared counters.
    pub fn counters(&self) -> PoolCounters {
        let h = self.meta.header();
        PoolCounters {
            loads: h.loads.load(Ordering::Relaxed),
            evictions: h.evictions.load(Ordering::Relaxed),
            write_backs: h.write_backs.load(Ordering::Relaxed),
            takeovers: h.takeovers.load(Ordering::Relaxed),
            resident: h.resident.load(Ordering::Relaxed),
        }
    }

    /// Whether page `p`'s frame is resident.
    #[allow(dead_code)] // the tests ask
    pub fn is_resident(&self, p: usize) -> bool {
        self.meta.frame_words()[p / self.frame_pages].load(Ordering::Acquire) != FRAME_ABSENT
    }

    /// The LSN last committed to page `p` (by any process).
    pub fn committed(&self, p: usize) -> u64 {
        self.meta.committed()[p].load(Ordering::Acquire)
    }

    fn view(&self, p: usize) -> PageView<'_> {
        // SAFETY: page `p` lies in the frames' memory, which lives as long
        // as `self`, is 8-aligned, and is accessed only through atomics.
        PageView(unsafe {
            std::slice::from_raw_parts(
                self.frames.base().add(p * PAGE) as *const AtomicU64,
                PAGE_WORDS,
            )
        })
    }

    /// Runs `read` on page `p` optimistically: it may see a page being
    /// written (its result is then thrown away and it runs again), so it
    /// must only read. Returns its result from a stable page.
    pub fn read<R>(&self, p: usize, read: impl Fn(&PageView) -> R) -> PoolResult<R> {
        let state = &self.meta.states()[p];
        let mut spins = 0u32;
        loop {
            let word = state.load(Ordering::Acquire);
            match state_of(word) {
                UNLOCKED => {
                    self.used(p);
                    let result = read(&self.view(p));
                    fence(Ordering::Acquire);
                    let again = state.load(Ordering::Relaxed);
                    if state_of(again) == UNLOCKED && version_of(again) == version_of(word) {
                        return Ok(result);
                    }
                }
                EVICTED => self.fault_in(p, word)?,
                _ => self.wait_for_lock(p, word, &mut spins),
            }
        }
    }

    /// Runs `write` on page `p` under its exclusive lock, and marks the page
    /// dirty. `thread` (below [`MAX_THREADS`]) names the caller's intent
    /// record, which `write` fills through [`Intent`]-taking helpers.
    pub fn write<R>(
        &self,
        p: usize,
        thread: usize,
        write: impl FnOnce(&PageView, &UpdateLog) -> R,
    ) -> PoolResult<R> {
        let word = self.lock(p)?;
        // Seqlock writer: the lock is visible before any byte written.
        fence(Ordering::Release);
        let log = UpdateLog {
            intent: &self.meta.header().intents[self.slot][thread],
            page: p,
        };
        let result = write(&self.view(p), &log);
        if let Some(lsn) = log.finish() {
            self.meta.committed()[p].fetch_max(lsn, Ordering::AcqRel);
        }
        self.meta.states()[p].store(released(word, UNLOCKED, true), Ordering::Release);
        Ok(result)
    }

    /// Locks page `p` exclusively, making it resident first; returns the
    /// word it had (resident, unlocked) when taken.
    fn lock(&self, p: usize) -> PoolResult<u64> {
        let state = &self.meta.states()[p];
        let mut spins = 0u32;
        loop {
            let word = state.load(Ordering::Acquire);
            match state_of(word) {
                UNLOCKED => {
                    if state
                        .compare_exchange(
                            word,
                            locked(word, self.slot),
                            Ordering::Acquire,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        self.used(p);
                        return Ok(word);
                    }
                }
                EVICTED => self.fault_in(p, word)?,
                _ => self.wait_for_lock(p, word, &mut spins),
            }
        }
    }

    /// Clears the clock's mark on `p`'s frame: it was used.
    fn used(&self, p: usize) {
        let frame = &self.meta.frame_words()[p / self.frame_pages];
        if frame.load(Ordering::Relaxed) == FRAME_MARKED {
            let _ = frame.compare_exchange(
                FRAME_MARKED,
                FRAME_RESIDENT,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// A miss: locks evicted page `p`, makes its frame resident (evicting
    /// others first if the pool is full), and unlocks it.
    fn fault_in(&self, p: usize, word: u64) -> PoolResult<()> {
        let state = &self.meta.states()[p];
        if state
            .compare_exchange(
                word,
                locked(word, self.slot),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return Ok(());
        }
        let f = p / self.frame_pages;
        let frame = &self.meta.frame_words()[f];
        let loaded = if frame.load(Ordering::Acquire) == FRAME_ABSENT {
            self.make_room();
            self.frames.load(f).map(|()| {
                if frame
                    .compare_exchange(
                        FRAME_ABSENT,
                        FRAME_RESIDENT,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    let h = self.meta.header();
                    h.resident.fetch_add(1, Ordering::Relaxed);
                    h.loads.fetch_add(1, Ordering::Relaxed);
                }
            })
        } else {
            Ok(())
        };
        let next = if loaded.is_ok() { UNLOCKED } else { EVICTED };
        state.store(released(word, next, false), Ordering::Release);
        loaded
    }

    /// Evicts until a frame is free (bounded: with every frame locked it
    /// goes on over budget rather than wait).
    fn make_room(&self) {
        let h = self.meta.header();
        for _ in 0..8 {
            if h.resident.load(Ordering::Relaxed) < self.budget {
                return;
            }
            self.evict_batch(32);
        }
    }

    /// One pass of the clock over up to `4 * batch` frames: unmarked
    /// resident frames are marked, marked ones (unused since the previous
    /// pass) evicted, up to `batch` of them. Returns how many.
    pub fn evict_batch(&self, batch: usize) -> usize {
        let frames = self.meta.frame_words();
        let n = frames.len() as u64;
        let span = 4 * batch as u64;
        let start = self.meta.header().hand.fetch_add(span, Ordering::Relaxed) % n;
        let mut evicted = 0;
        for i in 0..span.min(n) {
            let f = ((start + i) % n) as usize;
            match frames[f].load(Ordering::Relaxed) {
                FRAME_RESIDENT => {
                    let _ = frames[f].compare_exchange(
                        FRAME_RESIDENT,
                        FRAME_MARKED,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                FRAME_MARKED if self.try_evict(f) => {
                    evicted += 1;
                    if evicted == batch {
                        break;
                    }
                }
                _ => {}
            }
        }
        evicted
    }

    /// Evicts frame `f` if every page of it can be locked at once without
    /// waiting and it is still marked: writes its dirty pages back, drops
    /// its memory, and leaves its pages evicted.
    fn try_evict(&self, f: usize) -> bool {
        let states = self.meta.states();
        let pages = f * self.frame_pages..((f + 1) * self.frame_pages).min(self.meta.pages);
        let mut taken: Vec<u64> = Vec::with_capacity(pages.len());
        for p in pages.clone() {
            let word = states[p].load(Ordering::Acquire);
            if state_of(word) == LOCKED
                || states[p]
                    .compare_exchange(
                        word,
                        locked(word, self.slot),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                break;
            }
            taken.push(word);
        }
        let frame = &self.meta.frame_words()[f];
        let all = taken.len() == pages.len() && frame.load(Ordering::Acquire) == FRAME_MARKED;
        let written = all && self.write_back_dirty(pages.start, &taken);
        if written && self.frames.evict(f).is_ok() {
            let h = self.meta.header();
            frame.store(FRAME_ABSENT, Ordering::Release);
            h.resident.fetch_sub(1, Ordering::Relaxed);
            h.evictions.fetch_add(1, Ordering::Relaxed);
            for (p, word) in pages.zip(&taken) {
                states[p].store(released(*word, EVICTED, false), Ordering::Release);
            }
            return true;
        }
        for (p, word) in pages.zip(&taken) {
            states[p].store(
                released(*word, state_of(*word), *word & DIRTY != 0),
                Ordering::Release,
            );
        }
        false
    }

    /// Writes back the dirty pages among `words` (pages from `first` on,
    /// locked by the caller). `false` if one failed.
    fn write_back_dirty(&self, first: usize, words: &[u64]) -> bool {
        for (i, word) in words.iter().enumerate() {
            if word & DIRTY != 0 && state_of(*word) == UNLOCKED {
                if let Err(e) = self.frames.write_back(first + i) {
                    eprintln!(
                        "bufferpool: writing back page {} failed: {e}; it stays resident",
                        first + i
                    );
                    return false;
                }
                self.meta
                    .header()
                    .write_backs
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    /// Writes back every dirty page (at the end of a run); returns how many.
    pub fn flush(&self) -> PoolResult<usize> {
        let mut flushed = 0;
        for p in 0..self.meta.pages {
            let state = &self.meta.states()[p];
            if state.load(Ordering::Relaxed) & DIRTY == 0 {
                continue;
            }
            let word = self.lock(p)?;
            let result = if word & DIRTY != 0 {
                self.frames.write_back(p)
            } else {
                Ok(())
            };
            let clean = result.is_ok();
            state.store(
                released(word, UNLOCKED, word & DIRTY != 0 && !clean),
                Ordering::Release,
            );
            result?;
            flushed += usize::from(word & DIRTY != 0);
        }
        self.frames.sync()?;
        Ok(flushed)
    }

    /// Waits for a locked page: spins, then yields, and now and then checks
    /// that the owner process is alive, taking the lock over if it is not.
    fn wait_for_lock(&self, p: usize, word: u64, spins: &mut u32) {
        *spins += 1;
        if *spins < 128 {
            std::hint::spin_loop();
            return;
        }
        std::thread::yield_now();
        let owner = owner_of(word);
        if *spins % 256 == 0 && owner != self.slot {
            let id = self.meta.header().slots[owner].load(Ordering::Acquire);
            if !ProcessId::from_word(id).is_alive() {
                self.take_over(p, word, owner);
            }
        }
    }

    /// Takes the lock of page `p` from the dead process in slot `dead` (one
    /// CAS: only one taker wins), repairs the page and releases it.
    fn take_over(&self, p: usize, word: u64, dead: usize) {
        let state = &self.meta.states()[p];
        if state
            .compare_exchange(
                word,
                locked(word, self.slot),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return;
        }
        let h = self.meta.header();
        h.takeovers.fetch_add(1, Ordering::Relaxed);
        let f = p / self.frame_pages;
        let frame = &self.meta.frame_words()[f];
        // Residency comes from the backend: the dead owner may have been
        // loading or evicting the frame and died anywhere in between.
        let flagged = frame.load(Ordering::Acquire) != FRAME_ABSENT;
        let resident = flagged && self.frames.is_resident(f);
        if flagged && !resident && frame.swap(FRAME_ABSENT, Ordering::AcqRel) != FRAME_ABSENT {
            h.resident.fetch_sub(1, Ordering::Relaxed);
        }
        let mut dirty = word & DIRTY != 0;
        if resident {
            for intent in &h.intents[dead] {
                if intent.active.load(Ordering::Acquire) == 1
                    && intent.page.load(Ordering::Relaxed) == p as u64
                {
                    let lsn = super::workload::redo(&self.view(p), intent_record(intent));
                    self.meta.committed()[p].fetch_max(lsn, Ordering::AcqRel);
                    intent.active.store(0, Ordering::Release);
                    dirty = true;
                }
            }
        } else {
            // Its bytes are gone; the data file has every write-back, and an
            // update in flight never committed: forget it.
            for intent in &h.intents[dead] {
                if intent.page.load(Ordering::Relaxed) == p as u64 {
                    intent.active.store(0, Ordering::Release);
                }
            }
            dirty = false;
        }
        let next = if resident { UNLOCKED } else { EVICTED };
        state.store(released(word, next, dirty && resident), Ordering::Release);
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        if let Some(s) = self.meta.header().slots.get(self.slot) {
            s.store(0, Ordering::Release);
        }
    }
}

/// An update's redo record, as the dead thread logged it.
pub struct Redo {
    /// Record index in the page.
    pub record: usize,
    /// The record's key.
    pub key: u64,
    /// The record's new version.
    pub version: u64,
    /// The page's new LSN.
    pub lsn: u64,
}

fn intent_record(intent: &Intent) -> Redo {
    Redo {
        record: intent.record.load(Ordering::Relaxed) as usize,
        key: intent.key.load(Ordering::Relaxed),
        version: intent.version.load(Ordering::Relaxed),
        lsn: intent.lsn.load(Ordering::Relaxed),
    }
}

/// A writer's intent record: logged before the page is changed, so a dead
/// writer's half-done update can be redone by whoever takes its lock.
pub struct UpdateLog<'a> {
    intent: &'a Intent,
    page: usize,
}

impl UpdateLog<'_> {
    /// Logs the update about to be applied (before writing the page).
    pub fn log(&self, redo: &Redo) {
        let i = self.intent;
        i.page.store(self.page as u64, Ordering::Relaxed);
        i.record.store(redo.record as u64, Ordering::Relaxed);
        i.key.store(redo.key, Ordering::Relaxed);
        i.version.store(redo.version, Ordering::Relaxed);
        i.lsn.store(redo.lsn, Ordering::Relaxed);
        i.active.store(1, Ordering::Release);
    }

    /// Ends the update: its LSN, if one was logged.
    fn finish(&self) -> Option<u64> {
        (self.intent.active.swap(0, Ordering::AcqRel) == 1)
            .then(|| self.intent.lsn.load(Ordering::Relaxed))
    }
}

fn map_meta(file: &File, pages: usize, frames: usize) -> io::Result<Meta> {
    // SAFETY: the metadata file is only ever accessed through atomics (the
    // header's plain fields are written once, before other processes open
    // it), and it is never truncated while mapped.
    let map = unsafe { memmap2::MmapMut::map_mut(file)? };
    Ok(Meta { map, pages, frames })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}
