//! A cross-cloud path with a smaller MTU, with the real agent: cloud-b's
//! backends sit one router hop behind a 1,400-byte link, while every link
//! of the edge, and the backends' own, is 1,500 (so the backends'
//! handshakes offer an MSS of 1,460, as they would behind a tunnel). Cloud-a fails; large POSTs then go to cloud-b and
//! must succeed:
//! - without a clamp, through PMTU discovery: the router's frag-needed,
//!   sent to the SNAT address, reaches the client translated (icmp.rs);
//! - with `path_mtu: 1400` on cloud-b's backends and ICMP filtered on the
//!   router: the handshake's MSS is clamped, so nothing needs ICMP.
//!
//! ```text
//! [client] c0 --- ec [edge] ea --- a0 [cloud-a]
//!                         eb --- b0 [router] r1 =1400=> h0 [cloud-b hosts]
//! ```
//!
//! Each POST's time is printed beside the same request to cloud-a over
//! 1,500 bytes, before the failover. Needs root: `cargo xtask test`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use failover_common::Reason;
use failover_tests::{
    agentproc::{self, AgentProc, ProbeTiming, Scratch},
    configs,
    netns::{Netns, sh},
    topology::{BACKEND_PORT, CLOUD_A, CLOUD_B, Proc, Topology, VIP, testbackend_bin},
};

const SIZES: [usize; 2] = [64 << 10, 1 << 20];
const TIMEOUT: Duration = Duration::from_secs(10);

/// The topology with cloud-b's hosts moved behind a router: the old
/// cloud-b namespace routes, a new one holds .75 and .76.
struct World {
    // Drop order: agent, backends, hosts' namespace, then the rest.
    agent: AgentProc,
    _hosts_procs: Vec<Proc>,
    _hosts: Netns,
    topo: Topology,
    _scratch: Scratch,
}

fn build(path_mtu: Option<u16>) -> Result<World> {
    let mut topo = Topology::new()?;
    let hosts = Netns::new("hb")?;
    sh(&format!(
        "ip link add r1 netns {} type veth peer name h0 netns {}",
        topo.cloud_b.name, hosts.name
    ))?;
    topo.cloud_b.exec(
        "ip addr del 198.51.100.75/26 dev b0 && ip addr del 198.51.100.76/26 dev b0 && \
         ip addr add 203.0.113.129/30 dev r1 && ip link set r1 mtu 1400 up && \
         ip route add 198.51.100.75/32 via 203.0.113.130 && \
         ip route add 198.51.100.76/32 via 203.0.113.130 && \
         sysctl -qw net.ipv4.ip_forward=1",
    )?;
    hosts.exec(
        "ip addr add 203.0.113.130/30 dev h0 && ip addr add 198.51.100.75/32 dev h0 && \
         ip addr add 198.51.100.76/32 dev h0 && ip link set h0 up && \
         ip route add default via 203.0.113.129 && ethtool -K h0 tx off >/dev/null",
    )?;
    // The edge reaches cloud-b's hosts through the router.
    topo.edge.exec(
        "ip route add 198.51.100.75/32 via 198.51.100.74 && \
         ip route add 198.51.100.76/32 via 198.51.100.74",
    )?;
    topo.start_backend("a1", false, CLOUD_A[0])?;
    topo.start_backend("a2", false, CLOUD_A[1])?;
    let mut procs = Vec::new();
    for (name, addr) in [("b1", CLOUD_B[0]), ("b2", CLOUD_B[1])] {
        procs.push(start_host_backend(&topo, &hosts, name, addr)?);
    }
    let scratch = Scratch::new("pmtu")?;
    let mut cfg = agentproc::config(&topo.pins.0, ProbeTiming::default());
    cfg.services.retain(|s| s.name == "chat");
    cfg.backends
        .retain(|b| ["a1", "a2", "b1", "b2"].contains(&b.name.as_str()));
    for b in &mut cfg.backends {
        if b.name.starts_with('b') {
            b.path_mtu = path_mtu;
        }
    }
    let mut agent =
        AgentProc::start_with_config(&topo.edge.name, &scratch.0, &configs::to_yaml(&cfg))?;
    agent.wait_serving("chat", &["a1", "a2"], Duration::from_secs(20))?;
    Ok(World {
        agent,
        _hosts_procs: procs,
        _hosts: hosts,
        topo,
        _scratch: scratch,
    })
}

