//! Tests of the test inference backend (HTTP + gRPC health), loopback only.
//! Every test body runs under a timeout so nothing can hang CI.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use failover_tests::backend::{
    BackendConfig, Fault, FaultRequest, Faults, QueueModel, StatsSnapshot, serve_grpc_health,
    serve_http,
};
use failover_tests::wait::wait_for_value;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const TEST_BUDGET: Duration = Duration::from_secs(30);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BUDGET, f)
        .await
        .expect("test exceeded its time budget");
}

/// A backend served in-process; dropping it aborts the server (and its connections).
struct Backend {
    addr: SocketAddr,
    faults: Faults,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(cfg: BackendConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Faults::default();
        let task = tokio::spawn(serve_http(listener, cfg, faults.clone()));
        Self { addr, faults, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn client() -> reqwest::Client {
    // no_proxy: a proxy from the environment must never see loopback test traffic.
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn chat_body(model: &str, max_tokens: Option<usize>, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "say something"}],
        "stream": stream,
    });
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

async fn stats(c: &reqwest::Client, b: &Backend) -> StatsSnapshot {
    c.get(b.url("/admin/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn set_fault(c: &reqwest::Client, b: &Backend, body: Value) {
    let resp = c
        .post(b.url("/admin/fault"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "set fault {body}");
}

/// Reads an SSE body to the end and returns each event's `data:` payload.
async fn sse_events(mut resp: reqwest::Response) -> Vec<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        buf.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(buf).unwrap();
    assert!(text.ends_with("\n\n"), "stream must end with a blank line");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn health_answers_ok_and_503_when_unhealthy() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("h1")).await;
        let c = client();
        let resp = c.get(b.url("/health")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "h1");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v, json!({"status": "ok", "backend": "h1"}));

        b.faults.set(Fault::Unhealthy);
        let resp = c.get(b.url("/health")).send().await.unwrap();
        assert_eq!(resp.status(), 503);

        // Unhealthy only affects health: inference still answers.
        let resp = c
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn models_are_listed_in_openai_format() {
    bounded(async {
        let cfg = BackendConfig {
            models: vec!["tiny-llm".into(), "fraud-scorer".into()],
            ..BackendConfig::new("m1")
        };
        let b = Backend::start(cfg).await;
        let v: Value = client()
            .get(b.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["object"], "model");
                m["id"].as_str().unwrap()
            })
            .collect();
        assert_eq!(ids, ["tiny-llm", "fraud-scorer"]);
    })
    .await;
}

#[tokio::test]
async fn chat_completion_names_the_backend() {
    bounded(async {
        let cfg = BackendConfig {
            tokens_per_reply: 4,
            ..BackendConfig::new("a1")
        };
        let b = Backend::start(cfg).await;
        let resp = client()
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "a1");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "tiny-llm");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(
            choice["message"]["content"],
            "backend a1: token1 token2 token3 token4"
        );
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(v["usage"]["total_tokens"], 6);
    })
    .await;
}

#[tokio::test]
async fn streaming_sends_ordered_chunks_then_done() {
    bounded(async {
        let cfg = BackendConfig {
            token_interval: Duration::from_millis(5),
            ..BackendConfig::new("s1")
        };
        let b = Backend::start(cfg).await;
        let c = client();
        let resp = c
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", Some(6), true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["x-backend"], "s1");
        let events = sse_events(resp).await;
        // preamble + 6 tokens + finish + [DONE]
        assert_eq!(events.len(), 9, "{events:#?}");
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..8]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let id = chunks[0]["id"].clone();
        for ch in &chunks {
            assert_eq!(ch["object"], "chat.completion.chunk");
            assert_eq!(ch["id"], id, "one id per stream");
            assert_eq!(ch["model"], "tiny-llm");
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "backend s1:");
        for (i, ch) in chunks[1..7].iter().enumerate() {
            assert_eq!(
                ch["choices"][0]["delta"]["content"],
                format!(" token{}", i + 1)
            );
            assert!(ch["choices"][0]["finish_reason"].is_null());
        }
        assert_eq!(chunks[7]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[7]["choices"][0]["delta"], json!({}));
        assert_eq!(stats(&c, &b).await.streams_completed, 1);
    })
    .await;
}

