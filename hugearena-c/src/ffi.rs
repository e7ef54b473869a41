//! Reading what C passes in and writing what it gets back: the checks every
//! exported function makes before it trusts a pointer.

use std::ffi::{CStr, c_char};
use std::path::PathBuf;

use crate::error::Failure;

/// `ptr` as a reference, or an error naming `what` if it is NULL.
///
/// # Safety
///
/// A non-NULL `ptr` points to a valid `T` for `'a`.
pub(crate) unsafe fn arg<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// `ptr` as a reference, or `None` if it is NULL (an optional argument).
///
/// # Safety
///
/// As [`arg`].
pub(crate) unsafe fn opt<'a, T>(ptr: *const T) -> Option<&'a T> {
    // SAFETY: the caller's contract.
    unsafe { ptr.as_ref() }
}

/// Writes `value` to the out-parameter `out`.
///
/// # Safety
///
/// A non-NULL `out` is valid for a write of `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and, by the caller's contract, valid for writes.
    unsafe { out.write(value) };
    Ok(())
}

/// The path in the NUL-terminated string `ptr`.
///
/// # Safety
///
/// A non-NULL `ptr` points to a NUL-terminated string.
pub(crate) unsafe fn path(ptr: *const c_char, what: &str) -> Result<PathBuf, Failure> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    if bytes.is_empty() {
        return Err(Failure::invalid(format!("{what} is an empty string")));
    }
    Ok(PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes),
    ))
}

/// Copies `text` into the caller's buffer as `snprintf` does: at most
/// `len - 1` bytes and a NUL; returns the length of the whole text, so a
/// caller whose buffer was too small knows how much to allocate.
///
/// # Safety
///
/// A non-NULL `buf` is valid for writes of `len` bytes.
pub(crate) unsafe fn copy_out(text: &str, buf: *mut c_char, len: usize) -> usize {
    if !buf.is_null() && len > 0 {
        let n = text.len().min(len - 1);
        // SAFETY: `n + 1 <= len` bytes of `buf` are writable (the caller's
        // contract) and `text` does not overlap memory the caller owns.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    text.len()
}
