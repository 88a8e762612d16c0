//! A real OpenAI-compatible inference backend and a grpc.health.v1 server,
//! with faults that tests (and the demo) switch at runtime.
//!
//! HTTP endpoints (see [`serve_http`]):
//! - `GET /health`: 200 `{"status":"ok","backend":NAME}`, 503 under [`Fault::Unhealthy`].
//! - `GET /v1/models`: OpenAI model list.
//! - `POST /v1/chat/completions`: OpenAI chat completion, or SSE chunks with `"stream": true`.
//! - `GET /metrics`: the queue model ([`QueueModel`]) under vLLM's metric names.
//! - `GET|POST /admin/fault`, `GET /admin/stats`, `POST /admin/stats/reset`: test control.
//!
//! Every non-admin response carries `x-backend: NAME`.

mod faults;
mod grpc_health;
mod openai;

pub use faults::{Fault, FaultRequest, Faults};
pub use grpc_health::serve_grpc_health;
pub use openai::{PeerStats, Stats, StatsSnapshot, serve_http, serve_http_with_stats};

use std::sync::Arc;
use std::time::Duration;

/// Called when `POST /admin/fault {"fault":"crash"}` arrives. The binary
/// exits the process; without a hook the library stops serving instead.
pub type CrashHook = Arc<dyn Fn() + Send + Sync>;

/// What one backend serves and how fast it "generates".
#[derive(Clone)]
pub struct BackendConfig {
    /// Named in every answer (content, `x-backend` header, `/health`).
    pub name: String,
    /// Models listed by `/v1/models`; any other model gets 404.
    pub models: Vec<String>,
    /// Tokens generated when the request has no `max_tokens`.
    pub tokens_per_reply: usize,
    /// Gap between streamed tokens (streaming only; non-streaming answers at once).
    pub token_interval: Duration,
    /// A model server's queue (`None`: every request is served at once).
    pub queue: Option<QueueModel>,
    /// Runs on a "crash" fault request; `None` makes `serve_http` return,
    /// dropping the listener and every open connection.
    pub on_crash: Option<CrashHook>,
}

impl BackendConfig {
    /// A backend named `name` serving the default model `tiny-llm`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            name: "backend".to_string(),
            models: vec![DEFAULT_MODEL.to_string()],
            tokens_per_reply: 8,
            token_interval: Duration::from_millis(10),
            queue: None,
            on_crash: None,
        }
    }
}

/// A model server's capacity, as the load signal sees it: `max_running`
/// requests are served at once, each holding its slot for `max_running /
/// service_rate` seconds before its first token, so the server completes
/// `service_rate` requests a second. Requests beyond that wait in a queue,
/// and their time to first token grows with it. `GET /metrics` exports the
/// state under vLLM's names: `vllm:num_requests_waiting`,
/// `vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (the running
/// share of `max_running`, as a KV cache fills with running sequences).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueModel {
    /// Requests a second.
    pub service_rate: f64,
    pub max_running: usize,
}

impl QueueModel {
    /// How long a request holds its slot before its first token.
    pub fn service_time(&self) -> Duration {
        Duration::from_secs_f64(self.max_running as f64 / self.service_rate.max(f64::MIN_POSITIVE))
    }
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("name", &self.name)
            .field("models", &self.models)
            .field("tokens_per_reply", &self.tokens_per_reply)
            .field("token_interval", &self.token_interval)
            .field("queue", &self.queue)
            .field("on_crash", &self.on_crash.is_some())
            .finish()
    }
}

/// The model served when none is configured.
pub const DEFAULT_MODEL: &str = "tiny-llm";
