//! Demand population: who fills a granule (the page-state protocol), what
//! it is filled with (page sources).

pub mod engine;
pub mod owner;
pub mod source;
pub mod state;

pub use engine::{Counters, Populator};
pub use source::{FileSource, FnSource, PageSource, SourceError, ZeroSource};
pub use state::{Claim, Owner, PageState};
