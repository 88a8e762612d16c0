//! The real XDP object driven with BPF_PROG_TEST_RUN (one packet per run).
//! Each case checks the verdict, the reason counter, and the whole output
//! frame against one built from scratch with checksums computed anew.
//!
//! Needs root: run through `cargo xtask test`.

use std::net::Ipv4Addr;

use etherparse::{IpNumber, Ipv4Header, SlicedPacket, TransportSlice};
use failover_common::{
    FlowKey, GEN_HEADER_LEN, GenConfig, Reason, Reverse, ReverseKey, SVC_F_RESET, names, state,
};
use failover_tests::{
    benchprog::BenchProgs,
    lab::{
        self, BACKEND_MAC, BPORT, CLIENT, CLIENT_MAC, Lab, SAME_LEG_BACKEND, SNAT, VA0_MAC,
        VC0_MAC, VIP, backend_addr,
    },
    netns::require_root,
    packet::{Frame, assert_checksums_valid, ports, set_ip_checksum},
    xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn lab_with(ids: &[u32], flags: u32) -> Lab {
    Lab::with_tcp_service(ids, flags).expect("lab")
}

fn count(lab: &Lab, r: Reason) -> u64 {
    lab.count(r)
}

fn flow_key(f: &Frame, proto: u8) -> FlowKey {
    FlowKey {
        src_be: u32::from(f.src).to_be(),
        dst_be: u32::from(f.dst).to_be(),
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// The frame the program must emit toward the backend for `f`.
fn expected_forward(
    f: &Frame,
    backend: Ipv4Addr,
    nat_port: u16,
    macs: ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    Frame {
        src_mac: macs.0,
        dst_mac: macs.1,
        src: SNAT,
        dst: backend,
        ttl: f.ttl - 1,
        sport: nat_port,
        dport: BPORT,
        ..f.clone()
    }
    .build()
}

/// Sends `f` from the client leg and returns the output and chosen backend.
fn forward(lab: &Lab, f: &Frame) -> (u32, Vec<u8>) {
    lab.run(lab.vc0, &f.build()).expect("test run")
}

fn dst_of(frame: &[u8]) -> Ipv4Addr {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not ipv4")
    };
    ip.header().destination_addr()
}

#[test]
fn new_flow_is_pinned_source_natted_and_redirected() {
    let lab = lab_with(&[1, 2, 3], 0);
    let syn = Frame::tcp(CLIENT, 51_000, VIP, 80);
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_REDIRECT);

    let flow = lab
        .dp
        .flows()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == flow_key(&syn, TCP))
        .expect("flow pinned")
        .1;
    let be = backend_addr(flow.backend_id as u8);
    let nat_port = u16::from_be(flow.nat_port_be);
    assert!((lab::PORT_MIN..=lab::PORT_MAX).contains(&nat_port));
    assert_eq!(
        out,
        expected_forward(&syn, be, nat_port, (VA0_MAC, BACKEND_MAC))
    );
    assert_checksums_valid(&out);

    // The reverse entry restores exactly the client's tuple.
    let (rk, rv): (ReverseKey, Reverse) = lab.dp.reverse_entries().unwrap()[0];
    assert_eq!(
        (rk.backend_be, rk.snat_be, rk.bport_be, rk.nat_port_be),
        (
            u32::from(be).to_be(),
            u32::from(SNAT).to_be(),
            BPORT.to_be(),
            flow.nat_port_be
        )
    );
    assert_eq!(
        (rv.client_be, rv.vip_be, rv.cport_be, rv.vport_be),
        (
            u32::from(CLIENT).to_be(),
            u32::from(VIP).to_be(),
            51_000u16.to_be(),
            80u16.to_be()
        )
    );

    assert_eq!(count(&lab, Reason::ForwardRedirect), 1);
    let s = lab.dp.backend_stats(flow.backend_id).unwrap();
    assert_eq!(
        (s.traffic.new_flows, s.syns, s.traffic.fwd_packets),
        (1, 1, 1)
    );
    assert_eq!(lab.dp.service_stats(0).unwrap().new_flows, 1);
}

/// The frame the program must deliver to the client (port `cport`) for a
/// backend's segment `f`: VIP:80 -> client, client leg MACs, TTL - 1,
/// checksums computed from scratch.
fn to_client(f: &Frame, cport: u16) -> Vec<u8> {
    Frame {
        src_mac: VC0_MAC,
        dst_mac: CLIENT_MAC,
        src: VIP,
        dst: CLIENT,
        sport: 80,
        dport: cport,
        ttl: 63,
        ..f.clone()
    }
    .build()
}

#[test]
fn reply_is_restored_to_vip_and_client_and_measures_handshake() {
    let lab = lab_with(&[2], 0);
    let syn = Frame::tcp(CLIENT, 51_001, VIP, 80);
    let (_, out) = forward(&lab, &syn);
    let (nat_port, _) = ports(&out);

    let mut synack = Frame::tcp(backend_addr(2), BPORT, SNAT, nat_port).synack(5000);
    synack.src_mac = BACKEND_MAC;
    synack.dst_mac = VA0_MAC;
    let (rc, out) = lab.run(lab.va0, &synack.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, to_client(&synack, 51_001));
    assert_checksums_valid(&out);
    assert_eq!(count(&lab, Reason::ReverseRedirect), 1);
    let s = lab.dp.backend_stats(2).unwrap();
    assert_eq!((s.syns, s.synacks, s.syn_rsts), (1, 1, 0));
    assert!(
        s.rtt_last_ns > 0 && s.rtt_at_ns > 0,
        "handshake RTT recorded: {s:?}"
    );
}

