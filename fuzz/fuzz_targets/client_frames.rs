//! `cargo +nightly fuzz run client_frames`: see `tapledger_tests::fuzz_targets::client_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tapledger_tests::fuzz_targets::client_frames(data));
