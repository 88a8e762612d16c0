//! Health probes against real servers on 127.0.0.1: a TCP listener, the
//! OpenAI-compatible test backend (HTTP health, inference), its gRPC health
//! server, and an HTTPS server with a self-signed certificate. Unprivileged.
//! Every wait is bounded, so a broken probe fails a test instead of hanging.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use failover_agent::config;
use failover_agent::health::{
    BackendTarget, DownCause, EventSource, Failure, HealthEvent, HealthState, Probe, ProbeOutcome,
    TlsOptions, build_probe, spawn_prober,
};
use failover_tests::backend::{BackendConfig, Fault, Faults, serve_grpc_health, serve_http};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Upper bound of any single wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {BOUND:?}"))
}

/// Aborts the server task when the test ends, even a failing one.
struct Server {
    addr: SocketAddr,
    faults: Faults,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

async fn http_backend() -> Server {
    let (l, addr) = listener().await;
    let faults = Faults::default();
    let f = faults.clone();
    let task = tokio::spawn(async move {
        serve_http(l, BackendConfig::new("b1"), f).await.unwrap();
    });
    Server { addr, faults, task }
}

async fn grpc_backend() -> Server {
    let (l, addr) = listener().await;
    let faults = Faults::default();
    let f = faults.clone();
    let task = tokio::spawn(async move {
        serve_grpc_health(l, f).await.unwrap();
    });
    Server { addr, faults, task }
}

fn probe_cfg(json: serde_json::Value) -> config::Probe {
    serde_json::from_value(json).expect("valid probe config")
}

fn target(addr: SocketAddr) -> BackendTarget {
    BackendTarget::new("b1", addr)
}

async fn check(p: &impl Probe) -> ProbeOutcome {
    bounded("probe", p.check()).await
}

fn assert_failed(o: &ProbeOutcome, needle: &str) {
    match o {
        ProbeOutcome::Failed { reason, .. } => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            );
        }
        other => panic!("expected a failure with {needle:?}, got {other:?}"),
    }
}

fn assert_degraded(o: &ProbeOutcome, needle: &str) {
    match o {
        ProbeOutcome::Degraded { reason, .. } => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            );
        }
        other => panic!("expected degraded with {needle:?}, got {other:?}"),
    }
}

fn assert_healthy(o: &ProbeOutcome) {
    assert!(
        matches!(o, ProbeOutcome::Healthy { .. }),
        "expected healthy, got {o:?}"
    );
}

async fn next_event(rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
    bounded("health event", rx.recv())
        .await
        .expect("prober alive")
}

