//! Model checking of the page-state protocol with loom:
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_state`.
//!
//! The page's bytes are a loom `UnsafeCell`, so loom reports any read that
//! is not ordered after the write that filled it. `--cfg hugearena_mutation`
//! weakens the publishing CAS to `Relaxed`; these tests must then fail.
//! `--cfg hugearena_mutation_discard` plants the old discard order; the
//! discard test must then fail. `--cfg hugearena_mutation_writeback` drops
//! the discard's releases; the write-back test must then fail.
#![allow(unsafe_code)] // the modelled bytes are loom `UnsafeCell`s

use super::state::{self, Claim, Owner, PageState};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use loom::thread;

/// One granule: its state word and its bytes.
struct Granule {
    state: AtomicU64,
    data: UnsafeCell<u64>,
}

// SAFETY: access to `data` follows the protocol under test; loom checks it.
unsafe impl Sync for Granule {}

impl Granule {
    fn new() -> Arc<Granule> {
        Arc::new(Granule {
            state: AtomicU64::new(state::ABSENT),
            data: UnsafeCell::new(0),
        })
    }

    /// Claim, fill, publish; or read if someone else already published.
    /// Returns whether this call was the filler.
    fn populate(&self, me: Owner, value: u64) -> bool {
        match state::claim(&self.state, me) {
            Claim::Won => {
                // SAFETY: the claim makes this thread the only writer.
                self.data.with_mut(|p| unsafe { *p = value });
                state::publish(&self.state, me).expect("nobody took the claim over");
                true
            }
            Claim::Present => {
                // SAFETY: Present was observed with Acquire.
                assert_eq!(self.data.with(|p| unsafe { *p }), value);
                false
            }
            Claim::Busy(_) | Claim::Poisoned => false,
        }
    }
}

const A: Owner = Owner::new(1, 11);
const B: Owner = Owner::new(2, 22);
const C: Owner = Owner::new(3, 33);

#[test]
fn exactly_one_of_two_racing_populators_fills() {
    loom::model(|| {
        let g = Granule::new();
        let fills = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = [A, B]
            .into_iter()
            .map(|me| {
                let (g, fills) = (g.clone(), fills.clone());
                thread::spawn(move || {
                    if g.populate(me, 42) {
                        fills.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(fills.load(Ordering::Relaxed), 1);
        assert_eq!(state::observe(&g.state), PageState::Present);
    });
}

#[test]
fn a_reader_that_sees_present_sees_the_bytes() {
    loom::model(|| {
        let g = Granule::new();
        let filler = {
            let g = g.clone();
            thread::spawn(move || assert!(g.populate(A, 7)))
        };
        if state::observe(&g.state) == PageState::Present {
            // SAFETY: Present was observed with Acquire.
            assert_eq!(g.data.with(|p| unsafe { *p }), 7);
        }
        filler.join().unwrap();
    });
}

/// Discard's contract: while a page is punched out of the file its word
/// is never `Present`, so a toucher that finds the page gone (`EFAULT` in
/// the real engine, `punched` here) and looks at the word again never sees
/// `Present` with no page behind it. `--cfg hugearena_mutation_discard` restores the old order
/// (punch while `Present`, then `Present → Absent`); this test must fail.
#[test]
fn a_discard_never_shows_a_present_word_without_its_page() {
    loom::model(|| {
        let g = Granule::new();
        assert!(g.populate(A, 5));
        let page = Arc::new(AtomicU64::new(5));
        let discarder = {
            let (g, page) = (g.clone(), page.clone());
            thread::spawn(move || {
                assert_eq!(state::begin_discard(&g.state, A), state::Discard::Claimed);
                // The punch: the kernel drops the page.
                page.store(0, Ordering::Release);
                let _ = state::finish_discard(&g.state, A);
            })
        };
        let refills = Arc::new(AtomicUsize::new(0));
        let touchers: Vec<_> = [B]
            .into_iter()
            .map(|me| {
                let (g, page, refills) = (g.clone(), page.clone(), refills.clone());
                thread::spawn(move || {
                    for _ in 0..2 {
                        match state::claim(&g.state, me) {
                            Claim::Won => {
                                page.store(6, Ordering::Relaxed);
                                state::publish(&g.state, me).unwrap();
                                refills.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Claim::Present => {
                                if page.load(Ordering::Acquire) != 0 {
                                    return;
                                }
                                // The page is gone: its word must say so,
                                // or show a refill whose page is there.
                                if state::observe(&g.state) == PageState::Present {
                                    assert_ne!(
                                        page.load(Ordering::Acquire),
                                        0,
                                        "a present word with no page behind it"
                                    );
                                }
                            }
                            Claim::Busy(_) | Claim::Poisoned => thread::yield_now(),
                        }
                    }
                })
            })
            .collect();
        discarder.join().unwrap();
        for h in touchers {
            h.join().unwrap();
        }
        assert!(
            refills.load(Ordering::Relaxed) <= 1,
            "two refills of one discarded page"
        );
    });
}

/// A discarder killed between its claim and the end of the discard leaves a
/// claim of a dead process: exactly one toucher takes it over and fills.
#[test]
fn a_dead_discarders_claim_is_taken_over_once() {
    loom::model(|| {
        let g = Granule::new();
        assert!(g.populate(A, 5));
        assert_eq!(state::begin_discard(&g.state, A), state::Discard::Claimed);
        // A dies here.
        let fills = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = [B, C]
            .into_iter()
            .map(|me| {
                let (g, fills) = (g.clone(), fills.clone());
                thread::spawn(move || {
                    if state::take_over(&g.state, A, me) {
                        // SAFETY: the take-over makes this thread the writer.
                        g.data.with_mut(|p| unsafe { *p = 8 });
                        state::publish(&g.state, me).unwrap();
                        fills.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(fills.load(Ordering::Relaxed), 1);
        assert_eq!(state::observe(&g.state), PageState::Present);
    });
}

#[test]
fn a_dead_claim_is_taken_over_once_and_published_once() {
    loom::model(|| {
        let g = Granule::new();
        assert_eq!(state::claim(&g.state, A), Claim::Won);
        let publishes = Arc::new(AtomicUsize::new(0));
        // A is presumed dead by B and C, but is actually still finishing.
        let mut handles = Vec::new();
        for me in [B, C] {
            let (g, publishes) = (g.clone(), publishes.clone());
            handles.push(thread::spawn(move || {
                if state::take_over(&g.state, A, me) {
                    // SAFETY: the take-over makes this thread the writer.
                    g.data.with_mut(|p| unsafe { *p = 9 });
                    if state::publish(&g.state, me).is_ok() {
                        publishes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        {
            let publishes = publishes.clone();
            let g = g.clone();
            handles.push(thread::spawn(move || {
                // A publishes without writing again (its bytes were written
                // before the race began in this model).
                if state::publish(&g.state, A).is_ok() {
                    publishes.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(publishes.load(Ordering::Relaxed), 1);
        assert_eq!(state::observe(&g.state), PageState::Present);
    });
}

/// A buffer pool evicts a dirty page: it writes the page back to its store,
/// then discards it, while another process touches the page. Whoever fills
/// the page after the discard reads the written bytes, never the store's
/// older ones. The store is a `Relaxed` atomic: the only order between the
/// evictor's write and the refiller's read is the state word's.
/// `--cfg hugearena_mutation_writeback` drops the discard's releases; this
/// test must then fail.
#[test]
fn a_page_written_back_then_discarded_is_refilled_with_the_written_bytes() {
    loom::model(|| {
        let g = Granule::new();
        let store = Arc::new(AtomicU64::new(5));
        assert!(g.populate(A, 5));
        // The page is updated in memory (dirty), under the pool's latch.
        // SAFETY: no other thread exists yet.
        g.data.with_mut(|p| unsafe { *p = 7 });
        let evictor = {
            let (g, store) = (g.clone(), store.clone());
            thread::spawn(move || {
                // SAFETY: the page is present and its latch is held here.
                let dirty = g.data.with(|p| unsafe { *p });
                store.store(dirty, Ordering::Relaxed);
                assert_eq!(state::begin_discard(&g.state, A), state::Discard::Claimed);
                let _ = state::finish_discard(&g.state, A);
            })
        };
        let refiller = {
            let (g, store) = (g.clone(), store.clone());
            thread::spawn(move || {
                for _ in 0..3 {
                    match state::claim(&g.state, B) {
                        Claim::Won => {
                            let read = store.load(Ordering::Relaxed);
                            assert_eq!(
                                read, 7,
                                "a refill read the store's bytes from before the write-back"
                            );
                            // SAFETY: the claim makes this thread the writer.
                            g.data.with_mut(|p| unsafe { *p = read });
                            state::publish(&g.state, B).unwrap();
                            return;
                        }
                        Claim::Present | Claim::Busy(_) | Claim::Poisoned => thread::yield_now(),
                    }
                }
            })
        };
        evictor.join().unwrap();
        refiller.join().unwrap();
    });
}
