//! Backends (what memory a region is made of and how finely it populates)
//! and the policy that picks one from what the kernel probe found.

use std::fmt;

use crate::error::{Error, Result};
use crate::probe::{Capability, HugePagePool, KernelCaps};
use crate::sys::memfd::MemfdKind;
use crate::sys::size::PageSize;
use crate::sys::uffd::{Features, OpenError};

/// The kinds of backing memory and population granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// hugetlb pages with HugeTLB high-granularity mapping: 4 KiB population
    /// inside huge pages. Needs a kernel with the (unmerged) HGM series.
    HugetlbHgm,
    /// hugetlb pages, populated a whole huge page at a time.
    Hugetlb,
    /// shmem, populated 4 KiB at a time; each 2 MiB block is collapsed to a
    /// PMD mapping (`MADV_COLLAPSE`) once all its pages are present.
    ShmemThp,
    /// shmem, populated and mapped 4 KiB at a time.
    Shmem,
}

impl BackendKind {
    /// Every backend, in the order `HugePages::Try` considers them.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::HugetlbHgm,
        BackendKind::Hugetlb,
        BackendKind::ShmemThp,
        BackendKind::Shmem,
    ];

    /// The stable number stored in region headers.
    pub const fn code(self) -> u32 {
        match self {
            BackendKind::HugetlbHgm => 1,
            BackendKind::Hugetlb => 2,
            BackendKind::ShmemThp => 3,
            BackendKind::Shmem => 4,
        }
    }

    /// The backend stored as `code` in a header.
    pub fn from_code(code: u32) -> Option<BackendKind> {
        Self::ALL.into_iter().find(|b| b.code() == code)
    }

    /// Whether the backend uses hugetlb pages from the reserved pool.
    pub const fn uses_hugetlb(self) -> bool {
        matches!(self, BackendKind::HugetlbHgm | BackendKind::Hugetlb)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::HugetlbHgm => "HugetlbHgm",
            BackendKind::Hugetlb => "Hugetlb",
            BackendKind::ShmemThp => "ShmemThp",
            BackendKind::Shmem => "Shmem",
        })
    }
}

/// A backend with its page size: everything needed to lay out a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    kind: BackendKind,
    huge_page: PageSize,
}

impl Backend {
    /// A backend of `kind`. `huge_page` is the hugetlb page size for the
    /// hugetlb kinds; the shmem kinds ignore it (ShmemThp blocks are 2 MiB).
    pub fn new(kind: BackendKind, huge_page: PageSize) -> Backend {
        let huge_page = match kind {
            BackendKind::HugetlbHgm | BackendKind::Hugetlb => huge_page,
            BackendKind::ShmemThp => PageSize::Huge2M,
            BackendKind::Shmem => PageSize::Base4K,
        };
        Backend { kind, huge_page }
    }

    /// The kind.
    pub fn kind(self) -> BackendKind {
        self.kind
    }

    /// The unit of population: one fill, one `UFFDIO_CONTINUE`.
    pub fn granule(self) -> PageSize {
        match self.kind {
            BackendKind::Hugetlb => self.huge_page,
            BackendKind::HugetlbHgm | BackendKind::ShmemThp | BackendKind::Shmem => {
                PageSize::Base4K
            }
        }
    }

    /// The page size the memory ends up mapped with when fully populated,
    /// and so the alignment of file offsets and addresses.
    pub fn mapping_unit(self) -> PageSize {
        self.huge_page
    }

    /// The memfd kind that backs it.
    pub(crate) fn memfd_kind(self) -> MemfdKind {
        if self.kind.uses_hugetlb() {
            MemfdKind::Hugetlb(self.huge_page)
        } else {
            MemfdKind::Shmem
        }
    }
}

/// Whether to use hugetlb pages, in the sense of PostgreSQL's `huge_pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Use hugetlb pages (HugetlbHgm if the kernel has HGM, else Hugetlb);
    /// fail with the shortfall and the fix if that is impossible.
    On,
    /// Use hugetlb pages if possible; otherwise fall back to ShmemThp, then
    /// Shmem, and record why.
    #[default]
    Try,
    /// Use no hugetlb pages: ShmemThp if `MADV_COLLAPSE` works, else Shmem.
    Off,
}

/// What the caller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendRequest {
    /// Let the policy choose.
    Policy(HugePages),
    /// Exactly this backend, or an error saying why not.
    Exact(BackendKind),
}

impl Default for BackendRequest {
    fn default() -> Self {
        BackendRequest::Policy(HugePages::Try)
    }
}

/// The backend a region got, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendChoice {
    /// The backend.
    pub backend: Backend,
    /// Why it was chosen, including why better candidates were passed over.
    pub reason: String,
}

