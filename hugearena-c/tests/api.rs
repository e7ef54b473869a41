//! The C interface called as C calls it: handles, out-parameters, status
//! codes and the thread's last error, on the real kernel.

use std::ffi::{CStr, CString, c_int, c_void};
use std::ptr;

use hugearena_c::*;

fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by this thread.
    unsafe { CStr::from_ptr(hugearena_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn ok(status: c_int) {
    assert_eq!(status, HUGEARENA_OK, "{}", last_error());
}

fn region_options(size: u64) -> hugearena_region_options {
    hugearena_region_options {
        size,
        path: ptr::null(),
        huge_pages: HUGEARENA_HUGE_PAGES_OFF,
        backend: HUGEARENA_BACKEND_AUTO,
        huge_page_size: 0,
    }
}

fn new_arena(size: u64) -> *mut hugearena_arena {
    let mut a = ptr::null_mut();
    // SAFETY: valid options and out-parameter.
    ok(unsafe { hugearena_arena_create(&region_options(size), ptr::null(), &mut a) });
    a
}

#[test]
fn allocation_free_and_locations_work_and_a_double_free_is_refused() {
    let a = new_arena(64 << 20);
    let mut p = 0;
    // SAFETY: `a` is a live arena; `p` a valid out-parameter.
    unsafe {
        ok(hugearena_alloc(a, 1000, 64, &mut p));
        let local = hugearena_local(a, p);
        assert!(!local.is_null());
        assert_eq!(local as usize % 64, 0, "the alignment asked for");
        ptr::write_bytes(local.cast::<u8>(), 0x5A, 1000);
        assert_eq!(hugearena_ptr_of(a, local), p);
        let mut usable = 0;
        ok(hugearena_usable_size(a, p, &mut usable));
        assert!(usable >= 1000);
        ok(hugearena_free(a, p));
        assert_eq!(hugearena_free(a, p), HUGEARENA_E_INVALID_POINTER);
        assert!(
            last_error().starts_with("hugearena_free: invalid free"),
            "{}",
            last_error()
        );
        assert_eq!(hugearena_last_error_code(), HUGEARENA_E_INVALID_POINTER);
        assert_eq!(hugearena_free(a, 12345), HUGEARENA_E_INVALID_POINTER);
        assert!(hugearena_local(a, 0).is_null());
        assert_eq!(
            hugearena_alloc(a, 10, 3, &mut p),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("not a power of two"),
            "{}",
            last_error()
        );
        let mut stats = hugearena_arena_stats::default();
        ok(hugearena_arena_audit(a, &mut stats));
        assert_eq!(stats.small_objects, 0);
        hugearena_arena_close(a);
    }
}

#[test]
fn null_handles_and_out_parameters_are_errors_not_crashes() {
    let mut p = 0;
    // SAFETY: NULL is what is being tested; every other pointer is valid.
    unsafe {
        assert_eq!(
            hugearena_alloc(ptr::null(), 8, 0, &mut p),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        assert_eq!(last_error(), "hugearena_alloc: arena is NULL");
        assert_eq!(
            hugearena_arena_create(ptr::null(), ptr::null(), ptr::null_mut()),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        let a = new_arena(16 << 20);
        assert_eq!(
            hugearena_alloc(a, 8, 0, ptr::null_mut()),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        assert!(hugearena_roots(ptr::null(), ptr::null_mut()).is_null());
        assert_eq!(
            hugearena_arena_open(ptr::null(), ptr::null(), ptr::null_mut()),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        hugearena_arena_close(a);
        hugearena_arena_close(ptr::null_mut());
        hugearena_region_free(ptr::null_mut());
        hugearena_populator_free(ptr::null_mut());
    }
}

#[test]
fn bad_options_name_what_is_wrong() {
    let mut a = ptr::null_mut();
    let mut o = region_options(0);
    // SAFETY: valid pointers throughout.
    unsafe {
        assert_eq!(
            hugearena_arena_create(&o, ptr::null(), &mut a),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("region size is 0"),
            "{}",
            last_error()
        );
        o.size = 1 << 20;
        o.huge_pages = 7;
        assert_eq!(
            hugearena_arena_create(&o, ptr::null(), &mut a),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        assert!(last_error().contains("huge_pages 7"), "{}", last_error());
        o.huge_pages = HUGEARENA_HUGE_PAGES_OFF;
        o.backend = 9;
        assert_eq!(
            hugearena_arena_create(&o, ptr::null(), &mut a),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        let missing = CString::new("/nonexistent/hugearena-region").unwrap();
        assert_eq!(
            hugearena_arena_open(missing.as_ptr(), ptr::null(), &mut a),
            HUGEARENA_E_NOT_FOUND
        );
        assert!(
            last_error().contains("/nonexistent/hugearena-region"),
            "{}",
            last_error()
        );
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), vec![0x42u8; 1 << 16]).unwrap();
        let junk_path = CString::new(junk.path().to_str().unwrap()).unwrap();
        assert_eq!(
            hugearena_arena_restore(junk_path.as_ptr(), ptr::null(), &mut a),
            HUGEARENA_E_CORRUPT
        );
        assert!(a.is_null(), "no handle on failure");
    }
    // SAFETY: a static string.
    let name = unsafe { CStr::from_ptr(hugearena_status_name(HUGEARENA_E_CORRUPT)) };
    assert_eq!(name.to_str().unwrap(), "HUGEARENA_E_CORRUPT");
}

#[test]
fn the_last_error_is_per_thread() {
    // SAFETY: NULL is what is being tested.
    unsafe { hugearena_free(ptr::null(), 1) };
    let other = std::thread::spawn(|| {
        let mut p = 0;
        // SAFETY: as above.
        unsafe { hugearena_alloc(ptr::null(), 1, 0, &mut p) };
        last_error()
    })
    .join()
    .unwrap();
    assert_eq!(other, "hugearena_alloc: arena is NULL");
    assert_eq!(last_error(), "hugearena_free: arena is NULL");
}

#[test]
fn roots_are_shared_with_a_second_mapping_of_the_arena() {
    let a = new_arena(16 << 20);
    let mut path = vec![0 as std::ffi::c_char; 4096];
    // SAFETY: live arena, buffers of the lengths given.
    unsafe {
        let n = hugearena_arena_shareable_path(a, path.as_mut_ptr(), path.len());
        assert!(n > 0 && n < path.len());
        let mut b = ptr::null_mut();
        ok(hugearena_arena_open(path.as_ptr(), ptr::null(), &mut b));
        let mut count = 0;
        let roots = hugearena_roots(a, &mut count);
        assert!(count >= 4, "{count} roots");
        let mut p = 0;
        ok(hugearena_alloc(a, 64, 0, &mut p));
        std::sync::atomic::AtomicU64::from_ptr(roots.add(3))
            .store(p, std::sync::atomic::Ordering::Release);
        let seen =
            std::sync::atomic::AtomicU64::from_ptr(hugearena_roots(b, ptr::null_mut()).add(3))
                .load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(seen, p);
        // Freed through the other mapping: the same arena.
        ok(hugearena_free(b, seen));
        assert_eq!(hugearena_free(a, p), HUGEARENA_E_INVALID_POINTER);
        hugearena_arena_close(b);
        hugearena_arena_close(a);
    }
}

/// Fills granule `index` with its index's low byte; counts calls.
unsafe extern "C" fn fill_with_index(
    ctx: *mut c_void,
    index: u64,
    dst: *mut u8,
    len: usize,
) -> c_int {
    // SAFETY: `ctx` is the test's counter; `dst` is valid for `len` bytes.
    unsafe {
        (*ctx.cast::<std::sync::atomic::AtomicU64>())
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if index == 13 {
            return libc::EIO;
        }
        ptr::write_bytes(dst, index as u8, len);
    }
    0
}

fn callback_source(ctx: *mut c_void, signal_safe: c_int) -> hugearena_source {
    hugearena_source {
        kind: HUGEARENA_SOURCE_CALLBACK,
        path: ptr::null(),
        offset: 0,
        fill: Some(fill_with_index),
        ctx,
        signal_safe,
    }
}

#[test]
fn a_callback_source_fills_pages_once_and_a_failure_names_its_errno() {
    for (signal_safe, driver) in [
        (1, HUGEARENA_DRIVER_DEFAULT),
        (0, HUGEARENA_DRIVER_DEFAULT),
        (1, HUGEARENA_DRIVER_PROACTIVE),
    ] {
        let calls = std::sync::atomic::AtomicU64::new(0);
        let mut region = ptr::null_mut();
        let mut populator = ptr::null_mut();
        let source = callback_source((&raw const calls).cast_mut().cast(), signal_safe);
        let popts = hugearena_populate_options {
            driver,
            handler_threads: 0,
            readahead: -1,
            fill_timeout_ms: 0,
        };
        // SAFETY: valid options, source and out-parameters; `calls`
        // outlives the populator.
        unsafe {
            ok(hugearena_region_create(
                &region_options(4 << 20),
                &mut region,
            ));
            ok(hugearena_populator_new(
                region,
                &source,
                &popts,
                &mut populator,
            ));
            ok(hugearena_populator_populate(populator, 0, 8 * 4096));
            let base = hugearena_region_base(region);
            for i in 0..8u64 {
                assert_eq!(*base.add(i as usize * 4096 + 100), i as u8);
            }
            assert_eq!(hugearena_populator_is_present(populator, 5 * 4096), 1);
            assert_eq!(hugearena_populator_is_present(populator, 20 * 4096), 0);
            if driver != HUGEARENA_DRIVER_PROACTIVE {
                // A first touch fills the page: in the faulting thread's
                // SIGBUS handler (signal-safe), or by a handler thread.
                assert_eq!(ptr::read_volatile(base.add(20 * 4096 + 7)), 20);
                // Published before the faulting thread was woken: a
                // write-back or snapshot right after the touch sees it.
                assert_eq!(hugearena_populator_is_present(populator, 20 * 4096), 1);
            }
            // The failing page is poisoned (touching it raises SIGBUS);
            // the call itself succeeds and the failure is reported.
            ok(hugearena_populator_populate(populator, 13 * 4096, 4096));
            assert_eq!(hugearena_populator_is_present(populator, 13 * 4096), 0);
            let mut text = vec![0 as std::ffi::c_char; 1024];
            hugearena_populator_errors(populator, text.as_mut_ptr(), text.len());
            let errors = CStr::from_ptr(text.as_ptr()).to_string_lossy().into_owned();
            assert!(
                errors.contains("Input/output error") || errors.contains("EIO"),
                "{errors}"
            );
            let mut stats = hugearena_populate_stats::default();
            ok(hugearena_populator_get_stats(populator, &mut stats));
            let touched = u64::from(driver != HUGEARENA_DRIVER_PROACTIVE);
            assert_eq!(stats.fills, 8 + touched, "each page filled once");
            if signal_safe == 1 && driver == HUGEARENA_DRIVER_DEFAULT {
                assert_eq!(stats.faults_in_thread, 1, "resolved in the faulting thread");
            } else if signal_safe == 0 {
                assert_eq!(stats.faults_handler, 1, "resolved by a handler thread");
            }
            assert_eq!(stats.poisoned, 1);
            hugearena_populator_free(populator);
            hugearena_region_free(region);
        }
    }
    // The in-thread driver refuses a callback not declared signal-safe.
    let mut region = ptr::null_mut();
    let mut populator = ptr::null_mut();
    let source = callback_source(ptr::null_mut(), 0);
    let popts = hugearena_populate_options {
        driver: HUGEARENA_DRIVER_IN_THREAD,
        handler_threads: 0,
        readahead: 0,
        fill_timeout_ms: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        ok(hugearena_region_create(
            &region_options(4 << 20),
            &mut region,
        ));
        assert_eq!(
            hugearena_populator_new(region, &source, &popts, &mut populator),
            HUGEARENA_E_INVALID_ARGUMENT
        );
        assert!(last_error().contains("signal_safe"), "{}", last_error());
        hugearena_region_free(region);
    }
}

#[test]
fn a_file_store_takes_written_back_pages_and_refills_them_after_a_discard() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![7u8; 1 << 20]).unwrap();
    let path = CString::new(file.path().to_str().unwrap()).unwrap();
    let source = hugearena_source {
        kind: HUGEARENA_SOURCE_FILE_STORE,
        path: path.as_ptr(),
        offset: 0,
        fill: None,
        ctx: ptr::null_mut(),
        signal_safe: 0,
    };
    let mut o = region_options(1 << 20);
    o.backend = HUGEARENA_BACKEND_SHMEM;
    let (mut region, mut populator) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: valid pointers; the region is 1 MiB.
    unsafe {
        ok(hugearena_region_create(&o, &mut region));
        ok(hugearena_populator_new(
            region,
            &source,
            ptr::null(),
            &mut populator,
        ));
        ok(hugearena_populator_populate(populator, 0, 4096));
        let base = hugearena_region_base(region);
        assert_eq!(*base, 7);
        ptr::write_bytes(base, 9, 4096);
        ok(hugearena_populator_write_back(populator, 0, 4096));
        ok(hugearena_populator_sync(populator));
        ok(hugearena_populator_discard(populator, 0, 4096));
        assert_eq!(hugearena_populator_is_present(populator, 0), 0);
        ok(hugearena_populator_populate(populator, 0, 4096));
        assert_eq!(*base.add(4095), 9);
        hugearena_populator_free(populator);
        hugearena_region_free(region);
    }
    assert_eq!(std::fs::read(file.path()).unwrap()[..4096], [9u8; 4096]);
}

#[test]
fn a_snapshot_restores_into_a_new_arena() {
    let a = new_arena(16 << 20);
    let dir = tempfile::tempdir().unwrap();
    let snap = CString::new(dir.path().join("snap").to_str().unwrap()).unwrap();
    // SAFETY: live arenas, valid pointers.
    unsafe {
        let mut p = 0;
        ok(hugearena_alloc(a, 4096, 0, &mut p));
        ptr::write_bytes(hugearena_local(a, p).cast::<u8>(), 0xC3, 4096);
        std::sync::atomic::AtomicU64::from_ptr(hugearena_roots(a, ptr::null_mut()))
            .store(p, std::sync::atomic::Ordering::Release);
        let mut info = hugearena_snapshot_info::default();
        ok(hugearena_arena_snapshot(a, snap.as_ptr(), &mut info));
        assert!(info.present > 0 && info.file_len > 0);
        hugearena_arena_close(a);
        let mut b = ptr::null_mut();
        ok(hugearena_arena_restore(snap.as_ptr(), ptr::null(), &mut b));
        let q = std::sync::atomic::AtomicU64::from_ptr(hugearena_roots(b, ptr::null_mut()))
            .load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(q, p);
        assert_eq!(*hugearena_local(b, q).cast::<u8>().add(4095), 0xC3);
        ok(hugearena_arena_audit(b, ptr::null_mut()));
        hugearena_arena_close(b);
    }
}

#[test]
fn the_probe_reports_and_plans() {
    let mut buf = vec![0 as std::ffi::c_char; 1 << 16];
    // SAFETY: buffers of the lengths given.
    unsafe {
        let n = hugearena_probe_report(buf.as_mut_ptr(), buf.len());
        assert!(n > 0 && n < buf.len());
        let text = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        assert!(text.contains("userfaultfd"), "{text}");
        // Too small a buffer: cut, terminated, and the full length told.
        let mut small = [0x7f as std::ffi::c_char; 8];
        assert_eq!(hugearena_probe_report(small.as_mut_ptr(), small.len()), n);
        assert_eq!(small[7], 0);
        let mut backend = -1;
        ok(hugearena_probe_plan(
            64 << 20,
            HUGEARENA_HUGE_PAGES_OFF,
            &mut backend,
            buf.as_mut_ptr(),
            buf.len(),
        ));
        assert!(
            backend == HUGEARENA_BACKEND_SHMEM_THP || backend == HUGEARENA_BACKEND_SHMEM,
            "{backend}"
        );
        assert!(CStr::from_ptr(buf.as_ptr()).to_bytes().len() > 10);
        assert_eq!(
            hugearena_probe_plan(64 << 20, 5, &mut backend, ptr::null_mut(), 0),
            HUGEARENA_E_INVALID_ARGUMENT
        );
    }
}
