//! A minimal HTTP/1.1 client for end-to-end tests: one request per
//! connection, so every request is a new flow through the VIP. Each call
//! is bounded by a timeout.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
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
    let mut s = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
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
