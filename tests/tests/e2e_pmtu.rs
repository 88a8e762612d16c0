//! A cross-cloud path with a smaller MTU, with the real agent: cloud-b's
//! backends sit one router hop behind a 1,400-byte link, while every link
//! of the edge, and the backends' own, is 1,500 (so the backends'
//! handshakes offer the full MSS, as they would behind a tunnel). Cloud-a
//! fails; large POSTs then go to cloud-b and must succeed, over IPv4 and
//! over IPv6:
//! - without a clamp, through PMTU discovery: the router's frag-needed
//!   (IPv6: packet too big), sent to the SNAT address, reaches the client
//!   translated (icmp.rs, icmp6.rs);
//! - with `path_mtu: 1400` on cloud-b's backends and the router's ICMP
//!   filtered: the handshake's MSS is clamped, so nothing needs ICMP.
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
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use failover_common::Reason;
use failover_tests::{
    agentproc::{self, AgentProc, ProbeTiming, Scratch},
    configs,
    netns::{Netns, sh},
    topology::{BACKEND_PORT, CLIENT, CLOUD_A, Family, Proc, SNAT, Topology, VIP, testbackend_bin},
    wait::wait_for,
};

const SIZES: [usize; 2] = [64 << 10, 1 << 20];
const TIMEOUT: Duration = Duration::from_secs(10);

/// The topology with cloud-b's hosts moved behind a router: the old
/// cloud-b namespace routes, a new one holds the backends' addresses.
struct World {
    // Drop order: agent, backends, hosts' namespace, then the rest.
    agent: AgentProc,
    _hosts_procs: Vec<Proc>,
    _hosts: Netns,
    topo: Topology,
    _scratch: Scratch,
    family: Family,
}

/// The router's link to the hosts (a /30 or a /64 of the documentation
/// ranges), its address on cloud-b's side, and the commands that move
/// cloud-b's backend addresses behind it, for each family.
struct RouterPlan {
    router: String,
    host: String,
    /// In cloud-b: its own address toward the edge (the IPv6 topology
    /// gives it none), the backends' addresses removed, and forwarding.
    cloud_b: String,
    /// Cloud-b's address, the edge's next hop toward the router.
    cloud_b_addr: &'static str,
    prefix: u8,
    /// `ip addr` flag: IPv6 addresses skip duplicate address detection.
    nodad: &'static str,
}

fn plan(family: Family, b: [IpAddr; 2]) -> RouterPlan {
    match family {
        Family::V4 => RouterPlan {
            router: "203.0.113.129/30".into(),
            host: "203.0.113.130".into(),
            cloud_b: format!(
                "ip addr del {}/26 dev b0 && ip addr del {}/26 dev b0 && \
                 sysctl -qw net.ipv4.ip_forward=1",
                b[0], b[1]
            ),
            cloud_b_addr: "198.51.100.74",
            prefix: 30,
            nodad: "",
        },
        Family::V6 => RouterPlan {
            router: "2001:db8:ff::1/64".into(),
            host: "2001:db8:ff::2".into(),
            cloud_b: format!(
                "ip -6 addr del {}/64 dev b0 && ip -6 addr del {}/64 dev b0 && \
                 ip -6 addr add 2001:db8:b::74/64 dev b0 nodad && \
                 sysctl -qw net.ipv6.conf.all.forwarding=1",
                b[0], b[1]
            ),
            cloud_b_addr: "2001:db8:b::74",
            prefix: 64,
            nodad: " nodad",
        },
    }
}

