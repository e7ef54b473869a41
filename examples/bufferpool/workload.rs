//! The data the pool holds and the workload run on it: a static hash index
//! stored in pages (a key's hash picks its bucket page, which is searched
//! for the key), YCSB-like operations with uniform or zipfian keys, and the
//! checks every read makes.
//!
//! Page layout (64-bit words): word 0 is the page's LSN (bumped by every
//! update), word 1 its page number, words 8.. hold 63 records of 8 words:
//! key, version, and 6 value words that are a function of key and version,
//! so any read can tell a torn or corrupted record.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::pool::{BufferPool, PAGE, PAGE_WORDS, PageView, Redo, UpdateLog};

/// Records per page.
pub const RECORDS: usize = 63;
const HEADER_WORDS: usize = 8;
const RECORD_WORDS: usize = 8;
const VALUE_WORDS: usize = 6;
/// A prime: multiplying by it modulo the key count is a bijection for any
/// key count it does not divide, which scatters keys over pages.
const SCRAMBLE: u64 = 2_147_483_647;

/// Where keys live.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    keys: u64,
    inverse: u64,
}

impl Layout {
    /// The layout of a data file of `pages` pages.
    pub fn new(pages: usize) -> Layout {
        let keys = (pages * RECORDS) as u64;
        assert!(
            keys > 0 && keys < SCRAMBLE,
            "1 to {} pages",
            SCRAMBLE / RECORDS as u64
        );
        Layout {
            keys,
            inverse: inverse_mod(SCRAMBLE % keys, keys),
        }
    }

    /// Keys in the data.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// The bucket page of `key`.
    pub fn page_of(&self, key: u64) -> usize {
        (mul_mod(key, SCRAMBLE, self.keys) / RECORDS as u64) as usize
    }

    /// The home slot of `key` in its bucket page.
    pub fn slot_of(&self, key: u64) -> usize {
        (mul_mod(key, SCRAMBLE, self.keys) % RECORDS as u64) as usize
    }

    fn key_at(&self, page: usize, record: usize) -> u64 {
        mul_mod((page * RECORDS + record) as u64, self.inverse, self.keys)
    }
}

fn mul_mod(a: u64, b: u64, m: u64) -> u64 {
    (u128::from(a) * u128::from(b) % u128::from(m)) as u64
}

fn inverse_mod(a: u64, m: u64) -> u64 {
    let (mut t, mut new_t, mut r, mut new_r) = (0i128, 1i128, i128::from(m), i128::from(a));
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    t.rem_euclid(i128::from(m)) as u64
}

/// Value word `i` of `key` at `version`.
pub fn value(key: u64, version: u64, i: usize) -> u64 {
    let mut x = key ^ version.rotate_left(29) ^ ((i as u64) << 58);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The first word of record `record` in a page.
pub fn record_at(record: usize) -> usize {
    HEADER_WORDS + record * RECORD_WORDS
}

/// Writes the data file: `pages` pages, every record at version 0.
pub fn build(path: &Path, pages: usize) -> io::Result<()> {
    let layout = Layout::new(pages);
    let mut file = io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut words = vec![0u64; PAGE_WORDS];
    for p in 0..pages {
        words.fill(0);
        words[1] = p as u64;
        for r in 0..RECORDS {
            let key = layout.key_at(p, r);
            let at = record_at(r);
            words[at] = key;
            for i in 0..VALUE_WORDS {
                words[at + 2 + i] = value(key, 0, i);
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        file.write_all(&bytes)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Reads the whole data file once, so every backend starts with it in the
/// page cache.
pub fn warm_page_cache(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(());
        }
        at += n as u64;
    }
}

/// The record of `key` in its bucket page: its home slot first (where
/// the build put it), then the rest of the page. Bounded whatever a racing
/// writer left in the page.
pub fn find(view: &PageView, key: u64, home: usize) -> Option<usize> {
    if view.get(record_at(home)) == key {
        return Some(home);
    }
    (0..RECORDS).find(|&r| view.get(record_at(r)) == key)
}

/// What a read saw: the record's version and the page's LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The record's version.
    pub version: u64,
    /// The page's LSN.
    pub lsn: u64,
}

/// Reads `key` from its bucket page (home slot `home`), checking every
/// value word.
pub fn read(view: &PageView, key: u64, home: usize) -> Result<Seen, &'static str> {
    let r = find(view, key, home).ok_or("the key is missing from its bucket page")?;
    let at = record_at(r);
    let version = view.get(at + 1);
    if (0..VALUE_WORDS).any(|i| view.get(at + 2 + i) != value(key, version, i)) {
        return Err("a record's value does not match its version (torn or corrupted)");
    }
    Ok(Seen {
        version,
        lsn: view.get(0),
    })
}

/// Updates `key` (home slot `home`) to its next version, logging the redo
/// record first.
pub fn update(
    view: &PageView,
    log: &UpdateLog,
    key: u64,
    home: usize,
) -> Result<Seen, &'static str> {
    let record = find(view, key, home).ok_or("the key is missing from its bucket page")?;
    let redo = Redo {
        record,
        key,
        version: view.get(record_at(record) + 1) + 1,
        lsn: view.get(0) + 1,
    };
    log.log(&redo);
    Ok(Seen {
        version: redo.version,
        lsn: apply(view, &redo),
    })
}

