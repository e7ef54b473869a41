//! A Redis-protocol key-value server whose index and values live in a
//! hugearena arena: several worker processes share one key space, `SAVE`
//! writes a snapshot, and a restart restores it lazily, answering at once.
//!
//! ```text
//! cargo run --release --example kvstore -- demo [--size SIZE] [--data SIZE]
//! cargo run --release --example kvstore -- serve --addr 127.0.0.1:6380 --dir DIR
//!     [--workers N] [--loops N] [--poll-us N] [--size SIZE] [--region-dir DIR]
//!     [--eager | --no-drain]
//! cargo run --release --example kvstore -- load --addr ADDR [--keys N] [--value BYTES] [--save]
//! cargo run --release --example kvstore -- wait-get --addr ADDR [--key N] [--value BYTES]
//! cargo run --release --example kvstore -- gets --addr ADDR [--keys N] [--value BYTES] [--secs S]
//! ```
//!
//! `SIZE` takes K, M and G suffixes (binary). A restart restores the
//! snapshot lazily: it answers at once, pages load on first touch, and a
//! background drain at the lowest priority reads the rest (`--no-drain`
//! leaves untouched pages unread). `--eager` reads the whole snapshot
//! before accepting connections (for comparison).
//!
//! `--region-dir` puts the arena's file, without a name, in a directory
//! (when its backend is a shmem one): on a tmpfs mounted `huge=always`
//! each 2 MiB block gets a huge folio before it is filled, whatever
//! `shmem_enabled` says, so full blocks become huge pages without a copy.
//! With `shmem_enabled=never` a region elsewhere copies every block it
//! collapses, which slows a lazy restore's first seconds.
//!
//! Each worker process runs `--loops` event loops (default 1; more cores
//! are used through `--workers`, processes that share the arena). A loop
//! that runs out of work polls for `--poll-us` microseconds before it
//! sleeps in the kernel: waking a sleeping thread (on a virtual machine,
//! an idle virtual CPU) costs more than a request. By default it polls
//! 50 µs when the loops leave a CPU free, and never when they would take
//! every CPU from the clients.

#[path = "../support/huge_tmpfs.rs"]
mod huge_tmpfs;
#[path = "../support/human.rs"]
mod human;

mod demo;
mod resp;
mod server;
mod store;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hugearena::persist::{self, SnapshotSource};
use hugearena::populate::{Drain, PopulateOptions, Populator, ZeroSource};
use hugearena::{Arena, HugePages, KernelCaps, Region, RegionOptions};

use server::{LoopOptions, SHUTDOWN, Shared, dump_path};

/// Command-line flags: `--name value` pairs and bare `--flags`.
struct Flags(Vec<String>);

impl Flags {
    fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The value of `name`, or exits saying that `cmd` needs it.
    fn required(&self, name: &str, cmd: &str) -> &str {
        self.value(name)
            .unwrap_or_else(|| fail(format!("{cmd} needs {name}")))
    }

    /// The value of `name` parsed, `default` if absent; exits on a bad value.
    fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> T
    where
        T::Err: std::fmt::Display,
    {
        self.value(name)
            .map_or(Ok(default), str::parse)
            .unwrap_or_else(|e| fail(format!("{name}: {e}")))
    }

    /// `--loops` and `--poll-us`, for `workers` worker processes.
    fn loop_options(&self, workers: usize) -> LoopOptions {
        let loops: usize = self.parsed("--loops", 1);
        if loops == 0 {
            fail("--loops must be at least 1");
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let default_poll = if workers.saturating_mul(loops) < cpus {
            50
        } else {
            0
        };
        LoopOptions {
            loops,
            poll: std::time::Duration::from_micros(self.parsed("--poll-us", default_poll)),
        }
    }

    /// `--addr` of `cmd`, parsed.
    fn addr(&self, cmd: &str) -> SocketAddr {
        self.required("--addr", cmd)
            .parse()
            .unwrap_or_else(|e| fail(format!("--addr: {e}")))
    }
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("kvstore: {msg}");
    std::process::exit(1)
}

extern "C" fn on_terminate(_: libc::c_int) {
    SHUTDOWN.store(true, Ordering::Relaxed);
}

fn install_terminate_handler() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_terminate),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &action) }.unwrap_or_else(|e| fail(format!("sigaction: {e}")));
    }
}

