//! The OpenAI-compatible HTTP server: `/health`, `/v1/models`,
//! `/v1/chat/completions` (JSON or SSE), `/metrics` (the queue model under
//! vLLM's metric names), and the `/admin/*` test controls.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use super::BackendConfig;
use super::faults::{Fault, FaultRequest, Faults};

/// Hard cap on generated tokens, so a typo cannot stream for days.
const MAX_TOKENS_CAP: usize = 1_000_000;

/// Largest request body read while hanging (chat requests are small).
const MAX_BODY: usize = 1 << 20;

/// Request counters, shared and cheap to clone; also served at `GET /admin/stats`.
#[derive(Clone, Debug, Default)]
pub struct Stats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    in_flight: AtomicU64,
    health: AtomicU64,
    models: AtomicU64,
    chat_completions: AtomicU64,
    rate_limited: AtomicU64,
    streams_completed: AtomicU64,
    peers: Mutex<BTreeMap<IpAddr, PeerStats>>,
}

/// A point-in-time copy of [`Stats`], as JSON at `GET /admin/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub backend: String,
    /// Every non-admin request that reached this backend, whatever the answer.
    pub requests: u64,
    /// Non-admin requests whose response head is not out yet (parked by
    /// hang or slow); a client that hangs up leaves this count.
    pub in_flight: u64,
    pub health: u64,
    pub models: u64,
    /// `POST /v1/chat/completions` received (including 404/429 answers).
    pub chat_completions: u64,
    /// Answered 429 because of [`Fault::TooManyRequests`].
    pub rate_limited: u64,
    /// Streams that reached `data: [DONE]`.
    pub streams_completed: u64,
    /// Connections accepted, by the peer's address: a bench tells the
    /// balancer's flows (from its SNAT address) from the agent's probes
    /// (from the edge's own address), and when the last new flow came.
    #[serde(default)]
    pub peers: BTreeMap<IpAddr, PeerStats>,
}

/// Connections accepted from one peer address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    pub connections: u64,
    /// When the last one was accepted, in ms since the Unix epoch (the
    /// wall clock, so that another process on the host can compare).
    pub last_unix_ms: u64,
}

