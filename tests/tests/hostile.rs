//! Hostile input through the real XDP object (BPF_PROG_TEST_RUN): each
//! packet check of docs/datapath.md ("What a client can send") with its
//! verdict or whole output frame, and a differential fuzz test against the
//! reference model in `failover_common::model`.
//!
//! Needs root: run through `cargo xtask test`.

use std::net::Ipv4Addr;

use failover_common::{
    FLOW_ANSWERED, FLOW_ESTABLISHED, FLOW_SYN_SENT, Reason, VipFilter,
    model::{self, Expected},
    tcp,
};
use failover_tests::{
    lab::{BACKEND_MAC, BPORT, CLIENT, CLIENT_MAC, Lab, SNAT, VA0_MAC, VC0_MAC, VIP, backend_addr},
    packet::{
        Frame, assert_checksums_valid, icmp_frame, l4_checksum_ok, nat, set_ip_checksum,
        set_l4_checksum, with_tcp_options,
    },
    xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const DNS: u16 = 53;

/// Backends 1..=3, TCP service 0 on VIP:80 and UDP service 1 on VIP:53,
/// both over backend 1 only (so every new flow's backend is known).
fn lab() -> Lab {
    let mut lab = Lab::with_tcp_service(&[1], 0).expect("lab");
    lab.service(1, DNS, 17, 0, 13, &[1]).expect("udp service");
    lab
}

/// Untagged frame offsets.
const IP: usize = 14;
const L4: usize = 34;

fn set_tot_len(f: &mut [u8], len: u16) {
    f[IP + 2..IP + 4].copy_from_slice(&len.to_be_bytes());
    set_ip_checksum(f);
}

fn set_flags(f: &mut [u8], flags: u8) {
    f[L4 + 13] = flags;
    set_l4_checksum(f);
}

fn assert_no_state(lab: &Lab) {
    assert!(lab.dp.flows().unwrap().is_empty(), "no flow entry");
    assert!(
        lab.dp.reverse_entries().unwrap().is_empty(),
        "no reverse entry"
    );
}

/// The frame the program must send toward backend 1 for `input`, whose
/// flow got SNAT port `nat_port`.
fn toward_backend(input: &[u8], nat_port: u16) -> Vec<u8> {
    nat(
        input,
        (VA0_MAC, BACKEND_MAC),
        (SNAT, nat_port),
        (backend_addr(1), BPORT),
    )
}

fn only_nat_port(lab: &Lab) -> u16 {
    let flows = lab.dp.flows().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    u16::from_be(flows[0].1.nat_port_be)
}

#[test]
fn l4_lengths_are_bounded_by_the_ip_packet() {
    let lab = lab();
    let syn = Frame::tcp(CLIENT, 52_000, VIP, 80).build();

    // The whole TCP header is in the frame, but the IP total length ends
    // it after 16 bytes: the bytes beyond are not part of the packet.
    let mut short = syn.clone();
    set_tot_len(&mut short, 20 + 16);
    lab.assert_verdict(&short, Reason::TruncatedL4);

    // Data offsets larger than the 20-byte segment.
    for doff in [6u8, 15] {
        let mut d = syn.clone();
        d[L4 + 12] = doff << 4;
        set_l4_checksum(&mut d);
        lab.assert_verdict(&d, Reason::TruncatedL4);
    }

    // UDP lengths below the header and beyond the 21-byte IP payload.
    for len in [4u16, 200] {
        let mut u = Frame::udp(CLIENT, 52_001, VIP, DNS);
        u.payload = b"hello, world!".to_vec();
        let mut u = u.build();
        u[L4 + 4..L4 + 6].copy_from_slice(&len.to_be_bytes());
        lab.assert_verdict(&u, Reason::TruncatedL4);
    }
    assert_no_state(&lab);
}

#[test]
fn segments_no_backend_answers_are_dropped_and_leave_nothing() {
    let lab = lab();
    let syn = Frame::tcp(CLIENT, 52_010, VIP, 80).build();
    for flags in [
        tcp::SYN | tcp::FIN,
        tcp::SYN | tcp::RST,
        tcp::SYN | tcp::FIN | tcp::RST | tcp::ACK,
        0,
        tcp::FIN | tcp::PSH | tcp::URG,
    ] {
        let mut f = syn.clone();
        set_flags(&mut f, flags);
        lab.assert_verdict(&f, Reason::BadTcpFlags);
    }
    let mut bad_sum = syn.clone();
    bad_sum[L4 + 16] ^= 0x5a;
    lab.assert_verdict(&bad_sum, Reason::BadL4Checksum);
    // A bare RST and a SYN-ACK with no flow cannot open one.
    lab.assert_verdict(
        &Frame::tcp(CLIENT, 52_011, VIP, 80).rst(1, None).build(),
        Reason::NotOpening,
    );
    lab.assert_verdict(
        &Frame::tcp(CLIENT, 52_012, VIP, 80).synack(7).build(),
        Reason::NotOpening,
    );
    assert_no_state(&lab);
    let s = lab.dp.backend_stats(1).unwrap();
    assert_eq!((s.syns, s.syns_ignored, s.traffic.fwd_packets), (0, 0, 0));
}

#[test]
fn only_vanilla_syns_count_as_evidence_the_rest_is_forwarded_uncounted() {
    let lab = lab();
    // Linux's own SYN options: evidence.
    let linux = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    let f = with_tcp_options(&Frame::tcp(CLIENT, 52_020, VIP, 80).build(), &linux);
    let (rc, out) = lab.run(lab.vc0, &f).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, toward_backend(&f, only_nat_port(&lab)));
    let s = lab.dp.backend_stats(1).unwrap();
    assert_eq!((s.syns, s.syns_ignored), (1, 0));

    // A backend may leave these unanswered (MD5 or AO without a key) or
    // refuse them (an MPTCP join for no connection): forwarded, not counted.
    let mut md5 = vec![19u8, 18];
    md5.extend_from_slice(&[0xab; 16]);
    let mptcp_join = [30u8, 12, 0x10, 0, 0, 0, 0, 1, 0, 0, 0, 2];
    let plain = Frame::tcp(CLIENT, 0, VIP, 80);
    let mut with_data = plain.clone();
    with_data.payload = b"early data".to_vec();
    let mut psh = plain.build();
    set_flags(&mut psh, tcp::SYN | tcp::PSH);
    let cases: Vec<Vec<u8>> = vec![
        with_tcp_options(&plain.build(), &md5),
        with_tcp_options(&plain.build(), &[29, 4, 1, 1]),
        with_tcp_options(&plain.build(), &mptcp_join),
        with_data.build(),
        psh,
    ];
    for (i, mut f) in cases.into_iter().enumerate() {
        let port = 52_100 + i as u16;
        f[L4..L4 + 2].copy_from_slice(&port.to_be_bytes());
        set_l4_checksum(&mut f);
        let (rc, out) = lab.run(lab.vc0, &f).unwrap();
        assert_eq!(rc, XDP_REDIRECT, "case {i}");
        let nat_port = lab
            .dp
            .flows()
            .unwrap()
            .into_iter()
            .find(|(k, _)| u16::from_be(k.sport_be) == port)
            .expect("flow")
            .1
            .nat_port_be;
        assert_eq!(out, toward_backend(&f, u16::from_be(nat_port)), "case {i}");
    }
    let s = lab.dp.backend_stats(1).unwrap();
    assert_eq!((s.syns, s.syns_ignored), (1, 5));
}

