//! `cargo +nightly fuzz run split_frame`: see `tapledger_tests::fuzz_targets::split`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tapledger_tests::fuzz_targets::split(data));