/// A listening socket with `SO_REUSEPORT`, so every worker binds the same
/// port and the kernel spreads connections over them.
fn listen(addr: SocketAddr) -> TcpListener {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .unwrap_or_else(|e| fail(format!("socket: {e}")));
    setsockopt(&fd, sockopt::ReuseAddr, &true)
        .unwrap_or_else(|e| fail(format!("SO_REUSEADDR: {e}")));
    setsockopt(&fd, sockopt::ReusePort, &true)
        .unwrap_or_else(|e| fail(format!("SO_REUSEPORT: {e}")));
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
    listen(&fd, Backlog::new(1024).expect("backlog"))
        .unwrap_or_else(|e| fail(format!("listen: {e}")));
    TcpListener::from(fd)
}

/// Buckets for an arena of `size` bytes: about one per KiB.
fn buckets_for(size: u64) -> u64 {
    (size >> 10).clamp(1 << 12, 1 << 24)
}

/// The arena's key-value table (created if it has none), or exits.
fn open_store(arena: &Arena) -> store::Store<'_> {
    store::Store::open(arena, buckets_for(arena.region().len() as u64)).unwrap_or_else(|e| fail(e))
}

/// What a server process serves, and how.
struct Serving {
    addr: SocketAddr,
    loops: LoopOptions,
    dir: PathBuf,
    /// The snapshot the arena was restored from, if any.
    restored_from: Option<PathBuf>,
    /// The background drain after a lazy restore (first process only).
    drain: Option<Drain>,
}

/// A server process's part.
enum Role {
    /// The first process: at shutdown it stops its drain and its workers
    /// (they stop their loops), and saves.
    Parent { workers: Vec<Child> },
    /// A worker: serves until SIGTERM.
    Worker,
}

