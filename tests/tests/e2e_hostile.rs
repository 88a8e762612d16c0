//! Issue 15 end to end, "no client can move traffic": the real agent in
//! the edge namespace, real backends, real client traffic through the VIP,
//! and a client that floods the edge with bad SYNs (`failover_tests::flood`)
//! or a backend that flaps. Asserted on what the clients saw, the agent's
//! audit log and log, and the data plane's counters and ring generations.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first). One test at a time: they pace traffic on a machine that
//! may have two cores.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use failover_common::Reason;
use failover_tests::{
    agentproc::{ProbeTiming, World, admin},
    bench::attack,
    flood::{self, Kind, Seen, Sources},
    netns,
    pacer::{self, Pacer},
    topology::VIP,
    traffic::recovery,
    wait::wait_for,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PATH: &str = "/v1/models";
const TIMEOUT: Duration = Duration::from_secs(1);

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn chat_generation(w: &World) -> u64 {
    Seen::read(w).unwrap().generations[&80]
}

#[test]
fn bad_syn_floods_eject_no_backend_and_move_no_ring() {
    let _s = serial();
    let w = World::start(false, ProbeTiming::default()).unwrap();
    let p = Pacer::start(
        &w.topo.client.name,
        vip(),
        PATH,
        Duration::from_millis(10),
        TIMEOUT,
        Duration::from_secs(60),
    );
    // The tier-1 backends may still be rising when the world is serving:
    // wait until every backend that can come up has (eu-only's two have no
    // listener here), so the attack starts from a settled state.
    wait_for(
        "every backend that can come up",
        Duration::from_secs(5),
        || Seen::read(&w).unwrap().not_up.len() <= 2,
    );
    for sources in [Sources::One, Sources::Many] {
        let before = Seen::read(&w).unwrap();
        let decisions = w.agent.decisions().len();
        let sent = flood::flood(&w.topo, sources, 1_000, Duration::from_secs(5)).unwrap();
        // Evidence reaches the passive detector with the real traffic that
        // follows: let 20 more requests finish before judging.
        assert!(p.wait_for(p.len() + 20, Duration::from_secs(5)));
        let after = Seen::read(&w).unwrap();
        let new: Vec<_> = w.agent.decisions().split_off(decisions);
        let grew = |r| before.grew(&after, r);
        let verdicts: Vec<String> = Reason::ALL
            .iter()
            .filter(|&&r| grew(r) > 0)
            .map(|&r| format!("{} +{}", r.as_str(), grew(r)))
            .collect();
        println!(
            "{}: {sent} bad SYNs sent; verdicts {}; syns_ignored +{}",
            sources.name(),
            verdicts.join(", "),
            after.syns_ignored - before.syns_ignored,
        );

        // The attack reached the edge, and each kind got its verdict: the
        // kinds take turns, so each has 1/11 of the frames (9/10 of that
        // allows for frames the veth refused).
        assert!(sent >= 4_900, "{sent} of 5000 bad SYNs sent");
        let share = |kinds: u64| sent * kinds / Kind::ALL.len() as u64 * 9 / 10;
        assert!(
            grew(Reason::BadTcpFlags) >= share(3),
            "SYN+FIN, SYN+RST, none"
        );
        assert!(grew(Reason::BadL4Checksum) >= share(1));
        assert!(grew(Reason::TruncatedL4) >= share(1));
        assert!(grew(Reason::NotOpening) >= share(2), "stray RST, SYN-ACK");
        assert!(
            after.syns_ignored - before.syns_ignored >= share(4),
            "MD5, MP_JOIN, data, PSH forwarded uncounted"
        );
        // And moved nothing.
        assert_eq!(after.ejections, before.ejections, "passive ejections");
        assert!(new.is_empty(), "no ring switch or health change: {new:#?}");
        assert_eq!(after.generations, before.generations, "ring generations");
        // (eu-only's backends have no listener in this world: down throughout.)
        assert_eq!(after.not_up, before.not_up, "backends not up");
    }
    let samples = p.stop();
    let failed: Vec<_> = samples.iter().filter(|s| !s.ok).collect();
    println!(
        "real traffic: {} requests, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(samples.len() > 800, "{} requests", samples.len());
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(5)]
    );
}

