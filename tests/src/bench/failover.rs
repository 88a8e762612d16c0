//! `cargo xtask bench failover`: failover time after a backend crash and
//! after a whole cloud is blackholed, for failover (the real agent and
//! XDP program) and for HAProxy on the same topology, in the same run.
//!
//! Method (../shared/design/architecture.md, "Measuring"): a client sends
//! a request every millisecond, each on a new connection, open loop (a
//! hung request does not delay the next). The fault is injected; the
//! failover time is from the fault to the start of the first of an
//! unbroken run of [`RUN`] successes. Failed requests are those started
//! after the fault that did not succeed (summed over trials).
//!
//! Systems: `failover` (agent defaults for the probes: http, 100 ms
//! interval, fall 2, rise 2, passive ejection on), `haproxy-tuned` (`inter
//! 100ms fall 2 rise 2`) and `haproxy-default` (HAProxy's default check
//! settings: `inter 2s fall 3 rise 2`). HAProxy runs in the edge namespace
//! in TCP mode with an HTTP health check, cloud-b's servers as `backup`
//! (the same tiers as the agent's config).
//!
//! `--family 6` runs the same over the topology's IPv6 addresses (VIP6,
//! SNAT6, the backends' IPv6 addresses; HAProxy bound to VIP6).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use failover_agent::dataplane::ReasonCount;
use serde::Serialize;

use crate::{
    agentproc::{ProbeTiming, Scratch, World, backends_of, write_config},
    netns::Netns,
    pacer::Pacer,
    topology::{Family, Proc, Topology},
    traffic::{Sample, recovery},
};

pub const SYSTEMS: [&str; 3] = ["failover", "haproxy-tuned", "haproxy-default"];
pub const SCENARIOS: [&str; 2] = ["crash", "blackhole"];
/// Successes in a row that count as recovered.
pub const RUN: usize = 20;
const PATH: &str = "/v1/models";
const INTERVAL: Duration = Duration::from_millis(1);
/// A request not answered within this counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest a trial waits for recovery.
const TRIAL_LIMIT: Duration = Duration::from_secs(15);
/// HAProxy's default checks take up to fall × (inter + check timeout) =
/// 3 × (2 s + 2 s) to mark a blackholed server down.
const TRIAL_LIMIT_HAPROXY_DEFAULT: Duration = Duration::from_secs(40);

