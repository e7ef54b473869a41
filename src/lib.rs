#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod arena;
pub mod backend;
pub mod error;
pub mod persist;
pub mod populate;
pub mod probe;
pub mod region;
pub mod sync;
pub mod sys;

pub use arena::{Arena, ArenaStats, ReleasePolicy, ShmPtr};
pub use backend::{Backend, BackendChoice, BackendKind, BackendRequest, HugePages};
pub use error::{Error, Result};
pub use probe::KernelCaps;
pub use region::{Region, RegionOptions};
pub use sys::size::PageSize;