/// A TCP proxy to `upstream` that counts the connections it accepts;
/// [`Proxy::cut`] closes every open one, as a backend restart would.
struct Proxy {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    conns: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn new(upstream: SocketAddr) -> Self {
        let (l, addr) = listener().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let (count, set) = (accepted.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                set.lock().unwrap().spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            conns,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection, and waits a moment for the close to
    /// reach the probe. A fixed grace: the probe notices the close only
    /// when its own connection task next runs, which nothing outside it
    /// shows.
    async fn cut(&self) {
        self.conns.lock().unwrap().abort_all();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.conns.lock().unwrap().abort_all();
    }
}

/// Probes of `cfg` through a proxy: several probes share one connection,
/// and after the connections are cut the next probe dials a new one.
async fn reuses_and_redials(upstream: SocketAddr, cfg: serde_json::Value, tls: &TlsOptions) {
    let proxy = Proxy::new(upstream).await;
    let p = build_probe(&target(proxy.addr), &probe_cfg(cfg.clone()), tls).unwrap();
    for _ in 0..5 {
        assert_healthy(&check(&p).await);
    }
    assert_eq!(proxy.accepted(), 1, "{cfg}: one connection for five probes");
    proxy.cut().await;
    for _ in 0..3 {
        assert_healthy(&check(&p).await);
    }
    assert_eq!(proxy.accepted(), 2, "{cfg}: dialled again after the cut");
}

// ---- tcp ----

#[tokio::test]
async fn tcp_connects_to_listener() {
    let (l, addr) = listener().await;
    let accept = tokio::spawn(async move {
        loop {
            let _ = l.accept().await;
        }
    });
    let p = build_probe(
        &target(addr),
        &probe_cfg(serde_json::json!({"kind": "tcp"})),
        &TlsOptions::default(),
    )
    .unwrap();
    for _ in 0..5 {
        assert_healthy(&check(&p).await);
    }
    accept.abort();
}

#[tokio::test]
async fn tcp_closed_port_fails_fast() {
    let (l, addr) = listener().await;
    drop(l);
    let p = build_probe(
        &target(addr),
        &probe_cfg(serde_json::json!({"kind": "tcp"})),
        &TlsOptions::default(),
    )
    .unwrap();
    let start = Instant::now();
    let o = check(&p).await;
    assert_failed(&o, "refused");
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "took {:?}",
        start.elapsed()
    );
}

// ---- http ----

#[tokio::test]
async fn http_status_and_body() {
    let srv = http_backend().await;
    let t = target(srv.addr);
    let tls = TlsOptions::default();
    let health = build_probe(
        &t,
        &probe_cfg(serde_json::json!({"kind": "http", "path": "/health"})),
        &tls,
    )
    .unwrap();
    let body_ok = build_probe(
        &t,
        &probe_cfg(
            serde_json::json!({"kind": "http", "path": "/health", "body_contains": "\"ok\""}),
        ),
        &tls,
    )
    .unwrap();
    let body_bad = build_probe(
        &t,
        &probe_cfg(serde_json::json!({"kind": "http", "path": "/health", "body_contains": "nope"})),
        &tls,
    )
    .unwrap();
    let want_503 = build_probe(
        &t,
        &probe_cfg(serde_json::json!({"kind": "http", "path": "/health", "expect_status": 503})),
        &tls,
    )
    .unwrap();

    assert_healthy(&check(&health).await);
    assert_healthy(&check(&body_ok).await);
    assert_failed(&check(&body_bad).await, "body lacks \"nope\"");
    assert_failed(&check(&want_503).await, "200");

    srv.faults.set(Fault::Unhealthy);
    assert_failed(&check(&health).await, "503");
    assert_healthy(&check(&want_503).await);

    srv.faults.set(Fault::None);
    assert_healthy(&check(&health).await);
}

#[tokio::test]
async fn http_missing_path_and_closed_port_fail() {
    let srv = http_backend().await;
    let tls = TlsOptions::default();
    let p = build_probe(
        &target(srv.addr),
        &probe_cfg(serde_json::json!({"kind": "http", "path": "/nope"})),
        &tls,
    )
    .unwrap();
    assert_failed(&check(&p).await, "404");

    let (l, closed) = listener().await;
    drop(l);
    let p = build_probe(
        &target(closed),
        &probe_cfg(serde_json::json!({"kind": "http", "path": "/health"})),
        &tls,
    )
    .unwrap();
    assert_failed(&check(&p).await, "refused");
}

/// The prober end to end: rise, fall on 503, recovery; probing reuses one
/// keep-alive connection.
#[tokio::test]
async fn http_prober_follows_backend_health() {
    let srv = http_backend().await;
    let cfg = probe_cfg(serde_json::json!({
        "kind": "http", "path": "/health", "interval": "20ms", "timeout": "500ms", "rise": 2, "fall": 2,
    }));
    let (tx, mut rx) = mpsc::channel(16);
    let _prober = spawn_prober(target(srv.addr), &cfg, &TlsOptions::default(), tx, None).unwrap();

    let up = next_event(&mut rx).await;
    assert_eq!(
        (up.from, up.to, up.source),
        (HealthState::Unknown, HealthState::Up, EventSource::Active)
    );
    assert_eq!(&*up.backend, "b1");
    assert!(up.latency.is_some());

    srv.faults.set(Fault::Unhealthy);
    let down = next_event(&mut rx).await;
    assert_eq!((down.from, down.to), (HealthState::Up, HealthState::Down));
    assert!(
        down.reason.as_str().contains("2 consecutive failures")
            && down.reason.as_str().contains("503"),
        "{}",
        down.reason
    );

    srv.faults.set(Fault::None);
    let back = next_event(&mut rx).await;
    assert_eq!((back.from, back.to), (HealthState::Down, HealthState::Up));
}

#[tokio::test]
async fn http_and_inference_keep_their_connection_and_redial_after_a_cut() {
    let srv = http_backend().await;
    let tls = TlsOptions::default();
    reuses_and_redials(
        srv.addr,
        serde_json::json!({"kind": "http", "path": "/health"}),
        &tls,
    )
    .await;
    // Both of its requests on the one connection.
    reuses_and_redials(
        srv.addr,
        serde_json::json!({"kind": "inference", "model": "tiny-llm"}),
        &tls,
    )
    .await;
}

// ---- grpc ----

#[tokio::test]
async fn grpc_health_serving_and_not_serving() {
    let srv = grpc_backend().await;
    let tls = TlsOptions::default();
    let overall = build_probe(
        &target(srv.addr),
        &probe_cfg(serde_json::json!({"kind": "grpc"})),
        &tls,
    )
    .unwrap();
    let named = build_probe(
        &target(srv.addr),
        &probe_cfg(serde_json::json!({"kind": "grpc", "grpc_service": "inference.v1.Chat"})),
        &tls,
    )
    .unwrap();
    assert_healthy(&check(&overall).await);
    assert_healthy(&check(&named).await);

    srv.faults.set(Fault::Unhealthy);
    assert_failed(&check(&overall).await, "NOT_SERVING");
    assert_failed(&check(&named).await, "NOT_SERVING");

    srv.faults.set(Fault::None);
    assert_healthy(&check(&overall).await);
}

#[tokio::test]
async fn grpc_hang_hits_deadline_and_closed_port_fails() {
    let srv = grpc_backend().await;
    let tls = TlsOptions::default();
    let p = build_probe(
        &target(srv.addr),
        &probe_cfg(serde_json::json!({"kind": "grpc", "timeout": "200ms"})),
        &tls,
    )
    .unwrap();
    assert_healthy(&check(&p).await);
    srv.faults.set(Fault::Hang);
    let start = Instant::now();
    let o = check(&p).await;
    assert!(matches!(o, ProbeOutcome::Failed { .. }), "{o:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );

    let (l, closed) = listener().await;
    drop(l);
    let p = build_probe(
        &target(closed),
        &probe_cfg(serde_json::json!({"kind": "grpc"})),
        &tls,
    )
    .unwrap();
    assert!(matches!(check(&p).await, ProbeOutcome::Failed { .. }));
}

#[tokio::test]
async fn grpc_keeps_its_connection_and_redials_after_a_cut() {
    let srv = grpc_backend().await;
    reuses_and_redials(
        srv.addr,
        serde_json::json!({"kind": "grpc"}),
        &TlsOptions::default(),
    )
    .await;
}

// ---- inference ----

/// The generation is due once [`GENERATION`] passed since the last one;
/// the checks between only list the model.
fn inference_cfg(model: &str, budget_ms: u64) -> config::Probe {
    probe_cfg(serde_json::json!({
        "kind": "inference", "model": model, "ttft_budget": format!("{budget_ms}ms"),
        "interval": "50ms", "generation_interval": "50ms", "timeout": "2s", "rise": 1, "fall": 1,
    }))
}

const GENERATION: Duration = Duration::from_millis(50);

#[tokio::test]
async fn inference_healthy_reports_ttft() {
    let srv = http_backend().await;
    let p = build_probe(
        &target(srv.addr),
        &inference_cfg("tiny-llm", 1_000),
        &TlsOptions::default(),
    )
    .unwrap();
    for _ in 0..3 {
        let o = check(&p).await;
        assert_healthy(&o);
        assert!(o.latency().unwrap() < Duration::from_secs(1));
    }
}

#[tokio::test]
async fn inference_unknown_model_is_down() {
    let srv = http_backend().await;
    let p = build_probe(
        &target(srv.addr),
        &inference_cfg("gpt-404", 1_000),
        &TlsOptions::default(),
    )
    .unwrap();
    assert_failed(&check(&p).await, "model gpt-404 not loaded");
}

#[tokio::test]
async fn inference_rate_limited_is_degraded() {
    let srv = http_backend().await;
    let p = build_probe(
        &target(srv.addr),
        &inference_cfg("tiny-llm", 1_000),
        &TlsOptions::default(),
    )
    .unwrap();
    srv.faults.set(Fault::TooManyRequests);
    assert_degraded(&check(&p).await, "429");
    srv.faults.set(Fault::None);
    // Until the next generation, the last one's verdict stands.
    assert_degraded(&check(&p).await, "last generation: rate limited");
    tokio::time::sleep(GENERATION).await;
    assert_healthy(&check(&p).await);
}

#[tokio::test]
async fn inference_slow_first_token_is_degraded() {
    let srv = http_backend().await;
    let p = build_probe(
        &target(srv.addr),
        &inference_cfg("tiny-llm", 100),
        &TlsOptions::default(),
    )
    .unwrap();
    assert_healthy(&check(&p).await);
    srv.faults.set(Fault::Slow(Duration::from_millis(300)));
    tokio::time::sleep(GENERATION).await;
    let o = check(&p).await;
    assert_degraded(&o, "over budget 100ms");
    assert!(o.latency().unwrap() >= Duration::from_millis(300), "{o:?}");
}

/// Through the prober: healthy -> degraded (429) -> down (hang, timeout)
/// -> up.
#[tokio::test]
async fn inference_prober_degrades_and_times_out() {
    let srv = http_backend().await;
    let cfg = probe_cfg(serde_json::json!({
        "kind": "inference", "model": "tiny-llm", "ttft_budget": "1s",
        "interval": "30ms", "generation_interval": "30ms", "timeout": "300ms", "rise": 1, "fall": 1,
    }));
    let (tx, mut rx) = mpsc::channel(16);
    let _prober = spawn_prober(target(srv.addr), &cfg, &TlsOptions::default(), tx, None).unwrap();
    assert_eq!(next_event(&mut rx).await.to, HealthState::Up);

    srv.faults.set(Fault::TooManyRequests);
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.from, ev.to), (HealthState::Up, HealthState::Degraded));
    assert!(ev.reason.as_str().contains("429"), "{}", ev.reason);

