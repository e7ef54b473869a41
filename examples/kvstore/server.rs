//! Connections and commands: epoll event loops (one per worker process
//! by default), each with its own listening socket on the port; pipelined
//! requests answered in one write, their index entries prefetched first;
//! Redis' replies and error texts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hugearena::Arena;
use hugearena::populate::Drain;

use crate::resp::{self, Parsed, Reply};
use crate::store::{PREFETCH_MAX, SetMode, Store, StoreError, expiry_in};

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
    /// This process's background drain after a lazy restore, until
    /// shutdown.
    pub drain: Mutex<Option<Drain>>,
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

    /// `none`, `running DONE/TOTAL` (granules) or `finished`.
    fn drain_state(&self) -> String {
        let drain = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        match drain.as_ref() {
            None => "none".into(),
            Some(d) if d.is_finished() => "finished".into(),
            Some(d) => {
                let (done, total) = d.progress();
                format!("running {done}/{total}")
            }
        }
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
             restored_from:{}\r\ndrain:{}\r\narena_in_use_bytes:{}\r\narena_fragmentation:{:.3}\r\n",
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
            self.drain_state(),
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
pub fn execute(s: &Shared<'_>, args: &[&[u8]], r: &mut Reply<'_>) -> bool {
    let Some(&name) = args.first() else {
        return true;
    };
    s.commands.fetch_add(1, Ordering::Relaxed);
    let mut upper = [0u8; 16];
    let cmd = upper_case(name, &mut upper);
    let n = args.len();
    match cmd {
        b"PING" if n <= 2 => match args.get(1) {
            Some(m) => r.bulk(m),
            None => r.simple("PONG"),
        },
        b"ECHO" if n == 2 => r.bulk(args[1]),
        b"QUIT" => {
            r.simple("OK");
            return false;
        }
        b"GET" if n == 2 => {
            if !s.store.get_append(args[1], r.0, bulk_header) {
                r.null();
            }
        }
        b"SET" if n >= 3 => set(s, args, r),
        b"DEL" if n >= 2 => r.int(args[1..].iter().filter(|k| s.store.del(k)).count() as i64),
        b"EXISTS" if n >= 2 => r.int(
            args[1..]
                .iter()
                .filter(|k| s.store.get(k).is_some())
                .count() as i64,
        ),
        b"INCR" if n == 2 => incr_by(s, r, args[1], 1),
        b"DECR" if n == 2 => incr_by(s, r, args[1], -1),
        b"INCRBY" | b"DECRBY" if n == 3 => match parse_int(args[2]) {
            Some(by) if cmd == b"INCRBY" => incr_by(s, r, args[1], by),
            Some(by) => match by.checked_neg() {
                Some(neg) => incr_by(s, r, args[1], neg),
                None => r.error("ERR decrement would overflow"),
            },
            None => r.error("ERR value is not an integer or out of range"),
        },
        b"MGET" if n >= 2 => {
            r.array(n - 1);
            for k in &args[1..] {
                if !s.store.get_append(k, r.0, bulk_header) {
                    r.null();
                }
            }
        }
        b"MSET" if n >= 3 && n % 2 == 1 => {
            for kv in args[1..].chunks(2) {
                if let Err(e) = s.store.set(kv[0], kv[1], 0, SetMode::Always) {
                    store_error(r, e);
                    return true;
                }
            }
            r.simple("OK");
        }
        b"APPEND" if n == 3 => {
            let result = s.store.update(args[1], |old| {
                let mut v = old.map(<[u8]>::to_vec).unwrap_or_default();
                v.extend_from_slice(args[2]);
                let len = v.len() as i64;
                Ok((v, len))
            });
            match result {
                Ok(len) => r.int(len),
                Err(e) => store_error(r, e),
            }
        }
        b"STRLEN" if n == 2 => r.int(s.store.get(args[1]).map_or(0, |v| v.len() as i64)),
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
            if args[1].eq_ignore_ascii_case(b"GET") && n == 3 {
                let key = String::from_utf8_lossy(args[2]).to_lowercase();
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

/// `name` upper-cased into `buf`; a name too long for it is no command
/// (an empty slice), so it costs no allocation either way.
fn upper_case<'b>(name: &[u8], buf: &'b mut [u8; 16]) -> &'b [u8] {
    if name.len() > buf.len() {
        return &[];
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name);
    out.make_ascii_uppercase();
    out
}

/// The RESP header of a bulk reply of `len` bytes, written before the
/// store appends the value.
fn bulk_header(out: &mut Vec<u8>, len: usize) {
    Reply(out).bulk_header(len);
}

fn set(s: &Shared<'_>, args: &[&[u8]], r: &mut Reply<'_>) {
    let mut expires = 0;
    let mut mode = SetMode::Always;
    let mut i = 3;
    while i < args.len() {
        let mut upper = [0u8; 16];
        let opt = upper_case(args[i], &mut upper);
        match opt {
            b"NX" if mode == SetMode::Always => mode = SetMode::IfAbsent,
            b"XX" if mode == SetMode::Always => mode = SetMode::IfPresent,
            b"EX" | b"PX" if i + 1 < args.len() && expires == 0 => {
                let Some(v) = parse_int(args[i + 1]).filter(|&v| v > 0) else {
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
    match s.store.set(args[1], args[2], expires, mode) {
        Ok(true) => r.simple("OK"),
        Ok(false) => r.null(),
        Err(e) => store_error(r, e),
    }
}

/// One client connection of the event loop: non-blocking, with the bytes
/// read but not yet parsed and the replies not yet sent.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The arguments of the command being run, as ranges of `input`
    /// (reused: parsing allocates nothing per request).
    args: Vec<std::ops::Range<usize>>,
    /// Bytes of `output` already sent.
    sent: usize,
    /// What the loop waits for on it now.
    interest: Interest,
}

/// What the event loop waits for on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Interest {
    /// Requests.
    Read,
    /// Requests, and room for the replies left to send.
    ReadWrite,
    /// Room for the replies only: a client that sends requests without
    /// reading the replies is not read from until they are sent, so its
    /// unsent replies stay below about `MAX_UNSENT`.
    Write,
}

/// Bytes of replies a connection may have unsent before its requests wait.
const MAX_UNSENT: usize = 4 << 20;

/// What serving a readable or writable connection came to.
enum Served {
    /// Keep it, waiting for this.
    Open(Interest),
    /// Close it.
    Closed,
}

impl Conn {
    /// Reads what arrived, runs every whole command, and sends what it can.
    fn serve(&mut self, s: &Shared<'_>, chunk: &mut [u8]) -> Served {
        let mut open = true;
        loop {
            match self.stream.read(chunk) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Served::Closed,
            }
        }
        self.prefetch_keys(s);
        let mut at = 0;
        while open {
            let input = &self.input[at..];
            match resp::parse(input, &mut self.args) {
                Parsed::Incomplete => break,
                Parsed::Command(used) => {
                    at += used;
                    let reply = &mut Reply(&mut self.output);
                    open = match self.args.len() {
                        // Most commands: the argument slices on the stack.
                        n if n <= 8 => {
                            let mut args: [&[u8]; 8] = [&[]; 8];
                            for (a, r) in args.iter_mut().zip(&self.args) {
                                *a = &input[r.clone()];
                            }
                            execute(s, &args[..n], reply)
                        }
                        _ => {
                            let args: Vec<&[u8]> =
                                self.args.iter().map(|r| &input[r.clone()]).collect();
                            execute(s, &args, reply)
                        }
                    };
                }
                Parsed::Error(e) => {
                    Reply(&mut self.output).error(&format!("ERR {e}"));
                    open = false;
                }
            }
        }
        self.input.drain(..at);
        match self.flush() {
            Err(()) => Served::Closed,
            // A closing connection gets its last replies, best effort.
            Ok(()) if !open => Served::Closed,
            Ok(()) => Served::Open(self.interest_now()),
        }
    }

    /// With several whole requests read (a pipeline), starts loading the
    /// index entries their GETs and SETs will look up, so that their
    /// cache misses overlap instead of coming one after another.
    fn prefetch_keys(&mut self, s: &Shared<'_>) {
        let mut keys: [&[u8]; PREFETCH_MAX] = [&[]; PREFETCH_MAX];
        let (mut n, mut at) = (0, 0);
        while n < PREFETCH_MAX {
            let input = &self.input[at..];
            let Parsed::Command(used) = resp::parse(input, &mut self.args) else {
                break;
            };
            if at == 0 && used == input.len() {
                // A lone request: nothing to overlap.
                return;
            }
            if let [name, key, ..] = self.args.as_slice()
                && (input[name.clone()].eq_ignore_ascii_case(b"GET")
                    || input[name.clone()].eq_ignore_ascii_case(b"SET"))
            {
                keys[n] = &self.input[at + key.start..at + key.end];
                n += 1;
            }
            at += used;
        }
        s.store.prefetch(&keys[..n]);
    }

    /// What to wait for, from the replies left to send.
    fn interest_now(&self) -> Interest {
        match self.output.len() - self.sent {
            0 => Interest::Read,
            unsent if unsent < MAX_UNSENT => Interest::ReadWrite,
            _ => Interest::Write,
        }
    }

    /// Sends what the socket takes (the rest waits in `output`); `Err` if
    /// the connection broke.
    fn flush(&mut self) -> Result<(), ()> {
        while self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(0) => return Err(()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        self.output.clear();
        self.sent = 0;
        Ok(())
    }
}

/// Waits for events: polls (`epoll_wait` without a timeout) for up to
/// `poll`, then sleeps in the kernel for up to 100 ms. A request that
/// arrives while the loop polls is served without waking a sleeping
/// thread, which on a virtual machine costs an interrupt to an idle
/// virtual CPU: more than serving the request.
fn wait(
    epoll: &nix::sys::epoll::Epoll,
    events: &mut [nix::sys::epoll::EpollEvent],
    poll: Duration,
) -> nix::Result<usize> {
    use nix::sys::epoll::EpollTimeout;
    if !poll.is_zero() {
        let started = Instant::now();
        while started.elapsed() < poll {
            let n = epoll.wait(events, EpollTimeout::ZERO)?;
            if n > 0 {
                return Ok(n);
            }
            std::hint::spin_loop();
        }
    }
    epoll.wait(events, EpollTimeout::from(100u16))
}

/// The listener's token in the event loop (connections use their slot).
const LISTENER: u64 = u64::MAX;

/// Serves every connection of this worker from one thread with epoll:
/// non-blocking sockets, level-triggered, a buffer pair per connection.
/// Returns at shutdown (checked at least every 100 ms).
///
/// The loop polls for up to `poll` before it sleeps (see [`wait`]).
fn event_loop(s: &Shared<'_>, listener: &TcpListener, poll: Duration) -> nix::Result<()> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut chunk = vec![0u8; 64 << 10];
    let readable = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
    while !SHUTDOWN.load(Ordering::Relaxed) {
        let n = match wait(&epoll, &mut events, poll) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if stream.set_nonblocking(true).is_err() {
                                continue;
                            }
                            let _ = stream.set_nodelay(true);
                            let slot = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            if epoll
                                .add(&stream, EpollEvent::new(readable, slot as u64))
                                .is_err()
                            {
                                free.push(slot);
                                continue;
                            }
                            s.connections.fetch_add(1, Ordering::Relaxed);
                            conns[slot] = Some(Conn {
                                stream,
                                input: Vec::with_capacity(16 << 10),
                                output: Vec::with_capacity(16 << 10),
                                args: Vec::with_capacity(16),
                                sent: 0,
                                interest: Interest::Read,
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // Out of descriptors, say: serve the others.
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let slot = token as usize;
            let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let requests = readable | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
            let served = if conn.interest == Interest::Write || !ev.events().intersects(requests) {
                match conn.flush() {
                    Ok(()) => Served::Open(conn.interest_now()),
                    Err(()) => Served::Closed,
                }
            } else {
                conn.serve(s, &mut chunk)
            };
            match served {
                Served::Open(interest) if interest != conn.interest => {
                    conn.interest = interest;
                    let flags = match interest {
                        Interest::Read => readable,
                        Interest::ReadWrite => readable | EpollFlags::EPOLLOUT,
                        Interest::Write => EpollFlags::EPOLLOUT,
                    };
                    let mut event = EpollEvent::new(flags, token);
                    if epoll.modify(&conn.stream, &mut event).is_err() {
                        close(&epoll, &mut conns, &mut free, slot, s);
                    }
                }
                Served::Open(_) => {}
                Served::Closed => close(&epoll, &mut conns, &mut free, slot, s),
            }
        }
    }
    for slot in 0..conns.len() {
        close(&epoll, &mut conns, &mut free, slot, s);
    }
    Ok(())
}

fn close(
    epoll: &nix::sys::epoll::Epoll,
    conns: &mut [Option<Conn>],
    free: &mut Vec<usize>,
    slot: usize,
    s: &Shared<'_>,
) {
    if let Some(conn) = conns[slot].take() {
        let _ = epoll.delete(&conn.stream);
        free.push(slot);
        s.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a worker's event loops run.
#[derive(Clone, Copy, Debug)]
pub struct LoopOptions {
    /// Event loops (threads, each with a listening socket of its own).
    pub loops: usize,
    /// How long a loop that runs out of work polls before it sleeps.
    pub poll: Duration,
}

/// Serves connections until shutdown with one event loop per listener
/// (each a socket of its own on the same port, `SO_REUSEPORT`, so the
/// kernel spreads the connections over the loops), plus a sweeper that
/// removes expired keys.
pub fn accept_loop(s: &Shared<'_>, listeners: &[TcpListener], poll: Duration) {
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut next = 0;
            while !SHUTDOWN.load(Ordering::Relaxed) {
                next = s.store.sweep(next, 1024);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        for listener in listeners {
            scope.spawn(move || {
                listener
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                if let Err(e) = event_loop(s, listener, poll) {
                    eprintln!("kvstore: an event loop failed: {e}");
                    SHUTDOWN.store(true, Ordering::Relaxed);
                }
            });
        }
    });
}