#[tokio::test]
async fn long_stream_is_cut_when_the_server_goes_away() {
    bounded(async {
        let cfg = BackendConfig {
            token_interval: Duration::from_millis(10),
            ..BackendConfig::new("long")
        };
        let b = Backend::start(cfg).await;
        let mut resp = client()
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", Some(10_000), true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        // Several token chunks arrive spaced by the interval...
        let mut events = 0;
        while events < 5 {
            let chunk = resp.chunk().await.unwrap().expect("stream ended early");
            events += chunk.windows(6).filter(|w| w == b"data: ").count();
        }
        // ...and dropping the server closes the stream at once, not after 100 s.
        let cut = Instant::now();
        drop(b);
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match resp.chunk().await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            }
        })
        .await
        .expect("stream kept going after the server was dropped");
        assert!(end.is_err(), "an unfinished chunked body must be an error");
        assert!(cut.elapsed() < Duration::from_secs(1));
    })
    .await;
}

#[tokio::test]
async fn unknown_model_is_404_with_openai_error() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("n1")).await;
        let resp = client()
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("no-such-model", None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no-such-model")
        );

        // A malformed body is a 400, also in OpenAI's error shape.
        let resp = client()
            .post(b.url("/v1/chat/completions"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string());
    })
    .await;
}

#[tokio::test]
async fn too_many_requests_is_429_with_retry_after_and_health_stays_up() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("r1")).await;
        let c = client();
        set_fault(&c, &b, json!({"fault": "too_many_requests"})).await;
        assert_eq!(b.faults.get(), Fault::TooManyRequests);
        let resp = c
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "1");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(c.get(b.url("/health")).send().await.unwrap().status(), 200);
        let s = stats(&c, &b).await;
        assert_eq!((s.chat_completions, s.rate_limited, s.health), (1, 1, 1));
    })
    .await;
}

#[tokio::test]
async fn hang_never_answers_until_cleared() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("g1")).await;
        let c = client();
        set_fault(&c, &b, json!({"fault": "hang"})).await;
        let err = c
            .get(b.url("/health"))
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .expect_err("a hung backend must not answer");
        assert!(err.is_timeout(), "{err:?}");
        let err = c
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", None, false))
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .expect_err("a hung backend must not answer");
        assert!(err.is_timeout(), "{err:?}");
        // Clients that gave up are not kept parked on the server.
        let s = wait_for_value(
            "abandoned hung requests dropped",
            Duration::from_secs(1),
            || stats(&c, &b),
            |s| s.in_flight == 0,
        )
        .await;
        assert_eq!(s.in_flight, 0, "abandoned hung requests must be dropped");

        // A request parked by the hang completes once the fault is cleared.
        let parked = tokio::spawn({
            let c = c.clone();
            let url = b.url("/v1/chat/completions");
            async move {
                c.post(url)
                    .json(&chat_body("tiny-llm", None, false))
                    .send()
                    .await
            }
        });
        // Still parked a while later: the sleep is the observation window.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!parked.is_finished());
        // Admin endpoints bypass the hang, so the fault can always be cleared.
        let got: FaultRequest = c
            .get(b.url("/admin/fault"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got, FaultRequest::Hang);
        set_fault(&c, &b, json!({"fault": "none"})).await;
        let resp = parked.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn a_wedged_engine_answers_health_and_models_but_never_generates() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("w1")).await;
        let c = client();
        set_fault(&c, &b, json!({"fault": "wedge"})).await;
        for path in ["/health", "/v1/models"] {
            let r = c.get(b.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path} while wedged");
        }
        // Accepted, and not one byte of an answer.
        let pending = tokio::spawn({
            let c = c.clone();
            let url = b.url("/v1/chat/completions");
            async move {
                c.post(url)
                    .json(&chat_body("tiny-llm", Some(2), false))
                    .send()
                    .await
            }
        });
        wait_for_value(
            "the request reached the backend",
            Duration::from_secs(5),
            || stats(&c, &b),
            |s| s.chat_completions == 1,
        )
        .await;
        // An observation window: nothing may come back during it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pending.is_finished(), "no answer while wedged");
        // Unwedged, the same request completes.
        set_fault(&c, &b, json!({"fault": "none"})).await;
        let r = pending.await.unwrap().unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
}

/// `vllm:<name>` from a /metrics text.
fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("vllm:{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("vllm:{name} in {text}"))
}

