//! ICMP through the NAT, PMTU and MSS clamping, through the real XDP
//! object (BPF_PROG_TEST_RUN), each output asserted as a whole frame built
//! from scratch (docs/datapath.md, "ICMP and path MTU"):
//! - errors about a flow's packets are translated to its other side, with
//!   a full or an 8-byte quote, both directions;
//! - errors that are malformed, forged or about no flow are never
//!   translated and never change a flow;
//! - a DF packet longer than the egress MTU gets a frag-needed, rate
//!   limited per source; one without DF is dropped;
//! - SYN and SYN-ACK MSS options are clamped to a backend's path.
//!
//! Needs root: run through `cargo xtask test`.

use std::net::Ipv4Addr;

use failover_common::{FLOW_ESTABLISHED, Reason};
use failover_tests::{
    lab::{BACKEND_MAC, BPORT, CLIENT, CLIENT_MAC, Lab, SNAT, VA0_MAC, VC0_MAC, VIP, backend_addr},
    packet::{
        Frame, assert_checksums_valid, icmp_frame, nat, set_ip_checksum, set_l4_checksum,
        with_tcp_options,
    },
    xdp::{XDP_REDIRECT, XDP_TX},
};

const DNS: u16 = 53;
const IP: usize = 14;
/// A router on the backend's path, and one on the client's.
const CLOUD_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);

/// Backends 1..=3, TCP service 0 on VIP:80 and UDP service 1 on VIP:53,
/// both over backend 1 only.
fn lab() -> Lab {
    // One CPU, so a packet reads the next hop the one before it cached.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(0, &mut set) };
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "pin to CPU 0");
    let mut lab = Lab::with_tcp_service(&[1], 0).expect("lab");
    lab.service(1, DNS, 17, 0, 13, &[1]).expect("udp service");
    lab
}

/// A completed handshake from CLIENT:`cport`; returns the flow's NAT port.
fn established(lab: &Lab, cport: u16) -> u16 {
    let syn = Frame::tcp(CLIENT, cport, VIP, 80);
    assert_eq!(lab.run(lab.vc0, &syn.build()).unwrap().0, XDP_REDIRECT);
    let nat_port = nat_port_of(lab, cport);
    let synack = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port).synack(5000);
    assert_eq!(lab.run(lab.va0, &synack.build()).unwrap().0, XDP_REDIRECT);
    let ack = syn.segment(1001, Some(5001), false, false, false);
    assert_eq!(lab.run(lab.vc0, &ack.build()).unwrap().0, XDP_REDIRECT);
    let rev = lab.dp.reverse_entries().unwrap();
    assert!(
        rev.iter()
            .any(|(k, r)| u16::from_be(k.nat_port_be) == nat_port && r.state == FLOW_ESTABLISHED),
        "established"
    );
    nat_port
}

fn nat_port_of(lab: &Lab, cport: u16) -> u16 {
    let flows = lab.dp.flows().unwrap();
    let (_, f) = flows
        .iter()
        .find(|(k, _)| u16::from_be(k.sport_be) == cport)
        .expect("flow");
    u16::from_be(f.nat_port_be)
}

/// `packet` (an IP packet) as a router quotes it: its first `len` bytes.
fn quote(frame: &[u8], len: usize) -> Vec<u8> {
    frame[IP..IP + len].to_vec()
}

/// The ICMP header of a frag-needed with `mtu`, or of another error.
fn frag_needed(mtu: u16) -> [u8; 8] {
    let m = mtu.to_be_bytes();
    [3, 4, 0, 0, 0, 0, m[0], m[1]]
}

