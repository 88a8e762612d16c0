//! The operator surface of a running agent: `/metrics` scraped and parsed
//! with a real exposition-format parser, `/healthz` and `/readyz`, the
//! control API with its refusals, drills, and the floor check. The CLI
//! binary over the same API is tested in `tests/cli.rs`.
//!
//! Needs root: run through `cargo xtask test`. Each test owns a Lab (a
//! namespace and a pin directory, removed on drop); the agent's listeners
//! live in that namespace's loopback.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use failover_agent::{
    agent::states::{DataplaneState, HealthState},
    api::{Client, ClientError, FlowQuery},
    config,
    drill::DrillState,
};
use failover_common::state;
use failover_tests::{
    agentcli::op,
    configs,
    inproc::Running,
    lab::{CLIENT, Lab, VIP},
    listener::Listener,
    netns::require_root,
    packet::Frame,
    scratch::TempDir,
    wait::wait_for_value,
    webagent::{at, config, listeners, start, wait_status},
};

/// [`at`] on loopback.
fn lo(name: &str, l: &Listener, tier: u8) -> config::Backend {
    at(name, Ipv4Addr::LOCALHOST, l, tier)
}

/// Runs the agent on the lab's `web` over `backends`, probed fast.
async fn start_web(lab: &Lab, dir: &TempDir, backends: Vec<config::Backend>) -> Running {
    let cfg = config(lab, dir, backends, configs::fast_tcp_probe());
    start(dir, &cfg, false).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let r = client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ctype, r.text().await.unwrap())
}

async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, ctype, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(ctype.contains("openmetrics-text"), "{ctype}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parses")
}

/// Value of the sample `metric` with all of `labels`, if there is one.
fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric}: unexpected {other:?}"),
        })
}

