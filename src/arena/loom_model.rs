//! Model checking of the arena's lock-free words with loom:
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_model`.
//!
//! Memory handed out is a loom `UnsafeCell`, so loom reports any two
//! owners touching it without the protocol ordering them.
//! `--cfg hugearena_mutation` weakens the bitmap claim to `Relaxed`,
//! `--cfg hugearena_mutation_cache` drops the owner's fence at a thread
//! cache's gate, `--cfg hugearena_mutation_ledger` takes a cache ledger
//! slot over without a CAS, `--cfg hugearena_mutation_objects` lets the
//! owner allocate an object without dropping a stray remote bit, and
//! `--cfg hugearena_mutation_span` gives a span up with a load and a store
//! instead of a CAS, `--cfg hugearena_mutation_remote` refuses a
//! remote free whenever its span is gone by its CAS, and `--cfg
//! hugearena_mutation_large` caches a freed large allocation with a check
//! and a store, and `--cfg hugearena_mutation_divisor` takes a span's
//! divisor word without checking its class; these tests must then fail.
#![allow(unsafe_code)] // the modelled bytes are loom `UnsafeCell`s

use super::gate::{Flushing, Gate};
use super::{bitmap, block, layout, objects, span, stack};
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

/// A double free that races: the owner frees its object while another
/// thread frees it too, then the owner allocates, collects remote frees
/// and allocates again. If the other free returned before the first of
/// those allocations began, no linearization can put it after that
/// allocation, so the two allocations must differ; if it overlapped, it
/// may count as a free of the new allocation (as a double free after a
/// reuse does in any allocator). `--cfg hugearena_mutation_objects` (no
/// stray check on allocation) must fail here.
#[test]
fn a_racing_double_free_never_hands_an_object_out_twice() {
    loom::model(|| {
        let owned = Arc::new([AtomicU64::new(0)]);
        let remote = Arc::new([AtomicU64::new(0)]);
        let done = Arc::new(AtomicUsize::new(0));
        // The owner allocated object 0 and handed it out.
        assert_eq!(
            objects::take(&owned[..], &remote[..], 2, 0),
            Some((0, 0, 1))
        );
        let other = {
            let (owned, remote, done) = (owned.clone(), remote.clone(), done.clone());
            thread::spawn(move || {
                let _ = objects::free_remote(&owned[..], &remote[..], 0);
                done.store(1, Ordering::SeqCst);
            })
        };
        let _ = objects::free_owned(&owned[..], &remote[..], 0);
        let finished_before = done.load(Ordering::SeqCst) == 1;
        let (a, _, _) = objects::take(&owned[..], &remote[..], 2, 0).expect("room");
        objects::collect(&owned[..], &remote[..], 2);
        let b = objects::take(&owned[..], &remote[..], 2, 0).map(|(i, _, _)| i);
        if finished_before {
            assert_ne!(Some(a), b, "object {a} handed out twice");
        }
        other.join().unwrap();
    });
}

/// The same race, with the owner allocating again from its copy of the
/// word (`objects::NextWord`, the thread cache's short path) instead of
/// searching the bitmap: the copy must drop the stray bit too.
/// `--cfg hugearena_mutation_objects` must fail here as well.
#[test]
fn a_racing_double_free_never_hands_an_object_out_twice_from_the_owners_copy() {
    loom::model(|| {
        let owned = Arc::new([AtomicU64::new(0)]);
        let remote = Arc::new([AtomicU64::new(0)]);
        let done = Arc::new(AtomicUsize::new(0));
        // The owner allocated object 0, keeping a copy of the word.
        let (i, _, bits) = objects::take(&owned[..], &remote[..], 2, 0).expect("room");
        assert_eq!(i, 0);
        let mut next = objects::NextWord::new(bits, 0, 2, 0, 1, 1);
        let other = {
            let (owned, remote, done) = (owned.clone(), remote.clone(), done.clone());
            thread::spawn(move || {
                let _ = objects::free_remote(&owned[..], &remote[..], 0);
                done.store(1, Ordering::SeqCst);
            })
        };
        if objects::free_owned(&owned[..], &remote[..], 0).is_ok() {
            next.note_owner_free(1, 1);
        }
        let finished_before = done.load(Ordering::SeqCst) == 1;
        let a = objects::take_next(&mut next, &owned[0], &remote[0]).expect("room in the copy");
        // A collect clears owner bits: the cache forgets its copy first.
        objects::collect(&owned[..], &remote[..], 2);
        let b = objects::take(&owned[..], &remote[..], 2, 0).map(|(i, _, _)| i as u64);
        if finished_before {
            assert_ne!(Some(a), b, "object {a} handed out twice");
        }
        other.join().unwrap();
    });
}

