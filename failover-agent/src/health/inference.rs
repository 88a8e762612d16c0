//! OpenAI-compatible inference probe: the model must be listed by
//! `GET /v1/models` on every probe (the liveness check), and a one-token
//! streamed chat completion for it must produce its first SSE data chunk
//! within the time-to-first-token budget.
//!
//! Verdicts: model missing, errors, other non-2xx answers -> failed;
//! HTTP 429 or a first token later than the budget -> degraded (the backend
//! still serves, so it keeps a lower weight instead of losing its traffic).
//!
//! The generation costs GPU time, so it runs only once every
//! `generation_interval` (default [`GENERATION_EVERY`]), and on every probe
//! after one that failed (or a generation its timeout cut short), until one
//! succeeds: `fall` failures in a row still take `fall` probes, not `fall`
//! intervals, and a backend comes back only through a generation. Between generations a
//! probe repeats the last generation's degraded verdict: a listed model
//! says nothing about a slow first token. Whether the engine still
//! generates in between comes from the data plane (`wedge`): a suspicion
//! runs one generation at once ([`InferenceProbe::generate_now`]).
//! With 100 backends probed every 100 ms that is 1,000 model lists and 20
//! generations a second, where every probe used to generate (1,000 a
//! second).

use std::borrow::Cow;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hyper::{StatusCode, Uri};
use serde::Deserialize;

use super::failure::Fault;
use super::h1::Response;
use super::http::{BODY_LIMIT, KeepAlive, Session, contains, request_path};
use super::tls::TlsOptions;
use super::{BackendTarget, Failure, Probe, ProbeError, ProbeOutcome};

/// Most bytes scanned for the first `data:` line of the stream.
const SSE_SCAN_LIMIT: usize = 4 * 1024;

/// Default of `generation_interval`.
pub const GENERATION_EVERY: Duration = Duration::from_secs(5);

/// The last generation that produced a first token.
#[derive(Clone, Debug)]
struct Generated {
    at: Instant,
    /// Its degraded reason (429, slow first token), repeated until the
    /// next generation.
    degraded: Option<(Duration, String)>,
}

#[derive(Debug)]
pub struct InferenceProbe {
    client: KeepAlive,
    /// The two requests, built once.
    models_request: Box<[u8]>,
    chat_request: Box<[u8]>,
    chat_path: Uri,
    model: String,
    ttft_budget: Option<Duration>,
    timeout: Duration,
    generation_every: Duration,
    /// `None`: generate on the next probe (none yet, or the last failed).
    generated: Mutex<Option<Generated>>,
}

#[derive(Deserialize)]
struct ModelList<'a> {
    #[serde(borrow)]
    data: Vec<ModelEntry<'a>>,
}

#[derive(Deserialize)]
struct ModelEntry<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// Why a generation did not produce a first token.
enum NoToken {
    /// A non-2xx answer, after `latency`.
    Status(StatusCode, Duration),
    /// The request failed, or a 2xx answer whose stream failed or carried
    /// no data line.
    Stream(Fault),
}

