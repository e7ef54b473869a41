//! Connections and commands: one thread per connection, pipelined
//! requests answered in one write, Redis' replies and error texts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hugearena::Arena;

use crate::resp::{self, Parsed, Reply};
use crate::store::{SetMode, Store, StoreError, expiry_in};

/// Set by SIGTERM/SIGINT: finish up.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// What every connection of a worker shares.
pub struct Shared<'a> {
    pub arena: &'a Arena,
    pub store: Store<'a>,
    pub dir: PathBuf,
    pub port: u16,
    pub started: Instant,
    pub restored_from: Option<PathBuf>,
    pub commands: AtomicU64,
    pub connections: AtomicU64,
}

/// The snapshot file in `dir`.
pub fn dump_path(dir: &std::path::Path) -> PathBuf {
    dir.join("dump.hasnap")
}

impl Shared<'_> {
    /// SAVE: quiesce every worker (all stripe locks), snapshot, release.
    pub fn save(&self) -> Result<String, String> {
        let _all = self.store.lock_all();
        let info = self
            .arena
            .snapshot(dump_path(&self.dir))
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "{} pages, {:.1} MiB in {:.0} ms",
            info.present,
            info.data_bytes as f64 / (1 << 20) as f64,
            info.elapsed.as_secs_f64() * 1e3
        ))
    }

    fn info(&self) -> String {
        let region = self.arena.region();
        let populator = self.arena.populator();
        let stats = populator.stats();
        let present = populator.present_granules();
        let us = |q: f64| stats.fill_latency.value_at_quantile(q) as f64 / 1e3;
        let a = self.arena.stats();
        format!(
            "# Server\r\nredis_version:7.0.0\r\nhugearena_version:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\
             \r\n# Clients\r\nconnected_clients:{}\r\n\
             \r\n# Memory\r\nused_memory:{}\r\n\
             \r\n# Stats\r\ntotal_commands_processed:{}\r\n\
             \r\n# Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n\
             \r\n# hugearena\r\nbackend:{}\r\nbackend_reason:{}\r\ngranule:{}\r\nregion_bytes:{}\r\n\
             pages_total:{}\r\npages_populated:{}\r\ndriver:{}\r\nfaults_in_thread:{}\r\nfaults_handler:{}\r\n\
             populate_calls:{}\r\nfills:{}\r\nreadahead:{}\r\npoisoned:{}\r\ncollapses:{}\r\n\
             fill_latency_p50_us:{:.1}\r\nfill_latency_p99_us:{:.1}\r\nfill_latency_p999_us:{:.1}\r\n\
             restored_from:{}\r\narena_in_use_bytes:{}\r\narena_fragmentation:{:.3}\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.port,
            self.started.elapsed().as_secs(),
            self.connections.load(Ordering::Relaxed),
            a.in_use_bytes(),
            self.commands.load(Ordering::Relaxed),
            self.store.len(),
            region.backend().kind(),
            region.choice().reason.replace(['\r', '\n'], " "),
            region.granule(),
            region.len(),
            region.len() / region.granule().bytes(),
            present,
            populator.driver(),
            stats.faults_in_thread,
            stats.faults_handler,
            stats.populate_calls,
            stats.fills,
            stats.readahead,
            stats.poisoned,
            stats.collapses,
            us(0.5),
            us(0.99),
            us(0.999),
            self.restored_from
                .as_ref()
                .map_or("none".into(), |p| p.display().to_string()),
            a.in_use_bytes(),
            a.fragmentation(),
        )
    }
}

