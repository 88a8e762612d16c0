//! IPv6 through the real XDP object (BPF_PROG_TEST_RUN, one packet per
//! run), with the IPv4 cases' assertions: the verdict, the reason counter,
//! and whole output frames against ones built from scratch, checksums
//! computed anew over the IPv6 pseudo-header.
//!
//! Needs root: run through `cargo xtask test`.

use std::net::Ipv6Addr;

use etherparse::{PacketBuilder, SlicedPacket};
use failover_agent::agent::ids::addr6;
use failover_common::{Addr6, FlowKey, Reason, SVC_F_RESET, state};
use failover_tests::{
    lab::{
        BACKEND_MAC, BPORT, CLIENT_MAC, CLIENT6, Lab, SNAT6, VA0_MAC, VC0_MAC, VIP6, backend6_addr,
    },
    packet::{Frame, assert_checksums_valid, icmp6_frame, ports},
    xdp::{XDP_DROP, XDP_REDIRECT, XDP_TX},
};

const TCP: u8 = 6;
const UDP: u8 = 17;
/// Offsets in an untagged IPv6 frame.
const IP6: usize = 14;
const NEXT_HEADER: usize = IP6 + 6;
const HOP_LIMIT: usize = IP6 + 7;
const L4: usize = IP6 + 40;

type Frame6 = Frame<Ipv6Addr>;

fn lab_with(ids: &[u32], flags: u32) -> Lab {
    Lab::with_tcp_service6(ids, flags).expect("lab")
}

fn forward(lab: &Lab, f: &Frame6) -> (u32, Vec<u8>) {
    lab.run(lab.vc0, &f.build()).expect("test run")
}

fn flow_key(f: &Frame6, proto: u8) -> FlowKey<Addr6> {
    FlowKey {
        src_be: addr6(f.src),
        dst_be: addr6(f.dst),
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

fn dst_of(frame: &[u8]) -> Ipv6Addr {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
        panic!("not ipv6: {frame:02x?}")
    };
    Ipv6Addr::from(ip.header().destination())
}

/// The frame the program must send toward `backend` for the client's `f`.
fn expected_forward(f: &Frame6, backend: Ipv6Addr, nat_port: u16) -> Vec<u8> {
    Frame {
        src_mac: VA0_MAC,
        dst_mac: BACKEND_MAC,
        src: SNAT6,
        dst: backend,
        ttl: f.ttl - 1,
        sport: nat_port,
        dport: BPORT,
        ..f.clone()
    }
    .build()
}

/// The frame the program must deliver to the client for a backend's `f`.
fn expected_reverse(f: &Frame6, cport: u16) -> Vec<u8> {
    Frame {
        src_mac: VC0_MAC,
        dst_mac: CLIENT_MAC,
        src: VIP6,
        dst: CLIENT6,
        ttl: f.ttl - 1,
        sport: 80,
        dport: cport,
        ..f.clone()
    }
    .build()
}

/// The backend's segment to the SNAT address and NAT port of `out`.
fn from_backend(out: &[u8], backend: u8) -> Frame6 {
    let (nat_port, _) = ports(out);
    let mut f = Frame::tcp(backend6_addr(backend), BPORT, SNAT6, nat_port);
    f.src_mac = BACKEND_MAC;
    f.dst_mac = VA0_MAC;
    f
}

/// Opens `syn`'s connection through the edge (SYN, SYN-ACK, ACK) and
/// returns the forwarded SYN.
fn handshake(lab: &Lab, syn: &Frame6) -> Vec<u8> {
    let (rc, out) = forward(lab, syn);
    assert_eq!(rc, XDP_REDIRECT);
    let backend = backend_of(&out);
    let synack = from_backend(&out, backend).synack(5000);
    let (rc, back) = lab.run(lab.va0, &synack.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT, "SYN-ACK to the client");
    assert_eq!(back, expected_reverse(&synack, syn.sport));
    let ack = syn.clone().segment(1001, Some(5001), false, false, false);
    assert_eq!(forward(lab, &ack).0, XDP_REDIRECT, "ACK to the backend");
    out
}

fn backend_of(out: &[u8]) -> u8 {
    (1..=3)
        .find(|&i| dst_of(out) == backend6_addr(i))
        .expect("sent to a backend")
}

#[test]
fn a_new_flow_is_pinned_source_natted_and_redirected() {
    let lab = lab_with(&[1, 2, 3], 0);
    let syn = Frame::tcp(CLIENT6, 51_000, VIP6, 80);
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_REDIRECT);
    // Half-open until the handshake completes.
    let pending = lab.dp.flows6().unwrap();
    let (_, flow) = pending
        .iter()
        .find(|(k, _)| *k == flow_key(&syn, TCP))
        .expect("flow tracked");
    let nat_port = u16::from_be(flow.nat_port_be);
    assert_eq!(
        out,
        expected_forward(&syn, backend6_addr(flow.backend_id as u8), nat_port)
    );
    assert_checksums_valid(&out);
    assert_eq!(lab.count(Reason::ForwardRedirect), 1);
    let s = lab.dp.backend_stats(flow.backend_id).unwrap();
    assert_eq!((s.traffic.new_flows, s.syns), (1, 1));
}

