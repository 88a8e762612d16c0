//! The agent against the real XDP object: plans become maps, a backend
//! down writes its state before the ring flips, a restarted agent keeps
//! ids, rings and flows, reloads change only what changed, and passive
//! ejection acts on real `BE_STATS` counters.
//!
//! Needs root: run through `cargo xtask test`. Each test owns a Lab (a
//! namespace and a pin directory, removed on drop).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use etherparse::SlicedPacket;
use failover_agent::{
    agent::{
        Agent, Applier, ApplyOptions, Journal, PassiveMonitor, apply::read_ring, probe_targets,
    },
    audit, config,
    dataplane::Dataplane,
    health::{
        self, EventSource, HealthEvent, HealthState, PassiveConfig, Probe, ProbeOutcome, Thresholds,
    },
    planner,
};
use failover_common::{NO_BACKEND, SVC_F_RESET, state};
use failover_tests::{
    configs,
    inproc::{self, Running},
    lab::{self, CLIENT, Lab, SNAT, VIP, backend_addr},
    listener::Listener,
    netns::require_root,
    packet::{Frame, ports},
    scratch::TempDir,
    wait::wait_for_async,
    xdp::{XDP_REDIRECT, XDP_TX},
};
use serde_json::json;

const BPORT: u16 = 8000;

/// b1, b2, b3 on the lab's backend leg, port [`BPORT`].
fn lab_backends() -> Vec<config::Backend> {
    (1..=3u8)
        .map(|i| configs::backend(&format!("b{i}"), backend_addr(i), BPORT))
        .collect()
}

/// The lab's `web` service over `web` probed with `probe`, `extra`
/// services after it, and `backends` ([`lab::web_config`]).
fn web_config(
    pin: &Path,
    web: &[&str],
    extra: Vec<config::Service>,
    backends: Vec<config::Backend>,
    probe: config::Probe,
) -> config::Config {
    let mut cfg = lab::web_config(pin, None, web, probe, backends);
    cfg.services.extend(extra);
    cfg
}

/// [`web_config`] over the lab's backends with a TCP probe, as the agent
/// loads it.
fn lab_cfg(pin: &Path, web: &[&str], extra: Vec<config::Service>) -> config::Config {
    configs::checked(&web_config(
        pin,
        web,
        extra,
        lab_backends(),
        configs::tcp_probe(),
    ))
}

/// `api` on VIP:443 over b2 and b3 (TCP probe, a ring of 13 slots).
fn api_service() -> config::Service {
    let mut s = configs::service("api", VIP, 443, &["b2", "b3"], configs::tcp_probe());
    s.policy.ring_size = 13;
    s
}

fn applier(lab: &Lab, cfg: config::Config, journal: Option<Journal>) -> Applier {
    let dp = Dataplane::load(lab.pin_dir()).expect("load dataplane");
    Applier::new(
        dp,
        cfg,
        ApplyOptions {
            journal,
            startup_hold: Duration::from_secs(60),
            ..ApplyOptions::default()
        },
    )
    .expect("applier")
}

fn ev(backend: &str, from: HealthState, to: HealthState) -> HealthEvent {
    HealthEvent {
        backend: backend.into(),
        from,
        to,
        reason: "test".into(),
        latency: None,
        source: EventSource::Active,
        at: Instant::now(),
    }
}

fn up(a: &mut Applier, names: &[&str]) {
    let evs: Vec<HealthEvent> = names
        .iter()
        .map(|n| ev(n, HealthState::Unknown, HealthState::Up))
        .collect();
    a.on_health(&evs).expect("apply");
}

fn id(a: &Applier, backend: &str) -> u32 {
    a.ids().backend(backend).expect("backend id").id
}

/// (service entry, active ring) as the data plane holds them.
fn map_service(dp: &Dataplane, port: u16) -> (failover_common::Service, Vec<u32>) {
    let (_, s) = dp
        .services()
        .unwrap()
        .into_iter()
        .find(|(k, _)| u16::from_be(k.port_be) == port)
        .expect("service in SERVICES");
    let ring = read_ring(dp, s.id, s.active_slot, s.ring_size).unwrap();
    (s, ring)
}

fn ids_in(ring: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = ring.iter().copied().filter(|&i| i != NO_BACKEND).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn dst_of(frame: &[u8]) -> Ipv4Addr {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not ipv4")
    };
    ip.header().destination_addr()
}

/// Opens a flow from `cport`; returns the backend address and NAT port.
fn open_flow(lab: &Lab, cport: u16) -> (Ipv4Addr, u16) {
    let (rc, out) = lab
        .run(lab.vc0, &Frame::tcp(CLIENT, cport, VIP, 80).build())
        .unwrap();
    assert_eq!(rc, XDP_REDIRECT, "SYN forwarded");
    (dst_of(&out), ports(&out).0)
}

fn data(lab: &Lab, cport: u16) -> (u32, Vec<u8>) {
    lab.run(
        lab.vc0,
        &Frame::tcp(CLIENT, cport, VIP, 80).data(b"x").build(),
    )
    .unwrap()
}

fn name_of(addr: Ipv4Addr) -> String {
    format!("b{}", addr.octets()[3] - 10)
}

