//! Benchmarks. Each one owns its workload, its measurements and its report;
//! [`hardware`] and [`memory`] measure the machine the figures should be read
//! against.

pub mod cluster;
pub mod core;
pub mod e2e;
pub mod hardware;
pub mod memory;
pub mod threads;
