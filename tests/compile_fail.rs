//! What the type system refuses: a page source that has not promised
//! async-signal-safety cannot be given to a driver that runs it inside a
//! SIGBUS handler.

#[test]
fn a_source_that_is_not_signal_safe_cannot_run_in_the_signal_handler() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
