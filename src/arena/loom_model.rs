//! Model checking of the arena's lock-free words with loom:
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_model`.
//!
//! Memory handed out is a loom `UnsafeCell`, so loom reports any two
//! owners touching it without the protocol ordering them.
//! `--cfg hugearena_mutation` weakens the bitmap claim to `Relaxed`, and
//! `--cfg hugearena_mutation_cache` drops the owner's fence at a thread
//! cache's gate, and `--cfg hugearena_mutation_ledger` takes a cache
//! ledger slot over without a CAS; these tests must then fail.
#![allow(unsafe_code)] // the modelled bytes are loom `UnsafeCell`s

use super::gate::{Flushing, Gate};
use super::{bitmap, span, stack};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use loom::thread;

/// Two pages guarded by a two-word bitmap.
struct Pages {
    bits: [AtomicU64; 2],
    data: [UnsafeCell<u64>; 2],
}

// SAFETY: access to `data` follows the bitmap protocol; loom checks it.
unsafe impl Sync for Pages {}

fn pages() -> Arc<Pages> {
    Arc::new(Pages {
        bits: [AtomicU64::new(0), AtomicU64::new(0)],
        data: [UnsafeCell::new(0), UnsafeCell::new(0)],
    })
}

/// A run across the word boundary (bits 63..65) against a one-bit claim in
/// it: exactly one wins, the loser's partial claim is rolled back, and the
/// winner's writes are ordered after the previous owner's release.
#[test]
fn a_cross_word_run_and_a_single_claim_never_share_a_page() {
    loom::model(|| {
        let p = pages();
        // The previous owner of bit 64 wrote page 1, then released it.
        assert!(bitmap::claim_range(&p.bits, 64, 1));
        let prev = {
            let p = p.clone();
            thread::spawn(move || {
                // SAFETY: this thread owns bit 64.
                p.data[1].with_mut(|d| unsafe { *d = 1 });
                assert!(bitmap::release_range(&p.bits, 64, 1));
            })
        };
        let wins = Arc::new(AtomicUsize::new(0));
        let run = {
            let (p, wins) = (p.clone(), wins.clone());
            thread::spawn(move || {
                if bitmap::claim_range(&p.bits, 63, 2) {
                    // SAFETY: the claim owns bits 63 and 64.
                    p.data[1].with_mut(|d| unsafe { *d = 2 });
                    wins.fetch_add(1, Ordering::Relaxed);
                    assert!(bitmap::release_range(&p.bits, 63, 2));
                }
            })
        };
        let single = {
            let (p, wins) = (p.clone(), wins.clone());
            thread::spawn(move || {
                if bitmap::claim_range(&p.bits, 64, 1) {
                    // SAFETY: the claim owns bit 64.
                    p.data[1].with_mut(|d| unsafe { *d = 3 });
                    wins.fetch_add(1, Ordering::Relaxed);
                    assert!(bitmap::release_range(&p.bits, 64, 1));
                }
            })
        };
        prev.join().unwrap();
        run.join().unwrap();
        single.join().unwrap();
        assert_eq!(
            bitmap::count_set(&p.bits, 128),
            0,
            "every claim was released or rolled back"
        );
        let _ = wins.load(Ordering::Relaxed);
    });
}

/// Span objects: a reservation always finds a bit; a span is retired only
/// when empty, by exactly one thread, after every object was given back.
#[test]
fn span_reservations_and_retirement() {
    loom::model(|| {
        let state = Arc::new(AtomicU64::new(0));
        let bits = Arc::new([AtomicU64::new(0)]);
        // Carve: one object (bit 0) held by the carver, capacity 2.
        assert!(bitmap::claim_range(&*bits, 0, 1));
        span::activate(&*state, 5);
        let retired = Arc::new(AtomicUsize::new(0));
        let other = {
            let (state, bits, retired) = (state.clone(), bits.clone(), retired.clone());
            thread::spawn(move || {
                if span::reserve(&*state, 5, 2) {
                    let i = bitmap::claim_one(&*bits, 2).expect("a reservation has a bit");
                    assert!(bitmap::release_range(&*bits, i, 1));
                    if span::unreserve(&*state, false) == span::AfterFree::Retire {
                        retired.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        assert!(bitmap::release_range(&*bits, 0, 1));
        if span::unreserve(&*state, false) == span::AfterFree::Retire {
            retired.fetch_add(1, Ordering::Relaxed);
        }
        other.join().unwrap();
        // Retired at most once; if the span survived it is listed (the
        // first unreserve of a non-current span lists it) and empty.
        match retired.load(Ordering::Relaxed) {
            0 => assert_eq!(span::describe(&*state), Some((5, 0))),
            1 => assert_eq!(span::describe(&*state), None),
            n => panic!("retired {n} times"),
        }
        assert_eq!(bitmap::count_set(&*bits, 2), 0);
    });
}

/// The partial-span stack under a concurrent pop and push.
#[test]
fn the_span_stack_loses_and_duplicates_nothing() {
    loom::model(|| {
        let head = Arc::new(AtomicU64::new(0));
        let links = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        stack::push(&*head, &links[..], 0);
        stack::push(&*head, &links[..], 1);
        let popper = {
            let (head, links) = (head.clone(), links.clone());
            thread::spawn(move || {
                let got = stack::pop(&*head, &links[..]);
                if let Some(i) = got {
                    stack::push(&*head, &links[..], i);
                }
            })
        };
        let pusher = {
            let (head, links) = (head.clone(), links.clone());
            thread::spawn(move || {
                let got = stack::pop(&*head, &links[..]);
                stack::push(&*head, &links[..], 2);
                got
            })
        };
        popper.join().unwrap();
        let taken = pusher.join().unwrap();
        let mut left = Vec::new();
        while let Some(i) = stack::pop(&*head, &links[..]) {
            left.push(i);
        }
        left.extend(taken);
        left.sort_unstable();
        assert_eq!(left, vec![0, 1, 2]);
    });
}

/// A thread cache's owner puts objects in it while another thread flushes
/// it: the two never touch the cache at once (loom's `UnsafeCell` would
/// report it), and every object ends up either flushed or still cached,
/// exactly once.
#[test]
fn a_flush_and_the_caches_owner_never_meet_inside_the_cache() {
    loom::model(|| {
        let gate = Arc::new(Gate::new(Vec::<u64>::new()));
        let flushing = Arc::new(Flushing::default());
        let owner = {
            let (gate, flushing) = (gate.clone(), flushing.clone());
            thread::spawn(move || {
                let mut kept = 0;
                for object in [1u64, 2] {
                    // SAFETY: this thread is the gate's only owner.
                    if unsafe { gate.enter(&flushing, |c| c.push(object)) }.is_some() {
                        kept += 1;
                    }
                }
                kept
            })
        };
        let flushed = if flushing.begin() {
            gate.take(std::mem::take)
        } else {
            Vec::new()
        };
        flushing.end();
        let kept = owner.join().unwrap();
        let left = gate.take(std::mem::take);
        assert_eq!(
            flushed.len() + left.len(),
            kept,
            "objects lost or duplicated"
        );
    });
}

/// Two processes notice at once that a ledger slot's holder died: one
/// takes the slot over and gives back its entries, each exactly once, and
/// the slot ends free. `--cfg hugearena_mutation_ledger` (take over by a
/// check and a store) must fail here.
#[test]
fn a_dead_processs_cache_slot_is_reclaimed_once() {
    use super::ledger;
    use crate::populate::state::Owner;

    loom::model(|| {
        let words: Arc<Vec<AtomicU64>> =
            Arc::new((0..ledger::SLOT_WORDS).map(|_| AtomicU64::new(0)).collect());
        let dead = Owner::new(100, 1);
        assert!(ledger::claim(&words[..], dead));
        assert!(ledger::push(&words[..], 3, 4096));
        assert!(ledger::push(&words[..], 3, 8192));
        let returned = Arc::new(AtomicUsize::new(0));
        let reclaim = |me: Owner, words: Arc<Vec<AtomicU64>>, returned: Arc<AtomicUsize>| {
            move || {
                if ledger::take_over(&words[..], dead, me) {
                    ledger::drain(&words[..], |_, _| {
                        returned.fetch_add(1, Ordering::Relaxed);
                    });
                    ledger::give_up(&words[..]);
                }
            }
        };
        let other = thread::spawn(reclaim(Owner::new(200, 2), words.clone(), returned.clone()));
        reclaim(Owner::new(300, 3), words.clone(), returned.clone())();
        other.join().unwrap();
        assert_eq!(
            returned.load(Ordering::Relaxed),
            2,
            "entries given back twice"
        );
        assert_eq!(ledger::holder(&words[..]), None);
    });
}