fn arity_error(r: &mut Reply<'_>, name: &[u8]) {
    r.error(&format!(
        "ERR wrong number of arguments for '{}' command",
        String::from_utf8_lossy(name).to_lowercase()
    ));
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn store_error(r: &mut Reply<'_>, e: StoreError) {
    match e {
        StoreError::OutOfMemory(why) => r.error(&format!("OOM command not allowed: {why}")),
        StoreError::NotInteger => r.error("ERR value is not an integer or out of range"),
        StoreError::Overflow => r.error("ERR increment or decrement would overflow"),
    }
}

fn incr_by(s: &Shared<'_>, r: &mut Reply<'_>, key: &[u8], by: i64) {
    let result = s.store.update(key, |old| {
        let cur = match old {
            None => 0,
            Some(v) => parse_int(v).ok_or(StoreError::NotInteger)?,
        };
        let new = cur.checked_add(by).ok_or(StoreError::Overflow)?;
        Ok((new.to_string().into_bytes(), new))
    });
    match result {
        Ok(n) => r.int(n),
        Err(e) => store_error(r, e),
    }
}

/// Executes one command; `false` means close the connection (QUIT).
pub fn execute(s: &Shared<'_>, args: &[Vec<u8>], r: &mut Reply<'_>) -> bool {
    let Some(name) = args.first() else {
        return true;
    };
    s.commands.fetch_add(1, Ordering::Relaxed);
    let cmd = name.to_ascii_uppercase();
    let n = args.len();
    match cmd.as_slice() {
        b"PING" if n <= 2 => match args.get(1) {
            Some(m) => r.bulk(m),
            None => r.simple("PONG"),
        },
        b"ECHO" if n == 2 => r.bulk(&args[1]),
        b"QUIT" => {
            r.simple("OK");
            return false;
        }
        b"GET" if n == 2 => match s.store.get(&args[1]) {
            Some(v) => r.bulk(&v),
            None => r.null(),
        },
        b"SET" if n >= 3 => set(s, args, r),
        b"DEL" if n >= 2 => r.int(args[1..].iter().filter(|k| s.store.del(k)).count() as i64),
        b"EXISTS" if n >= 2 => r.int(
            args[1..]
                .iter()
                .filter(|k| s.store.get(k).is_some())
                .count() as i64,
        ),
        b"INCR" if n == 2 => incr_by(s, r, &args[1], 1),
        b"DECR" if n == 2 => incr_by(s, r, &args[1], -1),
        b"INCRBY" | b"DECRBY" if n == 3 => match parse_int(&args[2]) {
            Some(by) if cmd == b"INCRBY" => incr_by(s, r, &args[1], by),
            Some(by) => match by.checked_neg() {
                Some(neg) => incr_by(s, r, &args[1], neg),
                None => r.error("ERR decrement would overflow"),
            },
            None => r.error("ERR value is not an integer or out of range"),
        },
        b"MGET" if n >= 2 => {
            r.array(n - 1);
            for k in &args[1..] {
                match s.store.get(k) {
                    Some(v) => r.bulk(&v),
                    None => r.null(),
                }
            }
        }
        b"MSET" if n >= 3 && n % 2 == 1 => {
            for kv in args[1..].chunks(2) {
                if let Err(e) = s.store.set(&kv[0], &kv[1], 0, SetMode::Always) {
                    store_error(r, e);
                    return true;
                }
            }
            r.simple("OK");
        }
        b"APPEND" if n == 3 => {
            let result = s.store.update(&args[1], |old| {
                let mut v = old.map(<[u8]>::to_vec).unwrap_or_default();
                v.extend_from_slice(&args[2]);
                let len = v.len() as i64;
                Ok((v, len))
            });
            match result {
                Ok(len) => r.int(len),
                Err(e) => store_error(r, e),
            }
        }
        b"STRLEN" if n == 2 => r.int(s.store.get(&args[1]).map_or(0, |v| v.len() as i64)),
        b"DBSIZE" if n == 1 => r.int(s.store.len() as i64),
        b"FLUSHDB" | b"FLUSHALL" => {
            s.store.clear();
            r.simple("OK");
        }
        b"SAVE" if n == 1 => match s.save() {
            Ok(_) => r.simple("OK"),
            Err(e) => r.error(&format!("ERR saving the snapshot failed: {e}")),
        },
        b"INFO" => r.bulk(s.info().as_bytes()),
        b"CONFIG" if n >= 2 => {
            // redis-benchmark asks for "save" and "appendonly".
            let sub = args[1].to_ascii_uppercase();
            if sub == b"GET" && n == 3 {
                let key = String::from_utf8_lossy(&args[2]).to_lowercase();
                let value = match key.as_str() {
                    "save" => Some(""),
                    "appendonly" => Some("no"),
                    "databases" => Some("1"),
                    _ => None,
                };
                match value {
                    Some(v) => {
                        r.array(2);
                        r.bulk(key.as_bytes());
                        r.bulk(v.as_bytes());
                    }
                    None => r.array(0),
                }
            } else {
                r.error("ERR CONFIG subcommand not supported by this server (only CONFIG GET)");
            }
        }
        b"COMMAND" => r.array(0),
        b"SELECT" if n == 2 => {
            if args[1] == b"0" {
                r.simple("OK")
            } else {
                r.error("ERR DB index is out of range")
            }
        }
        b"CLIENT" => r.simple("OK"),
        b"PING" | b"ECHO" | b"GET" | b"SET" | b"DEL" | b"EXISTS" | b"INCR" | b"DECR"
        | b"INCRBY" | b"DECRBY" | b"MGET" | b"MSET" | b"APPEND" | b"STRLEN" | b"DBSIZE"
        | b"SAVE" => arity_error(r, name),
        _ => {
            let shown: Vec<String> = args[1..]
                .iter()
                .take(8)
                .map(|a| format!("'{}'", String::from_utf8_lossy(a)))
                .collect();
            r.error(&format!(
                "ERR unknown command '{}', with args beginning with: {}",
                String::from_utf8_lossy(name),
                shown.join(" ")
            ));
        }
    }
    true
}

fn set(s: &Shared<'_>, args: &[Vec<u8>], r: &mut Reply<'_>) {
    let mut expires = 0;
    let mut mode = SetMode::Always;
    let mut i = 3;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"NX" if mode == SetMode::Always => mode = SetMode::IfAbsent,
            b"XX" if mode == SetMode::Always => mode = SetMode::IfPresent,
            b"EX" | b"PX" if i + 1 < args.len() && expires == 0 => {
                let Some(v) = parse_int(&args[i + 1]).filter(|&v| v > 0) else {
                    r.error("ERR invalid expire time in 'set' command");
                    return;
                };
                let ms = if opt == b"EX" {
                    v.saturating_mul(1000)
                } else {
                    v
                };
                expires = expiry_in(ms as u64);
                i += 1;
            }
            _ => {
                r.error("ERR syntax error");
                return;
            }
        }
        i += 1;
    }
    match s.store.set(&args[1], &args[2], expires, mode) {
        Ok(true) => r.simple("OK"),
        Ok(false) => r.null(),
        Err(e) => store_error(r, e),
    }
}