#[test]
fn backend_answers_count_only_when_they_ack_the_syn() {
    let lab = lab();
    let syn = Frame::tcp(CLIENT, 52_200, VIP, 80);
    assert_eq!(lab.run(lab.vc0, &syn.build()).unwrap().0, XDP_REDIRECT);
    let nat_port = only_nat_port(&lab);
    let from_backend = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port);
    let state = || lab.dp.reverse_entries().unwrap()[0].1.state;
    let stats = || {
        let s = lab.dp.backend_stats(1).unwrap();
        (s.synacks, s.syn_rsts, s.syn_other)
    };

    // Forged by someone who does not know the client's ISN (1000): passed
    // on (the client ignores them) but neither counted nor freeing state.
    let forged_rst = from_backend.clone().rst(0, Some(777)).build();
    assert_eq!(lab.run(lab.va0, &forged_rst).unwrap().0, XDP_REDIRECT);
    let forged_synack = from_backend
        .clone()
        .segment(5000, Some(999), true, false, false);
    assert_eq!(
        lab.run(lab.va0, &forged_synack.build()).unwrap().0,
        XDP_REDIRECT
    );
    assert_eq!(stats(), (0, 0, 0));
    assert_eq!(state(), FLOW_SYN_SENT);

    // A challenge ACK (the backend still holds the tuple) answers the SYN,
    // but is no SYN-ACK: it offsets silence, not refusals.
    let ack = from_backend
        .clone()
        .segment(5000, Some(1), false, false, false);
    assert_eq!(lab.run(lab.va0, &ack.build()).unwrap().0, XDP_REDIRECT);
    assert_eq!(stats(), (0, 0, 1));
    assert_eq!(state(), FLOW_SYN_SENT);

    // The real SYN-ACK answers; the client's ACK of it completes the
    // handshake.
    let (rc, out) = lab
        .run(lab.va0, &from_backend.clone().synack(5000).build())
        .unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_checksums_valid(&out);
    assert_eq!(stats(), (1, 0, 1));
    assert_eq!(state(), FLOW_ANSWERED);
    let ack = syn.clone().segment(1001, Some(5001), false, false, false);
    assert_eq!(lab.run(lab.vc0, &ack.build()).unwrap().0, XDP_REDIRECT);
    assert_eq!(state(), FLOW_ESTABLISHED);

    // A refusal that ACKs a retransmitted SYN's ISN counts, and frees.
    let syn2 = Frame::tcp(CLIENT, 52_201, VIP, 80).segment(9000, None, true, false, false);
    assert_eq!(lab.run(lab.vc0, &syn2.build()).unwrap().0, XDP_REDIRECT);
    let flows = lab.dp.flows().unwrap();
    let nat2 = flows
        .iter()
        .find(|(k, _)| u16::from_be(k.sport_be) == 52_201)
        .unwrap()
        .1
        .nat_port_be;
    let refusal = Frame::tcp(backend_addr(1), BPORT, SNAT, u16::from_be(nat2)).rst(0, Some(9001));
    assert_eq!(lab.run(lab.va0, &refusal.build()).unwrap().0, XDP_REDIRECT);
    assert_eq!(stats(), (1, 1, 1));
    assert_eq!(
        lab.dp.flows().unwrap().len(),
        1,
        "the refused flow is freed"
    );
}

