//! Demand population: who fills a granule (the page-state protocol), what
//! it is filled with (page sources), and who resolves a first touch (the
//! drivers: handler threads, the faulting thread itself, or `populate`).

mod bits;
mod engine;
pub(crate) mod fork;
mod handlers;
pub mod owner;
mod populator;
pub mod promote;
pub mod readahead;
pub mod signal;
pub mod source;
pub mod state;
pub mod stats;

pub use populator::{
    DEFAULT_FILL_TIMEOUT, DEFAULT_READAHEAD, Drain, Driver, PopulateOptions, Populator,
};
pub use promote::Promotion;
pub use source::{
    FileSource, FillError, FnSource, PageSource, SignalSafe, SignalSafeSource, SourceError,
    ZeroSource,
};
pub use state::{Claim, Owner, PageState};
pub use stats::{Counters, Stats};