/// A span of class 5 owned by `owner`: its state word and its one-word
/// owner and remote bitmaps, capacity 2, both objects allocated.
#[allow(clippy::type_complexity)]
fn full_span(owner: u32) -> (Arc<AtomicU64>, Arc<[AtomicU64; 1]>, Arc<[AtomicU64; 1]>) {
    let state = Arc::new(AtomicU64::new(0));
    let owned = Arc::new([AtomicU64::new(0)]);
    let remote = Arc::new([AtomicU64::new(0)]);
    span::carve(&*state, 5, owner);
    objects::take(&owned[..], &remote[..], 2, 0);
    objects::take(&owned[..], &remote[..], 2, 0);
    (state, owned, remote)
}

/// The owner gives up a full span while another thread frees one of its
/// objects: the span ends unowned, listed and pushed exactly once, so the
/// room the free made is found. `--cfg hugearena_mutation_span` (give up
/// by a load and a store) must fail here.
#[test]
fn a_span_given_up_while_an_object_is_freed_is_listed_once() {
    loom::model(|| {
        const OWNER: u32 = 3;
        // Capacity 2, both objects allocated: full.
        let (state, owned, remote) = full_span(OWNER);
        let pushes = Arc::new(AtomicUsize::new(0));
        let other = {
            let (state, owned, remote, pushes) =
                (state.clone(), owned.clone(), remote.clone(), pushes.clone());
            thread::spawn(move || {
                objects::free_remote(&owned[..], &remote[..], 1).expect("allocated");
                if span::note_remote_free(&*state, 5, || true) == span::Remote::List {
                    pushes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        if span::take_pending(&*state) {
            objects::collect(&owned[..], &remote[..], 2);
        }
        let (room, empty) = objects::room_and_empty(&owned[..], 2);
        if span::give_up(&*state, OWNER, room, empty) == span::GaveUp::List {
            pushes.fetch_add(1, Ordering::Relaxed);
        }
        other.join().unwrap();
        assert_eq!(pushes.load(Ordering::Relaxed), 1, "pushed 0 or 2 times");
        let st = span::describe(&*state).expect("active");
        assert!(st.listed && st.owner == 0, "{st:?}");
    });
}

/// The owner gives up its span while another thread frees the span's
/// last live object: the owner's collect can take the free's remote bit
/// between the bit and the free's CAS of the state, and retire the span.
/// The free must count (succeed), not be refused as a free into a freed
/// span; either way nothing stays allocated. `--cfg
/// hugearena_mutation_remote` (always refuse once the span is gone) must
/// fail here.
#[test]
fn a_remote_free_that_empties_a_span_being_given_up_counts() {
    loom::model(|| {
        const OWNER: u32 = 3;
        // Capacity 2, both allocated; object 0 already freed remotely (its
        // bit and PENDING set), object 1 live.
        let (state, owned, remote) = full_span(OWNER);
        assert_eq!(
            span::free_remotely(&*state, 5, 2, (&owned[..], &remote[..]), 0),
            Ok(false)
        );
        let other = {
            let (state, owned, remote) = (state.clone(), owned.clone(), remote.clone());
            thread::spawn(move || span::free_remotely(&*state, 5, 2, (&owned[..], &remote[..]), 1))
        };
        if span::take_pending(&*state) {
            objects::collect(&owned[..], &remote[..], 2);
        }
        let (room, empty) = objects::room_and_empty(&owned[..], 2);
        let gave_up = span::give_up(&*state, OWNER, room, empty);
        let freed = other.join().unwrap();
        assert!(freed.is_ok(), "a free of a live object refused: {freed:?}");
        if gave_up != span::GaveUp::Retire {
            assert_eq!(
                objects::live(&owned[..], &remote[..], 2),
                0,
                "an object lost"
            );
        }
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
        let flushing = Arc::new(Flushing::holding(false));
        let owner = {
            let (gate, flushing) = (gate.clone(), flushing.clone());
            thread::spawn(move || {
                let mut kept = 0;
                for object in [1u64, 2] {
                    // SAFETY: this thread is the gate's only owner, one
                    // guard at a time.
                    if let Some(mut inside) = unsafe { gate.open(&flushing) } {
                        inside.contents().push(object);
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
/// takes the slot over and gives up the span it recorded, exactly once,
/// and the slot ends free. `--cfg hugearena_mutation_ledger` (take over by
/// a check and a store) must fail here.
#[test]
fn a_dead_processs_cache_slot_is_reclaimed_once() {
    use super::ledger;
    use crate::populate::state::Owner;

    loom::model(|| {
        let words: Arc<Vec<AtomicU64>> =
            Arc::new((0..ledger::SLOT_WORDS).map(|_| AtomicU64::new(0)).collect());
        let dead = Owner::new(100, 1);
        assert!(ledger::claim(&words[..], dead));
        ledger::record(&words[..], 3, Some(7));
        let returned = Arc::new(AtomicUsize::new(0));
        let reclaim = |me: Owner, words: Arc<Vec<AtomicU64>>, returned: Arc<AtomicUsize>| {
            move || {
                if ledger::take_over(&words[..], dead, me) {
                    if ledger::span(&words[..], 3).is_some() {
                        returned.fetch_add(1, Ordering::Relaxed);
                    }
                    ledger::record(&words[..], 3, None);
                    ledger::give_up(&words[..]);
                }
            }
        };
        let other = thread::spawn(reclaim(Owner::new(200, 2), words.clone(), returned.clone()));
        reclaim(Owner::new(300, 3), words.clone(), returned.clone())();
        other.join().unwrap();
        assert_eq!(
            returned.load(Ordering::Relaxed),
            1,
            "entries given back twice"
        );
        assert_eq!(ledger::holder(&words[..]), None);
    });
}

/// A large allocation (a head and a tail block) freed twice at once: into
/// one thread's cache, which then owns it (to hand it out again), and by
/// another thread without a cache, which frees it to the blocks. Exactly
/// one free wins, and only the winner touches the memory. `--cfg
/// hugearena_mutation_large` (cache by a check and a store) must fail here.
#[test]
fn a_large_allocation_freed_twice_at_once_is_freed_once() {
    struct Large {
        words: [AtomicU64; 2],
        data: UnsafeCell<u64>,
    }
    // SAFETY: `data` belongs to whoever won the free; loom checks it.
    unsafe impl Sync for Large {}

    loom::model(|| {
        let large = Arc::new(Large {
            words: [AtomicU64::new(0), AtomicU64::new(0)],
            data: UnsafeCell::new(0),
        });
        assert!(block::claim_large(&large.words[..], 1));
        let wins = Arc::new(AtomicUsize::new(0));
        let other = {
            let (large, wins) = (large.clone(), wins.clone());
            thread::spawn(move || {
                if block::begin_free_large(&large.words[0], block::Kind::LargeHead).is_some() {
                    wins.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: ours while RELEASING (a release punches it).
                    large.data.with_mut(|d| unsafe { *d = 2 });
                    block::finish(&large.words[1], true);
                    block::finish(&large.words[0], true);
                }
            })
        };
        let cached = block::cache_large(&large.words[0]) == Some(2);
        if cached {
            wins.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the cache's, to hand out again.
            large.data.with_mut(|d| unsafe { *d = 1 });
        }
        other.join().unwrap();
        assert_eq!(wins.load(Ordering::Relaxed), 1, "freed 0 or 2 times");
        // The cache hands it out again, once.
        assert_eq!(block::uncache_large(&large.words[0], 2), cached);
        assert!(!block::uncache_large(&large.words[0], 2));
    });
}

/// A free's fast path reads a span's state and divisor word while the
/// span is retired and carved again for another class (divisor word, then
/// state): the index it computes is always that of the class it reports,
/// never one class's index under another's. `--cfg
/// hugearena_mutation_divisor` (no class check) must fail here.
#[test]
fn a_free_never_takes_an_index_from_another_classs_divisor_word() {
    loom::model(|| {
        // Class 1 (32 bytes), then class 2 (48): the object at 96 is
        // index 3 of the first and 2 of the second.
        let (first, second) = (1u32, 2u32);
        let state = Arc::new(AtomicU64::new(0));
        let divisor = Arc::new(AtomicU64::new(layout::divisor_word(first)));
        span::carve(&*state, first, 1);
        let carver = {
            let (state, divisor) = (state.clone(), divisor.clone());
            thread::spawn(move || {
                // Retired (the owner emptied it), then carved again.
                state.store(0, Ordering::Release);
                divisor.store(layout::divisor_word(second), Ordering::Relaxed);
                span::carve(&*state, second, 1);
            })
        };
        if let Some((class, index)) = span::class_and_index(&*state, &*divisor, 96) {
            let size = layout::CLASSES[class as usize] as usize;
            assert_eq!(index * size, 96, "class {class} given index {index}");
        }
        carver.join().unwrap();
    });
}
