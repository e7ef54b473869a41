//! The C interface to hugearena: `libhugearena.so` / `libhugearena.a` and
//! `include/hugearena.h`.
//!
//! Every function reports failure with a status code (`HUGEARENA_OK` is 0)
//! and leaves the message, which names the fix as the Rust errors do, in
//! [`hugearena_last_error`] for the calling thread. A NULL pointer where a
//! handle or an out-parameter is required is `HUGEARENA_E_INVALID_ARGUMENT`,
//! never a crash; no Rust panic unwinds into C (it becomes
//! `HUGEARENA_E_INTERNAL`).
//!
//! Handles (`hugearena_region`, `hugearena_populator`, `hugearena_arena`)
//! may be used from any thread. Locations in an arena (`hugearena_ptr`) are
//! the same in every process; turn one into this process's address with
//! [`hugearena_local`].
//!
//! [`sqlite`] puts SQLite's page cache on a hugearena arena.
#![allow(non_camel_case_types)]

mod arena;
mod error;
mod ffi;
mod probe;
mod region;
pub mod sqlite;

pub use arena::*;
pub use error::*;
pub use probe::*;
pub use region::*;

/// The library's version, `"MAJOR.MINOR.PATCH"` (a static string).
#[unsafe(no_mangle)]
pub extern "C" fn hugearena_version() -> *const std::ffi::c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