#[test]
fn the_cached_next_hop_checks_the_egress_mtu() {
    // One CPU, so the second packet reads the next hop the first cached.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(0, &mut set) };
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "pin to CPU 0");

    let lab = lab();
    lab.ns.exec("ip link set va0 mtu 1280").unwrap();
    // The SYN's FIB lookup caches the next hop, with its MTU.
    let syn = Frame::tcp(CLIENT, 52_300, VIP, 80);
    assert_eq!(lab.run(lab.vc0, &syn.build()).unwrap().0, XDP_REDIRECT);
    // Without DF: dropped (XDP cannot fragment). With DF, the client gets
    // a frag-needed instead (tests/tests/icmp.rs checks its frame).
    let mut big = syn.clone().data(&[0x42; 1300]).build();
    big[IP + 6] = 0;
    set_ip_checksum(&mut big);
    let before = lab.count(Reason::MtuExceeded);
    let (rc, _) = lab.run(lab.vc0, &big).unwrap();
    assert_eq!(rc, Reason::MtuExceeded.verdict().action());
    assert_eq!(lab.count(Reason::MtuExceeded), before + 1);
    let df = syn.clone().data(&[0x42; 1300]).build();
    let (rc, _) = lab.run(lab.vc0, &df).unwrap();
    assert_eq!(rc, Reason::FragNeededSent.verdict().action());
    let small = syn.data(&[0x42; 1200]).build();
    let (rc, out) = lab.run(lab.vc0, &small).unwrap();
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, toward_backend(&small, only_nat_port(&lab)));
}

