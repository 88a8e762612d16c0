//! Weights from model-server load, with the real agent.
//!
//! - A metric outage (the scrape endpoint closing, answering garbage or
//!   404) falls back to probe-only health: the backends keep serving at
//!   their full weight, no load decision is taken, and every refusal is
//!   counted in `failover_load_scrape_errors_total`. A backend whose load
//!   had lowered its weight goes back to factor 1 once its metrics have
//!   been missing for three intervals.
//! - A backend at half the service rate of its peers, under real client
//!   traffic through the VIP at about 80% of the total capacity, ends
//!   with a lower weight, and its ring holds fewer slots.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent and
//! test backend binaries first).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use failover_agent::{
    agent::states::{DataplaneState, HealthState},
    api::{BackendInfo, Client},
    config::Config,
};
use failover_tests::{
    agentproc::{AgentProc, Scratch},
    configs,
    inproc::{self, Running},
    lab::{self, Lab},
    listener::Listener,
    netns::require_root,
    scratch::TempDir,
    topology::{BACKEND_PORT, CLOUD_A, CLOUD_B, Proc, SNAT, Topology, VIP, testbackend_bin},
    wait::wait_for_value,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loopback HTTP server answering every request with `answer` (a whole
/// response), which the test may swap while it runs.
struct Canned {
    port: u16,
    answer: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Canned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn response(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Canned {
    async fn start(answer: Vec<u8>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new(answer));
        let shared = answer.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answer = shared.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        req.clear();
                        let a = answer.lock().unwrap().clone();
                        if s.write_all(&a).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, answer, task }
    }

    fn set(&self, answer: Vec<u8>) {
        *self.answer.lock().unwrap() = answer;
    }
}

const QUEUED: &str = "# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m\"} 8\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 4\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{model_name=\"m\"} 1\n";

/// The agent's `/metrics` text.
async fn metrics_text(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the series `name{labels}` (labels as exposed), if any.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn errors(text: &str, backend: &str, reason: &str) -> f64 {
    series(
        text,
        &format!("failover_load_scrape_errors_total{{backend=\"{backend}\",reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

fn info<'a>(bs: &'a [BackendInfo], name: &str) -> &'a BackendInfo {
    bs.iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no {name} in {bs:#?}"))
}

fn serving_fully(b: &BackendInfo) -> bool {
    b.health == HealthState::Up
        && b.state == DataplaneState::Up
        && b.effective_weight == b.weight
        && b.load.as_ref().is_some_and(|l| l.factor == 1.0)
}

#[test]
fn a_metric_outage_never_ejects_and_shows_in_metrics() {
    require_root();
    let _s = serial();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(metric_outage());
}

/// The agent runs in this thread's runtime, in the lab's namespace (which
/// [`Lab::new`] enters on this thread).
async fn metric_outage() {
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    // Probes see four live backends (the TCP handshake completes); their
    // metrics: closed at once, garbage, 404, and a queue that then turns
    // to garbage.
    let closing = Listener::start().await;
    let garbage = Canned::start(response(200, "<html>{not: metrics}</html>\n")).await;
    let missing = Canned::start(response(404, "no such page\n")).await;
    let loaded = Canned::start(response(200, QUEUED)).await;
    let lo = |name: &str, port: u16| configs::backend(name, Ipv4Addr::LOCALHOST, port);
    let backends = vec![
        lo("b1", closing.port),
        lo("b2", garbage.port),
        lo("b3", missing.port),
        lo("b4", loaded.port),
    ];
    let probe = configs::fast_tcp_probe_with(json!({
        "load": {"profile": "vllm", "interval": "100ms", "rebuild_interval": "100ms"},
    }));
    let sock = dir.0.join("agent.sock");
    let cfg: Config = lab::web_config(
        lab.pin_dir(),
        Some(&sock),
        &["b1", "b2", "b3", "b4"],
        probe,
        backends,
    );
    let path = dir.0.join("failover.yaml");
    configs::write(&cfg, &path);
    let audit = dir.0.join("audit.jsonl");
    let agent = Running::start(inproc::options(&path, Some(audit.clone()))).await;
    let c = Client::new(&sock);
    let backends = || async { c.backends().await.expect("backends") };

    // b4's queue lowers its weight; the others stay whole.
    let bs = wait_for_value(
        "b4's weight lowered by its load",
        Duration::from_secs(10),
        backends,
        |bs| info(bs, "b4").effective_weight <= 50 && info(bs, "b1").health == HealthState::Up,
    )
    .await;
    let b4 = info(&bs, "b4");
    assert_eq!(b4.health, HealthState::Up, "{b4:?}");
    let figures = b4.load.as_ref().unwrap().figures.unwrap();
    assert_eq!(figures.waiting, 8.0);
    // Its metrics turn to garbage: after three intervals without a good
    // scrape, probe-only health again.
    loaded.set(response(200, "vllm:num_requests_waiting{ 8\n"));
    let bs = wait_for_value(
        "every backend at full weight, metrics refused",
        Duration::from_secs(10),
        backends,
        |bs| {
            ["b1", "b2", "b3", "b4"]
                .iter()
                .all(|n| serving_fully(info(bs, n)))
        },
    )
    .await;
    assert!(
        bs.iter()
            .all(|b| b.load.as_ref().unwrap().figures.is_none()),
        "{bs:#?}"
    );

    // Refusals go on, counted by reason; nothing is ejected meanwhile.
    let addr = agent.metrics();
    let text = wait_for_value(
        "refusals counted",
        Duration::from_secs(10),
        || metrics_text(addr),
        |t| {
            errors(t, "b1", "unreachable") >= 10.0
                && errors(t, "b2", "malformed") >= 10.0
                && errors(t, "b3", "status") >= 10.0
                && errors(t, "b4", "malformed") >= 5.0
        },
    )
    .await;
    for b in ["b1", "b2", "b3", "b4"] {
        assert_eq!(
            series(&text, &format!("failover_load_factor{{backend=\"{b}\"}}")),
            Some(1.0),
            "{b}"
        );
        assert_eq!(
            series(&text, &format!("failover_backend_up{{backend=\"{b}\"}}")),
            Some(1.0),
            "{b}"
        );
    }
    let bs = backends().await;
    for b in ["b1", "b2", "b3", "b4"] {
        assert!(serving_fully(info(&bs, b)), "{:?}", info(&bs, b));
    }
    drop(agent);
    // Every load decision is b4's: down with its queue, back to 1.
    let decisions = failover_tests::agentproc::read_decisions(&audit);
    let load: Vec<_> = decisions
        .iter()
        .filter(|d| d.reason.starts_with("load: "))
        .collect();
    assert!(!load.is_empty(), "{decisions:#?}");
    assert!(
        load.iter().all(|d| !d.reason.contains("b1 ")
            && !d.reason.contains("b2 ")
            && !d.reason.contains("b3 ")),
        "{load:#?}"
    );
    assert!(
        load.iter()
            .any(|d| d.reason.contains("b4 load") && d.reason.contains("metrics missing")),
        "{load:#?}"
    );
    assert!(
        !decisions.iter().any(|d| d.reason.contains("-> down")),
        "{decisions:#?}"
    );
}

/// Starts a test backend with the queue model (`rate` requests a second,
/// `max_running` at once) at `addr` in cloud-b or cloud-a, owned by `topo`
/// (stopped with it); returns once the edge can connect to it.
fn start_queued(topo: &mut Topology, name: &str, in_cloud_b: bool, addr: Ipv4Addr, rate: f64) {
    let ns = if in_cloud_b {
        &topo.cloud_b
    } else {
        &topo.cloud_a
    };
    let listen = SocketAddr::from((addr, BACKEND_PORT));
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, &testbackend_bin().unwrap()])
        .args(["--name", name, "--listen", &listen.to_string()])
        .args(["--service-rate", &rate.to_string(), "--max-running", "4"])
        .args(["--tokens-per-reply", "1", "--token-interval-ms", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn test backend");
    topo.backends.push((name.to_owned(), Proc(child)));
    let _in = topo.edge.enter().unwrap();
    failover_tests::wait::wait_for(
        &format!("backend {name} at {listen}"),
        Duration::from_secs(10),
        || TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok(),
    );
}

/// What the paced clients got.
#[derive(Debug, Default)]
struct Offered {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// One chat completion through the VIP (a new connection each): its
/// status line was 200.
fn chat_once() -> bool {
    let run = || -> std::io::Result<bool> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let body =
            r#"{"model":"tiny-llm","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out.starts_with(b"HTTP/1.1 200"))
    };
    run().unwrap_or(false)
}

/// Paced clients in `topo`'s client namespace: a new request every
/// `1/rate` s, each on its own thread (open loop: a slow answer does not
/// hold the next request back), until `stop`.
fn offer_load(
    topo: &Topology,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> (Arc<Offered>, std::thread::JoinHandle<()>) {
    let ns = topo.client.name.clone();
    let got = Arc::new(Offered::default());
    let out = got.clone();
    let t = std::thread::spawn(move || {
        let every = Duration::from_secs_f64(1.0 / rate);
        let mut next = Instant::now();
        let mut running = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let got = out.clone();
            let ns = ns.clone();
            running.push(std::thread::spawn(move || {
                let _in = failover_tests::netns::enter(&ns).expect("enter the client namespace");
                let c = if chat_once() { &got.ok } else { &got.failed };
                c.fetch_add(1, Ordering::Relaxed);
            }));
            running.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        for h in running {
            let _ = h.join();
        }
    });
    (got, t)
}

#[test]
fn a_half_capacity_backend_ends_with_a_lower_weight_and_the_ring_shows_it() {
    require_root();
    let _s = serial();
    let mut topo = Topology::new().unwrap();
    // 20, 20 and 10 requests a second: 50 in all.
    start_queued(&mut topo, "l1", false, CLOUD_A[0], 20.0);
    start_queued(&mut topo, "l2", false, CLOUD_A[1], 20.0);
    start_queued(&mut topo, "slow", true, CLOUD_B[0], 10.0);
    let scratch = Scratch::new("load").unwrap();
    let mut node = configs::node(&["ec", "ea", "eb"], SNAT, (10_000, 32_767), &topo.pins.0);
    node.api_socket = scratch.0.join("agent.sock");
    node.state_file = Some(scratch.0.join("state.json"));
    node.metrics_address = None;
    let probe = configs::probe(json!({
        "kind": "http", "path": "/health", "interval": "200ms", "timeout": "500ms",
        "load": {"profile": "vllm", "interval": "500ms", "rebuild_interval": "1s"},
    }));
    let eu = ("cloud-a", "eu-west-1", "EU");
    let cfg = Config {
        node,
        services: vec![configs::service(
            "chat",
            VIP,
            80,
            &["l1", "l2", "slow"],
            probe,
        )],
        backends: vec![
            configs::located("l1", CLOUD_A[0], BACKEND_PORT, eu),
            configs::located("l2", CLOUD_A[1], BACKEND_PORT, eu),
            configs::located("slow", CLOUD_B[0], BACKEND_PORT, eu),
        ],
    };
    let cfg: Config = configs::checked(&cfg);
    let mut agent =
        AgentProc::start_with_config(&topo.edge.name, &scratch.0, &configs::to_yaml(&cfg))
            .expect("agent starts");
    agent
        .wait_serving("chat", &["l1", "l2", "slow"], Duration::from_secs(20))
        .unwrap();

    // 80% of the capacity, until the controller settles, then 20 s more. Every 500 ms of those 20 s: the
    // weights the API shows and the ring slots of each backend. (Single
    // snapshots saw: the fast ones' factors dip in turn as their queues
    // come and go.)
    let dp = topo.open_dataplane().unwrap();
    let (_, svc) = dp
        .services()
        .unwrap()
        .into_iter()
        .find(|(k, _)| u16::from_be(k.port_be) == 80)
        .expect("chat in the data plane");
    let addrs = [CLOUD_A[0], CLOUD_A[1], CLOUD_B[0]];
    let ids = addrs.map(|addr| {
        (0..failover_common::MAX_BACKENDS)
            .find(|&i| {
                dp.backend(i).is_ok_and(|b| {
                    b.state != failover_common::state::UNUSED
                        && Ipv4Addr::from(u32::from_be(b.addr_be)) == addr
                })
            })
            .expect("the backend's id")
    });
    let slots = || {
        let (_, now) = dp
            .services()
            .unwrap()
            .into_iter()
            .find(|(_, s)| s.id == svc.id)
            .unwrap();
        let ring = dp.ring(now.id, now.active_slot).unwrap();
        let ring = &ring.backends[..now.ring_size as usize];
        ids.map(|id| ring.iter().filter(|&&x| x == id).count() as f64)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let api = Client::new(&cfg.node.api_socket);
    let names = ["l1", "l2", "slow"];
    let stop = Arc::new(AtomicBool::new(false));
    let (offered, load) = offer_load(&topo, 40.0, stop.clone());
    // The controller settles: until the slow backend's weight is below
    // both peers' (bounded), then the averages are taken.
    failover_tests::wait::wait_for(
        "the slow backend's weight lowered",
        Duration::from_secs(30),
        || {
            let bs = rt.block_on(api.backends()).expect("backends");
            let w = |n| info(&bs, n).effective_weight;
            w("slow") < w("l1") && w("slow") < w("l2")
        },
    );
    let ok_before = offered.ok.load(Ordering::Relaxed);
    let (mut weights, mut ring) = ([0.0; 3], [0.0; 3]);
    let samples = 40;
    for _ in 0..samples {
        std::thread::sleep(Duration::from_millis(500));
        let bs = rt.block_on(api.backends()).expect("backends");
        for (i, n) in names.iter().enumerate() {
            let b = info(&bs, n);
            assert_eq!(
                (b.health, b.state),
                (HealthState::Up, DataplaneState::Up),
                "{b:?}"
            );
            weights[i] += f64::from(b.effective_weight) / f64::from(samples);
        }
        for (i, s) in slots().iter().enumerate() {
            ring[i] += s / f64::from(samples);
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let (ok, failed) = (
        offered.ok.load(Ordering::Relaxed) - ok_before,
        offered.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "over the last 20 s at 40 requests/s ({ok} ok, {failed} failed): mean effective \
         weights {weights:.1?}, mean ring slots {ring:.0?} (l1, l2, slow)"
    );
    // 800 offered in the 20 s window.
    assert!(ok > 600, "{ok} ok, {failed} failed");
    // The slow one with clearly less weight than its peers on average, and
    // fewer ring slots. Its capacity would give it half; runs gave it 0.43
    // of their weight (0.55 to 0.79 with larger controller steps; the fast
    // ones' factors dip in turn as their own queues come and go), and an
    // equal share is 1.
    let fast = f64::midpoint(weights[0], weights[1]);
    assert!(weights[2] < 0.85 * fast, "weights {weights:?}");
    let fast = f64::midpoint(ring[0], ring[1]);
    assert!(ring[2] < 0.85 * fast, "ring slots {ring:?}");
    // Each reweighting is an audited decision with its numbers.
    let decisions = agent.decisions();
    assert!(
        decisions.iter().any(|d| d.reason.starts_with("load: ")
            && d.weights.iter().any(|w| w.backend == "slow"
                && w.load.as_ref().is_some_and(|n| n.factor_to < n.factor_from))),
        "{decisions:#?}"
    );
    agent.check_alive().unwrap();
}
