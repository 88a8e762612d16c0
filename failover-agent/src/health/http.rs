//! HTTP(S) status probe, and the keep-alive client it shares with the
//! inference probe: one pooled hyper client per backend, so a probe every
//! 100 ms reuses one connection instead of a handshake per probe.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, StatusCode, Uri, header};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::ServerName;

use super::tls::{TlsOptions, client_config};
use super::{BackendTarget, Probe, ProbeError, ProbeOutcome, error_chain};

pub(crate) type Connector = HttpsConnector<HttpConnector>;
pub(crate) type HttpClient = Client<Connector, Full<Bytes>>;

/// Most of a body a probe reads; health answers are tiny, and a larger body
/// is cut (the connection is then not reused).
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

pub(crate) const USER_AGENT: &str = concat!("failover-agent/", env!("CARGO_PKG_VERSION"));

/// A TCP(+TLS) connector to one backend; `http2` sets ALPN h2 (gRPC).
pub(crate) fn connector(
    tls: Option<&TlsOptions>,
    connect_timeout: Duration,
    http2: bool,
) -> Result<Connector, ProbeError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(client_config(tls.unwrap_or(&TlsOptions::default()))?);
    let mut builder = if tls.is_some() {
        builder.https_only()
    } else {
        builder.https_or_http()
    };
    if let Some(name) = tls.and_then(|t| t.server_name.as_deref()) {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| ProbeError::ServerName(name.to_owned()))?;
        builder = builder.with_server_name_resolver(FixedServerNameResolver::new(name));
    }
    Ok(if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    })
}

/// A pooled HTTP/1.1 client for one backend.
pub(crate) fn client(
    tls: Option<&TlsOptions>,
    timeout: Duration,
) -> Result<HttpClient, ProbeError> {
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(2)
        .build(connector(tls, timeout, false)?))
}

/// `http(s)://addr:port{path}` for the backend.
pub(crate) fn backend_uri(
    target: &BackendTarget,
    tls: bool,
    path: &str,
) -> Result<Uri, ProbeError> {
    let authority = Authority::try_from(target.addr.to_string()).map_err(|e| ProbeError::Uri {
        path: target.addr.to_string(),
        source: e,
    })?;
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Uri::builder()
        .scheme(if tls { Scheme::HTTPS } else { Scheme::HTTP })
        .authority(authority)
        .path_and_query(path.as_str())
        .build()
        .map_err(|e| ProbeError::Path { path, source: e })
}

/// Reads at most `limit` bytes of a body. Returns the bytes and whether the
/// body ended (only then can the connection go back to the pool).
pub(crate) async fn read_body(mut body: Incoming, limit: usize) -> Result<(Bytes, bool), String> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading body: {}", error_chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            let room = limit - buf.len();
            if data.len() > room {
                buf.extend_from_slice(&data[..room]);
                return Ok((buf.freeze(), false));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf.freeze(), true))
}

/// Checks an HTTP(S) endpoint: the status (the expected one, or any 2xx)
/// and optionally a substring of the body.
#[derive(Debug)]
pub struct HttpProbe {
    client: HttpClient,
    uri: Uri,
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
        Ok(Self {
            client: client(tls, timeout)?,
            uri: backend_uri(target, tls.is_some(), path)?,
            expect_status,
            body_contains,
        })
    }
}

impl Probe for HttpProbe {
    async fn check(&self) -> ProbeOutcome {
        let start = Instant::now();
        let req = Request::get(self.uri.clone())
            .header(header::USER_AGENT, USER_AGENT)
            .body(Full::default())
            .expect("static request parts are valid");
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                return ProbeOutcome::failed(format!(
                    "GET {}: {}",
                    self.uri.path(),
                    error_chain(&e)
                ));
            }
        };
        let status = resp.status();
        let status_ok = match self.expect_status {
            Some(want) => status == want,
            None => status.is_success(),
        };
        // Read the body even when only the status matters, so the connection
        // goes back to the pool.
        let body = match read_body(resp.into_body(), BODY_LIMIT).await {
            Ok((body, _)) => body,
            Err(e) => return ProbeOutcome::failed(e),
        };
        if !status_ok {
            return ProbeOutcome::failed(format!("GET {} answered {status}", self.uri.path()));
        }
        if let Some(needle) = &self.body_contains
            && !contains(&body, needle.as_bytes())
        {
            return ProbeOutcome::failed(format!("GET {} body lacks {needle:?}", self.uri.path()));
        }
        ProbeOutcome::Healthy {
            latency: start.elapsed(),
        }
    }
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_of_backend() {
        let t = BackendTarget::new("a", "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            backend_uri(&t, false, "/health").unwrap().to_string(),
            "http://127.0.0.1:8080/health"
        );
        assert_eq!(
            backend_uri(&t, true, "v1/models").unwrap().to_string(),
            "https://127.0.0.1:8080/v1/models"
        );
        assert!(backend_uri(&t, false, "/bad path").is_err());
    }

    #[test]
    fn substring() {
        assert!(contains(b"{\"status\":\"ok\"}", b"\"ok\""));
        assert!(!contains(b"short", b"longer needle"));
        assert!(contains(b"x", b""));
    }
}