/// Frames per run of the fuzz test, and the seed (FUZZ_SEED overrides it,
/// to replay a failure).
const FUZZ_FRAMES: u32 = 100_000;
const FUZZ_BATCH: u32 = 1_000;
const FUZZ_PORTS: (u16, u16) = (10_000, 32_767);

#[test]
fn differential_fuzz_against_the_reference_model() {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d_u64);
    eprintln!("fuzz seed {seed} (FUZZ_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lab = lab();
    // The example config's port range, so ports last the whole corpus.
    let mut node = lab.dp.node().unwrap();
    (node.port_min, node.port_max) = FUZZ_PORTS;
    lab.dp.set_node(node).unwrap();
    let mut vips = VipFilter::empty();
    vips.insert(u32::from(VIP).to_be());
    let services = [(VIP.octets(), 80, 6), (VIP.octets(), DNS, 17)];
    let cfg = model::Config {
        snat: SNAT.octets(),
        vips: &vips,
        services: &services,
    };
    let counts = |lab: &Lab| -> Vec<u64> { Reason::ALL.iter().map(|&r| lab.count(r)).collect() };

    let mut forwarded = 0u64;
    let mut exact = 0u64;
    let mut icmp_errors = 0u64;
    for batch in 0..FUZZ_FRAMES / FUZZ_BATCH {
        let before = counts(&lab);
        let mut want = vec![0u64; Reason::ALL.len()];
        for i in 0..FUZZ_BATCH {
            let index = batch * FUZZ_BATCH + i;
            let frame = fuzz_frame(&mut rng);
            let expected = model::expect(&frame, &cfg);
            let (rc, out) = lab.run(lab.vc0, &frame).unwrap();
            let ctx = || {
                format!(
                    "frame {index} (seed {seed}): {expected:?} rc {rc}\n{}",
                    hex(&frame)
                )
            };
            match expected {
                Expected::Exactly(r) => {
                    exact += 1;
                    want[r as usize] += 1;
                    assert_eq!(rc, r.verdict().action(), "{}", ctx());
                    assert_eq!(out, frame, "untouched: {}", ctx());
                }
                Expected::Forward | Expected::Reverse => {
                    if rc == XDP_TX || rc == XDP_REDIRECT {
                        forwarded += 1;
                        check_sent(&frame, &out, expected, &ctx);
                    } else {
                        assert!(rc == XDP_DROP || rc == XDP_PASS, "{}", ctx());
                    }
                }
                Expected::Icmp => {
                    icmp_errors += 1;
                    if rc == XDP_TX || rc == XDP_REDIRECT {
                        // Translated (tests/tests/icmp.rs checks whole frames).
                        assert_checksums_valid(&out);
                    } else if rc == XDP_PASS {
                        // About no flow: the kernel's, untouched.
                        assert_eq!(out, frame, "untouched: {}", ctx());
                    } else {
                        // About a flow whose other side has no neighbour.
                        assert_eq!(rc, XDP_DROP, "{}", ctx());
                    }
                }
            }
        }
        // Every frame is counted once, and each exactly-predicted reason
        // as often as the model predicted it (NotVip also ends reverse
        // frames that match no flow).
        let after = counts(&lab);
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(
            delta.iter().sum::<u64>(),
            u64::from(FUZZ_BATCH),
            "batch {batch}"
        );
        for &r in Reason::ALL {
            let (got, w) = (delta[r as usize], want[r as usize]);
            let state_dependent = Expected::Forward.allows(r)
                || Expected::Reverse.allows(r)
                || Expected::Icmp.allows(r);
            if state_dependent {
                assert!(got >= w, "batch {batch} (seed {seed}): {r:?} {got} < {w}");
            } else {
                assert_eq!(got, w, "batch {batch} (seed {seed}): {r:?}");
            }
        }
    }
    eprintln!("{FUZZ_FRAMES} frames: {exact} with an exact verdict, {forwarded} sent on");
    // The corpus must reach the interesting paths, or the test proves little.
    assert!(
        forwarded > u64::from(FUZZ_FRAMES) / 20,
        "{forwarded} sent on"
    );
    assert!(exact > u64::from(FUZZ_FRAMES) / 4, "{exact} exact");
    assert!(
        icmp_errors > u64::from(FUZZ_FRAMES) / 400,
        "{icmp_errors} well-formed ICMP errors"
    );
}