#[tokio::test]
async fn the_queue_model_exports_vllm_metrics_and_first_tokens_wait_in_it() {
    bounded(async {
        // 2 at once, 20 a second: each holds its slot 100 ms.
        let cfg = BackendConfig {
            queue: Some(QueueModel {
                service_rate: 20.0,
                max_running: 2,
            }),
            ..BackendConfig::new("q1")
        };
        let b = Backend::start(cfg).await;
        let c = client();
        let idle = c
            .get(b.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(gauge(&idle, "num_requests_waiting"), 0.0);
        assert_eq!(gauge(&idle, "num_requests_running"), 0.0);
        assert_eq!(gauge(&idle, "kv_cache_usage_perc"), 0.0);

        // Six at once: two run, four wait; the last answers after three
        // service times.
        let t0 = Instant::now();
        let mut answers = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let c = c.clone();
            let url = b.url("/v1/chat/completions");
            answers.spawn(async move {
                let r = c
                    .post(url)
                    .json(&chat_body("tiny-llm", Some(1), false))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                t0.elapsed()
            });
        }
        let metrics = || async {
            c.get(b.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        };
        let busy = wait_for_value(
            "four requests waiting",
            Duration::from_secs(5),
            metrics,
            |t| gauge(t, "num_requests_waiting") == 4.0,
        )
        .await;
        assert_eq!(gauge(&busy, "num_requests_running"), 2.0);
        assert_eq!(gauge(&busy, "kv_cache_usage_perc"), 1.0);
        let mut times: Vec<Duration> = answers.join_all().await;
        times.sort();
        assert!(times[0] >= Duration::from_millis(100), "{times:?}");
        assert!(times[5] >= Duration::from_millis(300), "{times:?}");
        assert!(
            times[5] > times[0] * 2,
            "waiting grows the first token's time: {times:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn slow_delays_the_first_byte() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("w1")).await;
        let c = client();
        let delay = Duration::from_millis(300);
        set_fault(&c, &b, json!({"fault": "slow", "delay_ms": 300})).await;
        assert_eq!(b.faults.get(), Fault::Slow(delay));

        let t = Instant::now();
        let resp = c
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(t.elapsed() >= delay, "non-streaming took {:?}", t.elapsed());

        // Streaming: time to first token is at least the delay.
        let t = Instant::now();
        let mut resp = c
            .post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", Some(2), true))
            .send()
            .await
            .unwrap();
        let first = resp.chunk().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "));
        assert!(t.elapsed() >= delay, "first token after {:?}", t.elapsed());

        // Health is not slowed: probes tell "slow" (degraded) from "down".
        let t = Instant::now();
        assert_eq!(c.get(b.url("/health")).send().await.unwrap().status(), 200);
        assert!(t.elapsed() < delay);
    })
    .await;
}

#[tokio::test]
async fn stats_count_requests_and_reset() {
    bounded(async {
        let b = Backend::start(BackendConfig::new("c1")).await;
        let c = client();
        assert_eq!(stats(&c, &b).await.requests, 0);
        for _ in 0..3 {
            c.get(b.url("/health")).send().await.unwrap();
        }
        c.get(b.url("/v1/models")).send().await.unwrap();
        c.post(b.url("/v1/chat/completions"))
            .json(&chat_body("tiny-llm", None, false))
            .send()
            .await
            .unwrap();
        let s = stats(&c, &b).await;
        assert_eq!(s.backend, "c1");
        assert_eq!(
            (s.requests, s.health, s.models, s.chat_completions),
            (5, 3, 1, 1),
            "admin requests are not counted"
        );
        let resp = c.post(b.url("/admin/stats/reset")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(stats(&c, &b).await.requests, 0);
    })
    .await;
}

#[tokio::test]
async fn stats_count_connections_by_peer_address() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(async {
        let b = Backend::start(BackendConfig::new("c1")).await;
        let c = client();
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        let count = |s: &StatsSnapshot| s.peers.get(&lo).map_or(0, |p| p.connections);
        let before = stats(&c, &b).await;
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        // Three new connections (the client above may reuse its own).
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
        }
        let after = stats(&c, &b).await;
        assert!(
            count(&after) >= count(&before) + 3,
            "{before:?} -> {after:?}"
        );
        assert!(after.peers[&lo].last_unix_ms >= t0, "{after:?}");
        c.post(b.url("/admin/stats/reset")).send().await.unwrap();
        assert!(count(&stats(&c, &b).await) <= 1, "reset clears the peers");
    })
    .await;
}

#[tokio::test]
async fn crash_without_hook_stops_the_library_server() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_http(
            listener,
            BackendConfig::new("x1"),
            Faults::default(),
        ));
        let c = client();
        let url = format!("http://{addr}/admin/fault");
        let res = c.post(&url).json(&json!({"fault": "crash"})).send().await;
        assert!(res.is_err(), "a crash never answers: {res:?}");
        let ended = tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("serve_http must return after a crash");
        ended.unwrap().unwrap();
        // The listener is gone: new connections are refused.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    })
    .await;
}

async fn grpc_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn grpc_check(client: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    let resp = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(resp.into_inner().status).unwrap()
}

