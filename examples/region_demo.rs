//! Creates a shared region, fills it through the alias view, and has a
//! second process open it by path and check every byte through its primary
//! view.
//!
//! ```text
//! cargo run --release --example region_demo [SIZE_MIB] [on|try|off]
//! ```

use std::process::Command;
use std::time::Instant;

use hugearena::{HugePages, Region, RegionOptions};

const CHUNK: usize = 1 << 20;

fn byte_at(offset: usize) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 12)) as u8
}

fn check(region: &Region) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    for off in (0..region.len()).step_by(CHUNK) {
        let n = CHUNK.min(region.len() - off);
        region
            .read_via_primary(off, &mut buf[..n])
            .map_err(|e| e.to_string())?;
        if let Some(i) = (0..n).find(|&i| buf[i] != byte_at(off + i)) {
            return Err(format!("byte {} differs", off + i));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let region = Region::open(&args[2]).unwrap_or_else(|e| panic!("child: {e}"));
        let start = Instant::now();
        match check(&region) {
            Ok(()) => println!(
                "child  pid {}: opened {} ({}), verified {} MiB through the primary in {:?}",
                std::process::id(),
                region.name().display(),
                region.backend().kind(),
                region.len() >> 20,
                start.elapsed()
            ),
            Err(e) => {
                eprintln!("child: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let size_mib: u64 = args
        .get(1)
        .map_or(256, |s| s.parse().expect("SIZE_MIB must be a number"));
    let policy = match args.get(2).map(String::as_str) {
        Some("on") => HugePages::On,
        Some("off") => HugePages::Off,
        _ => HugePages::Try,
    };
    let region = match Region::create(RegionOptions::new(size_mib << 20).huge_pages(policy)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "backend: {} (granule {})",
        region.backend().kind(),
        region.granule()
    );
    println!("why:     {}", region.choice().reason);
    println!(
        "layout:  {} MiB data at file offset {}, {} page-state words, {} MiB of address space",
        region.len() >> 20,
        region.layout().data_offset(),
        region.layout().granules(),
        region.address_space() >> 20
    );
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    for off in (0..region.len()).step_by(CHUNK) {
        let n = CHUNK.min(region.len() - off);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = byte_at(off + i);
        }
        region.write_via_primary(off, &buf[..n]).expect("in bounds");
    }
    println!(
        "parent pid {}: wrote {size_mib} MiB in {:?}",
        std::process::id(),
        start.elapsed()
    );
    let status = Command::new(std::env::current_exe().expect("own path"))
        .arg("--child")
        .arg(region.shareable_path())
        .status()
        .expect("spawn the child process");
    if !status.success() {
        eprintln!("error: the child process failed ({status})");
        std::process::exit(1);
    }
    println!("ok: both processes see the same bytes");
}
