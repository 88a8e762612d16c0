//! The HTTP/1.1 client side of one probe connection, written for probes:
//! a request is a byte string built once with the probe, the response head
//! is parsed with `httparse`, and the body (`Content-Length`, chunked, or
//! up to the close) is handed out as it arrives, from one read buffer kept
//! with the connection.
//!
//! Why not hyper's client: probing is most of what the agent does at rest,
//! and even hyper's bare connection (its `Connection` future driven inside
//! the probe) passed each probe through a request channel, a response
//! oneshot and a body channel, each a wake-up and a new poll of the prober
//! task, plus a `Request`, a `HeaderMap` and the parsed headers allocated
//! per probe. Here a probe is one write and, for a small answer, one read,
//! with no allocation unless the body is searched. In the rest bench (100
//! backends probed every 100 ms on loopback) the agent went from about 6%
//! of a core with hyper's pooled client, and 4.6% with its bare connection
//! driven inline, to about 3.5%; what is left is mostly the kernel's TCP.
//! Probes send fixed requests and need only the status and a bounded body,
//! which keeps this small.
//!
//! Kept over hyper on a measurement, checked again when the probe stream
//! became `tokio_util`'s `Either`: `tests::cost_per_exchange` (ignored;
//! run it with `--release -- --ignored --nocapture`) times the client's
//! thread CPU, kernel included, over 20,000 exchanges on one kept loopback
//! connection. Here this client took 3.0-3.4 µs per exchange and hyper's
//! bare connection 5.7-5.8 µs (three runs, 2-core VM): about 2.5 µs saved
//! per probe, so 0.25% of a core at 1,000 probes a second before the
//! wake-ups and allocations that the rest bench above also counts. What
//! keeps the two in step is `tests::reads_responses_as_hyper_does`, a
//! differential test: both clients read the same responses
//! (Content-Length, chunked with extensions and trailers, close-delimited,
//! 1xx, 204/304, and malformed or cut ones) and must agree on status and
//! body, or both refuse. It found one difference so far, a signed
//! `Content-Length: +2` this client took, now refused as hyper does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Waker};

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::http::Stream;

/// Bytes asked of each read.
const READ_CHUNK: usize = 8 * 1024;
/// Largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;
const MAX_HEADERS: usize = 100;

/// A request: method, origin-form path, headers, and the body. `Host` and
/// `Content-Length` are added here.
pub(crate) fn encode_request(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Why an exchange failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Error {
    /// The connection ended (EOF or reset) before a byte of the answer: a
    /// kept connection the server closed meanwhile, so the request may be
    /// sent again on a new one.
    ClosedEarly(String),
    Other(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::ClosedEarly(m) | Error::Other(m) => f.write_str(m),
        }
    }
}

/// How the body of a response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// `n` bytes still to come.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// `n` bytes of the current chunk still to come.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// Until the server closes the connection.
    UntilClose,
    Done,
    /// A read failed: the connection is not reused.
    Failed,
}

/// A response head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub status: StatusCode,
    body: Body,
    /// The connection may carry another request once the body is read.
    keep_alive: bool,
}

impl Head {
    fn parse(resp: &httparse::Response<'_, '_>) -> Result<Self, String> {
        let code = resp.code.expect("complete response has a status");
        let status = StatusCode::from_u16(code).map_err(|_| format!("bad status {code}"))?;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut other_coding = false;
        let (mut close, mut keep_alive) = (false, false);
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("");
            if h.name.eq_ignore_ascii_case("content-length") {
                // 1*DIGIT (RFC 9110 8.6): no sign, as hyper reads it.
                let digits = value.trim();
                let n = digits
                    .parse::<u64>()
                    .ok()
                    .filter(|_| digits.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("bad Content-Length {value:?}"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length headers".to_owned());
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Only the last coding says how the body ends.
                for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    chunked = coding.eq_ignore_ascii_case("chunked");
                    other_coding = !chunked;
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    close |= token.eq_ignore_ascii_case("close");
                    keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
        }
        let mut keep_alive = !close && (resp.version == Some(1) || keep_alive);
        let body = if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Body::Done
        } else if chunked {
            Body::ChunkSize
        } else if other_coding {
            // RFC 9112 6.3: a response coded otherwise ends at the close.
            Body::UntilClose
        } else if let Some(n) = length {
            Body::Length(n)
        } else {
            Body::UntilClose
        };
        if body == Body::UntilClose {
            keep_alive = false;
        }
        Ok(Self {
            status,
            body,
            keep_alive,
        })
    }
}

/// One HTTP/1.1 connection and its read buffer.
pub(crate) struct Conn {
    io: Stream,
    buf: Vec<u8>,
    /// Start of the bytes in `buf` not consumed yet.
    pos: usize,
}

impl Conn {
    pub(crate) fn new(io: Stream) -> Self {
        Self {
            io,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
        }
    }