#[test]
fn apply_programs_services_backends_and_rings() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let log = dir.0.join("audit.jsonl");
    let cfg = lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]);
    let mut a = applier(&lab, cfg.clone(), Some(Journal::open(&log).unwrap()));

    // No verdicts on a fresh node: the service exists and fails closed.
    let (s, ring) = map_service(&lab.dp, 80);
    assert_eq!((s.flags, s.ring_size, s.generation), (SVC_F_RESET, 13, 1));
    assert!(ring.iter().all(|&i| i == NO_BACKEND));
    for i in 1..=3u8 {
        let b = lab.dp.backend(id(&a, &format!("b{i}"))).unwrap();
        assert_eq!(Ipv4Addr::from(u32::from_be(b.addr_be)), backend_addr(i));
        assert_eq!(u16::from_be(b.port_be), BPORT);
        assert_eq!(b.state, state::DOWN, "no verdict yet");
    }

    up(&mut a, &["b1", "b2", "b3"]);
    let (s, ring) = map_service(&lab.dp, 80);
    assert_eq!(s.generation, 2);
    let mut want = vec![id(&a, "b1"), id(&a, "b2"), id(&a, "b3")];
    want.sort_unstable();
    assert_eq!(ids_in(&ring), want);
    // Exactly the planner's ring, in the slot packets read.
    let view: planner::HealthView = ["b1", "b2", "b3"]
        .iter()
        .map(|n| (*n, planner::BackendHealth::Up))
        .collect();
    let plan = planner::plan(
        &cfg,
        &view,
        &a.ids().backend_ids(),
        &planner::Overrides::new(),
    );
    assert_eq!(ring, plan.services[0].ring);
    assert_eq!(a.programmed("web").unwrap().ring, ring);
    for n in ["b1", "b2", "b3"] {
        assert_eq!(lab.dp.backend(id(&a, n)).unwrap().state, state::UP);
    }
    // The VIP filter and the service are live: a SYN reaches a backend.
    let (be, _) = open_flow(&lab, 52_000);
    assert!((1..=3).any(|i| backend_addr(i) == be));
    assert_eq!(a.flip_latency().count, 2);

    // The same health again changes nothing.
    let r = a
        .on_health(&[ev("b1", HealthState::Degraded, HealthState::Up)])
        .unwrap();
    assert!(r.flipped.is_empty(), "no diff, no flip: {r:?}");
    assert_eq!(map_service(&lab.dp, 80).0.generation, 2);

    a.flush_audit();
    drop(a);
    let report = audit::verify(&log).unwrap();
    assert_eq!(report.records, 2, "one record per flip");
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["service"], "web");
    assert_eq!(last["generation"], 2);
    assert_eq!(last["from"], serde_json::json!([]));
    assert_eq!(last["to"], serde_json::json!(["b1", "b2", "b3"]));
    assert!(
        last["policy_check"]
            .as_str()
            .unwrap()
            .starts_with("sovereignty ok")
    );
    assert!(last["apply_latency_us"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_backend_down_is_out_with_one_state_write_before_the_ring_flips() {
    require_root();
    let lab = Lab::new().unwrap();
    let mut a = applier(
        &lab,
        lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]),
        None,
    );
    up(&mut a, &["b1", "b2", "b3"]);
    let (be, _) = open_flow(&lab, 52_100);
    let victim = name_of(be);
    let vid = id(&a, &victim);
    let (before, ring_before) = map_service(&lab.dp, 80);

    // The fast path alone: the state write takes the backend out; the
    // ring is not touched yet, and the pinned flow is reset at once.
    assert!(a.mark_down(&victim, Instant::now()).unwrap());
    assert_eq!(lab.dp.backend(vid).unwrap().state, state::DOWN);
    let (mid, ring_mid) = map_service(&lab.dp, 80);
    assert_eq!(
        (mid.generation, &ring_mid),
        (before.generation, &ring_before)
    );
    let (rc, _) = data(&lab, 52_100);
    assert_eq!(rc, XDP_TX, "flow on the dead backend gets an RST");
    // New flows skip it although the ring still names it.
    for p in 0..20 {
        assert_ne!(open_flow(&lab, 52_200 + p).0, be);
    }

    // The health event then re-plans: the ring drops it and flips.
    let r = a
        .on_health(&[ev(&victim, HealthState::Up, HealthState::Down)])
        .unwrap();
    assert_eq!(r.flipped, vec![("web".to_string(), before.generation + 1)]);
    assert_eq!(r.state_writes, 0, "already DOWN: nothing written twice");
    let (after, ring) = map_service(&lab.dp, 80);
    assert_eq!(after.generation, before.generation + 1);
    assert!(!ring.contains(&vid));
    assert!(a.state_latency().count >= 1);

    // Through on_health alone, the state write is part of the same apply.
    let other = ["b1", "b2", "b3"]
        .into_iter()
        .find(|n| *n != victim)
        .unwrap();
    let r = a
        .on_health(&[ev(other, HealthState::Up, HealthState::Down)])
        .unwrap();
    assert_eq!(r.state_writes, 1);
    assert_eq!(r.flipped.len(), 1);
    assert_eq!(lab.dp.backend(id(&a, other)).unwrap().state, state::DOWN);
    assert!(!map_service(&lab.dp, 80).1.contains(&id(&a, other)));
    let p = a.state_latency();
    assert!(p.count >= 2 && p.p99_us > 0.0, "{p:?}");

    // Back up: state UP, then the ring holds it again.
    a.on_health(&[ev(other, HealthState::Down, HealthState::Up)])
        .unwrap();
    assert_eq!(lab.dp.backend(id(&a, other)).unwrap().state, state::UP);
    assert!(map_service(&lab.dp, 80).1.contains(&id(&a, other)));
}

