//! The example key-value server, driven the way people drive Redis: with
//! `redis-cli` and `redis-benchmark` on loopback, two worker processes
//! sharing one key space, a SIGKILL after SAVE, and hostile input.

mod common;

/// The server's RESP parser, compiled into this test too.
#[path = "../examples/kvstore/resp.rs"]
#[allow(dead_code)]
mod resp;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::skip;

/// The example's binary, built by `cargo test` next to this test's.
fn kvstore_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join("kvstore");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --example kvstore` (cargo test builds it)",
        bin.display()
    );
    bin
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || skip(&format!(
            "{tool} is not installed: apt-get install redis-tools"
        ))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

struct Server {
    child: Option<Child>,
}

impl Server {
    /// A server with a 128 MiB arena unless `extra` gives `--size`.
    fn start(dir: &std::path::Path, port: u16, extra: &[&str]) -> Server {
        let size: &[&str] = if extra.contains(&"--size") {
            &[]
        } else {
            &["--size", "128M"]
        };
        let child = Command::new(kvstore_bin())
            .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--dir"])
            .arg(dir)
            .args(size)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Server { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while cli(port, &["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "the server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SIGTERM: the server stops its workers and saves.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends raw bytes on a fresh connection and returns what comes back
/// until the server closes or goes quiet.
fn raw(port: u16, bytes: &[u8]) -> String {
    String::from_utf8_lossy(&raw_bytes(port, bytes)).into_owned()
}

fn raw_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn info_field(port: u16, name: &str) -> String {
    cli(port, &["INFO"])
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[test]
fn redis_cli_commands_get_redis_replies() {
    if !have("redis-cli") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server::start(dir.path(), port, &[]);
    let c = |args: &[&str]| cli(port, args).trim_end().to_string();
    assert_eq!(c(&["SET", "foo", "bar"]), "OK");
    assert_eq!(c(&["GET", "foo"]), "bar");
    assert_eq!(c(&["SET", "foo", "baz", "NX"]), "");
    assert_eq!(c(&["SET", "nope", "x", "XX"]), "");
    assert_eq!(c(&["GET", "foo"]), "bar");
    assert_eq!(c(&["APPEND", "foo", "-more"]), "8");
    assert_eq!(c(&["STRLEN", "foo"]), "8");
    assert_eq!(c(&["INCR", "n"]), "1");
    assert_eq!(c(&["INCRBY", "n", "41"]), "42");
    assert_eq!(c(&["DECR", "n"]), "41");
    assert!(c(&["INCR", "foo"]).contains("ERR value is not an integer"));
    assert_eq!(c(&["MSET", "a", "1", "b", "2"]), "OK");
    assert_eq!(c(&["MGET", "a", "b", "missing"]), "1\n2");
    assert_eq!(c(&["EXISTS", "a", "b", "missing"]), "2");
    assert_eq!(c(&["DEL", "a", "missing"]), "1");
    assert_eq!(c(&["ECHO", "hello world"]), "hello world");
    assert_eq!(c(&["SET", "tmp", "v", "PX", "50"]), "OK");
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(c(&["GET", "tmp"]), "", "expired keys are gone");
    assert!(c(&["SET", "k", "v", "EX", "0"]).contains("invalid expire time"));
    assert!(c(&["SET", "k", "v", "BOGUS"]).contains("syntax error"));
    assert!(c(&["GET"]).contains("wrong number of arguments for 'get' command"));
    assert!(c(&["FROBNICATE", "x"]).contains("unknown command 'FROBNICATE'"));
    assert!(c(&["INFO"]).contains("# hugearena"));
    let dbsize: u64 = c(&["DBSIZE"]).parse().unwrap();
    assert_eq!(dbsize, 3, "foo, n and b (a deleted, tmp expired)");
    assert_eq!(c(&["FLUSHDB"]), "OK");
    assert_eq!(c(&["DBSIZE"]), "0");
    // Binary keys and values, through the protocol directly.
    let reply = raw_bytes(
        port,
        b"*3\r\n$3\r\nSET\r\n$3\r\n\0\r\n\r\n$4\r\n\xff\0\r\n\r\n*2\r\n$3\r\nGET\r\n$3\r\n\0\r\n\r\n",
    );
    assert_eq!(reply, b"+OK\r\n$4\r\n\xff\0\r\n\r\n");
}

#[test]
fn hostile_input_gets_an_error_and_never_hurts_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server::start(dir.path(), port, &[]);
    assert_eq!(
        raw(port, b"*1\r\n$99999999999\r\n"),
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    assert_eq!(
        raw(port, b"*-5x\r\n"),
        "-ERR Protocol error: invalid multibulk length\r\n"
    );
    assert!(raw(port, b"*1\r\n:5\r\n").starts_with("-ERR Protocol error: expected '$'"));
    assert_eq!(raw(port, b"PING\r\n"), "+PONG\r\n", "inline commands work");
    // A client that stops mid-command and one that floods garbage.
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk").unwrap();
    drop(half);
    let garbage: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = raw(port, &garbage);
    assert_eq!(raw(port, b"*1\r\n$4\r\nPING\r\n"), "+PONG\r\n");
}

#[test]
fn redis_benchmark_runs_against_it() {
    if !have("redis-benchmark") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server::start(dir.path(), port, &[]);
    // 50 clients with and without pipelining, then 200 at once on the
    // one worker's event loop.
    for (clients, pipeline) in [("50", "1"), ("50", "16"), ("200", "1")] {
        let out = Command::new("redis-benchmark")
            .args([
                "-p",
                &port.to_string(),
                "-t",
                "set,get,incr,mset",
                "-n",
                "20000",
            ])
            .args(["-c", clients, "-P", pipeline, "-q"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for test in ["SET", "GET", "INCR", "MSET (10 keys)"] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second"))
                .unwrap_or_else(|| panic!("no {test} result in:\n{text}"));
            eprintln!("{clients} clients, pipeline {pipeline}: {line}");
        }
    }
    // The counter redis-benchmark incremented is consistent.
    let n: u64 = cli(port, &["GET", "counter:__rand_int__"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, 60_000);
}

#[test]
fn two_workers_share_one_key_space() {
    if !have("redis-cli") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server::start(dir.path(), port, &["--workers", "2"]);
    // Every connection lands on one of the two processes; find both.
    let mut by_pid = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while by_pid.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "connections never reached a second worker"
        );
        let pid = info_field(port, "process_id");
        by_pid.entry(pid.clone()).or_insert(0);
        // Write through whichever worker this connection reached.
        let reply = raw(
            port,
            format!("*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n*3\r\n$3\r\nSET\r\n$8\r\nfrom:{:0>3}\r\n$5\r\nvalue\r\n", by_pid.len()).as_bytes(),
        );
        assert!(reply.ends_with("+OK\r\n"), "{reply}");
    }
    // Read every key through many connections: both workers answer, and
    // each sees the keys written through the other.
    let mut readers = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let reply = raw(
            port,
            b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n*3\r\n$4\r\nMGET\r\n$8\r\nfrom:001\r\n$8\r\nfrom:002\r\n",
        );
        assert!(reply.contains("$5\r\nvalue\r\n$5\r\nvalue\r\n"), "{reply}");
        if let Some(pid) = reply.lines().find_map(|l| l.strip_prefix("process_id:")) {
            readers.insert(pid.to_string());
        }
    }
    assert_eq!(readers.len(), 2, "reads reached both workers: {readers:?}");
}

/// `--region-dir` on a `huge=always` tmpfs: the arena is an unnamed file
/// there (2 MiB folios whatever `shmem_enabled` says), a second worker
/// opens it through the first one's descriptor, and a lazy restart into a
/// new unnamed file serves every saved key from both.
#[test]
fn an_arena_in_an_unnamed_file_on_a_huge_tmpfs_restarts_with_two_workers() {
    let Some(tmpfs) = common::huge_tmpfs() else {
        return;
    };
    if !have("redis-cli") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 3 GiB: more than the reserved hugetlb pool, so the backend is
    // ShmemThp, whose file can live on a tmpfs.
    let flags = [
        "--size",
        "3G",
        "--region-dir",
        tmpfs.to_str().unwrap(),
        "--workers",
        "2",
    ];
    let mut server = Server::start(dir.path(), port, &flags);
    assert_eq!(info_field(port, "backend"), "ShmemThp");
    let reason = info_field(port, "backend_reason");
    assert!(
        reason.contains(&format!(
            "huge= option of the tmpfs at {} is always",
            tmpfs.display()
        )),
        "{reason}"
    );
    let command = |args: &[&str]| {
        let mut c = format!("*{}\r\n", args.len());
        for a in args {
            c.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        c
    };
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let mut sets: String = keys
        .iter()
        .map(|k| command(&["SET", k, &format!("value of {k}")]))
        .collect();
    sets.push_str(&command(&["QUIT"]));
    assert_eq!(raw(port, sets.as_bytes()).matches("+OK\r\n").count(), 201);
    // Every key through many connections (QUIT closes each at once),
    // until both processes have answered: their pids.
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let reads = command(&["INFO", "server"]) + &command(&mget) + &command(&["QUIT"]);
    let want: String = keys
        .iter()
        .map(|k| format!("${}\r\nvalue of {k}\r\n", k.len() + 9))
        .collect();
    let answering = || {
        let mut pids = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while pids.len() < 2 && Instant::now() < deadline {
            let reply = raw(port, reads.as_bytes());
            assert!(reply.contains(&want), "{reply}");
            if let Some(pid) = reply.lines().find_map(|l| l.strip_prefix("process_id:")) {
                pids.insert(pid.to_string());
            }
        }
        assert_eq!(pids.len(), 2, "reads reached both workers: {pids:?}");
        pids
    };
    let before = answering();
    assert_eq!(cli(port, &["SAVE"]).trim(), "OK");
    server.kill9();
    // The killed server's worker goes with it (its parent-death signal):
    // wait until both are gone, or a connection to the new server could
    // reach the stopping worker's listener (same port) and be reset.
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in &before {
        while common::process_alive(pid.parse().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "{pid} outlived its killed server"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _server = Server::start(dir.path(), port, &flags);
    let after = answering();
    // The killed server's worker went with it: only the new ones answer.
    for _ in 0..20 {
        let pid = info_field(port, "process_id");
        assert!(
            !before.contains(&pid),
            "{pid} answered after its server was killed"
        );
        assert!(after.contains(&pid), "{pid} is not one of {after:?}");
    }
}

#[test]
fn a_killed_server_restarts_lazily_with_every_saved_key() {
    if !have("redis-cli") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server::start(dir.path(), port, &[]);
    let mut pipe = Vec::new();
    for i in 0..20_000 {
        let (k, v) = (
            format!("key:{i}"),
            format!("value-{i}-{}", "x".repeat(i % 300)),
        );
        pipe.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&pipe).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.len() < 5 * 20_000 {
        let n = s.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(cli(port, &["SAVE"]).trim(), "OK");
    cli(port, &["SET", "after-save", "lost"]);
    server.kill9();

    // Without the background drain, only the pages touched so far are
    // read at the first reply (with it, a small arena may be read before).
    let mut server = Server::start(dir.path(), port, &["--no-drain"]);
    let populated: u64 = info_field(port, "pages_populated").parse().unwrap();
    let total: u64 = info_field(port, "pages_total").parse().unwrap();
    assert!(
        populated < total,
        "restored lazily: {populated} of {total} pages at first reply"
    );
    assert_eq!(cli(port, &["DBSIZE"]).trim(), "20000");
    for i in (0..20_000).step_by(997) {
        assert_eq!(
            cli(port, &["GET", &format!("key:{i}")]).trim_end(),
            format!("value-{i}-{}", "x".repeat(i % 300))
        );
    }
    assert_eq!(
        cli(port, &["GET", "after-save"]).trim(),
        "",
        "not saved, not back"
    );
    eprintln!("pages populated at first reply: {populated} of {total}");
    server.kill9();

    // With the drain (the default), every page the snapshot holds is read
    // in the end (the runs it never wrote are left to their first touch),
    // and the keys are the same.
    let stored = hugearena::persist::SnapshotSource::open(dir.path().join("dump.hasnap"))
        .unwrap()
        .header()
        .present;
    let mut server = Server::start(dir.path(), port, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while info_field(port, "drain") != "finished" {
        assert!(
            Instant::now() < deadline,
            "the drain did not finish in 30 s: {}",
            info_field(port, "drain")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let populated: u64 = info_field(port, "pages_populated").parse().unwrap();
    assert!(
        (stored..total).contains(&populated),
        "{populated} pages populated: at least the {stored} stored, fewer than all {total}"
    );
    assert_eq!(cli(port, &["DBSIZE"]).trim(), "20000");
    assert_eq!(
        cli(port, &["GET", "key:19999"]).trim_end(),
        format!("value-19999-{}", "x".repeat(19_999 % 300))
    );
    server.kill9();
}

/// SAVE snapshots the table with every stripe lock held by the saving
/// server. A copy of the snapshot restored elsewhere while that server
/// still runs must not wait for it: the restored table's locks belong to
/// no process that maps it.
#[test]
fn a_copy_of_a_snapshot_serves_while_the_server_that_saved_it_runs() {
    if !have("redis-cli") {
        return;
    }
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (port, copy_port) = (free_port(), free_port());
    let _saver = Server::start(first.path(), port, &[]);
    let keys: Vec<String> = (0..64).map(|i| format!("copied-{i}")).collect();
    for k in &keys {
        assert_eq!(cli(port, &["SET", k, k]).trim(), "OK");
    }
    assert_eq!(cli(port, &["SAVE"]).trim(), "OK");
    std::fs::copy(
        first.path().join("dump.hasnap"),
        second.path().join("dump.hasnap"),
    )
    .unwrap();
    let _copy = Server::start(second.path(), copy_port, &["--no-drain"]);
    for k in &keys {
        // A GET that waited for the saver's lock would time out (500 ms).
        let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
        assert_eq!(
            raw(copy_port, request.as_bytes()),
            format!("${}\r\n{k}\r\n", k.len()),
            "GET {k} from the copy"
        );
    }
}

#[test]
fn sigterm_saves_and_a_restart_has_the_keys() {
    if !have("redis-cli") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    {
        let _server = Server::start(dir.path(), port, &["--workers", "2"]);
        assert_eq!(cli(port, &["SET", "kept", "by sigterm"]).trim(), "OK");
        // Dropping the server sends SIGTERM and waits.
    }
    assert!(
        dir.path().join("dump.hasnap").exists(),
        "SIGTERM wrote a snapshot"
    );
    let _server = Server::start(dir.path(), port, &[]);
    assert_eq!(cli(port, &["GET", "kept"]).trim(), "by sigterm");
}

#[test]
fn the_resp_parser_handles_pipelines_inline_commands_and_bad_lengths() {
    use resp::Parsed;
    // A command's arguments, copied, and the bytes it took.
    fn parse(buf: &[u8]) -> Result<(Vec<Vec<u8>>, usize), Parsed> {
        let mut ranges = Vec::new();
        match resp::parse(buf, &mut ranges) {
            Parsed::Command(n) => Ok((resp::owned(buf, &ranges), n)),
            other => Err(other),
        }
    }
    let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
    let (args, n) = parse(buf).expect("a whole command");
    assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
    assert_eq!(parse(&buf[n..]), Ok((vec![b"PING".to_vec()], 14)));
    assert_eq!(parse(&buf[..10]), Err(Parsed::Incomplete));
    assert_eq!(
        parse(b"PING  hello\r\n"),
        Ok((vec![b"PING".to_vec(), b"hello".to_vec()], 13))
    );
    assert!(
        matches!(parse(b"*1\r\n$99999999999\r\n"), Err(Parsed::Error(e)) if e.contains("invalid bulk length"))
    );
    assert!(matches!(parse(b"*x\r\n"), Err(Parsed::Error(e)) if e.contains("multibulk length")));
    assert!(matches!(parse(b"*1\r\n:5\r\n"), Err(Parsed::Error(e)) if e.contains("expected '$'")));
    let binary = b"*1\r\n$4\r\n\0\r\n\xff\r\n";
    assert_eq!(
        parse(binary),
        Ok((vec![b"\0\r\n\xff".to_vec()], binary.len()))
    );
}
