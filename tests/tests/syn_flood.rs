//! A SYN flood through the real XDP object (BPF_PROG_TEST_RUN): half-open
//! state lives apart from established flows and is reclaimed, so the flood
//! neither evicts live streams nor holds the SNAT ports.
//!
//! Needs root: run through `cargo xtask test`.

use std::net::Ipv4Addr;

use etherparse::{NetSlice, SlicedPacket};
use failover_common::{FlowKey, Reason};
use failover_tests::{
    lab::{BACKEND_MAC, BPORT, CLIENT, Lab, SNAT, VA0_MAC, VIP},
    packet::{Frame, assert_checksums_valid, ports},
    wait::wait_for,
    xdp::XDP_REDIRECT,
};

/// The example config's SNAT port range (deploy/examples/two-clouds.yaml).
const PORTS: (u16, u16) = (10_000, 32_767);
const ESTABLISHED: u32 = 10_000;
const FLOOD: u32 = 1_000_000;

/// A lab with three backends behind VIP:80 and the example port range.
fn lab() -> Lab {
    let mut lab = Lab::with_tcp_service(&[1, 2, 3], 0).expect("lab");
    let mut node = lab.dp.node().unwrap();
    (node.port_min, node.port_max) = PORTS;
    lab.dp.set_node(node).unwrap();
    lab
}

fn dst_of(frame: &[u8]) -> Ipv4Addr {
    match SlicedPacket::from_ethernet(frame).unwrap().net {
        Some(NetSlice::Ipv4(ip)) => ip.header().destination_addr(),
        _ => panic!("not ipv4"),
    }
}

/// A whole handshake through the program (SYN, the backend's SYN-ACK, the
/// client's ACK); returns the backend and NAT port the flow got.
fn handshake(lab: &Lab, client: Ipv4Addr, cport: u16) -> (Ipv4Addr, u16) {
    let syn = Frame::tcp(client, cport, VIP, 80);
    let (rc, out) = lab.run(lab.vc0, &syn.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT, "SYN of {client}:{cport}");
    let (backend, nat) = (dst_of(&out), ports(&out).0);
    let mut synack = Frame::tcp(backend, BPORT, SNAT, nat).synack(5000);
    synack.src_mac = BACKEND_MAC;
    synack.dst_mac = VA0_MAC;
    let (rc, out) = lab.run(lab.va0, &synack.build()).unwrap();
    assert_eq!(rc, XDP_REDIRECT, "SYN-ACK to {client}:{cport}");
    assert_checksums_valid(&out);
    let ack = syn.segment(1001, Some(5001), false, false, false).build();
    let (rc, out) = lab.run(lab.vc0, &ack).unwrap();
    assert_eq!(rc, XDP_REDIRECT, "ACK of {client}:{cport}");
    assert_eq!((dst_of(&out), ports(&out).0), (backend, nat), "same pin");
    (backend, nat)
}

