//! The mounts the benchmarks and the tests need, shared by both: tmpfs
//! mounts whose `huge=` option gives `ShmemThp` regions a 2 MiB folio per
//! block whatever `shmem_enabled` says, and hugetlbfs with 2 MiB pages on
//! `/dev/hugepages` (`.ci/run` mounts the `huge=always` tmpfs and the
//! hugetlbfs too).

use std::path::PathBuf;

/// A tmpfs mount: where, with which `huge=` option, how large.
pub struct TmpfsMount {
    /// Mount point.
    pub dir: &'static str,
    /// The `huge=` option.
    pub huge: &'static str,
    /// The `size=` option.
    pub size: &'static str,
}

/// `huge=always`: 2 MiB folios on any write.
pub const HUGE_TMPFS: TmpfsMount = TmpfsMount {
    dir: "/tmp/hugearena-huge-tmpfs",
    huge: "always",
    size: "12G",
};

/// `huge=advise`: 2 MiB folios only where a mapping asks with
/// `MADV_HUGEPAGE` (as a region's alias does).
#[allow(dead_code)] // the tests' only
pub const ADVISE_TMPFS: TmpfsMount = TmpfsMount {
    dir: "/tmp/hugearena-advise-tmpfs",
    huge: "advise",
    size: "64M",
};

impl TmpfsMount {
    /// Its path if it is mounted with its `huge=` option.
    pub fn mounted(&self) -> Option<PathBuf> {
        let option = format!("huge={}", self.huge);
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(self.dir) && l.contains(&option))
            .then(|| PathBuf::from(self.dir))
    }

    /// Mounts it (root only), unless it is mounted; its path if it is
    /// mounted afterwards (by this call or, concurrently, by another),
    /// else why not.
    pub fn mount(&self) -> Result<PathBuf, String> {
        if let Some(path) = self.mounted() {
            return Ok(path);
        }
        let options = format!("huge={},size={}", self.huge, self.size);
        let _ = std::fs::create_dir_all(self.dir);
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "none", self.dir])
            .status();
        self.mounted().ok_or(format!(
            "mounting a huge={} tmpfs failed ({status:?}): sudo mount -t tmpfs -o {options} none {}",
            self.huge, self.dir
        ))
    }
}

/// Where [`mount_hugetlbfs_2m`] mounts hugetlbfs.
pub const HUGETLBFS_DIR: &str = "/dev/hugepages";

/// The arguments of `mount` that [`mount_hugetlbfs_2m`] runs.
const HUGETLBFS_MOUNT_ARGS: [&str; 6] = [
    "-t",
    "hugetlbfs",
    "-o",
    "pagesize=2M",
    "none",
    HUGETLBFS_DIR,
];

/// The command [`mount_hugetlbfs_2m`] runs, for messages.
#[allow(dead_code)] // not every user mounts hugetlbfs
pub fn hugetlbfs_mount_command() -> String {
    format!("mount {}", HUGETLBFS_MOUNT_ARGS.join(" "))
}

/// Mounts hugetlbfs with 2 MiB pages on [`HUGETLBFS_DIR`] (root only; the
/// caller checks first whether one is mounted anywhere). The command that
/// failed, if it did.
#[allow(dead_code)] // not every user mounts hugetlbfs
pub fn mount_hugetlbfs_2m() -> Result<(), String> {
    let _ = std::fs::create_dir_all(HUGETLBFS_DIR);
    match std::process::Command::new("mount")
        .args(HUGETLBFS_MOUNT_ARGS)
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        other => Err(format!("{} failed ({other:?})", hugetlbfs_mount_command())),
    }
}
