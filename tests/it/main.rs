//! Integration tests across crates: one test binary, a module per area.

mod concurrency;
mod ledger_smoke;
mod model;
mod net_support;
mod network;
mod network_auth;
mod network_frames;
mod network_outcomes;
mod regressions;
mod support;
