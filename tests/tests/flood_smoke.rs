//! A quick run of `cargo xtask bench flood` (issue 16): a few idle flows,
//! tiny flood rates, a second each. Every idle flow keeps its pin, a
//! request still passes on the sample, real connections get through, the
//! flood was really sent, and no namespace is left behind. Figures from
//! this short run mean nothing; the benchmark is `cargo xtask bench flood`.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first).

use failover_tests::{bench::flood, netns};

// One test, so that no other test of this binary owns namespaces while
// the last check looks for leftovers.
#[test]
fn a_small_syn_flood_keeps_every_established_flow_and_leaves_nothing_behind() {
    let opts = flood::Opts {
        seconds: 1.0,
        rates: vec![200, 2_000],
        flows: 200,
    };
    let rows = flood::run(&opts).unwrap();
    flood::print(&rows, false);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.generator, flood::GENERATOR);
        assert_eq!(r.established, 200, "{r:?}");
        assert_eq!(r.survived, r.established, "{r:?}");
        assert_eq!(r.sample_ok, r.sample, "{r:?}");
        assert!(r.sample > 0, "{r:?}");
        assert!(r.sent > 0 && r.pps > 0, "{r:?}");
        assert!(r.requests >= 50, "{r:?}");
        // Lenient: a short run on a shared machine; the target (0.99) is
        // the benchmark's to judge.
        assert!(r.ok_ratio >= 0.95, "{r:?}");
        assert!(r.p99_connect_ms.is_finite(), "{r:?}");
    }
    assert!(netns::none_left(), "namespaces left behind");
}
