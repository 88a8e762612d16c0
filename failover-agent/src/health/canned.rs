//! Canned test servers for the probe tests: a loopback listener that
//! accepts every connection and serves each on its own task, reading a
//! request (up to its blank line) and writing a canned answer.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// A running canned server; it ends with the test's runtime.
pub(crate) struct Canned {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

/// Serves every connection to a new loopback port with `conn`, each on
/// its own task, counting them.
pub(crate) async fn serve<F, Fut>(conn: F) -> Canned
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(conn(s));
        }
    });
    Canned { addr, accepted }
}

/// Reads one request head; false once the client is gone.
pub(crate) async fn read_request(s: &mut TcpStream) -> bool {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Reads a request and writes `answer` whole; false once the client is
/// gone.
pub(crate) async fn answer(s: &mut TcpStream, answer: &[u8]) -> bool {
    read_request(s).await && s.write_all(answer).await.is_ok()
}

/// Reads a request and writes `answer` in pieces split at `|`, `gap`
/// apart; false once the client is gone.
pub(crate) async fn answer_in_pieces(s: &mut TcpStream, answer: &str, gap: Duration) -> bool {
    if !read_request(s).await {
        return false;
    }
    for piece in answer.split('|') {
        if s.write_all(piece.as_bytes()).await.is_err() {
            return false;
        }
        tokio::time::sleep(gap).await;
    }
    true
}
