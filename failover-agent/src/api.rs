//! The control API: HTTP with JSON bodies on a Unix socket (mode 0600,
//! `node.api_socket`), documented in docs/api.md. The CLI's operator
//! commands use only this; nothing that changes state listens on a
//! network address.
//!
//! The HTTP task owns nothing: each request becomes a [`Command`] for the
//! control loop, which owns the data plane, and waits for its answer.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

use crate::agent::states::{DataplaneState, HealthState};

/// How long a request waits for the control loop.
pub const LOOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest manual override.
pub const MAX_OVERRIDE: Duration = Duration::from_secs(24 * 3600);

/// A refusal or failure, with the HTTP status it is sent with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{error}")]
pub struct ApiError {
    #[serde(skip, default = "bad_request")]
    pub status: u16,
    pub error: String,
}

fn bad_request() -> u16 {
    400
}

impl ApiError {
    pub fn new(status: u16, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(404, error)
    }
    pub fn conflict(error: impl Into<String>) -> Self {
        Self::new(409, error)
    }
    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(403, error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (code, Json(self)).into_response()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OverrideInfo {
    pub tier: u8,
    pub expires_in_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// `vip:port/protocol`
    pub endpoint: String,
    /// Lowest tier taking new flows; none when nothing does.
    pub active_tier: Option<u8>,
    pub generation: u64,
    /// Of `backends`, those the probes find up or degraded.
    pub healthy: usize,
    /// Backends of the pool the sovereignty policy admits: the only ones
    /// the service may ever use.
    pub backends: usize,
    /// Backends of the pool the policy excludes (not in `backends`).
    #[serde(default)]
    pub excluded: usize,
    /// Backends taking new flows.
    pub serving: Vec<String>,
    #[serde(rename = "override")]
    pub override_: Option<OverrideInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub interfaces: Vec<String>,
    /// Every configured interface has the program attached (pinned link).
    pub program_attached: bool,
    pub config_path: String,
    /// 1 at start, +1 per applied config change.
    pub config_generation: u64,
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PassiveSignals {
    pub syns: u64,
    pub synacks: u64,
    pub syn_resets: u64,
    /// SYNs forwarded that were no evidence (data, PSH/URG, options a
    /// backend may ignore).
    #[serde(default)]
    pub syns_ignored: u64,
    /// Last handshake RTT the data plane measured.
    pub rtt_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub name: String,
    /// `address:port`
    pub address: String,
    pub tier: u8,
    /// Configured weight.
    pub weight: u32,
    /// The weight it takes new flows with: `weight` scaled by its health
    /// (0 when down, drained or unknown; a degraded backend's by its
    /// probe's `degraded_weight`) and its load factor; in a fail-open
    /// ring, `weight`.
    #[serde(default)]
    pub effective_weight: u32,
    /// Its model server's load, when its probe has a load facet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadInfo>,
    /// Probe verdict: up, degraded, down, unknown.
    pub health: HealthState,
    /// State in the data plane: up, draining, down, unused.
    pub state: DataplaneState,
    pub draining: bool,
    /// Falls not yet forgotten (flap damping, see `health::state`).
    #[serde(default)]
    pub flaps: u32,
    /// Time left before a recovery is allowed; 0 when not held down.
    #[serde(default)]
    pub hold_down_s: f64,
    /// Time left of its slow grace (down as slow or failing, `DRAINING`
    /// so its streams in progress finish); 0 when none runs.
    #[serde(default)]
    pub grace_s: f64,
    /// Latency of the probe behind the last state change.
    pub probe_latency_ms: Option<f64>,
    pub passive: PassiveSignals,
    /// Flows pinned to it in the flow table now.
    pub flows: usize,
    pub new_flows_total: u64,
    pub services: Vec<String>,
}

/// A backend's load factor and the figures behind it (`crate::load`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadInfo {
    /// The factor its weight carries (1: no load, or metrics missing).
    pub factor: f64,
    /// The last good scrape, while fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<crate::load::Figures>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    pub service: Option<String>,
    pub backend: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub client: String,
    pub vip: String,
    pub protocol: String,
    pub service: String,
    pub backend: String,
    pub nat_port: u16,
    pub age_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flows {
    /// Matching flows in the table.
    pub total: usize,
    /// The oldest `limit` of them.
    pub flows: Vec<FlowInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainReply {
    pub backend: String,
    pub draining: bool,
    /// False when it already was in that state.
    pub changed: bool,
    /// Flows still pinned to it: removal is safe at 0.
    pub in_flight_flows: usize,
    /// Done past a refusal of the floor check (`"force": true`).
    #[serde(default)]
    pub forced: bool,
}

/// Optional body of drain and undrain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Drain even when a service would be left below its floor.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    pub tier: u8,
    /// How long the override lasts, e.g. "10m".
    #[serde(rename = "for")]
    pub for_: String,
    /// Fail over even when the service would be left below its floor
    /// (never past its sovereignty policy).
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverReply {
    pub service: String,
    pub tier: u8,
    pub expires_in_s: f64,
    pub generation: u64,
    pub serving: Vec<String>,
    /// Done past a refusal of the floor check (`"force": true`).
    #[serde(default)]
    pub forced: bool,
}

/// Reply of `DELETE /v1/services/{name}/failover`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CancelReply {
    pub service: String,
    /// False when no override was set.
    pub cancelled: bool,
    pub generation: u64,
    pub serving: Vec<String>,
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A request for the control loop.
#[derive(Debug)]
pub enum Command {
    Status(Reply<Status>),
    Backends(Reply<Vec<BackendInfo>>),
    Flows(FlowQuery, Reply<Flows>),
    Drain {
        backend: String,
        on: bool,
        force: bool,
        reply: Reply<DrainReply>,
    },
    Failover {
        service: String,
        tier: u8,
        duration: Duration,
        force: bool,
        reply: Reply<FailoverReply>,
    },
    /// Ends a service's manual override now.
    CancelFailover {
        service: String,
        reply: Reply<CancelReply>,
    },
    /// Starts a drill; replies with the report as it starts.
    Drill {
        req: crate::drill::DrillRequest,
        duration: Duration,
        reply: Reply<crate::drill::DrillReport>,
    },
    /// The running or last drill.
    DrillReport(Reply<crate::drill::DrillReport>),
}

async fn ask<T>(
    tx: &mpsc::Sender<Command>,
    make: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, ApiError> {
    let (reply, rx) = oneshot::channel();
    let out = tokio::time::timeout(LOOP_TIMEOUT, async {
        tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    })
    .await
    .ok()
    .flatten();
    out.unwrap_or_else(|| {
        Err(ApiError::new(
            503,
            "the agent's control loop is not answering",
        ))
    })
}

fn respond<T: Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The routes (see docs/api.md).
pub fn router(tx: mpsc::Sender<Command>) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(tx): State<mpsc::Sender<Command>>| async move {
                respond(ask(&tx, Command::Status).await)
            }),
        )
        .route(
            "/v1/backends",
            get(|State(tx): State<mpsc::Sender<Command>>| async move {
                respond(ask(&tx, Command::Backends).await)
            }),
        )
        .route(
            "/v1/flows",
            get(
                |State(tx): State<mpsc::Sender<Command>>, Query(q): Query<FlowQuery>| async move {
                    respond(ask(&tx, |r| Command::Flows(q, r)).await)
                },
            ),
        )
        .route(
            "/v1/backends/{name}/drain",
            post(
                |State(tx): State<mpsc::Sender<Command>>,
                 UrlPath(name): UrlPath<String>,
                 body: bytes::Bytes| async move { drain(&tx, name, true, &body).await },
            ),
        )
        .route(
            "/v1/backends/{name}/undrain",
            post(
                |State(tx): State<mpsc::Sender<Command>>,
                 UrlPath(name): UrlPath<String>,
                 body: bytes::Bytes| async move { drain(&tx, name, false, &body).await },
            ),
        )
        .route(
            "/v1/services/{name}/failover",
            post(
                |State(tx): State<mpsc::Sender<Command>>,
                 UrlPath(name): UrlPath<String>,
                 Json(req): Json<FailoverRequest>| async move {
                    let duration = match parse_duration(&req.for_) {
                        Ok(d) => d,
                        Err(e) => return e.into_response(),
                    };
                    respond(
                        ask(&tx, |reply| Command::Failover {
                            service: name,
                            tier: req.tier,
                            duration,
                            force: req.force,
                            reply,
                        })
                        .await,
                    )
                },
            )
            .delete(
                |State(tx): State<mpsc::Sender<Command>>, UrlPath(name): UrlPath<String>| async move {
                    respond(ask(&tx, |reply| Command::CancelFailover { service: name, reply }).await)
                },
            ),
        )
        .route(
            "/v1/drill",
            post(
                |State(tx): State<mpsc::Sender<Command>>,
                 Json(req): Json<crate::drill::DrillRequest>| async move {
                    let duration = match parse_duration(&req.for_) {
                        Ok(d) if d <= crate::drill::MAX_DRILL => d,
                        Ok(_) => {
                            return ApiError::new(400, "a drill lasts at most 5m").into_response();
                        }
                        Err(e) => return e.into_response(),
                    };
                    respond(
                        ask(&tx, |reply| Command::Drill {
                            req,
                            duration,
                            reply,
                        })
                        .await,
                    )
                },
            )
            .get(|State(tx): State<mpsc::Sender<Command>>| async move {
                respond(ask(&tx, Command::DrillReport).await)
            }),
        )
        .with_state(tx)
}

/// Drain or undrain, with an optional JSON body ([`DrainRequest`]).
async fn drain(tx: &mpsc::Sender<Command>, backend: String, on: bool, body: &[u8]) -> Response {
    let req: DrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return ApiError::new(400, format!("body: {e}")).into_response(),
        }
    };
    respond(
        ask(tx, |reply| Command::Drain {
            backend,
            on,
            force: req.force,
            reply,
        })
        .await,
    )
}