#[test]
fn a_new_handshake_on_a_reused_tuple_counts_its_syn_ack() {
    // A connection closed with FINs leaves its entries to the LRU; the
    // client then reuses the port. The second SYN-ACK must count, or the
    // passive detector would see an unanswered SYN from a live backend.
    let lab = lab_with(&[2], 0);
    let syn = Frame::tcp(CLIENT, 51_003, VIP, 80);
    let mut synack = None;
    for round in 1..=2u64 {
        let (rc, out) = forward(&lab, &syn);
        assert_eq!(rc, XDP_REDIRECT);
        let (nat_port, _) = ports(&out);
        let f = Frame::tcp(backend_addr(2), BPORT, SNAT, nat_port).synack(5000 * round as u32);
        let (rc, _) = lab.run(lab.va0, &f.build()).unwrap();
        assert_eq!(rc, XDP_REDIRECT);
        let s = lab.dp.backend_stats(2).unwrap();
        assert_eq!((s.syns, s.synacks), (round, round), "round {round}");
        synack = Some(f);
    }
    // The client's ACK completes the handshake; a retransmitted SYN-ACK of
    // the established flow is then no new answer.
    let ack = syn.clone().segment(1001, Some(10_001), false, false, false);
    assert_eq!(forward(&lab, &ack).0, XDP_REDIRECT);
    let (rc, _) = lab.run(lab.va0, &synack.unwrap().build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(lab.dp.backend_stats(2).unwrap().synacks, 2);
    assert_eq!(lab.dp.flows().unwrap().len(), 1, "one flow, reused");
}

/// The SYN-ACK a backend sends for a flow whose SYN left as `out`.
fn synack_for(out: &[u8], backend: u8, seq: u32) -> Vec<u8> {
    let (nat_port, _) = ports(out);
    Frame::tcp(backend_addr(backend), BPORT, SNAT, nat_port)
        .synack(seq)
        .build()
}

#[test]
fn a_new_connection_on_a_reused_tuple_follows_the_ring_a_retransmitted_syn_keeps_its_pin() {
    let mut lab = lab_with(&[1], 0);
    let (old, retx) = (
        Frame::tcp(CLIENT, 51_004, VIP, 80),
        Frame::tcp(CLIENT, 51_005, VIP, 80),
    );
    // `old` completes its handshake with backend 1; `retx` is still
    // waiting for its SYN-ACK.
    let (_, out) = forward(&lab, &old);
    assert_eq!(dst_of(&out), backend_addr(1));
    lab.run(lab.va0, &synack_for(&out, 1, 5000)).unwrap();
    let ack = old.clone().segment(1001, Some(5001), false, false, false);
    assert_eq!(forward(&lab, &ack).0, XDP_REDIRECT);
    assert_eq!(dst_of(&forward(&lab, &retx).1), backend_addr(1));
    // The traffic moves to backend 2 (a failback, say); 1 stays up.
    lab.service(0, 80, TCP, 0, 13, &[2]).unwrap();
    let (rc, out) = forward(&lab, &old);
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), backend_addr(2), "a new connection: the ring");
    assert_checksums_valid(&out);
    assert_eq!(
        dst_of(&forward(&lab, &retx).1),
        backend_addr(1),
        "a retransmitted SYN: its pin"
    );
    let by_backend: Vec<u32> = lab
        .dp
        .flows()
        .unwrap()
        .iter()
        .map(|(_, f)| f.backend_id)
        .collect();
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");
    assert!(by_backend.contains(&1) && by_backend.contains(&2));
    assert_eq!(
        lab.dp.reverse_entries().unwrap().len(),
        2,
        "the old reverse entry went with it"
    );
}

#[test]
fn the_nat_tables_are_read_whole_in_batches() {
    // More entries than one batch call returns (4,096): every one comes
    // back once, as written. (`flows()` reads `FLOWS` the same way.)
    let mut lab = lab_with(&[1], 0);
    let n = 5_000u32;
    for i in 0..n {
        let key = ReverseKey {
            backend_be: u32::from(backend_addr(1)).to_be(),
            snat_be: u32::from(SNAT).to_be(),
            bport_be: BPORT.to_be(),
            nat_port_be: (i as u16).to_be(),
            proto: TCP,
            _pad: [0; 3],
        };
        let value = Reverse {
            backend_id: i,
            ..Reverse::default()
        };
        lab.dp.insert_reverse(key, value).unwrap();
    }
    let entries = lab.dp.reverse_entries().unwrap();
    assert_eq!(entries.len(), n as usize);
    let ids: std::collections::BTreeSet<u32> = entries
        .iter()
        .map(|(k, v)| {
            assert_eq!(u32::from(u16::from_be(k.nat_port_be)), v.backend_id);
            v.backend_id
        })
        .collect();
    assert_eq!(ids.len(), n as usize, "no entry twice");
}

/// A TCP segment with these flags (ACK always set).
fn seg(f: Frame, seq: u32, ack: u32, fin: bool) -> Frame {
    f.segment(seq, Some(ack), false, fin, false)
}

/// A flow through backend 2 up to its handshake; returns the client's and
/// the backend's frame templates (addresses and ports as each side sends).
fn established(lab: &Lab, cport: u16) -> (Frame, Frame) {
    let client = Frame::tcp(CLIENT, cport, VIP, 80);
    let (_, out) = forward(lab, &client);
    let (nat_port, _) = ports(&out);
    let mut backend = Frame::tcp(backend_addr(2), BPORT, SNAT, nat_port);
    backend.src_mac = BACKEND_MAC;
    backend.dst_mac = VA0_MAC;
    lab.run(lab.va0, &synack_for(&out, 2, 5000)).unwrap();
    forward(lab, &seg(client.clone(), 1001, 5001, false));
    (client, backend)
}

fn nat_entries(lab: &Lab) -> (usize, usize) {
    (
        lab.dp.flows().unwrap().len(),
        lab.dp.reverse_entries().unwrap().len(),
    )
}