    srv.faults.set(Fault::Hang);
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.from, ev.to), (HealthState::Degraded, HealthState::Down));
    assert!(
        ev.reason.as_str().contains("timeout after 300ms"),
        "{}",
        ev.reason
    );
    // Connected, no answer: slow, not gone.
    assert_eq!(ev.reason.failure(), Some(Failure::Timeout));
    assert_eq!(ev.reason.down_cause(), DownCause::Sick);

    srv.faults.set(Fault::None);
    assert_eq!(next_event(&mut rx).await.to, HealthState::Up);
}

// ---- https ----

struct TlsServer {
    addr: SocketAddr,
    ca_file: PathBuf,
    /// TLS handshakes completed: shows whether probes reuse connections.
    handshakes: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// An HTTPS server on 127.0.0.1 with a fresh self-signed certificate for
/// that IP; `/health` answers 200 "ok", anything else 404.
async fn https_backend() -> TlsServer {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};
    use tokio_rustls::rustls;

    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca_file = std::env::temp_dir().join(format!(
        "failover-probe-ca-{}-{:?}.pem",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&ca_file, key.cert.pem()).unwrap();
    let cert = key.cert.der().clone();
    let pkey = rustls::pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], pkey)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let (l, addr) = listener().await;
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                // Failed handshakes are what some tests expect.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let status = if req.uri().path() == "/health" {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"ok")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsServer {
        addr,
        ca_file,
        handshakes,
        task,
    }
}

