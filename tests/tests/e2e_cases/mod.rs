//! The end-to-end failover cases, one function per case, for either
//! address family: `e2e.rs` runs them over IPv4, `e2e6.rs` over IPv6, on
//! the same dual-stack topology with the same agent config
//! ([`agentproc::config_for`]). Each asserts on what the clients and the
//! backends saw.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

use failover_tests::{
    agentproc::{self, EU_PORT, ProbeTiming, World},
    client,
    topology::Family,
    traffic::{Driver, Sample, recovery},
    wait::wait_for,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Only one paced client at a time: timing is measured, and the machine
/// may have two cores.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PATH: &str = "/v1/models";

/// Requests answered before a fault: traffic flows.
pub const BASELINE: usize = 100;

/// `chat` on the VIP of family `f`.
fn vip(f: Family) -> SocketAddr {
    SocketAddr::from((f.vip(), 80))
}

/// a1, a2, b1, b2 as family `f` names them.
fn names(f: Family) -> [String; 4] {
    ["a1", "a2", "b1", "b2"].map(|n| f.name(n))
}

/// A paced client to `chat` on family `f`'s VIP: a request every
/// millisecond, each on a new connection bounded by `timeout`, for at most
/// `max`.
pub fn drive(w: &World, f: Family, timeout: Duration, max: Duration) -> Driver {
    let ms = Duration::from_millis(1);
    Driver::start(&w.topo.client.name, vip(f), PATH, ms, timeout, max)
}

/// The world over family `f` alone, with the agent's default probes.
pub fn start(f: Family, with_eu: bool) -> World {
    World::start_in(
        &[f],
        with_eu,
        ProbeTiming::default(),
        agentproc::write_config,
    )
    .unwrap()
}

pub fn by_backend(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples.iter().filter(|s| s.ok) {
        *m.entry(s.backend.clone()).or_insert(0) += 1;
    }
    m
}

/// Client requests (not probes) a backend has answered.
fn served(w: &World, name: &str) -> u64 {
    w.served(name).unwrap()
}

/// 200 requests spread over cloud-a's two backends, all answered; cloud-b
/// sees probes only.
pub fn steady_state(f: Family) {
    let [a1, a2, b1, b2] = names(f);
    let _s = serial();
    let w = start(f, false);
    // The agent's xdp_mode is auto: generic mode on the edge's veths.
    for leg in ["ec", "ea", "eb"] {
        let link = w.topo.edge.exec(&format!("ip -d link show {leg}")).unwrap();
        assert!(link.contains("xdpgeneric"), "{leg}: {link}");
    }
    let mut seen = BTreeMap::new();
    {
        let _in = w.topo.client.enter().unwrap();
        for i in 0..200 {
            let a = client::get(vip(f), PATH, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
            assert_eq!(a.status, 200);
            *seen.entry(a.backend).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        [&a1, &a2],
        "tier 0 only, both backends: {seen:?}"
    );
    assert!(seen.values().all(|&n| n >= 40), "spread: {seen:?}");
    // The backends agree: cloud-b saw probes only.
    assert_eq!(served(&w, &b1) + served(&w, &b2), 0);
    assert_eq!(served(&w, &a1) + served(&w, &a2), 200);
}

/// a1 crashes under paced load: new flows move to a2 within a second.
pub fn backend_crash(f: Family) {
    let [a1, a2, ..] = names(f);
    let _s = serial();
    let w = start(f, false);
    let d = drive(&w, f, Duration::from_millis(500), Duration::from_secs(10));
    d.wait_answered(BASELINE, Duration::from_secs(5));
    let fault = d.now();
    World::crash(&w.topo, &a1).unwrap();
    wait_for(
        "250 requests after recovery",
        Duration::from_secs(8),
        || {
            let samples = d.samples();
            recovery(&samples, fault, 20)
                .0
                .is_some_and(|rto| samples.iter().filter(|s| s.at >= fault + rto).count() > 250)
        },
    );
    let samples = d.stop();
    let (rto, failed) = recovery(&samples, fault, 20);
    let after: Vec<Sample> = samples.iter().filter(|s| s.at >= fault).cloned().collect();
    println!(
        "crash: failover time {rto:?}, {failed} failed of {} requests after the fault; served before {:?}, after {:?}",
        after.len(),
        by_backend(&samples[..samples.len() - after.len()]),
        by_backend(&after)
    );
    let rto = rto.expect("recovered");
    assert!(rto < Duration::from_secs(1), "failover took {rto:?}");
    // After recovery, every request went to a2 and succeeded.
    let tail: Vec<&Sample> = after.iter().filter(|s| s.at >= fault + rto).collect();
    assert!(tail.len() > 200, "{} requests after recovery", tail.len());
    assert!(tail.iter().all(|s| s.ok && s.backend == a2));
    // Before the fault every request succeeded.
    assert!(samples.iter().filter(|s| s.at < fault).all(|s| s.ok));
    let down = w
        .agent
        .decisions()
        .into_iter()
        .rfind(|d| d.service == "chat")
        .unwrap();
    assert_eq!(down.to, [a2], "{down:?}");
}

/// Opens a long SSE stream through the VIP and reads its first bytes.
fn open_stream(w: &World, f: Family) -> TcpStream {
    let _in = w.topo.client.enter().unwrap();
    let (s, head) = client::open_stream(vip(f), Duration::from_secs(2)).unwrap();
    assert!(head.contains(" 200 "), "stream started: {head}");
    assert!(head.contains("x-backend: a"), "stream from cloud-a: {head}");
    s
}

/// Cloud-a is blackholed: its streams are reset, cloud-b takes over, and
/// when cloud-a returns traffic goes back without flapping.
pub fn lost_cloud(f: Family) {
    let [a1, a2, b1, b2] = names(f);
    let _s = serial();
    let mut w = start(f, false);
    let mut stream = open_stream(&w, f);
    let d = drive(&w, f, Duration::from_millis(100), Duration::from_secs(30));
    d.wait_answered(BASELINE, Duration::from_secs(5));

    // Cloud-a goes dark.
    let fault = d.now();
    let t0 = Instant::now();
    World::blackhole_a(&w.topo).unwrap();
    let mut buf = [0u8; 4096];
    let err = loop {
        match stream.read(&mut buf) {
            Ok(0) => panic!("stream closed cleanly instead of reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let reset_after = t0.elapsed();
    w.agent
        .wait_serving("chat", &[&b1, &b2], Duration::from_secs(5))
        .unwrap();
    let marked_after = t0.elapsed();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "the stream is reset, not left hanging: {err}"
    );
    println!(
        "blackhole: stream reset {reset_after:?} after the fault (agent decision seen by {marked_after:?})"
    );
    assert!(
        reset_after < Duration::from_secs(1),
        "reset after {reset_after:?}"
    );
    wait_for("200 answers from cloud-b", Duration::from_secs(5), || {
        d.answered(|s| s.at >= fault && s.backend.starts_with('b')) >= 200
    });

    // Cloud-a comes back.
    let restored = d.now();
    let decisions_before = w.agent.decisions().len();
    World::restore_a(&w.topo).unwrap();
    w.agent
        .wait_serving("chat", &[&a1, &a2], Duration::from_secs(5))
        .unwrap();
    // Watch for flapping: the sleep is the observation window.
    std::thread::sleep(Duration::from_millis(1500));
    let samples = d.stop();

    let before_restore: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at < restored)
        .cloned()
        .collect();
    let (rto, failed) = recovery(&before_restore, fault, 20);
    println!(
        "blackhole: failover time {rto:?}, {failed} failed; served after the fault {:?}",
        by_backend(&before_restore[before_restore.iter().position(|s| s.at >= fault).unwrap()..])
    );
    let rto = rto.expect("recovered onto cloud-b");
    assert!(rto < Duration::from_secs(2), "failover took {rto:?}");
    assert!(
        before_restore
            .iter()
            .filter(|s| s.at >= fault + rto)
            .all(|s| s.ok && s.backend.starts_with('b')),
        "after failover, cloud-b serves everything"
    );

    // Recovery: back to cloud-a only after the rise threshold (two probes
    // 100 ms apart), with no failed request and no flapping.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= restored).collect();
    let first_a = after
        .iter()
        .find(|s| s.backend.starts_with('a'))
        .expect("cloud-a serves again");
    println!(
        "recovery: first request on cloud-a {:?} after the link came back; {} failed: {:?}",
        first_a.at - restored,
        after.iter().filter(|s| !s.ok).count(),
        after
            .iter()
            .filter(|s| !s.ok)
            .map(|s| s.at - restored)
            .collect::<Vec<_>>()
    );
    let changes: Vec<_> = w.agent.decisions()[decisions_before..]
        .iter()
        .filter(|d| d.service == "chat")
        .cloned()
        .collect();
    // Cloud-a took traffic only through decisions made on the rise
    // threshold (two consecutive probe successes); a1 and a2 may rise in
    // one apply or two, and the ring never goes back to cloud-b.
    assert!(
        (1..=2).contains(&changes.len())
            && changes.iter().all(|d| {
                d.to.iter().all(|b| b.starts_with('a'))
                    && d.reason.contains("2 consecutive successes")
            }),
        "no flapping, rise threshold met: {changes:#?}"
    );
    let failed_back = after.iter().filter(|s| !s.ok).count();
    assert!(
        failed_back * 100 <= after.len(),
        "{failed_back} of {} failed on the way back",
        after.len()
    );
    // Once cloud-a is back (300 ms for both backends to rise), cloud-b
    // answers almost nothing. Not zero: on 2 loaded cores a passive
    // ejection ("SYNs unanswered past the 50 ms floor") can briefly move a
    // few new flows (1-2% seen here; an open issue); the ring decisions
    // above show the rings never flap back.
    let settled = first_a.at + Duration::from_millis(300);
    let late: Vec<&Sample> = after
        .iter()
        .copied()
        .filter(|s| s.at >= settled && s.ok)
        .collect();
    let on_b = late.iter().filter(|s| !s.backend.starts_with('a')).count();
    eprintln!(
        "after cloud-a's return: {on_b} of {} answers from cloud-b",
        late.len()
    );
    assert!(
        on_b * 100 <= late.len() * 5,
        "cloud-b served {on_b} of {} requests after cloud-a came back",
        late.len()
    );
}

/// With its only EU backend down, the EU-only service refuses fast and
/// its US backend never sees a client request.
pub fn eu_only_fails_closed(f: Family) {
    let [a1_eu, b1_us] = ["a1-eu", "b1-us"].map(|n| f.name(n));
    let _s = serial();
    let mut w = start(f, true);
    w.agent
        .wait_serving("eu-only", &[&a1_eu], Duration::from_secs(10))
        .unwrap();
    let eu = SocketAddr::from((f.vip(), EU_PORT));
    {
        let _in = w.topo.client.enter().unwrap();
        for _ in 0..20 {
            let a = client::get(eu, PATH, Duration::from_secs(2)).unwrap();
            assert_eq!((a.status, &a.backend), (200, &a1_eu));
        }
    }
    assert_eq!(served(&w, &a1_eu), 20);
    World::crash(&w.topo, &a1_eu).unwrap();
    let d = w
        .agent
        .wait_serving("eu-only", &[], Duration::from_secs(5))
        .unwrap();
    println!("eu-only decision: {d:?}");
    {
        let _in = w.topo.client.enter().unwrap();
        for i in 0..50 {
            let t = Instant::now();
            let r = client::get(eu, PATH, Duration::from_secs(2));
            let took = t.elapsed();
            assert!(r.is_err(), "request {i} answered: {r:?}");
            assert!(
                took < Duration::from_millis(500),
                "request {i} failed slowly ({took:?}): {r:?}"
            );
        }
    }
    // The US backend of the pool never saw a client request, though it is
    // healthy and listed.
    assert_eq!(served(&w, &b1_us), 0);
}