/// An override duration: humantime, above zero, at most [`MAX_OVERRIDE`].
pub fn parse_duration(s: &str) -> Result<Duration, ApiError> {
    let d = humantime::parse_duration(s)
        .map_err(|e| ApiError::new(400, format!("duration {s:?}: {e}")))?;
    if d.is_zero() || d > MAX_OVERRIDE {
        return Err(ApiError::new(
            400,
            format!(
                "duration {s:?} out of range: above 0 and at most {}",
                humantime::format_duration(MAX_OVERRIDE)
            ),
        ));
    }
    Ok(d)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound control socket; the file is removed on drop.
pub struct Socket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Socket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds `path` (mode 0600; a stale file from a dead agent is replaced)
/// and serves `router` on it.
pub async fn serve(path: &Path, router: Router) -> Result<Socket, ServeError> {
    let io = |source| ServeError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "control socket stopped");
        }
    });
    Ok(Socket {
        path: path.to_owned(),
        task,
    })
}

/// Why a CLI request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is listening on {0} (is `failover-agent run` running?)")]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the control socket is for root only (run this as root)")]
    PermissionDenied(PathBuf),
    #[error("{0}")]
    Refused(ApiError),
    #[error("talking to the agent on {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// A client of the control socket.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn protocol(&self, message: impl ToString) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// One request; `body` is sent as JSON.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| match e.kind() {
                // No socket file, or a stale one a dead agent left.
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.path.clone())
                }
                // An agent may well run: saying it does not would mislead.
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::PermissionDenied(self.path.clone())
                }
                _ => self.protocol(format!("connecting: {e}")),
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        let conn = tokio::spawn(conn);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "failover-agent")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| self.protocol(e))?;
        let resp = tokio::time::timeout(LOOP_TIMEOUT * 2, send.send_request(req))
            .await
            .map_err(|_| self.protocol("timed out"))?
            .map_err(|e| self.protocol(e))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        conn.abort();
        if status >= 400 {
            let mut e: ApiError = serde_json::from_slice(&body).unwrap_or_else(|_| {
                ApiError::new(status, String::from_utf8_lossy(&body).into_owned())
            });
            e.status = status;
            return Err(ClientError::Refused(e));
        }
        serde_json::from_slice(&body).map_err(|e| self.protocol(e))
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call("GET", "/v1/status", None).await
    }

    pub async fn backends(&self) -> Result<Vec<BackendInfo>, ClientError> {
        self.call("GET", "/v1/backends", None).await
    }

    pub async fn flows(&self, q: &FlowQuery) -> Result<Flows, ClientError> {
        let mut parts = Vec::new();
        if let Some(s) = &q.service {
            parts.push(format!("service={}", encode(s)));
        }
        if let Some(b) = &q.backend {
            parts.push(format!("backend={}", encode(b)));
        }
        if let Some(l) = q.limit {
            parts.push(format!("limit={l}"));
        }
        let uri = if parts.is_empty() {
            "/v1/flows".to_owned()
        } else {
            format!("/v1/flows?{}", parts.join("&"))
        };
        self.call("GET", &uri, None).await
    }

    pub async fn drain(&self, backend: &str, on: bool) -> Result<DrainReply, ClientError> {
        self.drain_with(backend, on, false).await
    }

    /// Drain or undrain; `force` drains past a refusal of the floor check.
    pub async fn drain_with(
        &self,
        backend: &str,
        on: bool,
        force: bool,
    ) -> Result<DrainReply, ClientError> {
        let verb = if on { "drain" } else { "undrain" };
        self.call(
            "POST",
            &format!("/v1/backends/{}/{verb}", encode(backend)),
            force.then(|| serde_json::json!({ "force": true })),
        )
        .await
    }

    pub async fn failover(
        &self,
        service: &str,
        tier: u8,
        duration: &str,
    ) -> Result<FailoverReply, ClientError> {
        self.failover_with(service, tier, duration, false).await
    }

    /// A manual failover; `force` passes a refusal of the floor check
    /// (never the sovereignty policy).
    pub async fn failover_with(
        &self,
        service: &str,
        tier: u8,
        duration: &str,
        force: bool,
    ) -> Result<FailoverReply, ClientError> {
        self.call(
            "POST",
            &format!("/v1/services/{}/failover", encode(service)),
            Some(serde_json::json!({ "tier": tier, "for": duration, "force": force })),
        )
        .await
    }

    /// Ends `service`'s manual override now.
    pub async fn cancel_failover(&self, service: &str) -> Result<CancelReply, ClientError> {
        self.call(
            "DELETE",
            &format!("/v1/services/{}/failover", encode(service)),
            None,
        )
        .await
    }
}

impl Client {
    pub async fn drill(
        &self,
        req: &crate::drill::DrillRequest,
    ) -> Result<crate::drill::DrillReport, ClientError> {
        let body = serde_json::to_value(req).map_err(|e| self.protocol(e))?;
        self.call("POST", "/v1/drill", Some(body)).await
    }

    pub async fn drill_report(&self) -> Result<crate::drill::DrillReport, ClientError> {
        self.call("GET", "/v1/drill", None).await
    }
}

/// Bytes left as they are in a path segment or query value: names are
/// `A-Z a-z 0-9 - _ .`, but input from a command line may be anything.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("soon").unwrap_err().error.contains("soon"));
    }

    #[test]
    fn names_are_encoded() {
        assert_eq!(encode("gpu-eu_1.a"), "gpu-eu_1.a");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn errors_round_trip_as_json() {
        let e = ApiError::conflict("no");
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"error":"no"}"#);
    }
}
