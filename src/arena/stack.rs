//! An ABA-safe lock-free stack of small indices (Treiber), for lists of
//! spans in shared memory. The links live in a separate table of words, one
//! per index, so a node is never memory that can be unmapped or reused.
//!
//! # Protocol of the head word
//!
//! `tag << 32 | (index + 1)`, where 0 in the low half is the empty stack.
//! Every successful push or pop increments the tag, so a CAS that read the
//! head before another thread popped and re-pushed the same index (ABA)
//! fails. Push stores the link (`Relaxed`) and then CASes the head with
//! `Release`; pop loads the head with `Acquire`, reads the link of the top,
//! and CASes the head to it. A link read while another thread re-pushes
//! the index may be stale, but then the tag has moved and the CAS fails.

use crate::sync::{AtomicSlot, Ordering};

const LOW: u64 = 0xFFFF_FFFF;

/// Where the links of a stack live: one word per index.
pub(crate) trait Links {
    /// The word type.
    type Slot: AtomicSlot;
    /// The link word of `index`.
    /// The link word of `index`; `None` if there is no such slot (a
    /// damaged word pointed outside the table).
    fn link(&self, index: u32) -> Option<&Self::Slot>;
}

impl<A: AtomicSlot> Links for [A] {
    type Slot = A;
    fn link(&self, index: u32) -> Option<&A> {
        self.get(index as usize)
    }
}

/// Pushes `index` (which must not be on the stack).
pub(crate) fn push(head: &impl AtomicSlot, links: &(impl Links + ?Sized), index: u32) {
    let mut h = head.load(Ordering::Relaxed);
    loop {
        let Some(link) = links.link(index) else {
            // Not a slot of the table: nothing to push.
            return;
        };
        link.store(h & LOW, Ordering::Relaxed);
        let new = (h >> 32).wrapping_add(1) << 32 | (u64::from(index) + 1);
        match head.compare_exchange(h, new, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(found) => h = found,
        }
    }
}

/// Pops the top index, if any.
pub(crate) fn pop(head: &impl AtomicSlot, links: &(impl Links + ?Sized)) -> Option<u32> {
    let mut h = head.load(Ordering::Acquire);
    loop {
        let top = h & LOW;
        if top == 0 {
            return None;
        }
        // A top outside the table is a damaged head: treat it as empty.
        let next = links.link((top - 1) as u32)?.load(Ordering::Relaxed) & LOW;
        let new = (h >> 32).wrapping_add(1) << 32 | next;
        match head.compare_exchange(h, new, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return Some((top - 1) as u32),
            Err(found) => h = found,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    #[test]
    fn last_in_first_out_and_empty() {
        let head = AtomicU64::new(0);
        let links: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        assert_eq!(pop(&head, &links[..]), None);
        push(&head, &links[..], 2);
        push(&head, &links[..], 0);
        push(&head, &links[..], 3);
        assert_eq!(pop(&head, &links[..]), Some(3));
        assert_eq!(pop(&head, &links[..]), Some(0));
        push(&head, &links[..], 3);
        assert_eq!(pop(&head, &links[..]), Some(3));
        assert_eq!(pop(&head, &links[..]), Some(2));
        assert_eq!(pop(&head, &links[..]), None);
    }

    #[test]
    fn threads_pushing_and_popping_lose_and_duplicate_nothing() {
        let head = AtomicU64::new(0);
        let links: Vec<AtomicU64> = (0..64).map(|_| AtomicU64::new(0)).collect();
        for i in 0..64 {
            push(&head, &links[..], i);
        }
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(i) = pop(&head, &links[..]) {
                            push(&head, &links[..], i);
                        }
                    }
                });
            }
        });
        let mut seen = std::collections::BTreeSet::new();
        while let Some(i) = pop(&head, &links[..]) {
            assert!(seen.insert(i), "{i} twice");
        }
        assert_eq!(seen.len(), 64);
    }
}
