//! Integration tests across crates: one test binary, a module per area.

mod concurrency;
mod ledger_smoke;
mod model;
mod net_support;
mod network;
mod regressions;
mod support;
