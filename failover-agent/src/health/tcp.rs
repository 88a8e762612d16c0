//! TCP connect probe: healthy when the handshake completes. A refused or
//! unreachable connect, or one cut short by the timeout, is a dead backend.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpSocket;

use super::{Failure, Probe, ProbeOutcome};

#[derive(Debug, Clone)]
pub struct TcpProbe {
    addr: SocketAddr,
}

impl TcpProbe {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

impl Probe for TcpProbe {
    async fn check(&self) -> ProbeOutcome {
        let start = Instant::now();
        let socket = match if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        } {
            Ok(s) => s,
            Err(e) => return ProbeOutcome::failed(Failure::Local, format!("socket: {e}")),
        };
        // Close with RST instead of FIN: at 10 probes a second per backend
        // the agent would otherwise pile up TIME_WAIT sockets.
        if let Err(e) = socket.set_zero_linger() {
            return ProbeOutcome::failed(Failure::Local, format!("SO_LINGER: {e}"));
        }
        match socket.connect(self.addr).await {
            Ok(stream) => {
                let latency = start.elapsed();
                drop(stream);
                ProbeOutcome::Healthy { latency }
            }
            Err(e) => {
                ProbeOutcome::failed(Failure::of_io(&e), format!("connect {}: {e}", self.addr))
            }
        }
    }

    /// The check is the handshake: cut short, it went unanswered.
    fn timed_out(&self) -> Failure {
        Failure::Unanswered
    }
}