fn build(family: Family, path_mtu: Option<u16>) -> Result<World> {
    let mut topo = Topology::new()?;
    let hosts = Netns::new("hb")?;
    // Before the link exists, so its addresses are usable at once.
    hosts.exec(
        "sysctl -qw net.ipv6.conf.all.accept_dad=0 && \
         sysctl -qw net.ipv6.conf.default.accept_dad=0",
    )?;
    sh(&format!(
        "ip link add r1 netns {} type veth peer name h0 netns {}",
        topo.cloud_b.name, hosts.name
    ))?;
    let b = [family.backend_addr(true, 0), family.backend_addr(true, 1)];
    let p = plan(family, b);
    let hp = family.host_prefix();
    topo.cloud_b.exec(&format!(
        "{} && ip addr add {} dev r1{nodad} && ip link set r1 mtu 1400 up && \
         ip route add {}/{hp} via {} && ip route add {}/{hp} via {}",
        p.cloud_b,
        p.router,
        b[0],
        p.host,
        b[1],
        p.host,
        nodad = p.nodad
    ))?;
    let router_addr = p.router.split('/').next().unwrap_or_default();
    hosts.exec(&format!(
        "ip addr add {}/{} dev h0{nodad} && ip addr add {}/{hp} dev h0{nodad} && \
         ip addr add {}/{hp} dev h0{nodad} && ip link set h0 up && \
         ip route add default via {router_addr} && ethtool -K h0 tx off >/dev/null",
        p.host,
        p.prefix,
        b[0],
        b[1],
        nodad = p.nodad
    ))?;
    let cloud_b_gw = p.cloud_b_addr;
    // The edge reaches cloud-b's hosts through the router.
    topo.edge.exec(&format!(
        "ip route add {}/{hp} via {cloud_b_gw} && ip route add {}/{hp} via {cloud_b_gw}",
        b[0], b[1]
    ))?;
    let name = |n: &str| family.name(n);
    topo.start_backend(&name("a1"), false, family.backend_addr(false, 0))?;
    topo.start_backend(&name("a2"), false, family.backend_addr(false, 1))?;
    let mut procs = Vec::new();
    for (n, addr) in [("b1", b[0]), ("b2", b[1])] {
        procs.push(start_host_backend(&topo, &hosts, &name(n), addr)?);
    }
    let scratch = Scratch::new("pmtu")?;
    let mut cfg = agentproc::config_for(&topo.pins.0, ProbeTiming::default(), &[family]);
    cfg.services.retain(|s| s.name == "chat");
    let pool = ["a1", "a2", "b1", "b2"].map(name);
    cfg.backends.retain(|b| pool.contains(&b.name));
    for b in &mut cfg.backends {
        if b.name.starts_with('b') {
            b.path_mtu = path_mtu;
        }
    }
    let mut agent =
        AgentProc::start_with_config(&topo.edge.name, &scratch.0, &configs::to_yaml(&cfg))?;
    agent.wait_serving("chat", &[&pool[0], &pool[1]], Duration::from_secs(20))?;
    Ok(World {
        agent,
        _hosts_procs: procs,
        _hosts: hosts,
        topo,
        _scratch: scratch,
        family,
    })
}

/// A test backend in the hosts' namespace, ready when the edge reaches it
/// (through the router).
fn start_host_backend(topo: &Topology, hosts: &Netns, name: &str, addr: IpAddr) -> Result<Proc> {
    let target = SocketAddr::from((addr, BACKEND_PORT));
    let child = Command::new("ip")
        .args(["netns", "exec", &hosts.name, &testbackend_bin()?])
        .args(["--name", name, "--listen", &target.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn test backend")?;
    let proc = Proc(child);
    let _in = topo.edge.enter()?;
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
    let vip = SocketAddr::from((w.family.vip(), 80));
    let mut s = TcpStream::connect_timeout(&vip, TIMEOUT)?;
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
    let how = format!("{how} ({})", w.family);
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
    let b = [w.family.name("b1"), w.family.name("b2")];
    w.agent
        .wait_serving("chat", &[&b[0], &b[1]], Duration::from_secs(10))?;
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

fn through_translated_pmtu(family: Family) {
    failover_tests::netns::require_root();
    let mut w = build(family, None).unwrap();
    let translated = run(&mut w, "PMTU discovery, no clamp").unwrap();
    // The router's error reached the client through the edge.
    assert!(translated >= 1, "{translated} ICMP errors translated");
}

fn with_the_mss_clamped(family: Family) {
    failover_tests::netns::require_root();
    let mut w = build(family, Some(1400)).unwrap();
    // The router sends no error about size: only the clamp can help. (Over
    // IPv6 only packet too big is dropped: neighbour discovery is ICMPv6.)
    let rule = match family {
        Family::V4 => "meta l4proto icmp drop",
        Family::V6 => "icmpv6 type packet-too-big drop",
    };
    w.topo
        .cloud_b
        .exec(&format!("nft add table inet f && nft add chain inet f out '{{ type filter hook output priority 0; }}' && nft add rule inet f out {rule}"))
        .unwrap();
    let translated = run(&mut w, "MSS clamped, ICMP filtered").unwrap();
    assert_eq!(translated, 0, "no ICMP needed, none sent");
}

#[test]
fn large_prompts_cross_a_smaller_mtu_through_translated_pmtu() {
    through_translated_pmtu(Family::V4);
}

#[test]
fn large_prompts_cross_a_smaller_mtu_with_the_mss_clamped_and_icmp_filtered() {
    with_the_mss_clamped(Family::V4);
}

#[test]
fn ipv6_large_prompts_cross_a_smaller_mtu_through_translated_packet_too_big() {
    through_translated_pmtu(Family::V6);
}

#[test]
fn ipv6_large_prompts_cross_a_smaller_mtu_with_the_mss_clamped_and_too_big_filtered() {
    with_the_mss_clamped(Family::V6);
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
    let mut w = build(Family::V4, None).unwrap();
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