impl InferenceProbe {
    /// `base_path` prefixes the OpenAI routes (e.g. `/openai` for a gateway;
    /// empty or `/` for none).
    pub fn new(
        target: &BackendTarget,
        base_path: &str,
        model: &str,
        ttft_budget: Option<Duration>,
        generation_every: Duration,
        tls: Option<&TlsOptions>,
        timeout: Duration,
    ) -> Result<Self, ProbeError> {
        let base = base_path.trim_end_matches('/');
        let chat_body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "stream": true,
        });
        let client = KeepAlive::new(target, tls, timeout)?;
        let chat_path = request_path(&format!("{base}/v1/chat/completions"))?;
        Ok(Self {
            models_request: client.request(
                "GET",
                &request_path(&format!("{base}/v1/models"))?,
                &[],
                b"",
            ),
            chat_request: client.request(
                "POST",
                &chat_path,
                &[
                    ("Content-Type", "application/json"),
                    ("Accept", "text/event-stream"),
                ],
                chat_body.to_string().as_bytes(),
            ),
            client,
            chat_path,
            model: model.to_owned(),
            ttft_budget,
            timeout,
            generation_every,
            generated: Mutex::new(None),
        })
    }

    fn generated(&self) -> MutexGuard<'_, Option<Generated>> {
        self.generated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One generation now, whatever is due: the data plane suspects the
    /// engine hangs. The prober bounds it with the probe's timeout.
    pub async fn generate_now(&self) -> ProbeOutcome {
        let deadline = Instant::now() + self.timeout;
        let mut session = self.client.session();
        self.generate(&mut session, deadline).await
    }

    /// The generation's verdict, remembered for the probes until the next.
    async fn generate(&self, session: &mut Session<'_>, deadline: Instant) -> ProbeOutcome {
        // Forgotten first: a generation its timeout cuts short (a hung
        // engine) leaves the next probe to generate, not to trust an old
        // success.
        self.generated().take();
        let outcome = match self.first_token(session, deadline).await {
            Ok(outcome) => outcome,
            Err(NoToken::Status(StatusCode::TOO_MANY_REQUESTS, latency)) => rate_limited(latency),
            Err(NoToken::Status(status, _)) => not_ok(status),
            Err(NoToken::Stream(fault)) => fault.into(),
        };
        *self.generated() = match &outcome {
            ProbeOutcome::Healthy { .. } => Some(Generated {
                at: Instant::now(),
                degraded: None,
            }),
            ProbeOutcome::Degraded { latency, reason } => Some(Generated {
                at: Instant::now(),
                degraded: Some((*latency, reason.clone())),
            }),
            ProbeOutcome::Failed { .. } => None,
        };
        outcome
    }
}

impl Probe for InferenceProbe {
    async fn check(&self) -> ProbeOutcome {
        let deadline = Instant::now() + self.timeout;
        let mut session = self.client.session();
        let listed_at = Instant::now();
        match self.model_loaded(&mut session).await {
            Ok(None) => {}
            Ok(Some(degraded)) => return degraded,
            Err(fault) => {
                // Back from any failure only through a generation.
                self.generated().take();
                return fault.into();
            }
        }
        // Taken, not read: a probe cut short by its timeout generates on
        // the next one.
        let last = self.generated().take();
        match last {
            Some(g) if g.at.elapsed() < self.generation_every => {
                let outcome = match &g.degraded {
                    Some((latency, reason)) => ProbeOutcome::Degraded {
                        latency: *latency,
                        reason: format!("last generation: {reason}"),
                    },
                    None => ProbeOutcome::Healthy {
                        latency: listed_at.elapsed(),
                    },
                };
                *self.generated() = Some(g);
                outcome
            }
            _ => self.generate(&mut session, deadline).await,
        }
    }

    async fn confirm(&self) -> Option<ProbeOutcome> {
        Some(self.generate_now().await)
    }

    fn timed_out(&self) -> Failure {
        self.client.timed_out()
    }
}

