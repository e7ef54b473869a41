//! Page bitmaps in shared memory: one bit per page of a block, set = in
//! use. (A span's object bitmaps follow their own protocol: `objects`.)
//!
//! # Protocol
//!
//! - **Claim**: a range of bits is taken word by word, each with a CAS that
//!   requires the range's bits in that word to be clear (`AcqRel`: the
//!   claimant sees the writes of whoever freed them). If a later word's
//!   bits are taken, the words already claimed are given back and the claim
//!   fails: no range is ever half-owned once the call returns.
//! - **Release**: a CAS per word that requires the bits to be set
//!   (`AcqRel`: the releaser's writes to the memory happen before the next
//!   claimant's); finding one clear is reported (a double free, or a
//!   pointer that was never allocated), after putting back what was cleared.
//!
//! Scans (`find_clear_run`) read with `Relaxed`: they only propose a range
//! for a claim, which checks again.

use crate::sync::{AtomicSlot, Ordering};

const BITS: usize = 64;

/// Ordering of a successful claim. `--cfg hugearena_mutation` weakens it on
/// purpose so CI can check that the loom tests notice.
#[cfg(not(hugearena_mutation))]
const CLAIM: Ordering = Ordering::AcqRel;
#[cfg(hugearena_mutation)]
const CLAIM: Ordering = Ordering::Relaxed;

/// The bits of word `w` that `[start, start + n)` covers.
fn segments(start: usize, n: usize) -> impl Iterator<Item = (usize, u64)> {
    let end = start + n;
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let word = at / BITS;
        let lo = at % BITS;
        let hi = (end - word * BITS).min(BITS);
        let mask = if hi - lo == BITS {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        at = (word + 1) * BITS;
        Some((word, mask))
    })
}

fn set_bits(word: &impl AtomicSlot, mask: u64) -> bool {
    let mut w = word.load(Ordering::Relaxed);
    loop {
        if w & mask != 0 {
            return false;
        }
        match word.compare_exchange(w, w | mask, CLAIM, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(found) => w = found,
        }
    }
}

fn clear_bits(word: &impl AtomicSlot, mask: u64) -> bool {
    let mut w = word.load(Ordering::Relaxed);
    loop {
        if w & mask != mask {
            return false;
        }
        match word.compare_exchange(w, w & !mask, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(found) => w = found,
        }
    }
}

/// Claims bits `[start, start + n)` if all are clear.
pub(crate) fn claim_range(words: &[impl AtomicSlot], start: usize, n: usize) -> bool {
    let mut claimed = 0;
    for (i, (w, mask)) in segments(start, n).enumerate() {
        if !set_bits(&words[w], mask) {
            for (w, mask) in segments(start, n).take(i) {
                let ok = clear_bits(&words[w], mask);
                debug_assert!(ok, "bits this call set were cleared by someone else");
            }
            return false;
        }
        claimed += 1;
    }
    debug_assert!(claimed > 0 || n == 0);
    true
}

/// Releases bits `[start, start + n)`; `false` (and nothing changed) if any
/// of them was clear.
pub(crate) fn release_range(words: &[impl AtomicSlot], start: usize, n: usize) -> bool {
    for (i, (w, mask)) in segments(start, n).enumerate() {
        if !clear_bits(&words[w], mask) {
            for (w, mask) in segments(start, n).take(i) {
                set_bits(&words[w], mask);
            }
            return false;
        }
    }
    true
}

/// Whether bit `i` is set.
pub(crate) fn is_set(words: &[impl AtomicSlot], i: usize) -> bool {
    words[i / BITS].load(Ordering::Acquire) & (1 << (i % BITS)) != 0
}

/// The first run of `n` clear bits among the first `len` whose start is a
/// multiple of `align`, as the bitmap looks now.
pub(crate) fn find_clear_run(
    words: &[impl AtomicSlot],
    len: usize,
    n: usize,
    align: usize,
) -> Option<usize> {
    // Block bitmaps are 8 words and span bitmaps 64: snapshot on the stack.
    let mut snapshot = [0u64; 64];
    let used = len.div_ceil(BITS).min(snapshot.len());
    for (s, w) in snapshot.iter_mut().zip(words).take(used) {
        *s = w.load(Ordering::Relaxed);
    }
    let len = len.min(used * BITS);
    let snapshot = &snapshot[..used];
    let mut start = 0;
    loop {
        // The next clear bit at an aligned position, then the first set
        // bit after it: a word at a time, not a bit at a time.
        start = next_bit(snapshot, start, len, false)?.next_multiple_of(align);
        if start + n > len {
            return None;
        }
        match next_bit(snapshot, start, len, true) {
            Some(taken) if taken < start + n => start = taken + 1,
            _ => return Some(start),
        }
    }
}