/// The wedge signal: a flow counts as asked at its client's first payload
/// and as answered at the backend's first, once each; every backend
/// segment with payload counts as reply data; bare ACKs count nothing.
#[test]
fn requests_and_first_answers_are_counted_once_per_flow() {
    let lab = lab_with(&[2], 0);
    let wedge = |lab: &Lab| {
        let s = lab.dp.backend_stats(2).unwrap();
        (s.asked, s.answered, s.reply_data)
    };
    let (client, backend) = established(&lab, 51_300);
    assert_eq!(wedge(&lab), (0, 0, 0), "a handshake asks nothing");
    for (seq, len) in [(1001u32, 100usize), (1101, 50)] {
        let ask = seg(client.clone().data(&vec![b'q'; len]), seq, 5001, false);
        let (rc, out) = forward(&lab, &ask);
        assert_eq!(rc, XDP_REDIRECT);
        assert_checksums_valid(&out);
    }
    assert_eq!(wedge(&lab), (1, 0, 0), "two request segments, one flow");
    // The backend's bare ACK is no answer.
    lab.run(lab.va0, &seg(backend.clone(), 5001, 1151, false).build())
        .unwrap();
    assert_eq!(wedge(&lab), (1, 0, 0));
    for seq in [5001u32, 5011] {
        let answer = seg(backend.clone().data(b"data: tok\n"), seq, 1151, false);
        let (rc, out) = lab.run(lab.va0, &answer.build()).unwrap();
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(out, to_client(&answer, 51_300));
    }
    assert_eq!(wedge(&lab), (1, 1, 2), "two answer segments, one flow");
    // A second flow that asks and gets nothing back.
    let (client2, _) = established(&lab, 51_301);
    forward(&lab, &seg(client2.data(b"partial"), 1001, 5001, false));
    assert_eq!(wedge(&lab), (2, 1, 2));
}

#[test]
fn a_closed_connection_frees_its_entries_at_the_last_ack_backend_closing_first() {
    let lab = lab_with(&[2], 0);
    let (client, backend) = established(&lab, 51_200);
    // The backend closes (HTTP `Connection: close`); the client ACKs, then
    // sends its own FIN: the entries stay for the backend's last ACK.
    lab.run(lab.va0, &seg(backend.clone(), 5001, 1001, true).build())
        .unwrap();
    forward(&lab, &seg(client.clone(), 1001, 5002, false));
    assert_eq!(nat_entries(&lab), (1, 1), "half closed");
    let (rc, _) = forward(&lab, &seg(client.clone(), 1001, 5002, true));
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(nat_entries(&lab), (1, 1), "both FINs, the last ACK to come");
    // The last ACK is translated as ever, then both entries go.
    let last = seg(backend, 5002, 1002, false);
    let (rc, out) = lab.run(lab.va0, &last.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, to_client(&last, 51_200));
    assert_checksums_valid(&out);
    assert_eq!(nat_entries(&lab), (0, 0), "closed: freed");
}

#[test]
fn a_half_closed_connection_keeps_flowing_until_the_last_ack_client_closing_first() {
    let lab = lab_with(&[2], 0);
    let (client, backend) = established(&lab, 51_201);
    forward(&lab, &seg(client.clone(), 1001, 5001, true));
    // The backend still streams its answer after the client's FIN.
    let data = Frame {
        payload: b"data: token\n\n".to_vec(),
        ..seg(backend.clone(), 5001, 1002, false)
    };
    let (rc, out) = lab.run(lab.va0, &data.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), CLIENT);
    assert_eq!(nat_entries(&lab), (1, 1), "half closed: still translated");
    lab.run(lab.va0, &seg(backend, 5014, 1002, true).build())
        .unwrap();
    assert_eq!(nat_entries(&lab), (1, 1));
    let (rc, out) = forward(&lab, &seg(client, 1002, 5015, false));
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), backend_addr(2));
    assert_checksums_valid(&out);
    assert_eq!(
        nat_entries(&lab),
        (0, 0),
        "the client's last ACK freed both"
    );
}

#[test]
fn when_both_sides_close_at_once_both_last_acks_are_translated() {
    // The FINs cross (neither ACKs the other's), then each side ACKs the
    // other's FIN: the entries stay for the first of those ACKs and go with
    // the second, whichever side sends it.
    for backend_acks_first in [true, false] {
        let lab = lab_with(&[2], 0);
        let cport = if backend_acks_first { 51_210 } else { 51_211 };
        let (client, backend) = established(&lab, cport);
        lab.run(lab.va0, &seg(backend.clone(), 5001, 1001, true).build())
            .unwrap();
        forward(&lab, &seg(client.clone(), 1001, 5001, true));
        assert_eq!(nat_entries(&lab), (1, 1), "two FINs, none ACKed");
        let backend_ack = seg(backend.clone(), 5002, 1002, false);
        let client_ack = seg(client.clone(), 1002, 5002, false);
        let (first, second) = if backend_acks_first {
            ((lab.va0, &backend_ack), (lab.vc0, &client_ack))
        } else {
            ((lab.vc0, &client_ack), (lab.va0, &backend_ack))
        };
        for (i, (leg, f)) in [first, second].into_iter().enumerate() {
            let (rc, out) = lab.run(leg, &f.build()).unwrap();
            assert_eq!(
                rc, XDP_REDIRECT,
                "ACK {i}, backend first: {backend_acks_first}"
            );
            assert_checksums_valid(&out);
            if leg == lab.va0 {
                assert_eq!(out, to_client(f, cport));
            } else {
                assert_eq!(dst_of(&out), backend_addr(2));
            }
            let left = if i == 0 { (1, 1) } else { (0, 0) };
            assert_eq!(nat_entries(&lab), left, "after ACK {i}");
        }
    }
}

#[test]
fn an_ack_of_data_sent_before_a_fin_is_not_the_fins_ack() {
    // The backend sends its answer and its FIN; the client's ACK of the
    // answer (sent before the FIN reached it) comes after the FIN passed
    // the edge, then the client's FIN, and the backend's ACK of that: the
    // backend's FIN is still unACKed, so the entries wait for the client's
    // last ACK.
    let lab = lab_with(&[2], 0);
    let (client, backend) = established(&lab, 51_212);
    let data = Frame {
        payload: b"{\"ok\":true}".to_vec(),
        ..seg(backend.clone(), 5001, 1001, false)
    };
    lab.run(lab.va0, &data.build()).unwrap();
    lab.run(lab.va0, &seg(backend.clone(), 5012, 1001, true).build())
        .unwrap();
    forward(&lab, &seg(client.clone(), 1001, 5012, false));
    forward(&lab, &seg(client.clone(), 1001, 5012, true));
    lab.run(lab.va0, &seg(backend.clone(), 5013, 1002, false).build())
        .unwrap();
    assert_eq!(
        nat_entries(&lab),
        (1, 1),
        "the backend's FIN is not ACKed yet"
    );
    let (rc, out) = forward(&lab, &seg(client, 1002, 5013, false));
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), backend_addr(2));
    assert_eq!(
        nat_entries(&lab),
        (0, 0),
        "the client's last ACK freed both"
    );
}

