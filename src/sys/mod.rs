//! The syscall layer: thin, typed wrappers over the kernel interfaces
//! hugearena uses. Nothing outside this module (and the region's
//! shared-memory views) calls libc or nix for memory, files or
//! userfaultfd.

mod error;
pub(crate) mod futex;
pub(crate) mod memfd;
pub(crate) mod mman;
pub(crate) mod pagemap;
pub(crate) mod signal;
pub(crate) mod size;
pub(crate) mod thread;
pub(crate) mod uffd;

pub(crate) use error::SysResult;
pub use error::{Errno, SysError};
