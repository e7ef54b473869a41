//! How a `ShmemThp` region's 2 MiB blocks get their memory: one 2 MiB
//! folio per block, allocated before the block's first page is filled.
//! Filling then writes into memory that is already there (no fault per
//! page), and promotion maps the block with one PMD without copying it.
//!
//! Which way works depends on the shmem huge-page setting that governs the
//! region's file: the `huge=` option of the tmpfs it lives on, or, for a
//! memfd, `/sys/kernel/mm/transparent_hugepage/shmem_enabled`.

use std::fmt;
use std::os::fd::BorrowedFd;

use crate::backend::BackendKind;
use crate::probe::ShmemThp;
use crate::sys::memfd;

/// How the pages behind a region get allocated.
///
/// Measured here (2 MiB of warm memory, shmem, Linux 6.18): populating a
/// huge-page alias block takes about 0.22 ms and leaves one 2 MiB folio
/// that maps with one PMD without copying; 512 separate 4 KiB allocations
/// take about 0.22 ms with `fallocate` (0.9 ms by touching), and their
/// collapse into one folio copies them (about 0.25 ms more).
///
/// With `never` there is no way to a 2 MiB folio that does not copy: the
/// kernel builds one around a partly filled block only by zero-filling its
/// holes, which it refuses while any view of the file is registered for
/// missing faults (every populator's primary is), so the block would have
/// to be allocated in 4 KiB pages and copied first. Run allocation with
/// background collapse is as fast for a filling thread, so it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockAllocation {
    /// `MADV_POPULATE_WRITE` of the whole block through the alias (which is
    /// `MADV_HUGEPAGE`) before its first fill: the kernel allocates, zeroes
    /// and maps one 2 MiB folio in one call. Used where the file's setting
    /// gives huge folios on a fault: tmpfs `huge=always|within_size|advise`,
    /// or for a memfd `shmem_enabled` = `always|within_size|advise|force`.
    PopulateAlias,
    /// Pages are allocated as they are filled, a run at a time: the
    /// `Shmem` and hugetlb backends (hugetlb pages are huge already), and
    /// `ShmemThp` where the setting is `never` (blocks are then collapsed
    /// by copying once full).
    ByRun,
}

impl fmt::Display for BlockAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockAllocation::PopulateAlias => "a 2 MiB folio per block, by populating the alias",
            BlockAllocation::ByRun => "pages allocated as they are filled",
        })
    }
}

impl BlockAllocation {
    /// The way for a region of `kind` whose file is `fd`, and why.
    pub(crate) fn choose(kind: BackendKind, fd: BorrowedFd<'_>) -> (BlockAllocation, String) {
        if kind != BackendKind::ShmemThp {
            return (
                BlockAllocation::ByRun,
                format!("{kind} needs no block allocation"),
            );
        }
        let (setting, whose) = governing_setting(fd);
        match setting {
            ShmemThp::Always | ShmemThp::WithinSize | ShmemThp::Advise | ShmemThp::Force => (
                BlockAllocation::PopulateAlias,
                format!(
                    "{}, because {whose} is {}",
                    BlockAllocation::PopulateAlias,
                    setting.word()
                ),
            ),
            _ => (
                BlockAllocation::ByRun,
                format!(
                    "{}, and full blocks are collapsed by copying, because {whose} is {} \
                     (for 2 MiB folios without copying, set shmem_enabled to advise, or put \
                     the region on a tmpfs mounted with huge=always: RegionOptions::unnamed_in)",
                    BlockAllocation::ByRun,
                    setting.word()
                ),
            ),
        }
    }
}

/// The shmem huge-page setting that applies to the file `fd`, and where it
/// comes from.
fn governing_setting(fd: BorrowedFd<'_>) -> (ShmemThp, String) {
    let global = ShmemThp::read();
    // `deny` and `force` override every mount's option.
    if matches!(global, ShmemThp::Deny | ShmemThp::Force) {
        return (global, "shmem_enabled (which overrides mounts)".into());
    }
    match memfd::fstat(fd)
        .ok()
        .and_then(|st| tmpfs_huge_option(st.st_dev))
    {
        Some((setting, mount_point)) => (
            setting,
            format!("the huge= option of the tmpfs at {mount_point}"),
        ),
        // Not a visible mount: a memfd, which follows the global setting.
        None => (global, "shmem_enabled".into()),
    }
}

/// The `huge=` option (default `never`) and mount point of the tmpfs
/// mounted with device number `dev`, from `/proc/self/mountinfo`.
fn tmpfs_huge_option(dev: libc::dev_t) -> Option<(ShmemThp, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = format!("{}:{}", libc::major(dev), libc::minor(dev));
    text.lines()
        .find_map(|line| parse_mountinfo_line(line, &wanted))
}

/// One `mountinfo` line: `ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS] - FSTYPE
/// SOURCE SUPER_OPTS`. The setting if it is the tmpfs `wanted`.
fn parse_mountinfo_line(line: &str, wanted: &str) -> Option<(ShmemThp, String)> {
    let (mount, fs) = line.split_once(" - ")?;
    let mut fields = mount.split(' ');
    let dev = fields.nth(2)?;
    let point = fields.nth(1)?;
    let mut fs = fs.split(' ');
    if dev != wanted || fs.next()? != "tmpfs" {
        return None;
    }
    let options = fs.nth(1).unwrap_or("");
    let huge = options
        .split(',')
        .find_map(|o| o.strip_prefix("huge="))
        .map_or(ShmemThp::Never, ShmemThp::parse);
    Some((huge, point.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_the_huge_option_of_the_wanted_tmpfs() {
        let huge = "61 25 0:52 / /mnt/huge rw,relatime shared:30 - tmpfs none rw,size=4194304k,huge=always";
        let plain =
            "26 24 0:23 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=24684084k";
        let ext4 = "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda rw";
        assert_eq!(
            parse_mountinfo_line(huge, "0:52"),
            Some((ShmemThp::Always, "/mnt/huge".into()))
        );
        assert_eq!(
            parse_mountinfo_line(plain, "0:23"),
            Some((ShmemThp::Never, "/dev/shm".into()))
        );
        assert_eq!(parse_mountinfo_line(huge, "0:23"), None);
        assert_eq!(parse_mountinfo_line(ext4, "259:1"), None);
        assert_eq!(parse_mountinfo_line("garbage", "0:1"), None);
    }

    #[test]
    fn only_shmem_thp_allocates_by_block() {
        let fd = memfd::memfd_create("hugearena-test", memfd::MemfdKind::Shmem).unwrap();
        use std::os::fd::AsFd;
        for kind in [BackendKind::Shmem, BackendKind::Hugetlb] {
            assert_eq!(
                BlockAllocation::choose(kind, fd.as_fd()).0,
                BlockAllocation::ByRun
            );
        }
        let (how, why) = BlockAllocation::choose(BackendKind::ShmemThp, fd.as_fd());
        assert!(why.contains("shmem_enabled"), "{why}");
        let expected = match ShmemThp::read() {
            ShmemThp::Never | ShmemThp::Deny | ShmemThp::Unknown => BlockAllocation::ByRun,
            _ => BlockAllocation::PopulateAlias,
        };
        assert_eq!(how, expected);
    }
}
