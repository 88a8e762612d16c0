//! A minimal HTTP/1.1 client for end-to-end tests: one request per
//! connection, so every request is a new flow through the VIP. Each call
//! is bounded by a timeout.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// What a request saw: the answering backend (from `x-backend`) and status.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub backend: String,
}

pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Answer> {
    let s = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    exchange(s, path, timeout)
}

/// As [`get`], from the fixed source address and port `src`, so that a
/// test can send the very same 5-tuple more than once (from different
/// namespaces). The socket is made in the calling thread's namespace.
pub fn get_from(
    src: SocketAddrV4,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(src.into())
            .with_context(|| format!("bind {src}"))?;
        let s = tokio::time::timeout(timeout, sock.connect(addr))
            .await
            .context("connect timed out")?
            .context("connect")?;
        anyhow::Ok(s.into_std()?)
    })?;
    s.set_nonblocking(false)?;
    exchange(s, path, timeout)
}

fn exchange(mut s: TcpStream, path: &str, timeout: Duration) -> Result<Answer> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("read")?;
    let text = String::from_utf8_lossy(&buf);
    let Some(status) = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()) else {
        bail!("no status line in {text:?}");
    };
    let backend = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-backend")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok(Answer { status, backend })
}

/// Opens a long streaming chat completion (10,000 tokens) at `addr` and
/// reads its first bytes: the stream, and the response head it began
/// with. The stream stays open for the caller to watch (a reset, more
/// tokens).
pub fn open_stream(addr: SocketAddr, timeout: Duration) -> Result<(TcpStream, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = r#"{"model":"tiny-llm","stream":true,"max_tokens":10000,"messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).context("first bytes of the stream")?;
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok((s, head))
}
