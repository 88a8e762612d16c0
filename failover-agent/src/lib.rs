//! The failover agent: decides which backends may take traffic and programs
//! the XDP data plane accordingly. `main.rs` is a thin CLI over this library.

pub mod agent;
pub mod api;
pub mod audit;
pub mod config;
pub mod dataplane;
pub mod drill;
pub mod health;
pub mod load;
pub mod maglev;
pub mod metrics;
pub mod planner;