/// The IPv4 case's twin (`LAST_HOPS6`): a SYN toward a backend whose
/// neighbour just vanished leaves with its last next hop and counts as
/// evidence; once that is older than `LAST_HOP_TTL_NS` it is dropped.
#[test]
fn a_vanished_neighbour_is_stood_in_for_by_the_last_next_hop_for_a_while() {
    let mut lab = lab_with(&[1], 0);
    let be = backend6_addr(1);
    let (rc, _) = forward(&lab, &Frame::tcp(CLIENT6, 51_060, VIP6, 80));
    assert_eq!(rc, XDP_REDIRECT);
    let last = lab.dp.last_hop6(1).unwrap();
    assert_eq!(
        (last.ifindex, last.dst_be, last.smac, last.dmac),
        (lab.va0, addr6(be), VA0_MAC, BACKEND_MAC),
        "remembered for every CPU"
    );

    lab.ns
        .exec(&format!("ip -6 neigh del {be} dev va0"))
        .unwrap();
    lab.dp.clear_next_hops(1).unwrap();
    let syn = Frame::tcp(CLIENT6, 51_061, VIP6, 80);
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, expected_forward(&syn, be, ports(&out).0));
    assert_checksums_valid(&out);
    assert_eq!(lab.count(Reason::NoNeighbour), 0);
    assert_eq!(lab.count(Reason::ForwardRedirect), 2);
    assert_eq!(lab.dp.backend_stats(1).unwrap().syns, 2, "evidence");

    lab.dp.age_last_hops(1).unwrap();
    let syn = Frame::tcp(CLIENT6, 51_062, VIP6, 80);
    let (rc, _) = forward(&lab, &syn);
    assert_eq!(rc, XDP_DROP);
    assert_eq!(lab.count(Reason::NoNeighbour), 1);
    assert_eq!(lab.dp.backend_stats(1).unwrap().syns, 2);
    assert!(
        !lab.dp
            .flows6()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == flow_key(&syn, TCP)),
        "no state for a SYN not sent"
    );
}

#[test]
fn a_connection_runs_both_ways_and_closes() {
    let lab = lab_with(&[1, 2, 3], 0);
    let syn = Frame::tcp(CLIENT6, 51_001, VIP6, 80);
    let first = handshake(&lab, &syn);
    let backend = backend_of(&first);
    let nat_port = ports(&first).0;
    let flows = lab.dp.flows6().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].0, flow_key(&syn, TCP));

    // Data both ways on the established flow.
    let req = syn
        .clone()
        .data(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n");
    let (rc, out) = forward(&lab, &req);
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        out,
        expected_forward(&req, backend6_addr(backend), nat_port)
    );
    assert_checksums_valid(&out);
    let mut reply = from_backend(&out, backend).data(b"data: {\"choices\":[]}\n\n");
    reply.sport = BPORT;
    let (rc, back) = lab.run(lab.va0, &reply.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(back, expected_reverse(&reply, 51_001));
    assert_checksums_valid(&back);
    let s = lab.dp.backend_stats(u32::from(backend)).unwrap();
    assert_eq!(
        (s.asked, s.answered),
        (1, 1),
        "the wedge signal counts IPv6"
    );

    // The client's RST frees both entries.
    let (rc, _) = forward(&lab, &syn.clone().rst(1001, Some(5001)));
    assert_eq!(rc, XDP_REDIRECT);
    assert!(lab.dp.flows6().unwrap().is_empty());
}

