//! HTTP(S) status probe, and the client it shares with the inference
//! probe: how probe connections are opened ([`Dialer`]: TCP, TLS) and kept.
//!
//! Each probe owns one keep-alive connection ([`KeepAlive`]), so a probe
//! every 100 ms reuses it instead of a TCP (and TLS) handshake per probe.
//! The connection speaks the small HTTP/1.1 client of [`super::h1`], in the
//! probe's own future: no connection task, no pool. The pooled `hyper_util`
//! client this replaces ran each connection in a task of its own, so every
//! probe bounced between two tasks, and added a pool checkout per request;
//! a probe has one request in flight at a time, so a pool bought nothing.
//!
//! The connection is dropped, and the next request dials a new one, when
//! the server closed it (seen before the request is written), when a body
//! was not read to its end (over [`BODY_LIMIT`], or cut by a deadline), when
//! the answer asked for it (`Connection: close`), and when the prober's
//! timeout cancels a probe mid-exchange. A request that a kept connection
//! lost before any answer (the server closed it meanwhile) is sent once more
//! on a new connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::{StatusCode, Uri};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::failure::Fault;
use super::h1::{self, Conn, Response};
use super::tls::{TlsOptions, client_config};
use super::{BackendTarget, Failure, Probe, ProbeError, ProbeOutcome};

/// Most of a body a probe reads; health answers are tiny, and a larger body
/// is cut (the connection is then not reused).
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

pub(crate) const USER_AGENT: &str = concat!("failover-agent/", env!("CARGO_PKG_VERSION"));

/// A probe connection's byte stream: plain TCP (`Left`), or TLS over TCP
/// (`Right`).
pub(crate) type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Opens connections to one backend: TCP with `TCP_NODELAY`, then a TLS
/// handshake when the probe has `tls` (verified as [`TlsOptions`] says,
/// offering one ALPN protocol).
pub(crate) struct Dialer {
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
    /// True from the start of a TCP handshake to its end: a probe cut
    /// short meanwhile found the backend not answering its SYN.
    connecting: AtomicBool,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("addr", &self.addr)
            .field("tls_name", &self.tls.as_ref().map(|(_, name)| name))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Dialer {
    /// `alpn` is offered over TLS (`http/1.1`, `h2`); `timeout` bounds the
    /// TCP and TLS handshakes together.
    pub(crate) fn new(
        addr: SocketAddr,
        tls: Option<&TlsOptions>,
        alpn: &[u8],
        timeout: Duration,
    ) -> Result<Self, ProbeError> {
        let tls = match tls {
            None => None,
            Some(opts) => {
                let mut cfg = client_config(opts)?;
                cfg.alpn_protocols = vec![alpn.to_vec()];
                // Without a configured name, verify the backend's IP address
                // (and send no SNI, as for any IP).
                let name = match &opts.server_name {
                    Some(n) => ServerName::try_from(n.clone())
                        .map_err(|_| ProbeError::ServerName(n.clone()))?,
                    None => ServerName::IpAddress(addr.ip().into()),
                };
                Some((TlsConnector::from(Arc::new(cfg)), name))
            }
        };
        Ok(Self {
            addr,
            tls,
            timeout,
            connecting: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The class of a probe its timeout cut short: unanswered while its
    /// TCP handshake was still on, a slow answer otherwise.
    pub(crate) fn timed_out(&self) -> Failure {
        if self.connecting.load(Ordering::Relaxed) {
            Failure::Unanswered
        } else {
            Failure::Timeout
        }
    }

    /// A new connection; the error names what failed (connect, TLS, time).
    pub(crate) async fn dial(&self) -> Result<Stream, Fault> {
        match tokio::time::timeout(self.timeout, self.open()).await {
            Ok(r) => r,
            Err(_) => {
                let failure = self.timed_out();
                let phase = match failure {
                    Failure::Unanswered => "handshake unanswered",
                    _ => "TLS handshake",
                };
                Err(Fault::new(
                    failure,
                    format!(
                        "connect {}: timed out after {:?} ({phase})",
                        self.addr, self.timeout
                    ),
                ))
            }
        }
    }

    async fn open(&self) -> Result<Stream, Fault> {
        self.connecting.store(true, Ordering::Relaxed);
        let tcp = TcpStream::connect(self.addr).await;
        self.connecting.store(false, Ordering::Relaxed);
        let tcp =
            tcp.map_err(|e| Fault::new(Failure::of_io(&e), format!("connect {}: {e}", self.addr)))?;
        // Probe requests are one small write each: never hold them back.
        tcp.set_nodelay(true)
            .map_err(|e| Fault::new(Failure::Local, format!("TCP_NODELAY: {e}")))?;
        let Some((connector, name)) = &self.tls else {
            return Ok(Either::Left(tcp));
        };
        // rustls' errors say which check failed ("invalid peer
        // certificate: UnknownIssuer"). The backend answered the TCP
        // handshake: it is there, but not right.
        let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
            Fault::new(
                Failure::Broken,
                format!("TLS handshake with {}: {e}", name.to_str()),
            )
        })?;
        Ok(Either::Right(Box::new(tls)))
    }
}

/// One keep-alive HTTP/1.1 connection to a backend, owned by its probe.
pub(crate) struct KeepAlive {
    dialer: Dialer,
    /// `Host` of every request (the backend's address).
    host: String,
    /// The connection between probes; a probe takes it out while it runs.
    idle: Mutex<Option<Conn>>,
}

impl fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAlive")
            .field("dialer", &self.dialer)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl KeepAlive {
    pub(crate) fn new(
        target: &BackendTarget,
        tls: Option<&TlsOptions>,
        timeout: Duration,
    ) -> Result<Self, ProbeError> {
        let dialer = Dialer::new(target.addr, tls, b"http/1.1", timeout)?;
        Ok(Self {
            host: host_header(target.addr, dialer.is_tls()),
            dialer,
            idle: Mutex::new(None),
        })
    }

    /// The bytes of a request for `path` (origin form, from
    /// [`request_path`]) with the headers every probe sends and `headers`.
    /// Probes build theirs once.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &Uri,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Box<[u8]> {
        let mut all = vec![("User-Agent", USER_AGENT)];
        all.extend_from_slice(headers);
        let path = path.path_and_query().map_or("/", |p| p.as_str());
        h1::encode_request(method, path, &self.host, &all, body).into_boxed_slice()
    }

    /// See [`Dialer::timed_out`].
    pub(crate) fn timed_out(&self) -> Failure {
        self.dialer.timed_out()
    }

    /// Starts using the connection for one probe (one or more requests in
    /// turn). The connection goes back for the next probe when the session
    /// drops, if its last exchange left it clean.
    pub(crate) fn session(&self) -> Session<'_> {
        let conn = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        Session { owner: self, conn }
    }
}

