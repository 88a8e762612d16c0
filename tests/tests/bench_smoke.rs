//! Quick runs of the peer benchmarks (`cargo xtask bench forward|http`):
//! every system moves traffic to the backend side, and nothing is left
//! behind. Figures from these short runs mean nothing; the benchmarks
//! themselves are `cargo xtask bench ...`.
//!
//! Needs root, nftables, haproxy and wrk: run through `cargo xtask test`.

use failover_tests::{
    bench::{forward, http},
    netns,
};

// One test, so that no other test of this binary owns namespaces while
// the last check looks for leftovers.
#[test]
fn every_system_delivers_traffic_to_the_backends_and_leaves_nothing_behind() {
    let opts = forward::Opts {
        seconds: 0.3,
        ..forward::Opts::default()
    };
    for r in forward::run(opts).unwrap() {
        assert!(r.sent > 0 && r.received > 0, "{r:?}");
        // Nearly everything the generator sends is forwarded (the rest is
        // dropped at a full veth ring when the machine is busy).
        assert!(
            r.received as f64 >= 0.5 * r.sent as f64,
            "{}: {} of {} received",
            r.system,
            r.received,
            r.sent
        );
    }

    let opts = http::Opts {
        seconds: 1,
        ..http::Opts::default()
    };
    let results = http::run(opts).unwrap();
    assert_eq!(results.len(), http::SYSTEMS.len() * http::MODES.len());
    for r in &results {
        assert!(r.requests > 0 && r.rps > 0.0, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
    }
    assert!(netns::none_left(), "a namespace was left behind");
}