/// The bound of failover-agent/src/health/state.rs: from a flap count of
/// 0, the k-th recovery in a row comes at least `hold_down * (2^(k-1) -
/// 1)` after the first fall, so a window `T` holds at most `k = 1 +
/// floor(log2(T / 1 s + 1))` recoveries and `2k + 1` changes between
/// serving and down. For T = 5 s that is 3 and 7, and it stays so below
/// T = 7 s (the window here ends a little after 5 s). The harness's probe
/// settings (100 ms, rise 2, fall 2, no dwell) only add time between
/// changes, so they leave the bound as it is. a2 never changes, so each
/// change of a1 flips `chat`'s ring at most once.
const FLAP_BOUND: u64 = 7;

#[test]
fn a_flapping_backend_is_damped_and_a_dark_tier_still_fails_over_at_once() {
    let _s = serial();
    let mut w = World::start(false, ProbeTiming::default()).unwrap();
    let (a1, ns) = World::backend(&w.topo, "a1");
    let fault = |f: &str| {
        admin(
            ns,
            a1,
            "/admin/fault",
            Some(&format!(r#"{{"fault":"{f}"}}"#)),
        )
    };
    let gen0 = chat_generation(&w);
    let decisions = w.agent.decisions().len();

    // a1's health check fails and passes in turn, 200 ms each, for 5 s.
    pacer::every(Duration::from_millis(200), Duration::from_secs(5), |i| {
        fault(if i % 2 == 0 { "unhealthy" } else { "none" }).map(drop)
    })
    .unwrap();
    let switches = chat_generation(&w) - gen0;
    fault("none").unwrap();
    let log = w.agent.decisions().split_off(decisions);
    let held: Vec<&str> = log
        .iter()
        .filter(|d| d.reason.contains("recovery held down"))
        .map(|d| d.reason.as_str())
        .collect();
    println!(
        "flapping a1: {switches} ring switches of chat in 5 s (bound {FLAP_BOUND}); \
         hold-downs: {held:#?}"
    );
    assert!(switches <= FLAP_BOUND, "{switches} switches: {log:#?}");
    // Not vacuous: a1 did fall, recover and fall again, and was held.
    assert!(switches >= 3, "{switches} switches: {log:#?}");
    assert!(!held.is_empty(), "no hold-down: {log:#?}");

    // Cloud-a goes dark: the hold delays recoveries, never a failover.
    let p = Pacer::start(
        &w.topo.client.name,
        vip(),
        PATH,
        Duration::from_millis(5),
        TIMEOUT,
        Duration::from_secs(30),
    );
    assert!(p.wait_for(20, Duration::from_secs(5)));
    let fault_at = p.now();
    let t0 = Instant::now();
    World::blackhole_a(&w.topo).unwrap();
    w.agent
        .wait_serving("chat", &["b1", "b2"], Duration::from_secs(2))
        .unwrap();
    let decided = t0.elapsed();
    // Enough answers for a run, and the requests sent into the dark ended.
    assert!(p.wait_for(p.len() + 100, Duration::from_secs(5)));
    let samples = p.stop();
    let (rto, failed) = recovery(&samples, fault_at, 20);
    println!("blackhole: decision after {decided:?}, failover time {rto:?}, {failed} failed");
    let rto = rto.expect("recovered onto cloud-b");
    assert!(rto < Duration::from_secs(2), "failover took {rto:?}");
    assert!(
        samples
            .iter()
            .filter(|s| s.at >= fault_at + rto)
            .all(|s| s.ok && s.backend.starts_with('b')),
        "after failover, cloud-b serves everything"
    );
}

/// `bench attack` end to end, briefly: its figures mean nothing here.
#[test]
fn attack_bench_smoke() {
    let _s = serial();
    let opts = attack::Opts {
        seconds: 1.0,
        pps: vec![1_000],
    };
    let rows = attack::run(&opts).unwrap();
    attack::print(&rows, false);
    let names: Vec<(&str, u32)> = rows.iter().map(|r| (r.attack, r.pps)).collect();
    assert_eq!(
        names,
        [("none", 0), ("one-source", 1_000), ("many-sources", 1_000)]
    );
    for r in &rows {
        assert!(r.requests > 50 && r.ok_ratio > 0.9, "{r:?}");
        assert_eq!(r.sent > 0, r.pps > 0, "{r:?}");
    }
    assert!(netns::none_left(), "a namespace was left behind");
}
