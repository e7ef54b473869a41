//! `kvstore demo`: start a server on loopback, load a data set, SAVE,
//! crash it (SIGKILL), restart with a lazy restore and measure how soon it
//! answers and how fast it serves, then the same with an eager restore.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the demo does.
pub struct Options {
    /// Arena size.
    pub arena: u64,
    /// Bytes of values to load.
    pub data: u64,
    /// Bytes per value.
    pub value_len: usize,
}

/// A blocking RESP client.
struct Client {
    stream: BufReader<TcpStream>,
}

#[derive(Debug, PartialEq)]
enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Value>),
}

fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl Client {
    fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Client {
            stream: BufReader::with_capacity(1 << 20, s),
        })
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).expect("send");
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("reply");
        let (kind, rest) = line.trim_end().split_at(1);
        match kind {
            "+" => Value::Simple(rest.into()),
            "-" => Value::Error(rest.into()),
            ":" => Value::Int(rest.parse().expect("integer")),
            "$" => {
                let n: i64 = rest.parse().expect("length");
                if n < 0 {
                    return Value::Bulk(None);
                }
                let mut b = vec![0u8; n as usize + 2];
                self.stream.read_exact(&mut b).expect("bulk");
                b.truncate(n as usize);
                Value::Bulk(Some(b))
            }
            "*" => {
                let n: usize = rest.parse().expect("count");
                Value::Array((0..n).map(|_| self.read()).collect())
            }
            other => panic!("unexpected reply type {other:?}"),
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> Value {
        let mut out = Vec::new();
        encode(args, &mut out);
        self.send(&out);
        self.read()
    }
}

fn value_for(i: u64, len: usize) -> Vec<u8> {
    let mut v = format!("value-{i:012}-").into_bytes();
    while v.len() < len {
        v.push(b'a' + (v.len() as u64 + i) as u8 % 26);
    }
    v.truncate(len);
    v
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start(
    dir: &Path,
    region_dir: Option<&Path>,
    addr: SocketAddr,
    arena: u64,
    eager: bool,
) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.args(["serve", "--addr", &addr.to_string(), "--dir"])
        .arg(dir)
        .args(["--size", &arena.to_string()])
        .stderr(Stdio::null());
    if let Some(region_dir) = region_dir {
        cmd.arg("--region-dir").arg(region_dir);
    }
    if eager {
        cmd.arg("--eager");
    }
    cmd.spawn().expect("start the server")
}

/// Time from now until the server answers PING.
fn first_reply(addr: SocketAddr, since: Instant) -> Duration {
    loop {
        if let Ok(mut c) = Client::connect(addr) {
            if c.call(&[b"PING"]) == Value::Simple("PONG".into()) {
                return since.elapsed();
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn progress(label: &str, done: u64, total: u64, started: Instant) {
    let width = 40;
    let filled = (done * width / total.max(1)) as usize;
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    eprint!(
        "\r{label} [{}{}] {:>3}% {done}/{total} ({rate:.0}/s)   ",
        "#".repeat(filled),
        ".".repeat(width as usize - filled),
        done * 100 / total.max(1)
    );
}

/// GETs of random keys from 4 connections, 16 in flight each, for `secs`.
pub fn throughput(addr: SocketAddr, keys: u64, value_len: usize, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).expect("connect");
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let mut out = Vec::new();
                    let mut asked = Vec::new();
                    for _ in 0..16 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = x % keys;
                        encode(&[b"GET", format!("key:{k}").as_bytes()], &mut out);
                        asked.push(k);
                    }
                    c.send(&out);
                    for k in asked {
                        match c.read() {
                            Value::Bulk(Some(v)) => {
                                assert_eq!(v, value_for(k, value_len), "key:{k}")
                            }
                            other => panic!("key:{k}: {other:?}"),
                        }
                    }
                    ops += 16;
                }
                ops
            })
        })
        .collect();
    let ops: u64 = handles.into_iter().map(|h| h.join().expect("client")).sum();
    ops as f64 / secs
}