#[test]
fn backend_rst_to_a_syn_is_counted_and_frees_the_flow() {
    let lab = lab_with(&[1], 0);
    let syn = Frame::tcp(CLIENT, 51_002, VIP, 80);
    let (_, out) = forward(&lab, &syn);
    let (nat_port, _) = ports(&out);
    let rst = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port).rst(0, Some(1001));
    let (rc, out) = lab.run(lab.va0, &rst.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_checksums_valid(&out);
    assert_eq!(lab.dp.backend_stats(1).unwrap().syn_rsts, 1);
    assert!(lab.dp.flows().unwrap().is_empty(), "flow entry freed");
    assert!(
        lab.dp.reverse_entries().unwrap().is_empty(),
        "reverse entry freed"
    );
}

#[test]
fn a_mid_stream_segment_is_picked_up_and_its_rst_is_no_refused_syn() {
    // The entries of a connection can be gone while it still sends (freed
    // at one side's last ACK in a simultaneous close, evicted by the LRU):
    // the segment is forwarded on a new flow, and the backend's RST to it
    // says nothing about the backend's health.
    let lab = lab_with(&[1], 0);
    let late = seg(Frame::tcp(CLIENT, 51_003, VIP, 80), 1001, 5001, true);
    let (rc, out) = forward(&lab, &late);
    assert_eq!(rc, XDP_REDIRECT);
    let (nat_port, _) = ports(&out);
    assert_eq!(
        out,
        expected_forward(&late, backend_addr(1), nat_port, (VA0_MAC, BACKEND_MAC))
    );
    let rst = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port).rst(5001, None);
    let (rc, out) = lab.run(lab.va0, &rst.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, to_client(&rst, 51_003));
    let s = lab.dp.backend_stats(1).unwrap();
    assert_eq!((s.syns, s.syn_rsts, s.traffic.resets), (0, 0, 0));
    assert_eq!(nat_entries(&lab), (0, 0), "the RST freed both entries");
}

#[test]
fn flows_stick_to_their_backend_and_spread_over_the_ring() {
    let lab = lab_with(&[1, 2, 3], 0);
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..64u16 {
        let syn = Frame::tcp(CLIENT, 52_000 + port, VIP, 80);
        let (_, first) = forward(&lab, &syn);
        let chosen = (dst_of(&first), ports(&first).0);
        seen.insert(chosen.0);
        for i in 0..5 {
            let (rc, out) = forward(&lab, &syn.clone().data(&[i; 10]));
            assert_eq!(rc, XDP_REDIRECT);
            assert_eq!((dst_of(&out), ports(&out).0), chosen, "flow {port} moved");
            assert_checksums_valid(&out);
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "64 flows over 3 backends use all of them: {seen:?}"
    );
    assert_eq!(count(&lab, Reason::ForwardRedirect), 64 * 6);
    assert_eq!(lab.dp.service_stats(0).unwrap().new_flows, 64);
}

#[test]
fn ring_flip_moves_only_new_flows() {
    let mut lab = lab_with(&[1, 2], 0);
    let mut before = Vec::new();
    for port in 0..16u16 {
        let syn = Frame::tcp(CLIENT, 53_000 + port, VIP, 80);
        let (_, out) = forward(&lab, &syn);
        before.push((syn, dst_of(&out)));
    }
    let key = lab.dp.services().unwrap()[0].0;
    let t = lab.dp.flip_ring(&key, &lab::ring_of(13, &[3])).unwrap();
    assert_eq!(t.generation, 2);
    assert_eq!(lab.dp.service(&key).unwrap().unwrap().active_slot, 1);
    // Both slots read back as written (the old ring is untouched).
    assert_eq!(lab.dp.ring(0, 1).unwrap().backends[..13], [3; 13]);
    assert_eq!(
        lab.dp.ring(0, 0).unwrap().backends[..13],
        lab::ring_of(13, &[1, 2]).backends[..13]
    );
    for (syn, dst) in &before {
        let (_, out) = forward(&lab, &syn.clone().data(b"x"));
        assert_eq!(dst_of(&out), *dst, "existing flow kept its backend");
    }
    for port in 0..16u16 {
        let (_, out) = forward(&lab, &Frame::tcp(CLIENT, 54_000 + port, VIP, 80));
        assert_eq!(dst_of(&out), backend_addr(3), "new flow uses the new ring");
    }
}

/// Parses an RST the program built and checks every field.
fn assert_rst(out: &[u8], to_port: u16, seq: u32, ack: Option<u32>) {
    assert_checksums_valid(out);
    let p = SlicedPacket::from_ethernet(out).unwrap();
    let eth = p.link.unwrap().to_header().unwrap();
    let etherparse::LinkHeader::Ethernet2(eth) = eth else {
        panic!()
    };
    assert_eq!(
        (eth.source, eth.destination),
        (VC0_MAC, CLIENT_MAC),
        "MACs swapped"
    );
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let h: Ipv4Header = ip.header().to_header();
    assert_eq!((h.source, h.destination), (VIP.octets(), CLIENT.octets()));
    assert_eq!(
        (h.time_to_live, h.protocol, h.total_len, h.options.len()),
        (64, IpNumber::TCP, 40, 0)
    );
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!()
    };
    assert_eq!((t.source_port(), t.destination_port()), (80, to_port));
    assert!(t.rst() && !t.syn() && !t.fin());
    assert_eq!(t.sequence_number(), seq);
    assert_eq!(t.ack(), ack.is_some());
    if let Some(a) = ack {
        assert_eq!(t.acknowledgment_number(), a);
    }
    assert!(t.payload().is_empty());
    assert_eq!(out.len(), 14 + 40);
}

