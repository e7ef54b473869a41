//! The kernel probe: what this kernel gives hugearena, and what to enable.

use std::ffi::{c_char, c_int};

use hugearena::RegionOptions;
use hugearena::probe::{KernelCaps, Support};

use crate::error::guard;
use crate::ffi::{copy_out, put};
use crate::region::{backend_code, huge_pages_policy};

/// The kernel probe's report, one capability per entry (what was found,
/// what it means for hugearena, and the command that enables what is
/// missing), copied into `buf` as `snprintf` does. Returns the length of
/// the whole text. The probe runs once per process.
///
/// # Safety
///
/// `buf` is NULL or valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_probe_report(buf: *mut c_char, len: usize) -> usize {
    let mut text = String::new();
    let _ = guard("hugearena_probe_report", || {
        for line in KernelCaps::cached().report() {
            text.push_str(&line.to_string());
            text.push('\n');
        }
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { copy_out(&text, buf, len) }
}

/// How many capabilities the probe found missing with nothing to replace
/// them (`unavailable` in the report).
#[unsafe(no_mangle)]
pub extern "C" fn hugearena_probe_unavailable() -> c_int {
    let mut n = 0;
    let _ = guard("hugearena_probe_unavailable", || {
        n = KernelCaps::cached()
            .report()
            .iter()
            .filter(|l| l.support == Support::Unavailable)
            .count() as c_int;
        Ok(())
    });
    n
}

/// The backend a region of `size` bytes would get under the huge page
/// policy `huge_pages` (`*backend`, a `HUGEARENA_BACKEND_*`), and why,
/// copied into `reason` as `snprintf` does (NULL to skip). An error if no
/// backend would do, with the reason and the fix in the last error.
///
/// # Safety
///
/// `backend` is valid for a write; `reason` is NULL or valid for
/// `reason_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hugearena_probe_plan(
    size: u64,
    huge_pages: c_int,
    backend: *mut c_int,
    reason: *mut c_char,
    reason_len: usize,
) -> c_int {
    guard("hugearena_probe_plan", || {
        let policy = huge_pages_policy(huge_pages)?;
        let choice = RegionOptions::new(size)
            .huge_pages(policy)
            .plan(KernelCaps::cached())?;
        // SAFETY: the caller's contract.
        unsafe { put(backend, backend_code(choice.backend.kind()), "backend") }?;
        // SAFETY: the caller's contract.
        unsafe { copy_out(&choice.reason, reason, reason_len) };
        Ok(())
    })
}
