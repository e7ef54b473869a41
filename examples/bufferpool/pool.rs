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
use std::time::{Duration, Instant};

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

/// Frames the pool may be over budget while another thread evicts (at
/// most; a sixteenth of the budget in a small pool).
const SLACK: u64 = 64;

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
    /// The evictor: its process id word, 0 when nobody evicts. One thread
    /// at a time evicts (the backends serialize evictions anyway, e.g.
    /// on the file's lock): the others go on over budget by at most
    /// [`SLACK`] frames instead of spinning on that lock.
    evictor: AtomicU64,
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
        // Allocated now: a sparse file on a full tmpfs would raise SIGBUS
        // at the first touch of a word instead.
        // SAFETY: fallocate(2) on a file this call opened; no memory access.
        if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, len as i64) } != 0
        {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(meta_path);
            return Err(io::Error::new(
                e.kind(),
                format!("allocating the pool's metadata ({len} bytes): {e}"),
            ));
        }
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

    /// Takes over every page lock the (dead) process in `slot` holds, and
    /// its evictor role.
    fn recover_slot(&self, slot: usize) {
        let evictor = &self.meta.header().evictor;
        let _ = evictor.compare_exchange(slot as u64 + 1, 0, Ordering::AcqRel, Ordering::Relaxed);
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

    /// The memory behind the pool.
    pub fn frames(&self) -> &dyn Frames {
        &*self.frames
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
        self.when_unlocked(p, |state, word| {
            self.used(p);
            let result = read(&self.view(p));
            fence(Ordering::Acquire);
            let again = state.load(Ordering::Relaxed);
            (state_of(again) == UNLOCKED && version_of(again) == version_of(word)).then_some(result)
        })
    }

    /// Runs `attempt` on page `p`'s word each time it is seen resident and
    /// unlocked, until `attempt` succeeds: an evicted page is faulted in,
    /// a locked one waited for (or taken over from a dead process).
    fn when_unlocked<R>(
        &self,
        p: usize,
        mut attempt: impl FnMut(&AtomicU64, u64) -> Option<R>,
    ) -> PoolResult<R> {
        let state = &self.meta.states()[p];
        let mut patience = Patience::default();
        loop {
            let word = state.load(Ordering::Acquire);
            match state_of(word) {
                UNLOCKED => {
                    if let Some(result) = attempt(state, word) {
                        return Ok(result);
                    }
                }
                EVICTED => self.fault_in(p, word)?,
                _ => self.wait_for_lock(p, word, &mut patience),
            }
        }
    }

    /// Runs `write` on page `p` under its exclusive lock, and marks the page
    /// dirty. `thread` (below [`MAX_THREADS`]) names the caller's intent
    /// record, which `write` fills with [`UpdateLog::log`] before it
    /// changes the page.
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
        self.when_unlocked(p, |state, word| {
            self.try_lock(state, word).then(|| {
                self.used(p);
                word
            })
        })
    }

    /// Takes the lock of page word `state`, which was `word` (unlocked,
    /// evicted, or held by a dead process), with one CAS.
    fn try_lock(&self, state: &AtomicU64, word: u64) -> bool {
        state
            .compare_exchange(
                word,
                locked(word, self.slot),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
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
        if !self.try_lock(state, word) {
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

    /// Evicts until a frame is free, if no other thread is evicting; while
    /// one is, goes on unless the pool is `SLACK` frames over budget, and
    /// then waits for it (up to `MAX_ROOM_WAIT`, taking the role from an
    /// evictor that died; with every frame locked it goes on over budget
    /// rather than wait forever).
    fn make_room(&self) {
        let h = self.meta.header();
        let me = self.slot as u64 + 1;
        let mut patience = Patience::default();
        let give_up = Instant::now() + MAX_ROOM_WAIT;
        while Instant::now() < give_up {
            let resident = h.resident.load(Ordering::Relaxed);
            if resident < self.budget {
                return;
            }
            let evictor = h.evictor.load(Ordering::Acquire);
            if evictor == 0
                && h.evictor
                    .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                // Two passes of the clock at least: the first may only mark.
                // Where every frame is used between passes, later passes
                // evict used frames too rather than leave the pool over
                // budget.
                for pass in 0..8 {
                    if h.resident.load(Ordering::Relaxed) < self.budget {
                        break;
                    }
                    self.evict_batch(32, pass >= 3);
                }
                h.evictor.store(0, Ordering::Release);
                return;
            }
            if resident < self.budget + (self.budget / 16).clamp(1, SLACK) {
                return;
            }
            if patience.wait() && evictor != 0 {
                // An evictor that died holding the role loses it.
                let id = h.slots[(evictor - 1) as usize % MAX_PROCESSES].load(Ordering::Acquire);
                if !ProcessId::from_word(id).is_alive() {
                    let _ =
                        h.evictor
                            .compare_exchange(evictor, 0, Ordering::AcqRel, Ordering::Relaxed);
                }
            }
        }
    }

    /// One pass of the clock over up to `4 * batch` frames: unmarked
    /// resident frames are marked, marked ones (unused since the previous
    /// pass) evicted, up to `batch` of them; with `force`, used ones too.
    /// Returns how many. Victims
    /// next to each other, or separated only by frames that hold nothing,
    /// are dropped with one call (one hole punched, one TLB flush): the
    /// frames in between are locked too, so nobody loads them meanwhile.
    pub fn evict_batch(&self, batch: usize, force: bool) -> usize {
        let frames = self.meta.frame_words();
        let n = frames.len();
        let span = (4 * batch).min(n);
        let start = (self
            .meta
            .header()
            .hand
            .fetch_add(span as u64, Ordering::Relaxed)
            % n as u64) as usize;
        let mut run = Run::default();
        let mut evicted = 0;
        for i in 0..span {
            let f = (start + i) % n;
            if f == 0 {
                // Runs are contiguous: the clock wrapped.
                evicted += self.evict_run(&mut run);
            }
            let kind = match frames[f].load(Ordering::Relaxed) {
                FRAME_RESIDENT if force => {
                    let _ = frames[f].compare_exchange(
                        FRAME_RESIDENT,
                        FRAME_MARKED,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    Some(FRAME_MARKED)
                }
                FRAME_RESIDENT => {
                    let _ = frames[f].compare_exchange(
                        FRAME_RESIDENT,
                        FRAME_MARKED,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    None
                }
                FRAME_MARKED => Some(FRAME_MARKED),
                // A hole only extends a run that has a victim.
                _ if run.frames.is_empty() => None,
                _ => Some(FRAME_ABSENT),
            };
            match kind {
                Some(kind) if self.lock_frame(f, kind, &mut run) => {}
                _ => evicted += self.evict_run(&mut run),
            }
            if evicted >= batch {
                break;
            }
        }
        evicted + self.evict_run(&mut run)
    }

    /// Locks every page of frame `f` without waiting and appends it to
    /// `run` if its frame word is still `kind` (a victim: marked; a hole:
    /// absent). `false` (nothing locked) otherwise.
    fn lock_frame(&self, f: usize, kind: u8, run: &mut Run) -> bool {
        let states = self.meta.states();
        let pages = f * self.frame_pages..((f + 1) * self.frame_pages).min(self.meta.pages);
        let mark = run.words.len();
        for p in pages.clone() {
            let word = states[p].load(Ordering::Acquire);
            let expected = if kind == FRAME_MARKED {
                state_of(word) != LOCKED
            } else {
                state_of(word) == EVICTED
            };
            if !expected || !self.try_lock(&states[p], word) {
                self.unlock_pages(pages.start, &run.words[mark..], false);
                run.words.truncate(mark);
                return false;
            }
            run.words.push(word);
        }
        if self.meta.frame_words()[f].load(Ordering::Acquire) != kind {
            self.unlock_pages(pages.start, &run.words[mark..], false);
            run.words.truncate(mark);
            return false;
        }
        if run.frames.is_empty() {
            run.first = f;
        }
        run.frames.push(kind == FRAME_MARKED);
        true
    }

    /// Releases locked pages from `first` on (their words as taken in
    /// `words`): evicted and clean if `evicted`, else as they were.
    fn unlock_pages(&self, first: usize, words: &[u64], evicted: bool) {
        for (p, word) in (first..).zip(words) {
            let released = if evicted {
                released(*word, EVICTED, false)
            } else {
                released(*word, state_of(*word), *word & DIRTY != 0)
            };
            self.meta.states()[p].store(released, Ordering::Release);
        }
    }

    /// Evicts the victims of `run` (writing their dirty pages back first)
    /// with one call over the run, trailing holes left out, and empties
    /// it. Returns how many frames it evicted.
    fn evict_run(&self, run: &mut Run) -> usize {
        while run.frames.last() == Some(&false) {
            run.frames.pop();
            let keep = run.frames.len() * self.frame_pages;
            self.unlock_pages(
                run.first * self.frame_pages + keep,
                &run.words[keep..],
                false,
            );
            run.words.truncate(keep);
        }
        let victims = run.frames.iter().filter(|&&v| v).count();
        let first_page = run.first * self.frame_pages;
        if victims > 0 {
            let written = self.write_back_dirty(first_page, &run.words);
            if written && self.frames.evict(run.first, run.frames.len()).is_ok() {
                let h = self.meta.header();
                for (i, _) in run.frames.iter().enumerate().filter(|(_, v)| **v) {
                    self.meta.frame_words()[run.first + i].store(FRAME_ABSENT, Ordering::Release);
                }
                h.resident.fetch_sub(victims as u64, Ordering::Relaxed);
                h.evictions.fetch_add(victims as u64, Ordering::Relaxed);
                self.unlock_pages(first_page, &run.words, true);
                run.frames.clear();
                run.words.clear();
                return victims;
            }
        }
        self.unlock_pages(first_page, &run.words, false);
        run.frames.clear();
        run.words.clear();
        0
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
    fn wait_for_lock(&self, p: usize, word: u64, patience: &mut Patience) {
        let owner = owner_of(word);
        if patience.wait() && owner != self.slot {
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
        if !self.try_lock(state, word) {
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

/// How long a waiter has waited: it spins, then yields, and is told to
/// check the holder's liveness (a read of `/proc`) every
/// `LIVENESS_EVERY` only.
#[derive(Default)]
struct Patience {
    spins: u32,
    next_check: Option<Instant>,
}

const LIVENESS_EVERY: Duration = Duration::from_millis(20);

/// The longest a miss waits for another thread's eviction to make room
/// before it goes on over budget.
const MAX_ROOM_WAIT: Duration = Duration::from_millis(200);

impl Patience {
    /// One step of waiting; whether to check the holder's liveness now.
    fn wait(&mut self) -> bool {
        self.spins += 1;
        if self.spins < 128 {
            std::hint::spin_loop();
            return false;
        }
        std::thread::yield_now();
        let now = Instant::now();
        match self.next_check {
            Some(at) if now < at => false,
            first => {
                self.next_check = Some(now + LIVENESS_EVERY);
                first.is_some()
            }
        }
    }
}

/// Frames locked for eviction, contiguous from `first`: victims (`true`)
/// and, between them, frames that hold nothing (`false`); the words their
/// pages had when locked, in page order.
#[derive(Default)]
struct Run {
    first: usize,
    frames: Vec<bool>,
    words: Vec<u64>,
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
