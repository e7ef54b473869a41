//! Futexes on the high half of a 64-bit word in shared memory: a waiter
//! sleeps while the half is unchanged, whoever changes the word wakes it.
//! The operations are the shared (not `FUTEX_PRIVATE`) kind, so waiters in
//! other processes mapping the same file are found and woken.
#![allow(unsafe_code)] // the futex system call

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::error::{Errno, SysError, SysResult};

// The high half of a little-endian u64 is its second 4-byte half.
const _: () = assert!(cfg!(target_endian = "little"));

fn high_half(word: &AtomicU64) -> *const u32 {
    // In bounds of the 8-byte, 8-aligned word: 4-aligned, 4 bytes.
    word.as_ptr().cast::<u32>().cast_const().wrapping_add(1)
}

/// Sleeps while the high half of `word` equals that of `expected`, for at
/// most `timeout`. Returns when woken, when the value differs, on a signal
/// or at the timeout; the caller looks at the word again in every case.
pub(crate) fn wait_high(word: &AtomicU64, expected: u64, timeout: Duration) -> SysResult<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the address is the high half of a live AtomicU64 (4-aligned,
    // readable); FUTEX_WAIT only reads it and compares, atomically in the
    // kernel; `ts` outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            high_half(word),
            libc::FUTEX_WAIT,
            (expected >> 32) as u32,
            &ts as *const libc::timespec,
        )
    };
    if ret == -1 {
        let e = SysError::last("futex(FUTEX_WAIT)");
        if !matches!(e.errno(), Errno::EAGAIN | Errno::ETIMEDOUT | Errno::EINTR) {
            return Err(e);
        }
    }
    Ok(())
}

/// Wakes every waiter sleeping on the high half of `word`, in any process.
pub(crate) fn wake_high(word: &AtomicU64) -> SysResult<()> {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is a live word.
    let ret =
        unsafe { libc::syscall(libc::SYS_futex, high_half(word), libc::FUTEX_WAKE, i32::MAX) };
    if ret == -1 {
        return Err(SysError::last("futex(FUTEX_WAKE)"));
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    #[test]
    fn a_waiter_wakes_on_change_and_times_out_otherwise() {
        let word = std::sync::Arc::new(AtomicU64::new(7 << 32));
        let t = Instant::now();
        wait_high(&word, 7 << 32, Duration::from_millis(30)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(25));
        // A different high half returns at once.
        wait_high(&word, 8 << 32, Duration::from_secs(10)).unwrap();
        let w = word.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            while w.load(Ordering::Acquire) == 7 << 32 {
                wait_high(&w, 7 << 32, Duration::from_secs(10)).unwrap();
            }
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        word.store(9 << 32, Ordering::Release);
        wake_high(&word).unwrap();
        assert!(waiter.join().unwrap() < Duration::from_secs(5));
    }
}