/// A frame that left toward a host: a NAT of the input (or an RST the edge
/// built), with a valid IP checksum and an L4 checksum valid exactly when
/// the input's was (a corrupted segment is never made to look valid).
fn check_sent(input: &[u8], out: &[u8], expected: Expected, ctx: &dyn Fn() -> String) {
    let tagged = u16::from_be_bytes([input[12], input[13]]) != 0x0800;
    if tagged {
        assert_checksums_valid(out);
        return;
    }
    let is_rst_reply =
        out.len() == 54 && out[30..34] == input[26..30] && out[26..30] == input[30..34];
    if expected == Expected::Forward && is_rst_reply {
        assert_checksums_valid(out);
        assert_ne!(out[L4 + 13] & tcp::RST, 0, "an RST: {}", ctx());
        return;
    }
    let (src, dst) = (&out[26..30], &out[30..34]);
    let port = |f: &[u8], at: usize| u16::from_be_bytes([f[L4 + at], f[L4 + at + 1]]);
    let want = match expected {
        Expected::Forward => {
            assert_eq!(src, SNAT.octets(), "{}", ctx());
            assert_eq!(dst, backend_addr(1).octets(), "{}", ctx());
            let p = port(out, 0);
            assert!((FUZZ_PORTS.0..=FUZZ_PORTS.1).contains(&p), "{}", ctx());
            nat(
                input,
                (VA0_MAC, BACKEND_MAC),
                (SNAT, p),
                (backend_addr(1), BPORT),
            )
        }
        _ => {
            let client = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
            assert_eq!(src, VIP.octets(), "{}", ctx());
            nat(
                input,
                (VC0_MAC, CLIENT_MAC),
                (VIP, port(out, 0)),
                (client, port(out, 2)),
            )
        }
    };
    if l4_checksum_ok(input) {
        assert_eq!(out, want, "{}", ctx());
    } else {
        assert!(!l4_checksum_ok(out), "made valid: {}", ctx());
        let mut o = out.to_vec();
        set_l4_checksum(&mut o);
        assert_eq!(o, want, "{}", ctx());
    }
}

