//! `cargo +nightly fuzz run mutated_frames`: see `tapledger_tests::fuzz_targets::mutated_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tapledger_tests::fuzz_targets::mutated_frames(data));
