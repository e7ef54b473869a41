//! Offsets in a reproducible random order, shared by the examples, the
//! benchmarks and the tests.

/// `count` offsets `0, step, 2 * step, ...` shuffled by an xorshift-driven
/// Fisher-Yates walk seeded with `seed`.
pub fn shuffled(count: usize, step: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).map(|i| i * step).collect();
    let mut x = seed | 1;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}