#[test]
fn udp_flows_are_natted_both_ways_and_a_zero_checksum_is_dropped() {
    let mut lab = lab_with(&[1], 0);
    lab.service6(1, 53, UDP, 0, 13, &[2]).unwrap();
    let q = Frame::udp(CLIENT6, 40_053, VIP6, 53);
    let (rc, out) = forward(&lab, &q);
    assert_eq!(rc, XDP_REDIRECT);
    let nat_port = ports(&out).0;
    assert_eq!(
        out,
        Frame {
            src_mac: VA0_MAC,
            dst_mac: BACKEND_MAC,
            src: SNAT6,
            dst: backend6_addr(2),
            ttl: 63,
            sport: nat_port,
            dport: BPORT,
            ..q.clone()
        }
        .build()
    );
    assert_checksums_valid(&out);
    let mut answer = Frame::udp(backend6_addr(2), BPORT, SNAT6, nat_port);
    answer.src_mac = BACKEND_MAC;
    answer.dst_mac = VA0_MAC;
    let (rc, back) = lab.run(lab.va0, &answer.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        back,
        Frame {
            src_mac: VC0_MAC,
            dst_mac: CLIENT_MAC,
            src: VIP6,
            dst: CLIENT6,
            ttl: 63,
            sport: 53,
            dport: 40_053,
            ..answer.clone()
        }
        .build()
    );

    // UDP over IPv6 must carry a checksum (RFC 8200): zero is invalid.
    let mut raw = Frame::udp(CLIENT6, 40_054, VIP6, 53).build();
    raw[L4 + 6] = 0;
    raw[L4 + 7] = 0;
    lab.assert_verdict(&raw, Reason::UdpZeroChecksum);
}

/// An RST from VIP6:80 to the client's `to_port`, built from scratch.
fn expected_rst(to_port: u16, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VC0_MAC, CLIENT_MAC).ipv6(VIP6.octets(), CLIENT6.octets(), 64);
    let mut t = b.tcp(80, to_port, seq, 0).rst();
    if let Some(a) = ack {
        t = t.ack(a);
    }
    let mut out = Vec::new();
    t.write(&mut out, &[]).unwrap();
    out
}

#[test]
fn a_flow_on_a_down_backend_is_reset_and_a_fail_closed_service_resets_a_syn() {
    let mut lab = lab_with(&[1], SVC_F_RESET);
    let syn = Frame::tcp(CLIENT6, 51_010, VIP6, 80);
    handshake(&lab, &syn);
    lab.down(1).unwrap();
    let data = syn.clone().data(b"GET /v1/models HTTP/1.1\r\n\r\n");
    let (rc, out) = forward(&lab, &data);
    assert_eq!(rc, XDP_TX);
    // The segment carried ACK 5001: the RST takes it as its sequence number.
    assert_eq!(out, expected_rst(51_010, 5001, None));
    assert_checksums_valid(&out);
    assert_eq!(lab.count(Reason::ResetSent), 1);
    assert!(
        lab.dp.flows6().unwrap().is_empty(),
        "the dead flow is forgotten"
    );

    // No backend at all: a SYN is answered RST|ACK of seq + 1.
    let lab = lab_with(&[], 0);
    let (rc, out) = forward(&lab, &Frame::tcp(CLIENT6, 51_020, VIP6, 80));
    assert_eq!(rc, XDP_TX);
    assert_eq!(out, expected_rst(51_020, 0, Some(1001)));
}

#[test]
fn a_flow_on_a_down_backend_moves_to_a_live_one_without_the_reset_flag() {
    let mut lab = lab_with(&[1, 2], 0);
    let syn = (0..64u16)
        .map(|p| Frame::tcp(CLIENT6, 55_000 + p, VIP6, 80))
        .find(|f| dst_of(&forward(&lab, f).1) == backend6_addr(1))
        .expect("some flow lands on backend 1");
    lab.down(1).unwrap();
    let (rc, out) = forward(&lab, &syn.clone().data(b"x"));
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), backend6_addr(2));
    assert_checksums_valid(&out);
}