#[tokio::test]
async fn https_verifies_with_given_ca() {
    let srv = https_backend().await;
    let cfg = probe_cfg(serde_json::json!({"kind": "http", "path": "/health", "tls": true}));
    let t = target(srv.addr);

    let trusted = TlsOptions {
        ca_file: Some(srv.ca_file.clone()),
        ..TlsOptions::default()
    };
    let p = build_probe(&t, &cfg, &trusted).unwrap();
    for _ in 0..10 {
        assert_healthy(&check(&p).await);
    }
    // Keep-alive: ten probes, one TLS handshake.
    assert_eq!(srv.handshakes.load(Ordering::SeqCst), 1);

    // Only the public roots: the self-signed certificate is refused.
    let p = build_probe(&t, &cfg, &TlsOptions::default()).unwrap();
    assert_failed(&check(&p).await, "certificate");

    // Trusted CA but a name the certificate does not carry.
    let wrong_name = TlsOptions {
        server_name: Some("api.example.com".to_owned()),
        ..trusted
    };
    let p = build_probe(&t, &cfg, &wrong_name).unwrap();
    assert_failed(&check(&p).await, "certificate");

    let skip = TlsOptions {
        insecure_skip_verify: true,
        ..TlsOptions::default()
    };
    let p = build_probe(&t, &cfg, &skip).unwrap();
    assert_healthy(&check(&p).await);
}

