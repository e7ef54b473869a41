//! The human-readable probe report: one line per capability.

use std::fmt;

use super::{Capability, HugePagePool, KernelCaps, ShmemThp};
use crate::sys::size::PageSize;
use crate::sys::uffd::{Features, OpenedThrough};

/// One capability: what was found, what it means for hugearena, and the
/// command that enables it when it is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportLine {
    /// What was probed, e.g. `"userfaultfd"`.
    pub capability: &'static str,
    /// Whether hugearena gets it in full, works around its absence, or
    /// goes without what depends on it.
    pub support: Support,
    /// What the probe found.
    pub found: String,
    /// What it means for hugearena.
    pub meaning: String,
    /// The exact command that enables what is missing, if there is one.
    pub fix: Option<String>,
}

/// How far a capability is there for hugearena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// It is there.
    Full,
    /// It is missing and hugearena works around it (the line's meaning
    /// says how, and what differs).
    Degraded,
    /// It is missing and what depends on it is unavailable.
    Unavailable,
}

impl Support {
    fn from_ok(ok: bool) -> Support {
        if ok {
            Support::Full
        } else {
            Support::Unavailable
        }
    }
}

impl fmt::Display for ReportLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.support {
            Support::Full => "full",
            Support::Degraded => "degraded",
            Support::Unavailable => "unavailable",
        };
        writeln!(f, "[{mark:^11}] {:<22} {}", self.capability, self.found)?;
        write!(f, "{:14}{:<22} -> {}", "", "", self.meaning)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n{:14}{:<22} fix: {fix}", "", "")?;
        }
        Ok(())
    }
}

fn line(
    capability: &'static str,
    ok: bool,
    found: String,
    meaning: &str,
    fix: Option<String>,
) -> ReportLine {
    ReportLine {
        capability,
        support: Support::from_ok(ok),
        found,
        meaning: meaning.to_string(),
        fix,
    }
}

/// A capability hugearena works around when it is missing: full or
/// degraded, with what each means.
fn degradable(capability: &'static str, there: bool, full: &str, degraded: &str) -> ReportLine {
    ReportLine {
        support: if there {
            Support::Full
        } else {
            Support::Degraded
        },
        ..line(
            capability,
            there,
            yes_no(there),
            if there { full } else { degraded },
            None,
        )
    }
}

const UFFD_FIX: &str = "run as root, or let this user open /dev/userfaultfd \
    (e.g. `sudo setfacl -m u:$USER:rw /dev/userfaultfd`), or allow the system call \
    with `sudo sysctl vm.unprivileged_userfaultfd=1`; in a container, also allow \
    userfaultfd in the seccomp profile";