#[test]
fn snat_port_collisions_probe_then_give_up() {
    let lab = lab_with(&[1], 0);
    let mut node = lab.dp.node().unwrap();
    node.port_min = 41_000;
    node.port_max = 41_001;
    let mut lab = lab;
    lab.dp.set_node(node).unwrap();
    // Two clients whose ports both start on the same SNAT port: the second
    // probes on to the next.
    let a = Frame::tcp(CLIENT6, 51_030, VIP6, 80);
    let first = handshake(&lab, &a);
    let b = (0..64u16)
        .map(|p| Frame::tcp(CLIENT6, 52_000 + p, VIP6, 80))
        .find(|f| {
            let (_, out) = forward(&lab, f);
            let _ = forward(&lab, &f.clone().rst(1001, None));
            ports(&out).0 != ports(&first).0
        })
        .expect("another port");
    handshake(&lab, &b);
    // Both ports held by established flows: the next flow is dropped,
    // counted, and leaves no state.
    let c = Frame::tcp(CLIENT6, 53_000, VIP6, 80);
    let input = c.build();
    let (rc, out) = lab.run(lab.vc0, &input).unwrap();
    assert_eq!((rc, out), (XDP_DROP, input));
    assert_eq!(lab.count(Reason::SnatExhausted), 1);
    assert!(
        !lab.dp
            .flows6()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == flow_key(&c, TCP))
    );
}

/// A valid SYN to VIP6:80 whose next header is `next`, with an 8-byte
/// extension header of that kind inserted before the TCP header.
fn with_extension(next: u8) -> Vec<u8> {
    let f = Frame::tcp(CLIENT6, 51_040, VIP6, 80).build();
    let mut out = f[..L4].to_vec();
    out[NEXT_HEADER] = next;
    let payload = u16::from_be_bytes([out[IP6 + 4], out[IP6 + 5]]) + 8;
    out[IP6 + 4..IP6 + 6].copy_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&[TCP, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&f[L4..]);
    out
}

#[test]
fn extension_headers_icmpv6_and_foreign_traffic_pass_to_the_kernel_counted() {
    let lab = lab_with(&[1], 0);
    for (next, reason) in [
        (0, Reason::Ipv6HopByHop),
        (43, Reason::Ipv6Routing),
        (44, Reason::Fragment),
        (60, Reason::Ipv6DestOptions),
        (253, Reason::NotTcpUdp),
    ] {
        lab.assert_verdict(&with_extension(next), reason);
    }
    // ICMPv6 (neighbour discovery, echo, errors) is the kernel's.
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, VC0_MAC)
        .ipv6(CLIENT6.octets(), VIP6.octets(), 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    lab.assert_verdict(&echo, Reason::Icmpv6);
    // Not a VIP: one filter read, and the kernel's.
    let other = Frame::tcp(
        CLIENT6,
        51_041,
        Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1),
        80,
    );
    lab.assert_verdict(&other.build(), Reason::NotVip);
    assert!(lab.dp.flows6().unwrap().is_empty(), "nothing became state");
}

#[test]
fn malformed_ipv6_gets_its_documented_verdict_and_is_never_forwarded() {
    let lab = lab_with(&[1], 0);
    let syn = Frame::tcp(CLIENT6, 51_050, VIP6, 80).build();
    let set_payload =
        |f: &mut Vec<u8>, len: u16| f[IP6 + 4..IP6 + 6].copy_from_slice(&len.to_be_bytes());

    let mut cut = syn[..IP6 + 30].to_vec();
    lab.assert_verdict(&cut, Reason::MalformedIpv6);
    cut = syn.clone();
    set_payload(&mut cut, 200);
    lab.assert_verdict(&cut, Reason::MalformedIpv6);
    let mut v4 = syn.clone();
    v4[IP6] = 0x40 | (v4[IP6] & 0x0f);
    lab.assert_verdict(&v4, Reason::MalformedIpv6);
    let mut short = syn.clone();
    set_payload(&mut short, 10);
    lab.assert_verdict(&short, Reason::TruncatedL4);
    for hop in [0, 1] {
        let mut f = syn.clone();
        f[HOP_LIMIT] = hop;
        lab.assert_verdict(&f, Reason::TtlExpired);
    }
    let mut synfin = syn.clone();
    synfin[L4 + 13] |= 0x01;
    lab.assert_verdict(&synfin, Reason::BadTcpFlags);
    let mut bad_sum = syn.clone();
    bad_sum[L4 + 16] ^= 0xff;
    lab.assert_verdict(&bad_sum, Reason::BadL4Checksum);
    assert!(lab.dp.flows6().unwrap().is_empty(), "nothing became state");
    assert_eq!(lab.count(Reason::ForwardRedirect), 0);
}

