//! Prints what this kernel offers hugearena, one line per capability, with
//! the command that enables anything missing, and the backend each policy
//! would pick.
//!
//! ```text
//! cargo run --release --example probe [SIZE_MIB]
//! ```

use hugearena::{BackendKind, HugePages, KernelCaps, RegionOptions};

fn main() {
    let size_mib: u64 = std::env::args()
        .nth(1)
        .map_or(1024, |s| s.parse().expect("SIZE_MIB must be a number"));
    let caps = KernelCaps::probe();
    println!("hugearena kernel probe");
    println!("======================");
    for line in caps.report() {
        println!("{line}");
    }
    println!();
    println!("Backend choice for a {size_mib} MiB region with 2 MiB huge pages:");
    let size = size_mib << 20;
    let policies = [HugePages::On, HugePages::Try, HugePages::Off].map(|p| {
        (
            format!("huge_pages={p:?}"),
            RegionOptions::new(size).huge_pages(p),
        )
    });
    let exact = BackendKind::ALL.map(|k| (k.to_string(), RegionOptions::new(size).backend(k)));
    for (name, options) in policies.into_iter().chain(exact) {
        match options.plan(&caps) {
            Ok(c) => println!(
                "  {name:<14} -> {} (granule {}): {}",
                c.backend.kind(),
                c.backend.granule(),
                c.reason
            ),
            Err(e) => println!("  {name:<14} -> error: {e}"),
        }
    }
}
