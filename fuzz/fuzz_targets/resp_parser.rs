//! The key-value example's RESP parser gets bytes straight from clients:
//! it never panics, never claims more bytes than it was given, makes
//! progress on every complete command, and re-parses a re-encoded command
//! to the same arguments.
#![no_main]

#[path = "../../examples/kvstore/resp.rs"]
#[allow(dead_code)]
mod resp;

use libfuzzer_sys::fuzz_target;
use resp::Parsed;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    let mut ranges = Vec::new();
    while at < data.len() {
        match resp::parse(&data[at..], &mut ranges) {
            Parsed::Command(used) => {
                assert!(used > 0 && at + used <= data.len());
                assert!(ranges.iter().all(|r| r.start <= r.end && r.end <= used));
                let args = resp::owned(&data[at..], &ranges);
                let mut encoded = format!("*{}\r\n", args.len()).into_bytes();
                for a in &args {
                    encoded.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                    encoded.extend_from_slice(a);
                    encoded.extend_from_slice(b"\r\n");
                }
                let mut again = Vec::new();
                assert_eq!(resp::parse(&encoded, &mut again), Parsed::Command(encoded.len()));
                assert_eq!(resp::owned(&encoded, &again), args);
                at += used;
            }
            Parsed::Incomplete | Parsed::Error(_) => break,
        }
    }
});