#[test]
fn ipv6_passes_untouched_until_the_node_has_an_ipv6_address() {
    let mut lab = Lab::new().unwrap();
    lab.backend6(1, backend6_addr(1), BPORT, state::UP).unwrap();
    lab.service6(0, 80, TCP, 0, 13, &[1]).unwrap();
    let syn = Frame::tcp(CLIENT6, 51_060, VIP6, 80).build();
    lab.assert_verdict(&syn, Reason::NotConfigured);
    lab.enable_v6().unwrap();
    assert_eq!(lab.run(lab.vc0, &syn).unwrap().0, XDP_REDIRECT);
}

#[test]
fn a_packet_too_big_for_the_next_hop_is_answered_with_its_mtu() {
    let lab = lab_with(&[1], 0);
    lab.ns.exec("ip link set va0 mtu 1280").unwrap();
    let syn = Frame::tcp(CLIENT6, 51_070, VIP6, 80);
    handshake(&lab, &syn);
    let big = syn.clone().data(&[b'x'; 1300]);
    let input = big.build();
    let (rc, out) = lab.run(lab.vc0, &input).unwrap();
    assert_eq!(rc, XDP_TX);
    assert_eq!(lab.count(Reason::FragNeededSent), 1);
    // ICMPv6 packet too big from the VIP, quoting the IPv6 header and 8
    // bytes of TCP as the client sent them.
    let mut msg = vec![2, 0, 0, 0];
    msg.extend_from_slice(&1280u32.to_be_bytes());
    msg.extend_from_slice(&input[IP6..L4 + 8]);
    let c = failover_common::checksum::ipv6_l4(VIP6.octets(), CLIENT6.octets(), 58, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut want = Vec::new();
    PacketBuilder::ethernet2(VC0_MAC, CLIENT_MAC)
        .ipv6(VIP6.octets(), CLIENT6.octets(), 64)
        .write(&mut want, 58.into(), &msg)
        .unwrap();
    assert_eq!(out, want);
    assert_checksums_valid(&out);
    // Within the rate limit, the next one is dropped and counted.
    let (rc, _) = lab.run(lab.vc0, &input).unwrap();
    assert_eq!(rc, XDP_DROP);
    assert_eq!(lab.count(Reason::FragNeededLimited), 1);
}

#[test]
fn hostile_ipv6_beside_a_live_flow_moves_nothing() {
    // Every kind of IPv6 garbage an outsider can send, interleaved with a
    // live connection's requests and answers: the flow keeps its backend
    // and NAT port, every segment of it is translated exactly, and no
    // passive-health counter of any backend moves.
    let lab = lab_with(&[1, 2, 3], 0);
    let syn = Frame::tcp(CLIENT6, 51_080, VIP6, 80);
    let first = handshake(&lab, &syn);
    let (backend, nat_port) = (backend_of(&first), ports(&first).0);
    let passive = |lab: &Lab| -> Vec<(u64, u64, u64, u64, u64, u64)> {
        (1..=3)
            .map(|id| {
                let s = lab.dp.backend_stats(id).unwrap();
                (
                    s.syns,
                    s.synacks,
                    s.syn_rsts,
                    s.syns_ignored,
                    s.pending_evicted,
                    s.syn_other,
                )
            })
            .collect()
    };
    let before = passive(&lab);

    let valid = Frame::tcp(CLIENT6, 51_081, VIP6, 80).build();
    let mut hostile: Vec<(u32, Vec<u8>)> = [0, 43, 44, 60, 253]
        .into_iter()
        .map(|next| (lab.vc0, with_extension(next)))
        .collect();
    let mut mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut m = valid.clone();
        f(&mut m);
        hostile.push((lab.vc0, m));
    };
    mutate(&|f| f.truncate(IP6 + 30));
    mutate(&|f| f[IP6 + 4..IP6 + 6].copy_from_slice(&400u16.to_be_bytes()));
    mutate(&|f| f[IP6] = 0x45);
    mutate(&|f| f[HOP_LIMIT] = 1);
    mutate(&|f| f[L4 + 13] |= 0x01);
    mutate(&|f| f[L4 + 16] ^= 0xff);
    let mut udp = Frame::udp(CLIENT6, 40_080, VIP6, 80).build();
    udp[L4 + 6..L4 + 8].copy_from_slice(&[0, 0]);
    hostile.push((lab.vc0, udp));
    // ICMPv6 errors "from a router" about the flow: a packet too big
    // claiming a tiny MTU, dropped; an unreachable for another NAT port,
    // passed to the kernel. Neither is translated (tests/tests/icmp6.rs
    // has every such case).
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0xfe);
    let tiny = [2, 0, 0, 0, 0, 0, 0x01, 0x00];
    hostile.push((
        lab.va0,
        icmp6_frame(router, SNAT6, tiny, &first[IP6..L4 + 8]),
    ));
    let mut other_port = first[IP6..L4 + 8].to_vec();
    other_port[40..42].copy_from_slice(&nat_port.wrapping_add(3).to_be_bytes());
    let unreachable = [1, 4, 0, 0, 0, 0, 0, 0];
    hostile.push((
        lab.va0,
        icmp6_frame(router, SNAT6, unreachable, &other_port),
    ));
    // SYN-ACKs and RSTs forged with a backend's address toward NAT ports
    // with no flow, and one that does not ACK any SYN.
    for port in [nat_port.wrapping_add(1), nat_port.wrapping_add(7)] {
        let mut f = Frame::tcp(backend6_addr(backend), BPORT, SNAT6, port).synack(9);
        f.src_mac = BACKEND_MAC;
        f.dst_mac = VA0_MAC;
        hostile.push((lab.va0, f.build()));
        hostile.push((lab.va0, f.rst(9, Some(77)).build()));
    }

    let req = syn
        .clone()
        .data(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n");
    let mut reply = from_backend(&first, backend).data(b"data: {}\n\n");
    reply.sport = BPORT;
    for _ in 0..20 {
        for (ifindex, frame) in &hostile {
            let (rc, out) = lab.run(*ifindex, frame).unwrap();
            assert!(
                rc == XDP_DROP || rc == failover_tests::xdp::XDP_PASS,
                "hostile frame sent on ({rc}): {frame:02x?}"
            );
            assert_eq!(&out, frame, "a hostile frame is left untouched");
        }
        let (rc, out) = forward(&lab, &req);
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(
            out,
            expected_forward(&req, backend6_addr(backend), nat_port)
        );
        let (rc, back) = lab.run(lab.va0, &reply.build()).unwrap();
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(back, expected_reverse(&reply, 51_080));
    }
    let flows = lab.dp.flows6().unwrap();
    assert_eq!(flows.len(), 1, "no hostile frame became state: {flows:?}");
    assert_eq!(flows[0].1.backend_id, u32::from(backend), "the flow stayed");
    assert_eq!(passive(&lab), before, "no passive-health counter moved");
}