fn run_server(arena: Arena, serving: Serving, role: Role) {
    let store = open_store(&arena);
    // One listening socket per event loop, all on the same port.
    let first = listen(serving.addr);
    let bound = first.local_addr().unwrap_or(serving.addr);
    let listeners: Vec<TcpListener> = std::iter::once(first)
        .chain((1..serving.loops.loops).map(|_| listen(bound)))
        .collect();
    let shared = Shared {
        arena: &arena,
        store,
        dir: serving.dir,
        port: serving.addr.port(),
        started: Instant::now(),
        restored_from: serving.restored_from,
        commands: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        drain: Mutex::new(serving.drain),
    };
    server::accept_loop(&shared, &listeners, serving.loops.poll);
    // Stopped before the shutdown save and before the arena goes.
    drop(
        shared
            .drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    if let Role::Parent { mut workers } = role {
        for w in &workers {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(w.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for w in &mut workers {
            let _ = w.wait();
        }
        match shared.save() {
            Ok(what) => eprintln!("kvstore: saved on shutdown: {what}"),
            Err(e) => eprintln!("kvstore: saving on shutdown failed: {e}"),
        }
    }
}

fn spawn_workers(
    n: usize,
    region: &Region,
    addr: SocketAddr,
    loops: LoopOptions,
    dir: &Path,
    snapshot: Option<&Path>,
) -> Vec<Child> {
    (1..n)
        .map(|_| {
            let mut cmd = Command::new(std::env::current_exe().expect("own path"));
            cmd.arg("worker")
                .args(["--parent", &std::process::id().to_string()])
                .args(["--region", &region.shareable_path().display().to_string()])
                .args(["--addr", &addr.to_string()])
                .args(["--loops", &loops.loops.to_string()])
                .args(["--poll-us", &loops.poll.as_micros().to_string()])
                .args(["--dir", &dir.display().to_string()]);
            if let Some(s) = snapshot {
                cmd.args(["--snapshot", &s.display().to_string()]);
            }
            cmd.spawn()
                .unwrap_or_else(|e| fail(format!("starting a worker: {e}")))
        })
        .collect()
}

/// How a restored arena populates: GETs touch scattered pages of the
/// index and the values, so a fault also reads the rest of its 64 KiB
/// (`KVSTORE_FAULT_AROUND` overrides it, for measurements).
fn restore_options() -> PopulateOptions {
    let around = std::env::var("KVSTORE_FAULT_AROUND")
        .ok()
        .and_then(|v| human::parse_size(&v).ok())
        .unwrap_or(64 << 10);
    PopulateOptions::new().fault_around(around as usize)
}

/// `options` with the region's file, unnamed, in `dir` if one is given
/// and the backend is a shmem one (hugetlb files live on hugetlbfs).
fn in_region_dir(options: RegionOptions, dir: Option<&Path>) -> RegionOptions {
    let Some(dir) = dir else {
        return options;
    };
    match options.plan(KernelCaps::cached()) {
        Ok(choice) if !choice.backend.kind().uses_hugetlb() => options.unnamed_in(dir),
        _ => options,
    }
}

fn serve(flags: &Flags) {
    let addr: SocketAddr = flags
        .value("--addr")
        .unwrap_or("127.0.0.1:6380")
        .parse()
        .unwrap_or_else(|e| fail(format!("--addr: {e}")));
    let dir = PathBuf::from(flags.required("--dir", "serve"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(format!("{}: {e}", dir.display())));
    let workers: usize = flags.parsed("--workers", 1);
    if workers == 0 {
        fail("--workers must be at least 1");
    }
    let loops = flags.loop_options(workers);
    let size = flags
        .value("--size")
        .map_or(Ok(1 << 30), human::parse_size)
        .unwrap_or_else(|e| fail(e));
    let region_dir = flags.value("--region-dir").map(PathBuf::from);
    install_terminate_handler();
    let dump = dump_path(&dir);
    let started = Instant::now();
    // A restored arena and a fresh one are the same type: one path.
    let (arena, restored_from) = if dump.exists() {
        let source = SnapshotSource::open(&dump).unwrap_or_else(|e| fail(e));
        let options = source.region_options().unwrap_or_else(|e| fail(e));
        let options = in_region_dir(options, region_dir.as_deref());
        let populator =
            persist::restore_with(options, source, restore_options()).unwrap_or_else(|e| fail(e));
        if flags.has("--eager") {
            populator
                .populate(0, populator.region().len())
                .unwrap_or_else(|e| fail(e));
        }
        let arena = Arena::attach(populator).unwrap_or_else(|e| fail(e));
        eprintln!(
            "kvstore: restored {} from {} in {:.1} ms ({}), listening on {addr}",
            human::bytes(arena.region().len() as u64),
            dump.display(),
            started.elapsed().as_secs_f64() * 1e3,
            if flags.has("--eager") {
                "eager: every page read"
            } else {
                "lazy: pages load on first touch"
            },
        );
        (arena, Some(dump))
    } else {
        let options = RegionOptions::new(size).huge_pages(HugePages::Try);
        let options = in_region_dir(options, region_dir.as_deref());
        let arena = Arena::create(options, PopulateOptions::new()).unwrap_or_else(|e| fail(e));
        eprintln!(
            "kvstore: new {} arena on {} ({}), listening on {addr}",
            human::bytes(size),
            arena.region().backend().kind(),
            arena.region().choice().reason
        );
        (arena, None)
    };
    // Before any worker maps the restored arena.
    if restored_from.is_some() {
        open_store(&arena).release_restored_locks();
    }
    // After a lazy restore, the pages nobody has touched yet are read in
    // the background at the lowest priority, 8 MiB at a time, so that
    // requests soon stop waiting for fills; requests keep filling what
    // they touch first. Stops when the server does.
    let lazy = !flags.has("--eager") && !flags.has("--no-drain");
    let drain = (restored_from.is_some() && lazy).then(|| {
        arena
            .populator()
            .start_drain(8 << 20)
            .unwrap_or_else(|e| fail(e))
    });
    let workers = spawn_workers(
        workers,
        arena.region(),
        addr,
        loops,
        &dir,
        restored_from.as_deref(),
    );
    let serving = Serving {
        addr,
        loops,
        dir,
        restored_from,
        drain,
    };
    run_server(arena, serving, Role::Parent { workers });
}

fn worker(flags: &Flags) {
    install_terminate_handler();
    // A worker stops with its first process, however that ends: one left
    // behind would keep answering on the port from an arena a restarted
    // server no longer uses.
    let parent: i32 = flags.parsed("--parent", 0);
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        fail(format!("prctl(PR_SET_PDEATHSIG): {e}"));
    }
    if nix::unistd::getppid().as_raw() != parent {
        // It ended before the line above.
        fail("the server that started this worker is gone");
    }
    let region =
        Arc::new(Region::open(flags.required("--region", "worker")).unwrap_or_else(|e| fail(e)));
    let addr = flags.addr("worker");
    let dir = PathBuf::from(flags.value("--dir").unwrap_or("."));
    // A fresh arena and a restored one are the same type: one path.
    let populator = match flags.value("--snapshot") {
        Some(snap) => {
            let source = SnapshotSource::open(snap).unwrap_or_else(|e| fail(e));
            Populator::with_options(region, source, restore_options())
        }
        None => Populator::with_options(region, ZeroSource, PopulateOptions::new()),
    }
    .unwrap_or_else(|e| fail(e));
    let arena = Arena::attach(populator).unwrap_or_else(|e| fail(e));
    let restored_from = flags.value("--snapshot").map(PathBuf::from);
    let serving = Serving {
        addr,
        loops: flags.loop_options(1),
        dir,
        restored_from,
        drain: None,
    };
    run_server(arena, serving, Role::Worker);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        fail(
            "usage: kvstore demo | serve --addr ADDR --dir DIR [--workers N] [--loops N] [--poll-us N] [--size SIZE] [--region-dir DIR] [--eager | --no-drain]",
        );
    };
    let flags = Flags(args[1..].to_vec());
    match cmd.as_str() {
        "serve" => serve(&flags),
        "worker" => worker(&flags),
        "demo" => demo::run(&flags_to_demo(&flags)),
        "load" => {
            demo::load(
                flags.addr("load"),
                flags.parsed("--keys", 100_000),
                flags.parsed("--value", 1000),
                flags.has("--save"),
            );
        }
        "gets" => {
            // GETs of random loaded keys (checked), 4 connections with 16
            // in flight each: what the demo measures after a restart.
            let rate = demo::throughput(
                flags.addr("gets"),
                flags.parsed("--keys", 100_000),
                flags.parsed("--value", 1000),
                flags.parsed("--secs", 3.0),
            );
            println!("RESULT gets_per_s={rate:.0}");
        }
        "wait-get" => {
            let waited = demo::wait_get(
                flags.addr("wait-get"),
                flags.parsed("--key", 0),
                flags.parsed("--value", 1000),
                Instant::now(),
            );
            println!("answered after {:.1} ms", waited.as_secs_f64() * 1e3);
        }
        other => fail(format!("unknown command {other:?}: use demo or serve")),
    }
}

fn flags_to_demo(flags: &Flags) -> demo::Options {
    let size = |name: &str, default: u64| {
        flags
            .value(name)
            .map_or(Ok(default), human::parse_size)
            .unwrap_or_else(|e| fail(e))
    };
    demo::Options {
        arena: size("--size", 3 << 30),
        data: size("--data", 1 << 30),
        value_len: size("--value", 1000) as usize,
    }
}