/// `Host`: the address, without the scheme's default port (as browsers and
/// hyper's client send it).
fn host_header(addr: SocketAddr, tls: bool) -> String {
    let default_port = if tls { 443 } else { 80 };
    match addr {
        a if a.port() != default_port => a.to_string(),
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    }
}

/// The use of a [`KeepAlive`] connection by one probe.
pub(crate) struct Session<'a> {
    owner: &'a KeepAlive,
    /// The connection between exchanges. An exchange takes it out while the
    /// request is on its way, so a probe cancelled then leaves none behind.
    conn: Option<Conn>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            *self
                .owner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(c);
        }
    }
}

impl Session<'_> {
    /// Sends `req` on the kept connection (or a new one) and returns the
    /// response with its body still to read. `Err` names the cause:
    /// connect, TLS, or the connection failing before the response head.
    pub(crate) async fn send(&mut self, req: &[u8]) -> Result<Response<'_>, Fault> {
        // A kept connection the server closed while it sat idle is seen
        // here, before the request is written.
        let mut kept = self.conn.take().and_then(|mut c| c.idle_ok().then_some(c));
        loop {
            let reused = kept.is_some();
            let mut conn = match kept.take() {
                Some(c) => c,
                None => Conn::new(self.owner.dialer.dial().await?),
            };
            match conn.exchange(req).await {
                Ok(head) => {
                    self.conn = Some(conn);
                    return Ok(Response::new(&mut self.conn, head));
                }
                // The server closed the kept connection as the request went
                // out: once more, on a new one.
                Err(h1::Error::ClosedEarly(_)) if reused => {}
                Err(e) => return Err(Fault::new(Failure::Broken, e.to_string())),
            }
        }
    }
}