#[test]
fn a_degraded_backend_takes_its_probes_degraded_weight_and_the_audit_shows_it() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let log = dir.0.join("audit.jsonl");
    // Never probed here: only its degraded_weight matters.
    let probe = configs::probe(json!({"kind": "inference", "model": "m", "degraded_weight": 0.25}));
    let cfg = configs::checked(&web_config(
        lab.pin_dir(),
        &["b1", "b2"],
        vec![],
        lab_backends(),
        probe,
    ));
    let mut a = applier(&lab, cfg, Some(Journal::open(&log).unwrap()));
    up(&mut a, &["b1", "b2"]);
    let w = a.effective_weights();
    assert_eq!(
        (w["b1"], w["b2"], w["b3"]),
        (100, 100, 0),
        "b3: in no service, no verdict"
    );

    // Rate limited (HTTP 429): still serving, with a quarter of its weight.
    let mut degraded = ev("b1", HealthState::Up, HealthState::Degraded);
    degraded.reason = "rate limited (HTTP 429)".into();
    let r = a.on_health(&[degraded]).unwrap();
    assert_eq!(r.flipped.len(), 1, "reweighted: a new ring");
    assert_eq!(a.effective_weights()["b1"], 25);
    assert_eq!(a.programmed("web").unwrap().to, ["b1", "b2"]);

    a.flush_audit();
    drop(a);
    let last = failover_tests::agentproc::read_decisions(&log)
        .pop()
        .unwrap();
    assert_eq!(
        (last.from.clone(), last.to.clone()),
        (
            vec!["b1".to_owned(), "b2".to_owned()],
            vec!["b1".to_owned(), "b2".to_owned()]
        )
    );
    assert_eq!(
        last.weights,
        [audit::WeightChange {
            backend: "b1".into(),
            from: 100,
            to: 25,
            load: None,
        }],
        "{last:?}"
    );
    assert!(
        last.reason
            .starts_with("b1 up -> degraded (active: rate limited (HTTP 429))"),
        "{}",
        last.reason
    );
    assert_eq!(
        audit::verify(&log).unwrap().records,
        3,
        "start, up, reweight"
    );
}

#[test]
fn draining_keeps_existing_flows_and_takes_no_new_ones() {
    require_root();
    let lab = Lab::new().unwrap();
    let mut a = applier(
        &lab,
        lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]),
        None,
    );
    up(&mut a, &["b1", "b2", "b3"]);
    let (be, _) = open_flow(&lab, 52_300);
    let n = name_of(be);
    a.set_draining(&n, true, Instant::now()).unwrap();
    assert_eq!(lab.dp.backend(id(&a, &n)).unwrap().state, state::DRAINING);
    assert!(!map_service(&lab.dp, 80).1.contains(&id(&a, &n)));
    let (rc, out) = data(&lab, 52_300);
    assert_eq!(
        (rc, dst_of(&out)),
        (XDP_REDIRECT, be),
        "existing flow stays"
    );
    a.set_draining(&n, false, Instant::now()).unwrap();
    assert_eq!(lab.dp.backend(id(&a, &n)).unwrap().state, state::UP);
}

#[test]
fn a_restarted_agent_keeps_ids_rings_and_flows() {
    require_root();
    let lab = Lab::new().unwrap();
    let cfg = lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![api_service()]);
    let mut first = applier(&lab, cfg.clone(), None);
    up(&mut first, &["b1", "b2", "b3"]);
    let (be, nat) = open_flow(&lab, 52_400);
    let ids_before = first.ids().clone();
    let web_before = map_service(&lab.dp, 80);
    let api_before = map_service(&lab.dp, 443);
    // The agent exits (or crashes): nothing is flushed.
    drop(first);

    // A new agent on the same pins, no verdicts yet.
    let mut second = applier(&lab, cfg.clone(), None);
    assert_eq!(second.ids().backend_ids(), ids_before.backend_ids());
    assert_eq!(
        second.ids().service("web").unwrap().id,
        ids_before.service("web").unwrap().id
    );
    assert_eq!(map_service(&lab.dp, 80), web_before, "ring kept, no flip");
    assert_eq!(map_service(&lab.dp, 443), api_before);
    for n in ["b1", "b2", "b3"] {
        assert_eq!(lab.dp.backend(id(&second, n)).unwrap().state, state::UP);
    }
    assert_eq!(lab.dp.flows().unwrap().len(), 1);
    let (rc, out) = data(&lab, 52_400);
    assert_eq!((rc, dst_of(&out), ports(&out).0), (XDP_REDIRECT, be, nat));

    // Verdicts for part of web's pool: still held.
    let r = second
        .on_health(&[ev("b1", HealthState::Unknown, HealthState::Up)])
        .unwrap();
    assert!(r.flipped.is_empty());
    assert_eq!(r.held, vec!["api".to_string(), "web".to_string()]);
    // api's pool (b2, b3) completes with b3 down: api re-plans, web is
    // still waiting for b2.
    let r = second
        .on_health(&[
            ev("b2", HealthState::Unknown, HealthState::Up),
            ev("b3", HealthState::Unknown, HealthState::Down),
        ])
        .unwrap();
    assert!(r.held.is_empty(), "every pool has verdicts: {r:?}");
    assert_eq!(
        lab.dp.backend(id(&second, "b3")).unwrap().state,
        state::DOWN
    );
    let (web, ring) = map_service(&lab.dp, 80);
    assert_eq!(web.generation, web_before.0.generation + 1);
    assert!(!ring.contains(&id(&second, "b3")));

    // Without the hold, a restart would have emptied the rings.
    drop(second);
    let dp = Dataplane::load(lab.pin_dir()).unwrap();
    let _third = Applier::new(
        dp,
        cfg,
        ApplyOptions {
            journal: None,
            startup_hold: Duration::ZERO,
            ..ApplyOptions::default()
        },
    )
    .unwrap();
    assert!(map_service(&lab.dp, 80).1.iter().all(|&i| i == NO_BACKEND));
}

