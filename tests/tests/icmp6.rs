//! ICMPv6 errors through the NAT66, through the real XDP object
//! (BPF_PROG_TEST_RUN), each output asserted as a whole frame built from
//! scratch, checksums computed anew over the IPv6 pseudo-header
//! (docs/datapath.md, "IPv6"):
//! - packet too big, destination unreachable and time exceeded about a
//!   flow's packets are translated to its other side, both directions,
//!   with a quote of any length a router sends (8 bytes of L4 up to the
//!   1,240 bytes that fill the minimum MTU);
//! - errors that are malformed, forged or about no flow are never
//!   translated and never change a flow, beside a live one.
//!
//! Needs root: run through `cargo xtask test`.

use std::net::Ipv6Addr;

use failover_common::{Reason, state};
use failover_tests::{
    lab::{
        BACKEND_MAC, BPORT, CLIENT_MAC, CLIENT6, Lab, SNAT6, VA0_MAC, VC0_MAC, VIP6, backend6_addr,
    },
    packet::{Frame, assert_checksums_valid, icmp6_frame, ports},
    xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
};

type Frame6 = Frame<Ipv6Addr>;

const DNS: u16 = 53;
const IP6: usize = 14;
const HOP_LIMIT: usize = IP6 + 7;
/// A router on the backend's path, and one on the client's.
const CLOUD_ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0xfe);
const CLIENT_ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0xfe);
/// The longest quote a router sends: its error fills the minimum MTU.
const QUOTE_MAX: usize = 1280 - 40 - 8;

/// Backends 1..=3, TCP service 0 on VIP6:80 and UDP service 1 on VIP6:53,
/// both over backend 1 only.
fn lab() -> Lab {
    // One CPU, so a packet reads the next hop the one before it cached.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(0, &mut set) };
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "pin to CPU 0");
    let mut lab = Lab::with_tcp_service6(&[1], 0).expect("lab");
    lab.service6(1, DNS, 17, 0, 13, &[1]).expect("udp service");
    lab
}

fn from_backend(nat_port: u16) -> Frame6 {
    let mut f = Frame::tcp(backend6_addr(1), BPORT, SNAT6, nat_port);
    f.src_mac = BACKEND_MAC;
    f.dst_mac = VA0_MAC;
    f
}

/// A completed handshake from CLIENT6:`cport`; returns the flow's NAT port.
fn established(lab: &Lab, cport: u16) -> u16 {
    let syn = Frame::tcp(CLIENT6, cport, VIP6, 80);
    let (rc, out) = lab.run(lab.vc0, &syn.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let nat_port = ports(&out).0;
    let synack = from_backend(nat_port).synack(5000);
    assert_eq!(lab.run(lab.va0, &synack.build()).unwrap().0, XDP_REDIRECT);
    let ack = syn.segment(1001, Some(5001), false, false, false);
    assert_eq!(lab.run(lab.vc0, &ack.build()).unwrap().0, XDP_REDIRECT);
    nat_port
}

/// Backend 1's passive-health counters: no ICMPv6 error may move them.
fn passive(lab: &Lab) -> [u64; 5] {
    let s = lab.dp.backend_stats(1).unwrap();
    [
        s.syns,
        s.synacks,
        s.syn_rsts,
        s.syn_other,
        s.pending_evicted,
    ]
}

/// `frame`'s IPv6 packet as a router quotes it: its first `len` bytes.
fn quote(frame: &[u8], len: usize) -> Vec<u8> {
    frame[IP6..IP6 + len].to_vec()
}

fn too_big(mtu: u32) -> [u8; 8] {
    let m = mtu.to_be_bytes();
    [2, 0, 0, 0, m[0], m[1], m[2], m[3]]
}

const PORT_UNREACHABLE: [u8; 8] = [1, 4, 0, 0, 0, 0, 0, 0];
const HOP_LIMIT_EXCEEDED: [u8; 8] = [3, 0, 0, 0, 0, 0, 0, 0];

/// What the recipient must get: an ICMPv6 error from `src` to `dst` with
/// `header`, quoting `own` (the recipient's own packet as it sent it, with
/// the hop limit the edge gave it) in `len` bytes; outer hop limit 63 (one
/// hop through the edge), both MACs those of the leg.
fn expected(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): (Ipv6Addr, Ipv6Addr),
    header: [u8; 8],
    own: &[u8],
    len: usize,
) -> Vec<u8> {
    let mut own = own.to_vec();
    own[HOP_LIMIT] = 63;
    let mut f = icmp6_frame(src, dst, header, &own[IP6..IP6 + len]);
    f[6..12].copy_from_slice(&macs.0);
    f[0..6].copy_from_slice(&macs.1);
    f[HOP_LIMIT] = 63;
    f
}

