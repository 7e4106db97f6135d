//! Cross-crate integration and property tests live in `it/`. This library
//! holds what outlives one test run: the fuzz targets that `fuzz/` (cargo-fuzz)
//! and the bounded in-test run in `it/fuzz.rs` share.

pub mod fuzz_targets;