#[test]
fn a_new_agent_keeps_the_vip_filter_bits_an_older_program_reads_until_its_own_is_attached() {
    require_root();
    let mut lab = Lab::new().unwrap();
    // An older build's filter: a bit this build sets for no configured
    // VIP (its IPv6 fold was another), read by the program still attached.
    let older = failover_agent::agent::ids::addr6("2001:db8:f::99".parse().unwrap());
    let vip = failover_agent::agent::ids::addr4(VIP);
    lab.dp
        .set_vips(["2001:db8:f::99".parse::<std::net::IpAddr>().unwrap()])
        .unwrap();
    let cfg = lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]);
    let mut a = applier(&lab, cfg, None);
    let f = lab.dp.vip_filter().unwrap();
    assert!(f.may_contain(vip), "the configured VIP is in");
    assert!(f.may_contain(older), "the older program's bit is kept");

    a.attach().unwrap();
    let f = lab.dp.vip_filter().unwrap();
    assert!(f.may_contain(vip));
    assert!(
        !f.may_contain(older),
        "exact once this agent's program is in"
    );
}

#[test]
fn a_reload_changes_only_what_changed() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let log = dir.0.join("audit.jsonl");
    let pin = lab.pin_dir().to_path_buf();
    let mut a = applier(
        &lab,
        lab_cfg(&pin, &["b1", "b2", "b3"], vec![api_service()]),
        Some(Journal::open(&log).unwrap()),
    );
    up(&mut a, &["b1", "b2", "b3"]);
    let web = map_service(&lab.dp, 80);
    let api = map_service(&lab.dp, 443);
    let ids = a.ids().backend_ids();

    // api switches to reselect and loses b3; a backend b4 joins api.
    let mut api2 = api_service();
    api2.backends = vec!["b2".into(), "b4".into()];
    api2.policy.on_backend_down = config::OnBackendDown::Reselect;
    let mut bs = lab_backends();
    bs.push(configs::backend(
        "b4",
        Ipv4Addr::new(198, 51, 100, 14),
        BPORT,
    ));
    let new = configs::checked(&web_config(
        &pin,
        &["b1", "b2", "b3"],
        vec![api2],
        bs,
        configs::tcp_probe(),
    ));
    let diff = a.reload(new, Instant::now()).unwrap();
    assert_eq!(diff.services_changed.len(), 1);
    assert_eq!(diff.backends_added, vec!["b4".to_string()]);

    assert_eq!(map_service(&lab.dp, 80), web, "web untouched");
    let (api_entry, api_ring) = map_service(&lab.dp, 443);
    assert_eq!(api_entry.flags, 0, "reselect: no reset flag");
    assert_eq!(api_entry.generation, api.0.generation + 1);
    assert_eq!(ids_in(&api_ring), vec![id(&a, "b2")], "b4 has no verdict");
    for n in ["b1", "b2", "b3"] {
        assert_eq!(a.ids().backend(n).unwrap().id, ids[n], "{n} keeps its id");
        assert_eq!(a.health(n), HealthState::Up, "{n} keeps its health");
    }
    let b4 = lab.dp.backend(id(&a, "b4")).unwrap();
    assert_eq!(b4.state, state::DOWN);

    // Remove api and b4: the SERVICES entry goes, b4's id is released.
    let b4_id = id(&a, "b4");
    let new = lab_cfg(&pin, &["b1", "b2", "b3"], vec![]);
    a.reload(new, Instant::now()).unwrap();
    assert!(lab.dp.services().unwrap().len() == 1);
    assert_eq!(lab.dp.backend(b4_id).unwrap().state, state::UNUSED);
    assert_eq!(map_service(&lab.dp, 80), web, "web still untouched");

    a.flush_audit();
    drop(a);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("config reload applied").count(),
        2,
        "one record per reload"
    );
    audit::verify(&log).unwrap();
}

/// A probe that always answers healthy (the passive test's prober).
struct Healthy;

impl Probe for Healthy {
    async fn check(&self) -> ProbeOutcome {
        ProbeOutcome::Healthy {
            latency: Duration::from_millis(1),
        }
    }
}