/// A test backend in the hosts' namespace, ready when the edge reaches it
/// (through the router).
fn start_host_backend(topo: &Topology, hosts: &Netns, name: &str, addr: Ipv4Addr) -> Result<Proc> {
    let child = Command::new("ip")
        .args(["netns", "exec", &hosts.name, &testbackend_bin()?])
        .args([
            "--name",
            name,
            "--listen",
            &format!("{addr}:{BACKEND_PORT}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn test backend")?;
    let proc = Proc(child);
    let _in = topo.edge.enter()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = SocketAddr::from((addr, BACKEND_PORT));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return Ok(proc);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("backend {name} did not come up behind the router")
}

/// POSTs a chat completion whose prompt is `len` bytes from the client's
/// namespace, and returns the answering backend and the time it took.
fn post(w: &World, len: usize) -> Result<(String, Duration)> {
    let _in = w.topo.client.enter()?;
    let body = format!(
        r#"{{"model":"tiny-llm","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(len)
    );
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())
        .with_context(|| format!("send {len} bytes"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("answer to {len} bytes"))?;
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "{len} bytes: status {status:?}: {}",
            &text[..text.len().min(300)]
        );
    }
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .context("x-backend header")?
        .to_owned();
    Ok((backend, took))
}

/// The POSTs on cloud-a's 1,500-byte path, then on cloud-b's after
/// cloud-a fails; each must succeed, on the cloud it should. Returns the
/// ICMP errors the edge translated.
fn run(w: &mut World, how: &str) -> Result<u64> {
    let dp = w.topo.open_dataplane()?;
    let translated = || -> Result<u64> {
        Ok(dp.reason_count(Reason::IcmpTx)? + dp.reason_count(Reason::IcmpRedirect)?)
    };
    let mut before = Vec::new();
    for len in SIZES {
        let (backend, took) = post(w, len)?;
        assert!(
            backend.starts_with('a'),
            "{len} bytes to cloud-a: {backend}"
        );
        before.push(took);
    }
    // Cloud-a goes dark; tier 1 (cloud-b) takes over.
    w.topo.cloud_a.exec("ip link set a0 down")?;
    w.agent
        .wait_serving("chat", &["b1", "b2"], Duration::from_secs(10))?;
    for (len, b) in SIZES.iter().zip(&before) {
        let (backend, took) = post(w, *len).with_context(|| format!("{how}: {len} bytes"))?;
        assert!(
            backend.starts_with('b'),
            "{len} bytes to cloud-b: {backend}"
        );
        eprintln!(
            "{how}: POST {len} bytes: {:.1} ms over 1,400 bytes to cloud-b, {:.1} ms over 1,500 to cloud-a",
            took.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3
        );
    }
    translated()
}

#[test]
fn large_prompts_cross_a_smaller_mtu_through_translated_pmtu() {
    failover_tests::netns::require_root();
    let mut w = build(None).unwrap();
    let translated = run(&mut w, "PMTU discovery, no clamp").unwrap();
    // The router's frag-needed reached the client through the edge.
    assert!(translated >= 1, "{translated} ICMP errors translated");
}

#[test]
fn large_prompts_cross_a_smaller_mtu_with_the_mss_clamped_and_icmp_filtered() {
    failover_tests::netns::require_root();
    let mut w = build(Some(1400)).unwrap();
    // The router sends no ICMP at all: only the clamp can help.
    w.topo
        .cloud_b
        .exec("nft add table inet f && nft add chain inet f out '{ type filter hook output priority 0; }' && nft add rule inet f out meta l4proto icmp drop")
        .unwrap();
    let translated = run(&mut w, "MSS clamped, ICMP filtered").unwrap();
    assert_eq!(translated, 0, "no ICMP needed, none sent");
}