#[test]
fn flow_on_a_down_backend_is_reset_at_once() {
    let mut lab = lab_with(&[1], SVC_F_RESET);
    let syn = Frame::tcp(CLIENT, 51_010, VIP, 80);
    forward(&lab, &syn);
    lab.down(1).unwrap();
    let data = syn.clone().data(b"GET /v1/models HTTP/1.1\r\n\r\n");
    let (rc, out) = forward(&lab, &data);
    assert_eq!(rc, XDP_TX);
    // The segment carried ACK 5001: the RST takes it as its sequence number.
    assert_rst(&out, 51_010, 5001, None);
    assert_eq!(count(&lab, Reason::ResetSent), 1);
    assert_eq!(lab.dp.backend_stats(1).unwrap().traffic.resets, 1);
    assert!(
        lab.dp.flows().unwrap().is_empty(),
        "the dead flow is forgotten"
    );
}

#[test]
fn a_syn_on_the_stale_flow_of_a_down_backend_opens_a_new_flow_not_a_reset() {
    // The client reuses a port whose old flow was pinned to a backend that
    // has since died: the new connection gets a live backend, no RST.
    let mut lab = lab_with(&[1, 2], SVC_F_RESET);
    let syn = (0..64u16)
        .map(|p| Frame::tcp(CLIENT, 57_000 + p, VIP, 80))
        .find(|f| dst_of(&forward(&lab, f).1) == backend_addr(1))
        .expect("some flow lands on backend 1");
    lab.down(1).unwrap();
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), backend_addr(2));
    assert_checksums_valid(&out);
    assert_eq!(count(&lab, Reason::ResetSent), 0);
    let flows = lab.dp.flows().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].1.backend_id, 2, "pinned to the live backend");
    // (A mid-stream segment on such a flow is reset: see the test above.)
}

#[test]
fn flow_on_a_down_backend_is_reselected_without_reset_flag() {
    let mut lab = lab_with(&[1, 2], 0);
    // Find a flow pinned to backend 1, then kill backend 1.
    let syn = (0..64u16)
        .map(|p| Frame::tcp(CLIENT, 55_000 + p, VIP, 80))
        .find(|f| dst_of(&forward(&lab, f).1) == backend_addr(1))
        .expect("some flow lands on backend 1");
    lab.down(1).unwrap();
    let (rc, out) = forward(&lab, &syn.clone().data(b"x"));
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(dst_of(&out), backend_addr(2));
    assert_checksums_valid(&out);
    // New flows skip the down backend even though the ring still holds it.
    for p in 0..32u16 {
        let (_, out) = forward(&lab, &Frame::tcp(CLIENT, 56_000 + p, VIP, 80));
        assert_eq!(dst_of(&out), backend_addr(2));
    }
}

#[test]
fn udp_flows_are_reselected_and_zero_checksum_stays_zero() {
    let mut lab = lab_with(&[1], 0);
    lab.service(1, 53, UDP, SVC_F_RESET, 13, &[1, 2]).unwrap();
    let q = Frame::udp(CLIENT, 40_053, VIP, 53);
    let (rc, out) = forward(&lab, &q);
    assert_eq!(rc, XDP_REDIRECT);
    assert_checksums_valid(&out);
    let first = dst_of(&out);
    let other = if first == backend_addr(1) { 2 } else { 1 };
    lab.down(if other == 2 { 1 } else { 2 }).unwrap();
    let (rc, out) = forward(&lab, &q);
    assert_eq!(rc, XDP_REDIRECT, "UDP is moved, never reset");
    assert_eq!(dst_of(&out), backend_addr(other as u8));

    // A datagram sent without a checksum keeps "no checksum".
    let mut raw = Frame::udp(CLIENT, 40_054, VIP, 53).build();
    raw[14 + 20 + 6] = 0;
    raw[14 + 20 + 7] = 0;
    let (rc, out) = lab.run(lab.vc0, &raw).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
}

#[test]
fn fail_closed_service_resets_tcp_and_drops_udp() {
    let mut lab = lab_with(&[], 0);
    lab.service(1, 53, UDP, 0, 13, &[]).unwrap();
    let syn = Frame::tcp(CLIENT, 51_020, VIP, 80);
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_TX);
    // A SYN without ACK: the RST acknowledges seq + 1.
    assert_rst(&out, 51_020, 0, Some(1001));
    let q = Frame::udp(CLIENT, 40_053, VIP, 53).build();
    let (rc, out) = lab.run(lab.vc0, &q).unwrap();
    assert_eq!((rc, out), (XDP_DROP, q));
    assert_eq!(count(&lab, Reason::NoBackend), 1);
    assert!(lab.dp.flows().unwrap().is_empty());
}

#[test]
fn snat_port_collisions_probe_then_give_up() {
    let mut lab = lab_with(&[1], 0);
    let mut node = lab.dp.node().unwrap();
    node.port_min = 41_000;
    node.port_max = 41_003;
    lab.dp.set_node(node).unwrap();
    let taken = |port: u16| ReverseKey {
        backend_be: u32::from(backend_addr(1)).to_be(),
        snat_be: u32::from(SNAT).to_be(),
        bport_be: BPORT.to_be(),
        nat_port_be: port.to_be(),
        proto: TCP,
        _pad: [0; 3],
    };
    // Three of four ports belong to other flows: the new flow gets the last.
    for p in 41_000..41_003 {
        lab.dp.insert_reverse(taken(p), Reverse::default()).unwrap();
    }
    let first = Frame::tcp(CLIENT, 51_030, VIP, 80);
    let (rc, out) = forward(&lab, &first);
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(ports(&out).0, 41_003);
    // Its handshake completes (a half-open flow's port is taken over when
    // every other is in use: see tests/syn_flood.rs).
    lab.run(lab.va0, &synack_for(&out, 1, 5000)).unwrap();
    let ack = first.segment(1001, Some(5001), false, false, false);
    assert_eq!(forward(&lab, &ack).0, XDP_REDIRECT);
    // Now all four are held by established flows: the next flow is dropped
    // and counted, and no half-made flow entry is left.
    let syn = Frame::tcp(CLIENT, 51_031, VIP, 80);
    let input = syn.build();
    let (rc, out) = lab.run(lab.vc0, &input).unwrap();
    assert_eq!((rc, out), (XDP_DROP, input));
    assert_eq!(count(&lab, Reason::SnatExhausted), 1);
    assert!(
        !lab.dp
            .flows()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == flow_key(&syn, TCP))
    );
}

