//! The arena: allocation in shared memory, offsets that mean the same in
//! every process, roots, statistics, audit, snapshots and restore.

use std::alloc::Layout;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::AtomicU64;

use hugearena::persist::{self, SnapshotInfo};
use hugearena::{Arena, ArenaStats, ShmPtr};

use crate::error::{Failure, guard};
use crate::ffi::{arg, copy_out, opt, path, put};
use crate::region::{
    hugearena_populate_options, hugearena_populator, hugearena_region, hugearena_region_options,
    populate_options, region_options,
};

/// A location in an arena: the same value in every process that opens the
/// arena (an offset with the arena's tag). 0 is the null location.
pub type hugearena_ptr = u64;

/// An arena mapped in this process.
#[derive(Debug)]
pub struct hugearena_arena {
    arena: Arena,
    /// The arena's region, handed out by `hugearena_arena_region`.
    region: hugearena_region,
}

impl hugearena_arena {
    fn new(arena: Arena) -> *mut hugearena_arena {
        let region = hugearena_region {
            region: arena.region().clone(),
        };
        Box::into_raw(Box::new(hugearena_arena { arena, region }))
    }
}

/// What an arena holds.
#[repr(C)]
#[derive(Debug, Default)]
pub struct hugearena_arena_stats {
    /// Bytes of the region's data.
    pub data_bytes: u64,
    /// Bytes taken by the arena's own tables.
    pub meta_bytes: u64,
    /// Bytes in live allocations (their size classes and whole pages).
    pub in_use_bytes: u64,
    /// Bytes of blocks holding allocations (in use or cached).
    pub held_bytes: u64,
    /// Live small objects.
    pub small_objects: u64,
    /// Live page runs.
    pub runs: u64,
    /// Live large allocations.
    pub large_allocs: u64,
    /// Free small objects in spans that threads' caches own (only their
    /// owner hands them out until it flushes or exits).
    pub cached_objects: u64,
    /// Free blocks whose pages may still be resident.
    pub free_dirty_blocks: u64,
    /// Free blocks with no resident pages.
    pub free_clean_blocks: u64,
}

impl From<&ArenaStats> for hugearena_arena_stats {
    fn from(s: &ArenaStats) -> Self {
        hugearena_arena_stats {
            data_bytes: s.data_bytes,
            meta_bytes: s.meta_bytes,
            in_use_bytes: s.in_use_bytes(),
            held_bytes: s.held_bytes(),
            small_objects: s.small_objects,
            runs: s.runs,
            large_allocs: s.large_allocs,
            cached_objects: s.cached_objects,
            free_dirty_blocks: s.free_dirty_blocks,
            free_clean_blocks: s.free_clean_blocks,
        }
    }
}

/// What a snapshot wrote.
#[repr(C)]
#[derive(Debug, Default)]
pub struct hugearena_snapshot_info {
    /// Granules of the region.
    pub granules: u64,
    /// Granules present (written into the file or a parent).
    pub present: u64,
    /// Bytes of data written.
    pub data_bytes: u64,
    /// Length of the snapshot file.
    pub file_len: u64,
    /// Wall time it took, in nanoseconds.
    pub elapsed_ns: u64,
}

