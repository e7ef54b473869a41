//! Plain memory for the kernel-native baselines of the benchmarks.

/// A fresh private anonymous mapping of `len` bytes kept at 4 KiB pages
/// (`MADV_NOHUGEPAGE`); the caller unmaps it.
pub fn anonymous_4k(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; the caller unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: advice on the mapping above; it keeps the baseline at 4 KiB.
    unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
    p.cast()
}