impl Stats {
    pub fn snapshot(&self, backend: &str) -> StatsSnapshot {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            backend: backend.to_string(),
            requests: get(&c.requests),
            in_flight: get(&c.in_flight),
            health: get(&c.health),
            models: get(&c.models),
            chat_completions: get(&c.chat_completions),
            rate_limited: get(&c.rate_limited),
            streams_completed: get(&c.streams_completed),
            peers: self.peers().clone(),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<IpAddr, PeerStats>> {
        self.0.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a connection accepted from `peer`.
    fn accepted(&self, peer: IpAddr) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut peers = self.peers();
        let p = peers.entry(peer).or_default();
        p.connections += 1;
        p.last_unix_ms = now;
    }

    /// Zeroes the totals; `in_flight` is a gauge and stays.
    pub fn reset(&self) {
        let c = &self.0;
        for a in [
            &c.requests,
            &c.health,
            &c.models,
            &c.chat_completions,
            &c.rate_limited,
            &c.streams_completed,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.peers().clear();
    }
}

fn bump(a: &AtomicU64) -> u64 {
    a.fetch_add(1, Ordering::Relaxed) + 1
}

/// Holds one `in_flight` slot; dropped with the request, even a cancelled one.
struct InFlight(Stats);

impl InFlight {
    fn new(stats: &Stats) -> Self {
        bump(&stats.0.in_flight);
        Self(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct AppState {
    cfg: BackendConfig,
    faults: Faults,
    stats: Stats,
    /// Fired by a crash request when there is no `on_crash` hook.
    crash: Notify,
    /// The queue model's slots (`cfg.queue`), and how many wait for one.
    slots: Option<Semaphore>,
    waiting: AtomicU64,
}

type Shared = Arc<AppState>;

/// Serves HTTP/1.1 on `listener` until the future is dropped (which also
/// closes every open connection) or a "crash" fault arrives without an
/// `on_crash` hook (then it returns `Ok(())`, likewise closing everything).
pub async fn serve_http(
    listener: TcpListener,
    cfg: BackendConfig,
    faults: Faults,
) -> io::Result<()> {
    serve_http_with_stats(listener, cfg, faults, Stats::default()).await
}

/// [`serve_http`] with counters the caller can read in-process.
pub async fn serve_http_with_stats(
    listener: TcpListener,
    cfg: BackendConfig,
    faults: Faults,
    stats: Stats,
) -> io::Result<()> {
    let slots = cfg.queue.map(|q| Semaphore::new(q.max_running.max(1)));
    let state = Arc::new(AppState {
        cfg,
        faults,
        stats,
        crash: Notify::new(),
        slots,
        waiting: AtomicU64::new(0),
    });
    let app = router(state.clone());
    // Connections live in this set, so dropping this future drops them all;
    // axum::serve would leave spawned connections (and long streams) running.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // notify_one keeps a permit, so a crash between polls is not lost.
            _ = state.crash.notified() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    state.stats.accepted(peer.ip());
                    // Tokens are tiny writes; don't let Nagle batch them.
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                // EMFILE, ECONNABORTED and friends pass; back off instead of spinning.
                Err(e) => {
                    eprintln!("failover-testbackend: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", get(metrics))
        .route("/admin/fault", get(get_fault).post(set_fault))
        .route("/admin/stats", get(get_stats))
        .route("/admin/stats/reset", post(reset_stats))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), common))
        .with_state(state)
}

/// Counts, hangs and tags every request; admin requests bypass faults so a
/// test can always switch a fault off.
async fn common(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let mut _in_flight = None;
    if !req.uri().path().starts_with("/admin/") {
        bump(&st.stats.0.requests);
        _in_flight = Some(InFlight::new(&st.stats));
        if st.faults.get() == Fault::Hang {
            // Read the body first: hyper notices a client hanging up only once
            // the request is fully read, and then drops this parked request.
            let (parts, body) = req.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
                return StatusCode::PAYLOAD_TOO_LARGE.into_response();
            };
            req = Request::from_parts(parts, Body::from(bytes));
            st.faults.wait_while_hang().await;
        }
    }
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&st.cfg.name) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

/// Delay before the first byte of a `/v1/*` answer under [`Fault::Slow`].
async fn slow(st: &AppState) {
    if let Fault::Slow(d) = st.faults.get() {
        tokio::time::sleep(d).await;
    }
}

fn openai_error(status: StatusCode, message: String, kind: &str, code: &str) -> Response {
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    (status, axum::Json(body)).into_response()
}

async fn not_found(req: Request) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", req.method(), req.uri().path()),
        "invalid_request_error",
        "not_found",
    )
}

