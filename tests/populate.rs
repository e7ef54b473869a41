//! Proactive population on the real kernel: every granule is filled once
//! from its source, mapped with UFFDIO_CONTINUE, and a second process maps
//! the same pages without filling any.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;

use common::*;
use hugearena::populate::{FileSource, FnSource, Populator, SourceError, ZeroSource};
use hugearena::{BackendKind, PageSize, Region, RegionOptions};

const LEN: usize = 64 << 20;

fn patterned_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..LEN).step_by(buf.len()) {
        fill_pattern(1, off, &mut buf);
        f.write_all(&buf).unwrap();
    }
    f
}

fn verify(region: &Region, expect: impl Fn(usize) -> u8) {
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..region.len()).step_by(buf.len()) {
        region.read_via_primary(off, &mut buf).unwrap();
        if let Some(i) = (0..buf.len()).find(|&i| buf[i] != expect(off + i)) {
            panic!(
                "byte {} is {:#x}, want {:#x}",
                off + i,
                buf[i],
                expect(off + i)
            );
        }
    }
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    if role == "touch-poisoned" {
        let region =
            Region::create(RegionOptions::new(1 << 20).backend(BackendKind::Shmem)).unwrap();
        let populator = Populator::new(&region, failing_source()).unwrap();
        populator.populate(0, region.len()).unwrap();
        let mut page = [0u8; 16];
        region.read_via_primary(4 * 4096, &mut page).unwrap();
        println!("CHILD-READ-PAGE-4");
        // Page 5 is poisoned: this read must raise SIGBUS and kill us.
        region.read_via_primary(5 * 4096, &mut page).unwrap();
        println!("CHILD-SURVIVED");
        return;
    }
    assert_eq!(role, "populate");
    let region = Region::open(std::env::var("REGION_PATH").unwrap()).unwrap();
    let populator = Populator::new(&region, ZeroSource).unwrap();
    populator.populate(0, region.len()).unwrap();
    verify(&region, |i| pattern_byte(1, i));
    println!(
        "CHILD-FILLS {}",
        populator.counters().fills.load(Ordering::Relaxed)
    );
}

fn populate_from_file(kind: BackendKind) {
    let file = patterned_file();
    let region = Region::create(RegionOptions::new(LEN as u64).backend(kind)).unwrap();
    let populator = Populator::new(&region, FileSource::open(file.path()).unwrap()).unwrap();
    // Two threads populate overlapping halves: no granule is filled twice.
    std::thread::scope(|s| {
        s.spawn(|| populator.populate(0, LEN * 3 / 4).unwrap());
        s.spawn(|| populator.populate(LEN / 4, LEN * 3 / 4).unwrap());
    });
    let granules = (LEN / region.granule().bytes()) as u64;
    assert_eq!(populator.counters().fills.load(Ordering::Relaxed), granules);
    verify(&region, |i| pattern_byte(1, i));
    let out = run_child(
        "populate",
        &[("REGION_PATH", region.shareable_path().display().to_string())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CHILD-FILLS 0"),
        "the second process must not fill: {stdout}"
    );
}

#[test]
fn shmem_is_populated_once_and_shared() {
    populate_from_file(BackendKind::Shmem);
}

#[test]
fn shmem_thp_is_populated_once_and_shared() {
    populate_from_file(BackendKind::ShmemThp);
}

#[test]
fn hugetlb_is_populated_once_and_shared() {
    if ensure_huge_pages(PageSize::Huge2M, 40) {
        populate_from_file(BackendKind::Hugetlb);
    }
}

#[test]
fn zero_source_allocates_without_copying() {
    let region = Region::create(RegionOptions::new(8 << 20).backend(BackendKind::Shmem)).unwrap();
    let populator = Populator::new(&region, ZeroSource).unwrap();
    populator.populate(0, region.len()).unwrap();
    verify(&region, |_| 0);
    assert_eq!(populator.counters().fills.load(Ordering::Relaxed), 2048);
}

/// Fills page i with i + 1, except page 5, whose fill fails.
fn failing_source() -> impl hugearena::populate::PageSource {
    FnSource(|index: u64, dst: &mut [u8]| {
        if index == 5 {
            return Err(SourceError::Custom {
                index,
                message: "checksum mismatch".into(),
            });
        }
        dst.fill((index as u8).wrapping_add(1));
        Ok(())
    })
}

#[test]
fn touching_a_poisoned_page_raises_sigbus_for_that_page_only() {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, "touch-poisoned")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CHILD-READ-PAGE-4"), "{stdout}");
    assert!(!stdout.contains("CHILD-SURVIVED"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}", out.status);
}

#[test]
fn a_failing_source_poisons_only_its_pages_and_reports_why() {
    let region = Region::create(RegionOptions::new(1 << 20).backend(BackendKind::Shmem)).unwrap();
    let populator = Populator::new(&region, failing_source()).unwrap();
    populator.populate(0, region.len()).unwrap();
    assert_eq!(populator.counters().poisoned.load(Ordering::Relaxed), 1);
    let errors = populator.take_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].to_string(), "page 5: checksum mismatch");
    let mut page = vec![0u8; 4096];
    for index in (0..256).filter(|&i| i != 5) {
        region.read_via_primary(index * 4096, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == (index as u8).wrapping_add(1)),
            "page {index}"
        );
    }
}