/// Sends a client RST on `syn`'s tuple, which frees its entries.
fn close_by_rst(lab: &Lab, syn: &Frame) -> (u32, Vec<u8>) {
    forward(lab, &syn.clone().rst(1001, Some(5001)))
}

#[test]
fn one_clients_ports_map_one_to_one_onto_snat_ports_and_keep_them() {
    // Linux gives each 4-tuple its own TCP timestamp offset, so a backend's
    // TIME_WAIT on a SNAT port must see the next connection from the same
    // client port, or PAWS drops the SYN. A client's ports are therefore
    // shifted by one per-client offset, not hashed one by one.
    let lab = lab_with(&[1], 0);
    let range = u32::from(lab::PORT_MAX - lab::PORT_MIN) + 1;
    let nat = |client: Ipv4Addr, cport: u16| {
        let syn = Frame::tcp(client, cport, VIP, 80);
        let (rc, out) = forward(&lab, &syn);
        assert_eq!(rc, XDP_REDIRECT);
        let port = ports(&out).0;
        assert!((lab::PORT_MIN..=lab::PORT_MAX).contains(&port));
        (syn, u32::from(port - lab::PORT_MIN))
    };
    let (first_syn, first) = nat(CLIENT, 50_000);
    for i in 1..300u16 {
        let (_, p) = nat(CLIENT, 50_000 + i);
        assert_eq!(p, (first + u32::from(i)) % range, "client port 50000+{i}");
    }
    // Closed and opened again from the same client port: the same SNAT port.
    close_by_rst(&lab, &first_syn);
    assert_eq!(nat(CLIENT, 50_000).1, first);
    // Another client on the same port has its own offset.
    let other = Ipv4Addr::new(192, 0, 2, 101);
    assert_ne!(nat(other, 50_000).1, first);
}

#[test]
fn same_leg_backend_is_sent_with_xdp_tx_and_unknown_neighbour_drops() {
    let mut lab = lab_with(&[1], 0);
    lab.backend(1, SAME_LEG_BACKEND, BPORT, state::UP).unwrap();
    let syn = Frame::tcp(CLIENT, 51_040, VIP, 80);
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_TX);
    assert_eq!(
        out,
        expected_forward(&syn, SAME_LEG_BACKEND, ports(&out).0, (VC0_MAC, CLIENT_MAC))
    );
    assert_eq!(count(&lab, Reason::ForwardTx), 1);

    lab.backend(1, lab::NO_NEIGH_BACKEND, BPORT, state::UP)
        .unwrap();
    let syn = Frame::tcp(CLIENT, 51_041, VIP, 80);
    let (rc, _) = forward(&lab, &syn);
    assert_eq!(
        rc, XDP_DROP,
        "the kernel would refuse a packet from its own SNAT address"
    );
    // No state is kept for a packet that was not sent.
    assert!(
        !lab.dp
            .flows()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == flow_key(&syn, TCP))
    );
    assert_eq!(
        lab.dp.reverse_entries().unwrap().len(),
        1,
        "only the first flow's"
    );
    assert_eq!(count(&lab, Reason::NoNeighbour), 1);
    // The dropped SYN is not a SYN the backend left unanswered (passive
    // health would eject the backend for nothing).
    assert_eq!(lab.dp.backend_stats(1).unwrap().syns, 1);
}

/// When a link loses carrier the kernel deletes its neighbours at once.
/// A SYN toward a backend behind it then leaves with the backend's last
/// next hop, resolved by any CPU within `LAST_HOP_TTL_NS`, and counts as
/// any sent SYN (passive health sees the backend fail in milliseconds);
/// past that it is dropped as no neighbour and is no evidence.
#[test]
fn a_vanished_neighbour_is_stood_in_for_by_the_last_next_hop_for_a_while() {
    let mut lab = lab_with(&[1], 0);
    let be = backend_addr(1);
    let (rc, _) = forward(&lab, &Frame::tcp(CLIENT, 51_060, VIP, 80));
    assert_eq!(rc, XDP_REDIRECT);
    let last = lab.dp.last_hop(1).unwrap();
    assert_eq!(
        (last.ifindex, last.dst_be, last.smac, last.dmac),
        (lab.va0, u32::from(be).to_be(), VA0_MAC, BACKEND_MAC),
        "remembered for every CPU"
    );

    lab.ns.exec(&format!("ip neigh del {be} dev va0")).unwrap();
    // Every CPU's own cache misses: the FIB is asked and has no neighbour.
    lab.dp.clear_next_hops(1).unwrap();
    let syn = Frame::tcp(CLIENT, 51_061, VIP, 80);
    let (rc, out) = forward(&lab, &syn);
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        out,
        expected_forward(&syn, be, ports(&out).0, (VA0_MAC, BACKEND_MAC))
    );
    assert_checksums_valid(&out);
    assert_eq!(count(&lab, Reason::NoNeighbour), 0);
    assert_eq!(count(&lab, Reason::ForwardRedirect), 2);
    assert_eq!(lab.dp.backend_stats(1).unwrap().syns, 2, "evidence");

    // Too old: dropped, and not a SYN the backend left unanswered.
    lab.dp.age_last_hops(1).unwrap();
    let syn = Frame::tcp(CLIENT, 51_062, VIP, 80);
    let (rc, _) = forward(&lab, &syn);
    assert_eq!(rc, XDP_DROP);
    assert_eq!(count(&lab, Reason::NoNeighbour), 1);
    assert_eq!(lab.dp.backend_stats(1).unwrap().syns, 2);
    assert!(
        !lab.dp
            .flows()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == flow_key(&syn, TCP)),
        "no state for a SYN not sent"
    );
}