#[tokio::test]
async fn passive_ejection_from_real_handshake_counters() {
    require_root();
    let lab = Lab::new().unwrap();
    let mut a = applier(
        &lab,
        lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]),
        None,
    );
    // Only b1 serves, so every SYN goes to it.
    up(&mut a, &["b1"]);
    a.on_health(&[
        ev("b2", HealthState::Unknown, HealthState::Down),
        ev("b3", HealthState::Unknown, HealthState::Down),
    ])
    .unwrap();
    let b1 = id(&a, "b1");

    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let schedule = health::Schedule {
        interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(1),
        thresholds: Thresholds::new(1, 1, Duration::ZERO),
    };
    let prober = health::spawn_with_probe(Arc::from("b1"), Healthy, schedule, tx, None);
    // The prober's first (immediate) probe makes it Up.
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.to, HealthState::Up);

    let mut m = PassiveMonitor::new(PassiveConfig::default());
    m.watch("b1", b1, Some(prober.signals()), None);
    let t0 = Instant::now();
    assert!(m.poll(t0, |i| a.dataplane().backend_stats(i)).is_empty());

    // Two SYNs, each refused by the backend with an RST.
    for cport in [52_500u16, 52_501] {
        let (be, nat) = open_flow(&lab, cport);
        assert_eq!(be, backend_addr(1));
        let rst = Frame::tcp(be, BPORT, SNAT, nat).rst(0, Some(1001));
        lab.run(lab.va0, &rst.build()).unwrap();
    }
    assert_eq!(lab.dp.backend_stats(b1).unwrap().syn_rsts, 2);
    // The sweep's batched read gives what reads one by one give.
    let n = b1.max(id(&a, "b3")) + 1;
    let batch = lab.dp.backend_stats_batch(n).unwrap();
    assert_eq!(batch.len(), n as usize);
    for (i, s) in batch.iter().enumerate() {
        assert_eq!(*s, lab.dp.backend_stats(i as u32).unwrap(), "backend {i}");
    }
    assert_eq!(batch[b1 as usize].syns, 2);
    assert_eq!(batch[b1 as usize].syn_rsts, 2);
    // The backend was idle at the baseline read, so the next read comes at
    // the idle period (busy backends are read every 5 ms).
    let now = t0 + failover_agent::agent::passive_feed::IDLE_POLL_INTERVAL;
    let ej = m.poll(now, |i| a.dataplane().backend_stats(i));
    assert_eq!(ej.len(), 1, "{ej:?}");
    assert_eq!(ej[0].backend, "b1");
    // The run loop's reaction: DOWN at once, ring untouched so far.
    let gen_before = map_service(&lab.dp, 80).0.generation;
    assert!(a.mark_down("b1", now).unwrap());
    assert_eq!(lab.dp.backend(b1).unwrap().state, state::DOWN);
    assert_eq!(map_service(&lab.dp, 80).0.generation, gen_before);

    // The prober got the ejection and reports it; applying it re-plans.
    let down = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (down.to, down.source),
        (HealthState::Down, EventSource::Passive)
    );
    assert!(down.reason.as_str().contains("refused"), "{}", down.reason);
    assert_eq!(down.reason.failure(), Some(health::Failure::Refused));
    let r = a.on_health(&[down]).unwrap();
    assert_eq!(r.flipped.len(), 1);
    assert!(
        map_service(&lab.dp, 80).1.iter().all(|&i| i == NO_BACKEND),
        "nothing healthy left: fail closed"
    );
}

#[tokio::test]
async fn the_run_loop_probes_reloads_and_survives_bad_configs() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let cfg_path = dir.0.join("failover.yaml");
    let log = dir.0.join("audit.jsonl");
    let (mut l1, l2, l3) = (
        Listener::start().await,
        Listener::start().await,
        Listener::start().await,
    );
    let lo = Ipv4Addr::LOCALHOST;
    let on_lo = |ls: &[(&str, &Listener)]| -> Vec<config::Backend> {
        ls.iter()
            .map(|(n, l)| configs::backend(n, lo, l.port))
            .collect()
    };
    let cfg = |web: &[&str], backends| {
        web_config(
            lab.pin_dir(),
            web,
            vec![],
            backends,
            configs::fast_tcp_probe(),
        )
    };
    let two = cfg(&["b1", "b2"], on_lo(&[("b1", &l1), ("b2", &l2)]));
    configs::write(&two, &cfg_path);

    let agent = Agent::start(inproc::options(&cfg_path, Some(log.clone())))
        .await
        .expect("agent starts");
    assert!(lab.pin_dir().join("links/vc0").exists(), "attached, pinned");
    let (b1, b2) = (id(agent.applier(), "b1"), id(agent.applier(), "b2"));
    let reload = agent.reload_handle();
    let running = Running::run(agent);

    wait_for_async("both backends in the ring", Duration::from_secs(10), || {
        ids_in(&map_service(&lab.dp, 80).1) == [b1.min(b2), b1.max(b2)]
    })
    .await;
    let good = map_service(&lab.dp, 80);

    // A bad config is refused; the running state stays.
    let good_text = configs::to_yaml(&two);
    let bad = good_text.replace(&format!("vip: {VIP}"), "vip: 203.0.113");
    assert_ne!(bad, good_text, "the VIP spoiled");
    std::fs::write(&cfg_path, bad).unwrap();
    assert!(reload.reload());
    let audit_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for_async("the refusal audited", Duration::from_secs(10), || {
        audit_text().contains("reload refused")
    })
    .await;
    assert_eq!(map_service(&lab.dp, 80), good);
    assert_eq!(lab.dp.services().unwrap().len(), 1);

    // A valid one adds b3 to web through the file check alone.
    let three = cfg(
        &["b1", "b2", "b3"],
        on_lo(&[("b1", &l1), ("b2", &l2), ("b3", &l3)]),
    );
    configs::write(&three, &cfg_path);
    wait_for_async("b3 probed and in the ring", Duration::from_secs(10), || {
        ids_in(&map_service(&lab.dp, 80).1).len() == 3
    })
    .await;

    // A backend dies: the prober sees it and the ring drops it.
    l1.close().await;
    wait_for_async("b1 out", Duration::from_secs(10), || {
        lab.dp.backend(b1).unwrap().state == state::DOWN
            && !map_service(&lab.dp, 80).1.contains(&b1)
    })
    .await;

    // SIGTERM's path: the loop ends, the data plane stays as it was.
    let before = map_service(&lab.dp, 80);
    let agent = running.stop().await;
    let p = agent.applier().flip_latency();
    assert!(p.count >= 3 && p.p99_us > 0.0, "{p:?}");
    drop(agent);
    assert_eq!(map_service(&lab.dp, 80), before, "nothing flushed");
    assert!(lab.pin_dir().join("links/vc0").exists(), "still attached");

    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("reload refused").count(), 1, "{text}");
    assert!(text.contains("services[0].vip"), "names the field: {text}");
    assert!(text.contains("b1 up -> down"), "{text}");
    assert!(audit::verify(&log).unwrap().records >= 4);
    drop((l2, l3));
}