/// What the recipient must get: an ICMP error from `src` to `dst` with
/// `header`, quoting `own` (the recipient's own packet as it sent it) with
/// the TTL it had when it was refused (`quoted_ttl`), in `len` bytes;
/// outer TTL 63 (one hop through the edge), both MACs those of the leg.
fn expected(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    header: [u8; 8],
    own: &[u8],
    quoted_ttl: u8,
    len: usize,
) -> Vec<u8> {
    let mut own = own.to_vec();
    own[IP + 8] = quoted_ttl;
    set_ip_checksum(&mut own);
    let mut f = icmp_frame(src, dst, header, &own[IP..IP + len]);
    f[6..12].copy_from_slice(&macs.0);
    f[0..6].copy_from_slice(&macs.1);
    f[IP + 8] = 63;
    set_ip_checksum(&mut f);
    f
}

#[test]
fn frag_needed_from_the_cloud_reaches_the_client_full_or_8_bytes_quoted() {
    let lab = lab();
    let nat_port = established(&lab, 41_000);
    // The client's full-size segment, and what the edge sent the backend.
    let own = Frame::tcp(CLIENT, 41_000, VIP, 80)
        .data(&[0x42; 1400])
        .build();
    let (rc, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let flows_before = lab.dp.flows().unwrap();
    let stats_before = lab.dp.backend_stats(1).unwrap();

    // Linux quotes 548 bytes; RFC 792 asks for 8 bytes of L4.
    for len in [548, 28, 40] {
        let err = icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1400), &quote(&sent, len));
        let before = lab.count(Reason::IcmpRedirect);
        let (rc, out) = lab.run(lab.va0, &err).unwrap();
        assert_eq!(rc, XDP_REDIRECT, "quote of {len}");
        assert_eq!(lab.count(Reason::IcmpRedirect), before + 1);
        // From the VIP (the address the client talks to), quoting the
        // client's own segment with the TTL the edge gave it.
        let want = expected(
            (VC0_MAC, CLIENT_MAC),
            (VIP, CLIENT),
            frag_needed(1400),
            &own,
            63,
            len,
        );
        assert_checksums_valid(&out);
        assert_eq!(out, want, "quote of {len}");
    }
    // Nothing about the flow moved.
    assert_eq!(lab.dp.flows().unwrap(), flows_before);
    let s = lab.dp.backend_stats(1).unwrap();
    assert_eq!(
        (s.syns, s.synacks, s.syn_rsts, s.syn_other),
        (
            stats_before.syns,
            stats_before.synacks,
            stats_before.syn_rsts,
            stats_before.syn_other
        )
    );
    assert_eq!(u16::from_be_bytes([sent[34], sent[35]]), nat_port);
}

#[test]
fn port_unreachable_and_time_exceeded_reach_the_client() {
    let lab = lab();
    // A UDP flow: its checksum sits in the 8 bytes every quote holds.
    let own = Frame::udp(CLIENT, 41_100, VIP, DNS).build();
    let (rc, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let unreachable = [3, 3, 0, 0, 0, 0, 0, 0];
    let err = icmp_frame(backend_addr(1), SNAT, unreachable, &quote(&sent, 28));
    let (rc, out) = lab.run(lab.va0, &err).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        out,
        expected(
            (VC0_MAC, CLIENT_MAC),
            (VIP, CLIENT),
            unreachable,
            &own,
            63,
            28
        )
    );

    // A UDP datagram sent without a checksum keeps none.
    let mut bare = Frame::udp(CLIENT, 41_101, VIP, DNS).build();
    bare[IP + 26..IP + 28].copy_from_slice(&[0, 0]);
    let (_, sent) = lab.run(lab.vc0, &bare).unwrap();
    assert_eq!(&sent[IP + 26..IP + 28], &[0, 0]);
    let err = icmp_frame(backend_addr(1), SNAT, unreachable, &quote(&sent, 28));
    let (rc, out) = lab.run(lab.va0, &err).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        out,
        expected(
            (VC0_MAC, CLIENT_MAC),
            (VIP, CLIENT),
            unreachable,
            &bare,
            63,
            28
        )
    );

    let nat_port = established(&lab, 41_102);
    let own = Frame::tcp(CLIENT, 41_102, VIP, 80).data(b"hello").build();
    let (_, sent) = lab.run(lab.vc0, &own).unwrap();
    assert_eq!(u16::from_be_bytes([sent[34], sent[35]]), nat_port);
    let exceeded = [11, 0, 0, 0, 0, 0, 0, 0];
    let err = icmp_frame(CLOUD_ROUTER, SNAT, exceeded, &quote(&sent, 45));
    let (rc, out) = lab.run(lab.va0, &err).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        out,
        expected((VC0_MAC, CLIENT_MAC), (VIP, CLIENT), exceeded, &own, 63, 45)
    );
}

