//! The key space, entirely in the arena so that every worker process sees
//! one index and a snapshot holds it: a chained hash table whose buckets
//! and entries are arena allocations addressed by `ShmPtr` (stored as
//! `ShmPtr::to_bits`, so the arena checks each one), reached through the
//! arena's bounds-checked atomic and byte views.
//!
//! ```text
//! table (root word 0):  magic | buckets | keys | lock[STRIPES] | head[buckets]
//! entry:                next | hash | expires_ms | key_len << 32 | value_len | key | value
//! ```
//!
//! Concurrency: bucket `b` is guarded by lock word `b % STRIPES`, held by
//! a process id (0 = free). A waiter that finds the holder dead (killed
//! mid-operation) takes the lock over; every operation makes its change
//! visible with one store of a chain link, so a dead holder leaves either
//! the old or the new entry linked (and at worst leaks one allocation).
//! Values are immutable: SET links a new entry and frees the old one.

use std::alloc::Layout;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hugearena::{Arena, ShmPtr};

const MAGIC: u64 = u64::from_le_bytes(*b"HAKVTAB1");
/// Lock stripes.
pub const STRIPES: u64 = 4096;
const HEADER_WORDS: u64 = 3 + STRIPES;
const ENTRY_WORDS: u64 = 5;

/// A handle to the table in one process.
pub struct Store<'a> {
    arena: &'a Arena,
    /// The whole table: header words, then bucket heads.
    table: &'a [AtomicU64],
    buckets: u64,
    pid: u64,
}

/// Errors a command can hit.
#[derive(Debug)]
pub enum StoreError {
    /// The arena is full.
    OutOfMemory(String),
    /// The value is not an integer (INCR and friends).
    NotInteger,
    /// INCR would overflow.
    Overflow,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Keys one [`Store::prefetch`] call looks at.
pub const PREFETCH_MAX: usize = 32;

/// Asks the CPU to bring the cache line at `at` in; never faults.
fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64, and a prefetch reads nothing the
    // program sees: any address, mapped or not, is fine.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

fn hash(key: &[u8]) -> u64 {
    // FNV-1a, then a final mix so bucket bits are well spread.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in key {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^ (h >> 29)
}

/// What SET should do about an existing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetMode {
    /// Always set.
    Always,
    /// Only if absent (NX).
    IfAbsent,
    /// Only if present (XX).
    IfPresent,
}

