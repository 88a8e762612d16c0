//! Dead or slow, end to end: the real agent process in the edge namespace,
//! real backends in two "clouds", real client traffic through the VIP.
//!
//! - A backend whose answers turn slow (time to first token 1.5 s, over
//!   the probe's 1 s timeout) is marked down as *sick*: it takes no new
//!   flow, but stays `DRAINING` for `policy.slow_grace`, so a stream in
//!   progress on it finishes; then `DOWN`. A backend that dies is `DOWN`
//!   at once.
//! - A wedged backend (connections and requests accepted, `/health` and
//!   `/v1/models` 200, no byte of any answer) is caught from the data
//!   plane: it gets no new flow within a second of the wedge. Requests
//!   that a backend legitimately leaves unanswered (a partial request)
//!   only earn a confirming generation, which answers: nothing moves.
//! - A UDP service probed over UDP fails over when a backend's UDP server
//!   dies while its TCP side still answers (a TCP probe would keep it).
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first). Configs are the agent's own types, serialized.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use failover_agent::{
    config::{self, Config},
    health::{Probe, ProbeOutcome, TcpProbe},
};
use failover_common::state;
use failover_tests::{
    agentproc::{self, AgentProc, ProbeTiming, Scratch, World, admin},
    configs,
    netns::{Netns, require_root},
    topology::{CLOUD_A, CLOUD_B, Topology, VIP},
    wait::wait_for,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The topology's config (`chat` over a1, a2, b1, b2), with the control
/// socket and the state file in `dir`, as the agent's own types.
fn base_config(topo: &Topology, dir: &Path) -> Config {
    let mut cfg = configs::checked(&agentproc::config(&topo.pins.0, ProbeTiming::default()));
    cfg.services.retain(|s| s.name == "chat");
    cfg.backends
        .retain(|b| ["a1", "a2", "b1", "b2"].contains(&b.name.as_str()));
    cfg.node.api_socket = dir.join("agent.sock");
    cfg.node.state_file = Some(dir.join("state.json"));
    cfg
}

fn start(topo: &Topology, dir: &Path, cfg: &Config) -> AgentProc {
    // The serialized config is one the agent accepts.
    configs::checked(cfg);
    let yaml = configs::to_yaml(cfg);
    AgentProc::start_with_config(&topo.edge.name, dir, &yaml).expect("agent starts")
}

/// The data-plane id of the backend at `addr`.
fn dp_id(dp: &failover_agent::dataplane::Dataplane, addr: SocketAddr) -> Option<u32> {
    (0..failover_common::MAX_BACKENDS).find(|&i| {
        let b = dp.backend(i).unwrap();
        let at = (
            Ipv4Addr::from(u32::from_be(b.addr_be)),
            u16::from_be(b.port_be),
        );
        b.state != state::UNUSED && SocketAddr::from(at) == addr
    })
}

/// The data-plane state of the backend at `addr`.
fn dp_state(dp: &failover_agent::dataplane::Dataplane, addr: SocketAddr) -> Option<u8> {
    dp_id(dp, addr).map(|i| dp.backend(i).unwrap().state)
}

/// A new connection to VIP:80 from namespace `ns`.
fn connect_vip(ns: &str) -> std::io::Result<TcpStream> {
    let _in = failover_tests::netns::enter(ns).map_err(|e| std::io::Error::other(e.to_string()))?;
    TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(2))
}

/// A streamed one-token chat completion through the VIP from namespace
/// `ns` on a new connection: the backend that answered (its `x-backend`
/// header) once the first byte came, or the error (a wedged backend
/// never sends one: the read times out after `wait`).
fn first_byte(ns: &str, wait: Duration) -> std::io::Result<String> {
    let mut s = connect_vip(ns)?;
    s.set_read_timeout(Some(wait))?;
    let body = r#"{"model":"tiny-llm","stream":true,"max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen).to_string();
    Ok(head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-backend")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default())
}

/// Paced requests (one every `every`, each on its own thread and
/// connection) until `stop`; each result with when it was sent.
fn paced(
    ns: &str,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, std::io::Result<String>)>> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        let mut asks = Vec::new();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let ns = ns.clone();
            let at = Instant::now();
            asks.push((
                at,
                std::thread::spawn(move || first_byte(&ns, Duration::from_secs(3))),
            ));
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        asks.into_iter()
            .map(|(at, t)| (at, t.join().unwrap()))
            .collect()
    })
}

