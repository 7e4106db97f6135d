//! Integration tests across crates: one test binary, a module per area.

mod cluster;
mod concurrency;
mod crash;
mod flood;
mod fuzz;
mod hostile;
mod integrity;
mod ledger_smoke;
mod model;
mod net_support;
mod network;
mod network_auth;
mod network_batch;
mod network_frames;
mod network_outcomes;
mod regressions;
mod storage_faults;
mod support;