impl<'a> Store<'a> {
    /// Opens the table in root word 0, creating it with `buckets` buckets
    /// if the arena has none.
    pub fn open(arena: &'a Arena, buckets: u64) -> Result<Self, String> {
        let root = &arena.roots()[0];
        let mut table = root.load(Ordering::Acquire);
        if table == 0 {
            let buckets = buckets.next_power_of_two();
            let bytes = ((HEADER_WORDS + buckets) * 8) as usize;
            let p = arena
                .alloc(Layout::from_size_align(bytes, 4096).map_err(|e| e.to_string())?)
                .map_err(|e| format!("allocating the index: {e}"))?;
            // Fresh memory may hold an older table's bytes: clear it.
            let words = arena
                .atomics(p, (HEADER_WORDS + buckets) as usize)
                .map_err(|e| e.to_string())?;
            for w in words {
                w.store(0, Ordering::Relaxed);
            }
            words[1].store(buckets, Ordering::Relaxed);
            words[0].store(MAGIC, Ordering::Release);
            match root.compare_exchange(0, p.to_bits(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => table = p.to_bits(),
                Err(other) => {
                    let _ = arena.free(p);
                    table = other;
                }
            }
        }
        let table = ShmPtr::from_bits(table);
        let header = arena
            .atomics(table, 3)
            .map_err(|e| format!("root word 0: {e}"))?;
        if header[0].load(Ordering::Acquire) != MAGIC {
            return Err("root word 0 does not point to a key-value table".into());
        }
        let buckets = header[1].load(Ordering::Relaxed);
        let table = arena
            .atomics(table, (HEADER_WORDS + buckets) as usize)
            .map_err(|e| format!("the table's {buckets} buckets: {e}"))?;
        Ok(Store {
            arena,
            table,
            buckets,
            pid: u64::from(std::process::id()),
        })
    }

    fn keys(&self) -> &AtomicU64 {
        &self.table[2]
    }

    fn lock_word(&self, stripe: u64) -> &AtomicU64 {
        &self.table[(3 + stripe) as usize]
    }

    fn head(&self, bucket: u64) -> &AtomicU64 {
        &self.table[(HEADER_WORDS + bucket) as usize]
    }

    fn lock(&self, stripe: u64) -> Guard<'_, 'a> {
        let word = self.lock_word(stripe);
        let mut spins = 0u32;
        loop {
            match word.compare_exchange(0, self.pid, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => {
                    return Guard {
                        store: self,
                        stripe,
                    };
                }
                Err(holder) => {
                    spins += 1;
                    if spins % 64 == 0 && !alive(holder) {
                        // The holder died mid-operation: take the lock over.
                        if word
                            .compare_exchange(
                                holder,
                                self.pid,
                                Ordering::Acquire,
                                Ordering::Relaxed,
                            )
                            .is_ok()
                        {
                            return Guard {
                                store: self,
                                stripe,
                            };
                        }
                    }
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        // The holder may be waiting for a page fill (a
                        // lazily restored arena): sleep rather than take
                        // the CPU the fill needs.
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            }
        }
    }

    /// Releases every stripe lock, whoever holds it. Only for a table just
    /// restored from a snapshot, before any other process maps it: SAVE
    /// snapshots the table with every stripe held by the saving process,
    /// which does not map the restored arena and never releases them.
    pub fn release_restored_locks(&self) {
        for stripe in 0..STRIPES {
            self.lock_word(stripe).store(0, Ordering::Release);
        }
    }

    /// Holds every stripe: no other operation runs in any process.
    pub fn lock_all(&self) -> Vec<Guard<'_, 'a>> {
        (0..STRIPES).map(|s| self.lock(s)).collect()
    }

    /// The words of the entry a link holds (`ShmPtr::to_bits`).
    fn entry(&self, e: u64) -> &[AtomicU64] {
        self.arena
            .atomics(ShmPtr::from_bits(e), ENTRY_WORDS as usize)
            .expect("links hold live entries")
    }

    /// Whether entry `e`'s key is `key` (of the same length), compared a
    /// stack buffer at a time: a probe allocates nothing.
    fn key_is(&self, e: u64, key: &[u8]) -> bool {
        let mut chunk = [0u8; 64];
        let mut at = 0;
        while at < key.len() {
            let n = (key.len() - at).min(chunk.len());
            self.arena
                .read_bytes(
                    ShmPtr::from_bits(e),
                    (ENTRY_WORDS * 8) as usize + at,
                    &mut chunk[..n],
                )
                .expect("the key lies in its entry");
            if chunk[..n] != key[at..at + n] {
                return false;
            }
            at += n;
        }
        true
    }

    /// Finds `key` in its bucket (lock held): (link word pointing at the
    /// entry, entry).
    fn find(&self, bucket: u64, h: u64, key: &[u8]) -> Option<(&AtomicU64, u64)> {
        let mut link = self.head(bucket);
        loop {
            let e = link.load(Ordering::Acquire);
            if e == 0 {
                return None;
            }
            let w = self.entry(e);
            let klen = (w[3].load(Ordering::Relaxed) >> 32) as usize;
            if w[1].load(Ordering::Relaxed) == h && klen == key.len() && self.key_is(e, key) {
                return Some((link, e));
            }
            link = &w[0];
        }
    }

    fn expired(&self, e: u64, now: u64) -> bool {
        let at = self.entry(e)[2].load(Ordering::Relaxed);
        at != 0 && at <= now
    }

    fn unlink(&self, link: &AtomicU64, e: u64) {
        link.store(self.entry(e)[0].load(Ordering::Relaxed), Ordering::Release);
        self.keys().fetch_sub(1, Ordering::Relaxed);
        let _ = self.arena.free(ShmPtr::from_bits(e));
    }

    /// Whether entry `e`'s header words are in memory (reading them takes
    /// no fill).
    fn is_present(&self, e: u64) -> bool {
        let populator = self.arena.populator();
        let at = ShmPtr::from_bits(e).offset() as usize;
        populator.is_present(at) && populator.is_present(at + ENTRY_WORDS as usize * 8 - 1)
    }

    /// Entry `e`'s value length.
    fn value_len(&self, e: u64) -> usize {
        self.entry(e)[4].load(Ordering::Relaxed) as usize
    }

    /// Copies entry `e`'s value into `dst` (`value_len` bytes).
    fn read_value(&self, e: u64, dst: &mut [u8]) {
        let klen = self.entry(e)[3].load(Ordering::Relaxed) >> 32;
        self.arena
            .read_bytes(ShmPtr::from_bits(e), (ENTRY_WORDS * 8 + klen) as usize, dst)
            .expect("the value lies in its entry");
    }

    /// Entry `e`'s value, copied.
    fn value_of(&self, e: u64) -> Vec<u8> {
        let mut v = vec![0u8; self.value_len(e)];
        self.read_value(e, &mut v);
        v
    }

    /// Runs `f` on `key`'s live entry under its bucket's lock; an expired
    /// entry is unlinked and counts as absent.
    fn with_live<R>(&self, key: &[u8], f: impl FnOnce(u64) -> R) -> Option<R> {
        let (h, b) = self.locate(key);
        let _g = self.lock(b % STRIPES);
        self.find_live(b, h, key).map(|(_, e)| f(e))
    }

    /// [`find`](Self::find) (lock held), unlinking an expired entry and
    /// reporting it absent.
    fn find_live(&self, bucket: u64, h: u64, key: &[u8]) -> Option<(&AtomicU64, u64)> {
        let (link, e) = self.find(bucket, h, key)?;
        if self.expired(e, now_ms()) {
            self.unlink(link, e);
            return None;
        }
        Some((link, e))
    }

    fn new_entry(&self, h: u64, key: &[u8], value: &[u8], expires: u64) -> Result<u64, StoreError> {
        let bytes = (ENTRY_WORDS * 8) as usize + key.len() + value.len();
        let p = self
            .arena
            .alloc(Layout::from_size_align(bytes, 8).expect("valid layout"))
            .map_err(|e| StoreError::OutOfMemory(e.to_string()))?;
        let e = p.to_bits();
        let w = self.entry(e);
        w[0].store(0, Ordering::Relaxed);
        w[1].store(h, Ordering::Relaxed);
        w[2].store(expires, Ordering::Relaxed);
        w[3].store((key.len() as u64) << 32, Ordering::Relaxed);
        w[4].store(value.len() as u64, Ordering::Relaxed);
        let at = (ENTRY_WORDS * 8) as usize;
        self.arena
            .write_bytes(p, at, key)
            .expect("allocated for it");
        self.arena
            .write_bytes(p, at + key.len(), value)
            .expect("allocated for it");
        Ok(e)
    }

    /// Starts loading what lookups of `keys` will read first: their
    /// buckets, then the first entry of each bucket's chain. A pipeline of
    /// requests then waits for memory about once, not twice per request
    /// (the bucket array of a large arena is far larger than the caches).
    /// Reads no lock: what it loads is only a hint to the caches.
    pub fn prefetch(&self, keys: &[&[u8]]) {
        let mut buckets = [0u64; PREFETCH_MAX];
        let n = keys.len().min(PREFETCH_MAX);
        for (key, bucket) in keys.iter().zip(&mut buckets[..n]) {
            *bucket = self.locate(key).1;
            prefetch(std::ptr::from_ref(self.head(*bucket)).cast());
        }
        for &bucket in &buckets[..n] {
            let e = self.head(bucket).load(Ordering::Relaxed);
            if e != 0
                && let Ok(at) = self.arena.local(ShmPtr::from_bits(e))
            {
                prefetch(at.as_ptr());
            }
        }
    }

    fn locate(&self, key: &[u8]) -> (u64, u64) {
        let h = hash(key);
        (h, h & (self.buckets - 1))
    }

    /// GET into a reply: calls `header(out, len)`, then appends the
    /// value's bytes and `\r\n` to `out`, under the bucket's lock; false
    /// (nothing written) if the key is absent or expired. Nothing is
    /// allocated while `out` has room.
    pub fn get_append(
        &self,
        key: &[u8],
        out: &mut Vec<u8>,
        header: impl FnOnce(&mut Vec<u8>, usize),
    ) -> bool {
        self.with_live(key, |e| {
            let len = self.value_len(e);
            header(out, len);
            let start = out.len();
            out.resize(start + len, 0);
            self.read_value(e, &mut out[start..]);
            out.extend_from_slice(b"\r\n");
        })
        .is_some()
    }

    /// GET.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_live(key, |e| self.value_of(e))
    }

    /// SET with an absolute expiry (0: none). Returns whether it was set.
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        expires: u64,
        mode: SetMode,
    ) -> Result<bool, StoreError> {
        let (h, b) = self.locate(key);
        // Allocate and write outside the lock.
        let new = self.new_entry(h, key, value, expires)?;
        let _g = self.lock(b % STRIPES);
        let existing = self.find_live(b, h, key);
        let allowed = match mode {
            SetMode::Always => true,
            SetMode::IfAbsent => existing.is_none(),
            SetMode::IfPresent => existing.is_some(),
        };
        if !allowed {
            drop(_g);
            let _ = self.arena.free(ShmPtr::from_bits(new));
            return Ok(false);
        }
        self.link(b, new, existing);
        Ok(true)
    }

