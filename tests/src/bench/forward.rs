//! Packets per second forwarded through the edge: failover's XDP program
//! (full NAT), the kernel's nftables DNAT+SNAT with conntrack, and plain
//! kernel routing, one after the other in one run.
//!
//! Every system gets the same traffic: a generator (`crate::generator`)
//! sends UDP frames with `flows` distinct source ports out of the client's
//! `c0`, so the edge receives real frames on `ec`. The generator is `live`
//! (the object's `failover_gen` run in live-frames mode by
//! BPF_PROG_TEST_RUN, through aya) where the kernel allows that mode, else
//! `socket` (AF_PACKET with `sendmmsg`); `Opts::generator` chooses, one
//! generator serves every system of a run, and each result names it: with
//! `socket` every frame reaches the edge as an skb, `xdp` included, so the
//! systems' figures sit closer together. The backend leg `a0` carries the
//! XDP_DROP program (`failover_drop`, [`crate::benchprog`]); its rx counter
//! is the count of packets that made it through the edge. CPU use is the
//! /proc/stat delta over the run.
//!
//! Each system gets a fresh topology (its own namespaces), so no state of
//! one system (conntrack, XDP attachments, flow tables) reaches the next.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use failover_agent::dataplane::{Dataplane, XdpMode};
use failover_common::names;
use serde::Serialize;

use crate::{
    benchprog::BenchProgs,
    generator::{Choice, Generator, Kind},
    netns::Netns,
    packet::Frame,
    peers::{NatService, Nft},
    program::{ServiceSpec, program_service},
    topology::{BACKEND_PORT, CLIENT, CLOUD_A, SNAT, Topology, VIP},
};

pub const SYSTEMS: [&str; 3] = ["xdp", "nftables", "routing"];
/// The UDP service port on the VIP.
pub const UDP_PORT: u16 = 9000;
/// First generated source port.
const BASE_PORT: u16 = 10_000;
/// Frames per generator call (the run is checked for its deadline between
/// calls).
const REPEAT: u32 = 1 << 17;

#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub seconds: f64,
    /// Distinct 5-tuples (UDP source ports).
    pub flows: u16,
    /// Frames per kernel batch: the live-frames batch (the kernel's
    /// maximum is 256), or the `sendmmsg` vector.
    pub batch: u32,
    pub generator: Choice,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            seconds: 5.0,
            flows: 1024,
            batch: 64,
            generator: Choice::Auto,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardResult {
    pub system: &'static str,
    /// "live" or "socket" (`crate::generator::Kind`).
    pub generator: &'static str,
    /// Million packets per second received on the backend leg.
    pub mpps: f64,
    /// Busy share of all cores over the run (100 = every core busy).
    pub cpu_pct: f64,
    /// Softirq share of all cores over the run.
    pub softirq_pct: f64,
    pub flows: u16,
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
}

/// Aggregate CPU time from the first line of /proc/stat, in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub softirq: u64,
    pub total: u64,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let s = std::fs::read_to_string("/proc/stat")?;
        let line = s.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        ensure!(v.len() >= 8, "short /proc/stat line: {line}");
        // user nice system idle iowait irq softirq steal
        let idle = v[3] + v[4];
        let total: u64 = v[..8].iter().sum();
        Ok(Self {
            busy: total - idle,
            softirq: v[6],
            total,
        })
    }

    /// (busy %, softirq %) of all cores between `self` and `later`.
    pub fn pct_until(&self, later: &Self) -> (f64, f64) {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        (
            100.0 * later.busy.saturating_sub(self.busy) as f64 / total,
            100.0 * later.softirq.saturating_sub(self.softirq) as f64 / total,
        )
    }
}

fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let s = ns.exec(&format!("cat /sys/class/net/{dev}/address"))?;
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.trim().split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {s:?}");
    for (d, p) in m.iter_mut().zip(parts) {
        *d = u8::from_str_radix(p, 16)?;
    }
    Ok(m)
}

/// rx packets of `dev` in `ns`.
pub fn rx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    Ok(ns
        .exec(&format!("cat /sys/class/net/{dev}/statistics/rx_packets"))?
        .trim()
        .parse()?)
}

/// Runs every system, in `SYSTEMS` order, with one generator.
pub fn run(opts: Opts) -> Result<Vec<ForwardResult>> {
    ensure!(opts.flows >= 1, "--flows must be at least 1");
    ensure!((1..=256).contains(&opts.batch), "--batch must be 1..=256");
    let generator = opts.generator.resolve()?;
    SYSTEMS
        .iter()
        .map(|s| run_system(s, generator, opts).with_context(|| format!("forward: {s}")))
        .collect()
}

