//! Byte counts for people, shared by the examples.

/// Formats a byte count with a binary unit, e.g. `64 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut scaled = n as f64;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if scaled.fract() == 0.0 {
        format!("{} {}", scaled as u64, UNITS[unit])
    } else {
        format!("{scaled:.1} {}", UNITS[unit])
    }
}
