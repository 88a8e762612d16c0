//! OpenAI-compatible inference probe: the model must be listed by
//! `GET /v1/models`, and a one-token streamed chat completion must produce
//! its first SSE data chunk within the time-to-first-token budget.
//!
//! Verdicts: model missing, errors, other non-2xx answers -> failed;
//! HTTP 429 or a first token later than the budget -> degraded (the backend
//! still serves, so it keeps a lower weight instead of losing its traffic).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, StatusCode, Uri, header};
use serde::Deserialize;

use super::http::{BODY_LIMIT, HttpClient, USER_AGENT, backend_uri, client, contains, read_body};
use super::tls::TlsOptions;
use super::{BackendTarget, Probe, ProbeError, ProbeOutcome, error_chain};

/// Most bytes scanned for the first `data:` line of the stream.
const SSE_SCAN_LIMIT: usize = 4 * 1024;

#[derive(Debug)]
pub struct InferenceProbe {
    client: HttpClient,
    models_uri: Uri,
    chat_uri: Uri,
    model: String,
    /// The request body, built once and shared (refcounted) by every probe.
    chat_body: Bytes,
    ttft_budget: Option<Duration>,
    timeout: Duration,
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

impl InferenceProbe {
    /// `base_path` prefixes the OpenAI routes (e.g. `/openai` for a gateway;
    /// empty or `/` for none).
    pub fn new(
        target: &BackendTarget,
        base_path: &str,
        model: &str,
        ttft_budget: Option<Duration>,
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
        Ok(Self {
            client: client(tls, timeout)?,
            models_uri: backend_uri(target, tls.is_some(), &format!("{base}/v1/models"))?,
            chat_uri: backend_uri(
                target,
                tls.is_some(),
                &format!("{base}/v1/chat/completions"),
            )?,
            model: model.to_owned(),
            chat_body: Bytes::from(chat_body.to_string()),
            ttft_budget,
            timeout,
        })
    }
}

impl Probe for InferenceProbe {
    async fn check(&self) -> ProbeOutcome {
        let deadline = Instant::now() + self.timeout;
        match self.model_loaded().await {
            Ok(None) => {}
            Ok(Some(degraded)) => return degraded,
            Err(reason) => return ProbeOutcome::Failed { reason },
        }
        self.first_token(deadline).await
    }
}

impl InferenceProbe {
    /// `Ok(None)` when the model is listed; `Ok(Some(..))` for a rate limit.
    async fn model_loaded(&self) -> Result<Option<ProbeOutcome>, String> {
        let start = Instant::now();
        let req = Request::get(self.models_uri.clone())
            .header(header::USER_AGENT, USER_AGENT)
            .body(Full::default())
            .expect("static request parts are valid");
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("GET /v1/models: {}", error_chain(&e)))?;
        let status = resp.status();
        let (body, complete) = read_body(resp.into_body(), BODY_LIMIT).await?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(Some(rate_limited(start.elapsed())));
        }
        if !status.is_success() {
            return Err(format!("GET /v1/models answered {status}"));
        }
        if !complete {
            return Err(format!("GET /v1/models: list over {BODY_LIMIT} bytes"));
        }
        let list: ModelList<'_> =
            serde_json::from_slice(&body).map_err(|e| format!("GET /v1/models: bad JSON: {e}"))?;
        if list.data.iter().any(|m| m.id == self.model) {
            Ok(None)
        } else {
            Err(format!("model {} not loaded", self.model))
        }
    }

    async fn first_token(&self, deadline: Instant) -> ProbeOutcome {
        let req = Request::post(self.chat_uri.clone())
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream")
            .body(Full::new(self.chat_body.clone()))
            .expect("static request parts are valid");
        let sent = Instant::now();
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                return ProbeOutcome::failed(format!(
                    "POST /v1/chat/completions: {}",
                    error_chain(&e)
                ));
            }
        };
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            drain(resp.into_body(), deadline).await;
            return rate_limited(sent.elapsed());
        }
        if !status.is_success() {
            drain(resp.into_body(), deadline).await;
            return ProbeOutcome::failed(format!("POST /v1/chat/completions answered {status}"));
        }
        let mut body = resp.into_body();
        let ttft = match first_data(&mut body, sent).await {
            Ok(ttft) => ttft,
            Err(reason) => return ProbeOutcome::Failed { reason },
        };
        // max_tokens = 1 ends the stream right away; finishing it keeps the
        // connection for the next probe.
        drain(body, deadline).await;
        match self.ttft_budget {
            Some(budget) if ttft > budget => ProbeOutcome::Degraded {
                latency: ttft,
                reason: format!("time to first token {ttft:?} over budget {budget:?}"),
            },
            _ => ProbeOutcome::Healthy { latency: ttft },
        }
    }
}

fn rate_limited(latency: Duration) -> ProbeOutcome {
    ProbeOutcome::Degraded {
        latency,
        reason: "rate limited (HTTP 429)".to_owned(),
    }
}

/// Time from `sent` to the first SSE `data:` line.
async fn first_data(body: &mut Incoming, sent: Instant) -> Result<Duration, String> {
    let mut seen = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading stream: {}", error_chain(&e)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let at = sent.elapsed();
        seen.extend_from_slice(&data[..data.len().min(SSE_SCAN_LIMIT - seen.len())]);
        if contains(&seen, b"data:") {
            return Ok(at);
        }
        if seen.len() >= SSE_SCAN_LIMIT {
            return Err("stream has no SSE data line".to_owned());
        }
    }
    Err("stream ended before the first token".to_owned())
}

/// Reads the rest of a body until it ends or `deadline` passes; a body still
/// open then is dropped (its connection is closed, not reused).
async fn drain(mut body: Incoming, deadline: Instant) {
    let drained = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout_at(deadline.into(), drained).await;
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
        let p = InferenceProbe::new(&t, "/", "m", None, None, Duration::from_secs(1)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.chat_body).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["model"], "m");
        assert_eq!(
            p.chat_uri.to_string(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
    }
}