impl InferenceProbe {
    /// `Ok(None)` when the model is listed; `Ok(Some(..))` for a rate limit.
    async fn model_loaded(&self, session: &mut Session<'_>) -> Result<Option<ProbeOutcome>, Fault> {
        let start = Instant::now();
        let bad = |reason: String| Fault::new(Failure::BadAnswer, reason);
        let mut resp = session
            .send(&self.models_request)
            .await
            .map_err(|e| e.context("GET /v1/models"))?;
        let (body, complete) = resp
            .read_body(BODY_LIMIT, true)
            .await
            .map_err(|e| Fault::new(Failure::Broken, e))?;
        let status = resp.status;
        drop(resp);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(Some(rate_limited(start.elapsed())));
        }
        if !status.is_success() {
            return Err(bad(format!("GET /v1/models answered {status}")));
        }
        if !complete {
            return Err(bad(format!("GET /v1/models: list over {BODY_LIMIT} bytes")));
        }
        let list: ModelList<'_> = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("GET /v1/models: bad JSON: {e}")))?;
        if list.data.iter().any(|m| m.id == self.model) {
            Ok(None)
        } else {
            Err(bad(format!("model {} not loaded", self.model)))
        }
    }

    /// The generation: healthy or degraded by its time to first token.
    async fn first_token(
        &self,
        session: &mut Session<'_>,
        deadline: Instant,
    ) -> Result<ProbeOutcome, NoToken> {
        let sent = Instant::now();
        let mut resp = session
            .send(&self.chat_request)
            .await
            .map_err(|e| NoToken::Stream(e.context(format_args!("POST {}", self.chat_path))))?;
        let status = resp.status;
        if !status.is_success() {
            let latency = sent.elapsed();
            // Read to its end, the answer leaves the connection reusable.
            drain(&mut resp, deadline).await;
            return Err(NoToken::Status(status, latency));
        }
        let ttft = first_data(&mut resp, sent).await.map_err(NoToken::Stream)?;
        // max_tokens = 1 ends the stream right away; finishing it keeps the
        // connection for the next probe.
        drain(&mut resp, deadline).await;
        Ok(match self.ttft_budget {
            Some(budget) if ttft > budget => ProbeOutcome::Degraded {
                latency: ttft,
                reason: format!("time to first token {ttft:?} over budget {budget:?}"),
            },
            _ => ProbeOutcome::Healthy { latency: ttft },
        })
    }
}

fn rate_limited(latency: Duration) -> ProbeOutcome {
    ProbeOutcome::Degraded {
        latency,
        reason: "rate limited (HTTP 429)".to_owned(),
    }
}

fn not_ok(status: StatusCode) -> ProbeOutcome {
    ProbeOutcome::failed(
        Failure::BadAnswer,
        format!("POST /v1/chat/completions answered {status}"),
    )
}

/// Time from `sent` to the first SSE `data:` line.
async fn first_data(resp: &mut Response<'_>, sent: Instant) -> Result<Duration, Fault> {
    let mut seen = Vec::new();
    while let Some(data) = resp
        .chunk()
        .await
        .map_err(|e| Fault::new(Failure::Broken, format!("reading stream: {e}")))?
    {
        let at = sent.elapsed();
        seen.extend_from_slice(&data[..data.len().min(SSE_SCAN_LIMIT - seen.len())]);
        if contains(&seen, b"data:") {
            return Ok(at);
        }
        if seen.len() >= SSE_SCAN_LIMIT {
            return Err(Fault::new(
                Failure::BadAnswer,
                "stream has no SSE data line",
            ));
        }
    }
    Err(Fault::new(
        Failure::Broken,
        "stream ended before the first token",
    ))
}