impl From<&SnapshotInfo> for hugearena_snapshot_info {
    fn from(s: &SnapshotInfo) -> Self {
        hugearena_snapshot_info {
            granules: s.granules,
            present: s.present,
            data_bytes: s.data_bytes,
            file_len: s.file_len,
            elapsed_ns: u64::try_from(s.elapsed.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

/// Creates a region and formats an arena in it (pages fill with zeroes on
/// first touch).
///
/// # Safety
///
/// `region_opts` and `populate_opts` are NULL or valid; `out` is valid for
/// a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_create(
    region_opts: *const hugearena_region_options,
    populate_opts: *const hugearena_populate_options,
    out: *mut *mut hugearena_arena,
) -> c_int {
    guard("hugearena_arena_create", || {
        // SAFETY: the caller's contract.
        let ropts = region_options(unsafe { opt(region_opts) })?;
        // SAFETY: the caller's contract.
        let popts = populate_options(unsafe { opt(populate_opts) })?;
        let arena = Arena::create(ropts, popts)?;
        // SAFETY: the caller's contract.
        unsafe { put(out, hugearena_arena::new(arena), "out") }
    })
}

/// Opens the arena another process created, by its region's path.
///
/// # Safety
///
/// `region_path` is a NUL-terminated string; `populate_opts` is NULL or
/// valid; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_open(
    region_path: *const c_char,
    populate_opts: *const hugearena_populate_options,
    out: *mut *mut hugearena_arena,
) -> c_int {
    guard("hugearena_arena_open", || {
        // SAFETY: the caller's contract.
        let p = unsafe { path(region_path, "path") }?;
        // SAFETY: the caller's contract.
        let popts = populate_options(unsafe { opt(populate_opts) })?;
        let arena = Arena::open(p, popts)?;
        // SAFETY: the caller's contract.
        unsafe { put(out, hugearena_arena::new(arena), "out") }
    })
}

/// Restores the arena saved in a snapshot file into a new anonymous region
/// and returns at once: pages fill from the file, verified, on first touch.
///
/// # Safety
///
/// `snapshot_path` is a NUL-terminated string; `populate_opts` is NULL or
/// valid; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_restore(
    snapshot_path: *const c_char,
    populate_opts: *const hugearena_populate_options,
    out: *mut *mut hugearena_arena,
) -> c_int {
    guard("hugearena_arena_restore", || {
        // SAFETY: the caller's contract.
        let p = unsafe { path(snapshot_path, "snapshot_path") }?;
        // SAFETY: the caller's contract.
        let popts = populate_options(unsafe { opt(populate_opts) })?;
        let arena = Arena::attach(persist::restore(p, popts)?)?;
        // SAFETY: the caller's contract.
        unsafe { put(out, hugearena_arena::new(arena), "out") }
    })
}

/// Formats a new arena in a populator's region (`format` nonzero), or
/// attaches to the arena already there (`format` zero). Takes the
/// populator: do not use or free it afterwards, even on failure.
///
/// # Safety
///
/// `populator` is a handle from this library; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_from_populator(
    populator: *mut hugearena_populator,
    format: c_int,
    out: *mut *mut hugearena_arena,
) -> c_int {
    guard("hugearena_arena_from_populator", || {
        if populator.is_null() {
            return Err(Failure::invalid("populator is NULL"));
        }
        // SAFETY: the caller's contract: a handle from `Box::into_raw`,
        // given up by the caller.
        let p = unsafe { Box::from_raw(populator) }.populator;
        let arena = if format != 0 {
            Arena::format(p)?
        } else {
            Arena::attach(p)?
        };
        // SAFETY: the caller's contract.
        unsafe { put(out, hugearena_arena::new(arena), "out") }
    })
}

/// Unmaps the arena from this process (its memory stays while another
/// process has it open). NULL is ignored.
///
/// # Safety
///
/// `arena` is NULL or a handle from this library, not used again; no
/// pointer into it is used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_close(arena: *mut hugearena_arena) {
    if !arena.is_null() {
        // SAFETY: the caller's contract: a handle from `Box::into_raw`.
        drop(unsafe { Box::from_raw(arena) });
    }
}

/// The arena's region (valid while the arena is open; not to be freed).
///
/// # Safety
///
/// `arena` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_region(
    arena: *const hugearena_arena,
) -> *const hugearena_region {
    // SAFETY: the caller's contract.
    match unsafe { opt(arena) } {
        Some(a) => &a.region,
        None => std::ptr::null(),
    }
}

/// Allocates `size` bytes aligned to `align` (a power of two; 0 means 16).
/// `*out` is the allocation's location.
///
/// # Safety
///
/// `arena` is a valid handle; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_alloc(
    arena: *const hugearena_arena,
    size: usize,
    align: usize,
    out: *mut hugearena_ptr,
) -> c_int {
    guard("hugearena_alloc", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        let align = if align == 0 { 16 } else { align };
        let layout = Layout::from_size_align(size, align).map_err(|_| {
            Failure::invalid(format!(
                "alignment {align} is not a power of two, or {size} bytes overflow it"
            ))
        })?;
        let p = a.arena.alloc(layout)?;
        // SAFETY: the caller's contract.
        unsafe { put(out, p.to_bits(), "out") }
    })
}

/// Frees an allocation, from any process. A double free, a location that
/// is not a live allocation, or another arena's, is refused with
/// `HUGEARENA_E_INVALID_POINTER` and changes nothing.
///
/// # Safety
///
/// `arena` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_free(
    arena: *const hugearena_arena,
    ptr: hugearena_ptr,
) -> c_int {
    guard("hugearena_free", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        a.arena.free(ShmPtr::from_bits(ptr))?;
        Ok(())
    })
}

/// This process's address of `ptr`, or NULL (with the last error set) if
/// it is out of the arena or another arena's.
///
/// # Safety
///
/// `arena` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_local(
    arena: *const hugearena_arena,
    ptr: hugearena_ptr,
) -> *mut c_void {
    let mut local = std::ptr::null_mut();
    guard("hugearena_local", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        if ptr == 0 {
            return Err(Failure {
                code: crate::error::HUGEARENA_E_INVALID_POINTER,
                message: "the null location has no address".into(),
            });
        }
        local = a.arena.local(ShmPtr::from_bits(ptr))?.as_ptr().cast();
        Ok(())
    });
    local
}

