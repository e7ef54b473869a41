#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
// Unsafe code lives in the few modules that opt in with `allow(unsafe_code)`
// (system calls, the shared views, the signal handler's tables, the arena's
// offset-to-pointer step); every block there carries a `// SAFETY:` comment.
#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod arena;
mod backend;
mod codec;
mod error;
pub mod persist;
pub mod populate;
pub mod probe;
mod region;
mod sync;
mod sys;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pub use arena::{Arena, ArenaDefect, ArenaStats, AuditError, PageOwner, ReleasePolicy, ShmPtr};
pub use backend::{Backend, BackendChoice, BackendKind, HugePages};
pub use codec::HeaderDefect;
pub use error::{Error, Result};
pub use probe::KernelCaps;
pub use region::{BlockAllocation, Region, RegionLayout, RegionOptions};
pub use sys::size::PageSize;
pub use sys::uffd::OpenError;
pub use sys::{Errno, SysError};