/// One system on a fresh topology.
pub fn run_system(system: &'static str, generator: Kind, opts: Opts) -> Result<ForwardResult> {
    let topo = Topology::new()?;
    let backends = [(1u32, CLOUD_A[0]), (2, CLOUD_A[1])];
    // Static neighbours for the backends, so no system waits on ARP.
    let a0_mac = mac_of(&topo.cloud_a, "a0")?;
    for (_, b) in backends {
        topo.edge.exec(&format!(
            "ip neigh replace {b} lladdr {} dev ea nud permanent",
            crate::lab::mac(a0_mac)
        ))?;
    }
    // The backend side drops and counts everything it receives.
    let mut progs = BenchProgs::load(&[names::DROP_PROGRAM, names::PASS_PROGRAM])?;
    {
        let _in = topo.cloud_a.enter()?;
        progs.attach(names::DROP_PROGRAM, "a0")?;
    }

    // The system under test, on the edge. Guards live until the end.
    let mut _dp: Option<Dataplane> = None;
    let mut _nft = None;
    let dst = match system {
        "xdp" => {
            let _in = topo.edge.enter()?;
            let mut dp = Dataplane::load(&topo.pins.0)?;
            for l in ["ec", "ea"] {
                dp.attach(l, XdpMode::Native)
                    .with_context(|| format!("attach {l}"))?;
            }
            program_service(
                &mut dp,
                &ServiceSpec {
                    port: UDP_PORT,
                    proto: 17,
                    port_min: 10_000,
                    port_max: 60_999,
                    ..ServiceSpec::tcp(&backends, 0)
                },
            )?;
            _dp = Some(dp);
            VIP
        }
        "nftables" | "routing" => {
            // A veth receives frames sent with XDP_TX only with NAPI on,
            // which an XDP program turns on: the trivial pass program,
            // after which the kernel stack takes every frame.
            {
                let _in = topo.edge.enter()?;
                progs.attach(names::PASS_PROGRAM, "ec")?;
            }
            if system == "nftables" {
                _nft = Some(Nft::apply(
                    &topo.edge,
                    &[NatService {
                        vip: VIP,
                        port: UDP_PORT,
                        proto: "udp",
                        backends: backends
                            .iter()
                            .map(|&(_, a)| SocketAddr::from((a, BACKEND_PORT)))
                            .collect(),
                    }],
                    SNAT,
                )?);
                VIP
            } else {
                CLOUD_A[0]
            }
        }
        other => anyhow::bail!("unknown system {other}"),
    };

    // The generator's frame: client → dst:UDP_PORT, addressed to the edge's
    // MAC, UDP checksum 0 (none) so the source port can vary without
    // touching checksums.
    let mut f = Frame::udp(CLIENT, BASE_PORT, dst, UDP_PORT);
    f.src_mac = mac_of(&topo.client, "c0")?;
    f.dst_mac = mac_of(&topo.edge, "ec")?;
    f.payload = vec![0u8; 18];
    let mut frame = f.build();
    frame[14 + 20 + 6] = 0;
    frame[14 + 20 + 7] = 0;
    let mut traffic = Generator::udp_flows(
        generator,
        &topo.client,
        "c0",
        &frame,
        opts.flows,
        BASE_PORT,
        opts.batch,
    )?;

    // Warm-up: every flow is created (conntrack entries, NAT flows).
    let warm_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm_until {
        traffic.send(1 << 14)?;
    }
    let rx0 = rx_packets(&topo.cloud_a, "a0")?;
    ensure!(rx0 > 0, "no packet reached the backend leg during warm-up");
    let cpu0 = CpuTimes::now()?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(opts.seconds);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        sent += traffic.send(REPEAT)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = CpuTimes::now()?;
    let received = rx_packets(&topo.cloud_a, "a0")? - rx0;
    let (cpu_pct, softirq_pct) = cpu0.pct_until(&cpu1);
    Ok(ForwardResult {
        system,
        generator: generator.name(),
        mpps: received as f64 / secs / 1e6,
        cpu_pct,
        softirq_pct,
        flows: opts.flows,
        sent,
        received,
        seconds: secs,
    })
}

/// Prints a table, or one JSON object per line.
pub fn print(results: &[ForwardResult], json: bool) {
    if json {
        for r in results {
            println!(
                "{}",
                serde_json::json!({
                    "system": r.system,
                    "generator": r.generator,
                    "mpps": (r.mpps * 1000.0).round() / 1000.0,
                    "cpu_pct": (r.cpu_pct * 10.0).round() / 10.0,
                    "softirq_pct": (r.softirq_pct * 10.0).round() / 10.0,
                    "flows": r.flows,
                    "sent": r.sent,
                    "received": r.received,
                })
            );
        }
        return;
    }
    println!(
        "{:<10} {:<9} {:>8} {:>8} {:>12} {:>7} {:>12} {:>12}",
        "system", "generator", "mpps", "cpu_pct", "softirq_pct", "flows", "sent", "received"
    );
    for r in results {
        println!(
            "{:<10} {:<9} {:>8.3} {:>8.1} {:>12.1} {:>7} {:>12} {:>12}",
            r.system, r.generator, r.mpps, r.cpu_pct, r.softirq_pct, r.flows, r.sent, r.received
        );
    }
    let get = |s: &str| results.iter().find(|r| r.system == s);
    if let (Some(x), Some(n)) = (get("xdp"), get("nftables")) {
        println!(
            "xdp / nftables = {:.2}x (target >= 3x; {} generator)",
            x.mpps / n.mpps.max(1e-12),
            x.generator
        );
    }
    println!(
        "mpps: packets received on the backend leg per second; cpu_pct/softirq_pct: share of all cores (/proc/stat), generator included"
    );
}
