//! Block allocation on the real kernel: a `ShmemThp` block on a tmpfs
//! mounted `huge=always` is one 2 MiB folio before its second page is
//! filled, becomes PMD-mapped without a copy, and a block whose page was
//! punched out by another mapping is filled again correctly.
//!
//! Alone in its binary: `thp_collapse_alloc` in `/proc/vmstat` counts
//! copying collapses machine-wide, and the other suites make some.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use hugearena::populate::{Driver, FileSource, PopulateOptions, Populator, ZeroSource};
use hugearena::{BackendKind, BlockAllocation, Region, RegionOptions};

const BLOCK: usize = 2 << 20;
const LEN: usize = 8 << 20;

/// `/proc/kpageflags` bits.
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;
const KPF_THP: u64 = 1 << 22;

/// The page frame number behind virtual address `addr` of this process.
fn pfn(addr: usize) -> u64 {
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (addr / 4096 * 8) as u64)
        .unwrap();
    let entry = u64::from_le_bytes(entry);
    assert!(entry >> 63 == 1, "page at {addr:#x} is not present");
    let pfn = entry & ((1 << 55) - 1);
    assert_ne!(pfn, 0, "pagemap hides frame numbers (not root?)");
    pfn
}

fn kpageflags(pfn: u64) -> u64 {
    let flags = std::fs::File::open("/proc/kpageflags").unwrap();
    let mut word = [0u8; 8];
    flags.read_exact_at(&mut word, pfn * 8).unwrap();
    u64::from_le_bytes(word)
}

/// A `/proc/vmstat` counter; `None` on a kernel built without VM event
/// counters (the frames then show alone that nothing was copied).
fn vmstat(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(' ')?.parse().ok())
}

/// A ShmemThp region on the huge tmpfs, and the guard that removes it.
fn huge_tmpfs_region(tag: &str) -> Option<(Arc<Region>, RemoveOnDrop)> {
    region_in(&huge_tmpfs()?, tag, "always")
}

/// A ShmemThp region in `dir`, a tmpfs whose `huge=` option is `huge`.
fn region_in(dir: &Path, tag: &str, huge: &str) -> Option<(Arc<Region>, RemoveOnDrop)> {
    let path = unique_path(dir.to_str().unwrap(), tag);
    let region = Region::create(
        RegionOptions::new(LEN as u64)
            .backend(BackendKind::ShmemThp)
            .path(&path),
    )
    .unwrap();
    assert_folios_from_mount(&region, dir, huge);
    Some((Arc::new(region), RemoveOnDrop(path)))
}

/// `region` allocates a 2 MiB folio per block because of the `huge=`
/// option (`huge`) of the tmpfs at `dir`, and says so.
fn assert_folios_from_mount(region: &Region, dir: &Path, huge: &str) {
    assert_eq!(region.block_allocation(), BlockAllocation::PopulateAlias);
    let reason = &region.choice().reason;
    assert!(
        reason.contains(&format!(
            "huge= option of the tmpfs at {} is {huge}",
            dir.display()
        )),
        "{reason}"
    );
}

#[test]
fn a_block_is_one_folio_before_its_second_page_is_filled_and_maps_without_a_copy() {
    let Some((region, _remove)) = huge_tmpfs_region("folio") else {
        return;
    };
    let snapshot = tempfile::NamedTempFile::new().unwrap();
    let mut bytes = vec![0u8; LEN];
    fill_pattern(3, 0, &mut bytes);
    snapshot.as_file().write_all_at(&bytes, 0).unwrap();
    let source = FileSource::open(snapshot.path()).unwrap();
    let p = Populator::with_options(
        region.clone(),
        source,
        PopulateOptions::new().driver(Driver::InThread),
    )
    .unwrap();
    let copies_before = vmstat("thp_collapse_alloc");
    let block = region.primary().as_ptr() as usize + BLOCK;

    // The first page of block 1: one fill, one block allocated.
    let mut byte = [0u8; 1];
    region.read_via_primary(BLOCK, &mut byte).unwrap();
    assert_eq!(byte[0], pattern_byte(3, BLOCK));
    let stats = p.stats();
    assert_eq!((stats.fills, stats.blocks_allocated), (1, 1), "{stats}");
    let head = pfn(block);
    let flags = kpageflags(head);
    assert!(
        flags & KPF_THP != 0 && flags & KPF_COMPOUND_HEAD != 0,
        "the first page filled is the head of a huge folio: flags {flags:#x}"
    );
    assert_eq!(head % 512, 0, "a 2 MiB folio starts 2 MiB-aligned");

    // The second page lies in the same folio, right after the first.
    region
        .read_via_primary(BLOCK + 4096 * 9, &mut byte)
        .unwrap();
    assert_eq!(pfn(block + 4096 * 9), head + 9);
    assert!(kpageflags(head + 9) & (KPF_THP | KPF_COMPOUND_TAIL) == KPF_THP | KPF_COMPOUND_TAIL);

    // Filling the rest maps the block with one PMD, on the same frames.
    let mut rest = vec![0u8; BLOCK];
    region.read_via_primary(BLOCK, &mut rest).unwrap();
    assert!(
        rest.iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(3, BLOCK + i))
    );
    p.flush_promotions();
    let primary = region.primary().as_ptr() as usize;
    assert_eq!(
        smaps_kib(primary, primary + LEN, "ShmemPmdMapped:"),
        2048,
        "only block 1 is PMD-mapped: {}",
        p.stats()
    );
    assert_eq!(pfn(block), head, "promotion moved the block: it copied");
    assert_eq!(pfn(block + BLOCK - 4096), head + 511);
    // (Readahead may have run into block 2, and allocated it.)
    assert_eq!(p.stats().collapses, 1, "{}", p.stats());
    assert_eq!(
        vmstat("thp_collapse_alloc"),
        copies_before,
        "a collapse allocated a new huge page (copied)"
    );
}