/// A cut TLS connection is replaced by a new, verified, handshake.
#[tokio::test]
async fn https_redials_after_a_cut_and_verifies_again() {
    let srv = https_backend().await;
    let trusted = TlsOptions {
        ca_file: Some(srv.ca_file.clone()),
        ..TlsOptions::default()
    };
    reuses_and_redials(
        srv.addr,
        serde_json::json!({"kind": "http", "path": "/health", "tls": true}),
        &trusted,
    )
    .await;
    assert_eq!(srv.handshakes.load(Ordering::SeqCst), 2);

    // The new connection is verified like the first: an untrusted
    // certificate fails after the cut too.
    let proxy = Proxy::new(srv.addr).await;
    let cfg = probe_cfg(serde_json::json!({"kind": "http", "path": "/health", "tls": true}));
    let p = build_probe(&target(proxy.addr), &cfg, &TlsOptions::default()).unwrap();
    assert_failed(&check(&p).await, "certificate");
    proxy.cut().await;
    assert_failed(&check(&p).await, "certificate");
}

// ---- gone or failing: the class of each failure ----

/// A TCP listener whose accept queue is full: the kernel drops further
/// SYNs, so a connect is never answered (a blackholed backend, without
/// privileges). The held connection keeps the queue full.
fn unanswering() -> (std::net::TcpListener, std::net::TcpStream, SocketAddr) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let l: std::net::TcpListener = sock.into();
    let addr = l.local_addr().unwrap();
    let held = std::net::TcpStream::connect(addr).unwrap();
    (l, held, addr)
}

/// Each kind's failures carry their class: a backend that refuses or never
/// answers the handshake is dead; one that answers wrongly or too slowly
/// after connecting is sick (its streams in progress may finish).
#[tokio::test]
async fn failures_are_classed_dead_or_sick() {
    let tls = TlsOptions::default();
    let closed = {
        let (l, addr) = listener().await;
        drop(l);
        addr
    };
    let fail = |kind: &str| {
        let extra = match kind {
            "http" => serde_json::json!({"kind": "http", "path": "/health"}),
            "inference" => serde_json::json!({"kind": "inference", "model": "tiny-llm"}),
            "udp" => serde_json::json!({"kind": "udp", "payload": "ping"}),
            k => serde_json::json!({ "kind": k }),
        };
        probe_cfg(extra)
    };
    // Refused: dead, for every kind.
    for kind in ["tcp", "http", "grpc", "inference", "udp"] {
        let p = build_probe(&target(closed), &fail(kind), &tls).unwrap();
        let o = check(&p).await;
        assert_eq!(o.failure(), Some(Failure::Refused), "{kind}: {o:?}");
        assert_eq!(Failure::Refused.cause(), DownCause::Dead);
    }
    // Answered, but not healthy: sick.
    let http = http_backend().await;
    http.faults.set(Fault::Unhealthy);
    let p = build_probe(&target(http.addr), &fail("http"), &tls).unwrap();
    assert_eq!(check(&p).await.failure(), Some(Failure::BadAnswer));
    let grpc = grpc_backend().await;
    grpc.faults.set(Fault::Unhealthy);
    let p = build_probe(&target(grpc.addr), &fail("grpc"), &tls).unwrap();
    let o = check(&p).await;
    assert_eq!(o.failure(), Some(Failure::BadAnswer), "{o:?}");
    assert_failed(&o, "NOT_SERVING");
    let p = build_probe(
        &target(http.addr),
        &inference_cfg("other-model", 1000),
        &tls,
    )
    .unwrap();
    http.faults.set(Fault::None);
    assert_eq!(check(&p).await.failure(), Some(Failure::BadAnswer));
}

