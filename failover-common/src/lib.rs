//! Types and constants shared by the XDP program and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so
//! the kernel sees exactly the bytes the agent wrote: implicit padding in a
//! hash key makes lookups miss silently. Fields that hold network-order data
//! end in `_be`.
//!
//! The pure per-packet logic (checksum arithmetic, flow hashing) lives here
//! too, so it is unit tested on the host with plain `cargo test`.
#![no_std]

pub mod checksum;
pub mod hash;
pub mod icmp;
pub mod icmp6;
pub mod maps;
/// Host-side only: the reference model of the verdict for fuzzing.
#[cfg(not(target_arch = "bpf"))]
pub mod model;
pub mod reason;
pub mod tcp;

pub use maps::*;
pub use reason::{Reason, Verdict};