#[test]
fn each_backend_is_probed_with_its_services_one_probe() {
    let lab_less = PathBuf::from("/sys/fs/bpf/unused");
    let mut http = api_service();
    http.probe = configs::probe(json!({"kind": "http", "path": "/healthz"}));
    // b2 in web (tcp) and api (http): one of the probes would never run.
    let text = configs::to_yaml(&web_config(
        &lab_less,
        &["b1", "b2"],
        vec![http.clone()],
        lab_backends(),
        configs::tcp_probe(),
    ));
    let e = config::parse(&text, "test").unwrap_err();
    assert_eq!(e.errors()[0].field, "services[1].probe", "{e}");

    let cfg = lab_cfg(&lab_less, &["b1", "b2"], vec![api_service()]);
    let t = probe_targets(&cfg);
    assert_eq!(t.len(), 3);
    assert_eq!(kind(&t["b2"].1), "tcp", "one probe for both");
    let cfg = lab_cfg(&lab_less, &["b1"], vec![http]);
    let t = probe_targets(&cfg);
    assert_eq!(kind(&t["b1"].1), "tcp");
    assert_eq!(kind(&t["b3"].1), "http");
    assert_eq!(t["b3"].0.addr.port(), BPORT);
}

/// A probe's `kind`, as the config file names it.
fn kind(probe: &config::Probe) -> String {
    let fields = serde_json::to_value(probe).expect("serialize the probe");
    fields["kind"].as_str().expect("a kind").to_owned()
}

/// `backend` down at `at` for a failure of class `f` (dead or sick).
fn fell(backend: &str, from: HealthState, f: health::Failure, at: Instant) -> HealthEvent {
    HealthEvent {
        reason: health::Reason::new(format!("2 consecutive failures: {f}"), Some(f)),
        at,
        ..ev(backend, from, HealthState::Down)
    }
}

fn dp_state(lab: &Lab, a: &Applier, backend: &str) -> u8 {
    lab.dp.backend(id(a, backend)).unwrap().state
}

/// [`open_flow`], and the backend's SYN-ACK back: an established flow.
fn open_established(lab: &Lab, cport: u16) -> Ipv4Addr {
    let (be, nat) = open_flow(lab, cport);
    let (rc, _) = lab
        .run(
            lab.va0,
            &Frame::tcp(be, BPORT, SNAT, nat).synack(5000).build(),
        )
        .unwrap();
    assert_eq!(rc, XDP_REDIRECT, "SYN-ACK back to the client");
    be
}

