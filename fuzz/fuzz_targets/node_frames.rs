//! `cargo +nightly fuzz run node_frames`: see `tapledger_tests::fuzz_targets::node_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tapledger_tests::fuzz_targets::node_frames(data));