fn trial_limit(system: &str) -> Duration {
    if system == "haproxy-default" {
        TRIAL_LIMIT_HAPROXY_DEFAULT
    } else {
        TRIAL_LIMIT
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Result1 {
    pub system: String,
    pub scenario: String,
    pub rto_ms_p50: f64,
    pub rto_ms_p99: f64,
    pub failed_requests: usize,
    pub trials: usize,
    /// 4 or 6.
    pub family: u8,
    /// Trials that did not recover within the limit (not in the
    /// percentiles).
    pub unrecovered: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub trials: usize,
    /// Print each trial's outcomes and, for the agent, its decisions and
    /// the XDP verdicts counted during the trial.
    pub trace: bool,
    /// The clients', VIP's and backends' address family.
    pub family: Family,
}

pub fn run(opts: Opts, systems: &[String], scenarios: &[String]) -> Result<Vec<Result1>> {
    let mut out = Vec::new();
    for system in systems {
        for scenario in scenarios {
            eprintln!(
                "failover bench: {system} / {scenario}, {} trials",
                opts.trials
            );
            out.push(run_one(system, scenario, opts)?);
        }
    }
    Ok(out)
}

fn vip(family: Family) -> SocketAddr {
    SocketAddr::from((family.vip(), 80))
}

/// What a system under test must do between trials.
enum Sut {
    Agent(Box<World>, Family),
    Haproxy {
        topo: Box<Topology>,
        family: Family,
        _proc: Proc,
        _scratch: Scratch,
    },
}

impl Sut {
    fn family(&self) -> Family {
        match self {
            Sut::Agent(_, f) | Sut::Haproxy { family: f, .. } => *f,
        }
    }

    fn topo(&self) -> &Topology {
        match self {
            Sut::Agent(w, _) => &w.topo,
            Sut::Haproxy { topo, .. } => topo,
        }
    }
    fn topo_mut(&mut self) -> &mut Topology {
        match self {
            Sut::Agent(w, _) => &mut w.topo,
            Sut::Haproxy { topo, .. } => topo,
        }
    }

    /// Waits until a1 and a2 take the traffic again.
    fn wait_home(&mut self) -> Result<()> {
        let f = self.family();
        match self {
            Sut::Agent(w, _) => {
                let home = [f.name("a1"), f.name("a2")];
                w.agent
                    .wait_serving("chat", &[&home[0], &home[1]], Duration::from_secs(20))?;
                Ok(())
            }
            Sut::Haproxy { topo, _scratch, .. } => {
                let log = _scratch.0.join("haproxy.log");
                // Both cloud-a servers answer, and nothing else, in a row.
                let deadline = Instant::now() + Duration::from_secs(30);
                let _in = topo.client.enter()?;
                let mut streak = 0;
                let mut seen = std::collections::BTreeSet::new();
                let mut last = String::new();
                while Instant::now() < deadline {
                    let r = crate::client::get(vip(f), PATH, Duration::from_millis(500));
                    last = format!("{r:?}");
                    match r {
                        Ok(a) if a.status == 200 && a.backend.starts_with('a') => {
                            streak += 1;
                            seen.insert(a.backend);
                        }
                        _ => {
                            streak = 0;
                            seen.clear();
                        }
                    }
                    if streak >= 20 && seen.len() == 2 {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                bail!(
                    "haproxy did not return to cloud-a (last answer {last}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            }
        }
    }
}

fn haproxy_config(family: Family, inter_ms: u32, fall: u32, rise: u32) -> String {
    let mut c = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n",
    );
    let _ = write!(
        c,
        "frontend fe\n  bind {}\n  default_backend be\n\nbackend be\n  balance roundrobin\n  option httpchk GET /health\n",
        vip(family)
    );
    for b in backends_of(&[family], false) {
        let _ = writeln!(
            c,
            "  server {} {} check inter {inter_ms}ms fall {fall} rise {rise}{}",
            b.name,
            b.addr,
            if b.in_cloud_b { " backup" } else { "" }
        );
    }
    c
}

fn start(system: &str, family: Family) -> Result<Sut> {
    match system {
        "failover" => {
            let timing = ProbeTiming {
                hold_down_ms: Some(0),
                ..ProbeTiming::default()
            };
            let w = World::start_in(&[family], false, timing, write_config)?;
            Ok(Sut::Agent(Box::new(w), family))
        }
        "haproxy-tuned" | "haproxy-default" => {
            let topo = World::backends_in(&[family], false)?;
            let cfg = if system == "haproxy-tuned" {
                haproxy_config(family, 100, 2, 2)
            } else {
                // HAProxy's defaults: inter 2s, fall 3, rise 2.
                haproxy_config(family, 2000, 3, 2)
            };
            let scratch = Scratch::new("bench-haproxy")?;
            let file = scratch.0.join("haproxy.cfg");
            std::fs::write(&file, &cfg)?;
            topo.edge.exec(&format!(
                "ip addr add {}/{} dev lo",
                family.vip(),
                family.host_prefix()
            ))?;
            let proc = spawn_haproxy(&topo.edge, &file, &scratch.0.join("haproxy.log"))?;
            let mut sut = Sut::Haproxy {
                topo: Box::new(topo),
                family,
                _proc: proc,
                _scratch: scratch,
            };
            sut.wait_home()?;
            Ok(sut)
        }
        other => bail!("unknown system {other:?} (failover, haproxy-tuned, haproxy-default)"),
    }
}

fn spawn_haproxy(ns: &Netns, cfg: &std::path::Path, log: &std::path::Path) -> Result<Proc> {
    let check = Command::new("ip")
        .args(["netns", "exec", &ns.name, "haproxy", "-c", "-q", "-f"])
        .arg(cfg)
        .output()
        .context("run haproxy -c (cargo xtask setup installs it)")?;
    if !check.status.success() {
        bail!(
            "haproxy config rejected: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "haproxy", "-db", "-f"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("spawn haproxy")?;
    Ok(Proc(child))
}

fn run_one(system: &str, scenario: &str, opts: Opts) -> Result<Result1> {
    let trials = opts.trials;
    let mut sut = start(system, opts.family)?;
    let mut rtos = Vec::new();
    let mut failed_total = 0;
    let mut unrecovered = 0;
    for trial in 0..trials {
        let (rto, failed) = trial_once(&mut sut, scenario, trial_limit(system), opts.trace)
            .with_context(|| format!("{system} / {scenario} trial {trial}"))?;
        failed_total += failed;
        match rto {
            Some(r) => rtos.push(r.as_secs_f64() * 1000.0),
            None => unrecovered += 1,
        }
        eprintln!(
            "  trial {trial:>2}: failover {} ({failed} failed)",
            rto.map(|r| format!("{:.1} ms", r.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "none".into())
        );
    }
    rtos.sort_by(f64::total_cmp);
    Ok(Result1 {
        system: system.into(),
        scenario: scenario.into(),
        rto_ms_p50: round1(pct(&rtos, 0.50)),
        rto_ms_p99: round1(pct(&rtos, 0.99)),
        failed_requests: failed_total,
        trials,
        family: match opts.family {
            Family::V4 => 4,
            Family::V6 => 6,
        },
        unrecovered,
    })
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Nearest-rank percentile of sorted values (NaN when empty).
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn trial_once(
    sut: &mut Sut,
    scenario: &str,
    limit: Duration,
    trace: bool,
) -> Result<(Option<Duration>, usize)> {
    let family = sut.family();
    let p = Pacer::start(
        &sut.topo().client.name,
        vip(family),
        PATH,
        INTERVAL,
        REQUEST_TIMEOUT,
        limit + Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(300));
    let reasons_before = match sut {
        Sut::Agent(w, _) if trace => w.dp.reason_counts().ok(),
        _ => None,
    };
    match scenario {
        "crash" => World::crash(sut.topo(), &family.name("a1"))?,
        "blackhole" => World::blackhole_a(sut.topo())?,
        other => bail!("unknown scenario {other:?} (crash, blackhole)"),
    }
    // Stamped when the fault is in place: the crash request's connection
    // closed with the process, or `ip link set a0 down` returned. (Before,
    // requests still succeed while the command starts.)
    let fault = p.now();
    // Wait until the live results show a recovery, and every request sent
    // before it has ended (answered or timed out): a request stuck on the
    // dead backend may still fail after later ones succeeded, and would
    // break the run.
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let mut s: Vec<Sample> = p.snapshot();
        s.sort_by_key(|x| x.at);
        if let (Some(r), _) = recovery(&s, fault, RUN)
            && p.now() > fault + r + REQUEST_TIMEOUT + Duration::from_millis(100)
        {
            break;
        }
    }
    let samples = p.stop();
    let (rto, failed) = recovery(&samples, fault, RUN);
    if trace {
        print_trace(sut, &samples, fault, reasons_before.as_deref());
    }
    // Put the fault right for the next trial.
    match scenario {
        "crash" => {
            let a1 = &backends_of(&[family], false)[0];
            sut.topo_mut()
                .start_backend_on(&a1.name, false, a1.addr.ip(), a1.addr.port())?;
        }
        _ => World::restore_a(sut.topo())?,
    }
    sut.wait_home()?;
    Ok((rto, failed))
}

/// One trial, compactly: runs of outcomes in start order from the fault
/// (`+12.3ms a1x40` = from 12.3 ms, 40 answered by a1; `!` refused or
/// reset, `~` timed out), then the agent's decisions and verdict counts.
fn print_trace(
    sut: &Sut,
    samples: &[Sample],
    fault: Duration,
    reasons_before: Option<&[ReasonCount]>,
) {
    let mut runs: Vec<(Duration, String, usize)> = Vec::new();
    for s in samples.iter().filter(|s| s.at >= fault) {
        let what = match (s.ok, s.backend.is_empty()) {
            (true, _) | (false, false) => s.backend.clone(),
            (false, true) if s.done - s.at >= REQUEST_TIMEOUT => "~".into(),
            (false, true) => "!".into(),
        };
        match runs.last_mut() {
            Some(r) if r.1 == what => r.2 += 1,
            _ => runs.push((s.at - fault, what, 1)),
        }
    }
    let line: Vec<String> = runs
        .iter()
        .take(30)
        .map(|(t, w, n)| format!("+{:.1}ms {w}x{n}", t.as_secs_f64() * 1e3))
        .collect();
    eprintln!("    outcomes: {}", line.join(" "));
    if let Sut::Agent(w, _) = sut {
        for d in w.agent.decisions().iter().rev().take(3).rev() {
            eprintln!(
                "    decision {} {}: {:?} -> {:?}: {}",
                d.time, d.service, d.from, d.to, d.reason
            );
        }
        if let (Some(before), Ok(after)) = (reasons_before, w.dp.reason_counts()) {
            let grew: Vec<String> = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| a.count > b.count)
                .map(|(b, a)| format!("{} +{}", a.reason.as_str(), a.count - b.count))
                .collect();
            eprintln!("    verdicts: {}", grew.join(", "));
        }
    }
}

pub fn print(results: &[Result1], json: bool) {
    if json {
        for r in results {
            println!(
                "{}",
                serde_json::json!({
                    "system": r.system,
                    "scenario": r.scenario,
                    "rto_ms_p50": r.rto_ms_p50,
                    "rto_ms_p99": r.rto_ms_p99,
                    "failed_requests": r.failed_requests,
                    "trials": r.trials,
                    "family": r.family,
                })
            );
        }
        return;
    }
    println!(
        "{:<16} {:<10} {:>12} {:>12} {:>16} {:>7}",
        "system", "scenario", "rto_ms_p50", "rto_ms_p99", "failed_requests", "trials"
    );
    for r in results {
        println!(
            "{:<16} {:<10} {:>12.1} {:>12.1} {:>16} {:>7}{}",
            r.system,
            r.scenario,
            r.rto_ms_p50,
            r.rto_ms_p99,
            r.failed_requests,
            r.trials,
            if r.unrecovered > 0 {
                format!("  ({} did not recover)", r.unrecovered)
            } else {
                String::new()
            }
        );
    }
    let families: std::collections::BTreeSet<u8> = results.iter().map(|r| r.family).collect();
    println!(
        "failover time: fault to the first of {RUN} successes in a row; one request per ms, new connection each; failed_requests summed over trials; IP family {families:?}"
    );
    for sc in SCENARIOS {
        let get = |sys: &str| {
            results
                .iter()
                .find(|r| r.system == sys && r.scenario == sc)
                .map(|r| r.rto_ms_p99)
        };
        if let (Some(f), Some(h)) = (get("failover"), get("haproxy-tuned")) {
            let target = if sc == "crash" { 100.0 } else { 300.0 };
            println!(
                "{sc}: failover p99 {f:.1} ms (target <= {target} ms), haproxy-tuned / failover = {:.1}x (target >= 5x)",
                h / f.max(1e-9)
            );
        }
    }
}
