//! Benchmarks run by `cargo xtask bench ...`. Each one is bounded in count
//! and time and cleans up after itself through the same guards as tests.

pub mod apply;
pub mod attack;
pub mod datapath;
pub mod failover;
pub mod flood;
pub mod forward;
pub mod http;
pub mod load;
pub mod report;
pub mod rest;