/// Why the kernel cannot provide `backend` to this process, or `Ok`.
pub(crate) fn check_kernel(backend: Backend, caps: &KernelCaps) -> Result<()> {
    let kind = backend.kind();
    let unavailable = |reason: String, fix: &str| Error::BackendUnavailable {
        backend: kind,
        reason,
        fix: fix.to_string(),
    };
    if let (Err(device), Err(syscall)) = (caps.uffd.device, caps.uffd.syscall) {
        return Err(Error::userfaultfd(OpenError { device, syscall }));
    }
    let needs = |feature: Features, name: &str| -> Result<()> {
        if caps.uffd.features.contains(feature) {
            Ok(())
        } else {
            Err(unavailable(
                format!("the kernel lacks userfaultfd feature {name}"),
                "use a newer kernel (minor faults need Linux 5.13+, shmem 5.14+)",
            ))
        }
    };
    match kind {
        BackendKind::HugetlbHgm | BackendKind::Hugetlb => {
            if kind == BackendKind::HugetlbHgm
                && let Capability::No(reason) = &caps.hgm
            {
                return Err(Error::HgmUnavailable {
                    reason: reason.clone(),
                });
            }
            if let Capability::No(reason) = &caps.hugetlb_memfd {
                return Err(unavailable(
                    reason.clone(),
                    "use a kernel with CONFIG_HUGETLBFS and reserve huge pages",
                ));
            }
            needs(Features::MINOR_HUGETLBFS, "MINOR_HUGETLBFS")?;
            let size = backend.mapping_unit();
            match HugePagePool::read(size) {
                Some(_) => Ok(()),
                None => Err(unavailable(
                    format!("the kernel has no {size} huge page pool"),
                    "choose another huge page size",
                )),
            }
        }
        BackendKind::ShmemThp => {
            needs(Features::MINOR_SHMEM, "MINOR_SHMEM")?;
            match &caps.shmem_collapse {
                Capability::Yes(_) => Ok(()),
                Capability::No(reason) => Err(unavailable(
                    reason.clone(),
                    "use Linux 6.1+ with transparent huge pages and shmem_enabled other than deny",
                )),
            }
        }
        BackendKind::Shmem => needs(Features::MINOR_SHMEM, "MINOR_SHMEM"),
    }
}

/// Why the huge page pool cannot supply `pages` pages for `backend` now,
/// or `Ok` (always for the shmem backends).
pub(crate) fn check_pool(backend: Backend, pages: u64) -> Result<()> {
    if !backend.kind().uses_hugetlb() {
        return Ok(());
    }
    let size = backend.mapping_unit();
    let pool = HugePagePool::read(size).unwrap_or(HugePagePool {
        size,
        total: 0,
        free: 0,
        reserved: 0,
        surplus: 0,
    });
    if pool.available() >= pages {
        return Ok(());
    }
    Err(Error::huge_pages_short(&pool, pages, pool.available()))
}

/// Picks a backend for `request`. `hugetlb_pages(backend)` says how many
/// huge pages a region on that backend would take from the pool.
pub(crate) fn select(
    request: BackendRequest,
    huge_page: PageSize,
    caps: &KernelCaps,
    hugetlb_pages: impl Fn(Backend) -> Result<u64>,
) -> Result<BackendChoice> {
    // What runs degraded on this kernel, for every choice's reason.
    let degraded = if caps.uffd.usable() && !caps.uffd.features.contains(Features::POISON) {
        "; degraded: no UFFDIO_POISON (Linux 6.6), so failed pages raise SIGBUS by signal \
         from the fault path (see the probe)"
    } else {
        ""
    };
    let try_one = |kind: BackendKind| -> Result<Backend> {
        let backend = Backend::new(kind, huge_page);
        check_kernel(backend, caps)?;
        check_pool(backend, hugetlb_pages(backend)?)?;
        Ok(backend)
    };
    let candidates: &[BackendKind] = match request {
        BackendRequest::Exact(kind) => {
            let backend = try_one(kind)?;
            return Ok(BackendChoice {
                backend,
                reason: format!(
                    "{kind} was requested explicitly and the kernel supports it{degraded}"
                ),
            });
        }
        BackendRequest::Policy(HugePages::On) => &[BackendKind::HugetlbHgm, BackendKind::Hugetlb],
        BackendRequest::Policy(HugePages::Try) => &BackendKind::ALL,
        BackendRequest::Policy(HugePages::Off) => &[BackendKind::ShmemThp, BackendKind::Shmem],
    };
    let mut passed_over = Vec::new();
    let mut last_error = None;
    for &kind in candidates {
        match try_one(kind) {
            Ok(backend) => {
                let policy = match request {
                    BackendRequest::Policy(p) => p,
                    BackendRequest::Exact(_) => unreachable!("handled above"),
                };
                let mut reason = format!(
                    "huge_pages={policy:?}: {kind} (population granule {})",
                    backend.granule()
                );
                if !passed_over.is_empty() {
                    reason.push_str(" because ");
                    reason.push_str(&passed_over.join("; "));
                }
                reason.push_str(degraded);
                return Ok(BackendChoice { backend, reason });
            }
            Err(e) => {
                passed_over.push(format!("{kind} is unavailable: {}", short_reason(&e)));
                last_error = Some(e);
            }
        }
    }
    Err(last_error.expect("every policy has at least one candidate"))
}

/// The gist of why a backend was passed over, without the fix-it advice
/// (the fix belongs in errors, not in a successful choice's reason).
fn short_reason(e: &Error) -> String {
    match e {
        Error::HgmUnavailable { reason } => reason.clone(),
        Error::BackendUnavailable { reason, .. } => reason.clone(),
        Error::HugePagesShort {
            page_size,
            needed,
            available,
            ..
        } => format!("needs {needed} free {page_size} huge pages, the pool has {available}"),
        other => other.to_string(),
    }
}
