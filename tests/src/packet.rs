//! Frames for kernel tests, built and checked with etherparse: inputs are
//! built from scratch, and outputs are compared byte for byte with an
//! expected frame whose checksums etherparse computes from scratch.

use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, SlicedPacket, TcpHeader};

/// One TCP or UDP frame's fields.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
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

impl Frame {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
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

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
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
        let b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac).ipv4(
            self.src.octets(),
            self.dst.octets(),
            self.ttl,
        );
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

/// Checks a frame's IPv4 and L4 checksums by recomputing them from scratch.
pub fn assert_checksums_valid(frame: &[u8]) {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
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

/// Source port of an output frame's L4 header.
pub fn ports(frame: &[u8]) -> (u16, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    match p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(etherparse::TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => panic!("no ports"),
    }
}