#[test]
fn client_rst_frees_flow_entries() {
    let lab = lab_with(&[1], 0);
    let syn = Frame::tcp(CLIENT, 51_050, VIP, 80);
    forward(&lab, &syn);
    let (rc, out) = close_by_rst(&lab, &syn);
    assert_eq!(rc, XDP_REDIRECT);
    assert_checksums_valid(&out);
    assert!(lab.dp.flows().unwrap().is_empty());
    assert!(lab.dp.reverse_entries().unwrap().is_empty());
}

fn assert_verdict(lab: &Lab, frame: &[u8], rc: u32, reason: Reason) {
    assert_eq!(
        reason.verdict().action(),
        rc,
        "documented verdict of {reason:?}"
    );
    lab.assert_verdict(frame, reason);
}

#[test]
fn malformed_and_foreign_input_gets_its_documented_verdict() {
    let lab = lab_with(&[1], 0);
    let good = Frame::tcp(CLIENT, 51_060, VIP, 80).build();

    // BPF_PROG_TEST_RUN refuses frames under 14 bytes, so truncate inside
    // a VLAN tag instead.
    let mut tagged = good[..16].to_vec();
    tagged[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    assert_verdict(&lab, &tagged, XDP_DROP, Reason::TruncatedEth);
    assert_verdict(&lab, &good[..14 + 12], XDP_DROP, Reason::MalformedIpv4);

    let mut bad_sum = good.clone();
    bad_sum[24] ^= 0xff;
    assert_verdict(&lab, &bad_sum, XDP_DROP, Reason::BadIpv4Checksum);

    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    set_ip_checksum(&mut bad_version);
    assert_verdict(&lab, &bad_version, XDP_DROP, Reason::MalformedIpv4);

    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44;
    set_ip_checksum(&mut short_ihl);
    assert_verdict(&lab, &short_ihl, XDP_DROP, Reason::MalformedIpv4);

    let mut too_long = good.clone();
    too_long[16..18].copy_from_slice(&200u16.to_be_bytes());
    set_ip_checksum(&mut too_long);
    assert_verdict(&lab, &too_long, XDP_DROP, Reason::MalformedIpv4);

    // IHL 6 with one NOP option word.
    let mut opts = good[..34].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 1]);
    opts.extend_from_slice(&good[34..]);
    opts[14] = 0x46;
    let tl = (opts.len() - 14) as u16;
    opts[16..18].copy_from_slice(&tl.to_be_bytes());
    set_ip_checksum(&mut opts);
    assert_verdict(&lab, &opts, XDP_PASS, Reason::IpOptions);

    for frags in [0x2000u16, 0x0010] {
        let mut frag = good.clone();
        frag[20..22].copy_from_slice(&frags.to_be_bytes());
        set_ip_checksum(&mut frag);
        assert_verdict(&lab, &frag, XDP_PASS, Reason::Fragment);
    }

    let mut ttl1 = good.clone();
    ttl1[22] = 1;
    set_ip_checksum(&mut ttl1);
    assert_verdict(&lab, &ttl1, XDP_PASS, Reason::TtlExpired);

    let mut icmp = good[..34].to_vec();
    icmp[23] = 1;
    icmp.extend_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    icmp[16..18].copy_from_slice(&28u16.to_be_bytes());
    set_ip_checksum(&mut icmp);
    assert_verdict(&lab, &icmp, XDP_PASS, Reason::NotTcpUdp);

    // A TCP header cut after 10 bytes, IP length consistent with it.
    let mut cut = good[..14 + 20 + 10].to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    set_ip_checksum(&mut cut);
    assert_verdict(&lab, &cut, XDP_DROP, Reason::TruncatedL4);

    let mut bad_doff = good.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    assert_verdict(&lab, &bad_doff, XDP_DROP, Reason::TruncatedL4);

    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_verdict(&lab, &arp, XDP_PASS, Reason::NotIpv4);

    // IPv6 goes to the IPv6 program, which leaves it to the kernel on a
    // node without an IPv6 address (tests/tests/datapath6.rs has the rest).
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_verdict(&lab, &v6, XDP_PASS, Reason::NotConfigured);

    assert_verdict(
        &lab,
        &Frame::tcp(CLIENT, 51_061, VIP, 81).build(),
        XDP_PASS,
        Reason::NotVip,
    );
    let other = Ipv4Addr::new(203, 0, 113, 77);
    assert_verdict(
        &lab,
        &Frame::tcp(CLIENT, 51_062, other, 80).build(),
        XDP_PASS,
        Reason::NotVip,
    );
    // To the SNAT address but no flow: the node's own sockets (probes).
    assert_verdict(
        &lab,
        &Frame::tcp(backend_addr(1), 8000, SNAT, 33_000).build(),
        XDP_PASS,
        Reason::NotVip,
    );

    assert!(
        lab.dp.flows().unwrap().is_empty(),
        "nothing malformed created state"
    );
}

#[test]
fn a_wrong_l4_checksum_is_never_made_valid() {
    let lab = lab_with(&[1], 0);
    let mut f = Frame::tcp(CLIENT, 51_070, VIP, 80).data(b"payload").build();
    f[14 + 20 + 16] ^= 0x33;
    let (rc, out) = lab.run(lab.vc0, &f).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let p = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IP header valid"
    );
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!()
    };
    let th = t.to_header();
    assert_ne!(
        th.checksum,
        th.calc_checksum_ipv4(&h, t.payload()).unwrap(),
        "still invalid"
    );
}

#[test]
fn unconfigured_node_passes_everything() {
    let mut lab = lab_with(&[1], 0);
    lab.dp.set_node(failover_common::Node::default()).unwrap();
    let f = Frame::tcp(CLIENT, 51_080, VIP, 80).build();
    assert_verdict(&lab, &f, XDP_PASS, Reason::NotConfigured);
}