fn key(client: Ipv4Addr, cport: u16) -> FlowKey {
    FlowKey {
        src_be: u32::from(client).to_be(),
        dst_be: u32::from(VIP).to_be(),
        sport_be: cport.to_be(),
        dport_be: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// The n-th established client: 192.0.2.100, ports from 20000 on.
fn established_client(n: u32) -> (Ipv4Addr, u16) {
    (CLIENT, 20_000 + n as u16)
}

#[test]
fn a_million_spoofed_syns_evict_no_established_flow_and_hold_no_port() {
    let lab = lab();
    let mut pins = Vec::with_capacity(ESTABLISHED as usize);
    for n in 0..ESTABLISHED {
        let (c, p) = established_client(n);
        pins.push(handshake(&lab, c, p));
    }
    assert_eq!(
        lab.dp.established_flows().unwrap().len(),
        ESTABLISHED as usize
    );

    // The flood: SYNs from random sources, none answered. Every 10,000th
    // packet, a real client opens a connection, which must get through.
    let mut rng = fastrand::Rng::with_seed(16);
    let mut syn = Frame::tcp(CLIENT, 0, VIP, 80);
    let mut real = 0u16;
    for i in 0..FLOOD {
        syn.src = Ipv4Addr::new(203, 0, 113, rng.u8(..));
        syn.sport = rng.u16(1024..);
        let (rc, _) = lab.run(lab.vc0, &syn.build()).unwrap();
        assert!(
            rc == XDP_REDIRECT,
            "flood SYN {i}: {rc} ({:?})",
            counts(&lab)
        );
        if i % 10_000 == 0 {
            handshake(&lab, CLIENT, 40_000 + real);
            real += 1;
        }
    }

    // Every established flow kept its backend and NAT port...
    let flows = lab.dp.established_flows().unwrap();
    for n in 0..ESTABLISHED {
        let (c, p) = established_client(n);
        let f = flows
            .iter()
            .find(|(k, _)| *k == key(c, p))
            .unwrap_or_else(|| panic!("flow {n} evicted"))
            .1;
        assert_eq!(u16::from_be(f.nat_port_be), pins[n as usize].1, "flow {n}");
    }
    // ... and its replies still reach the client.
    for n in (0..ESTABLISHED).step_by(97) {
        let (c, p) = established_client(n);
        let (backend, nat) = pins[n as usize];
        let mut reply = Frame::tcp(backend, BPORT, SNAT, nat).data(b"token");
        reply.src_mac = BACKEND_MAC;
        reply.dst_mac = VA0_MAC;
        let (rc, out) = lab.run(lab.va0, &reply.build()).unwrap();
        assert_eq!(rc, XDP_REDIRECT, "reply to flow {n}");
        assert_eq!((dst_of(&out), ports(&out).1), (c, p));
    }
    // New real clients get through after the flood, and the flood took
    // slots from itself, not from established flows.
    for n in 0..200 {
        handshake(&lab, CLIENT, 50_000 + n);
    }
    let evicted: u64 = (1..=3)
        .map(|id| lab.dp.backend_stats(id).unwrap().pending_evicted)
        .sum();
    eprintln!(
        "{FLOOD} SYNs: {evicted} half-open slots taken over, {} established flows ({:?})",
        lab.dp.established_flows().unwrap().len(),
        counts(&lab)
    );
    assert!(evicted > 0, "the flood filled the half-open slots");
    assert_eq!(
        lab.dp.established_flows().unwrap().len(),
        ESTABLISHED as usize + usize::from(real) + 200
    );
    assert_eq!(lab.count(Reason::SnatExhausted), 0);
}

fn counts(lab: &Lab) -> Vec<(&'static str, u64)> {
    lab.dp
        .reason_counts()
        .unwrap()
        .into_iter()
        .filter(|c| c.count > 0)
        .map(|c| (c.reason.as_str(), c.count))
        .collect()
}

#[test]
fn a_half_open_flow_frees_its_slot_when_it_expires() {
    let mut lab = lab();
    // 1 s half-open timeout on the service.
    let (k, mut svc) = lab.dp.services().unwrap()[0];
    svc.half_open_ms = 1_000;
    lab.dp.put_service(k, svc).unwrap();
    let syn = Frame::tcp(CLIENT, 41_000, VIP, 80);
    assert_eq!(lab.run(lab.vc0, &syn.build()).unwrap().0, XDP_REDIRECT);
    assert_eq!(lab.dp.pending().unwrap().len(), 1);
    wait_for(
        "the half-open flow to expire",
        std::time::Duration::from_secs(5),
        || lab.dp.pending().unwrap().is_empty(),
    );
    assert!(lab.dp.flows().unwrap().is_empty(), "nothing left of it");
}

#[test]
fn idle_flows_leave_on_time_and_live_ones_stay() {
    use std::time::{Duration, Instant};
    let mut lab = lab();
    lab.service(1, 53, 17, 0, 13, &[1]).unwrap();
    let t0 = Instant::now();
    // A UDP flow and a TCP peer that vanish, and a TCP flow that goes on.
    let udp = Frame::udp(CLIENT, 42_000, VIP, 53).build();
    assert_eq!(lab.run(lab.vc0, &udp).unwrap().0, XDP_REDIRECT);
    handshake(&lab, CLIENT, 42_001);
    handshake(&lab, CLIENT, 42_002);
    let live = Frame::tcp(CLIENT, 42_002, VIP, 80).data(b"more").build();
    let timeout = Duration::from_secs(1);
    let present = |lab: &Lab, port: u16| {
        lab.dp
            .established_flows()
            .unwrap()
            .iter()
            .any(|(k, _)| u16::from_be(k.sport_be) == port)
    };
    let mut next_live = t0;
    let mut gone_at = None;
    while t0.elapsed() < Duration::from_secs(6) && gone_at.is_none() {
        if Instant::now() >= next_live {
            assert_eq!(lab.run(lab.vc0, &live).unwrap().0, XDP_REDIRECT);
            next_live += Duration::from_millis(200);
        }
        let now = failover_agent::dataplane::now_stamp();
        lab.dp.expire_idle(now, |_, _| Some(timeout)).unwrap();
        if !present(&lab, 42_000) && !present(&lab, 42_001) {
            gone_at = Some(t0.elapsed());
        } else {
            std::thread::yield_now();
        }
    }
    let gone_at = gone_at.expect("the idle flows left within 6 s");
    // Not before their timeout (one jiffy of rounding), and not long after.
    assert!(
        gone_at >= timeout - Duration::from_millis(20),
        "{gone_at:?}"
    );
    assert!(gone_at <= timeout * 3, "{gone_at:?}");
    assert!(present(&lab, 42_002), "the live flow stays");
    assert_eq!(lab.dp.established_flows().unwrap().len(), 1);
}