    fn unread(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True when the connection can carry a new request: the server did
    /// not close it (nor send anything) while it sat idle. Never waits; a
    /// read happens only if the socket was signalled readable.
    pub(crate) fn idle_ok(&mut self) -> bool {
        if self.unread() > 0 {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        // Ready means EOF, an error, or bytes nobody asked for.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    /// Reads more bytes; 0 at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK);
        self.io.read_buf(&mut self.buf).await
    }

    /// Sends a request and reads the head of its response (skipping
    /// interim 1xx answers).
    pub(crate) async fn exchange(&mut self, req: &[u8]) -> Result<Head, Error> {
        let early = |what: &str, e: io::Error| {
            let msg = format!("{what}: {e}");
            // UnexpectedEof: TLS closed without close_notify.
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ) {
                Error::ClosedEarly(msg)
            } else {
                Error::Other(msg)
            }
        };
        self.io
            .write_all(req)
            .await
            .map_err(|e| early("writing request", e))?;
        // A no-op on TCP; pushes the records out on TLS.
        self.io
            .flush()
            .await
            .map_err(|e| early("writing request", e))?;
        let mut answered = false;
        loop {
            if self.unread() > 0 {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf[self.pos..]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = Head::parse(&resp).map_err(Error::Other)?;
                        self.pos += n;
                        if head.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Err(Error::Other("unexpected 101 Switching Protocols".into()));
                        }
                        if !head.status.is_informational() {
                            return Ok(head);
                        }
                        continue;
                    }
                    Ok(httparse::Status::Partial) if self.unread() > MAX_HEAD => {
                        return Err(Error::Other(format!("response head over {MAX_HEAD} bytes")));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(Error::Other(format!("bad response head: {e}"))),
                }
            }
            match self.fill().await {
                Ok(0) if answered => {
                    return Err(Error::Other(
                        "connection closed in the response head".to_owned(),
                    ));
                }
                Ok(0) => {
                    return Err(Error::ClosedEarly(
                        "connection closed before the response".to_owned(),
                    ));
                }
                Ok(_) => answered = true,
                Err(e) if answered => {
                    return Err(Error::Other(format!("reading response: {e}")));
                }
                Err(e) => return Err(early("reading response", e)),
            }
        }
    }

    /// The bytes in `buf[pos..]` up to a line end, consumed; `None` when no
    /// full line is buffered yet.
    fn line(&mut self) -> Result<Option<(usize, usize)>, String> {
        let unread = &self.buf[self.pos..];
        match unread.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let start = self.pos;
                let end = if i > 0 && unread[i - 1] == b'\r' {
                    start + i - 1
                } else {
                    start + i
                };
                self.pos += i + 1;
                Ok(Some((start, end)))
            }
            None if unread.len() > MAX_LINE => Err(format!("body line over {MAX_LINE} bytes")),
            None => Ok(None),
        }
    }

    /// The range in `buf` of the next piece of the body, consumed; `None`
    /// at its end.
    async fn next_piece(&mut self, body: &mut Body) -> Result<Option<(usize, usize)>, String> {
        loop {
            let unread = self.unread() as u64;
            match *body {
                Body::Done => return Ok(None),
                Body::Failed => return Err("body already failed".to_owned()),
                Body::Length(0) => {
                    *body = Body::Done;
                    return Ok(None);
                }
                Body::ChunkData(0) => {
                    *body = Body::ChunkEnd;
                    continue;
                }
                Body::Length(n) | Body::ChunkData(n) if unread > 0 => {
                    let take = n.min(unread);
                    let start = self.pos;
                    self.pos += take as usize;
                    *body = match *body {
                        Body::Length(_) => Body::Length(n - take),
                        _ => Body::ChunkData(n - take),
                    };
                    return Ok(Some((start, self.pos)));
                }
                Body::UntilClose if unread > 0 => {
                    let start = self.pos;
                    self.pos = self.buf.len();
                    return Ok(Some((start, self.pos)));
                }
                Body::ChunkEnd => {
                    if let Some((a, b)) = self.line()? {
                        if a != b {
                            return Err("chunk data longer than its size".to_owned());
                        }
                        *body = Body::ChunkSize;
                        continue;
                    }
                }
                Body::ChunkSize => {
                    if let Some((a, b)) = self.line()? {
                        *body = match parse_chunk_size(&self.buf[a..b])? {
                            0 => Body::Trailers,
                            n => Body::ChunkData(n),
                        };
                        continue;
                    }
                }
                Body::Trailers => {
                    if let Some((a, b)) = self.line()? {
                        if a == b {
                            *body = Body::Done;
                            return Ok(None);
                        }
                        continue;
                    }
                }
                Body::Length(_) | Body::ChunkData(_) | Body::UntilClose => {}
            }
            match self.fill().await {
                Ok(0) if *body == Body::UntilClose => {
                    *body = Body::Done;
                    return Ok(None);
                }
                Ok(0) => return Err("connection closed before the body ended".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// `1a;ext=1` -> 26.
fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let bad = || format!("bad chunk size {:?}", String::from_utf8_lossy(line));
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).ok_or_else(bad)?;
        Ok(n << 4 | u64::from(v))
    })
}

