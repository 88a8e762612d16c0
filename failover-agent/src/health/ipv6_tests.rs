//! Every probe kind, and the load facet, to a backend on `::1`: nothing in
//! the health checks may assume IPv4 (addresses, `Host`, URIs, SNI, the
//! UDP socket's family). Loopback only: no traffic leaves the host.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, UdpSocket},
};

use super::{AnyProbe, BackendTarget, Probe, ProbeOutcome, TlsOptions, build_probe};
use crate::config::{self, LoadProfile, LoadScrape};

const LOOPBACK6: &str = "[::1]:0";

fn probe_cfg(fields: serde_json::Value) -> config::Probe {
    serde_json::from_value(fields).expect("a valid probe")
}

fn build(t: &BackendTarget, fields: serde_json::Value, tls: &TlsOptions) -> AnyProbe {
    build_probe(t, &probe_cfg(fields), tls).expect("a probe")
}

async fn healthy(p: &AnyProbe) {
    let o = p.check().await;
    assert!(matches!(o, ProbeOutcome::Healthy { .. }), "{o:?}");
}

/// A listener on `::1`, and the target of a backend there.
async fn listener() -> (TcpListener, BackendTarget) {
    let l = TcpListener::bind(LOOPBACK6).await.unwrap();
    let addr = l.local_addr().unwrap();
    assert!(addr.is_ipv6(), "{addr}");
    (l, BackendTarget::new("b6", addr))
}

/// An HTTP/1.1 server on `::1` answering `answer` to every request, and
/// the `Host` of the first request it read.
async fn http_server(
    answer: &'static [u8],
) -> (BackendTarget, tokio::sync::oneshot::Receiver<String>) {
    let (l, t) = listener().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let Some(head) = read_head(&mut s).await else {
                        return;
                    };
                    let host = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Host: "))
                        .unwrap_or_default()
                        .to_owned();
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(host);
                    }
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (t, rx)
}

/// A request's head (bodies of GETs are empty).
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    String::from_utf8(buf).ok()
}

#[tokio::test]
async fn tcp_probes_an_ipv6_backend() {
    let (l, t) = listener().await;
    tokio::spawn(async move { while l.accept().await.is_ok() {} });
    healthy(&build(
        &t,
        serde_json::json!({"kind": "tcp"}),
        &TlsOptions::default(),
    ))
    .await;
}

#[tokio::test]
async fn http_probes_an_ipv6_backend_with_a_bracketed_host() {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}";
    let (t, host) = http_server(OK).await;
    let p = build(
        &t,
        serde_json::json!({"kind": "http", "path": "/health", "body_contains": "ok"}),
        &TlsOptions::default(),
    );
    healthy(&p).await;
    assert_eq!(host.await.unwrap(), format!("[::1]:{}", t.addr.port()));
}

#[tokio::test]
async fn https_probes_an_ipv6_backend_by_its_address() {
    use rustls::pki_types::PrivateKeyDer;
    let cert = rcgen::generate_simple_self_signed(vec!["::1".to_owned()]).unwrap();
    let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (l, t) = listener().await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0
                        || s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let tls = TlsOptions {
        insecure_skip_verify: true,
        ..TlsOptions::default()
    };
    let p = build(&t, serde_json::json!({"kind": "http", "tls": true}), &tls);
    healthy(&p).await;
}

#[tokio::test]
async fn grpc_probes_an_ipv6_backend() {
    let (l, t) = listener().await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                    let head = hyper::http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let Ok(mut send) = respond.send_response(head, false) else {
                        return;
                    };
                    // HealthCheckResponse { status: SERVING (1) }.
                    let _ =
                        send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]), false);
                    let mut trailers = hyper::http::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::http::HeaderValue::from_static("0"));
                    let _ = send.send_trailers(trailers);
                }
            });
        }
    });
    let p = build(
        &t,
        serde_json::json!({"kind": "grpc"}),
        &TlsOptions::default(),
    );
    healthy(&p).await;
}

#[tokio::test]
async fn inference_probes_an_ipv6_backend() {
    use axum::routing::{get, post};
    let (l, t) = listener().await;
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async {
                axum::Json(serde_json::json!({"object": "list", "data": [{"id": "m"}]}))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                    "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n",
                )
            }),
        );
    tokio::spawn(async move { axum::serve(l, app).await });
    let p = build(
        &t,
        serde_json::json!({"kind": "inference", "model": "m", "timeout": "2s"}),
        &TlsOptions::default(),
    );
    // The first check runs the generation too.
    healthy(&p).await;
    healthy(&p).await;
}

#[tokio::test]
async fn udp_probes_an_ipv6_backend() {
    let s = UdpSocket::bind(LOOPBACK6).await.unwrap();
    let addr: SocketAddr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            if &buf[..n] == b"ping" {
                let _ = s.send_to(b"pong!", from).await;
            }
        }
    });
    let t = BackendTarget::new("b6", addr);
    let p = build(
        &t,
        serde_json::json!({"kind": "udp", "payload": "ping", "expect_prefix": "pong"}),
        &TlsOptions::default(),
    );
    healthy(&p).await;
}

#[tokio::test]
async fn the_load_facet_scrapes_an_ipv6_backend() {
    const BODY: &str = "# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m\"} 3\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 6\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n";
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let answer: &'static [u8] = Box::leak(answer.into_bytes().into_boxed_slice());
    let (t, host) = http_server(answer).await;
    let scraper = super::load::Scraper::new(
        &t,
        &LoadScrape::new(LoadProfile::Vllm),
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    let figures = scraper.scrape().await.unwrap();
    assert!((figures.waiting - 3.0).abs() < f64::EPSILON, "{figures:?}");
    assert_eq!(host.await.unwrap(), format!("[::1]:{}", t.addr.port()));
}
