//! Demand population: who fills a granule (the page-state protocol), what
//! it is filled with (page sources), and who resolves a first touch (the
//! drivers: handler threads, the faulting thread itself, or `populate`).

mod bits;
mod blocks;
mod engine;
pub(crate) mod fork;
mod handlers;
pub(crate) mod owner;
mod populator;
pub(crate) mod promote;
pub(crate) mod readahead;
pub(crate) mod signal;
mod source;
pub(crate) mod state;
mod stats;

pub use populator::{
    DEFAULT_FILL_TIMEOUT, DEFAULT_READAHEAD, Drain, Driver, PopulateOptions, Populator,
};
pub use promote::Promotion;
pub use source::{
    FileSource, FileStore, FillError, FnSource, PageSource, PageStore, SignalSafe,
    SignalSafeSource, SourceError, ZeroSource,
};
pub use state::PageState;
pub use stats::Stats;

#[cfg(all(test, loom))]
mod loom_signal;
#[cfg(all(test, loom))]
mod loom_state;