#[test]
fn a_second_load_reopens_the_pinned_maps() {
    let lab = lab_with(&[1], 0);
    forward(&lab, &Frame::tcp(CLIENT, 51_090, VIP, 80));
    // A restarted agent loads the object against the same pins.
    let again = failover_agent::dataplane::Dataplane::load(lab.pin_dir()).unwrap();
    assert_eq!(again.flows().unwrap().len(), 1);
    assert_eq!(again.services().unwrap().len(), 1);
    assert_eq!(again.node().unwrap(), lab.dp.node().unwrap());
    // And its program serves the existing flow identically.
    let data = Frame::tcp(CLIENT, 51_090, VIP, 80).data(b"x").build();
    let a = lab.run(lab.vc0, &data).unwrap();
    let b = lab::run_on(again.program(), lab.vc0, &data).unwrap();
    assert_eq!(a, b);
}

#[test]
fn attaching_without_native_xdp_names_the_interface_and_suggests_skb() {
    let mut lab = lab_with(&[1], 0);
    // Loopback has no native (driver) XDP.
    let err = lab
        .dp
        .attach("lo", failover_agent::dataplane::XdpMode::Native)
        .expect_err("native XDP on lo must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("lo") && msg.contains("xdp_mode: skb"), "{msg}");
    // Generic mode works there, and the link is pinned.
    lab.dp
        .attach("lo", failover_agent::dataplane::XdpMode::Skb)
        .unwrap();
    assert!(lab.pin_dir().join("links/lo").exists());
}

#[test]
fn auto_mode_is_generic_on_a_veth_and_falls_back_to_generic_where_native_is_refused() {
    use failover_agent::dataplane::{XdpMode, driver};
    let mut lab = lab_with(&[1], 0);
    assert_eq!(driver("vc1").as_deref(), Some("veth"));
    assert_eq!(XdpMode::Auto.resolve("vc1"), XdpMode::Skb);
    // Loopback answers no driver query and refuses native XDP: auto tries
    // native there, then attaches generic.
    assert_eq!(driver("lo"), None);
    assert_eq!(XdpMode::Auto.resolve("lo"), XdpMode::Auto);
    // A mode set in the config is kept as it is.
    assert_eq!(XdpMode::Native.resolve("vc1"), XdpMode::Native);
    let shown = |iface: &str| {
        let out = std::process::Command::new("ip")
            .args(["-d", "link", "show", iface])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for iface in ["vc1", "lo"] {
        let a = lab.dp.attach(iface, XdpMode::Auto).unwrap();
        assert_eq!((a.mode, a.updated), (XdpMode::Skb, false), "{iface}");
        let link = shown(iface);
        assert!(link.contains("xdpgeneric"), "{iface}: {link}");
    }
}

#[test]
fn an_8021q_tagged_frame_is_natted_with_its_tag_kept() {
    let lab = lab_with(&[1], 0);
    let tagged = |src_mac, dst_mac, src: Ipv4Addr, dst: Ipv4Addr, ttl, sport, dport| {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv4(src.octets(), dst.octets(), ttl)
            .tcp(sport, dport, 1000, 64_240)
            .syn()
            .write(&mut out, &[])
            .unwrap();
        out
    };
    let input = tagged(CLIENT_MAC, VC0_MAC, CLIENT, VIP, 64, 51_100, 80);
    let (rc, out) = lab.run(lab.vc0, &input).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let nat = lab.dp.flows().unwrap()[0].1.nat_port_be;
    let expected = tagged(
        VA0_MAC,
        BACKEND_MAC,
        SNAT,
        backend_addr(1),
        63,
        u16::from_be(nat),
        BPORT,
    );
    assert_eq!(out, expected);
    assert_checksums_valid(&out);
}

/// The benchmark programs pass the verifier and do what the benchmarks
/// rely on (their live-frames runs cannot be checked where the kernel
/// refuses the mode, so here in ordinary runs): the generator writes its
/// whole header over a frame the path rewrote, with a source port in its
/// range, and TXes it; the sink drops; pass passes.
#[test]
fn benchmark_programs_generate_drop_and_pass() {
    require_root();
    let (generator, sink, pass) = (names::GEN_PROGRAM, names::DROP_PROGRAM, names::PASS_PROGRAM);
    let mut progs = BenchProgs::load(&[generator, sink, pass]).expect("load");
    let mut f = Frame::udp(CLIENT, 10_000, VIP, 9000);
    f.payload = vec![0u8; 18];
    let mut template = f.build();
    template[40..42].copy_from_slice(&[0, 0]);
    let cfg = GenConfig {
        header: template[..GEN_HEADER_LEN].try_into().unwrap(),
        flows: 4,
        base_port: 10_000,
    };
    progs.set_gen(cfg).unwrap();
    // A recycled page: every byte as the path left it, not as it was.
    let recycled: Vec<u8> = template.iter().map(|b| !b).collect();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (action, out) = progs.run(generator, &recycled).unwrap();
        assert_eq!(action, XDP_TX);
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!((10_000..10_004).contains(&port), "port {port}");
        seen.insert(port);
        let mut want = template[..GEN_HEADER_LEN].to_vec();
        want[34..36].copy_from_slice(&port.to_be_bytes());
        assert_eq!(out[..GEN_HEADER_LEN], want[..], "the whole header");
        assert_eq!(out[GEN_HEADER_LEN..], recycled[GEN_HEADER_LEN..], "payload");
    }
    assert_eq!(seen.len(), 4, "every port drawn in 64 runs: {seen:?}");
    // Too short for the header, or no port to draw: dropped.
    let short = &recycled[..GEN_HEADER_LEN - 1];
    assert_eq!(
        progs.run(generator, short).unwrap(),
        (XDP_DROP, short.to_vec())
    );
    progs.set_gen(GenConfig { flows: 0, ..cfg }).unwrap();
    assert_eq!(progs.run(generator, &recycled).unwrap().0, XDP_DROP);

    assert_eq!(progs.run(sink, &template).unwrap().0, XDP_DROP);
    assert_eq!(progs.run(pass, &template).unwrap().0, XDP_PASS);
}
