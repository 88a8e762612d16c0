//! A flood of bad SYNs into the edge, and what the edge and the agent made
//! of it. The segments are the SYN-shaped ones a client can send that must
//! not count as passive-health evidence (docs/datapath.md, "What a client
//! can send"): the edge drops the malformed ones and forwards the rest
//! uncounted. They leave the client's `c0` as raw frames (an AF_PACKET
//! socket, [`Socket`]) from spoofed sources; the edge's answers to those
//! go nowhere, as they would on the internet.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::Result;
use failover_agent::dataplane::ReasonCount;
use failover_common::{MAX_BACKENDS, Reason, state, tcp};

use crate::{
    agentproc::World,
    generator::Socket,
    pacer,
    packet::{Frame, set_l4_checksum, with_tcp_options},
    topology::{Topology, VIP},
};

/// Offset of the TCP header in an untagged frame without IP options.
const L4: usize = 34;
/// Frames per pool: each is a distinct client tuple.
const POOL: usize = 10_000;
/// One batch of frames every tick.
const TICK: Duration = Duration::from_millis(10);

/// One kind of bad SYN-shaped segment to VIP:80.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bare SYN with a wrong TCP checksum: `bad_l4_checksum`.
    BadChecksum,
    /// SYN+FIN, SYN+RST, no flags at all: `bad_tcp_flags`.
    SynFin,
    SynRst,
    NoFlags,
    /// A data offset of 15 (60 bytes) in a 20-byte segment: `truncated_l4`.
    BadOffset,
    /// Forwarded, counted in `syns_ignored`: a TCP MD5 option, an MPTCP
    /// MP_JOIN, data, PSH.
    Md5,
    MpJoin,
    Data,
    SynPsh,
    /// An RST and a SYN-ACK with no flow: `not_opening`.
    StrayRst,
    StraySynAck,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::BadChecksum,
        Kind::SynFin,
        Kind::SynRst,
        Kind::NoFlags,
        Kind::BadOffset,
        Kind::Md5,
        Kind::MpJoin,
        Kind::Data,
        Kind::SynPsh,
        Kind::StrayRst,
        Kind::StraySynAck,
    ];

    /// This segment from `src:sport` to VIP:80, with `macs` (source,
    /// destination).
    pub fn frame(self, src: Ipv4Addr, sport: u16, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
        let mut f = Frame::tcp(src, sport, VIP, 80);
        (f.src_mac, f.dst_mac) = macs;
        let patched = |at: usize, byte: u8| {
            let mut b = f.build();
            b[at] = byte;
            set_l4_checksum(&mut b);
            b
        };
        let mut md5 = [0xab; 18];
        md5[..2].copy_from_slice(&[19, 18]);
        match self {
            Kind::BadChecksum => {
                let mut b = f.build();
                b[L4 + 16] ^= 0x5a;
                b
            }
            Kind::SynFin => patched(L4 + 13, tcp::SYN | tcp::FIN),
            Kind::SynRst => patched(L4 + 13, tcp::SYN | tcp::RST),
            Kind::NoFlags => patched(L4 + 13, 0),
            Kind::BadOffset => patched(L4 + 12, 15 << 4),
            Kind::Md5 => with_tcp_options(&f.build(), &md5),
            // Subtype 1 (join), address id 0, a token no connection has.
            Kind::MpJoin => with_tcp_options(
                &f.build(),
                &[30, 12, 0x10, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 2],
            ),
            Kind::Data => {
                f.payload = b"early data".to_vec();
                f.build()
            }
            Kind::SynPsh => patched(L4 + 13, tcp::SYN | tcp::PSH),
            Kind::StrayRst => f.rst(1, None).build(),
            Kind::StraySynAck => f.synack(7).build(),
        }
    }
}

/// Where a flood comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Sources {
    /// [`ONE_SOURCE`], from random ports.
    #[strum(serialize = "one-source")]
    One,
    /// Random addresses in 203.0.113.0/24 (the VIP excepted), random ports.
    #[strum(serialize = "many-sources")]
    Many,
}

