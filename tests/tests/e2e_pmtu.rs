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
    topology::{
        BACKEND_PORT, CLIENT, CLOUD_A, CLOUD_B, Proc, SNAT, Topology, VIP, testbackend_bin,
    },
    wait::wait_for,
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
    let target = SocketAddr::from((addr, BACKEND_PORT));
    wait_for(
        &format!("backend {name} behind the router"),
        Duration::from_secs(10),
        || TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok(),
    );
    Ok(proc)
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

/// Sends `msg` (an ICMP message, checksum as given) to `dst` from the
/// calling thread's namespace through a raw socket: the kernel adds the IP
/// header, with this host's address as the source.
fn send_icmp(sock: i32, dst: Ipv4Addr, msg: &[u8]) {
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and address of the sizes given.
    let rc = unsafe {
        libc::sendto(
            sock,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const to).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert!(rc >= 0, "sendto {dst}: {}", std::io::Error::last_os_error());
}

/// An ICMP error (`header`) quoting an IPv4 packet `src:sport -> dst:dport`
/// (TCP, `len` bytes long), the checksum right unless `corrupt`.
fn forged(header: [u8; 8], q: (Ipv4Addr, u16, Ipv4Addr, u16), len: u16, corrupt: bool) -> Vec<u8> {
    use failover_common::checksum;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 63, 6, 0, 0];
    ip[2..4].copy_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&q.0.octets());
    ip.extend_from_slice(&q.2.octets());
    let c = checksum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut m = header.to_vec();
    m.extend_from_slice(&ip);
    m.extend_from_slice(&q.1.to_be_bytes());
    m.extend_from_slice(&q.3.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0x10, 0]);
    let c = !checksum::fold(checksum::sum_bytes(&m, 0)) ^ u16::from(corrupt);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

#[test]
fn forged_icmp_errors_beside_real_traffic_move_nothing() {
    failover_tests::netns::require_root();
    let mut w = build(None).unwrap();
    let dp = w.topo.open_dataplane().unwrap();
    let chat = |dp: &failover_agent::dataplane::Dataplane| {
        dp.services()
            .unwrap()
            .into_iter()
            .find(|(k, _)| u16::from_be(k.port_be) == 80)
            .expect("chat")
            .1
            .generation
    };
    let gen0 = chat(&dp);
    let decisions = w.agent.decisions().len();
    let counted = |dp: &failover_agent::dataplane::Dataplane| {
        [Reason::IcmpNoFlow, Reason::IcmpMalformed]
            .iter()
            .map(|r| dp.reason_count(*r).unwrap())
            .sum::<u64>()
    };
    let before = counted(&dp);

    // A client sends ICMP errors of every kind to the SNAT address (guessing
    // NAT ports toward a1) and to the VIP (guessing client ports outside the
    // ephemeral range), 1,000 a second for 3 s, while real prompts go on.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        let client = w.topo.client.name.clone();
        std::thread::spawn(move || {
            let _in = failover_tests::netns::enter(&client).unwrap();
            // SAFETY: a plain socket call; the fd is closed below.
            let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            assert!(sock >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mut rng = fastrand::Rng::with_seed(19);
            let mut sent = 0u32;
            let t0 = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && t0.elapsed() < Duration::from_secs(3)
            {
                let port = rng.u16(10_000..32_767);
                let mtu = [68u16, 552, 1280, 0][rng.usize(..4)];
                let [h, l] = mtu.to_be_bytes();
                let header = [
                    [3, 4, 0, 0, 0, 0, h, l],
                    [3, 3, 0, 0, 0, 0, 0, 0],
                    [3, 1, 0, 0, 0, 0, 0, 0],
                    [11, 0, 0, 0, 0, 0, 0, 0],
                ][rng.usize(..4)];
                let corrupt = rng.u8(..10) == 0;
                let (dst, msg) = if rng.bool() {
                    let q = (SNAT, port, CLOUD_A[0], BACKEND_PORT);
                    (SNAT, forged(header, q, 1500, corrupt))
                } else {
                    (VIP, forged(header, (VIP, 80, CLIENT, port), 1500, corrupt))
                };
                send_icmp(sock, dst, &msg);
                sent += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: the fd opened above.
            unsafe { libc::close(sock) };
            sent
        })
    };
    let mut prompts = 0;
    while !attacker.is_finished() {
        let (backend, _) = post(&w, 64 << 10).expect("a real prompt during the attack");
        assert!(backend.starts_with('a'), "{backend}");
        prompts += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = u64::from(attacker.join().unwrap());
    assert!(prompts >= 10, "{prompts} prompts");
    // Every forged error reached the edge and was turned away, counted.
    let turned_away = counted(&dp) - before;
    assert!(
        turned_away >= sent * 9 / 10,
        "{turned_away} of {sent} counted"
    );
    assert_eq!(chat(&dp), gen0, "the ring never switched");
    let new: Vec<_> = w.agent.decisions().split_off(decisions);
    assert!(new.is_empty(), "no decision: {new:?}");
    w.agent.check_alive().unwrap();
    eprintln!("{sent} forged ICMP errors, {turned_away} turned away, {prompts} prompts all served");
}