/// Applies an update (again, for a dead writer's logged one); returns the
/// page's LSN.
pub fn redo(view: &PageView, redo: Redo) -> u64 {
    apply(view, &redo)
}

fn apply(view: &PageView, redo: &Redo) -> u64 {
    let at = record_at(redo.record);
    view.set(at, redo.key);
    for i in 0..VALUE_WORDS {
        view.set(at + 2 + i, value(redo.key, redo.version, i));
    }
    view.set(at + 1, redo.version);
    let lsn = view.get(0).max(redo.lsn);
    view.set(0, lsn);
    lsn
}

/// Checks every page of the data file: page number, keys where the layout
/// puts them, values matching versions, and LSNs at least the committed
/// ones `committed(p)` gives. Returns the pages checked.
pub fn verify_file(
    path: &Path,
    pages: usize,
    committed: impl Fn(usize) -> u64,
) -> Result<usize, String> {
    let layout = Layout::new(pages);
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; PAGE];
    for p in 0..pages {
        file.read_exact_at(&mut bytes, (p * PAGE) as u64)
            .map_err(|e| format!("page {p}: {e}"))?;
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        if word(1) != p as u64 {
            return Err(format!("page {p} holds page {}", word(1)));
        }
        if word(0) < committed(p) {
            return Err(format!(
                "page {p} has LSN {} in the file, but {} was committed: a write-back was lost",
                word(0),
                committed(p)
            ));
        }
        for r in 0..RECORDS {
            let at = record_at(r);
            let (key, version) = (word(at), word(at + 1));
            if key != layout.key_at(p, r)
                || (0..VALUE_WORDS).any(|i| word(at + 2 + i) != value(key, version, i))
            {
                return Err(format!("page {p} record {r} is corrupt in the file"));
            }
        }
    }
    Ok(pages)
}

/// The share of reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mix {
    /// YCSB C: reads only.
    ReadOnly,
    /// YCSB B: 95 % reads, 5 % updates.
    ReadMostly,
    /// YCSB A: 50 % reads, 50 % updates.
    Balanced,
}

impl Mix {
    /// From its name: `c`/`ro`, `b`/`95-5`, `a`/`50-50`.
    pub fn parse(s: &str) -> Option<Mix> {
        match s {
            "c" | "ro" | "read-only" => Some(Mix::ReadOnly),
            "b" | "95-5" => Some(Mix::ReadMostly),
            "a" | "50-50" => Some(Mix::Balanced),
            _ => None,
        }
    }

    fn update_percent(self) -> u64 {
        match self {
            Mix::ReadOnly => 0,
            Mix::ReadMostly => 5,
            Mix::Balanced => 50,
        }
    }

    /// Its YCSB letter, which [`parse`](Self::parse) reads back.
    pub fn letter(self) -> &'static str {
        match self {
            Mix::ReadOnly => "c",
            Mix::ReadMostly => "b",
            Mix::Balanced => "a",
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Mix::ReadOnly => "read-only",
            Mix::ReadMostly => "95/5",
            Mix::Balanced => "50/50",
        }
    }
}