fn info_field(info: &str, name: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn info(addr: SocketAddr) -> String {
    match Client::connect(addr).expect("connect").call(&[b"INFO"]) {
        Value::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("INFO: {other:?}"),
    }
}

fn kill9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends keys `[from, to)` as one pipeline of SETs and checks every reply.
fn set_batch(c: &mut Client, from: u64, to: u64, value_len: usize, out: &mut Vec<u8>) {
    out.clear();
    for k in from..to {
        encode(
            &[
                b"SET",
                format!("key:{k}").as_bytes(),
                &value_for(k, value_len),
            ],
            out,
        );
    }
    c.send(out);
    for _ in from..to {
        match c.read() {
            Value::Simple(s) if s == "OK" => {}
            other => panic!("SET: {other:?}"),
        }
    }
}

/// Loads `keys` keys (`key:N` → `value_for(N)`) into the server at
/// `addr` with pipelined SETs, then SAVEs; for benchmarks against any
/// RESP server.
pub fn load(addr: SocketAddr, keys: u64, value_len: usize, save: bool) {
    let mut c = Client::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let started = Instant::now();
    let mut out = Vec::new();
    let mut i = 0;
    while i < keys {
        let n = 512.min(keys - i);
        set_batch(&mut c, i, i + n, value_len, &mut out);
        i += n;
    }
    println!(
        "loaded {keys} keys in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    if save {
        let t = Instant::now();
        match c.call(&[b"SAVE"]) {
            Value::Simple(s) if s == "OK" => {
                println!("saved in {:.2} s", t.elapsed().as_secs_f64())
            }
            other => panic!("SAVE: {other:?}"),
        }
    }
}

/// Polls `addr` until `GET key` answers with the value it was loaded with
/// (a loading Redis answers -LOADING); prints the milliseconds since `since`.
pub fn wait_get(addr: SocketAddr, key: u64, value_len: usize, since: Instant) -> Duration {
    loop {
        if let Ok(mut c) = Client::connect(addr) {
            if c.call(&[b"GET", format!("key:{key}").as_bytes()])
                == Value::Bulk(Some(value_for(key, value_len)))
            {
                return since.elapsed();
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs the demo.
pub fn run(o: &Options) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let keys = (o.data / o.value_len as u64).max(1);
    println!(
        "hugearena kvstore demo: {} keys × {} B values ({} MiB) in a {} MiB arena, server on {addr}",
        keys,
        o.value_len,
        o.data >> 20,
        o.arena >> 20
    );

    // The arena on a huge=always tmpfs (mounted here as root): 2 MiB
    // folios without copies whatever shmem_enabled says.
    let region_dir = match crate::huge_tmpfs::HUGE_TMPFS.mount() {
        Ok(path) => {
            println!(
                "huge=always tmpfs at {}: the arena's file goes there if its backend is a shmem one",
                path.display()
            );
            Some(path)
        }
        Err(why) => {
            println!("the arena's file is a memfd ({why})");
            None
        }
    };
    let server = start(dir.path(), region_dir.as_deref(), addr, o.arena, false);
    first_reply(addr, Instant::now());
    let mut c = Client::connect(addr).expect("connect");
    let started = Instant::now();
    let batch = 512;
    let mut out = Vec::new();
    let mut i = 0;
    while i < keys {
        let n = batch.min(keys - i);
        set_batch(&mut c, i, i + n, o.value_len, &mut out);
        i += n;
        if i % (batch * 64) == 0 || i == keys {
            progress("loading", i, keys, started);
        }
    }
    let load = started.elapsed();
    eprintln!();
    let t = Instant::now();
    assert_eq!(c.call(&[b"SAVE"]), Value::Simple("OK".into()));
    let save = t.elapsed();
    let snap_len = std::fs::metadata(dir.path().join("dump.hasnap")).map_or(0, |m| m.len());
    println!(
        "loaded in {:.1} s ({:.0} SET/s), SAVE took {:.2} s ({} MiB snapshot)",
        load.as_secs_f64(),
        keys as f64 / load.as_secs_f64(),
        save.as_secs_f64(),
        snap_len >> 20
    );
    drop(c);
    kill9(server);
    println!("server killed with SIGKILL after SAVE");

    let mut rows = Vec::new();
    for eager in [false, true] {
        let t = Instant::now();
        let server = start(dir.path(), region_dir.as_deref(), addr, o.arena, eager);
        let ping = first_reply(addr, t);
        let mut c = Client::connect(addr).expect("connect");
        let k = keys / 2;
        let got = c.call(&[b"GET", format!("key:{k}").as_bytes()]);
        let get = t.elapsed();
        assert_eq!(
            got,
            Value::Bulk(Some(value_for(k, o.value_len))),
            "key:{k} after restart"
        );
        let before = info(addr);
        let rate = throughput(addr, keys, o.value_len, 3.0);
        let after = info(addr);
        let dbsize = match c.call(&[b"DBSIZE"]) {
            Value::Int(n) => n as u64,
            other => panic!("DBSIZE: {other:?}"),
        };
        assert_eq!(dbsize, keys, "every saved key is back");
        rows.push((eager, ping, get, rate, before, after));
        kill9(server);
    }
    println!();
    println!(
        "| restart | first PONG | first GET | GET/s (4 conns, pipeline 16) | pages read before first reply | fill p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for (eager, ping, get, rate, before, after) in &rows {
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.0} | {} of {} | {} / {} µs |",
            if *eager {
                "eager (read everything first)"
            } else {
                "lazy (hugearena restore)"
            },
            ping.as_secs_f64() * 1e3,
            get.as_secs_f64() * 1e3,
            rate,
            info_field(before, "pages_populated"),
            info_field(before, "pages_total"),
            info_field(after, "fill_latency_p50_us"),
            info_field(after, "fill_latency_p99_us"),
        );
    }
    let lazy = &rows[0];
    println!();
    println!(
        "backend {} ({}), granule {}; after the lazy run: {} faults resolved in-thread, {} pages filled from the snapshot",
        info_field(&lazy.5, "backend"),
        info_field(&lazy.5, "backend_reason"),
        info_field(&lazy.5, "granule"),
        info_field(&lazy.5, "faults_in_thread"),
        info_field(&lazy.5, "fills"),
    );
    println!(
        "lazy restore answered {:.0}× sooner than the eager one",
        rows[1].1.as_secs_f64() / rows[0].1.as_secs_f64().max(1e-9)
    );
}