#[test]
fn idle_ipv6_flows_leave_on_time_and_live_ones_stay() {
    use std::time::{Duration, Instant};
    let mut lab = lab_with(&[1], 0);
    let idle = Frame::tcp(CLIENT6, 51_090, VIP6, 80);
    let live = Frame::tcp(CLIENT6, 51_091, VIP6, 80);
    handshake(&lab, &idle);
    handshake(&lab, &live);
    let req = live.clone().data(b"more").build();
    let timeout = Duration::from_millis(500);
    let present = |lab: &Lab, f: &Frame6| {
        lab.dp
            .flows6()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == flow_key(f, TCP))
    };
    let t0 = Instant::now();
    let mut next_live = t0;
    let mut gone_at = None;
    while t0.elapsed() < Duration::from_secs(5) && gone_at.is_none() {
        if Instant::now() >= next_live {
            assert_eq!(lab.run(lab.vc0, &req).unwrap().0, XDP_REDIRECT);
            next_live += Duration::from_millis(100);
        }
        let now = failover_agent::dataplane::now_stamp();
        lab.dp.expire_idle(now, |_, _| Some(timeout)).unwrap();
        if !present(&lab, &idle) {
            gone_at = Some(t0.elapsed());
        } else {
            std::thread::yield_now();
        }
    }
    let gone_at = gone_at.expect("the idle IPv6 flow left within 5 s");
    assert!(gone_at <= timeout * 4, "{gone_at:?}");
    assert!(present(&lab, &live), "the live flow stays");
}