#[test]
fn a_slow_backend_drains_for_its_grace_and_a_dead_one_goes_down_at_once() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let log = dir.0.join("audit.jsonl");
    let mut cfg = lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]);
    let grace = Duration::from_secs(20);
    cfg.services[0].policy.slow_grace = grace;
    let mut a = applier(&lab, cfg, Some(Journal::open(&log).unwrap()));
    up(&mut a, &["b1", "b2", "b3"]);
    let be = open_established(&lab, 52_600);
    let n = name_of(be);
    let t0 = Instant::now();

    // Sick (a timeout after connecting): out of the ring, DRAINING, and
    // its flow in progress keeps going.
    a.on_health(&[fell(&n, HealthState::Up, health::Failure::Timeout, t0)])
        .unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DRAINING);
    assert!(!map_service(&lab.dp, 80).1.contains(&id(&a, &n)));
    let (rc, out) = data(&lab, 52_600);
    assert_eq!((rc, dst_of(&out)), (XDP_REDIRECT, be), "stream continues");
    assert_eq!(a.grace_left(&n, t0), Some(grace));
    assert_eq!(a.grace_deadline(), Some(t0 + grace));
    assert!(a.end_graces(t0 + grace / 2).unwrap().state_writes == 0);
    // The grace over: DOWN, and what is left of the flow is reset.
    a.end_graces(t0 + grace).unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DOWN);
    assert_eq!(a.grace_deadline(), None);
    assert_eq!(data(&lab, 52_600).0, XDP_TX, "RST at the end of the grace");

    // Sick, then found dead (the prober's Down -> Down): DOWN at once.
    a.on_health(&[ev(&n, HealthState::Down, HealthState::Up)])
        .unwrap();
    let be = open_established(&lab, 52_601);
    let n = name_of(be);
    a.on_health(&[fell(
        &n,
        HealthState::Up,
        health::Failure::BadAnswer,
        Instant::now(),
    )])
    .unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DRAINING);
    a.on_health(&[fell(
        &n,
        HealthState::Down,
        health::Failure::Refused,
        Instant::now(),
    )])
    .unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DOWN);
    assert_eq!(a.grace_left(&n, Instant::now()), None);
    assert_eq!(data(&lab, 52_601).0, XDP_TX);

    // Dead from the start: DOWN at once, no grace. An operator's drain
    // does not keep a dead backend's flows waiting either.
    a.on_health(&[ev(&n, HealthState::Down, HealthState::Up)])
        .unwrap();
    let be = open_established(&lab, 52_602);
    let n = name_of(be);
    a.set_draining(&n, true, Instant::now()).unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DRAINING);
    a.on_health(&[fell(
        &n,
        HealthState::Up,
        health::Failure::Unanswered,
        Instant::now(),
    )])
    .unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DOWN);
    assert_eq!(data(&lab, 52_602).0, XDP_TX);
    // It comes back drained.
    a.on_health(&[ev(&n, HealthState::Down, HealthState::Up)])
        .unwrap();
    assert_eq!(dp_state(&lab, &a, &n), state::DRAINING);

    a.flush_audit();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("down as slow or failing (2 consecutive failures: timeout): draining 20s"),
        "{text}"
    );
    assert!(text.contains(": slow grace over: down"), "{text}");
    assert!(text.contains("found dead during its slow grace"), "{text}");
    assert!(audit::verify(&log).is_ok());
}

#[test]
fn drains_and_overrides_are_restored_before_the_first_plan() {
    use failover_agent::agent::operator_state::{self, Deadline};
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let file = dir.0.join("state").join("lab.state.json");
    let mut cfg = lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![]);
    cfg.backends[2].tier = 1;
    cfg.node.state_file = Some(file.clone());
    assert_eq!(cfg.node.state_file(), file);
    let opts = |operator| ApplyOptions {
        startup_hold: Duration::from_secs(60),
        operator,
        state_file: Some(file.clone()),
        ..ApplyOptions::default()
    };
    let dp = Dataplane::load(lab.pin_dir()).unwrap();
    let mut first = Applier::new(dp, cfg.clone(), opts(Default::default())).unwrap();
    up(&mut first, &["b1", "b2", "b3"]);
    first.set_draining("b1", true, Instant::now()).unwrap();
    assert!(file.exists(), "written at the drain");
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let until = Deadline::after(now, wall, Duration::from_secs(600));
    first
        .set_override("web", planner::Override { to_tier: 1 }, until, now, None)
        .unwrap();
    assert_eq!(ids_in(&map_service(&lab.dp, 80).1), [id(&first, "b3")]);
    drop(first);

    // A new agent: what the file holds is in force from the first plan.
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let loaded = operator_state::restore(&file, &cfg, now, wall)
        .unwrap()
        .unwrap();
    assert!(loaded.dropped.is_empty(), "{:?}", loaded.dropped);
    let dp = Dataplane::load(lab.pin_dir()).unwrap();
    let mut second = Applier::new(dp, cfg.clone(), opts(loaded.state)).unwrap();
    assert!(second.is_draining("b1"));
    let ov = second.override_of("web").unwrap();
    assert_eq!(ov.ov.to_tier, 1);
    assert!(ov.until.remaining(now) > Duration::from_secs(590));
    assert_eq!(second.next_expiry(), Some(ov.until.at()));
    up(&mut second, &["b1", "b2", "b3"]);
    assert_eq!(dp_state(&lab, &second, "b1"), state::DRAINING);
    assert_eq!(ids_in(&map_service(&lab.dp, 80).1), [id(&second, "b3")]);

    // Its end: the override expires and the undrain returns b1; the file
    // goes with the last of the operator state.
    second.expire_overrides(ov.until.at()).unwrap();
    assert!(second.override_of("web").is_none());
    // b2 alone is short of tier 0's capacity: tier 1 spills in.
    assert_eq!(
        ids_in(&map_service(&lab.dp, 80).1),
        [id(&second, "b2"), id(&second, "b3")]
    );
    assert!(file.exists(), "the drain is still there");
    second.set_draining("b1", false, Instant::now()).unwrap();
    assert!(!file.exists());
    let mut ring = vec![id(&second, "b1"), id(&second, "b2")];
    ring.sort_unstable();
    assert_eq!(ids_in(&map_service(&lab.dp, 80).1), ring);
}

