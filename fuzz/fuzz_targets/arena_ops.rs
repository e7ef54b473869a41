//! Operation sequences on one arena (shared by every run, as a long-lived
//! arena would be): allocations of every size range and alignment, frees of
//! live, freed and made-up pointers. Checked after every run: no two live
//! allocations overlap, every valid free is accepted and every invalid one
//! rejected, and once everything is freed the tables agree with each other
//! and nothing is left in use.
#![no_main]

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use hugearena::populate::{Driver, PopulateOptions};
use hugearena::{Arena, BackendKind, Error, RegionOptions, ShmPtr};
use libfuzzer_sys::fuzz_target;

fn arena() -> &'static Mutex<Arena> {
    static ARENA: OnceLock<Mutex<Arena>> = OnceLock::new();
    ARENA.get_or_init(|| {
        // Handler threads: the fuzzer keeps its own SIGBUS handler.
        let populate = PopulateOptions::new().driver(Driver::HandlerThreads(1));
        let options = RegionOptions::new(32 << 20).backend(BackendKind::Shmem);
        Mutex::new(Arena::create(options, populate).expect("arena (run as root)"))
    })
}

fuzz_target!(|data: &[u8]| {
    let arena = arena().lock().unwrap_or_else(|e| e.into_inner());
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    for chunk in data.chunks(4) {
        let [kind, a, b, c] = <[u8; 4]>::try_from(chunk).unwrap_or([chunk[0], 0, 0, 0]);
        let pick = |n: usize| (usize::from(a) << 8 | usize::from(b)) % n.max(1);
        match kind % 4 {
            0 | 1 => {
                let size = match kind % 3 {
                    0 => usize::from(b) << 4 | usize::from(c) & 0xF,
                    1 => usize::from(a) << 12 | usize::from(b) << 4,
                    _ => (usize::from(a) % 6) << 20 | usize::from(b) << 12,
                };
                let align = 1usize << (c % 23);
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                match arena.alloc(layout) {
                    Ok(p) => {
                        let (start, end) = (p.offset(), p.offset() + size as u64);
                        assert_eq!(start % align as u64, 0);
                        if let Some((&s, &len)) = live.range(..=start).next_back() {
                            assert!(s + len <= start, "overlap");
                        }
                        if let Some((&s, _)) = live.range(start..).next() {
                            assert!(end <= s, "overlap");
                        }
                        live.insert(start, size as u64);
                    }
                    Err(Error::ZeroAllocation)
                    | Err(Error::AlignmentTooLarge { .. })
                    | Err(Error::ArenaExhausted { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            2 if !live.is_empty() => {
                let start = *live.keys().nth(pick(live.len())).unwrap();
                live.remove(&start);
                arena.free(ShmPtr::from_offset(start)).unwrap();
                assert!(
                    arena.free(ShmPtr::from_offset(start)).is_err(),
                    "double free accepted"
                );
            }
            _ => {
                let bogus = u64::from(a) << 20 | u64::from(b) << 12 | u64::from(c);
                if !live.contains_key(&bogus) {
                    assert!(
                        arena.free(ShmPtr::from_offset(bogus)).is_err(),
                        "bogus free accepted"
                    );
                }
            }
        }
    }
    for (&start, _) in &live {
        arena.free(ShmPtr::from_offset(start)).unwrap();
    }
    let stats = arena
        .audit()
        .unwrap_or_else(|e| panic!("tables disagree: {e}"));
    assert_eq!(stats.in_use_bytes(), 0);
});
