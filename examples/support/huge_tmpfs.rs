//! The tmpfs mounted `huge=always` where `ShmemThp` regions get a 2 MiB
//! folio per block whatever `shmem_enabled` says; shared by the
//! benchmarks and the tests (`.ci/run` mounts it too).

use std::path::PathBuf;

/// Where it is mounted.
pub const HUGE_TMPFS: &str = "/tmp/hugearena-huge-tmpfs";

/// Its path if it is mounted with `huge=always`.
pub fn mounted() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(HUGE_TMPFS) && l.contains("huge=always"))
        .then(|| PathBuf::from(HUGE_TMPFS))
}

/// Mounts it (root only), unless it is mounted; its path if it is mounted
/// afterwards (by this call or, concurrently, by another), else why not.
pub fn mount() -> Result<PathBuf, String> {
    if let Some(path) = mounted() {
        return Ok(path);
    }
    let _ = std::fs::create_dir_all(HUGE_TMPFS);
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "huge=always,size=4G",
            "none",
            HUGE_TMPFS,
        ])
        .status();
    mounted().ok_or(format!(
        "mounting a huge tmpfs failed ({status:?}): sudo mount -t tmpfs -o huge=always,size=4G none {HUGE_TMPFS}"
    ))
}
