//! The end-to-end failover cases of `e2e.rs` over IPv6: the client at
//! 2001:db8:c::100 reaches the VIP6 2001:db8:f::10, the agent probes the
//! backends at their IPv6 addresses, and the data plane translates NAT66
//! with the edge's 2001:db8:a::1 as the source. Same topology, config and
//! assertions as IPv4 (`e2e_cases`); the backends are named `a1-6` etc.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first).

mod e2e_cases;

use failover_tests::topology::Family;

const V6: Family = Family::V6;

#[test]
fn ipv6_steady_state_spreads_over_tier_0_and_every_request_succeeds() {
    e2e_cases::steady_state(V6);
}

#[test]
fn ipv6_a_backend_crash_moves_new_flows_to_the_other_backend() {
    e2e_cases::backend_crash(V6);
}

#[test]
fn ipv6_a_lost_cloud_fails_over_resets_its_streams_and_comes_back_without_flapping() {
    e2e_cases::lost_cloud(V6);
}

#[test]
fn ipv6_an_eu_only_service_fails_closed_and_never_reaches_the_us() {
    e2e_cases::eu_only_fails_closed(V6);
}
