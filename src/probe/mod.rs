//! What the running kernel can do for hugearena, found by asking it.
//!
//! Every capability is established by a real attempt (open a userfaultfd,
//! `madvise(MADV_SPLIT)` a hugetlb mapping, `MADV_COLLAPSE` a shmem block),
//! never inferred from the kernel version. [`KernelCaps::report`] turns the
//! findings into lines a person can act on.

mod experiments;
mod report;

use std::path::PathBuf;
use std::sync::OnceLock;

pub use crate::sys::uffd::{Features as UffdFeatures, OpenedThrough};
pub use report::{ReportLine, Support};

use crate::sys::SysError;
use crate::sys::size::PageSize;
use crate::sys::uffd::Features;

/// Whether something works, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    /// It works; the note says how it was established.
    Yes(String),
    /// It does not work here, and why.
    No(String),
}

impl Capability {
    /// Whether it works.
    pub fn is_yes(&self) -> bool {
        matches!(self, Capability::Yes(_))
    }

    /// The explanation, either way.
    pub fn detail(&self) -> &str {
        match self {
            Capability::Yes(s) | Capability::No(s) => s,
        }
    }
}

/// What userfaultfd offers this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UffdCaps {
    /// Result of opening through `/dev/userfaultfd`.
    pub device: Result<(), SysError>,
    /// Result of the `userfaultfd(2)` system call (kernel faults included).
    pub syscall: Result<(), SysError>,
    /// `vm.unprivileged_userfaultfd`, if readable.
    pub unprivileged_sysctl: Option<u32>,
    /// Which way hugearena will open it, if any works.
    pub opened_through: Option<OpenedThrough>,
    /// Features the kernel supports (empty if no way works).
    pub features: Features,
}

impl UffdCaps {
    /// Whether this process can use userfaultfd at all.
    pub fn usable(&self) -> bool {
        self.opened_through.is_some()
    }
}

/// The state of one huge page pool (`/sys/kernel/mm/hugepages/hugepages-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePagePool {
    /// The page size of the pool.
    pub size: PageSize,
    /// `nr_hugepages`: pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages not in use (reserved ones included).
    pub free: u64,
    /// `resv_hugepages`: free pages promised to existing mappings.
    pub reserved: u64,
    /// `surplus_hugepages`: pages beyond `total` from overcommit.
    pub surplus: u64,
}

impl HugePagePool {
    /// Reads the pool of `size` pages; `None` if the kernel has none.
    pub fn read(size: PageSize) -> Option<HugePagePool> {
        let dir = PathBuf::from(format!(
            "/sys/kernel/mm/hugepages/hugepages-{}kB",
            size.kib()
        ));
        let field = |name: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(HugePagePool {
            size,
            total: field("nr_hugepages")?,
            free: field("free_hugepages")?,
            reserved: field("resv_hugepages")?,
            surplus: field("surplus_hugepages").unwrap_or(0),
        })
    }

    /// Pages a new mapping can still reserve: free minus promised.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// The command that grows this pool to `pages` pages.
    pub fn reserve_command(size: PageSize, pages: u64) -> String {
        match size {
            PageSize::Huge2M => format!("echo {pages} | sudo tee /proc/sys/vm/nr_hugepages"),
            _ => format!(
                "echo {pages} | sudo tee /sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
                size.kib()
            ),
        }
    }
}

/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemThp {
    /// `always`: shmem uses huge folios wherever it can.
    Always,
    /// `within_size`: huge folios inside i_size.
    WithinSize,
    /// `advise`: huge folios where `MADV_HUGEPAGE` asks.
    Advise,
    /// `never`: no huge folios unless `MADV_COLLAPSE` builds them (by copying).
    Never,
    /// `deny`: no huge folios at all (emergency off switch).
    Deny,
    /// `force`: huge folios everywhere (testing).
    Force,
    /// The file is missing or unreadable (THP not built in).
    Unknown,
}

impl ShmemThp {
    /// Path of the setting.
    pub const PATH: &'static str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

    /// Reads the current setting (the bracketed word).
    pub fn read() -> ShmemThp {
        let Ok(text) = std::fs::read_to_string(Self::PATH) else {
            return ShmemThp::Unknown;
        };
        let selected = text
            .split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(|c| c == '[' || c == ']'));
        selected.map_or(ShmemThp::Unknown, ShmemThp::parse)
    }

    /// The setting named `word`, as the sysfs file or a tmpfs `huge=`
    /// mount option spells it.
    pub fn parse(word: &str) -> ShmemThp {
        match word {
            "always" => ShmemThp::Always,
            "within_size" => ShmemThp::WithinSize,
            "advise" => ShmemThp::Advise,
            "never" => ShmemThp::Never,
            "deny" => ShmemThp::Deny,
            "force" => ShmemThp::Force,
            _ => ShmemThp::Unknown,
        }
    }

    /// How the kernel spells it.
    pub fn word(self) -> &'static str {
        match self {
            ShmemThp::Always => "always",
            ShmemThp::WithinSize => "within_size",
            ShmemThp::Advise => "advise",
            ShmemThp::Never => "never",
            ShmemThp::Deny => "deny",
            ShmemThp::Force => "force",
            ShmemThp::Unknown => "unknown",
        }
    }

    /// Whether filling through an `MADV_HUGEPAGE` alias allocates 2 MiB
    /// folios, so `MADV_COLLAPSE` later maps them without copying.
    pub fn fills_huge_folios(self) -> bool {
        matches!(
            self,
            ShmemThp::Always | ShmemThp::WithinSize | ShmemThp::Advise | ShmemThp::Force
        )
    }
}