pub(super) fn lines(caps: &KernelCaps) -> Vec<ReportLine> {
    let mut out = Vec::new();
    out.push(line(
        "kernel",
        true,
        caps.release.clone(),
        "capabilities below are probed, not inferred from this version",
        None,
    ));

    let uffd = &caps.uffd;
    let how = match uffd.opened_through {
        Some(OpenedThrough::Device) => "usable through /dev/userfaultfd".to_string(),
        Some(OpenedThrough::Syscall) => "usable through the userfaultfd(2) system call".to_string(),
        None => format!(
            "unusable: /dev/userfaultfd: {}; syscall: {}",
            err_text(&uffd.device),
            err_text(&uffd.syscall)
        ),
    };
    out.push(line(
        "userfaultfd",
        uffd.usable(),
        how,
        "demand population needs it; without it regions can only be prefilled",
        (!uffd.usable()).then(|| UFFD_FIX.to_string()),
    ));
    if let Some(v) = uffd.unprivileged_sysctl {
        out.push(line(
            "unprivileged uffd",
            v == 1,
            format!("vm.unprivileged_userfaultfd = {v}"),
            if v == 1 {
                "unprivileged processes may use the system call"
            } else {
                "unprivileged processes need /dev/userfaultfd access or UFFD_USER_MODE_ONLY"
            },
            None,
        ));
    }
    if uffd.usable() {
        out.push(line(
            "uffd features",
            true,
            format!(
                "{:#x}: {}",
                uffd.features.0,
                uffd.features.names().join(" ")
            ),
            "the features the kernel supports",
            None,
        ));
    }
    let feature = |f: Features| uffd.features.contains(f);
    out.push(line(
        "minor faults (shmem)",
        feature(Features::MINOR_SHMEM),
        yes_no(feature(Features::MINOR_SHMEM)),
        "Shmem and ShmemThp backends: fill through the alias, map 4 KiB with UFFDIO_CONTINUE",
        None,
    ));
    out.push(line(
        "minor faults (hugetlb)",
        feature(Features::MINOR_HUGETLBFS),
        yes_no(feature(Features::MINOR_HUGETLBFS)),
        "Hugetlb backend: fill through the alias, map whole huge pages with UFFDIO_CONTINUE",
        None,
    ));
    out.push(line(
        "SIGBUS mode",
        feature(Features::SIGBUS),
        yes_no(feature(Features::SIGBUS)),
        "in-thread population: the faulting thread resolves its own fault (no wake-up)",
        None,
    ));
    out.push(degradable(
        "poison (6.6)",
        feature(Features::POISON),
        "a page whose source fails raises SIGBUS on that page only (UFFDIO_POISON)",
        "no UFFDIO_POISON: a page whose source fails still raises SIGBUS, sent by the \
         fault path (in-thread: the handler chains; handler threads: tgkill of the \
         faulting thread); once nobody resolves faults, unfilled pages stay fenced \
         (in-thread: the registration is kept; handler threads: PROT_NONE, SIGSEGV)",
    ));
    out.push(degradable(
        "write tracking (6.7)",
        feature(Features::WP_ASYNC) && feature(Features::WP_HUGETLBFS_SHMEM),
        "WP_ASYNC + PAGEMAP_SCAN: incremental snapshots write only changed pages",
        "no WP_ASYNC: populators asked to track writes run untracked, and incremental \
         snapshots are full ones (SnapshotInfo::full_because says why)",
    ));

    for size in [PageSize::Huge2M, PageSize::Huge1G] {
        let name = if size == PageSize::Huge2M {
            "huge pages (2 MiB)"
        } else {
            "huge pages (1 GiB)"
        };
        match caps.pool(size) {
            Some(p) => out.push(line(
                name,
                p.total > 0,
                format!(
                    "total {} free {} reserved {} surplus {} (available to new regions: {})",
                    p.total,
                    p.free,
                    p.reserved,
                    p.surplus,
                    p.available()
                ),
                if p.total > 0 {
                    "Hugetlb regions can take pages from this pool"
                } else {
                    "empty pool: Hugetlb regions of this page size cannot be created"
                },
                (p.total == 0).then(|| HugePagePool::reserve_command(size, suggested_pool(size))),
            )),
            None => out.push(line(
                name,
                false,
                "pool not present".into(),
                "this kernel has no pool of this page size",
                None,
            )),
        }
    }
    out.push(cap_line(
        "hugetlb memfd",
        &caps.hugetlb_memfd,
        "anonymous hugetlb regions (memfd MFD_HUGETLB)",
        None,
    ));
    out.push(cap_line(
        "HGM (MADV_SPLIT)",
        &caps.hgm,
        if caps.hgm.is_yes() {
            "HugetlbHgm backend: 4 KiB population inside huge pages"
        } else {
            "no HugetlbHgm: Hugetlb populates whole huge pages; ShmemThp gives 4 KiB \
             population with 2 MiB TLB reach once a block is full"
        },
        Some(
            "no runtime switch: needs a kernel built with the HugeTLB high-granularity \
             mapping series (CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING)"
                .into(),
        ),
    ));
    out.push(line(
        "shmem THP",
        caps.shmem_thp.fills_huge_folios(),
        format!("{:?} ({})", caps.shmem_thp, ShmemThp::PATH),
        if caps.shmem_thp.fills_huge_folios() {
            "ShmemThp fills 2 MiB folios, so MADV_COLLAPSE maps them without copying"
        } else {
            "ShmemThp still works, but MADV_COLLAPSE copies each 2 MiB block (~ms instead of ~µs)"
        },
        (!caps.shmem_thp.fills_huge_folios())
            .then(|| format!("echo advise | sudo tee {}", ShmemThp::PATH)),
    ));
    out.push(cap_line(
        "shmem MADV_COLLAPSE",
        &caps.shmem_collapse,
        "ShmemThp backend: full 2 MiB blocks become PMD mappings",
        Some("needs Linux 6.1+ with CONFIG_TRANSPARENT_HUGEPAGE and shmem_enabled != deny".into()),
    ));
    let mounts = &caps.hugetlbfs_mounts;
    out.push(line(
        "hugetlbfs mounts",
        !mounts.is_empty(),
        if mounts.is_empty() {
            "none".into()
        } else {
            mounts
                .iter()
                .map(|m| format!("{} ({})", m.path.display(), m.page_size))
                .collect::<Vec<_>>()
                .join(", ")
        },
        "named hugetlb regions (openable by path from other processes) live here; \
         anonymous ones need no mount",
        mounts
            .is_empty()
            .then(|| "sudo mkdir -p /dev/hugepages && sudo mount -t hugetlbfs -o pagesize=2M none /dev/hugepages".into()),
    ));
    out
}

fn cap_line(
    name: &'static str,
    cap: &Capability,
    meaning: &str,
    fix: Option<String>,
) -> ReportLine {
    line(
        name,
        cap.is_yes(),
        cap.detail().to_string(),
        meaning,
        if cap.is_yes() { None } else { fix },
    )
}

/// A pool size worth suggesting: 2 GiB of 2 MiB pages, or one 1 GiB page.
fn suggested_pool(size: PageSize) -> u64 {
    match size {
        PageSize::Huge1G => 1,
        _ => 1024,
    }
}

fn yes_no(b: bool) -> String {
    if b { "supported" } else { "not supported" }.to_string()
}

fn err_text(r: &Result<(), crate::sys::SysError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}
