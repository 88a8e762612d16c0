//! Prompt resets for flows whose backend died silently.
//!
//! The XDP program resets a flow pinned to a down backend when the client
//! next sends on it. A client waiting on a blackholed backend (a stalled
//! stream) sends nothing, so it would hang. The agent therefore sends each
//! such client one out-of-window segment "from" the VIP; the client's TCP
//! answers with a duplicate ACK (RFC 793/5961), that ACK reaches the XDP
//! program, and the program answers it with an RST whose sequence number is
//! the ACK's: exactly what the client accepts.

use std::net::Ipv4Addr;

use failover_common::{Addr6, Flow, FlowKey, checksum};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{Dataplane, ErrorKind, Result};

const IPPROTO_TCP: u8 = 6;
const TCP_ACK: u8 = 0x10;

impl Dataplane {
    /// Nudges every TCP client pinned to one of `backend_ids`, in one read
    /// of the flow table; returns how many. Call after marking the backends
    /// down, from the edge's namespace.
    pub fn nudge_clients(&self, backend_ids: &[u32]) -> Result<usize> {
        // Only the tables of the down backends' families, and of the
        // half-open ones only the slots of the node's SNAT ports: the
        // clients still in SYN_SENT are the ones this rescues, so this read
        // delays a failover. Reading every slot of both families' tables
        // took ~40 ms, and an IPv6 backend's failover waited on the empty
        // IPv4 table too (the IPv4-only config skipped the IPv6 one).
        // A slot outside the range (left from a range changed since) is
        // not nudged: that client's SYN retransmit finds the new ring.
        let (mut v4, mut v6) = (false, false);
        for &id in backend_ids {
            match self.backend(id) {
                // An IPv6 backend's address is in BACKEND_ADDR6.
                Ok(b) if b.addr_be != 0 => v4 = true,
                Ok(_) => v6 = true,
                Err(_) => (v4, v6) = (true, true),
            }
        }
        let node = self.node()?;
        let (pending, pending6) = self.pending_in((node.port_min, node.port_max), v4, v6)?;
        let pinned =
            |f: &Flow, proto: u8| backend_ids.contains(&f.backend_id) && proto == IPPROTO_TCP;
        let mut flows: Vec<FlowKey> = Vec::new();
        if v4 {
            let established = self.established_flows()?.into_iter();
            let half_open = pending.iter().map(super::pending_flow);
            flows = established
                .chain(half_open)
                .filter(|(k, f)| pinned(f, k.proto))
                .map(|(k, _)| k)
                .collect();
        }
        let mut flows6: Vec<FlowKey<Addr6>> = Vec::new();
        if v6 && self.has_ipv6() {
            let established = self.established_flows6()?.into_iter();
            let half_open = pending6.iter().map(super::pending_flow);
            flows6 = established
                .chain(half_open)
                .filter(|(k, f)| pinned(f, k.proto))
                .map(|(k, _)| k)
                .collect();
        }
        let io = |source| ErrorKind::Io {
            what: "raw socket for nudges",
            path: "-".into(),
            source,
        };
        if !flows6.is_empty() {
            // IPPROTO_RAW implies IPV6_HDRINCL as it does for IPv4.
            let sock = Socket::new(
                Domain::IPV6,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )
            .map_err(io)?;
            for k in &flows6 {
                let pkt = nudge_segment6(k);
                let dst = crate::agent::ids::ipv6_of(k.src_be);
                sock.send_to(
                    &pkt,
                    &SockAddr::from(std::net::SocketAddrV6::new(dst, 0, 0, 0)),
                )
                .map_err(io)?;
            }
        }
        if flows.is_empty() {
            return Ok(flows6.len());
        }
        // IPPROTO_RAW implies IP_HDRINCL: we write the IPv4 header (its
        // source is the VIP, which is not a local address).
        let sock = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(io)?;
        for k in &flows {
            let pkt = nudge_segment(k);
            let dst = Ipv4Addr::from(u32::from_be(k.src_be));
            sock.send_to(&pkt, &SockAddr::from(std::net::SocketAddrV4::new(dst, 0)))
                .map_err(io)?;
        }
        Ok(flows.len() + flows6.len())
    }
}

/// [`nudge_segment`] over IPv6: an empty ACK VIP:port -> client:port with
/// sequence number 0.
fn nudge_segment6(k: &FlowKey<Addr6>) -> [u8; 60] {
    let bytes = |a: Addr6| crate::agent::ids::ipv6_of(a).octets();
    let (vip, client) = (bytes(k.dst_be), bytes(k.src_be));
    let mut p = [0u8; 60];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&20u16.to_be_bytes());
    p[6] = IPPROTO_TCP;
    p[7] = 64;
    p[8..24].copy_from_slice(&vip);
    p[24..40].copy_from_slice(&client);
    let t = &mut p[40..];
    t[0..2].copy_from_slice(&k.dport_be.to_ne_bytes());
    t[2..4].copy_from_slice(&k.sport_be.to_ne_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_ACK;
    t[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let c = checksum::ipv6_l4(vip, client, IPPROTO_TCP, &p[40..]);
    p[56..58].copy_from_slice(&c.to_be_bytes());
    p
}

/// An empty ACK segment VIP:port -> client:port with sequence number 0,
/// which no live connection has in its window.
fn nudge_segment(k: &FlowKey) -> [u8; 40] {
    let (vip, client) = (k.dst_be.to_ne_bytes(), k.src_be.to_ne_bytes());
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = IPPROTO_TCP;
    p[12..16].copy_from_slice(&vip);
    p[16..20].copy_from_slice(&client);
    let c = checksum::ipv4_header(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&k.dport_be.to_ne_bytes());
    t[2..4].copy_from_slice(&k.sport_be.to_ne_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_ACK;
    t[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let c = checksum::ipv4_l4(vip, client, IPPROTO_TCP, &p[20..]);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nudge_segment_is_a_valid_ack_from_the_vip() {
        let k = FlowKey {
            src_be: u32::from(Ipv4Addr::new(192, 0, 2, 100)).to_be(),
            dst_be: u32::from(Ipv4Addr::new(203, 0, 113, 10)).to_be(),
            sport_be: 51_000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let p = nudge_segment(&k);
        assert_eq!(checksum::ipv4_header(&p[..20]), 0);
        assert_eq!(
            checksum::ipv4_l4([203, 0, 113, 10], [192, 0, 2, 100], 6, &p[20..]),
            0
        );
        assert_eq!(&p[12..16], &[203, 0, 113, 10]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 80);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 51_000);
        assert_eq!(p[33], TCP_ACK);
    }

    #[test]
    fn an_ipv6_nudge_is_a_valid_ack_from_the_vip() {
        use crate::agent::ids::addr6;
        let (client, vip): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
            "2001:db8:1::100".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        );
        let k = FlowKey {
            src_be: addr6(client),
            dst_be: addr6(vip),
            sport_be: 51_000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let p = nudge_segment6(&k);
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 20, "payload length");
        assert_eq!((p[6], p[7]), (6, 64), "next header, hop limit");
        assert_eq!(&p[8..24], &vip.octets());
        assert_eq!(&p[24..40], &client.octets());
        assert_eq!(
            checksum::ipv6_l4(vip.octets(), client.octets(), 6, &p[40..]),
            0
        );
        assert_eq!(u16::from_be_bytes([p[40], p[41]]), 443);
        assert_eq!(u16::from_be_bytes([p[42], p[43]]), 51_000);
        assert_eq!(p[53], TCP_ACK);
    }
}
