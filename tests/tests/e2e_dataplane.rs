//! Real packets through the real XDP program, attached natively to veths
//! in namespaces: client -> VIP -> edge (full NAT) -> backend processes,
//! and back. The data plane is programmed directly here; the agent's own
//! end-to-end tests build on the same topology.
//!
//! Needs root: run through `cargo xtask test`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use failover_agent::dataplane::Dataplane;
use failover_common::{Reason, SVC_F_RESET, state};
use failover_tests::{
    client,
    program::program,
    topology::{CLOUD_A, Topology, VIP},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Non-zero reason counters, for failure messages.
fn counters(dp: &Dataplane) -> String {
    dp.reason_counts()
        .unwrap()
        .iter()
        .filter(|c| c.count > 0)
        .map(|c| format!("{}={}", c.reason.as_str(), c.count))
        .collect::<Vec<_>>()
        .join(" ")
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

#[test]
fn requests_through_the_vip_spread_over_backends_and_all_succeed() {
    let mut topo = Topology::new().unwrap();
    topo.start_backend("a1", false, CLOUD_A[0]).unwrap();
    topo.start_backend("a2", false, CLOUD_A[1]).unwrap();
    let mut dp = topo.load_dataplane().unwrap();
    program(&mut dp, &[(1, CLOUD_A[0]), (2, CLOUD_A[1])], SVC_F_RESET);

    let mut seen = BTreeMap::new();
    {
        let _in = topo.client.enter().unwrap();
        for i in 0..40 {
            let a = client::get(vip(), "/health", TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i}: {e:#}; counters: {}", counters(&dp)));
            assert_eq!(a.status, 200);
            *seen.entry(a.backend).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["a1", "a2"],
        "both backends served: {seen:?}"
    );
    let st = dp.service_stats(0).unwrap();
    assert_eq!(st.new_flows, 40);
    // The fast path did the work in both directions (the first packets of
    // a neighbour may take the kernel path once).
    assert!(dp.reason_count(Reason::ForwardRedirect).unwrap() >= 40 * 3);
    assert!(dp.reason_count(Reason::ReverseRedirect).unwrap() >= 40 * 3);
    let per_backend: u64 = [1, 2]
        .iter()
        .map(|&i| dp.backend_stats(i).unwrap().synacks)
        .sum();
    assert_eq!(
        per_backend, 40,
        "every handshake seen by the passive signals"
    );
}

#[test]
fn a_backend_marked_down_resets_its_open_flow_and_loses_new_ones() {
    let mut topo = Topology::new().unwrap();
    topo.start_backend("a1", false, CLOUD_A[0]).unwrap();
    topo.start_backend("a2", false, CLOUD_A[1]).unwrap();
    let mut dp = topo.load_dataplane().unwrap();
    program(&mut dp, &[(1, CLOUD_A[0]), (2, CLOUD_A[1])], SVC_F_RESET);

    let _in = topo.client.enter().unwrap();
    // Open keep-alive connections until one is pinned to a1.
    let mut conn = None;
    for _ in 0..32 {
        let mut s = TcpStream::connect_timeout(&vip(), TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: vip\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("x-backend: a1") {
            conn = Some(s);
            break;
        }
    }
    let mut conn = conn.expect("a connection pinned to a1");

    dp.set_backend_state(1, state::DOWN).unwrap();
    let down_at = Instant::now();
    // The next segment on the pinned flow is answered with an RST by the
    // edge itself, not by a timeout.
    let _ = conn.write_all(b"GET /health HTTP/1.1\r\nHost: vip\r\n\r\n");
    let mut buf = [0u8; 1024];
    let err = conn.read(&mut buf).expect_err("the flow is reset");
    let took = down_at.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(took < Duration::from_millis(500), "reset after {took:?}");
    assert!(dp.reason_count(Reason::ResetSent).unwrap() >= 1);

    // Every new flow now lands on a2.
    for i in 0..20 {
        let a =
            client::get(vip(), "/health", TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        assert_eq!((a.status, a.backend.as_str()), (200, "a2"));
    }
}

#[test]
fn a_topology_leaves_no_namespace_or_pin_behind() {
    let (names, pins) = {
        let mut topo = Topology::new().unwrap();
        topo.start_backend("a1", false, CLOUD_A[0]).unwrap();
        let _dp = topo.load_dataplane().unwrap();
        let names: Vec<String> = [&topo.client, &topo.edge, &topo.cloud_a, &topo.cloud_b]
            .iter()
            .map(|n| n.name.clone())
            .collect();
        (names, topo.pins.0.clone())
    };
    for n in names {
        assert!(
            !std::path::Path::new("/run/netns").join(&n).exists(),
            "{n} left behind"
        );
    }
    assert!(!pins.exists(), "{} left behind", pins.display());
}

#[test]
fn a_stream_from_a_blackholed_cloud_is_reset_promptly() {
    let mut topo = Topology::new().unwrap();
    topo.start_backend("a1", false, CLOUD_A[0]).unwrap();
    let mut dp = topo.load_dataplane().unwrap();
    program(&mut dp, &[(1, CLOUD_A[0])], SVC_F_RESET);

    let mut stream = {
        let _in = topo.client.enter().unwrap();
        let (s, head) = client::open_stream(vip(), TIMEOUT).unwrap();
        assert!(head.contains("200"), "stream started");
        s
    };

    // The whole cloud goes dark: nothing from a1 reaches the client again,
    // and the client, waiting for tokens, sends nothing.
    topo.cloud_a.exec("ip link set a0 down").unwrap();
    dp.set_backend_state(1, state::DOWN).unwrap();
    let t0 = Instant::now();
    let nudged = {
        let _in = topo.edge.enter().unwrap();
        dp.nudge_clients(&[1]).unwrap()
    };
    assert_eq!(nudged, 1);
    let mut buf = [0u8; 4096];
    let err = loop {
        // Tokens already in flight may still be read first.
        match stream.read(&mut buf) {
            Ok(0) => panic!("stream closed cleanly instead of reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let took = t0.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(took < Duration::from_millis(500), "reset after {took:?}");
    assert!(
        dp.reason_count(Reason::ResetSent).unwrap() >= 1,
        "{}",
        counters(&dp)
    );
}