/// Serves one connection until it closes, QUITs or breaks the protocol.
pub fn serve_connection(s: &Shared<'_>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    s.connections.fetch_add(1, Ordering::Relaxed);
    let mut input: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut output: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    'conn: loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if SHUTDOWN.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Err(_) => break,
        }
        let mut at = 0;
        let mut keep = true;
        while keep {
            match resp::parse(&input[at..]) {
                Parsed::Incomplete => break,
                Parsed::Command(args, used) => {
                    at += used;
                    keep = execute(s, &args, &mut Reply(&mut output));
                }
                Parsed::Error(e) => {
                    Reply(&mut output).error(&format!("ERR {e}"));
                    let _ = stream.write_all(&output);
                    break 'conn;
                }
            }
        }
        input.drain(..at);
        if !output.is_empty() {
            if stream.write_all(&output).is_err() {
                break;
            }
            output.clear();
        }
        if !keep {
            break;
        }
    }
    s.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Accepts until shutdown, one scoped thread per connection, plus a
/// sweeper that removes expired keys.
pub fn accept_loop(s: &Shared<'_>, listener: &TcpListener) {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut next = 0;
            while !SHUTDOWN.load(Ordering::Relaxed) {
                next = s.store.sweep(next, 1024);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        while !SHUTDOWN.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    scope.spawn(move || serve_connection(s, stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Sleep until a connection arrives (or 100 ms pass, to
                    // notice a shutdown).
                    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
                    use std::os::fd::AsFd;
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(100u8));
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
}