#[test]
fn populating_whole_blocks_maps_each_with_one_pmd_and_no_copy() {
    let Some((region, _remove)) = huge_tmpfs_region("populate") else {
        return;
    };
    let p = zero_populator(&region, Driver::Proactive);
    let copies_before = vmstat("thp_collapse_alloc");
    p.populate(0, LEN).unwrap();
    let stats = p.stats();
    assert_eq!(stats.blocks_allocated, (LEN / BLOCK) as u64, "{stats}");
    assert_eq!(stats.collapses, (LEN / BLOCK) as u64, "{stats}");
    assert_eq!(stats.maps, 0, "no UFFDIO_CONTINUE was needed: {stats}");
    let primary = region.primary().as_ptr() as usize;
    assert_eq!(
        smaps_kib(primary, primary + LEN, "ShmemPmdMapped:"),
        (LEN >> 10) as u64
    );
    assert_eq!(vmstat("thp_collapse_alloc"), copies_before);
    verify(&region, |_| 0);
}

#[test]
fn a_page_punched_out_of_an_allocated_block_elsewhere_is_allocated_again() {
    let Some((region, remove)) = huge_tmpfs_region("punch") else {
        return;
    };
    // Two mappings with their own populators stand for two processes.
    let other = Arc::new(Region::open(&remove.0).unwrap());
    let mine = zero_populator(&region, Driver::InThread);
    let theirs = zero_populator(&other, Driver::InThread);
    // This one fills block 0, so it knows the block as allocated.
    mine.populate(0, BLOCK).unwrap();
    theirs.populate(4096 * 5, 4096).unwrap();
    assert_eq!(mine.stats().blocks_allocated, 1);
    region.write_via_primary(4096 * 5, &[0xAB; 16]).unwrap();
    // The other one drops page 5 (its memory goes back to the file system).
    theirs.discard(4096 * 5, 4096).unwrap();
    // Touching it here finds a page the block no longer has: it is
    // allocated again and reads as the source says.
    let mut buf = [0xFFu8; 16];
    region.read_via_primary(4096 * 5, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 16]);
    region.write_via_primary(4096 * 5, &[0xCD; 16]).unwrap();
    other.read_via_primary(4096 * 5, &mut buf).unwrap();
    assert_eq!(buf, [0xCD; 16], "both mappings see one page again");
    assert!(mine.errors().is_empty() && mine.failures().is_empty());
    assert!(theirs.errors().is_empty() && theirs.failures().is_empty());
}

#[test]
fn where_the_setting_is_advise_the_huge_page_alias_gets_the_folio() {
    let Some(dir) = advise_tmpfs() else {
        return;
    };
    let Some((region, _remove)) = region_in(&dir, "advise", "advise") else {
        return;
    };
    let p = zero_populator(&region, Driver::InThread);
    let mut byte = [1u8; 1];
    region
        .read_via_primary(BLOCK + 4096 * 3, &mut byte)
        .unwrap();
    assert_eq!(byte[0], 0);
    assert_eq!(p.stats().blocks_allocated, 1, "{}", p.stats());
    let frame = pfn(region.primary().as_ptr() as usize + BLOCK + 4096 * 3);
    assert!(
        kpageflags(frame) & (KPF_THP | KPF_COMPOUND_TAIL) == KPF_THP | KPF_COMPOUND_TAIL,
        "page 3 of the block lies in a huge folio"
    );
    assert_eq!(frame % 512, 3);
}

