//! `cargo xtask demo`: the product end to end on this machine. Two
//! "clouds" in network namespaces with two inference backends each, the
//! real agent on an edge namespace, live client traffic through the VIP;
//! cloud-a is blackholed, traffic fails over to cloud-b, cloud-a comes
//! back. Everything is torn down at the end (or on Ctrl-C).
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
    agentproc::{ProbeTiming, World},
    pacer::Pacer,
    topology::{CLOUD_A, VIP, sibling_bin},
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

impl View {
    /// One line of traffic for the last window, then new agent decisions.
    fn tick(&mut self, w: &World, p: &Pacer, label: &str) {
        let now = p.now();
        let from = self.last;
        self.last = now;
        // Requests started in the window that have finished.
        let s: Vec<Sample> = p
            .snapshot()
            .into_iter()
            .filter(|s| s.at >= from && s.at < now)
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
            "[{:>6.1}s] {label:<10} {:>4} req  ok {rate:5.1}%  cloud-a {:>4} {:<20} cloud-b {:>4} {:<20} {}",
            now.as_secs_f64(),
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

fn phase(w: &World, p: &Pacer, v: &mut View, label: &str, d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() && Instant::now() < end {
        sleep(Duration::from_millis(500));
        v.tick(w, p, label);
    }
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
    println!("      cloud-a (EU, tier 0): a1 198.51.100.11, a2 198.51.100.12");
    println!("      cloud-b (US, tier 1): b1 198.51.100.75, b2 198.51.100.76");
    println!("  probes: HTTP GET /health every 100 ms, fall 2, rise 2, passive ejection on\n");
    let t = Instant::now();
    let mut w = World::start(true, ProbeTiming::default())?;
    println!(
        "started 4 backends (+2 for the EU-only service) and the agent in {:.1}s; cloud-a serves chat\n",
        t.elapsed().as_secs_f64()
    );
    let p = Pacer::start(
        &w.topo.client.name,
        (VIP, 80).into(),
        "/v1/models",
        Duration::from_millis(1),
        Duration::from_millis(1000),
        Duration::from_secs(90),
    );
    let mut v = View {
        shown_decisions: 0,
        last: Duration::ZERO,
    };
    println!("live traffic: one request per millisecond, each a new connection through the VIP");
    phase(&w, &p, &mut v, "steady", Duration::from_secs(3));

    println!("\n>>> cloud-a is lost: its link is blackholed (ip link set a0 down)\n");
    let fault = p.now();
    World::blackhole_a(&w.topo)?;
    phase(&w, &p, &mut v, "cloud-a ✗", Duration::from_secs(4));

    println!("\n>>> cloud-a is back (ip link set a0 up)\n");
    let restored = p.now();
    World::restore_a(&w.topo)?;
    phase(&w, &p, &mut v, "restored", Duration::from_secs(4));

    let samples = p.stop();
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
    println!("\nsummary");
    println!(
        "  requests: {} sent, {} ok ({:.2}%)",
        samples.len(),
        total_ok,
        100.0 * total_ok as f64 / samples.len().max(1) as f64
    );
    match rto {
        Some(r) => println!(
            "  failover time after cloud-a was blackholed: {:.1} ms ({failed} of {after_fault} requests failed meanwhile)",
            r.as_secs_f64() * 1000.0
        ),
        None => println!("  no recovery seen after the blackhole ({failed} failed)"),
    }
    println!(
        "  return to cloud-a: {} of {} requests failed",
        back_failed,
        back.len()
    );
    println!(
        "  agent decisions: {} (audit log, hash-chained: {})",
        w.agent.decisions().len(),
        w.agent.audit.display()
    );

    let mut code = 0;
    if rto.is_none() && !interrupted() {
        code = 1;
    }
    if args.keep && !interrupted() {
        let agent = sibling_bin("failover-agent")?;
        let [a1, _] = CLOUD_A;
        println!(
            "\neverything is still running. Explore (as root, in another terminal):\n\
             \n  # the client's view\n  ip netns exec {cl} curl -si http://{VIP}/v1/models\n\
             \n  # the agent's log and decisions\n  tail -f {log}\n  {agent} audit verify {audit}\n  {agent} validate --config {cfg}\n\
             \n  # faults: crash a backend, or blackhole/restore cloud-a\n  ip netns exec {ca} curl -s -XPOST -d '{{\"fault\":\"crash\"}}' -H 'content-type: application/json' http://{a1}:8000/admin/fault\n  ip netns exec {ca} ip link set a0 down\n  ip netns exec {ca} sh -c 'ip link set a0 up && ip route replace default via 198.51.100.1'\n\
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
