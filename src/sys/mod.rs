//! The syscall layer: thin, typed wrappers over the kernel interfaces
//! hugearena uses. Nothing outside this module (and the region's
//! shared-memory views) calls libc or nix for memory, files or
//! userfaultfd.

mod error;
pub mod futex;
pub mod memfd;
pub mod mman;
pub mod pagemap;
pub mod signal;
pub mod size;
pub mod thread;
pub mod uffd;

pub use error::{Errno, SysError, SysResult};