#[test]
fn frag_needed_from_the_client_side_reaches_the_backend() {
    let lab = lab();
    let nat_port = established(&lab, 41_200);
    // The backend's full-size segment, and what the edge sent the client.
    let own = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port)
        .data(&[0x24; 1400])
        .build();
    let (rc, sent) = lab.run(lab.va0, &own).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    for len in [548, 28] {
        let err = icmp_frame(CLIENT_ROUTER, VIP, frag_needed(1280), &quote(&sent, len));
        let (rc, out) = lab.run(lab.vc0, &err).unwrap();
        assert_eq!(rc, XDP_REDIRECT, "quote of {len}");
        let want = expected(
            (VA0_MAC, BACKEND_MAC),
            (SNAT, backend_addr(1)),
            frag_needed(1280),
            &own,
            63,
            len,
        );
        assert_eq!(out, want, "quote of {len}");
    }
}

#[test]
fn forged_malformed_and_unmatched_errors_move_nothing() {
    let lab = lab();
    let nat_port = established(&lab, 41_300);
    let own = Frame::tcp(CLIENT, 41_300, VIP, 80)
        .data(&[0x42; 1400])
        .build();
    let (_, sent) = lab.run(lab.vc0, &own).unwrap();
    let flows = lab.dp.flows().unwrap();
    let reverse = lab.dp.reverse_entries().unwrap();

    // About no flow: another NAT port (an off-path forger must guess it),
    // another backend, a packet the edge did not send: the kernel's.
    let mut other_port = sent.clone();
    other_port[34..36].copy_from_slice(&(nat_port ^ 1).to_be_bytes());
    let mut other_backend = sent.clone();
    other_backend[IP + 16..IP + 20].copy_from_slice(&backend_addr(2).octets());
    set_ip_checksum(&mut other_backend);
    let not_from_us = Frame::tcp(CLIENT, 41_300, backend_addr(1), BPORT).build();
    for (i, q) in [&other_port, &other_backend, &not_from_us]
        .iter()
        .enumerate()
    {
        let err = icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1400), &quote(q, 28));
        let (rc, out) = lab.run(lab.va0, &err).unwrap();
        assert_eq!(rc, Reason::IcmpNoFlow.verdict().action(), "case {i}");
        assert_eq!(out, err, "case {i}");
    }
    // From the client side, about a tuple of no flow.
    let stranger = Frame::tcp(VIP, 80, Ipv4Addr::new(192, 0, 2, 77), 41_300)
        .data(&[1; 1400])
        .build();
    let err = icmp_frame(CLIENT_ROUTER, VIP, frag_needed(1280), &quote(&stranger, 28));
    lab.assert_verdict(&err, Reason::IcmpNoFlow);
    // Not an error: echo stays the kernel's.
    let echo = icmp_frame(CLIENT, VIP, [8, 0, 0, 0, 0, 1, 0, 1], b"ping");
    lab.assert_verdict(&echo, Reason::NotTcpUdp);

    // Malformed: short quotes, a bad ICMP checksum, a bad quoted header,
    // MTUs no path has, a message longer than a router sends.
    let good = icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1400), &quote(&sent, 28));
    let mut bad_sum = good.clone();
    bad_sum[IP + 20 + 2] ^= 0x40;
    let mut bad_inner = quote(&sent, 28);
    bad_inner[0] = 0x35;
    let mut malformed = vec![
        icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1400), &quote(&sent, 27)),
        icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1400), &[]),
        bad_sum,
        icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1400), &bad_inner),
        icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(68), &quote(&sent, 28)),
        icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(0), &quote(&sent, 28)),
        icmp_frame(CLOUD_ROUTER, SNAT, frag_needed(1500), &quote(&sent, 28)),
        icmp_frame(
            CLOUD_ROUTER,
            SNAT,
            [3, 1, 0, 0, 0, 0, 0, 0],
            &vec![0x45; 600],
        ),
    ];
    // An ICMP header cut short.
    let mut short = good.clone();
    short.truncate(IP + 24);
    short[IP + 2..IP + 4].copy_from_slice(&24u16.to_be_bytes());
    set_ip_checksum(&mut short);
    malformed.push(short);
    for (i, f) in malformed.iter().enumerate() {
        let before = lab.count(Reason::IcmpMalformed);
        let (rc, out) = lab.run(lab.va0, f).unwrap();
        assert_eq!(rc, Reason::IcmpMalformed.verdict().action(), "case {i}");
        assert_eq!(&out, f, "case {i} untouched");
        assert_eq!(lab.count(Reason::IcmpMalformed), before + 1, "case {i}");
    }
    assert_eq!(lab.dp.flows().unwrap(), flows);
    assert_eq!(lab.dp.reverse_entries().unwrap(), reverse);
    // And the real error still gets through afterwards.
    assert_eq!(lab.run(lab.va0, &good).unwrap().0, XDP_REDIRECT);
}

