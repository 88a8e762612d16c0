//! Frames for kernel tests, built and checked with etherparse: inputs are
//! built from scratch, and outputs are compared byte for byte with an
//! expected frame whose checksums etherparse computes from scratch.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, SlicedPacket, TcpHeader};

/// One TCP or UDP frame's fields, over IPv4 (`Ipv4Addr`, the default) or
/// IPv6 (`Ipv6Addr`).
#[derive(Clone, Debug)]
pub struct Frame<A = Ipv4Addr> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: A,
    pub dst: A,
    /// TTL, or the hop limit over IPv6.
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        seq: u32,
        ack: Option<u32>,
        syn: bool,
        fin: bool,
        rst: bool,
    },
    Udp,
}

impl<A: Copy + Into<IpAddr>> Frame<A> {
    pub fn tcp(src: A, sport: u16, dst: A, dport: u16) -> Self {
        Self {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src,
            dst,
            ttl: 64,
            sport,
            dport,
            l4: L4::Tcp {
                seq: 1000,
                ack: None,
                syn: true,
                fin: false,
                rst: false,
            },
            payload: Vec::new(),
        }
    }

    pub fn udp(src: A, sport: u16, dst: A, dport: u16) -> Self {
        Self {
            l4: L4::Udp,
            payload: b"query".to_vec(),
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// This frame as a TCP segment with these numbers and flags.
    pub fn segment(mut self, seq: u32, ack: Option<u32>, syn: bool, fin: bool, rst: bool) -> Self {
        self.l4 = L4::Tcp {
            seq,
            ack,
            syn,
            fin,
            rst,
        };
        self
    }

    /// A SYN-ACK acknowledging the client's SYN of sequence 1000.
    pub fn synack(self, seq: u32) -> Self {
        self.segment(seq, Some(1001), true, false, false)
    }

    /// An RST, with an acknowledgment number when `ack` is given.
    pub fn rst(self, seq: u32, ack: Option<u32>) -> Self {
        self.segment(seq, ack, false, false, true)
    }

    /// An established-flow data segment (ACK, no SYN).
    pub fn data(mut self, payload: &[u8]) -> Self {
        self.l4 = L4::Tcp {
            seq: 1001,
            ack: Some(5001),
            syn: false,
            fin: false,
            rst: false,
        };
        self.payload = payload.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let b = match (self.src.into(), self.dst.into()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            _ => panic!("a frame's addresses are of one family"),
        };
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp {
                seq,
                ack,
                syn,
                fin,
                rst,
            } => {
                let mut t = b.tcp(self.sport, self.dport, *seq, 64_240);
                if *syn {
                    t = t.syn();
                }
                if *fin {
                    t = t.fin();
                }
                if *rst {
                    t = t.rst();
                }
                if let Some(a) = ack {
                    t = t.ack(*a);
                }
                t.write(&mut out, &self.payload).expect("build tcp");
            }
            L4::Udp => b
                .udp(self.sport, self.dport)
                .write(&mut out, &self.payload)
                .expect("build udp"),
        }
        out
    }
}

/// Checks a frame's IPv4 and L4 checksums by recomputing them from scratch
/// (for ICMP: the message's, and the quoted IPv4 header's).
pub fn assert_checksums_valid(frame: &[u8]) {
    if frame.len() >= 34 && frame[12..14] == [8, 0] && frame[23] == 1 {
        use failover_common::checksum;
        assert_eq!(
            checksum::ipv4_header(&frame[14..34]),
            0,
            "IPv4 header checksum"
        );
        let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        let m = &frame[34..14 + tot];
        assert_eq!(
            checksum::fold(checksum::sum_bytes(m, 0)),
            0xffff,
            "ICMP checksum"
        );
        if m.len() >= 28 {
            assert_eq!(
                checksum::ipv4_header(&m[8..28]),
                0,
                "quoted IPv4 header checksum"
            );
        }
        return;
    }
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    if let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net {
        return assert_checksums6(ip, &p.transport);
    }
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not ipv4: {frame:02x?}")
    };
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 header checksum"
    );
    match &p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => {
            let th: TcpHeader = t.to_header();
            let c = th
                .calc_checksum_ipv4(&h, t.payload())
                .expect("tcp checksum");
            assert_eq!(th.checksum, c, "TCP checksum");
        }
        Some(etherparse::TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            if uh.checksum != 0 {
                let c = uh
                    .calc_checksum_ipv4(&h, u.payload())
                    .expect("udp checksum");
                assert_eq!(uh.checksum, c, "UDP checksum");
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// IPv6's L4 checksums (TCP, UDP, ICMPv6) recomputed from scratch over
/// the IPv6 pseudo-header.
fn assert_checksums6(
    ip: &etherparse::Ipv6Slice<'_>,
    transport: &Option<etherparse::TransportSlice<'_>>,
) {
    let (src, dst) = (ip.header().source(), ip.header().destination());
    let (proto, segment, at) = match transport {
        Some(etherparse::TransportSlice::Tcp(t)) => (6, t.slice(), 16),
        Some(etherparse::TransportSlice::Udp(u)) => (17, u.slice(), 6),
        Some(etherparse::TransportSlice::Icmpv6(i)) => (58, i.slice(), 2),
        other => panic!("unexpected transport {other:?}"),
    };
    let mut zeroed = segment.to_vec();
    zeroed[at] = 0;
    zeroed[at + 1] = 0;
    let mut c = failover_common::checksum::ipv6_l4(src, dst, proto, &zeroed);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    assert_eq!(
        [segment[at], segment[at + 1]],
        c.to_be_bytes(),
        "IPv6 L4 checksum (protocol {proto})"
    );
}

/// Source port of an output frame's L4 header.
pub fn ports(frame: &[u8]) -> (u16, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    match p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(etherparse::TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => panic!("no ports"),
    }
}

/// Recomputes the IPv4 header checksum of an untagged frame in place.
pub fn set_ip_checksum(frame: &mut [u8]) {
    frame[24] = 0;
    frame[25] = 0;
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let c = failover_common::checksum::ipv4_header(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Recomputes the TCP or UDP checksum of an untagged IPv4 frame in place,
/// over the segment its IP total length bounds. A UDP checksum of 0 (none)
/// stays 0.
pub fn set_l4_checksum(frame: &mut [u8]) {
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let proto = frame[23];
    let (src, dst) = (
        <[u8; 4]>::try_from(&frame[26..30]).unwrap(),
        <[u8; 4]>::try_from(&frame[30..34]).unwrap(),
    );
    let at = 34 + if proto == 6 { 16 } else { 6 };
    if proto == 17 && frame[at] == 0 && frame[at + 1] == 0 {
        return;
    }
    frame[at] = 0;
    frame[at + 1] = 0;
    let mut c = failover_common::checksum::ipv4_l4(src, dst, proto, &frame[34..14 + tot]);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Whether an untagged IPv4 frame's L4 checksum is right (a UDP checksum
/// of 0 means none, and counts as right).
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let mut fixed = frame.to_vec();
    set_l4_checksum(&mut fixed);
    fixed == frame
}

/// `frame` (untagged IPv4, TCP or UDP) as a NAT must rewrite it: these
/// MACs, addresses and ports, the TTL one lower, and both checksums
/// computed from scratch.
pub fn nat(
    frame: &[u8],
    macs: ([u8; 6], [u8; 6]),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[6..12].copy_from_slice(&macs.0);
    f[0..6].copy_from_slice(&macs.1);
    f[22] -= 1;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    set_ip_checksum(&mut f);
    set_l4_checksum(&mut f);
    f
}

/// Inserts TCP options after the 20-byte header of an untagged IPv4 TCP
/// frame (padded to a word with EOL), with lengths and checksums fixed.
pub fn with_tcp_options(frame: &[u8], opts: &[u8]) -> Vec<u8> {
    let mut o = opts.to_vec();
    while !o.len().is_multiple_of(4) {
        o.push(0);
    }
    let mut f = frame[..54].to_vec();
    f.extend_from_slice(&o);
    f.extend_from_slice(&frame[54..]);
    f[46] = (((20 + o.len()) / 4) as u8) << 4;
    let tot = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    set_ip_checksum(&mut f);
    set_l4_checksum(&mut f);
    f
}

/// An untagged ICMP frame from `src` to `dst` (TTL 64, DF clear, the MACs
/// of [`Frame`]): the 8-byte ICMP `header` (its checksum bytes ignored),
/// then `quote`, with both checksums computed from scratch.
pub fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, header: [u8; 8], quote: &[u8]) -> Vec<u8> {
    use failover_common::checksum;
    let mut m = header.to_vec();
    m[2] = 0;
    m[3] = 0;
    m.extend_from_slice(quote);
    let c = !checksum::fold(checksum::sum_bytes(&m, 0));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + m.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&m);
    f
}

/// An untagged ICMPv6 frame from `src` to `dst` (hop limit 64, the MACs of
/// [`Frame`]): the 8-byte ICMPv6 `header` (its checksum bytes ignored),
/// then `quote`, the checksum computed from scratch over the pseudo-header.
pub fn icmp6_frame(src: Ipv6Addr, dst: Ipv6Addr, header: [u8; 8], quote: &[u8]) -> Vec<u8> {
    let mut m = header.to_vec();
    m[2] = 0;
    m[3] = 0;
    m.extend_from_slice(quote);
    let c = failover_common::checksum::ipv6_l4(src.octets(), dst.octets(), 58, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv6(src.octets(), dst.octets(), 64)
        .write(&mut f, 58.into(), &m)
        .expect("build icmpv6");
    f
}
