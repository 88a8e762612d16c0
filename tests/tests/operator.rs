//! The operator surface of a running agent: `/metrics` scraped and parsed
//! with a real exposition-format parser, `/healthz` and `/readyz`.
//!
//! Needs root: run through `cargo xtask test`. Each test owns a Lab (a
//! namespace and a pin directory, removed on drop); the agent's listeners
//! live in that namespace's loopback.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use failover_agent::{
    agent::{Agent, RunOptions},
    api::{Client, ClientError, FlowQuery},
};
use failover_common::state;
use failover_tests::{
    lab::{CLIENT, Lab, SNAT, VIP},
    netns::require_root,
    packet::Frame,
    scratch::TempDir,
};

/// A TCP "backend" on loopback inside the lab namespace; aborted on drop.
struct Listener {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listener() -> Listener {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    Listener { port, task }
}

/// A backend: name, port, tier.
type B<'a> = (&'a str, u16, u8);

fn yaml(pin: &Path, dir: &Path, backends: &[B]) -> String {
    let names: Vec<&str> = backends.iter().map(|(n, _, _)| *n).collect();
    let mut y = format!(
        "node:
  interfaces: [vc0, va0]
  xdp_mode: skb
  snat_address: {SNAT}
  snat_ports: {{ min: 40000, max: 40999 }}
  pin_path: {pin}
  hash_seed: 7
  metrics_address: 127.0.0.1:0
  api_socket: {sock}
services:
  - name: web
    vip: {VIP}
    port: 80
    protocol: tcp
    backends: [{names}]
    probe: {{ kind: tcp, interval: 20ms, timeout: 200ms, rise: 1, fall: 1 }}
    policy: {{ ring_size: 13 }}
backends:
",
        pin = pin.display(),
        sock = dir.join("agent.sock").display(),
        names = names.join(", "),
    );
    for (n, p, t) in backends {
        y.push_str(&format!(
            "  - {{ name: {n}, address: 127.0.0.1, port: {p}, cloud: c, region: r, jurisdiction: EU, tier: {t} }}\n"
        ));
    }
    y
}

/// The agent running in the background; stopped (and awaited) on drop of
/// the stop sender, bounded by the test's timeouts.
struct Running {
    metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    run: tokio::task::JoinHandle<Result<Agent, failover_agent::agent::AgentError>>,
}

async fn start(lab: &Lab, dir: &TempDir, backends: &[B<'_>]) -> Running {
    let cfg_path = dir.0.join("failover.yaml");
    std::fs::write(&cfg_path, yaml(lab.pin_dir(), &dir.0, backends)).unwrap();
    let mut opts = RunOptions::new(&cfg_path);
    opts.sighup = false;
    let agent = Agent::start(opts).await.expect("agent starts");
    let metrics = agent.metrics_addr().expect("metrics listener bound");
    assert!(metrics.ip().is_loopback(), "{metrics}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    Running {
        metrics,
        stop: Some(stop),
        run,
    }
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let agent = tokio::time::timeout(Duration::from_secs(5), &mut self.run)
            .await
            .expect("agent stops in time")
            .unwrap()
            .unwrap();
        drop(agent);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.run.abort();
    }
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
    mut cond: impl FnMut(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(addr).await;
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_and_health_endpoints_of_a_running_agent() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let (l1, l2) = (listener().await, listener().await);
    let agent = start(&lab, &dir, &[("b1", l1.port, 0), ("b2", l2.port, 1)]).await;
    let addr = agent.metrics;

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

    agent.stop().await;
    // The listener goes with the agent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gone = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect attempt bounded");
    assert!(gone.is_err(), "metrics listener closed with the agent");
    drop(l2);
}

async fn wait_status(
    c: &Client,
    what: &str,
    mut cond: impl FnMut(&failover_agent::api::Status) -> bool,
) -> failover_agent::api::Status {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.status().await.expect("status");
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let (l1, l2, l3) = (listener().await, listener().await, listener().await);
    let agent = start(
        &lab,
        &dir,
        &[("b1", l1.port, 0), ("b2", l2.port, 0), ("b3", l3.port, 1)],
    )
    .await;
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
        (b3.tier, b3.health.as_str(), b3.state.as_str()),
        (1, "up", "up")
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
    assert!(msg.contains("last healthy backend"), "{msg}");
    assert_eq!(c.status().await.unwrap().services[0].serving, ["b3"]);
    assert!(!c.drain("b3", false).await.unwrap().changed, "not drained");
    for b in ["b1", "b2"] {
        assert!(c.drain(b, false).await.unwrap().changed);
    }
    let s = c.status().await.unwrap();
    assert_eq!(s.services[0].serving, ["b1", "b2"]);

    // A tier with no allowed backend, a bad duration: refused, no switch.
    let before = s.services[0].generation;
    assert!(before > gen0);
    let (code, msg) = refused(c.failover("web", 5, "1m").await);
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("tier 5"), "{msg}");
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
    let (l1, l2) = (listener().await, listener().await);
    let agent = start(&lab, &dir, &[("b1", l1.port, 0), ("b2", l2.port, 0)]).await;
    let c = Client::new(dir.0.join("agent.sock"));
    wait_status(&c, "all healthy", |s| s.services[0].healthy == 2).await;
    let gen0 = c.status().await.unwrap().services[0].generation;

    // Refusals: nothing would be left; unknown backend; neither target.
    let req = |backend: Option<&str>, tier: Option<u8>| failover_agent::drill::DrillRequest {
        service: "web".into(),
        backend: backend.map(str::to_owned),
        tier,
        for_: "1s".into(),
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
        tokio::time::sleep(Duration::from_millis(2)).await;
        let r = c.drill_report().await.unwrap();
        if r.state == "done" {
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