#[test]
fn oversize_df_packets_get_a_rate_limited_frag_needed() {
    let lab = lab();
    lab.ns.exec("ip link set va0 mtu 1400").unwrap();
    established(&lab, 41_400);
    // Toward the backend, over the cached next hop.
    let big = Frame::tcp(CLIENT, 41_400, VIP, 80)
        .data(&[0x42; 1400])
        .build();
    let (rc, out) = lab.run(lab.vc0, &big).unwrap();
    assert_eq!(rc, XDP_TX);
    let mut want = icmp_frame(VIP, CLIENT, frag_needed(1400), &quote(&big, 28));
    want[0..6].copy_from_slice(&big[6..12]);
    want[6..12].copy_from_slice(&big[0..6]);
    want[IP + 1] = 0xc0;
    set_ip_checksum(&mut want);
    assert_eq!(out, want);
    assert_eq!(lab.count(Reason::FragNeededSent), 1);
    // A second one at once from the same source: limited.
    lab.assert_verdict(&big, Reason::FragNeededLimited);
    // Without DF: dropped, as XDP cannot fragment.
    let mut no_df = Frame::tcp(CLIENT, 41_400, VIP, 80)
        .data(&[0x42; 1400])
        .build();
    no_df[IP + 6] = 0;
    set_ip_checksum(&mut no_df);
    lab.assert_verdict(&no_df, Reason::MtuExceeded);
    // What fits goes on.
    let small = Frame::tcp(CLIENT, 41_400, VIP, 80)
        .data(&[0x42; 1300])
        .build();
    assert_eq!(lab.run(lab.vc0, &small).unwrap().0, XDP_REDIRECT);

    // Toward the client, on a next hop not cached yet (a handshake's
    // replies look it up): the backend hears it from the SNAT address.
    lab.ns.exec("ip link set vc0 mtu 1280").unwrap();
    let nat_port = established(&lab, 41_401);
    let reply = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port)
        .data(&[0x24; 1300])
        .build();
    let (rc, out) = lab.run(lab.va0, &reply).unwrap();
    assert_eq!(rc, XDP_TX);
    let mut want = icmp_frame(SNAT, backend_addr(1), frag_needed(1280), &quote(&reply, 28));
    // Back out of the interface it came in on, to the MAC it came from.
    want[0..6].copy_from_slice(&reply[6..12]);
    want[6..12].copy_from_slice(&reply[0..6]);
    want[IP + 1] = 0xc0;
    set_ip_checksum(&mut want);
    assert_eq!(out, want);
}