async fn next_status(stream: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let msg = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("watch sent nothing")
        .unwrap()
        .expect("watch ended");
    ServingStatus::try_from(msg.status).unwrap()
}

#[tokio::test]
async fn grpc_health_follows_the_fault() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Faults::default();
        let server = tokio::spawn(serve_grpc_health(listener, faults.clone()));
        let mut client = grpc_client(addr).await;

        assert_eq!(grpc_check(&mut client).await, ServingStatus::Serving);
        let mut watch = client
            .watch(HealthCheckRequest {
                service: "inference".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

        faults.set(Fault::Unhealthy);
        assert_eq!(grpc_check(&mut client).await, ServingStatus::NotServing);
        assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);

        // Faults other than Unhealthy and Hang leave gRPC health SERVING.
        faults.set(Fault::TooManyRequests);
        assert_eq!(grpc_check(&mut client).await, ServingStatus::Serving);
        assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

        // Hang: Check gets no answer before the client's deadline.
        faults.set(Fault::Hang);
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        req.set_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let hung = tokio::time::timeout(Duration::from_secs(5), client.check(req))
            .await
            .expect("client deadline must fire");
        assert!(hung.is_err());
        assert!(t.elapsed() >= Duration::from_millis(250));
        faults.set(Fault::None);
        assert_eq!(grpc_check(&mut client).await, ServingStatus::Serving);
        server.abort();
    })
    .await;
}

/// The built binary, killed on drop so a failing test leaves no process behind.
struct BinBackend {
    child: tokio::process::Child,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl BinBackend {
    async fn spawn(name: &str) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_failover-testbackend"))
            .args(["--name", name, "--listen", "127.0.0.1:0"])
            .args(["--grpc-listen", "127.0.0.1:0", "--token-interval-ms", "1"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("no start line")
        .unwrap();
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .parse()
                .unwrap()
        };
        assert!(line.contains(&format!("name={name}")), "{line:?}");
        Self {
            http: field("http="),
            grpc: field("grpc="),
            child,
        }
    }

    async fn wait(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .expect("process did not exit")
            .unwrap()
    }
}

#[tokio::test]
async fn binary_crash_fault_exits_the_process_non_zero() {
    bounded(async {
        let mut bin = BinBackend::spawn("bx").await;
        let c = client();
        let resp = c
            .post(format!("http://{}/v1/chat/completions", bin.http))
            .json(&chat_body("tiny-llm", None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-backend"], "bx");
        let mut grpc = grpc_client(bin.grpc).await;
        assert_eq!(grpc_check(&mut grpc).await, ServingStatus::Serving);

        let res = c
            .post(format!("http://{}/admin/fault", bin.http))
            .json(&json!({"fault": "crash"}))
            .send()
            .await;
        assert!(res.is_err(), "a crashing process does not answer");
        let status = bin.wait().await;
        assert!(!status.success());
        assert_eq!(status.code(), Some(1));
        assert!(tokio::net::TcpStream::connect(bin.http).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn binary_exits_cleanly_on_sigterm() {
    bounded(async {
        let mut bin = BinBackend::spawn("bt").await;
        let pid = i32::try_from(bin.child.id().unwrap()).unwrap();
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = bin.wait().await;
        assert!(status.success(), "{status:?}");
    })
    .await;
}

#[test]
fn faults_parse_from_cli_and_json() {
    assert_eq!("none".parse::<Fault>(), Ok(Fault::None));
    assert_eq!("hang".parse::<Fault>(), Ok(Fault::Hang));
    assert_eq!(
        "slow:250".parse::<Fault>(),
        Ok(Fault::Slow(Duration::from_millis(250)))
    );
    assert_eq!("429".parse::<Fault>(), Ok(Fault::TooManyRequests));
    assert_eq!("unhealthy".parse::<Fault>(), Ok(Fault::Unhealthy));
    assert_eq!("wedge".parse::<Fault>(), Ok(Fault::Wedge));
    assert!("slow".parse::<Fault>().is_err());
    assert!("crash".parse::<Fault>().is_err());
    for f in [
        Fault::None,
        Fault::Hang,
        Fault::Slow(Duration::from_millis(7)),
        Fault::TooManyRequests,
        Fault::Unhealthy,
        Fault::Wedge,
    ] {
        assert_eq!(f.to_string().parse::<Fault>(), Ok(f));
        let json = serde_json::to_string(&FaultRequest::from(f)).unwrap();
        let back: FaultRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_fault(), Some(f), "{json}");
    }
    let crash: FaultRequest = serde_json::from_str(r#"{"fault":"crash"}"#).unwrap();
    assert_eq!(crash.to_fault(), None);
}