    /// Links `new` in place of `existing` (or at the bucket's head).
    fn link(&self, b: u64, new: u64, existing: Option<(&AtomicU64, u64)>) {
        match existing {
            Some((link, old)) => {
                self.entry(new)[0].store(
                    self.entry(old)[0].load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                link.store(new, Ordering::Release);
                let _ = self.arena.free(ShmPtr::from_bits(old));
            }
            None => {
                let head = self.head(b);
                self.entry(new)[0].store(head.load(Ordering::Relaxed), Ordering::Relaxed);
                head.store(new, Ordering::Release);
                self.keys().fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// DEL of one key; whether it existed.
    pub fn del(&self, key: &[u8]) -> bool {
        let (h, b) = self.locate(key);
        let _g = self.lock(b % STRIPES);
        match self.find(b, h, key) {
            Some((link, e)) => {
                let live = !self.expired(e, now_ms());
                self.unlink(link, e);
                live
            }
            None => false,
        }
    }

    /// Read-modify-write of one value under the lock: `f` gets the current
    /// value (None if absent) and returns the new one and a result.
    pub fn update<T>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> Result<(Vec<u8>, T), StoreError>,
    ) -> Result<T, StoreError> {
        let (h, b) = self.locate(key);
        let _g = self.lock(b % STRIPES);
        let existing = self.find_live(b, h, key);
        let old =
            existing.map(|(_, e)| (self.value_of(e), self.entry(e)[2].load(Ordering::Relaxed)));
        let (value, out) = f(old.as_ref().map(|(v, _)| v.as_slice()))?;
        let new = self.new_entry(h, key, &value, old.map_or(0, |(_, exp)| exp))?;
        self.link(b, new, existing);
        Ok(out)
    }

    /// Number of keys (expired ones not yet removed included, as Redis).
    pub fn len(&self) -> u64 {
        self.keys().load(Ordering::Relaxed)
    }

    /// FLUSHDB.
    pub fn clear(&self) {
        let _all = self.lock_all();
        for b in 0..self.buckets {
            let head = self.head(b);
            while head.load(Ordering::Acquire) != 0 {
                let e = head.load(Ordering::Acquire);
                self.unlink(head, e);
            }
        }
    }

    /// Removes expired keys from `count` buckets starting at `from`;
    /// returns the next bucket to look at.
    ///
    /// It reads only entries whose pages are present: with a lazily
    /// restored arena, a sweep that faulted while holding a stripe lock
    /// would stall every request on that stripe behind the page's fill.
    /// Chains it stops in are swept on a later pass.
    pub fn sweep(&self, from: u64, count: u64) -> u64 {
        let now = now_ms();
        for b in (from..from + count).map(|b| b & (self.buckets - 1)) {
            if self.head(b).load(Ordering::Relaxed) == 0 {
                continue;
            }
            let _g = self.lock(b % STRIPES);
            let mut link = self.head(b);
            loop {
                let e = link.load(Ordering::Acquire);
                if e == 0 || !self.is_present(e) {
                    break;
                }
                if self.expired(e, now) {
                    self.unlink(link, e);
                } else {
                    link = &self.entry(e)[0];
                }
            }
        }
        (from + count) & (self.buckets - 1)
    }
}

/// A held stripe lock.
pub struct Guard<'s, 'a> {
    store: &'s Store<'a>,
    stripe: u64,
}

impl Drop for Guard<'_, '_> {
    fn drop(&mut self) {
        self.store
            .lock_word(self.stripe)
            .store(0, Ordering::Release);
    }
}

fn alive(pid: u64) -> bool {
    // Signal 0 checks existence; a zombie still "exists" but holds nothing
    // useful, so also look at /proc's state.
    let exists = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .is_some_and(|zombie| !zombie)
}

/// Absolute expiry for a relative one in milliseconds.
pub fn expiry_in(ms: u64) -> u64 {
    now_ms().saturating_add(ms)
}
