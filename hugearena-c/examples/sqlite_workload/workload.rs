//! A mixed SQL workload with checkable results: a bank of accounts with
//! two indexes, loaded in transactions, then a seeded mix of indexed point
//! reads, range scans, transfers in transactions (some rolled back),
//! inserts, deletes, aggregates, a temporary and an in-memory table, cache
//! shrinks and a VACUUM. Every statement's result goes into the log, so two
//! runs with different page caches can be compared line by line.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Size {
    /// Accounts loaded before the mix.
    pub(crate) accounts: u64,
    /// Operations in the mix.
    pub(crate) operations: u64,
    /// The page cache as a percentage of the database's size after the load.
    pub(crate) cache_percent: u64,
}

/// What a run produced.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// One line per statement result.
    pub(crate) log: Vec<String>,
    /// Pages of the database after the load.
    pub(crate) db_pages: u64,
    /// The cache size given to SQLite, in pages.
    pub(crate) cache_pages: u64,
    /// Time to load.
    pub(crate) load: Duration,
    /// Time of the mix.
    pub(crate) mix: Duration,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn name(id: u64) -> String {
    format!(
        "account-{:010}",
        id.wrapping_mul(0x9E37_79B9) % 10_000_000_000
    )
}

fn note(id: u64, rng: &mut Rng) -> String {
    let len = 60 + rng.below(200) as usize;
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let _ = write!(s, "{:x}", id.wrapping_mul(rng.next() | 1));
    }
    s.truncate(len);
    s
}

