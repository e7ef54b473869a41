// A closure source has made no async-signal-safety promise: the in-thread
// and proactive drivers (which run it inside a SIGBUS handler) refuse it at
// compile time.
use std::sync::Arc;

use hugearena::populate::{Driver, FnSource, PopulateOptions, Populator};
use hugearena::{Region, RegionOptions};

fn main() {
    let region = Arc::new(Region::create(RegionOptions::new(4 << 20)).unwrap());
    let source = FnSource(|_index: u64, dst: &mut [u8]| {
        dst.fill(1);
        Ok(())
    });
    let options = PopulateOptions::new().driver(Driver::InThread);
    let _ = Populator::with_options(region, source, options);
}