fn sum(s: &prometheus_parse::Scrape, metric: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

async fn wait_for_scrape(
    addr: SocketAddr,
    what: &str,
    cond: impl FnMut(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    wait_for_value(what, Duration::from_secs(10), || scrape(addr), cond).await
}

#[tokio::test]
async fn metrics_and_health_endpoints_of_a_running_agent() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let (l1, l2) = (Listener::start().await, Listener::start().await);
    let agent = start_web(&lab, &dir, vec![lo("b1", &l1, 0), lo("b2", &l2, 1)]).await;
    let addr = agent.metrics();

    let (st, _, body) = get(addr, "/healthz").await;
    assert_eq!(st, 200, "{body}");
    let (st, _, body) = get(addr, "/readyz").await;
    assert_eq!(st, 200, "{body}");

    let s = wait_for_scrape(addr, "both backends up", |s| {
        value(s, "failover_backend_up", &[("backend", "b1")]) == Some(1.0)
            && value(s, "failover_backend_up", &[("backend", "b2")]) == Some(1.0)
            && value(s, "failover_service_active_tier", &[("service", "web")]) == Some(0.0)
    })
    .await;
    assert!(value(&s, "failover_ring_generation", &[("service", "web")]).unwrap() >= 1.0);
    assert_eq!(
        value(
            &s,
            "failover_backend_state",
            &[("backend", "b1"), ("state", "up")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "failover_backend_state",
            &[("backend", "b1"), ("state", "down")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "failover_backend_tier", &[("backend", "b2")]),
        Some(1.0)
    );
    assert!(
        value(&s, "failover_build_info", &[]).is_some(),
        "build info"
    );
    assert!(
        s.docs.contains_key("failover_apply_duration_seconds"),
        "{:?}",
        s.docs.keys()
    );

    // Every probe is timed, not only those that change a state: with
    // nothing changing, the count keeps up with the 20 ms interval.
    let probes = |s: &prometheus_parse::Scrape, b: &str| {
        value(
            s,
            "failover_probe_duration_seconds_count",
            &[("backend", b)],
        )
        .unwrap_or(0.0)
    };
    let switches = |s: &prometheus_parse::Scrape| sum(s, "failover_failover_events_total");
    let (p1, p2, sw) = (probes(&s, "b1"), probes(&s, "b2"), switches(&s));
    assert!(p1 >= 1.0 && p2 >= 1.0, "{p1} {p2}");
    let quiet = Duration::from_millis(600);
    // The sleep is the measurement: a quiet window of 30 probe intervals.
    tokio::time::sleep(quiet).await;
    let s = scrape(addr).await;
    // 30 intervals; a loaded machine gets a third of them at least.
    for (b, before) in [("b1", p1), ("b2", p2)] {
        let after = probes(&s, b);
        assert!(
            after >= before + 10.0,
            "{b}: {before} -> {after} probes in {quiet:?}"
        );
        assert_eq!(
            value(
                &s,
                "failover_backend_state",
                &[("backend", b), ("state", "up")]
            ),
            Some(1.0),
            "{b} stayed up"
        );
    }
    assert_eq!(switches(&s), sw, "no ring switch meanwhile");
    assert!(
        value(
            &s,
            "failover_probe_duration_seconds_sum",
            &[("backend", "b2")]
        )
        .unwrap()
            > 0.0,
        "durations summed"
    );

    // Packets through the program show in the verdict counters, read
    // from the per-CPU maps at scrape time.
    let before = sum(&s, "failover_datapath_packets_total");
    for port in 0..3 {
        let _ = lab
            .run(lab.vc0, &Frame::tcp(CLIENT, 50_000 + port, VIP, 80).build())
            .unwrap();
    }
    let s = scrape(addr).await;
    assert!(
        sum(&s, "failover_datapath_packets_total") >= before + 3.0,
        "verdict counters moved"
    );
    assert!(
        value(
            &s,
            "failover_service_new_flows_total",
            &[("service", "web")]
        )
        .is_some(),
        "per-service counters present"
    );

    // b1 dies: the state and the ring switch show.
    drop(l1);
    let s = wait_for_scrape(addr, "b1 down", |s| {
        value(s, "failover_backend_up", &[("backend", "b1")]) == Some(0.0)
            && value(s, "failover_service_active_tier", &[("service", "web")]) == Some(1.0)
    })
    .await;
    assert!(
        value(
            &s,
            "failover_failover_events_total",
            &[("service", "web"), ("reason", "health")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "ring switches counted"
    );
    assert!(
        value(
            &s,
            "failover_last_failover_timestamp_seconds",
            &[("service", "web")]
        )
        .unwrap_or(0.0)
            > 1.0e9
    );

    // b1's failed probes are timed too.
    let p1 = probes(&s, "b1");
    let s = wait_for_scrape(addr, "b1's failed probes counted", |s| {
        probes(s, "b1") >= p1 + 5.0
    })
    .await;
    assert_eq!(
        value(&s, "failover_backend_up", &[("backend", "b1")]),
        Some(0.0)
    );

    agent.stop().await;
    // The listener goes with the agent.
    let connect = || async {
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect attempt bounded")
    };
    let gone = wait_for_value(
        "the metrics listener closed",
        Duration::from_secs(1),
        connect,
        Result::is_err,
    )
    .await;
    assert!(gone.is_err(), "metrics listener closed with the agent");
    drop(l2);
}

/// The refusal's HTTP status and message.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Refused(e)) => (e.status, e.error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn control_api_round_trip_and_refusals() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let (l1, l2, l3) = listeners().await;
    let backends = vec![lo("b1", &l1, 0), lo("b2", &l2, 0), lo("b3", &l3, 1)];
    let agent = start_web(&lab, &dir, backends).await;
    let sock = dir.0.join("agent.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let c = Client::new(&sock);

    let s = wait_status(&c, "all healthy", |s| s.services[0].healthy == 3).await;
    assert!(s.program_attached);
    assert_eq!(s.config_generation, 1);
    let web = &s.services[0];
    assert_eq!((web.name.as_str(), web.active_tier), ("web", Some(0)));
    assert_eq!(web.serving, ["b1", "b2"]);
    let gen0 = web.generation;

    let bs = c.backends().await.unwrap();
    assert_eq!(bs.len(), 3);
    let b3 = bs.iter().find(|b| b.name == "b3").unwrap();
    assert_eq!(
        (b3.tier, b3.health, b3.state),
        (1, HealthState::Up, DataplaneState::Up)
    );
    assert_eq!(b3.services, ["web"]);

    let f = c.flows(&FlowQuery::default()).await.unwrap();
    assert!(f.flows.len() <= f.total);
    let (code, msg) = refused(
        c.flows(&FlowQuery {
            service: Some("nope".into()),
            ..FlowQuery::default()
        })
        .await,
    );
    assert_eq!(code, 404, "{msg}");

    // Unknown names are refused; nothing changes.
    let (code, msg) = refused(c.drain("b9", true).await);
    assert_eq!(code, 404);
    assert!(msg.contains("b9"), "{msg}");

    // Drain b1, then b2: tier 1 takes over. b3 is then the last one.
    let r = c.drain("b1", true).await.unwrap();
    assert!(r.draining && r.changed, "{r:?}");
    assert_eq!(entry_of(&lab, l1.port).state, state::DRAINING);
    c.drain("b2", true).await.unwrap();
    let s = c.status().await.unwrap();
    assert_eq!(s.services[0].active_tier, Some(1), "{s:?}");
    assert_eq!(s.services[0].serving, ["b3"]);
    let (code, msg) = refused(c.drain("b3", true).await);
    assert_eq!(code, 409, "{msg}");
    assert_eq!(
        msg,
        "refused: drain b3 would leave service web with 0 healthy backends taking new flows \
         (now 1; policy.min_healthy 1); force it with --force (\"force\": true)"
    );
    assert_eq!(c.status().await.unwrap().services[0].serving, ["b3"]);
    assert!(!c.drain("b3", false).await.unwrap().changed, "not drained");
    for b in ["b1", "b2"] {
        assert!(c.drain(b, false).await.unwrap().changed);
    }
    let s = c.status().await.unwrap();
    assert_eq!(s.services[0].serving, ["b1", "b2"]);

    // A tier with no backend at all, a bad duration: refused, no switch.
    // (Not the sovereignty policy's doing: 404, not 403.)
    let before = s.services[0].generation;
    assert!(before > gen0);
    let (code, msg) = refused(c.failover("web", 5, "1m").await);
    assert_eq!(code, 404, "{msg}");
    assert_eq!(
        msg,
        "service \"web\" has no backend in tier 5 (its pool's tiers: 0, 1)"
    );
    let (code, _) = refused(c.failover("web", 1, "0s").await);
    assert_eq!(code, 400);
    let (code, _) = refused(c.failover("nope", 1, "1m").await);
    assert_eq!(code, 404);
    assert_eq!(c.status().await.unwrap().services[0].generation, before);

    // A manual failover to tier 1 that ends by itself.
    let r = c.failover("web", 1, "1s").await.unwrap();
    assert_eq!(r.serving, ["b3"], "{r:?}");
    let s = c.status().await.unwrap();
    assert_eq!(s.services[0].override_.as_ref().map(|o| o.tier), Some(1));
    wait_status(&c, "override expired", |s| {
        s.services[0].override_.is_none() && s.services[0].serving == ["b1", "b2"]
    })
    .await;

    agent.stop().await;
    assert!(!sock.exists(), "socket removed with the agent");
    match c.status().await {
        Err(e @ ClientError::NotRunning(_)) => {
            let m = e.to_string();
            assert!(m.contains("no agent is listening on"), "{m}");
            assert!(m.contains(&sock.display().to_string()), "{m}");
        }
        other => panic!("expected NotRunning, got {other:?}"),
    }
    drop((l1, l2, l3));
}

/// The data plane's entry of the backend listening on `port`.
fn entry_of(lab: &Lab, port: u16) -> failover_common::Backend {
    (0..failover_common::MAX_BACKENDS)
        .map(|i| lab.dp.backend(i).unwrap())
        .find(|b| u16::from_be(b.port_be) == port && b.state != state::UNUSED)
        .expect("backend entry")
}

#[tokio::test]
async fn a_drill_moves_traffic_and_restores() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let (l1, l2) = (Listener::start().await, Listener::start().await);
    let agent = start_web(&lab, &dir, vec![lo("b1", &l1, 0), lo("b2", &l2, 0)]).await;
    let c = Client::new(dir.0.join("agent.sock"));
    wait_status(&c, "all healthy", |s| s.services[0].healthy == 2).await;
    let gen0 = c.status().await.unwrap().services[0].generation;

    // Refusals: nothing would be left; unknown backend; neither target.
    let req = |backend: Option<&str>, tier: Option<u8>| failover_agent::drill::DrillRequest {
        service: "web".into(),
        backend: backend.map(str::to_owned),
        tier,
        for_: "1s".into(),
        force: false,
    };
    assert_eq!(refused(c.drill(&req(None, Some(0))).await).0, 409);
    assert_eq!(refused(c.drill(&req(Some("b9"), None)).await).0, 404);
    assert_eq!(refused(c.drill(&req(None, None)).await).0, 400);

    let started = c.drill(&req(Some("b1"), None)).await.unwrap();
    assert_eq!(started.targets, ["b1"]);
    // New flows all the while (BPF_PROG_TEST_RUN through the program).
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut port = 20_000u16;
    let report = loop {
        for _ in 0..5 {
            port += 1;
            let _ = lab
                .run(lab.vc0, &Frame::tcp(CLIENT, port, VIP, 80).build())
                .unwrap();
        }
        // Pacing: five new flows every 2 ms or so while the drill runs.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let r = c.drill_report().await.unwrap();
        if r.state == DrillState::Done {
            break r;
        }
        assert!(Instant::now() < deadline, "drill did not end: {r:?}");
    };
    eprintln!(
        "drill: failover {:?} ms, lost {}, took over {:?}, {} samples",
        report.failover_ms,
        report.lost_packets,
        report.took_over,
        report.samples.len()
    );
    assert!(report.samples.len() > 50, "{}", report.samples.len());
    assert_eq!(report.took_over, ["b2"], "{report:?}");
    let ms = report.failover_ms.expect("failover observed");
    assert!(ms < 100.0, "{ms}");
    let svg = failover_agent::drill::svg(&report);
    assert!(svg.contains("<polyline"));

    // Restored: b1 back in the data plane and serving.
    assert_eq!(entry_of(&lab, l1.port).state, state::UP);
    let s = c.status().await.unwrap();
    assert_eq!(s.services[0].serving, ["b1", "b2"]);
    assert!(s.services[0].generation >= gen0 + 2, "out and back in");
    agent.stop().await;
    drop((l1, l2));
}

#[tokio::test]
async fn the_floor_check_force_and_a_restart_that_keeps_drains_and_overrides() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let (l1, l2, l3) = listeners().await;
    let state_file = dir.0.join("state").join("agent.state.json");
    // web: b1, b2 (tier 0), b3 (tier 1); at least two healthy backends.
    let backends = vec![lo("b1", &l1, 0), lo("b2", &l2, 0), lo("b3", &l3, 1)];
    let mut cfg = config(&lab, &dir, backends, configs::fast_tcp_probe());
    cfg.services[0].policy.min_healthy = 2;
    cfg.node.state_file = Some(state_file.clone());
    let agent = start(&dir, &cfg, true).await;
    let sock = dir.0.join("agent.sock");
    let c = Client::new(&sock);
    let s = wait_status(&c, "all healthy", |s| {
        s.services[0].healthy == 3 && s.services[0].serving == ["b1", "b2"]
    })
    .await;
    let generation = s.services[0].generation;

    // Tier 1 is one backend: a failover there is below the floor of 2,
    // refused (409), and nothing changes.
    let (code, msg) = refused(c.failover("web", 1, "10m").await);
    assert_eq!(code, 409, "{msg}");
    assert_eq!(
        msg,
        "refused: failover web to tier 1 would leave service web with 1 healthy backend \
         taking new flows (now 2; policy.min_healthy 2); force it with --force (\"force\": true)"
    );
    assert_eq!(c.status().await.unwrap().services[0].generation, generation);
    assert!(!state_file.exists(), "a refusal changes nothing");

    // Draining b1 leaves b2 and the spill to b3: two. Then b2 would leave
    // one: refused by the CLI, done with --force, audited as forced.
    op(&sock, &["drain", "b1"]).await.ok();
    assert!(state_file.exists(), "kept for a restart");
    let s = c.status().await.unwrap();
    assert_eq!(s.services[0].serving, ["b2", "b3"]);
    let out = op(&sock, &["drain", "b2"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr
            .starts_with("refused: drain b2 would leave service web with 1 healthy backend"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("--force"), "{out:#?}");
    let out = op(&sock, &["drain", "b2", "--force"]).await.ok();
    assert_eq!(
        out.stdout,
        "b2: draining (forced); 0 flows still on it: safe to remove\n"
    );
    assert_eq!(c.status().await.unwrap().services[0].serving, ["b3"]);
    // A failover that loses nothing now needs no force.
    let r = c.failover("web", 1, "10m").await.unwrap();
    assert!(!r.forced, "{r:?}");
    assert_eq!(r.serving, ["b3"]);

    // A restart: the new agent starts with both drains and the override,
    // before its first plan; nothing ever puts b1 or b2 back in a ring.
    agent.stop().await;
    let agent = start(&dir, &cfg, true).await;
    let s = c.status().await.unwrap();
    let ov = s.services[0].override_.clone().expect("override restored");
    assert_eq!(ov.tier, 1);
    assert!(
        ov.expires_in_s > 590.0 && ov.expires_in_s <= 600.0,
        "{ov:?}"
    );
    assert_eq!(s.services[0].serving, ["b3"]);
    let bs = c.backends().await.unwrap();
    for (b, port) in [("b1", l1.port), ("b2", l2.port)] {
        assert!(bs.iter().find(|x| x.name == b).unwrap().draining, "{b}");
        assert_eq!(entry_of(&lab, port).state, state::DRAINING, "{b}");
    }
    let s = wait_status(&c, "all healthy again", |s| s.services[0].healthy == 3).await;
    assert_eq!(s.services[0].serving, ["b3"]);
    for port in [l1.port, l2.port] {
        assert_eq!(entry_of(&lab, port).state, state::DRAINING);
    }
    // The override ends when the operator says so; the drains stay, and
    // the file goes with the last of them.
    let out = op(&sock, &["failover", "--service", "web", "--cancel"])
        .await
        .ok();
    assert!(
        out.stdout
            .starts_with("web: override cancelled (generation "),
        "{out:#?}"
    );
    let out = op(&sock, &["failover", "--service", "web", "--cancel"])
        .await
        .ok();
    assert_eq!(out.stdout, "web: no override to cancel\n");
    assert!(c.status().await.unwrap().services[0].override_.is_none());
    assert!(state_file.exists());
    for b in ["b1", "b2"] {
        op(&sock, &["undrain", b]).await.ok();
    }
    assert!(!state_file.exists(), "no operator state, no file");
    wait_status(&c, "tier 0 back", |s| s.services[0].serving == ["b1", "b2"]).await;
    agent.stop().await;

    let recs = failover_tests::agentproc::read_decisions(&dir.0.join("audit.jsonl"));
    let reasons: Vec<&str> = recs.iter().map(|r| r.reason.as_str()).collect();
    let forced = recs
        .iter()
        .find(|r| r.reason == "operator (forced): drain b2")
        .unwrap_or_else(|| panic!("{reasons:#?}"));
    assert!(
        forced
            .policy_check
            .starts_with("forced past the floor check: drain b2 would leave service web"),
        "{forced:?}"
    );
    assert!(
        reasons
            .iter()
            .all(|r| !r.starts_with("operator (forced): drain b1")),
        "{reasons:#?}"
    );
    let restored = recs
        .iter()
        .find(|r| r.reason.starts_with("operator state restored from "))
        .unwrap_or_else(|| panic!("{reasons:#?}"));
    assert!(
        restored
            .reason
            .ends_with(": drained [b1, b2]; overrides [web to tier 1 for 10m]"),
        "{restored:?}"
    );
    assert_eq!(restored.policy_check, "restored before the first plan");
    failover_agent::audit::verify(&dir.0.join("audit.jsonl")).unwrap();
    drop((l1, l2, l3));
}
