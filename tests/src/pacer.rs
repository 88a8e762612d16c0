//! An open-loop client: one request every `interval` (a `GET`, or a
//! streaming chat completion timed to its first token), each on its own
//! new connection and its own task, whatever the others do. A request that
//! hangs (a blackholed backend) does not delay the next one, so the
//! failover time is resolved to the interval. Results can be read live
//! (for the demo's view) and are complete once `stop` returns.
//!
//! The runtime runs on one thread inside the client namespace, so every
//! socket it opens belongs to that namespace. Bounded by `max` and a
//! per-request timeout.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{netns, traffic::Sample};

pub struct Pacer {
    pub started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: Option<JoinHandle<()>>,
}

/// What each request of a [`Pacer`] is.
#[derive(Clone, Debug)]
pub enum Request {
    /// `GET path`; ok on a 200.
    Get(String),
    /// A streaming chat completion (`"stream": true`) of `max_tokens`
    /// tokens for `model`, read to its end; ok on a 200 whose stream ended
    /// with `data: [DONE]`. The sample's `ttft` is the time to the first
    /// `data:` line.
    Chat { model: String, max_tokens: u32 },
}

impl Pacer {
    /// `GET path` on `target` every `interval` (see [`Pacer::start_request`]).
    pub fn start(
        ns: &str,
        target: SocketAddr,
        path: &str,
        interval: Duration,
        timeout: Duration,
        max: Duration,
    ) -> Self {
        Self::start_request(
            ns,
            target,
            Request::Get(path.to_owned()),
            interval,
            timeout,
            max,
        )
    }

    /// Sends `request` to `target` from inside namespace `ns` every
    /// `interval`, each on a new connection and bounded by `timeout`, for
    /// at most `max`.
    pub fn start_request(
        ns: &str,
        target: SocketAddr,
        request: Request,
        interval: Duration,
        timeout: Duration,
        max: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let (ns, request, flag, out) = (
            ns.to_owned(),
            Arc::new(request),
            stop.clone(),
            samples.clone(),
        );
        let handle = std::thread::spawn(move || {
            let _in = netns::enter(&ns).expect("enter client namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut tasks = tokio::task::JoinSet::new();
                while !flag.load(Ordering::Relaxed) && started.elapsed() < max {
                    tick.tick().await;
                    let (request, out) = (request.clone(), out.clone());
                    tasks.spawn(async move {
                        let at = started.elapsed();
                        let t0 = Instant::now();
                        // Written by the request as it goes, so that a
                        // request cut by the timeout still tells whether
                        // its first token came.
                        let mut ttft = None;
                        let r = match &*request {
                            Request::Get(path) => {
                                tokio::time::timeout(timeout, get(target, path)).await
                            }
                            Request::Chat { model, max_tokens } => {
                                let chat = chat(target, model, *max_tokens, t0, &mut ttft);
                                tokio::time::timeout(timeout, chat).await
                            }
                        };
                        let (ok, backend) = match r {
                            Ok(Some((ok, b))) => (ok, b),
                            _ => (false, String::new()),
                        };
                        let done = started.elapsed();
                        out.lock().expect("samples").push(Sample {
                            at,
                            done,
                            ok,
                            backend,
                            ttft,
                        });
                    });
                    while tasks.try_join_next().is_some() {}
                }
                // Every request started finishes (each bounded by timeout).
                while tasks.join_next().await.is_some() {}
            });
        });
        Self {
            started,
            stop,
            samples,
            handle: Some(handle),
        }
    }

    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Results so far (finished requests only, in completion order).
    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Number of finished requests.
    pub fn len(&self) -> usize {
        self.samples.lock().expect("samples").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `n` requests have finished; false after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.len() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops sending, waits for the requests in flight, and returns every
    /// result ordered by start time.
    pub fn stop(mut self) -> Vec<Sample> {
        self.finish();
        let mut v = std::mem::take(&mut *self.samples.lock().expect("samples"));
        v.sort_by_key(|s| s.at);
        v
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Calls `f(i)` at `start + i * interval` for every tick before `start +
/// total`. Each tick waits for its own deadline, so a slow call delays
/// only the ticks it overruns, not the schedule after them.
pub fn every(
    interval: Duration,
    total: Duration,
    mut f: impl FnMut(u32) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    for i in 0u32.. {
        let at = start + interval * i;
        if at >= start + total {
            break;
        }
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        f(i)?;
    }
    Ok(())
}

/// `GET path` on a new connection: (status 200, x-backend), or None.
async fn get(target: SocketAddr, path: &str) -> Option<(bool, String)> {
    let mut s = TcpStream::connect(target).await.ok()?;
    let _ = s.set_nodelay(true);
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).await.ok()?;
    let (status, backend) = head(&buf)?;
    Some((status == 200, backend))
}

/// A streaming chat completion on a new connection, read to its end: (200
/// and `data: [DONE]` seen, x-backend), or None. Sets `ttft` (from `t0`)
/// when the first `data:` line starts arriving.
async fn chat(
    target: SocketAddr,
    model: &str,
    max_tokens: u32,
    t0: Instant,
    ttft: &mut Option<Duration>,
) -> Option<(bool, String)> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": true,
    })
    .to_string();
    let mut s = TcpStream::connect(target).await.ok()?;
    let _ = s.set_nodelay(true);
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\
             Content-Type: application/json\r\nAccept: text/event-stream\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // The body (chunked) starts after the head; an error body is JSON,
        // without `data:`.
        if ttft.is_none()
            && let Some(h) = find(&buf, b"\r\n\r\n")
            && find(&buf[h..], b"data:").is_some()
        {
            *ttft = Some(t0.elapsed());
        }
    }
    let (status, backend) = head(&buf)?;
    Some((
        status == 200 && find(&buf, b"data: [DONE]").is_some(),
        backend,
    ))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP answer's status and `x-backend` header.
fn head(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let backend = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-backend")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Some((status, backend))
}