#[test]
fn packet_too_big_from_the_cloud_reaches_the_client_with_any_quote() {
    let lab = lab();
    let nat_port = established(&lab, 52_000);
    // The client's full-size segment, and what the edge sent the backend.
    let own = Frame::tcp(CLIENT6, 52_000, VIP6, 80)
        .data(&[0x42; 1400])
        .build();
    let (rc, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(ports(&sent).0, nat_port);
    let flows_before = lab.dp.flows6().unwrap();
    let passive_before = passive(&lab);

    // Linux quotes up to the minimum MTU; RFC 4443 allows as little as the
    // header and 8 bytes of L4; 60 holds TCP's checksum, 50 does not.
    for len in [QUOTE_MAX, 48, 50, 60] {
        let err = icmp6_frame(CLOUD_ROUTER, SNAT6, too_big(1280), &quote(&sent, len));
        let before = lab.count(Reason::IcmpRedirect);
        let (rc, out) = lab.run(lab.va0, &err).unwrap();
        assert_eq!(rc, XDP_REDIRECT, "quote of {len}");
        assert_eq!(lab.count(Reason::IcmpRedirect), before + 1);
        // From the VIP (the address the client talks to), quoting the
        // client's own segment.
        let want = expected(
            (VC0_MAC, CLIENT_MAC),
            (VIP6, CLIENT6),
            too_big(1280),
            &own,
            len,
        );
        assert_checksums_valid(&out);
        assert_eq!(out, want, "quote of {len}");
    }
    // Nothing about the flow moved.
    assert_eq!(lab.dp.flows6().unwrap(), flows_before);
    assert_eq!(
        passive(&lab),
        passive_before,
        "no passive-health counter moved"
    );
}

#[test]
fn port_unreachable_and_time_exceeded_reach_the_client() {
    let lab = lab();
    // A UDP flow: its checksum sits in the 8 bytes every quote holds.
    let own = Frame::udp(CLIENT6, 52_100, VIP6, DNS).build();
    let (rc, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let err = icmp6_frame(backend6_addr(1), SNAT6, PORT_UNREACHABLE, &quote(&sent, 48));
    let (rc, out) = lab.run(lab.va0, &err).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_checksums_valid(&out);
    let want = expected(
        (VC0_MAC, CLIENT_MAC),
        (VIP6, CLIENT6),
        PORT_UNREACHABLE,
        &own,
        48,
    );
    assert_eq!(out, want);

    let nat_port = established(&lab, 52_101);
    let own = Frame::tcp(CLIENT6, 52_101, VIP6, 80).data(b"hello").build();
    let (_, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(ports(&sent).0, nat_port);
    let len = sent.len() - IP6;
    let err = icmp6_frame(CLOUD_ROUTER, SNAT6, HOP_LIMIT_EXCEEDED, &quote(&sent, len));
    let (rc, out) = lab.run(lab.va0, &err).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let want = expected(
        (VC0_MAC, CLIENT_MAC),
        (VIP6, CLIENT6),
        HOP_LIMIT_EXCEEDED,
        &own,
        len,
    );
    assert_eq!(out, want);
}

#[test]
fn packet_too_big_from_the_client_side_reaches_the_backend() {
    let lab = lab();
    let nat_port = established(&lab, 52_200);
    // The backend's full-size segment, and what the edge sent the client.
    let own = from_backend(nat_port).data(&[0x24; 1400]).build();
    let (rc, sent) = lab.run(lab.va0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    for len in [QUOTE_MAX, 48] {
        let err = icmp6_frame(CLIENT_ROUTER, VIP6, too_big(1400), &quote(&sent, len));
        let (rc, out) = lab.run(lab.vc0, &err).unwrap();
        assert_eq!(rc, XDP_REDIRECT, "quote of {len}");
        assert_checksums_valid(&out);
        let want = expected(
            (VA0_MAC, BACKEND_MAC),
            (SNAT6, backend6_addr(1)),
            too_big(1400),
            &own,
            len,
        );
        assert_eq!(out, want, "quote of {len}");
    }
}

/// Each forged, malformed or unmatched error an outsider can send, with the
/// reason it must get, beside `sent` (a packet the edge sent the backend
/// on a live flow with NAT port `nat_port`).
fn hostile_errors(sent: &[u8], nat_port: u16) -> Vec<(&'static str, Vec<u8>, Reason)> {
    let good = quote(sent, QUOTE_MAX);
    let err = |header: [u8; 8], q: &[u8]| icmp6_frame(CLOUD_ROUTER, SNAT6, header, q);
    let mut out = Vec::new();
    let mut bad_sum = err(too_big(1280), &good);
    bad_sum[IP6 + 40 + 2] ^= 0x5a;
    out.push(("wrong checksum", bad_sum, Reason::IcmpMalformed));
    out.push((
        "quote too short",
        err(too_big(1280), &good[..47]),
        Reason::IcmpMalformed,
    ));
    let mut long = good.clone();
    long.push(0);
    out.push((
        "longer than the minimum MTU",
        err(too_big(1280), &long),
        Reason::IcmpMalformed,
    ));
    for mtu in [0, 1279, 1460, 9000] {
        out.push((
            "an MTU no path has",
            err(too_big(mtu), &good),
            Reason::IcmpMalformed,
        ));
    }
    let mut v4 = good.clone();
    v4[0] = 0x45;
    out.push((
        "quoting no IPv6",
        err(too_big(1280), &v4),
        Reason::IcmpMalformed,
    ));
    let mut port = good.clone();
    port[40..42].copy_from_slice(&nat_port.wrapping_add(1).to_be_bytes());
    out.push((
        "another NAT port",
        err(too_big(1280), &port),
        Reason::IcmpNoFlow,
    ));
    let mut src = good.clone();
    src[8..24].copy_from_slice(&CLIENT6.octets());
    out.push((
        "a quote from another source",
        err(too_big(1280), &src),
        Reason::IcmpNoFlow,
    ));
    let mut proto = good.clone();
    proto[6] = 58;
    out.push((
        "quoting ICMPv6",
        err(too_big(1280), &proto),
        Reason::IcmpNoFlow,
    ));
    let mut last_hop = err(too_big(1280), &good);
    last_hop[HOP_LIMIT] = 1;
    out.push(("hop limit 1", last_hop, Reason::TtlExpired));
    for header in [[4, 0, 0, 0, 0, 0, 0, 40], [128, 0, 0, 0, 0, 1, 0, 1]] {
        out.push((
            "parameter problem, echo",
            err(header, &good),
            Reason::Icmpv6,
        ));
    }
    out
}

#[test]
fn forged_malformed_and_unmatched_errors_beside_a_live_flow_move_nothing() {
    let lab = lab();
    let nat_port = established(&lab, 52_300);
    let req = Frame::tcp(CLIENT6, 52_300, VIP6, 80).data(&[0x42; 1400]);
    let (rc, sent) = lab.run(lab.vc0, &req.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let reply = from_backend(nat_port).data(b"data: {}\n\n");
    let (rc, answered) = lab.run(lab.va0, &reply.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let flows_before = lab.dp.flows6().unwrap();
    let passive_before = passive(&lab);

    let hostile = hostile_errors(&sent, nat_port);
    for round in 0..3 {
        for (what, frame, reason) in &hostile {
            let before = lab.count(*reason);
            let (rc, out) = lab.run(lab.va0, frame).unwrap();
            let want = if reason.verdict().action() == XDP_DROP {
                XDP_DROP
            } else {
                XDP_PASS
            };
            assert_eq!(rc, want, "{what}");
            assert_eq!(lab.count(*reason), before + 1, "{what}: {reason:?}");
            assert_eq!(&out, frame, "{what}: left untouched");
        }
        // The live flow, both ways, exactly as before.
        assert_eq!(
            lab.run(lab.vc0, &req.build()).unwrap(),
            (XDP_REDIRECT, sent.clone()),
            "round {round}"
        );
        assert_eq!(
            lab.run(lab.va0, &reply.build()).unwrap(),
            (XDP_REDIRECT, answered.clone()),
            "round {round}"
        );
    }
    // The flow kept its backend and NAT port (its last-seen time moved
    // with the live traffic), and no passive-health counter moved.
    let pinned = |flows: Vec<(_, failover_common::Flow)>| -> Vec<_> {
        flows
            .into_iter()
            .map(|(k, f)| (k, f.backend_id, f.nat_port_be, f.fins))
            .collect()
    };
    assert_eq!(pinned(lab.dp.flows6().unwrap()), pinned(flows_before));
    assert_eq!(
        passive(&lab),
        passive_before,
        "no passive-health counter moved"
    );
    assert_eq!(lab.dp.backend(1).unwrap().state, state::UP);
}

#[test]
fn over_an_older_builds_jumps_map_only_icmpv6_translation_is_off() {
    // A node upgraded in place from a build whose pinned JUMPS had 6 slots
    // (no `failover_icmp6`): the data plane still loads, IPv6 flows still
    // run, and ICMPv6 errors pass to the kernel, as they did then.
    let mut lab = Lab::over_older_jumps(6).expect("the data plane loads");
    lab.enable_v6().unwrap();
    lab.backend6(1, backend6_addr(1), BPORT, state::UP).unwrap();
    lab.service6(0, 80, 6, 0, 13, &[1]).unwrap();
    let nat_port = established(&lab, 52_400);
    let own = Frame::tcp(CLIENT6, 52_400, VIP6, 80)
        .data(&[0x42; 1400])
        .build();
    let (rc, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(ports(&sent).0, nat_port);
    let err = icmp6_frame(CLOUD_ROUTER, SNAT6, too_big(1280), &quote(&sent, 48));
    let (rc, out) = lab.run(lab.va0, &err).unwrap();
    assert_eq!((rc, out), (XDP_PASS, err));
    assert_eq!(lab.count(Reason::Icmpv6), 1);
}

#[test]
fn mutated_errors_with_valid_checksums_reach_only_the_flows_own_client() {
    // An outsider can compute checksums: 3,000 packets too big and
    // unreachables about a live flow, each with random bytes of the outer
    // header, ICMPv6 header or quote changed and the checksum made right
    // again. Whatever is translated must go to the flow's own client, from
    // the VIP, with valid checksums; the rest is dropped or passed
    // untouched; and the flow, its translation and every passive-health
    // counter stay as they were.
    let lab = lab();
    let nat_port = established(&lab, 52_500);
    let req = Frame::tcp(CLIENT6, 52_500, VIP6, 80).data(&[0x42; 1400]);
    let (_, sent) = lab.run(lab.vc0, &req.build()).unwrap();
    let reply = from_backend(nat_port).data(b"data: {}\n\n");
    let (_, answered) = lab.run(lab.va0, &reply.build()).unwrap();
    let passive_before = passive(&lab);
    let mut rng = fastrand::Rng::with_seed(21);
    let (mut translated, mut turned_away) = (0, 0);
    for i in 0..3_000 {
        let header = if rng.bool() {
            too_big(1280)
        } else {
            PORT_UNREACHABLE
        };
        let len = [48, 60, 200, QUOTE_MAX][rng.usize(..4)];
        let mut err = icmp6_frame(CLOUD_ROUTER, SNAT6, header, &quote(&sent, len));
        for _ in 0..rng.usize(1..4) {
            // Anywhere from the outer addresses to the quoted ports and a
            // little beyond.
            let at = rng.usize(IP6 + 8..(IP6 + 40 + 8 + 48).min(err.len()));
            err[at] = rng.u8(..);
        }
        // The ICMPv6 checksum over the pseudo-header, made right again.
        let (src, dst): ([u8; 16], [u8; 16]) = (
            err[IP6 + 8..IP6 + 24].try_into().unwrap(),
            err[IP6 + 24..IP6 + 40].try_into().unwrap(),
        );
        err[IP6 + 42..IP6 + 44].copy_from_slice(&[0, 0]);
        let c = failover_common::checksum::ipv6_l4(src, dst, 58, &err[IP6 + 40..]);
        err[IP6 + 42..IP6 + 44].copy_from_slice(&c.to_be_bytes());
        let (rc, out) = lab.run(lab.va0, &err).unwrap();
        if rc == XDP_REDIRECT {
            translated += 1;
            assert_checksums_valid(&out);
            let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
            let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
                panic!("call {i}: not IPv6")
            };
            assert_eq!(
                (
                    Ipv6Addr::from(ip.header().source()),
                    Ipv6Addr::from(ip.header().destination())
                ),
                (VIP6, CLIENT6),
                "call {i}: only to the flow's own client"
            );
        } else {
            turned_away += 1;
            assert!(rc == XDP_DROP || rc == XDP_PASS, "call {i}: {rc}");
            assert_eq!(out, err, "call {i}: left untouched");
        }
        if i % 100 == 0 {
            assert_eq!(
                lab.run(lab.vc0, &req.build()).unwrap(),
                (XDP_REDIRECT, sent.clone())
            );
            assert_eq!(
                lab.run(lab.va0, &reply.build()).unwrap(),
                (XDP_REDIRECT, answered.clone())
            );
        }
    }
    let flows = lab.dp.flows6().unwrap();
    assert_eq!(flows.len(), 1, "no error became state: {flows:?}");
    assert_eq!(u16::from_be(flows[0].1.nat_port_be), nat_port);
    assert_eq!(
        passive(&lab),
        passive_before,
        "no passive-health counter moved"
    );
    // Both outcomes happened: the mutations that miss the tuple are still
    // about the flow.
    assert!(
        translated > 0 && turned_away > 1_000,
        "{translated} translated, {turned_away} turned away"
    );
    eprintln!("{translated} translated to the flow's client, {turned_away} turned away");
}
