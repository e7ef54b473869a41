//! Model checking of the in-thread driver's registry entry protocol:
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_signal`.
//!
//! The entry's payload (what the SIGBUS handler reads: range, resolver,
//! populator) is a loom `UnsafeCell`: loom reports a handler read that is
//! not ordered after registration, or a reuse of the entry that is not
//! ordered after every handler left. `--cfg hugearena_mutation` weakens
//! `exit` to `Relaxed`; these tests must then fail.
#![allow(unsafe_code)] // the modelled bytes are loom `UnsafeCell`s

use super::signal::{begin_retire, claim, drained, enter, exit, free, publish};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use loom::thread;

struct Entry {
    state: AtomicU64,
    payload: UnsafeCell<u64>,
}

// SAFETY: access to `payload` follows the protocol under test; loom checks it.
unsafe impl Sync for Entry {}

impl Entry {
    fn new() -> Arc<Entry> {
        Arc::new(Entry {
            state: AtomicU64::new(0),
            payload: UnsafeCell::new(0),
        })
    }

    fn register(&self, value: u64) -> bool {
        if !claim(&self.state) {
            return false;
        }
        // SAFETY: the claim makes this thread the only writer.
        self.payload.with_mut(|p| unsafe { *p = value });
        publish(&self.state);
        true
    }

    /// What a SIGBUS handler does: enter, use the payload, leave.
    fn handle(&self) -> Option<u64> {
        if !enter(&self.state) {
            return None;
        }
        // SAFETY: entered, so the payload is published and not reused.
        let seen = self.payload.with(|p| unsafe { *p });
        exit(&self.state);
        Some(seen)
    }
}

#[test]
fn a_handler_sees_the_registration_or_nothing() {
    loom::model(|| {
        let e = Entry::new();
        let handler = {
            let e = e.clone();
            thread::spawn(move || e.handle())
        };
        assert!(e.register(7));
        let seen = handler.join().unwrap();
        assert!(seen.is_none() || seen == Some(7), "{seen:?}");
    });
}

#[test]
fn unregistering_waits_for_handlers_before_reuse() {
    loom::model(|| {
        let e = Entry::new();
        assert!(e.register(7));
        let mut handler = Some({
            let e = e.clone();
            thread::spawn(move || e.handle())
        });
        begin_retire(&e.state);
        // The spin of `Registration::drop` is outside the model: if the
        // handler is still inside, wait for it by joining instead.
        if !drained(&e.state) {
            let seen = handler.take().unwrap().join().unwrap();
            assert_eq!(seen, Some(7));
        }
        assert!(drained(&e.state));
        // Reuse: a new registrant writes the payload.
        free(&e.state);
        assert!(e.register(8));
        if let Some(late) = handler {
            let late = late.join().unwrap();
            assert!(
                late.is_none() || late == Some(7) || late == Some(8),
                "{late:?}"
            );
        }
    });
}

#[test]
fn two_registrants_never_share_an_entry() {
    loom::model(|| {
        let e = Entry::new();
        let wins = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|v| {
                let (e, wins) = (e.clone(), wins.clone());
                thread::spawn(move || {
                    if e.register(v) {
                        wins.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(wins.load(Ordering::Relaxed), 1);
    });
}