/// A region in an unnamed file on the huge tmpfs gets the mount's folios
/// like a named one, has no link to leave behind, and another mapping
/// opens it by its shareable path.
#[test]
fn an_unnamed_region_on_a_huge_tmpfs_gets_its_folios_and_no_name() {
    let Some(dir) = huge_tmpfs() else {
        return;
    };
    let region = Arc::new(
        Region::create(
            RegionOptions::new(LEN as u64)
                .backend(BackendKind::ShmemThp)
                .unnamed_in(&dir),
        )
        .unwrap(),
    );
    assert_folios_from_mount(&region, &dir, "always");
    let links =
        std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(region.shareable_path()).unwrap());
    assert_eq!(links, 0, "the file has no name in {}", dir.display());
    let other = Arc::new(Region::open(region.shareable_path()).unwrap());
    let mine = zero_populator(&region, Driver::InThread);
    let theirs = zero_populator(&other, Driver::InThread);
    region.write_via_primary(BLOCK + 4096, &[0x5A; 8]).unwrap();
    let mut buf = [0u8; 8];
    other.read_via_primary(BLOCK + 4096, &mut buf).unwrap();
    assert_eq!(buf, [0x5A; 8]);
    let frame = pfn(region.primary().as_ptr() as usize + BLOCK + 4096);
    assert!(
        kpageflags(frame) & (KPF_THP | KPF_COMPOUND_TAIL) == KPF_THP | KPF_COMPOUND_TAIL,
        "page 1 of the block lies in a huge folio"
    );
    assert_eq!(mine.stats().blocks_allocated, 1, "{}", mine.stats());
    assert!(theirs.errors().is_empty() && theirs.failures().is_empty());
}

/// A populator of `region` from zeroes, with `driver`.
fn zero_populator(region: &Arc<Region>, driver: Driver) -> Populator {
    Populator::with_options(
        region.clone(),
        ZeroSource,
        PopulateOptions::new().driver(driver),
    )
    .unwrap()
}

/// Bytes of memory the region's file holds (`st_blocks`).
fn file_bytes(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
}

/// A buffer pool evicts single pages of a block allocated whole: filling
/// one of them again must not bring back the others' memory (allocating
/// the block whole again would).
#[test]
fn refilling_one_discarded_page_of_a_block_leaves_the_other_holes_empty() {
    let Some((region, remove)) = huge_tmpfs_region("holes") else {
        return;
    };
    let p = zero_populator(&region, Driver::InThread);
    p.populate(0, BLOCK).unwrap();
    let before = file_bytes(&remove.0);
    // Every other page of the first half goes.
    for page in (0..256).step_by(2) {
        p.discard(page * 4096, 4096).unwrap();
    }
    let after_discard = file_bytes(&remove.0);
    p.populate(0, 4096).unwrap();
    region.write_via_primary(0, &[1; 8]).unwrap();
    let after_refill = file_bytes(&remove.0);
    if after_discard == before {
        // This kernel keeps a punched huge folio whole (6.3 does): nothing
        // went back, and the refill must not allocate anything either.
        assert_eq!(after_refill, after_discard, "the refill allocated memory");
    } else {
        assert!(
            after_discard <= before - 128 * 4096,
            "the punched pages' memory went back: {after_discard} of {before} bytes held"
        );
        assert_eq!(
            after_refill,
            after_discard + 4096,
            "only the refilled page came back"
        );
    }
    let mut buf = [9u8; 8];
    region.read_via_primary(2 * 4096, &mut buf).unwrap();
    assert_eq!(buf, [0; 8], "a hole touched later is filled then");
    assert!(p.errors().is_empty() && p.failures().is_empty());
}

/// `whole_blocks(false)`: a fill allocates its own page only, and the
/// default allocates the block's folio.
#[test]
fn without_whole_blocks_a_fill_allocates_only_its_page() {
    // A region each: a dropped populator may leave its region fenced (on
    // kernels without UFFDIO_POISON its registration stays).
    for (whole, grows) in [(false, 4096), (true, BLOCK as u64)] {
        let Some((region, remove)) = huge_tmpfs_region("sparse") else {
            return;
        };
        let p = Populator::with_options(
            region.clone(),
            ZeroSource,
            PopulateOptions::new()
                .driver(Driver::InThread)
                .whole_blocks(whole),
        )
        .unwrap();
        let page = 7 * 4096;
        let before = file_bytes(&remove.0);
        p.populate(page, 4096).unwrap();
        assert_eq!(
            file_bytes(&remove.0) - before,
            grows,
            "whole_blocks({whole})"
        );
        assert_eq!(p.stats().blocks_allocated, u64::from(whole));
    }
}