/// `path` in origin form (`/health`), as requests on a connection carry it.
pub(crate) fn request_path(path: &str) -> Result<Uri, ProbeError> {
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Uri::builder()
        .path_and_query(path.as_str())
        .build()
        .map_err(|e| ProbeError::Path { path, source: e })
}

/// Checks an HTTP(S) endpoint: the status (the expected one, or any 2xx)
/// and optionally a substring of the body.
#[derive(Debug)]
pub struct HttpProbe {
    client: KeepAlive,
    path: Uri,
    /// The request, built once.
    request: Box<[u8]>,
    expect_status: Option<StatusCode>,
    body_contains: Option<String>,
}

impl HttpProbe {
    pub fn new(
        target: &BackendTarget,
        path: &str,
        tls: Option<&TlsOptions>,
        expect_status: Option<u16>,
        body_contains: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ProbeError> {
        let expect_status = expect_status
            .map(|s| StatusCode::from_u16(s).map_err(|_| ProbeError::Status(s)))
            .transpose()?;
        let client = KeepAlive::new(target, tls, timeout)?;
        let path = request_path(path)?;
        Ok(Self {
            request: client.request("GET", &path, &[], b""),
            client,
            path,
            expect_status,
            body_contains,
        })
    }
}

impl Probe for HttpProbe {
    async fn check(&self) -> ProbeOutcome {
        let start = Instant::now();
        let mut session = self.client.session();
        let mut resp = match session.send(&self.request).await {
            Ok(r) => r,
            Err(e) => return e.context(format_args!("GET {}", self.path)).into(),
        };
        // The body is read even when only the status matters, so the
        // connection can carry the next probe; it is kept only if needed.
        let (body, _) = match resp
            .read_body(BODY_LIMIT, self.body_contains.is_some())
            .await
        {
            Ok(b) => b,
            Err(reason) => return ProbeOutcome::failed(Failure::Broken, reason),
        };
        let status = resp.status;
        drop(resp);
        drop(session);
        let status_ok = match self.expect_status {
            Some(want) => status == want,
            None => status.is_success(),
        };
        if !status_ok {
            return ProbeOutcome::failed(
                Failure::BadAnswer,
                format!("GET {} answered {status}", self.path),
            );
        }
        if let Some(needle) = &self.body_contains
            && !contains(&body, needle.as_bytes())
        {
            return ProbeOutcome::failed(
                Failure::BadAnswer,
                format!("GET {} body lacks {needle:?}", self.path),
            );
        }
        ProbeOutcome::Healthy {
            latency: start.elapsed(),
        }
    }

    fn timed_out(&self) -> Failure {
        self.client.timed_out()
    }
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_paths() {
        assert_eq!(request_path("/health").unwrap().to_string(), "/health");
        assert_eq!(
            request_path("v1/models?x=1").unwrap().to_string(),
            "/v1/models?x=1"
        );
        assert!(request_path("/bad path").is_err());
    }

    #[test]
    fn host_header_omits_default_port() {
        let h = |a: &str, tls| host_header(a.parse().unwrap(), tls);
        assert_eq!(h("127.0.0.1:8080", false), "127.0.0.1:8080");
        assert_eq!(h("127.0.0.1:80", false), "127.0.0.1");
        assert_eq!(h("127.0.0.1:80", true), "127.0.0.1:80");
        assert_eq!(h("[::1]:443", true), "[::1]");
        assert_eq!(h("[::1]:8443", true), "[::1]:8443");
    }

    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::health::canned;

    /// How a [`raw_server`] connection ends after its answers.
    #[derive(Clone, Copy)]
    enum Then {
        /// Close at once, while the client's connection sits idle.
        Close,
        /// Read the next request and close without answering.
        HangUp,
    }

    /// An HTTP/1.1 server answering `answer` to each of `per_conn` requests
    /// on a connection, then ending it as `then` says. Counts connections.
    async fn raw_server(
        answer: Vec<u8>,
        per_conn: usize,
        then: Then,
    ) -> (BackendTarget, Arc<AtomicUsize>) {
        let answer: Arc<[u8]> = answer.into();
        let srv = canned::serve(move |mut s| {
            let answer = answer.clone();
            async move {
                for _ in 0..per_conn {
                    if !canned::answer(&mut s, &answer).await {
                        return;
                    }
                }
                if let Then::HangUp = then {
                    canned::read_request(&mut s).await;
                }
            }
        })
        .await;
        (BackendTarget::new("b", srv.addr), srv.accepted)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}";

