//! `cargo xtask demo`: the product end to end on this machine. Two
//! "clouds" in network namespaces with two inference backends each, the
//! real agent on an edge namespace, live client traffic through the VIP;
//! cloud-a is blackholed, traffic fails over to cloud-b, cloud-a comes
//! back. The service is dual-stack: IPv6 clients reach its VIP6 and go to
//! each cloud's IPv6 backends, through the same failover. Everything is
//! torn down at the end (or on Ctrl-C).
//!
//! `--keep` leaves it running for exploration until Ctrl-C.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Parser;
use failover_tests::{
    agentproc::{ProbeTiming, World, write_config},
    pacer::Pacer,
    topology::{CLOUD_A, Family, VIP, VIP6, sibling_bin},
    traffic::{Sample, recovery},
};

#[derive(Parser)]
#[command(
    name = "failover-demo",
    about = "failover, end to end (run via cargo xtask demo)"
)]
struct Args {
    /// Leave everything running after the demo, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Sleeps up to `d`, returning early on Ctrl-C.
fn sleep(d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct View {
    shown_decisions: usize,
    last: Duration,
}

/// The demo's clients: IPv4 to the VIP, IPv6 to the VIP6, each its own
/// pacer. Times are on the IPv4 pacer's clock.
struct Clients {
    v4: Pacer,
    v6: Pacer,
}

impl Clients {
    /// How much later the IPv6 pacer's clock started: subtract it from a
    /// time on the IPv4 clock to get the IPv6 pacer's.
    fn skew(&self) -> Duration {
        self.v6.started.saturating_duration_since(self.v4.started)
    }
}

impl View {
    /// One line of traffic per family for the last window, then new agent
    /// decisions.
    fn tick(&mut self, w: &World, c: &Clients, label: &str) {
        let now = c.v4.now();
        let from = self.last;
        self.last = now;
        line(
            &c.v4,
            (from, now),
            &format!("[{:>6.1}s]", now.as_secs_f64()),
            label,
        );
        let skew = c.skew();
        let v6 = (from.saturating_sub(skew), now.saturating_sub(skew));
        line(&c.v6, v6, "IPv6", "");
        let ds = w.agent.decisions();
        for d in ds.iter().skip(self.shown_decisions) {
            let mut reason = d.reason.clone();
            if reason.len() > 110 {
                reason.truncate(107);
                reason.push_str("...");
            }
            println!(
                "           agent {} {} gen {}: {:?} -> {:?}  ({})",
                d.time.get(11..23).unwrap_or(&d.time),
                d.service,
                d.generation,
                d.from,
                d.to,
                reason
            );
        }
        self.shown_decisions = ds.len();
    }
}

/// One line: `p`'s requests started in `[from, to)` that have finished.
fn line(p: &Pacer, (from, to): (Duration, Duration), head: &str, label: &str) {
    let s: Vec<Sample> = p
        .snapshot()
        .into_iter()
        .filter(|s| s.at >= from && s.at < to)
        .collect();
    let ok = s.iter().filter(|s| s.ok).count();
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for x in s.iter().filter(|s| s.ok) {
        *per.entry(x.backend.as_str()).or_default() += 1;
    }
    let cloud = |c: char| {
        per.iter()
            .filter(|(b, _)| b.starts_with(c))
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    let rate = if s.is_empty() {
        0.0
    } else {
        100.0 * ok as f64 / s.len() as f64
    };
    let bar = |n: usize| "#".repeat((n * 20).div_ceil(s.len().max(1)));
    println!(
        "{head:>9} {label:<10} {:>4} req  ok {rate:5.1}%  cloud-a {:>4} {:<20} cloud-b {:>4} {:<20} {}",
        s.len(),
        cloud('a'),
        bar(cloud('a')),
        cloud('b'),
        bar(cloud('b')),
        per.iter()
            .map(|(b, n)| format!("{b}:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn phase(w: &World, c: &Clients, v: &mut View, label: &str, d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() && Instant::now() < end {
        sleep(Duration::from_millis(500));
        v.tick(w, c, label);
    }
}

/// What one family's clients saw: requests, successes, the failover time
/// after the blackhole at `fault` (before the restore at `restored`), and
/// failures on the way back.
fn report(family: &str, samples: &[Sample], fault: Duration, restored: Duration) -> bool {
    let window: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at < restored)
        .cloned()
        .collect();
    let (rto, failed) = recovery(&window, fault, 20);
    let after_fault = window.iter().filter(|s| s.at >= fault).count();
    let back = samples
        .iter()
        .filter(|s| s.at >= restored)
        .collect::<Vec<_>>();
    let back_failed = back.iter().filter(|s| !s.ok).count();
    let total_ok = samples.iter().filter(|s| s.ok).count();
    println!(
        "  {family} requests: {} sent, {} ok ({:.2}%)",
        samples.len(),
        total_ok,
        100.0 * total_ok as f64 / samples.len().max(1) as f64
    );
    match rto {
        Some(r) => println!(
            "  {family} failover time after cloud-a was blackholed: {:.1} ms ({failed} of {after_fault} requests failed meanwhile)",
            r.as_secs_f64() * 1000.0
        ),
        None => println!("  {family} no recovery seen after the blackhole ({failed} failed)"),
    }
    println!(
        "  {family} return to cloud-a: {} of {} requests failed",
        back_failed,
        back.len()
    );
    rto.is_some()
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("failover demo: real XDP data plane + real agent, two clouds in network namespaces\n");
    println!("  client 192.0.2.100 --> VIP {VIP}:80 --> edge (XDP full NAT, agent)");
    println!("  client 2001:db8:c::100 --> VIP6 [{VIP6}]:80 --> edge (NAT66)");
    println!("      cloud-a (EU, tier 0): a1 198.51.100.11, a2 198.51.100.12");
    println!("                            a1-6 2001:db8:a::11, a2-6 2001:db8:a::12");
    println!("      cloud-b (US, tier 1): b1 198.51.100.75, b2 198.51.100.76");
    println!("                            b1-6 2001:db8:b::75, b2-6 2001:db8:b::76");
    println!("  probes: HTTP GET /health every 100 ms, fall 2, rise 2, passive ejection on\n");
    let t = Instant::now();
    let mut w = World::start_in(
        &[Family::V4, Family::V6],
        true,
        ProbeTiming::default(),
        write_config,
    )?;
    println!(
        "started 8 backends (+4 for the EU-only service), IPv4 and IPv6, and the agent in {:.1}s; cloud-a serves chat\n",
        t.elapsed().as_secs_f64()
    );
    let client = |vip: std::net::IpAddr, every_ms| {
        Pacer::start(
            &w.topo.client.name,
            (vip, 80).into(),
            "/v1/models",
            Duration::from_millis(every_ms),
            Duration::from_millis(1000),
            Duration::from_secs(90),
        )
    };
    // IPv6 at a fifth of the IPv4 rate: enough to see its failover, light
    // enough to keep the IPv4 figures as they were on two cores.
    let c = Clients {
        v4: client(VIP.into(), 1),
        v6: client(VIP6.into(), 5),
    };
    let mut v = View {
        shown_decisions: 0,
        last: Duration::ZERO,
    };
    println!(
        "live traffic: one request per millisecond to the VIP, one per 5 ms to the VIP6, each a new connection"
    );
    phase(&w, &c, &mut v, "steady", Duration::from_secs(3));

    println!("\n>>> cloud-a is lost: its link is blackholed (ip link set a0 down)\n");
    let fault = c.v4.now();
    World::blackhole_a(&w.topo)?;
    phase(&w, &c, &mut v, "cloud-a ✗", Duration::from_secs(4));

    println!("\n>>> cloud-a is back (ip link set a0 up)\n");
    let restored = c.v4.now();
    World::restore_a(&w.topo)?;
    phase(&w, &c, &mut v, "restored", Duration::from_secs(4));

    let skew = c.skew();
    let v6 = c.v6.stop();
    let v4 = c.v4.stop();
    println!("\nsummary");
    let v4_ok = report("IPv4", &v4, fault, restored);
    let v6_ok = report(
        "IPv6",
        &v6,
        fault.saturating_sub(skew),
        restored.saturating_sub(skew),
    );
    println!(
        "  agent decisions: {} (audit log, hash-chained: {})",
        w.agent.decisions().len(),
        w.agent.audit.display()
    );

    let mut code = 0;
    let recovered = v4_ok && v6_ok;
    if !recovered && !interrupted() {
        code = 1;
    }
    if args.keep && !interrupted() {
        let agent = sibling_bin("failover-agent")?;
        let [a1, _] = CLOUD_A;
        println!(
            "\neverything is still running. Explore (as root, in another terminal):\n\
             \n  # the client's view, over IPv4 and IPv6\n  ip netns exec {cl} curl -si http://{VIP}/v1/models\n  ip netns exec {cl} curl -si 'http://[{VIP6}]/v1/models'\n\
             \n  # the agent's log and decisions\n  tail -f {log}\n  {agent} audit verify {audit}\n  {agent} validate --config {cfg}\n\
             \n  # faults: crash a backend, or blackhole/restore cloud-a\n  ip netns exec {ca} curl -s -XPOST -d '{{\"fault\":\"crash\"}}' -H 'content-type: application/json' http://{a1}:8000/admin/fault\n  ip netns exec {ca} ip link set a0 down\n  ip netns exec {ca} sh -c 'ip link set a0 up && ip route replace default via 198.51.100.1 && ip -6 route replace default via 2001:db8:a::1'\n\
             \n  # edit the config: the agent reloads it when the file changes\n  $EDITOR {cfg}\n\
             \n  # the agent CLI runs in the edge namespace\n  nsenter --net=/run/netns/{ed} {agent} --help\n\
             \nPress Ctrl-C here to tear everything down (agent, backends, namespaces, pins).",
            cl = w.topo.client.name,
            ed = w.topo.edge.name,
            ca = w.topo.cloud_a.name,
            log = w.agent.log.display(),
            audit = w.agent.audit.display(),
            cfg = w.agent.config.display(),
            agent = agent.display(),
        );
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("\ntearing down");
    }
    if interrupted() && !args.keep {
        println!("interrupted: tearing down");
        code = 130;
    }
    w.agent.check_alive().ok();
    drop(w);
    println!("cleaned up: agent stopped, backends stopped, namespaces and pins removed");
    std::process::exit(code);
}