/// Through the prober, where the timeout is: a handshake left unanswered
/// is dead; a connected backend that does not answer in time is sick.
#[tokio::test]
async fn a_timeout_in_the_handshake_is_dead_after_it_sick() {
    let (_l, _held, blackhole) = unanswering();
    let srv = http_backend().await;
    srv.faults.set(Fault::Hang);
    for (kind, addr, failure) in [
        ("tcp", blackhole, Failure::Unanswered),
        ("http", blackhole, Failure::Unanswered),
        ("grpc", blackhole, Failure::Unanswered),
        ("inference", blackhole, Failure::Unanswered),
        ("http", srv.addr, Failure::Timeout),
        ("inference", srv.addr, Failure::Timeout),
    ] {
        let mut cfg = serde_json::json!({
            "kind": kind, "interval": "20ms", "timeout": "200ms", "rise": 1, "fall": 1,
        });
        match kind {
            "http" => cfg["path"] = "/health".into(),
            "inference" => cfg["model"] = "tiny-llm".into(),
            _ => {}
        }
        let (tx, mut rx) = mpsc::channel(16);
        let _p = spawn_prober(
            target(addr),
            &probe_cfg(cfg),
            &TlsOptions::default(),
            tx,
            None,
        )
        .unwrap();
        let ev = next_event(&mut rx).await;
        assert_eq!(ev.to, HealthState::Down, "{kind} {addr}: {ev:?}");
        assert_eq!(
            ev.reason.failure(),
            Some(failure),
            "{kind} {addr}: {}",
            ev.reason
        );
        if failure == Failure::Unanswered {
            assert!(
                ev.reason.as_str().contains("handshake unanswered"),
                "{kind}: {}",
                ev.reason
            );
        }
    }
}

/// The UDP probe against a UDP server on loopback: the answer, a wrong
/// answer, and a server gone (ICMP port unreachable: refused).
#[tokio::test]
async fn udp_prober_follows_the_udp_server() {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let reply = Arc::new(std::sync::Mutex::new(b"pong b1".to_vec()));
    let r = reply.clone();
    let server = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if &buf[..n] == b"ping" {
                let out = r.lock().unwrap().clone();
                let _ = sock.send_to(&out, from).await;
            }
        }
    });
    let cfg = probe_cfg(serde_json::json!({
        "kind": "udp", "payload": "ping", "expect_prefix": "pong",
        "interval": "20ms", "timeout": "200ms", "rise": 1, "fall": 1,
    }));
    let (tx, mut rx) = mpsc::channel(16);
    let _p = spawn_prober(target(addr), &cfg, &TlsOptions::default(), tx, None).unwrap();
    assert_eq!(next_event(&mut rx).await.to, HealthState::Up);
    *reply.lock().unwrap() = b"busy".to_vec();
    let ev = next_event(&mut rx).await;
    assert_eq!(ev.to, HealthState::Down);
    assert_eq!(
        ev.reason.failure(),
        Some(Failure::BadAnswer),
        "{}",
        ev.reason
    );
    assert!(
        ev.reason
            .as_str()
            .contains("does not start with \"pong\" (got \"busy\")"),
        "{}",
        ev.reason
    );
    *reply.lock().unwrap() = b"pong".to_vec();
    assert_eq!(next_event(&mut rx).await.to, HealthState::Up);
    server.abort();
    let _ = server.await;
    let ev = next_event(&mut rx).await;
    assert_eq!(ev.to, HealthState::Down);
    assert_eq!(ev.reason.failure(), Some(Failure::Refused), "{}", ev.reason);
    assert_eq!(ev.reason.down_cause(), DownCause::Dead);
}
