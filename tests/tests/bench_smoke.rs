//! Quick runs of the peer benchmarks (`cargo xtask bench forward|http`),
//! of the agent-at-rest one (`rest`, whose run checks the probe rate) and
//! of `load`: every system moves traffic to the backend side, and nothing
//! is left behind. Figures from these short runs mean nothing; the benchmarks
//! themselves are `cargo xtask bench ...`.
//!
//! Needs root, nftables, haproxy and wrk: run through `cargo xtask test`.

use failover_tests::{
    bench::{forward, http, load, rest},
    generator::{Choice, live_frames_refusal},
    netns,
};

// One test, so that no other test of this binary owns namespaces while
// the last check looks for leftovers.
#[test]
fn every_system_delivers_traffic_to_the_backends_and_leaves_nothing_behind() {
    // The socket generator always (it is the fallback wherever the kernel
    // refuses live frames), the live one too where the kernel allows it.
    let mut generators = vec![Choice::Socket];
    match live_frames_refusal().unwrap() {
        None => generators.push(Choice::Live),
        Some(e) => {
            eprintln!("forward: live generator not run, the kernel refuses live frames: {e}")
        }
    }
    for generator in generators {
        eprintln!("forward: {generator:?} generator");
        let opts = forward::Opts {
            seconds: 0.3,
            generator,
            ..forward::Opts::default()
        };
        for r in forward::run(opts).unwrap() {
            assert!(r.sent > 0 && r.received > 0, "{r:?}");
            // Nearly everything the generator sends is forwarded (the rest
            // is dropped at a full veth ring when the machine is busy).
            assert!(
                r.received as f64 >= 0.5 * r.sent as f64,
                "{} ({}): {} of {} received",
                r.system,
                r.generator,
                r.received,
                r.sent
            );
        }
    }

    let opts = http::Opts {
        rounds: 1,
        seconds: 1,
        ..http::Opts::default()
    };
    let results = http::run(opts, &http::SYSTEMS.map(String::from)).unwrap();
    assert_eq!(results.len(), http::SYSTEMS.len() * http::MODES.len());
    for r in &results {
        assert!(r.requests > 0 && r.rps > 0.0, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
    }

    let opts = rest::Opts {
        backends: 10,
        interval_ms: 100,
        seconds: 1.0,
    };
    let results = rest::run(&opts, &["tcp".to_string(), "http".to_string()]).unwrap();
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.probes_per_s >= 80.0, "{r:?}");
        assert!(r.cpu_pct > 0.0 && r.rss_mib > 0.0, "{r:?}");
    }

    // Every mode of `load`, 2 s of load each: requests get answers, and the
    // wedge row is measured.
    let opts = load::Opts {
        seconds: 2.0,
        wedge_seconds: 2.0,
        trace: false,
    };
    let rows = load::run(opts, &load::MODES.map(String::from)).unwrap();
    assert_eq!(rows.len(), load::MODES.len());
    for r in &rows {
        match r {
            load::Row::Ttft(t) => assert!(t.requests > 0 && t.failed < t.requests, "{r:?}"),
            load::Row::Wedge(w) => assert!(w.requests > 0, "{r:?}"),
            // The agent takes load_aware's `load` facet: every mode runs.
            load::Row::Error { .. } => panic!("a mode could not run: {r:?}"),
        }
    }
    assert!(netns::none_left(), "a namespace was left behind");
}