/// The single spoofed source: in the client's subnet, not the client.
pub const ONE_SOURCE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

impl Sources {
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// [`POOL`] frames, the kinds in turn, each from its own port (so no
    /// two share a flow) and, for `Many`, a random address. Seeded: every
    /// run sends the same frames.
    pub fn frames(self, macs: ([u8; 6], [u8; 6])) -> Vec<Vec<u8>> {
        let mut rng = fastrand::Rng::with_seed(0xbad5_u64);
        let mut ports: Vec<u16> = (1024..=u16::MAX).collect();
        rng.shuffle(&mut ports);
        let vip = VIP.octets()[3];
        (0..POOL)
            .map(|i| {
                let src = match self {
                    Sources::One => ONE_SOURCE,
                    Sources::Many => {
                        let host = loop {
                            let h = rng.u8(1..255);
                            if h != vip {
                                break h;
                            }
                        };
                        Ipv4Addr::new(203, 0, 113, host)
                    }
                };
                Kind::ALL[i % Kind::ALL.len()].frame(src, ports[i], macs)
            })
            .collect()
    }
}

/// Sends `pps` bad SYNs a second from `sources` into the edge for
/// `duration`, in a batch every 10 ms; returns how many frames the kernel
/// took. With `pps` 0 it only waits out `duration`.
pub fn flood(topo: &Topology, sources: Sources, pps: u32, duration: Duration) -> Result<u64> {
    let frames = sources.frames((topo.client.mac("c0")?, topo.edge.mac("ec")?));
    let mut socket = Socket::open(&topo.client, "c0", 64)?;
    let (mut offered, mut sent) = (0u64, 0u64);
    let per_s = 1000 / TICK.as_millis() as u64;
    pacer::every(TICK, duration, |i| {
        let due = u64::from(pps) * u64::from(i + 1) / per_s;
        if due > offered {
            sent += socket.send_frames(&frames, due - offered)?;
            offered = due;
        }
        Ok(())
    })?;
    Ok(sent)
}

/// What the edge and the agent had counted at one moment.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Ring generation of every service, by port.
    pub generations: BTreeMap<u16, u64>,
    pub reasons: Vec<ReasonCount>,
    /// `BE_STATS.syns_ignored`, summed over backends.
    pub syns_ignored: u64,
    /// Passive ejections in the agent's log.
    pub ejections: usize,
    /// Backend ids in use whose data-plane state is not `UP`.
    pub not_up: Vec<u32>,
}

impl Seen {
    pub fn read(w: &World) -> Result<Self> {
        let dp = &w.dp;
        let mut not_up = Vec::new();
        for id in 0..MAX_BACKENDS {
            let s = dp.backend(id)?.state;
            if s != state::UNUSED && s != state::UP {
                not_up.push(id);
            }
        }
        Ok(Self {
            generations: dp
                .services()?
                .into_iter()
                .map(|(k, s)| (u16::from_be(k.port_be), s.generation))
                .collect(),
            reasons: dp.reason_counts()?,
            syns_ignored: dp
                .backend_stats_batch(MAX_BACKENDS)?
                .iter()
                .map(|s| s.syns_ignored)
                .sum(),
            ejections: w.agent.log_text().matches("passive ejection").count(),
            not_up,
        })
    }

    /// Ring flips since `self`, over every service.
    pub fn ring_switches(&self, later: &Self) -> u64 {
        later
            .generations
            .iter()
            .map(|(port, g)| g - self.generations.get(port).copied().unwrap_or(0))
            .sum()
    }

    /// How much `reason`'s counter grew since `self`.
    pub fn grew(&self, later: &Self, reason: Reason) -> u64 {
        let count = |s: &Self| s.reasons[reason as usize].count;
        count(later) - count(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_keep_their_spelling() {
        assert_eq!(
            (Sources::One.name(), Sources::Many.name()),
            ("one-source", "many-sources")
        );
    }
}
