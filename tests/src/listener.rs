//! A TCP "backend" for probes: a loopback listener in the current network
//! namespace that accepts and closes every connection; it stops (and the
//! port refuses) on drop or [`Listener::close`].

/// A listener task on `127.0.0.1:port`; aborted on drop.
pub struct Listener {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Binds an ephemeral loopback port and starts accepting.
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback listener");
        let port = l.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        Self { port, task }
    }

    /// Stops listening, and returns once the socket is closed.
    pub async fn close(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