/// The location of the address `local` in this process, or 0 if it is not
/// inside the arena.
///
/// # Safety
///
/// `arena` is a valid handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_ptr_of(
    arena: *const hugearena_arena,
    local: *const c_void,
) -> hugearena_ptr {
    // SAFETY: the caller's contract.
    match unsafe { opt(arena) } {
        Some(a) => a.arena.shm_ptr(local.cast()).map_or(0, ShmPtr::to_bits),
        None => 0,
    }
}

/// The usable bytes of the live allocation at `ptr` (at least what was
/// asked for).
///
/// # Safety
///
/// `arena` is a valid handle; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_usable_size(
    arena: *const hugearena_arena,
    ptr: hugearena_ptr,
    out: *mut usize,
) -> c_int {
    guard("hugearena_usable_size", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        let n = a.arena.usable_size(ShmPtr::from_bits(ptr))?;
        // SAFETY: the caller's contract.
        unsafe { put(out, n, "out") }
    })
}

/// The arena's root words: `*count` 64-bit words in shared memory, zero in
/// a new arena, where processes publish the locations of their structures.
/// Access them only atomically (`__atomic_load_n(&roots[i],
/// __ATOMIC_ACQUIRE)`, or C11 `atomic_*` on a cast to `_Atomic uint64_t
/// *`). NULL if `arena` is NULL.
///
/// # Safety
///
/// `arena` is a valid handle; `count` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_roots(
    arena: *const hugearena_arena,
    count: *mut usize,
) -> *mut u64 {
    // SAFETY: the caller's contract.
    let Some(a) = (unsafe { opt(arena) }) else {
        return std::ptr::null_mut();
    };
    let roots: &[AtomicU64] = a.arena.roots();
    if !count.is_null() {
        // SAFETY: the caller's contract.
        unsafe { count.write(roots.len()) };
    }
    AtomicU64::as_ptr(&roots[0])
}

/// The arena's statistics (a scan of its tables).
///
/// # Safety
///
/// `arena` is a valid handle; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_get_stats(
    arena: *const hugearena_arena,
    out: *mut hugearena_arena_stats,
) -> c_int {
    guard("hugearena_arena_get_stats", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        // SAFETY: the caller's contract.
        unsafe { put(out, (&a.arena.stats()).into(), "out") }
    })
}

/// Checks the arena's tables for consistency (every page booked once, every
/// count matching its bitmap) and returns the statistics. A defect is
/// `HUGEARENA_E_CORRUPT`, named in the last error.
///
/// # Safety
///
/// `arena` is a valid handle; `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_audit(
    arena: *const hugearena_arena,
    out: *mut hugearena_arena_stats,
) -> c_int {
    guard("hugearena_arena_audit", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        let stats = a.arena.audit().map_err(|e| Failure {
            code: crate::error::HUGEARENA_E_CORRUPT,
            message: format!("the arena's tables are inconsistent: {e}"),
        })?;
        if !out.is_null() {
            // SAFETY: the caller's contract.
            unsafe { put(out, (&stats).into(), "out") }?;
        }
        Ok(())
    })
}

/// Writes a snapshot of the arena to `snapshot_path` (the file is replaced
/// atomically). `info` (if not NULL) says what was written.
///
/// # Safety
///
/// `arena` is a valid handle; `snapshot_path` is a NUL-terminated string;
/// `info` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_snapshot(
    arena: *const hugearena_arena,
    snapshot_path: *const c_char,
    info: *mut hugearena_snapshot_info,
) -> c_int {
    guard("hugearena_arena_snapshot", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        // SAFETY: the caller's contract.
        let p = unsafe { path(snapshot_path, "snapshot_path") }?;
        let written = a.arena.snapshot(p)?;
        if !info.is_null() {
            // SAFETY: the caller's contract.
            unsafe { put(info, (&written).into(), "info") }?;
        }
        Ok(())
    })
}

/// The arena's population counters in this process.
///
/// # Safety
///
/// `arena` is a valid handle; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_get_populate_stats(
    arena: *const hugearena_arena,
    out: *mut crate::region::hugearena_populate_stats,
) -> c_int {
    guard("hugearena_arena_get_populate_stats", || {
        // SAFETY: the caller's contract.
        let a = unsafe { arg(arena, "arena") }?;
        // SAFETY: the caller's contract.
        unsafe {
            put(
                out,
                crate::region::populate_stats(a.arena.populator()),
                "out",
            )
        }
    })
}

/// The path another process opens this arena by (`hugearena_arena_open`),
/// copied into `buf` as `snprintf` does. Returns the whole length.
///
/// # Safety
///
/// `arena` is a valid handle; `buf` is NULL or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_arena_shareable_path(
    arena: *const hugearena_arena,
    buf: *mut c_char,
    len: usize,
) -> usize {
    // SAFETY: the caller's contract.
    match unsafe { opt(arena) } {
        // SAFETY: the caller's contract.
        Some(a) => unsafe {
            copy_out(
                &a.arena.region().shareable_path().to_string_lossy(),
                buf,
                len,
            )
        },
        None => 0,
    }
}
