//! The resolve routine and its first driver, proactive population:
//! claim → fill through the alias → publish `Present` → map into the
//! primary with `UFFDIO_CONTINUE` (one ioctl per contiguous run).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::source::{PageSource, SourceError};
use super::state::{self, Claim, Owner, PageState};
use crate::error::{Error, Result};
use crate::region::Region;
use crate::sys::Errno;
use crate::sys::memfd::{self, Fallocate};
use crate::sys::uffd::{Features, OpenFlags, RegisterMode, Userfaultfd};

/// Per-populator counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Granules this process filled from the source.
    pub fills: AtomicU64,
    /// `UFFDIO_CONTINUE` calls that mapped something.
    pub maps: AtomicU64,
    /// Granules this process poisoned after a source error.
    pub poisoned: AtomicU64,
    /// Claims of dead processes this process took over.
    pub takeovers: AtomicU64,
}

/// Populates one region's primary view in this process.
pub struct Populator<'r, S> {
    region: &'r Region,
    uffd: Userfaultfd,
    source: S,
    me: Owner,
    counters: Counters,
    errors: std::sync::Mutex<Vec<SourceError>>,
}

/// What happened to one granule.
enum Outcome {
    /// Present in the page cache: map it.
    Ready,
    /// Its fill failed: poison it.
    Failed,
}

impl<'r, S: PageSource> Populator<'r, S> {
    /// Registers `region`'s primary view for minor faults and prepares to
    /// fill it from `source`.
    pub fn new(region: &'r Region, source: S) -> Result<Self> {
        let (uffd, _) = Userfaultfd::open(OpenFlags::default()).map_err(Error::userfaultfd)?;
        let minor = if region.backend().kind().uses_hugetlb() {
            Features::MINOR_HUGETLBFS
        } else {
            Features::MINOR_SHMEM
        };
        uffd.api(minor | Features::POISON)
            .map_err(Error::sys("userfaultfd API handshake"))?;
        uffd.register(region.primary().as_ptr(), region.len(), RegisterMode::MINOR)
            .map_err(Error::sys("registering the primary view for minor faults"))?;
        Ok(Populator {
            region,
            uffd,
            source,
            me: Owner::current(),
            counters: Counters::default(),
            errors: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Source errors seen so far (their granules are poisoned).
    pub fn take_errors(&self) -> Vec<SourceError> {
        std::mem::take(&mut self.errors.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Populates every granule overlapping `[offset, offset + len)` of the
    /// primary view, so touching it never faults.
    pub fn populate(&self, offset: usize, len: usize) -> Result<()> {
        let g = self.region.granule().bytes();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.region.len())
            .ok_or(Error::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                region_len: self.region.len() as u64,
            })?;
        let (first, last) = (offset / g, end.div_ceil(g));
        let mut run_start = first;
        for index in first..last {
            match self.resolve(index) {
                Outcome::Ready => continue,
                Outcome::Failed => {
                    self.map(run_start, index)?;
                    self.poison(index)?;
                    run_start = index + 1;
                }
            }
        }
        self.map(run_start, last)
    }

    /// Makes granule `index` present in the page cache (or poisoned).
    fn resolve(&self, index: usize) -> Outcome {
        let slot = &self.region.page_states()[index];
        loop {
            match state::claim(slot, self.me) {
                Claim::Won => return self.fill(index, slot),
                Claim::Present => return Outcome::Ready,
                Claim::Poisoned => return Outcome::Failed,
                Claim::Busy(owner) => {
                    if !owner.is_alive() && state::take_over(slot, owner, self.me) {
                        self.counters.takeovers.fetch_add(1, Ordering::Relaxed);
                        return self.fill(index, slot);
                    }
                    // Another live filler: it publishes within one fill.
                    std::thread::yield_now();
                    if state::observe(slot) == PageState::Present {
                        return Outcome::Ready;
                    }
                }
            }
        }
    }

    /// Fills a claimed granule through the alias and publishes it.
    fn fill(&self, index: usize, slot: &AtomicU64) -> Outcome {
        let g = self.region.granule().bytes();
        let result = if self.source.fills_zero() {
            // Allocating the page is the whole fill: fresh pages are zero.
            let file_offset = self.region.layout().data_offset() + (index * g) as u64;
            memfd::fallocate(
                self.region.fd().as_fd(),
                Fallocate::Allocate,
                file_offset,
                g as u64,
            )
            .map_err(|e| SourceError::Custom {
                index: index as u64,
                message: e.to_string(),
            })
        } else {
            // SAFETY: the claim makes this thread the granule's only writer,
            // and nobody reads it before `publish`; the alias is never
            // registered, so writing it cannot fault into userfaultfd.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.region.alias().as_ptr().add(index * g), g)
            };
            self.source.fill(index as u64, dst)
        };
        match result {
            Ok(()) => {
                self.counters.fills.fetch_add(1, Ordering::Relaxed);
                // A failed publish means a taker-over owns it now; it writes
                // the same bytes and publishes itself.
                let _ = state::publish(slot, self.me);
                Outcome::Ready
            }
            Err(e) => {
                self.errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e);
                let _ = state::poison(slot, self.me);
                Outcome::Failed
            }
        }
    }

    /// Maps granules `[from, to)` into the primary with CONTINUE.
    fn map(&self, from: usize, to: usize) -> Result<()> {
        let g = self.region.granule().bytes();
        let mut at = from * g;
        let end = to * g;
        while at < end {
            // SAFETY: the range is inside the registered primary, and every
            // granule in it is present in the page cache (resolved above).
            let done = unsafe {
                self.uffd
                    .continue_range(self.region.primary().as_ptr().add(at), end - at, 0)
            };
            match done {
                Ok(n) => {
                    self.counters.maps.fetch_add(1, Ordering::Relaxed);
                    at += n.max(g);
                }
                Err(e) if e.errno() == Errno::EAGAIN => {
                    // The mappings changed under the ioctl: keep what it
                    // did and retry the rest.
                    at += e.arg_value("done").unwrap_or(0) as usize / g * g;
                }
                Err(e) if e.errno() == Errno::EEXIST => {
                    // Someone mapped this granule first: skip it, and wake
                    // anyone parked on it (a racing faulter could otherwise
                    // stay asleep).
                    let page = at + e.arg_value("done").unwrap_or(0) as usize / g * g;
                    self.wake(page, g)?;
                    at = page + g;
                }
                Err(e) => return Err(Error::sys("mapping populated pages (UFFDIO_CONTINUE)")(e)),
            }
        }
        Ok(())
    }

    fn poison(&self, index: usize) -> Result<()> {
        let g = self.region.granule().bytes();
        // SAFETY: the granule is registered and marked poisoned in the
        // state table, so nobody relies on accessing it.
        let r = unsafe {
            self.uffd
                .poison(self.region.primary().as_ptr().add(index * g), g, 0)
        };
        match r {
            Ok(_) => {
                self.counters.poisoned.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.errno() == Errno::EEXIST => Ok(()),
            Err(e) => Err(Error::sys("poisoning a page whose fill failed")(e)),
        }
    }

    fn wake(&self, at: usize, len: usize) -> Result<()> {
        // SAFETY: in bounds of the registered primary.
        let start = unsafe { self.region.primary().as_ptr().add(at) };
        self.uffd
            .wake(start, len)
            .map_err(Error::sys("waking faulting threads"))
    }
}