    fn probe(t: &BackendTarget, body_contains: Option<&str>) -> HttpProbe {
        HttpProbe::new(
            t,
            "/health",
            None,
            None,
            body_contains.map(str::to_owned),
            Duration::from_secs(2),
        )
        .unwrap()
    }

    async fn healthy(p: &HttpProbe) {
        let o = p.check().await;
        assert!(matches!(o, ProbeOutcome::Healthy { .. }), "{o:?}");
    }

    #[tokio::test]
    async fn one_connection_for_many_probes() {
        let (t, accepted) = raw_server(OK.to_vec(), usize::MAX, Then::Close).await;
        let p = probe(&t, Some("\"ok\""));
        for _ in 0..5 {
            healthy(&p).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn redials_after_the_server_closed_an_idle_connection() {
        let (t, accepted) = raw_server(OK.to_vec(), 2, Then::Close).await;
        let p = probe(&t, None);
        for _ in 0..5 {
            healthy(&p).await;
            // Let the close reach the client while the connection idles.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn request_lost_by_a_kept_connection_goes_again_on_a_new_one() {
        // Every third request meets a connection closing under it.
        let (t, accepted) = raw_server(OK.to_vec(), 2, Then::HangUp).await;
        let p = probe(&t, None);
        for _ in 0..5 {
            healthy(&p).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        // A new connection closing without an answer is not retried.
        let (t, accepted) = raw_server(OK.to_vec(), 0, Then::HangUp).await;
        let o = probe(&t, None).check().await;
        assert_eq!(
            o.reason(),
            Some("GET /health: connection closed before the response")
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn body_over_the_limit_is_cut_and_its_connection_dropped() {
        let mut big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            BODY_LIMIT + 10
        )
        .into_bytes();
        big.resize(big.len() + BODY_LIMIT, b'x');
        big.extend_from_slice(b"0123456789");
        let (t, accepted) = raw_server(big, usize::MAX, Then::Close).await;
        // The status is all that matters: healthy, but the rest of the body
        // is never read, so the connection is not used again.
        let p = probe(&t, None);
        healthy(&p).await;
        healthy(&p).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Past the limit is not searched.
        let o = probe(&t, Some("0123")).check().await;
        assert_eq!(o.reason(), Some("GET /health body lacks \"0123\""));
    }

    #[tokio::test]
    async fn connection_close_answer_is_honoured() {
        let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let (t, accepted) = raw_server(answer.to_vec(), usize::MAX, Then::Close).await;
        let p = probe(&t, None);
        healthy(&p).await;
        healthy(&p).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn status_and_cause_in_failures() {
        let (t, _) = raw_server(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
            usize::MAX,
            Then::Close,
        )
        .await;
        let o = probe(&t, None).check().await;
        assert_eq!(
            o.reason(),
            Some("GET /health answered 503 Service Unavailable")
        );

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = BackendTarget::new("b", l.local_addr().unwrap());
        drop(l);
        let o = probe(&t, None).check().await;
        let reason = o.reason().unwrap();
        assert!(
            reason.starts_with(&format!("GET /health: connect {}: ", t.addr))
                && reason.contains("refused"),
            "{reason}"
        );
    }

    /// A probe cut short by its timeout leaves no half-used connection.
    #[tokio::test]
    async fn cancelled_probe_does_not_leave_its_connection() {
        let (t, accepted) = raw_server(OK.to_vec(), usize::MAX, Then::Close).await;
        let p = probe(&t, None);
        healthy(&p).await;
        {
            let mut session = p.client.session();
            let mut fut = std::pin::pin!(session.send(&p.request));
            // One poll writes the request (this runtime's only thread runs
            // the server only after); then the probe is cancelled.
            let pending = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(pending, "written, waiting for the answer");
        }
        assert!(p.client.idle.lock().unwrap().is_none());
        healthy(&p).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn substring() {
        assert!(contains(b"{\"status\":\"ok\"}", b"\"ok\""));
        assert!(!contains(b"short", b"longer needle"));
        assert!(contains(b"x", b""));
    }
}