/// A response whose body is being read. Dropped before its body ended (or
/// when the server asked to close), it closes the connection.
pub(crate) struct Response<'s> {
    slot: &'s mut Option<Conn>,
    pub status: StatusCode,
    body: Body,
    keep_alive: bool,
}

impl<'s> Response<'s> {
    pub(crate) fn new(slot: &'s mut Option<Conn>, head: Head) -> Self {
        Self {
            slot,
            status: head.status,
            body: head.body,
            keep_alive: head.keep_alive,
        }
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<&[u8]>, String> {
        let Some(conn) = self.slot.as_mut() else {
            return Err("connection closed".to_owned());
        };
        match conn.next_piece(&mut self.body).await {
            Ok(Some((a, b))) => Ok(Some(&conn.buf[a..b])),
            Ok(None) => Ok(None),
            Err(e) => {
                self.body = Body::Failed;
                Err(e)
            }
        }
    }

    /// Reads the body up to `limit` bytes, keeping them if `keep`. Returns
    /// the bytes and whether the body ended within the limit.
    pub(crate) async fn read_body(
        &mut self,
        limit: usize,
        keep: bool,
    ) -> Result<(Vec<u8>, bool), String> {
        let mut out = Vec::new();
        let mut seen = 0;
        while let Some(piece) = self
            .chunk()
            .await
            .map_err(|e| format!("reading body: {e}"))?
        {
            let take = piece.len().min(limit - seen);
            if keep {
                out.extend_from_slice(&piece[..take]);
            }
            seen += take;
            if take < piece.len() {
                return Ok((out, false));
            }
        }
        Ok((out, true))
    }

    /// True once the body was read to its end.
    pub(crate) fn is_done(&self) -> bool {
        self.body == Body::Done
    }
}

impl Drop for Response<'_> {
    fn drop(&mut self) {
        if !(self.is_done() && self.keep_alive) {
            *self.slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::canned;

    fn head(raw: &str) -> Result<Head, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(resp.parse(raw.as_bytes()).unwrap().is_complete());
        Head::parse(&resp)
    }

    #[test]
    fn body_framing_from_headers() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(
            (h.status, h.body, h.keep_alive),
            (StatusCode::OK, Body::Length(12), true)
        );
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (Body::ChunkSize, true));
        // Chunked wins over a Content-Length.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        assert_eq!(h.body, Body::ChunkSize);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (Body::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (Body::UntilClose, false));
        let h = head("HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (Body::Done, true));
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (Body::Length(0), false));
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        let h =
            head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(h.keep_alive);
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a"), Ok(26));
        assert_eq!(parse_chunk_size(b"FF;name=value"), Ok(255));
        assert_eq!(parse_chunk_size(b"0 "), Ok(0));
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"xyz").is_err());
        assert!(parse_chunk_size(b"1234567890abcdef0").is_err());
    }

    #[test]
    fn requests() {
        let get = encode_request(
            "GET",
            "/health",
            "10.0.0.1:8080",
            &[("User-Agent", "t")],
            b"",
        );
        assert_eq!(
            get,
            b"GET /health HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: t\r\n\r\n"
        );
        let post = encode_request("POST", "/x", "h", &[], b"{}");
        assert_eq!(
            post,
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    /// A server on loopback that answers each request it reads with the
    /// next of `answers`, written in pieces split at `|`, then closes.
    async fn scripted(answers: Vec<&'static str>) -> Conn {
        let srv = canned::serve(move |mut s| {
            let answers = answers.clone();
            async move {
                for answer in answers {
                    if !canned::answer_in_pieces(&mut s, answer, Duration::from_millis(5)).await {
                        return;
                    }
                }
            }
        })
        .await;
        Conn::new(tokio_util::either::Either::Left(
            tokio::net::TcpStream::connect(srv.addr).await.unwrap(),
        ))
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    async fn body_of(slot: &mut Option<Conn>) -> (StatusCode, Vec<u8>, bool) {
        let head = slot.as_mut().unwrap().exchange(GET).await.unwrap();
        let mut resp = Response::new(slot, head);
        let (body, complete) = resp.read_body(1024, true).await.unwrap();
        (resp.status, body, complete)
    }

    #[tokio::test]
    async fn bodies_split_across_reads_and_kept_alive() {
        let conn = scripted(vec![
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Le|ngth: 5\r\n\r\nhe|llo",
            "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
             3;x=y\r\nabc\r|\n10\r\n0123456789|abcdef\r\n0\r\nTrailer: 1\r\n|\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        ])
        .await;
        let mut slot = Some(conn);
        assert_eq!(
            body_of(&mut slot).await,
            (StatusCode::OK, b"hello".to_vec(), true)
        );
        assert!(slot.as_mut().unwrap().idle_ok());
        assert_eq!(
            body_of(&mut slot).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                b"abc0123456789abcdef".to_vec(),
                true
            )
        );
        assert!(slot.is_some(), "chunked body read to its end: kept");
        assert_eq!(
            body_of(&mut slot).await,
            (StatusCode::OK, b"ok".to_vec(), true)
        );
        assert!(slot.is_none(), "Connection: close is honoured");
    }

    #[tokio::test]
    async fn body_until_close_and_over_the_limit() {
        let mut slot = Some(scripted(vec!["HTTP/1.0 200 OK\r\n\r\nfirst|second"]).await);
        assert_eq!(
            body_of(&mut slot).await,
            (StatusCode::OK, b"firstsecond".to_vec(), true)
        );
        assert!(
            slot.is_none(),
            "a body ended by the close ends the connection"
        );

        let mut slot = Some(
            scripted(vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
            ])
            .await,
        );
        let head = slot.as_mut().unwrap().exchange(GET).await.unwrap();
        let mut resp = Response::new(&mut slot, head);
        assert_eq!(
            resp.read_body(4, true).await.unwrap(),
            (b"0123".to_vec(), false)
        );
        drop(resp);
        assert!(slot.is_none(), "a body not read to its end is not reused");
    }

    #[tokio::test]
    async fn truncated_body_and_early_close() {
        let mut slot =
            Some(scripted(vec!["HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]).await);
        let head = slot.as_mut().unwrap().exchange(GET).await.unwrap();
        let mut resp = Response::new(&mut slot, head);
        let err = resp.read_body(1024, true).await.unwrap_err();
        assert!(err.contains("closed before the body ended"), "{err}");
        drop(resp);
        assert!(slot.is_none());

        // Closed without answering: the caller may retry elsewhere.
        let mut conn = scripted(vec![""]).await;
        assert!(matches!(
            conn.exchange(GET).await,
            Err(Error::ClosedEarly(_))
        ));
        // Closed while idle: seen without waiting.
        let mut conn = scripted(vec![]).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!conn.idle_ok());

        let mut conn = scripted(vec!["HTTP/1.1 200 OK\r\nContent-Le"]).await;
        assert!(matches!(conn.exchange(GET).await, Err(Error::Other(_))));
        let mut conn = scripted(vec!["SSH-2.0-OpenSSH\r\n\r\n"]).await;
        let err = conn.exchange(GET).await.unwrap_err().to_string();
        assert!(err.contains("bad response head"), "{err}");
    }

    /// What a client made of one response: the status and the whole body,
    /// or that it refused the response.
    type Verdict = Result<(u16, Vec<u8>), ()>;

    /// A loopback server that answers one request with `raw`, written in
    /// pieces split at `|`, then closes.
    async fn serve_once(raw: &'static str) -> std::net::SocketAddr {
        let srv = canned::serve(move |mut s| async move {
            canned::answer_in_pieces(&mut s, raw, Duration::from_millis(2)).await;
        })
        .await;
        srv.addr
    }

    async fn with_h1(raw: &'static str) -> Verdict {
        let tcp = tokio::net::TcpStream::connect(serve_once(raw).await)
            .await
            .unwrap();
        let mut slot = Some(Conn::new(tokio_util::either::Either::Left(tcp)));
        let head = slot.as_mut().unwrap().exchange(GET).await.map_err(|_| ())?;
        let mut resp = Response::new(&mut slot, head);
        let (body, complete) = resp.read_body(1 << 20, true).await.map_err(|_| ())?;
        assert!(complete);
        Ok((resp.status.as_u16(), body))
    }

    async fn with_hyper(raw: &'static str) -> Verdict {
        use http_body_util::{BodyExt, Empty};
        let tcp = tokio::net::TcpStream::connect(serve_once(raw).await)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("/")
            .header("host", "x")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.map_err(|_| ())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|_| ())?;
        Ok((status, body.to_bytes().to_vec()))
    }

    /// Differential test against hyper (see the module doc): both clients
    /// read the same bytes and must agree on the status and body, or both
    /// refuse the response.
    #[tokio::test]
    async fn reads_responses_as_hyper_does() {
        let cases: &[&'static str] = &[
            // Content-Length, split anywhere.
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 503 Service Unavailable\r\nCont|ent-Length: 3\r\n\r|\nab|c",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
            // Chunked, with extensions and trailers; chunked wins over a length.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r|\nab|c\r\n0\r\n|\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
            // Close-delimited: no length, HTTP/1.0, a coding other than chunked.
            "HTTP/1.1 200 OK\r\n\r\nuntil|the close",
            "HTTP/1.0 200 OK\r\n\r\nfirst|second",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw",
            // No body whatever the headers say; an interim answer first.
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            // Malformed or cut: both refuse.
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Le",
            "",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            "HTTP/1.1 999 Whatever\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
        ];
        for raw in cases {
            let (ours, theirs) = (with_h1(raw).await, with_hyper(raw).await);
            assert_eq!(ours, theirs, "{raw:?}");
        }
    }

    /// CPU time of the calling thread (user and kernel).
    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
        assert_eq!(rc, 0);
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A blocking keep-alive server on its own thread, so its work is not
    /// counted: each request (up to its blank line) gets `answer`.
    fn keep_alive_server(answer: &'static [u8]) -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                s.set_nodelay(true).unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if s.write_all(answer).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// The measurement behind the module doc, client side only: CPU time
    /// per probe exchange on one kept loopback connection, this client
    /// against hyper's bare connection driven on the same thread.
    /// `cargo test -p failover-agent --lib h1::tests::cost_per_exchange
    /// -- --ignored --nocapture`
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    async fn cost_per_exchange() {
        use crate::health::http::{BODY_LIMIT, USER_AGENT};
        use http_body_util::{BodyExt, Empty};
        const N: u32 = 20_000;
        const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let addr = keep_alive_server(ANSWER);

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut slot = Some(Conn::new(tokio_util::either::Either::Left(tcp)));
        let req = encode_request("GET", "/health", "x", &[("User-Agent", USER_AGENT)], b"");
        let t0 = thread_cpu();
        for _ in 0..N {
            let head = slot.as_mut().unwrap().exchange(&req).await.unwrap();
            let mut resp = Response::new(&mut slot, head);
            resp.read_body(BODY_LIMIT, false).await.unwrap();
            drop(resp);
            assert!(slot.is_some());
        }
        let ours = (thread_cpu() - t0) / N;

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let t0 = thread_cpu();
        for _ in 0..N {
            let req = hyper::Request::get("/health")
                .header("host", "x")
                .header("user-agent", USER_AGENT)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        }
        let hyper = (thread_cpu() - t0) / N;
        println!("CPU per exchange: h1 {ours:?}, hyper {hyper:?}");
    }
}