/// The queue model's state in Prometheus text, under vLLM's metric names
/// (`GET /metrics`). Without a queue model, an empty queue.
async fn metrics(State(st): State<Shared>) -> Response {
    let (running, max) = match (&st.slots, st.cfg.queue) {
        (Some(slots), Some(q)) => {
            let max = q.max_running.max(1);
            (max - slots.available_permits().min(max), max)
        }
        _ => (0, 1),
    };
    let waiting = st.waiting.load(Ordering::Relaxed);
    let mut text = String::new();
    for model in &st.cfg.models {
        let l = format!("{{model_name=\"{model}\"}}");
        text.push_str(&format!(
            "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{l} {waiting}\n\
             # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{l} {running}\n\
             # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{l} {}\n",
            running as f64 / max as f64
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn health(State(st): State<Shared>) -> Response {
    bump(&st.stats.0.health);
    if st.faults.get() == Fault::Unhealthy {
        let body = json!({ "status": "unhealthy", "backend": st.cfg.name });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(json!({ "status": "ok", "backend": st.cfg.name })).into_response()
}

async fn models(State(st): State<Shared>) -> Response {
    bump(&st.stats.0.models);
    slow(&st).await;
    let data: Vec<Value> = st
        .cfg
        .models
        .iter()
        .map(|m| json!({ "id": m, "object": "model", "created": 0, "owned_by": st.cfg.name }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Rough prompt size: whitespace-separated words of string contents.
fn prompt_tokens(messages: &[Value]) -> usize {
    messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.split_whitespace().count())
        .sum()
}

/// The first piece of every answer names the backend that produced it.
fn preamble(name: &str) -> String {
    format!("backend {name}:")
}

fn token(i: usize) -> String {
    format!(" token{i}")
}

async fn chat_completions(State(st): State<Shared>, body: Bytes) -> Response {
    let n = bump(&st.stats.0.chat_completions);
    if st.faults.get() == Fault::TooManyRequests {
        bump(&st.stats.0.rate_limited);
        let mut resp = openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("backend {} is rate limiting (fault injected)", st.cfg.name),
            "requests",
            "rate_limit_exceeded",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    }
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("invalid chat completion request: {e}"),
                "invalid_request_error",
                "invalid_request",
            );
        }
    };
    if req.messages.is_empty() {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "messages must not be empty".to_string(),
            "invalid_request_error",
            "invalid_request",
        );
    }
    if !st.cfg.models.contains(&req.model) {
        return openai_error(
            StatusCode::NOT_FOUND,
            format!("The model `{}` does not exist", req.model),
            "invalid_request_error",
            "model_not_found",
        );
    }
    let limit = req.max_tokens.or(req.max_completion_tokens);
    let tokens = limit.unwrap_or(st.cfg.tokens_per_reply).min(MAX_TOKENS_CAP);
    // A request limit means generation stopped on it, as OpenAI reports.
    let finish = if limit.is_some() { "length" } else { "stop" };
    let id = format!("chatcmpl-{}-{n}", st.cfg.name);
    let created = unix_now();
    // A wedged engine took the request and never generates.
    st.faults.wait_while(Fault::Wedge).await;
    // The queue model: wait for a slot, then hold it for the service time
    // before the first token (time to first token grows with the queue).
    let _slot = match (&st.slots, st.cfg.queue) {
        (Some(slots), Some(q)) => {
            st.waiting.fetch_add(1, Ordering::Relaxed);
            let permit = slots.acquire().await;
            st.waiting.fetch_sub(1, Ordering::Relaxed);
            tokio::time::sleep(q.service_time()).await;
            permit.ok()
        }
        _ => None,
    };
    slow(&st).await;

    if req.stream {
        return stream_response(st.clone(), id, created, req.model, tokens, finish);
    }
    let mut content = preamble(&st.cfg.name);
    for i in 1..=tokens {
        content.push_str(&token(i));
    }
    let prompt = prompt_tokens(&req.messages);
    axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": tokens,
            "total_tokens": prompt + tokens,
        },
    }))
    .into_response()
}

/// SSE: a role chunk carrying the preamble at once, then one chunk per token
/// every `token_interval`, a finish chunk, and `data: [DONE]`.
fn stream_response(
    st: Shared,
    id: String,
    created: u64,
    model: String,
    tokens: usize,
    finish: &'static str,
) -> Response {
    let chunk = move |delta: Value, finish: Option<&str>| -> Bytes {
        let c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    // Step 0 = preamble, 1..=tokens = tokens, tokens+1 = finish, +2 = [DONE].
    let body = futures_util::stream::unfold(0usize, move |step| {
        let st = st.clone();
        let chunk = chunk.clone();
        async move {
            let out = if step == 0 {
                chunk(
                    json!({ "role": "assistant", "content": preamble(&st.cfg.name) }),
                    None,
                )
            } else if step <= tokens {
                tokio::time::sleep(st.cfg.token_interval).await;
                chunk(json!({ "content": token(step) }), None)
            } else if step == tokens + 1 {
                chunk(json!({}), Some(finish))
            } else if step == tokens + 2 {
                bump(&st.stats.0.streams_completed);
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                return None;
            };
            Some((Ok::<_, Infallible>(out), step + 1))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn get_fault(State(st): State<Shared>) -> Response {
    axum::Json(FaultRequest::from(st.faults.get())).into_response()
}

async fn set_fault(State(st): State<Shared>, body: Bytes) -> Response {
    let req: FaultRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("invalid fault request: {e}"),
                "invalid_request_error",
                "invalid_fault",
            );
        }
    };
    match req.to_fault() {
        Some(f) => {
            st.faults.set(f);
            axum::Json(req).into_response()
        }
        None => {
            match &st.cfg.on_crash {
                Some(hook) => hook(),
                None => st.crash.notify_one(),
            }
            // Like a real crash, never answer: the server drops this connection.
            std::future::pending().await
        }
    }
}

async fn get_stats(State(st): State<Shared>) -> Response {
    axum::Json(st.stats.snapshot(&st.cfg.name)).into_response()
}

async fn reset_stats(State(st): State<Shared>) -> Response {
    st.stats.reset();
    axum::Json(st.stats.snapshot(&st.cfg.name)).into_response()
}