/// How keys are drawn.
#[derive(Clone, Copy, Debug)]
pub enum KeyDist {
    /// Every key alike.
    Uniform,
    /// YCSB's zipfian (theta 0.99): few keys take most accesses.
    Zipf(Zipf),
}

impl KeyDist {
    /// From its name, over `n` keys.
    pub fn parse(s: &str, n: u64) -> Option<KeyDist> {
        match s {
            "uniform" => Some(KeyDist::Uniform),
            "zipf" | "zipfian" => Some(KeyDist::Zipf(Zipf::new(n, 0.99))),
            _ => None,
        }
    }

    fn next(&self, rng: &mut Rng, n: u64) -> u64 {
        match self {
            KeyDist::Uniform => rng.next() % n,
            KeyDist::Zipf(z) => z.next(rng.unit()),
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            KeyDist::Uniform => "uniform",
            KeyDist::Zipf(_) => "zipfian",
        }
    }
}

/// The zipfian generator of Gray et al. (as YCSB has it), with the zeta
/// constant summed exactly for the first terms and by Euler-Maclaurin for
/// the rest, so a billion keys set up instantly.
#[derive(Clone, Copy, Debug)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Zipf {
        let zeta = |n: u64| {
            let exact = n.min(10_000);
            let mut sum: f64 = (1..=exact).map(|i| (i as f64).powf(-theta)).sum();
            if n > exact {
                let (a, b) = (exact as f64, n as f64);
                sum += (b.powf(1.0 - theta) - a.powf(1.0 - theta)) / (1.0 - theta)
                    + (b.powf(-theta) - a.powf(-theta)) / 2.0;
            }
            sum
        };
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
        }
    }

    fn next(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }
}

/// xorshift64*.
pub struct Rng(u64);

impl Rng {
    /// Seeded (any seed).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What one thread did.
pub struct Tally {
    /// Operations done.
    pub ops: u64,
    /// Of which updates.
    pub updates: u64,
    /// Latency of each operation, in nanoseconds.
    pub latency: hdrhistogram::Histogram<u64>,
}

/// Runs the workload on `pool` as thread `thread` until `deadline` (or
/// `max_ops`), checking every read: the record matches its version, and
/// the page's LSN is at least the one committed before the read began (an
/// older one is a lost write: a dirty page evicted without write-back).
pub fn run(
    pool: &BufferPool,
    thread: usize,
    mix: Mix,
    keys: &KeyDist,
    seed: u64,
    deadline: Instant,
    max_ops: u64,
) -> Result<Tally, String> {
    let layout = Layout::new(pool.pages());
    let mut rng = Rng::new(seed);
    let mut tally = Tally {
        ops: 0,
        updates: 0,
        latency: hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 2)
            .expect("histogram bounds"),
    };
    let percent = mix.update_percent();
    while tally.ops < max_ops && (tally.ops % 256 != 0 || Instant::now() < deadline) {
        let key = keys.next(&mut rng, layout.keys());
        let (page, home) = (layout.page_of(key), layout.slot_of(key));
        let started = Instant::now();
        if rng.next() % 100 < percent {
            pool.write(page, thread, |view, log| update(view, log, key, home))
                .map_err(|e| format!("updating key {key}: {e}"))?
                .map_err(|e| format!("key {key} on page {page}: {e}"))?;
            tally.updates += 1;
        } else {
            let committed = pool.committed(page);
            let seen = pool
                .read(page, |view| read(view, key, home))
                .map_err(|e| format!("reading key {key}: {e}"))?
                .map_err(|e| format!("key {key} on page {page}: {e}"))?;
            if seen.lsn < committed {
                return Err(format!(
                    "page {page} read at LSN {} after LSN {committed} was committed: stale data",
                    seen.lsn
                ));
            }
        }
        let _ = tally.latency.record(started.elapsed().as_nanos() as u64);
        tally.ops += 1;
    }
    Ok(tally)
}

/// Touches pages in order until the pool's budget is used (or every page
/// is resident), so a run starts warm.
pub fn preload(pool: &BufferPool, budget_pages: usize, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    for p in 0..pool.pages().min(budget_pages) {
        pool.read(p, |view| view.get(1))
            .map_err(|e| format!("preloading page {p}: {e}"))?;
        if started.elapsed() > limit {
            break;
        }
    }
    Ok(())
}