/// A mounted hugetlbfs, where named hugetlb regions can live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugetlbfsMount {
    /// Mount point.
    pub path: PathBuf,
    /// Page size of the mount (`pagesize=` option, default 2 MiB).
    pub page_size: PageSize,
}

impl HugetlbfsMount {
    /// Lists hugetlbfs mounts from `/proc/mounts`.
    pub fn list() -> Vec<HugetlbfsMount> {
        let Ok(text) = std::fs::read_to_string("/proc/mounts") else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (_dev, path, fstype, opts) = (
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                );
                if fstype != "hugetlbfs" {
                    return None;
                }
                let page_size = opts
                    .split(',')
                    .find_map(|o| o.strip_prefix("pagesize="))
                    .and_then(parse_size)
                    .and_then(PageSize::from_bytes)
                    .unwrap_or(PageSize::Huge2M);
                Some(HugetlbfsMount {
                    path: PathBuf::from(path),
                    page_size,
                })
            })
            .collect()
    }
}

/// Parses sizes like `2M`, `1G`, `2048k`.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kb" => 10,
        "m" | "mb" => 20,
        "g" | "gb" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Everything hugearena needs to know about the running kernel, probed
/// once per process (`cached`), with a report that names the fix for
/// anything missing.
///
/// ```
/// use hugearena::KernelCaps;
/// let caps = KernelCaps::cached();
/// for line in caps.report() {
///     println!("{line}");
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCaps {
    /// `uname -r`.
    pub release: String,
    /// userfaultfd access and features.
    pub uffd: UffdCaps,
    /// Huge page pools, by size (at probe time; re-read them before relying
    /// on counts with [`HugePagePool::read`]).
    pub huge_pages: Vec<HugePagePool>,
    /// The shmem THP setting.
    pub shmem_thp: ShmemThp,
    /// Whether `MADV_COLLAPSE` turns a full shmem 2 MiB block into a PMD
    /// mapping (needed by the `ShmemThp` backend).
    pub shmem_collapse: Capability,
    /// Whether hugetlb memfds can be created and mapped shared.
    pub hugetlb_memfd: Capability,
    /// Whether HugeTLB high-granularity mapping works (`MADV_SPLIT`, then a
    /// 4 KiB `UFFDIO_CONTINUE` inside a huge page).
    pub hgm: Capability,
    /// Mounted hugetlbfs file systems.
    pub hugetlbfs_mounts: Vec<HugetlbfsMount>,
}

impl KernelCaps {
    /// Probes the kernel now. Takes a few milliseconds (it maps, faults and
    /// collapses a 2 MiB shmem block).
    pub fn probe() -> KernelCaps {
        let uffd = experiments::userfaultfd();
        let hugetlb_memfd = experiments::hugetlb_memfd();
        let hgm = experiments::hgm(&uffd, &hugetlb_memfd);
        KernelCaps {
            release: experiments::kernel_release(),
            huge_pages: PageSize::ALL[1..]
                .iter()
                .filter_map(|s| HugePagePool::read(*s))
                .collect(),
            shmem_thp: ShmemThp::read(),
            shmem_collapse: experiments::shmem_collapse(),
            hugetlb_memfd,
            hgm,
            hugetlbfs_mounts: HugetlbfsMount::list(),
            uffd,
        }
    }

    /// The probe of the first call in this process, kept for later calls.
    ///
    /// Capabilities do not change while a process runs; pool counts do, so
    /// callers that size allocations re-read [`HugePagePool::read`].
    pub fn cached() -> &'static KernelCaps {
        static CAPS: OnceLock<KernelCaps> = OnceLock::new();
        CAPS.get_or_init(KernelCaps::probe)
    }

    /// The pool of `size` pages as of the probe.
    pub fn pool(&self, size: PageSize) -> Option<&HugePagePool> {
        self.huge_pages.iter().find(|p| p.size == size)
    }

    /// One line per capability: what was found, what it means, how to fix it.
    pub fn report(&self) -> Vec<ReportLine> {
        report::lines(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_mount_options() {
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2048k"), Some(2 << 20));
        assert_eq!(parse_size("12Q"), None);
    }

    #[test]
    fn reserve_commands_name_the_right_knob() {
        assert!(
            HugePagePool::reserve_command(PageSize::Huge2M, 8)
                .contains("/proc/sys/vm/nr_hugepages")
        );
        assert!(HugePagePool::reserve_command(PageSize::Huge1G, 1).contains("hugepages-1048576kB"));
    }
}
