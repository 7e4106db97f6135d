//! Cross-crate integration and property tests live in `it/`.
