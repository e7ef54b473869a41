//! The handler-thread driver: N threads read fault events from the
//! userfaultfd and resolve them. Each thread polls the descriptor and reads
//! a batch with one `read(2)`; the kernel hands each event to one reader,
//! so readers share no lock and no queue. Duplicate events (two threads
//! faulting on one page) meet in the page-state word and end in `EEXIST`
//! plus a wake.
//!
//! A thread that exits abnormally (a panic, an unexpected error) wakes the
//! faults it had read but not resolved, so other handlers see them again;
//! the last one to go fails closed (see `Core::fail_closed`): nobody stays
//! parked forever.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::engine::Core;
use super::stats::Counters;
use crate::sys::uffd::{Event, UffdMsg};
use crate::sys::{Errno, SysError};

/// Events read per `read(2)`.
const BATCH: usize = 32;

/// Running handler threads.
#[derive(Debug)]
pub(crate) struct HandlerPool {
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
}

impl HandlerPool {
    pub(crate) fn spawn(core: &Arc<Core>, threads: usize) -> std::io::Result<HandlerPool> {
        let stop = Arc::new(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let mut pool = HandlerPool {
            stop,
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            core.live_handlers.fetch_add(1, Ordering::AcqRel);
            let (thread_core, stop) = (Arc::clone(core), Arc::clone(&pool.stop));
            let spawned = std::thread::Builder::new()
                .name(format!("hugearena-uffd-{i}"))
                .spawn(move || serve(&thread_core, &stop));
            match spawned {
                Ok(handle) => pool.threads.push(handle),
                Err(e) => {
                    core.live_handlers.fetch_sub(1, Ordering::AcqRel);
                    pool.stop();
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    /// In a forked child, where these threads do not exist: lets go of
    /// them without a word to the stop descriptor, which the parent's
    /// threads share.
    pub(crate) fn forget(mut self) {
        for t in self.threads.drain(..) {
            std::mem::forget(t);
        }
    }

    /// Tells every thread to resolve what is pending and exit; waits.
    pub(crate) fn stop(&mut self) {
        // The counter stays non-zero, so every thread sees it readable.
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Wakes what a dying thread had read but not resolved; the last handler
/// to die fails closed.
struct ExitGuard<'c> {
    core: &'c Core,
    unresolved: [usize; BATCH],
    /// The faulting thread of each (`UFFD_FEATURE_THREAD_ID`, else 0).
    threads: [u32; BATCH],
    pending: std::ops::Range<usize>,
    clean: bool,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        let core = self.core;
        if !self.clean {
            core.failures.push(SysError::new(
                "userfaultfd handler thread exited (panic or error)",
                Errno::ECANCELED,
            ));
            for &addr in &self.unresolved[self.pending.clone()] {
                let _ = core.uffd.wake(addr as *mut u8, core.granule());
            }
        }
        let last = core.live_handlers.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && !self.clean {
            core.fail_closed();
        }
    }
}

fn serve(core: &Core, stop: &EventFd) {
    let mut guard = ExitGuard {
        core,
        unresolved: [0; BATCH],
        threads: [0; BATCH],
        pending: 0..0,
        clean: false,
    };
    let mut msgs = [UffdMsg::default(); BATCH];
    loop {
        let mut fds = [
            PollFd::new(core.uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                core.failures
                    .push(SysError::new("poll(userfaultfd)", errno));
                return;
            }
        }
        let stopping = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        // Resolve everything pending, also when stopping: the threads that
        // faulted are parked until someone does.
        let mut idle_since: Option<std::time::Instant> = None;
        loop {
            let n = match core.uffd.read_events(&mut msgs) {
                Ok(0) if stopping || core.handler_spin.is_zero() => break,
                Ok(0) => {
                    // Look again for a while before sleeping in poll (see
                    // `PopulateOptions::handler_spin`); one spinner at a
                    // time.
                    let since = match idle_since {
                        Some(since) => since,
                        None if core
                            .handler_spinning
                            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok() =>
                        {
                            *idle_since.insert(std::time::Instant::now())
                        }
                        None => break,
                    };
                    if since.elapsed() >= core.handler_spin {
                        core.handler_spinning.store(false, Ordering::Release);
                        break;
                    }
                    std::hint::spin_loop();
                    continue;
                }
                Ok(n) => {
                    if idle_since.take().is_some() {
                        core.handler_spinning.store(false, Ordering::Release);
                    }
                    n
                }
                Err(e) => {
                    if idle_since.is_some() {
                        core.handler_spinning.store(false, Ordering::Release);
                    }
                    core.failures.push(e);
                    return;
                }
            };
            for (i, msg) in msgs[..n].iter().enumerate() {
                (guard.unresolved[i], guard.threads[i]) = match msg.decode() {
                    Event::PageFault {
                        address, thread_id, ..
                    } => (address as usize, thread_id),
                    _ => (usize::MAX, 0),
                };
            }
            guard.pending = 0..n;
            while guard.pending.start < guard.pending.end {
                let at = guard.pending.start;
                let addr = guard.unresolved[at];
                if addr != usize::MAX {
                    serve_fault(core, addr, guard.threads[at]);
                }
                // Only now is it resolved: a panic above leaves it pending.
                guard.pending.start += 1;
            }
        }
        if stopping {
            guard.clean = true;
            return;
        }
    }
}

fn serve_fault(core: &Core, addr: usize, thread: u32) {
    Counters::bump(&core.counters.faults_handler);
    let Some(index) = core.index_of(addr) else {
        // Not ours (cannot happen: only the primary is registered).
        let _ = core.uffd.wake(addr as *mut u8, core.granule());
        return;
    };
    match core.resolve_fault(index) {
        Ok(true) => {}
        // A poisoned granule was woken by UFFDIO_POISON: the faulter
        // retries and gets SIGBUS. Without markers (before Linux 6.6) the
        // faulter is sent SIGBUS, then woken: it takes the signal on its way
        // out of the fault.
        Ok(false) => {
            if !core.poison_markers() {
                if let Err(e) = thread_sigbus(thread) {
                    core.failures.push(e);
                }
                let _ = core.uffd.wake(addr as *mut u8, core.granule());
            }
        }
        // An unexpected error is recorded (in `resolve_fault`) and the
        // faulter woken to retry.
        Err(_) => {
            let _ = core.uffd.wake(addr as *mut u8, core.granule());
        }
    }
}

/// SIGBUS for faulting thread `thread` (0: unknown, the kernel gave no id).
fn thread_sigbus(thread: u32) -> Result<(), SysError> {
    if thread == 0 {
        return Err(SysError::new(
            "signalling a faulting thread: the kernel reported no thread id",
            Errno::ESRCH,
        ));
    }
    crate::sys::thread::sigbus_thread(thread)
}