/// An ICMP error to the SNAT address or the VIP, quoting a packet of a
/// flow that may or may not exist, checksums right (the mutations after
/// reach the checks behind them).
fn icmp_error(rng: &mut fastrand::Rng) -> Vec<u8> {
    let nat_port = rng.u16(FUZZ_PORTS.0..=FUZZ_PORTS.1);
    let (to, quoted) = if rng.bool() {
        let mut q = Frame::tcp(SNAT, nat_port, backend_addr(1), BPORT);
        q.payload = vec![7; rng.usize(0..1400)];
        (SNAT, q.build())
    } else {
        let client = Ipv4Addr::new(192, 0, 2, rng.u8(2..250));
        (VIP, Frame::udp(VIP, DNS, client, rng.u16(1024..)).build())
    };
    let qlen = rng.usize(0..=(quoted.len() - IP).min(600));
    let (ty, code) = [(3, 4), (3, 3), (3, 1), (11, 0), (8, 0), (3, 13)][rng.usize(..6)];
    let mtu = [1400u16, 1280, 552, 0, 9000][rng.usize(..5)];
    icmp_frame(
        Ipv4Addr::new(198, 51, 100, 254),
        to,
        [ty, code, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8],
        &quoted[IP..IP + qlen],
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One frame of the corpus: a valid frame of some kind, then (often)
/// mutated, with checksums fixed afterwards more often than not, so that
/// the mutations reach the checks after the checksum.
fn fuzz_frame(rng: &mut fastrand::Rng) -> Vec<u8> {
    let client = Ipv4Addr::new(192, 0, 2, rng.u8(2..250));
    let sport = rng.u16(1024..);
    let mut f = match rng.u8(0..10) {
        0..=4 => {
            let flags = [
                tcp::SYN,
                tcp::SYN | tcp::ECE | tcp::CWR,
                tcp::SYN | tcp::PSH,
                tcp::ACK,
                tcp::ACK | tcp::PSH,
                tcp::ACK | tcp::FIN,
                tcp::RST,
                tcp::RST | tcp::ACK,
                tcp::SYN | tcp::ACK,
                rng.u8(..),
            ][rng.usize(..10)];
            let mut fr = Frame::tcp(client, sport, VIP, 80);
            fr.payload = (0..rng.usize(0..3) * rng.usize(0..40))
                .map(|_| rng.u8(..))
                .collect();
            let mut b = fr.build();
            set_flags(&mut b, flags);
            match rng.u8(0..4) {
                0 => with_tcp_options(
                    &b,
                    &[
                        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
                    ],
                ),
                1 => {
                    let opts: Vec<u8> = (0..rng.usize(1..41)).map(|_| rng.u8(..)).collect();
                    with_tcp_options(&b, &opts)
                }
                _ => b,
            }
        }
        5 => {
            let mut u = Frame::udp(client, sport, VIP, DNS);
            u.payload = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
            u.build()
        }
        6 => {
            let nat_port = rng.u16(FUZZ_PORTS.0..=FUZZ_PORTS.1);
            let b = Frame::tcp(backend_addr(1), BPORT, SNAT, nat_port);
            if rng.bool() {
                b.synack(rng.u32(..)).build()
            } else {
                Frame {
                    l4: Frame::udp(CLIENT, 0, VIP, 0).l4,
                    ..b
                }
                .build()
            }
        }
        7 if rng.bool() => icmp_error(rng),
        7 => Frame::tcp(
            client,
            sport,
            Ipv4Addr::new(203, 0, 113, rng.u8(..)),
            rng.u16(..),
        )
        .build(),
        8 => {
            let mut b = Frame::tcp(client, sport, VIP, 80).build();
            // Another EtherType, or an 802.1Q tag in front of IPv4.
            if rng.bool() {
                b[12..14].copy_from_slice(&rng.u16(..).to_be_bytes());
            } else {
                b.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
            }
            b
        }
        _ => {
            let mut b = Frame::udp(client, sport, VIP, DNS);
            b.payload = vec![0; 13];
            let mut b = b.build();
            b[L4 + 6] = 0;
            b[L4 + 7] = 0;
            b
        }
    };
    if f.len() < L4 || f[12..14] != [8, 0] || rng.u8(0..10) < 3 {
        return f;
    }
    for _ in 0..rng.usize(1..4) {
        if f.len() < L4 + 8 {
            break;
        }
        match rng.u8(0..7) {
            0 => {
                let i = rng.usize(..f.len().min(80));
                f[i] ^= 1 << rng.u8(0..8);
            }
            1 => f[IP + rng.usize(..20)] = rng.u8(..),
            2 => {
                let tot = u16::from_be_bytes([f[16], f[17]]);
                let t = if rng.bool() {
                    tot.wrapping_add(rng.u16(0..40)).wrapping_sub(20)
                } else {
                    rng.u16(..)
                };
                f[16..18].copy_from_slice(&t.to_be_bytes());
            }
            3 if f.len() > L4 + 13 => f[L4 + 12] = rng.u8(..) & 0xf0,
            4 if f.len() > L4 + 6 => {
                f[L4 + 4..L4 + 6].copy_from_slice(&rng.u16(0..40).to_be_bytes())
            }
            5 => f.truncate(rng.usize(14..=f.len())),
            3 | 4 => {}
            _ => f.extend((0..rng.usize(1..30)).map(|_| rng.u8(..))),
        }
    }
    if f.len() >= L4 && f[12..14] == [8, 0] {
        let ihl = usize::from(f[IP] & 0x0f) * 4;
        if ihl >= 20 && IP + ihl <= f.len() && rng.u8(0..10) < 8 {
            set_ip_checksum(&mut f);
        }
        let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let sane = f[IP] == 0x45 && (20 + 8..=f.len() - IP).contains(&tot);
        if sane && (f[23] == 17 || tot >= 40) && rng.u8(0..10) < 6 {
            set_l4_checksum(&mut f);
        }
    }
    f
}