/// The first bit at or after `from` (and below `len`) that is set (`set`)
/// or clear.
fn next_bit(words: &[u64], from: usize, len: usize, set: bool) -> Option<usize> {
    if from >= len {
        return None;
    }
    let flip = if set { 0 } else { u64::MAX };
    let mut w = from / BITS;
    let mut word = (words[w] ^ flip) & (u64::MAX << (from % BITS));
    loop {
        if word != 0 {
            let bit = w * BITS + word.trailing_zeros() as usize;
            return (bit < len).then_some(bit);
        }
        w += 1;
        if w * BITS >= len {
            return None;
        }
        word = words[w] ^ flip;
    }
}

/// The bits of word `w` that lie among the first `len` bits.
pub(crate) fn valid_bits(w: usize, len: usize) -> u64 {
    if (w + 1) * BITS <= len {
        u64::MAX
    } else {
        (1u64 << (len - w * BITS)) - 1
    }
}

/// Counts the set bits among the first `len`.
pub(crate) fn count_set(words: &[impl AtomicSlot], len: usize) -> usize {
    (0..len.div_ceil(BITS))
        .map(|w| (words[w].load(Ordering::Acquire) & valid_bits(w, len)).count_ones() as usize)
        .sum()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    fn bitmap(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn ranges_across_words_claim_release_and_roll_back() {
        let b = bitmap(8);
        assert!(claim_range(&b, 60, 10));
        assert!(is_set(&b, 60) && is_set(&b, 69) && !is_set(&b, 70));
        assert!(!claim_range(&b, 50, 20), "overlaps");
        assert_eq!(count_set(&b, 512), 10, "the failed claim rolled back");
        assert!(claim_range(&b, 0, 60));
        assert!(claim_range(&b, 70, 442));
        assert_eq!(count_set(&b, 512), 512);
        assert!(release_range(&b, 60, 10));
        assert!(!release_range(&b, 60, 10), "double release");
        assert!(!release_range(&b, 55, 10), "partly clear");
        assert_eq!(count_set(&b, 512), 502, "the failed release put back");
    }

    #[test]
    fn runs_respect_alignment() {
        let b = bitmap(8);
        assert!(claim_range(&b, 0, 3));
        assert_eq!(find_clear_run(&b, 512, 16, 16), Some(16));
        assert_eq!(find_clear_run(&b, 512, 5, 1), Some(3));
        assert!(claim_range(&b, 16, 496));
        assert_eq!(find_clear_run(&b, 512, 14, 1), None);
        assert_eq!(find_clear_run(&b, 512, 13, 1), Some(3));
    }

    #[test]
    fn the_run_search_finds_the_first_fitting_run_a_bit_search_finds() {
        // The first aligned run of `n` clear bits, one bit at a time.
        fn by_bits(words: &[u64], len: usize, n: usize, align: usize) -> Option<usize> {
            let clear = |i: usize| words[i / 64] & (1 << (i % 64)) == 0;
            (0..len)
                .step_by(align)
                .find(|&s| s + n <= len && (s..s + n).all(clear))
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let words: Vec<u64> = (0..8)
                .map(|i| {
                    let r = x.rotate_left(i * 8);
                    // Mostly-full, mostly-empty and mixed words.
                    match (r >> 60) % 3 {
                        0 => r & r.rotate_left(17),
                        1 => r | r.rotate_left(29),
                        _ => r,
                    }
                })
                .collect();
            let b = bitmap(8);
            for (w, &v) in b.iter().zip(&words) {
                w.store(v, Ordering::Relaxed);
            }
            let len = [512, 500, 100, 64][round % 4];
            let n = 1 + (x % 70) as usize;
            let align = [1, 2, 4, 16][(x >> 8) as usize % 4];
            assert_eq!(
                find_clear_run(&b, len, n, align),
                by_bits(&words, len, n, align),
                "{words:x?} len {len} n {n} align {align}"
            );
        }
    }
}