/// Reads the rest of a body until it ends or `deadline` passes; a body
/// still open then is dropped unread, and its connection with it.
async fn drain(resp: &mut Response<'_>, deadline: Instant) {
    let rest = async { while let Ok(Some(_)) = resp.chunk().await {} };
    let _ = tokio::time::timeout_at(deadline.into(), rest).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_list_parses_borrowed() {
        let body =
            br#"{"object":"list","data":[{"id":"tiny-llm","object":"model"},{"id":"other"}]}"#;
        let list: ModelList<'_> = serde_json::from_slice(body).unwrap();
        let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_ref()).collect();
        assert_eq!(ids, ["tiny-llm", "other"]);
    }

    #[tokio::test]
    async fn request_body_asks_for_one_streamed_token() {
        let t = BackendTarget::new("a", "127.0.0.1:1".parse().unwrap());
        let p = InferenceProbe::new(
            &t,
            "/",
            "m",
            None,
            GENERATION_EVERY,
            None,
            Duration::from_secs(1),
        )
        .unwrap();
        let req = std::str::from_utf8(&p.chat_request).unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["model"], "m");
    }

    #[tokio::test]
    async fn the_configured_path_prefixes_both_routes() {
        let t = BackendTarget::new("a", "127.0.0.1:1".parse().unwrap());
        let cfg = |path: Option<&str>| -> crate::config::Probe {
            let mut v = serde_json::json!({"kind": "inference", "model": "m"});
            if let Some(p) = path {
                v["path"] = p.into();
            }
            serde_json::from_value(v).unwrap()
        };
        let heads = |path: Option<&str>| {
            let probe = crate::health::build_probe(&t, &cfg(path), &Default::default()).unwrap();
            let crate::health::AnyProbe::Inference(p) = probe else {
                panic!("an inference probe");
            };
            let line = |req: &[u8]| {
                let text = std::str::from_utf8(req).unwrap();
                text.lines().next().unwrap().to_owned()
            };
            (line(&p.models_request), line(&p.chat_request))
        };
        assert_eq!(
            heads(Some("/openai/")),
            (
                "GET /openai/v1/models HTTP/1.1".to_owned(),
                "POST /openai/v1/chat/completions HTTP/1.1".to_owned()
            )
        );
        assert_eq!(
            heads(None),
            (
                "GET /v1/models HTTP/1.1".to_owned(),
                "POST /v1/chat/completions HTTP/1.1".to_owned()
            )
        );
    }

    /// An OpenAI-compatible server whose model list, handling of unknown
    /// models and failures the test sets; counts both routes.
    #[derive(Default)]
    struct Server {
        models: Mutex<Vec<String>>,
        /// Answer 404 for a model not listed (as vLLM and OpenAI do);
        /// otherwise generate whatever the request names.
        honour_model: std::sync::atomic::AtomicBool,
        fail: std::sync::atomic::AtomicBool,
        /// Take 1 s before answering a generation (a hung engine).
        stall: std::sync::atomic::AtomicBool,
        lists: std::sync::atomic::AtomicUsize,
        chats: std::sync::atomic::AtomicUsize,
    }

    async fn serve(srv: std::sync::Arc<Server>) -> BackendTarget {
        use axum::extract::State;
        use axum::http::header::CONTENT_TYPE;
        use axum::routing::{get, post};
        use std::sync::atomic::Ordering::SeqCst;
        type St = State<std::sync::Arc<Server>>;

        async fn list(State(s): St) -> axum::Json<serde_json::Value> {
            s.lists.fetch_add(1, SeqCst);
            let ids = s.models.lock().unwrap().clone();
            let data: Vec<_> = ids.iter().map(|m| serde_json::json!({"id": m})).collect();
            axum::Json(serde_json::json!({"object": "list", "data": data}))
        }
        async fn chat(
            State(s): St,
            axum::Json(req): axum::Json<serde_json::Value>,
        ) -> (
            StatusCode,
            [(axum::http::HeaderName, &'static str); 1],
            &'static str,
        ) {
            s.chats.fetch_add(1, SeqCst);
            if s.stall.load(SeqCst) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let model = req["model"].as_str().unwrap_or_default().to_owned();
            if s.fail.load(SeqCst) {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(CONTENT_TYPE, "text/plain")],
                    "",
                );
            }
            if s.honour_model.load(SeqCst) && !s.models.lock().unwrap().contains(&model) {
                return (
                    StatusCode::NOT_FOUND,
                    [(CONTENT_TYPE, "application/json")],
                    "{}",
                );
            }
            let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
            (StatusCode::OK, [(CONTENT_TYPE, "text/event-stream")], sse)
        }

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = BackendTarget::new("b", l.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/v1/models", get(list))
            .route("/v1/chat/completions", post(chat))
            .with_state(srv);
        tokio::spawn(async move { axum::serve(l, app).await });
        t
    }

    fn counts(srv: &Server) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (srv.lists.load(SeqCst), srv.chats.load(SeqCst))
    }

    async fn setup(honour_model: bool) -> (std::sync::Arc<Server>, InferenceProbe) {
        let srv = std::sync::Arc::new(Server::default());
        srv.models.lock().unwrap().push("m".to_owned());
        srv.honour_model
            .store(honour_model, std::sync::atomic::Ordering::SeqCst);
        let t = serve(srv.clone()).await;
        let p = InferenceProbe::new(
            &t,
            "",
            "m",
            None,
            Duration::from_millis(500),
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        (srv, p)
    }

    fn healthy(o: &ProbeOutcome) {
        assert!(matches!(o, ProbeOutcome::Healthy { .. }), "{o:?}");
    }

    #[tokio::test]
    async fn generation_only_when_due_and_after_a_failure() {
        use std::sync::atomic::Ordering::SeqCst;
        let (srv, p) = setup(false).await;
        healthy(&p.check().await);
        assert_eq!(counts(&srv), (1, 1));
        healthy(&p.check().await);
        healthy(&p.check().await);
        assert_eq!(counts(&srv), (3, 1), "generation not due: the list only");

        tokio::time::sleep(Duration::from_millis(600)).await;
        srv.fail.store(true, SeqCst);
        let o = p.check().await;
        assert_eq!(
            o.reason(),
            Some("POST /v1/chat/completions answered 500 Internal Server Error")
        );
        // After a failure every probe generates until one succeeds.
        let o = p.check().await;
        assert!(o.failure().is_some(), "{o:?}");
        srv.fail.store(false, SeqCst);
        healthy(&p.check().await);
        healthy(&p.check().await);
        assert_eq!(counts(&srv), (7, 4));

        // The model gone from the list fails the next probe at once.
        srv.models.lock().unwrap().clear();
        assert_eq!(p.check().await.reason(), Some("model m not loaded"));
        assert_eq!(counts(&srv), (8, 4));
    }

    #[tokio::test]
    async fn a_degraded_generation_is_repeated_until_the_next() {
        let srv = std::sync::Arc::new(Server::default());
        srv.models.lock().unwrap().push("m".to_owned());
        let t = serve(srv.clone()).await;
        // A budget no answer meets: every generation is degraded.
        let p = InferenceProbe::new(
            &t,
            "",
            "m",
            Some(Duration::ZERO),
            Duration::from_secs(60),
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        let first = p.check().await;
        assert!(matches!(first, ProbeOutcome::Degraded { .. }), "{first:?}");
        let next = p.check().await;
        assert!(
            matches!(&next, ProbeOutcome::Degraded { reason, .. } if reason.starts_with("last generation: time to first token")),
            "{next:?}"
        );
        assert_eq!(counts(&srv), (2, 1));
    }

    #[tokio::test]
    async fn generate_now_runs_whatever_is_due() {
        use std::sync::atomic::Ordering::SeqCst;
        let (srv, p) = setup(true).await;
        healthy(&p.check().await);
        healthy(&p.generate_now().await);
        assert_eq!(counts(&srv), (1, 2));
        srv.fail.store(true, SeqCst);
        assert!(p.generate_now().await.failure().is_some());
        srv.fail.store(false, SeqCst);
        healthy(&p.check().await);
        assert_eq!(
            counts(&srv),
            (2, 4),
            "after a failed one, the probe generates"
        );
        // A generation cut short by its timeout (a hung engine) is no
        // success to trust: the next probe generates.
        srv.stall.store(true, SeqCst);
        let cut = tokio::time::timeout(Duration::from_millis(100), p.generate_now()).await;
        assert!(cut.is_err());
        srv.stall.store(false, SeqCst);
        healthy(&p.check().await);
        assert_eq!(counts(&srv).0, 3);
        assert!(counts(&srv).1 >= 5, "{:?}", counts(&srv));
    }
}