/// What the program must send backend 1 for `frame` from CLIENT:`cport`.
fn toward_backend(lab: &Lab, frame: &[u8], cport: u16) -> Vec<u8> {
    nat(
        frame,
        (VA0_MAC, BACKEND_MAC),
        (SNAT, nat_port_of(lab, cport)),
        (backend_addr(1), BPORT),
    )
}

/// `frame` (an untagged TCP SYN or SYN-ACK with the MSS option first)
/// with its MSS set to `mss`, checksum recomputed.
fn with_mss(frame: &[u8], mss: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[56..58].copy_from_slice(&mss.to_be_bytes());
    set_l4_checksum(&mut f);
    f
}

fn mss_options(mss: u16) -> Vec<u8> {
    let m = mss.to_be_bytes();
    // Linux's SYN options: MSS, SACK-perm, timestamps, NOP, window scale.
    vec![
        2, 4, m[0], m[1], 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ]
}

#[test]
fn handshakes_toward_a_small_path_get_their_mss_clamped() {
    let mut lab = lab();
    // Backend 1's path takes 1400 bytes: MSS 1360.
    lab.dp.set_path_mss(1, 1360).unwrap();
    let syn = with_tcp_options(
        &Frame::tcp(CLIENT, 41_500, VIP, 80).build(),
        &mss_options(1460),
    );
    let (rc, out) = lab.run(lab.vc0, &syn).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let nat_port = nat_port_of(&lab, 41_500);
    let want = toward_backend(&lab, &with_mss(&syn, 1360), 41_500);
    assert_eq!(out, want, "the SYN's MSS clamped");
    assert_checksums_valid(&out);

    // The backend's SYN-ACK, toward the client: clamped too.
    let synack = with_tcp_options(
        &Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port)
            .synack(5000)
            .build(),
        &mss_options(8960),
    );
    let (rc, out) = lab.run(lab.va0, &synack).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    let want = nat(
        &with_mss(&synack, 1360),
        (VC0_MAC, CLIENT_MAC),
        (VIP, 80),
        (CLIENT, 41_500),
    );
    assert_eq!(out, want, "the SYN-ACK's MSS clamped");

    // An MSS already below the path's is left alone; so is a SYN without
    // one (its peer assumes 536).
    let small = with_tcp_options(
        &Frame::tcp(CLIENT, 41_501, VIP, 80).build(),
        &mss_options(1200),
    );
    let (_, out) = lab.run(lab.vc0, &small).unwrap();
    let want = toward_backend(&lab, &small, 41_501);
    assert_eq!(out, want);
    // An odd offset: a NOP before the MSS.
    let odd = with_tcp_options(
        &Frame::tcp(CLIENT, 41_502, VIP, 80).build(),
        &[1, 2, 4, 0x23, 0x28, 1, 1, 1],
    );
    let (_, out) = lab.run(lab.vc0, &odd).unwrap();
    let mut clamped = odd.clone();
    clamped[54 + 3..54 + 5].copy_from_slice(&1360u16.to_be_bytes());
    set_l4_checksum(&mut clamped);
    let want = toward_backend(&lab, &clamped, 41_502);
    assert_eq!(out, want, "odd offset");

    // Without a clamp, nothing changes.
    lab.dp.set_path_mss(1, 0).unwrap();
    let syn = with_tcp_options(
        &Frame::tcp(CLIENT, 41_503, VIP, 80).build(),
        &mss_options(1460),
    );
    let (_, out) = lab.run(lab.vc0, &syn).unwrap();
    let want = toward_backend(&lab, &syn, 41_503);
    assert_eq!(out, want);
}