#[test]
fn operator_actions_are_checked_by_the_planner_and_forced_ones_audited() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let log = dir.0.join("audit.jsonl");
    let mut cfg = lab_cfg(lab.pin_dir(), &["b1", "b2", "b3"], vec![api_service()]);
    cfg.services[0].policy.min_healthy = 2;
    let mut a = applier(&lab, cfg, Some(Journal::open(&log).unwrap()));
    up(&mut a, &["b1", "b2", "b3"]);
    let drain = |b| planner::Action::Drain { backend: b };
    // web keeps two of three: fine; then b2 would leave web one (floor 2).
    assert_eq!(a.check(drain("b1")), Ok(()));
    a.set_draining("b1", true, Instant::now()).unwrap();
    let r = a.check(drain("b2")).unwrap_err();
    assert_eq!(
        r.to_string(),
        "drain b2 would leave service web with 1 healthy backend taking new flows \
         (now 2; policy.min_healthy 2)"
    );
    // Forced: done, and audited as forced.
    a.operator_drain("b2", true, Instant::now(), Some(&r))
        .unwrap();
    assert!(a.is_draining("b2"));
    // api (floor 1) keeps b3; b3 itself would leave both short.
    let r = a.check(drain("b3")).unwrap_err();
    let short: Vec<&str> = r.short.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(short, ["web", "api"]);

    a.flush_audit();
    let recs = failover_tests::agentproc::read_decisions(&log);
    let forced = recs
        .iter()
        .find(|d| d.reason == "operator (forced): drain b2")
        .expect("forced record");
    assert!(
        forced
            .policy_check
            .starts_with("forced past the floor check: drain b2 would leave"),
        "{forced:?}"
    );
    assert!(
        recs.iter()
            .any(|d| d.service == "web" && d.reason.starts_with("operator (forced): drain b2: ")),
        "the ring switch says so too: {recs:?}"
    );
}

/// A dual-stack `web` (b1 over IPv4, b6 over IPv6) in the real maps: the
/// IPv6 SNAT address in NODE6, b6's address in BACKEND_ADDR6 with its
/// BACKENDS entry's `addr_be` 0, `vip6` in SERVICES6 with a ring of its own
/// holding only b6, one audit record per decision, and the same ids after
/// a restart.
#[test]
fn a_dual_stack_service_programs_the_ipv6_maps() {
    use failover_agent::agent::ids::addr6;
    use failover_common::ServiceKey;
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let log = dir.0.join("audit.jsonl");
    let v6 = |s: &str| -> std::net::Ipv6Addr { s.parse().unwrap() };
    let (snat6, vip6, b6) = (
        v6("2001:db8:100::1"),
        v6("2001:db8::10"),
        v6("2001:db8:2::11"),
    );
    let mut backends = lab_backends();
    backends.push(configs::backend("b6", b6, BPORT));
    let mut cfg = web_config(
        lab.pin_dir(),
        &["b1", "b6"],
        vec![],
        backends,
        configs::tcp_probe(),
    );
    cfg.node.snat_addresses = vec![SNAT.into(), snat6.into()];
    cfg.services[0].vip6 = Some(vip6);
    let cfg = configs::checked(&cfg);
    let mut a = applier(&lab, cfg.clone(), Some(Journal::open(&log).unwrap()));
    up(&mut a, &["b1", "b2", "b3", "b6"]);

    assert_eq!(lab.dp.node6().unwrap().snat, addr6(snat6));
    let b6_id = id(&a, "b6");
    let entry = lab.dp.backend(b6_id).unwrap();
    assert_eq!(
        (entry.addr_be, u16::from_be(entry.port_be), entry.state),
        (0, BPORT, state::UP)
    );
    assert_eq!(lab.dp.backend_addr6(b6_id).unwrap(), addr6(b6));

    let key6 = ServiceKey {
        vip_be: addr6(vip6),
        port_be: 80u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let s6 = lab.dp.service6(&key6).unwrap().expect("SERVICES6 entry");
    assert_eq!(s6.id, a.ids().service("web/v6").unwrap().id);
    let (s4, ring4) = map_service(&lab.dp, 80);
    assert_ne!(s4.id, s6.id, "a ring per VIP");
    assert_eq!(s4.generation, s6.generation, "both VIPs switch together");
    let ring6 = read_ring(&lab.dp, s6.id, s6.active_slot, s6.ring_size).unwrap();
    assert!(ring6.iter().all(|&i| i == b6_id), "{ring6:?}");
    let b1_id = id(&a, "b1");
    assert!(ring4.iter().all(|&i| i == b1_id), "{ring4:?}");
    // IPv4 traffic still goes to b1.
    let (be, _) = open_flow(&lab, 52_000);
    assert_eq!(be, backend_addr(1));

    a.flush_audit();
    drop(a);
    let report = audit::verify(&log).unwrap();
    assert_eq!(report.records, 2, "one record per decision, not per VIP");

    // A restart finds both VIPs' ids and b6's address in the pins.
    let b = applier(&lab, cfg, None);
    assert_eq!(b.ids().service("web/v6").unwrap().id, s6.id);
    assert_eq!(b.ids().backend("b6").unwrap().id, b6_id);
    assert_eq!(b.programmed("web/v6").unwrap().entry.id, s6.id);
}