/// The agent serving `chat` from a1 and a2 with the inference probe of
/// the wedge tests: the liveness check every 100 ms, a generation every
/// 5 s (the default), wedge budget 300 ms; a 2 s slow grace.
fn wedge_world(tag: &str) -> World {
    let topo = World::backends(false).unwrap();
    let dp = topo.open_dataplane().unwrap();
    let scratch = Scratch::new(tag).unwrap();
    let mut cfg = base_config(&topo, &scratch.0);
    cfg.services[0].probe = serde_json::from_value(serde_json::json!({
        "kind": "inference", "model": "tiny-llm",
        "interval": "100ms", "timeout": "300ms", "rise": 2, "fall": 2,
    }))
    .unwrap();
    cfg.services[0].policy.slow_grace = Duration::from_secs(2);
    let mut agent = start(&topo, &scratch.0, &cfg);
    agent
        .wait_serving("chat", &["a1", "a2"], Duration::from_secs(20))
        .unwrap();
    World {
        agent,
        dp,
        scratch,
        topo,
    }
}

#[test]
fn a_wedged_backend_gets_no_new_flow_within_a_second_while_its_health_stays_200() {
    require_root();
    let _s = serial();
    // Dropped whole, in World's order (agent first, topology last).
    let w = wedge_world("wedge");
    let (agent, dp, topo) = (&w.agent, &w.dp, &w.topo);
    let (addr, ns) = World::backend(topo, "a1");
    let id = dp_id(dp, addr).expect("a1 in the data plane");
    let new_flows = || dp.backend_stats(id).unwrap().traffic.new_flows;

    // 50 requests a second, each on a new connection, half of them to a1.
    let stop = Arc::new(AtomicBool::new(false));
    let load = paced(&topo.client.name, Duration::from_millis(20), stop.clone());
    wait_for(
        "a1 serving the paced requests",
        Duration::from_secs(5),
        || new_flows() >= 10,
    );
    admin(ns, addr, "/admin/fault", Some(r#"{"fault":"wedge"}"#)).unwrap();
    let wedged = Instant::now();
    // When a1 last got a new flow, read every 5 ms for 2.5 s.
    let mut last = (wedged, new_flows());
    while wedged.elapsed() < Duration::from_millis(2500) {
        let n = new_flows();
        if n != last.1 {
            last = (Instant::now(), n);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let asks = load.join().unwrap();
    let to_no_new_flows = last.0 - wedged;
    let health = {
        let _in = ns.enter().unwrap();
        failover_tests::client::get(addr, "/health", Duration::from_secs(2))
    };
    admin(ns, addr, "/admin/fault", Some(r#"{"fault":"none"}"#)).unwrap();
    eprintln!(
        "a1 wedged: its last new flow {to_no_new_flows:?} after the wedge; {} requests",
        asks.len()
    );
    assert!(
        to_no_new_flows <= Duration::from_secs(1),
        "a1 still got new flows {to_no_new_flows:?} after it wedged"
    );
    let health = health.unwrap();
    assert_eq!(health.status, 200, "a1's health check still passes");
    // Out of the ring as sick: DRAINING for its grace (or DOWN after).
    let st = dp_state(dp, addr);
    assert!(
        st == Some(state::DRAINING) || st == Some(state::DOWN),
        "{st:?}"
    );
    // Requests before the wedge went to both; every request sent 1.2 s
    // after it got its first byte, from a2.
    let before: Vec<_> = asks.iter().filter(|(at, _)| *at < wedged).collect();
    assert!(
        before.iter().any(|(_, r)| r.as_deref().ok() == Some("a1")),
        "a1 served before the wedge"
    );
    let after: Vec<_> = asks
        .iter()
        .filter(|(at, _)| *at > wedged + Duration::from_millis(1200))
        .collect();
    assert!(after.len() > 40, "{}", after.len());
    for (at, r) in &after {
        assert_eq!(
            r.as_deref().ok(),
            Some("a2"),
            "request {:?} after the wedge: {r:?}",
            *at - wedged
        );
    }
    let decisions = agent.decisions();
    assert!(
        decisions
            .iter()
            .any(|d| d.reason.contains("a1 up -> down") && d.reason.contains("wedged")),
        "{decisions:#?}"
    );
}

/// A partial request: the backend waits for the rest of its body and
/// answers nothing, as it should.
fn partial_request(ns: &str) -> std::io::Result<TcpStream> {
    let mut s = connect_vip(ns)?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\n\
         Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n{{\"model\":"
    )?;
    Ok(s)
}

#[test]
fn requests_a_backend_rightly_leaves_unanswered_move_nothing() {
    require_root();
    let _s = serial();
    // Dropped whole, in World's order (agent first, topology last).
    let w = wedge_world("wedge-hostile");
    let (agent, dp, topo) = (&w.agent, &w.dp, &w.topo);
    let decided = agent.decisions().len();
    let (a1, _) = World::backend(topo, "a1");
    let (a2, _) = World::backend(topo, "a2");

    // Alone: 40 partial requests held open for 3 s. Both backends are
    // suspected (silent, with flows waiting), and both answer the
    // confirming generation.
    let held: Vec<TcpStream> = (0..40)
        .map(|_| partial_request(&topo.client.name).unwrap())
        .collect();
    // Until the garbage raised a suspicion and the generation cleared it
    // (bounded: the window is 1.2 s), and held 1 s more.
    wait_for("a wedge suspicion cleared", Duration::from_secs(5), || {
        agent.log_text().contains("wedge suspicion cleared")
    });
    std::thread::sleep(Duration::from_secs(1));
    let log = agent.log_text();
    assert!(
        log.contains("wedge suspected"),
        "the garbage did raise suspicions (else this test shows nothing)"
    );
    assert!(log.contains("wedge suspicion cleared"), "{log}");

    // Beside real traffic: more partial requests while paced real ones
    // run; the backends' answers break the silence.
    let stop = Arc::new(AtomicBool::new(false));
    let load = paced(&topo.client.name, Duration::from_millis(20), stop.clone());
    let more: Vec<TcpStream> = (0..40)
        .map(|_| partial_request(&topo.client.name).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let asks = load.join().unwrap();
    drop((held, more));

    assert!(asks.len() > 100, "{}", asks.len());
    let mut by = std::collections::BTreeMap::<String, usize>::new();
    for (_, r) in &asks {
        let b = r
            .as_ref()
            .unwrap_or_else(|e| panic!("a real request failed: {e}"));
        *by.entry(b.clone()).or_default() += 1;
    }
    assert_eq!(by.keys().collect::<Vec<_>>(), ["a1", "a2"], "{by:?}");
    assert_eq!(dp_state(dp, a1), Some(state::UP));
    assert_eq!(dp_state(dp, a2), Some(state::UP));
    let decisions = agent.decisions();
    assert_eq!(
        decisions.len(),
        decided,
        "no decision: {:#?}",
        &decisions[decided..]
    );
}

/// What a streamed chat completion delivered.
#[derive(Debug)]
struct Streamed {
    backend: String,
    tokens: usize,
    done: bool,
    took: Duration,
}

/// Starts a streamed chat completion of `tokens` tokens through the VIP
/// from the client namespace; returns the backend serving it (from the
/// response head) and the rest of the stream to wait for.
fn start_stream(
    client: &Netns,
    tokens: usize,
) -> (String, std::thread::JoinHandle<std::io::Result<Streamed>>) {
    let ns = client.name.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _in =
            failover_tests::netns::enter(&ns).map_err(|e| std::io::Error::other(e.to_string()))?;
        let t0 = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let body = format!(
            r#"{{"model":"tiny-llm","stream":true,"max_tokens":{tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut backend: Option<String> = None;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if backend.is_none()
                && let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n")
            {
                let head = String::from_utf8_lossy(&seen[..end]).to_string();
                let b = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("x-backend")
                            .then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                let _ = tx.send(b.clone());
                backend = Some(b);
            }
        }
        let text = String::from_utf8_lossy(&seen);
        Ok(Streamed {
            backend: backend.unwrap_or_default(),
            // The role chunk, one per token, the finish chunk, [DONE].
            tokens: text.matches("data: {").count().saturating_sub(2),
            done: text.contains("data: [DONE]"),
            took: t0.elapsed(),
        })
    });
    let backend = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the stream started");
    (backend, t)
}

#[test]
fn a_slow_backend_finishes_its_streams_before_it_goes_down_and_a_dead_one_goes_at_once() {
    require_root();
    let _s = serial();
    let topo = World::backends(false).unwrap();
    let dp = topo.open_dataplane().unwrap();
    let scratch = Scratch::new("slow").unwrap();
    let mut cfg = base_config(&topo, &scratch.0);
    let chat = &mut cfg.services[0];
    chat.probe = serde_json::from_value(serde_json::json!({
        "kind": "inference", "model": "tiny-llm",
        "interval": "200ms", "timeout": "1s", "rise": 2, "fall": 2,
    }))
    .unwrap();
    chat.policy.slow_grace = Duration::from_secs(10);
    let mut agent = start(&topo, &scratch.0, &cfg);
    agent
        .wait_serving("chat", &["a1", "a2"], Duration::from_secs(20))
        .unwrap();

    // A long stream (400 tokens, 20 ms apart: 8 s) on one of them.
    let (victim, stream) = start_stream(&topo.client, 400);
    assert!(victim == "a1" || victim == "a2", "{victim}");
    let other = if victim == "a1" { "a2" } else { "a1" };
    let (addr, ns) = World::backend(&topo, &victim);
    // Its answers turn slow: 1.5 s to the first byte, over the 1 s probe
    // timeout. The stream in progress is not slowed.
    admin(
        ns,
        addr,
        "/admin/fault",
        Some(r#"{"fault":"slow","delay_ms":1500}"#),
    )
    .unwrap();
    let slow_at = Instant::now();
    agent
        .wait_serving("chat", &[other], Duration::from_secs(10))
        .unwrap();
    let detected = slow_at.elapsed();
    // Out of the ring, but DRAINING: no new flows, its flows continue.
    assert_eq!(dp_state(&dp, addr), Some(state::DRAINING));
    {
        let _in = topo.client.enter().unwrap();
        for i in 0..20 {
            let a = failover_tests::client::get(
                SocketAddr::from((VIP, 80)),
                "/health",
                Duration::from_secs(2),
            )
            .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
            assert_eq!((a.status, a.backend.as_str()), (200, other), "request {i}");
        }
    }
    let s = stream.join().unwrap().expect("the stream completes");
    eprintln!("slow backend detected after {detected:?}; stream: {s:?}");
    assert_eq!(s.backend, victim);
    assert!(s.done, "the stream in progress finished: {s:?}");
    assert_eq!(s.tokens, 400, "{s:?}");
    assert!(s.took > detected, "the stream outlived the failover: {s:?}");
    // The grace (10 s from the fall) ends: DOWN.
    wait_for("the end of the slow grace", Duration::from_secs(15), || {
        dp_state(&dp, addr) == Some(state::DOWN)
    });
    let decisions = agent.decisions();
    let note = |b: &str, what: &str| {
        decisions
            .iter()
            .any(|d| d.reason.starts_with(&format!("{b}: {what}")))
    };
    assert!(note(&victim, "down as slow or failing ("), "{decisions:#?}");
    assert!(note(&victim, "slow grace over: down"), "{decisions:#?}");

    // A backend that dies is DOWN at once: no grace.
    let (addr, _) = World::backend(&topo, other);
    World::crash(&topo, other).unwrap();
    let died = Instant::now();
    wait_for("the dead backend down", Duration::from_secs(5), || {
        dp_state(&dp, addr) == Some(state::DOWN)
    });
    eprintln!("dead backend down after {:?}", died.elapsed());
    // Tier 1 takes over; the switch says why.
    let fell = agent
        .wait_serving("chat", &["b1", "b2"], Duration::from_secs(5))
        .unwrap();
    assert!(
        fell.reason.contains(&format!("{other} up -> down")),
        "{fell:?}"
    );
    assert!(
        fell.reason.contains("refused") || fell.reason.contains("passive"),
        "{fell:?}"
    );
    let decisions = agent.decisions();
    assert!(
        !decisions
            .iter()
            .any(|d| d.reason.starts_with(&format!("{other}: down as slow"))),
        "{decisions:#?}"
    );
}

/// A UDP server answering `ping` with `pong NAME` on `addr` in `ns`, and
/// a TCP listener on the same address and port; [`UdpBackend::kill_udp`]
/// stops the UDP side only.
struct UdpBackend {
    stop: Arc<AtomicBool>,
    udp: Option<std::thread::JoinHandle<()>>,
    _tcp: std::net::TcpListener,
}

impl UdpBackend {
    fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Self {
        let _in = ns.enter().unwrap();
        let sock = UdpSocket::bind(addr).unwrap();
        let tcp = std::net::TcpListener::bind(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let answer = format!("pong {name}");
        let udp = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !halt.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf)
                    && buf[..n].starts_with(b"ping")
                {
                    let _ = sock.send_to(answer.as_bytes(), from);
                }
            }
        });
        Self {
            stop,
            udp: Some(udp),
            _tcp: tcp,
        }
    }

    /// The UDP server exits (its port is closed); TCP keeps listening.
    fn kill_udp(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.udp.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.kill_udp();
    }
}

const UDP_PORT: u16 = 9000;

/// One datagram to the VIP's UDP port from `sock` (in the client
/// namespace); the answer, if one came.
fn ask(sock: &UdpSocket) -> Option<String> {
    sock.send(b"ping").ok()?;
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn a_udp_dead_backend_fails_over_while_its_tcp_side_lives() {
    require_root();
    let _s = serial();
    let topo = Topology::new().unwrap();
    let dp = topo.open_dataplane().unwrap();
    let u1 = SocketAddr::from((CLOUD_A[0], UDP_PORT));
    let u2 = SocketAddr::from((CLOUD_B[0], UDP_PORT));
    let mut b1 = UdpBackend::start(&topo.cloud_a, "u1", u1);
    let _b2 = UdpBackend::start(&topo.cloud_b, "u2", u2);
    let scratch = Scratch::new("udp").unwrap();
    let mut cfg = base_config(&topo, &scratch.0);
    let mut embed = cfg.services[0].clone();
    embed.name = "embed".into();
    embed.port = UDP_PORT;
    embed.protocol = config::Protocol::Udp;
    embed.backends = vec!["u1".into(), "u2".into()];
    embed.probe = serde_json::from_value(serde_json::json!({
        "kind": "udp", "payload": "ping", "expect_prefix": "pong",
        "interval": "100ms", "timeout": "300ms", "rise": 2, "fall": 2,
    }))
    .unwrap();
    embed.policy.on_backend_down = config::OnBackendDown::Reselect;
    embed.policy.slow_grace = Duration::ZERO;
    cfg.services = vec![embed];
    let be = |name: &str, addr: SocketAddr, tier: u8| {
        let mut b = cfg.backends[0].clone();
        b.name = name.into();
        b.address = addr.ip();
        b.port = addr.port();
        b.tier = tier;
        b
    };
    let backends = vec![be("u1", u1, 0), be("u2", u2, 1)];
    cfg.backends = backends;
    let mut agent = start(&topo, &scratch.0, &cfg);
    agent
        .wait_serving("embed", &["u1"], Duration::from_secs(20))
        .unwrap();

    // The client's flow: every datagram answered by u1.
    let sock = {
        let _in = topo.client.enter().unwrap();
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((VIP, UDP_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    };
    for i in 0..10 {
        assert_eq!(ask(&sock).as_deref(), Some("pong u1"), "datagram {i}");
    }

    // u1's UDP server dies; its TCP side still answers.
    b1.kill_udp();
    let killed = Instant::now();
    agent
        .wait_serving("embed", &["u2"], Duration::from_secs(10))
        .unwrap();
    eprintln!("UDP failover decided after {:?}", killed.elapsed());
    assert_eq!(dp_state(&dp, u1), Some(state::DOWN));
    let tcp = {
        let _in = topo.edge.enter().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(TcpProbe::new(u1).check())
    };
    assert!(
        matches!(tcp, ProbeOutcome::Healthy { .. }),
        "a TCP probe would have kept u1: {tcp:?}"
    );
    // The same client flow moves to u2 (reselect), datagram after datagram.
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(ask(&sock));
    }
    assert!(
        answers.iter().all(|a| a.as_deref() == Some("pong u2")),
        "{answers:?}"
    );
    let decisions = agent.decisions();
    let fell = decisions
        .iter()
        .find(|d| d.service == "embed" && d.reason.contains("u1 up -> down"))
        .unwrap_or_else(|| panic!("{decisions:#?}"));
    assert!(
        fell.reason.contains("UDP answer from") || fell.reason.contains("timeout after"),
        "{fell:?}"
    );
    agent.check_alive().unwrap();
}
