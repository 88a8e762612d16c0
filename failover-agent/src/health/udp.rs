//! UDP probe: one datagram out, healthy when the answer comes back within
//! the prober's timeout and (optionally) matches the expected bytes.
//!
//! A TCP probe of a UDP service only proves that something listens on the
//! TCP side; a backend whose UDP server died keeps passing it. This probe
//! asks the UDP server itself.
//!
//! Each check uses a new connected socket on an ephemeral port: the kernel
//! then delivers only datagrams from the backend's address and port, an
//! ICMP port unreachable shows as `ECONNREFUSED` (a dead backend,
//! [`Failure::Refused`]), and a late answer to an earlier check can never
//! be taken for this one's. A check the timeout cuts short is
//! [`Failure::Unanswered`]: a datagram is a UDP exchange's whole
//! handshake, and flows of a UDP service lose nothing by moving.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::UdpSocket;

use super::{Failure, Probe, ProbeOutcome};

/// Most bytes of an answer quoted in a failure.
const QUOTE: usize = 64;

/// What the answer must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpExpect {
    /// Any answer.
    Any,
    /// Exactly these bytes.
    Exact(Box<[u8]>),
    /// Starting with these bytes.
    Prefix(Box<[u8]>),
}

impl UdpExpect {
    fn accepts(&self, reply: &[u8]) -> bool {
        match self {
            UdpExpect::Any => true,
            UdpExpect::Exact(want) => reply == &**want,
            UdpExpect::Prefix(want) => reply.starts_with(want),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UdpProbe {
    addr: SocketAddr,
    payload: Box<[u8]>,
    expect: UdpExpect,
}

impl UdpProbe {
    pub fn new(addr: SocketAddr, payload: Vec<u8>, expect: UdpExpect) -> Self {
        Self {
            addr,
            payload: payload.into(),
            expect,
        }
    }
}

impl Probe for UdpProbe {
    async fn check(&self) -> ProbeOutcome {
        let start = Instant::now();
        let local: SocketAddr = if self.addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = match UdpSocket::bind(local).await {
            Ok(s) => s,
            Err(e) => return ProbeOutcome::failed(Failure::Local, format!("UDP socket: {e}")),
        };
        // Connecting a UDP socket sends nothing; it fails only without a
        // route to the backend.
        if let Err(e) = sock.connect(self.addr).await {
            return ProbeOutcome::failed(Failure::of_io(&e), format!("UDP {}: {e}", self.addr));
        }
        if let Err(e) = sock.send(&self.payload).await {
            return ProbeOutcome::failed(
                Failure::of_io(&e),
                format!("UDP send to {}: {e}", self.addr),
            );
        }
        // Enough to judge the answer (one byte more than an exact match
        // tells a longer one apart) and to quote it; the rest of a longer
        // datagram is cut by the kernel.
        let judge = match &self.expect {
            UdpExpect::Any => 0,
            UdpExpect::Exact(w) => w.len() + 1,
            UdpExpect::Prefix(w) => w.len(),
        };
        let mut buf = vec![0u8; judge.max(QUOTE)];
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                return ProbeOutcome::failed(
                    Failure::of_io(&e),
                    format!("UDP answer from {}: {e}", self.addr),
                );
            }
        };
        let latency = start.elapsed();
        let reply = &buf[..n];
        if self.expect.accepts(reply) {
            ProbeOutcome::Healthy { latency }
        } else {
            ProbeOutcome::failed(
                Failure::BadAnswer,
                format!(
                    "UDP answer from {} {} (got {})",
                    self.addr,
                    match &self.expect {
                        UdpExpect::Exact(w) => format!("is not {}", show(w)),
                        UdpExpect::Prefix(w) => format!("does not start with {}", show(w)),
                        UdpExpect::Any => String::new(),
                    },
                    show(&reply[..reply.len().min(QUOTE)])
                ),
            )
        }
    }

    fn timed_out(&self) -> Failure {
        Failure::Unanswered
    }
}

/// Bytes for a message: text when printable ASCII, hex otherwise.
fn show(b: &[u8]) -> String {
    if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        format!("hex {}", hex::encode(b))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A UDP server on loopback answering each datagram with `answer`
    /// (prefixed by the request when `echo`).
    async fn server(answer: &'static [u8], echo: bool) -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut out = if echo { buf[..n].to_vec() } else { Vec::new() };
                out.extend_from_slice(answer);
                let _ = s.send_to(&out, from).await;
            }
        });
        addr
    }

    fn probe(addr: SocketAddr, expect: UdpExpect) -> UdpProbe {
        UdpProbe::new(addr, b"ping".to_vec(), expect)
    }

    async fn check(p: &UdpProbe) -> ProbeOutcome {
        tokio::time::timeout(Duration::from_secs(2), p.check())
            .await
            .expect("answer or error in time")
    }

    #[tokio::test]
    async fn answers_are_matched_exactly_or_by_prefix() {
        let addr = server(b"pong", false).await;
        for expect in [
            UdpExpect::Any,
            UdpExpect::Exact((*b"pong").into()),
            UdpExpect::Prefix((*b"po").into()),
        ] {
            let o = check(&probe(addr, expect.clone())).await;
            assert!(
                matches!(o, ProbeOutcome::Healthy { .. }),
                "{expect:?}: {o:?}"
            );
        }
        let o = check(&probe(addr, UdpExpect::Exact((*b"pon").into()))).await;
        assert_eq!(o.failure(), Some(Failure::BadAnswer));
        assert_eq!(
            o.reason().unwrap(),
            format!("UDP answer from {addr} is not \"pon\" (got \"pong\")")
        );
        let echo = server(&[0xff], true).await;
        let o = check(&probe(echo, UdpExpect::Prefix((*b"pong").into()))).await;
        assert_eq!(
            o.reason().unwrap(),
            format!("UDP answer from {echo} does not start with \"pong\" (got hex 70696e67ff)")
        );
    }

    #[tokio::test]
    async fn a_longer_answer_is_not_an_exact_match() {
        let addr = server(b"pong and more", false).await;
        let o = check(&probe(addr, UdpExpect::Exact((*b"pong").into()))).await;
        assert_eq!(o.failure(), Some(Failure::BadAnswer), "{o:?}");
        let long = b"x".repeat(300).into_boxed_slice();
        let echo = server(b"", true).await;
        let p = UdpProbe::new(echo, long.to_vec(), UdpExpect::Exact(long));
        assert!(matches!(check(&p).await, ProbeOutcome::Healthy { .. }));
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_and_silence_is_unanswered() {
        // Bound and closed again: the kernel answers ICMP port unreachable.
        let closed = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let o = check(&probe(closed, UdpExpect::Any)).await;
        assert_eq!(o.failure(), Some(Failure::Refused), "{o:?}");
        assert_eq!(Failure::Refused.cause(), super::super::DownCause::Dead);

        // Bound and never answering: only the prober's timeout ends it.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = probe(silent.local_addr().unwrap(), UdpExpect::Any);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), p.check())
                .await
                .is_err()
        );
        assert_eq!(p.timed_out(), Failure::Unanswered);
    }
}