/// Runs the workload on a new database file at `path`.
pub(crate) fn run(path: &Path, size: Size) -> rusqlite::Result<Outcome> {
    let mut out = Outcome::default();
    let mut rng = Rng(0x853C_49E6_748F_EA9B);
    let db = Connection::open(path)?;
    db.execute_batch(
        "PRAGMA journal_mode = DELETE;
         PRAGMA synchronous = OFF;
         CREATE TABLE accounts(id INTEGER PRIMARY KEY, name TEXT NOT NULL, balance INTEGER NOT NULL, note TEXT);
         CREATE INDEX accounts_name ON accounts(name);
         CREATE INDEX accounts_balance ON accounts(balance);
         CREATE TABLE ledger(seq INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER);",
    )?;
    let load = Instant::now();
    let mut next_id = 0;
    while next_id < size.accounts {
        let tx = db.unchecked_transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO accounts(id, name, balance, note) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for _ in 0..1000.min(size.accounts - next_id) {
                ins.execute(params![
                    next_id as i64,
                    name(next_id),
                    (rng.below(1_000_000)) as i64,
                    note(next_id, &mut rng)
                ])?;
                next_id += 1;
            }
        }
        tx.commit()?;
    }
    out.load = load.elapsed();
    out.db_pages = db.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))? as u64;
    out.cache_pages = (out.db_pages * size.cache_percent / 100).max(16);
    db.execute_batch(&format!("PRAGMA cache_size = {}", out.cache_pages))?;
    let log = &mut out.log;
    log.push(format!("loaded {} accounts", size.accounts));

    db.execute_batch(
        "CREATE TEMP TABLE recent(id INTEGER PRIMARY KEY, seen INTEGER);
         ATTACH DATABASE ':memory:' AS mem;
         CREATE TABLE mem.tally(bucket INTEGER PRIMARY KEY, n INTEGER NOT NULL);",
    )?;
    let mix = Instant::now();
    let mut seq = 0i64;
    for op in 0..size.operations {
        let id = rng.below(next_id);
        match rng.below(100) {
            // Indexed point read by name.
            0..=34 => {
                let row = db
                    .prepare_cached(
                        "SELECT id, balance, length(note) FROM accounts WHERE name = ?1",
                    )?
                    .query_row([name(id)], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                        ))
                    });
                log.push(format!("get {id}: {row:?}"));
            }
            // Range scan on the balance index.
            35..=44 => {
                let lo = rng.below(1_000_000) as i64;
                let (n, sum): (i64, Option<i64>) = db
                    .prepare_cached("SELECT count(*), sum(balance) FROM accounts WHERE balance BETWEEN ?1 AND ?1 + 2000")?
                    .query_row([lo], |r| Ok((r.get(0)?, r.get(1)?)))?;
                log.push(format!("range {lo}: {n} {sum:?}"));
            }
            // A transfer in a transaction; one in eight rolled back.
            45..=64 => {
                let dst = rng.below(next_id);
                let amount = rng.below(1000) as i64;
                let tx = db.unchecked_transaction()?;
                let a = tx
                    .prepare_cached("UPDATE accounts SET balance = balance - ?2 WHERE id = ?1")?
                    .execute(params![id as i64, amount])?;
                let b = tx
                    .prepare_cached("UPDATE accounts SET balance = balance + ?2 WHERE id = ?1")?
                    .execute(params![dst as i64, amount])?;
                seq += 1;
                tx.prepare_cached(
                    "INSERT INTO ledger(seq, src, dst, amount) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![seq, id as i64, dst as i64, amount])?;
                if rng.below(8) == 0 {
                    tx.rollback()?;
                    seq -= 1;
                    log.push(format!(
                        "transfer {id}->{dst} {amount}: rolled back ({a} {b})"
                    ));
                } else {
                    tx.commit()?;
                    log.push(format!("transfer {id}->{dst} {amount}: {a} {b}"));
                }
            }
            // New accounts.
            65..=74 => {
                let n = db
                    .prepare_cached(
                        "INSERT INTO accounts(id, name, balance, note) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![
                        next_id as i64,
                        name(next_id),
                        rng.below(1_000_000) as i64,
                        note(next_id, &mut rng)
                    ])?;
                log.push(format!("insert {next_id}: {n}"));
                next_id += 1;
            }
            // Deletes, a few at a time.
            75..=82 => {
                let n = db
                    .prepare_cached("DELETE FROM accounts WHERE id BETWEEN ?1 AND ?1 + 3")?
                    .execute([id as i64])?;
                log.push(format!("delete {id}: {n}"));
            }
            // Aggregates: the latest ledger entries, and a grouped scan of a
            // stretch of the balance index.
            83..=86 => {
                let (n, total): (i64, Option<i64>) = db
                    .prepare_cached(
                        "SELECT count(*), sum(amount) FROM ledger WHERE seq > ?1 - 100",
                    )?
                    .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let lo = rng.below(1_000_000) as i64;
                let groups: Vec<(i64, i64)> = db
                    .prepare_cached(
                        "SELECT balance / 1000, count(*) FROM accounts WHERE balance BETWEEN ?1 AND ?1 + 5000 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 3",
                    )?
                    .query_map([lo], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                log.push(format!("ledger {n} {total:?} {groups:?}"));
            }
            // The temporary and the in-memory tables (caches SQLite never
            // purges).
            87..=94 => {
                db.prepare_cached("INSERT OR REPLACE INTO temp.recent(id, seen) VALUES (?1, ?2)")?
                    .execute(params![id as i64, op as i64])?;
                db.prepare_cached("INSERT INTO mem.tally(bucket, n) VALUES (?1, 1) ON CONFLICT(bucket) DO UPDATE SET n = n + 1")?
                    .execute([(id % 97) as i64])?;
                let (r, t): (i64, i64) = db
                    .prepare_cached(
                        "SELECT (SELECT count(*) FROM temp.recent), (SELECT sum(n) FROM mem.tally)",
                    )?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                log.push(format!("temp {r} {t}"));
            }
            // A long read of a stretch of the table.
            95..=98 => {
                let (n, sum): (i64, Option<i64>) = db
                    .prepare_cached("SELECT count(*), sum(length(note)) FROM accounts WHERE id BETWEEN ?1 AND ?1 + 500")?
                    .query_row([id as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                log.push(format!("stretch {id}: {n} {sum:?}"));
            }
            // Give the caches' memory back.
            _ => {
                db.execute_batch("PRAGMA shrink_memory")?;
                log.push("shrink".to_string());
            }
        }
    }
    out.mix = mix.elapsed();
    // Everything that is left, and SQLite's own check of the file.
    let (n, sum): (i64, Option<i64>) =
        db.query_row("SELECT count(*), sum(balance) FROM accounts", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    out.log.push(format!("final {n} {sum:?}"));
    db.execute_batch("VACUUM")?;
    let mut digest = 0u64;
    let mut all = db.prepare("SELECT id, name, balance, note FROM accounts ORDER BY id")?;
    let mut rows = all.query([])?;
    while let Some(r) = rows.next()? {
        let line = format!(
            "{}|{}|{}|{:?}",
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<String>>(3)?
        );
        for b in line.bytes() {
            digest = (digest ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    out.log.push(format!("dump digest {digest:016x}"));
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    out.log.push(format!("integrity {check}"));
    Ok(out)
}
