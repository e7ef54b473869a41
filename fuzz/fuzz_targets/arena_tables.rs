//! An arena's tables live in shared memory that another process (or a bug,
//! or a damaged restore) may have scribbled on. Whatever the table words
//! say, allocating, freeing, `stats`, `audit`, release and `local` return
//! results, never panic and never loop without end (libFuzzer's timeout
//! catches a hang). The input is a list of patches (word index, value)
//! applied to the tables of an arena holding some allocations, then a
//! sequence of operations.
#![no_main]

use std::alloc::Layout;

use hugearena::populate::{Driver, PopulateOptions};
use hugearena::{Arena, BackendKind, RegionOptions, ShmPtr};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    // Handler threads: the fuzzer keeps its own SIGBUS handler.
    let populate = PopulateOptions::new().driver(Driver::HandlerThreads(1));
    let options = RegionOptions::new(SIZE).backend(BackendKind::Shmem);
    let a = Arena::create(options, populate).expect("arena (run as root)");
    let small = Layout::from_size_align(48, 8).unwrap();
    let mut live: Vec<ShmPtr> = (0..64).map(|_| a.alloc(small).unwrap()).collect();
    live.push(a.alloc_bytes(100 << 10).unwrap());
    live.push(a.alloc_bytes(3 << 20).unwrap());
    for p in live.iter().step_by(3) {
        let _ = a.free(*p);
    }

    // Patches: 2 bytes of word index (past the header's identity words),
    // 8 bytes of value; a byte of 0xFF ends them.
    let words = (a.stats().meta_bytes / 8 - 4) as usize;
    let mut rest = data;
    while let Some((&tag, tail)) = rest.split_first() {
        if tag == 0xFF || tail.len() < 10 {
            rest = tail;
            break;
        }
        let index = 4 + usize::from(u16::from_le_bytes([tail[0], tail[1]])) % words;
        let value = u64::from_le_bytes(tail[2..10].try_into().unwrap());
        // Small values are the plausible ones: keep some of them small.
        let value = if tag & 1 == 0 { value % 4096 } else { value };
        a.region()
            .write_via_primary(index * 8, &value.to_le_bytes())
            .unwrap();
        rest = &tail[10..];
    }

    for op in rest.chunks(3) {
        let x = u64::from(op[0]) << 16
            | u64::from(op.get(1).copied().unwrap_or(0)) << 8
            | u64::from(op.get(2).copied().unwrap_or(0));
        match op[0] % 7 {
            0 => drop(a.alloc(small)),
            1 => drop(a.alloc_bytes((x % (3 << 20)) as usize + 1)),
            2 => drop(live.get(x as usize % live.len()).map(|p| a.free(*p))),
            3 => drop(a.free(ShmPtr::from_offset(x * 8 % SIZE))),
            4 => drop(a.stats()),
            5 => drop(a.local(ShmPtr::from_offset(x << 8))),
            _ => {
                a.release_free_blocks();
                drop(a.audit());
            }
        }
    }
});
