//! HTTP through the edge with wrk, in one run: `direct` (client → backend
//! address, routed by the edge, no NAT), `xdp` and `xdp-native` (the VIP
//! through failover's program, attached as the agent does by default and
//! forced native),
//! `nftables` (the VIP through DNAT+SNAT with conntrack) and
//! `haproxy` (TCP mode on the edge). Each system gets a fresh topology
//! with one test backend; each is measured with keep-alive connections and
//! with a new connection per request.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use failover_agent::dataplane::XdpMode;

use crate::{
    netns::Netns,
    peers::{Checks, Haproxy, HaproxySpec, NatService, Nft},
    program::{ServiceSpec, program_service},
    topology::{BACKEND_PORT, CLOUD_A, SNAT, Topology, VIP},
};

pub const SYSTEMS: [&str; 5] = ["direct", "xdp", "xdp-native", "nftables", "haproxy"];
/// failover's program as the agent attaches it by default (`xdp`,
/// `node.xdp_mode: auto`, which is generic mode on these veths), and forced
/// native (`xdp-native`). On a veth, native XDP turns every skb from a
/// local stack into an XDP buffer (a copy, as TCP's segments are clones),
/// runs in the veth's NAPI poll, and the peer builds a new skb from the
/// frame; generic XDP runs on the skb the stack already has and sends it
/// on through the stack. Both are measured and held to the targets.
pub const XDP_SYSTEMS: [&str; 2] = ["xdp", "xdp-native"];
pub const MODES: [&str; 2] = ["keepalive", "newconn"];
/// A result's `--json` keys, in table order: the table header and the
/// results page's columns.
pub const COLUMNS: [&str; 9] = [
    "system", "mode", "rps", "rps_min", "rps_max", "p50_ms", "p99_ms", "requests", "errors",
];
pub const PATH: &str = "/health";

#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub seconds: u32,
    pub connections: u32,
    pub threads: u32,
    /// Rounds over every system; each figure is the median over rounds.
    pub rounds: u32,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            seconds: 5,
            connections: 16,
            threads: 1,
            rounds: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct HttpResult {
    pub system: &'static str,
    pub mode: &'static str,
    pub rps: f64,
    /// The lowest and highest rps of the rounds: the spread behind the
    /// median.
    pub rps_min: f64,
    pub rps_max: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx.
    pub errors: u64,
}

/// What wrk printed, parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkOutput {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: u64,
}

fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(out: &str) -> Result<WrkOutput> {
    let mut w = WrkOutput::default();
    let (mut rps, mut p50, mut p99) = (None, None, None);
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = duration_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = duration_ms(v);
        } else if t.contains(" requests in ") {
            w.requests = t.split_whitespace().next().unwrap_or("0").parse()?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    w.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    w.rps = rps.context("no Requests/sec in wrk output")?;
    w.p50_ms = p50.context("no 50% latency in wrk output")?;
    w.p99_ms = p99.context("no 99% latency in wrk output")?;
    Ok(w)
}

/// Runs wrk in `ns` against `url` for `opts.seconds`; killed if it
/// overruns by 15 s.
pub fn wrk(ns: &Netns, url: &str, newconn: bool, opts: Opts) -> Result<WrkOutput> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "wrk"])
        .arg(format!("-t{}", opts.threads))
        .arg(format!("-c{}", opts.connections))
        .arg(format!("-d{}s", opts.seconds))
        .args(["--timeout", "2s", "--latency"]);
    if newconn {
        cmd.args(["-H", "Connection: close"]);
    }
    let mut child = crate::topology::Proc(
        cmd.arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn wrk (install it with cargo xtask setup)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(u64::from(opts.seconds) + 15);
    loop {
        if child.0.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("wrk did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut s) = child.0.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.0.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    parse_wrk(&out).with_context(|| format!("wrk output:\n{out}{err}"))
}

/// Runs every system in both modes, `opts.rounds` times with the systems
/// interleaved (so a burst of noise on the shared machine hits one round
/// of each, not all of one system), and reports the median of each figure
/// over the rounds, in `SYSTEMS` × `MODES` order. Requests and errors are
/// summed.
pub fn run(opts: Opts, systems: &[String]) -> Result<Vec<HttpResult>> {
    ensure!(opts.seconds >= 1, "--seconds must be at least 1");
    ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    let systems: Vec<&'static str> = systems
        .iter()
        .map(|s| {
            SYSTEMS
                .into_iter()
                .find(|k| k == s)
                .with_context(|| format!("unknown system {s} (one of {})", SYSTEMS.join(",")))
        })
        .collect::<Result<_>>()?;
    let mut rounds: Vec<HttpResult> = Vec::new();
    for round in 0..opts.rounds {
        for &system in &systems {
            rounds.extend(
                run_system(system, opts)
                    .with_context(|| format!("http: {system}, round {round}"))?,
            );
        }
    }
    Ok(median_over_rounds(&rounds))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One result per system and mode: the median rps, p50 and p99 of its
/// rounds, the lowest and highest rps; requests and errors summed.
pub fn median_over_rounds(rounds: &[HttpResult]) -> Vec<HttpResult> {
    let mut out = Vec::new();
    for system in SYSTEMS {
        for mode in MODES {
            let rs: Vec<&HttpResult> = rounds
                .iter()
                .filter(|r| r.system == system && r.mode == mode)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let pick = |f: fn(&HttpResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
            out.push(HttpResult {
                system,
                mode,
                rps: pick(|r| r.rps),
                rps_min: rs.iter().map(|r| r.rps).fold(f64::INFINITY, f64::min),
                rps_max: rs.iter().map(|r| r.rps).fold(0.0, f64::max),
                p50_ms: pick(|r| r.p50_ms),
                p99_ms: pick(|r| r.p99_ms),
                requests: rs.iter().map(|r| r.requests).sum(),
                errors: rs.iter().map(|r| r.errors).sum(),
            });
        }
    }
    out
}

/// One system, both modes, on a fresh topology.
pub fn run_system(system: &'static str, opts: Opts) -> Result<Vec<HttpResult>> {
    let mut topo = Topology::new()?;
    let backend = CLOUD_A[0];
    topo.start_backend("a1", false, backend)?;
    let backends = [(1u32, backend)];
    let direct = SocketAddr::from((backend, BACKEND_PORT));
    let vip = SocketAddr::from((VIP, 80));

    let mut _dp = None;
    let mut _nft = None;
    let mut _haproxy = None;
    let target = match system {
        "direct" => direct,
        "xdp" | "xdp-native" => {
            let mode = if system == "xdp" {
                XdpMode::Auto
            } else {
                XdpMode::Native
            };
            let mut dp = topo.load_dataplane_in(mode)?;
            // No socket of the edge's own uses the SNAT address during the
            // run, so the whole port space is the NAT's.
            program_service(
                &mut dp,
                &ServiceSpec {
                    port_min: 1024,
                    port_max: 65_535,
                    ..ServiceSpec::tcp(&backends, 0)
                },
            )?;
            _dp = Some(dp);
            vip
        }
        "nftables" => {
            _nft = Some(Nft::apply(
                &topo.edge,
                &[NatService {
                    vip: VIP,
                    port: 80,
                    proto: "tcp",
                    backends: vec![direct],
                }],
                SNAT,
            )?);
            vip
        }
        "haproxy" => {
            topo.edge.exec(&format!("ip addr add {VIP}/32 dev lo"))?;
            _haproxy = Some(Haproxy::start(
                &topo.edge,
                &HaproxySpec {
                    listen: vip,
                    backends: vec![("a1".into(), direct)],
                    source: Some(SNAT),
                    checks: Checks::default(),
                    http_check: Some(PATH.into()),
                    timeout_connect_ms: 2000,
                    balance: "roundrobin",
                },
                Some(&topo.client),
            )?);
            vip
        }
        other => bail!("unknown system {other}"),
    };
    let url = format!("http://{target}{PATH}");
    let mut out = Vec::new();
    for mode in MODES {
        let w = wrk(&topo.client, &url, mode == "newconn", opts)?;
        out.push(HttpResult {
            system,
            mode,
            rps: w.rps,
            rps_min: w.rps,
            rps_max: w.rps,
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            requests: w.requests,
            errors: w.errors,
        });
    }
    Ok(out)
}

/// Prints a table, or one JSON object per line.
pub fn print(results: &[HttpResult], json: bool) {
    if json {
        for r in results {
            println!(
                "{}",
                serde_json::json!({
                    "system": r.system,
                    "mode": r.mode,
                    "rps": (r.rps * 10.0).round() / 10.0,
                    "rps_min": (r.rps_min * 10.0).round() / 10.0,
                    "rps_max": (r.rps_max * 10.0).round() / 10.0,
                    "p50_ms": (r.p50_ms * 1000.0).round() / 1000.0,
                    "p99_ms": (r.p99_ms * 1000.0).round() / 1000.0,
                    "requests": r.requests,
                    "errors": r.errors,
                })
            );
        }
        return;
    }
    let [
        system,
        mode,
        rps,
        rps_min,
        rps_max,
        p50,
        p99,
        requests,
        errors,
    ] = COLUMNS;
    println!(
        "{system:<10} {mode:<10} {rps:>10} {rps_min:>10} {rps_max:>10} {p50:>9} {p99:>9} {requests:>9} {errors:>7}"
    );
    for r in results {
        println!(
            "{:<10} {:<10} {:>10.1} {:>10.1} {:>10.1} {:>9.3} {:>9.3} {:>9} {:>7}",
            r.system, r.mode, r.rps, r.rps_min, r.rps_max, r.p50_ms, r.p99_ms, r.requests, r.errors
        );
    }
    let get = |s: &str, m: &str| {
        results
            .iter()
            .find(|r| r.system == s && r.mode == m)
            .map(|r| (r.rps, r.p99_ms))
    };
    for xdp in XDP_SYSTEMS {
        if let (Some(x), Some(d), Some(h)) = (
            get(xdp, "newconn"),
            get("direct", "newconn"),
            get("haproxy", "newconn"),
        ) {
            println!(
                "newconn: {xdp} / direct = {:.2}x (target >= 0.95), {xdp} / haproxy = {:.2}x (target >= 1.5)",
                x.0 / d.0.max(1e-12),
                x.0 / h.0.max(1e-12)
            );
        }
        for m in MODES {
            if let (Some(x), Some(n)) = (get(xdp, m), get("nftables", m)) {
                println!(
                    "{m}: p99 {xdp} {:.3} ms vs nftables {:.3} ms (target: no worse)",
                    x.1, n.1
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_reduced_to_medians_and_sums() {
        let r = |system, rps, p99, requests| HttpResult {
            system,
            mode: "newconn",
            rps,
            rps_min: rps,
            rps_max: rps,
            p50_ms: 1.0,
            p99_ms: p99,
            requests,
            errors: 1,
        };
        let m = median_over_rounds(&[
            r("xdp", 100.0, 9.0, 10),
            r("direct", 50.0, 1.0, 5),
            r("xdp", 300.0, 1.0, 30),
            r("xdp", 200.0, 5.0, 20),
        ]);
        assert_eq!(m.len(), 2);
        let (d, x) = (&m[0], &m[1]);
        assert_eq!((d.system, d.rps, d.requests), ("direct", 50.0, 5));
        assert_eq!((x.system, x.rps, x.p99_ms), ("xdp", 200.0, 5.0));
        assert_eq!((x.rps_min, x.rps_max), (100.0, 300.0));
        assert_eq!((x.requests, x.errors), (60, 3));
    }

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 5s test @ http://203.0.113.10:80/health
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  400.00us   9.10ms   80.00%
    Req/Sec     6.50k   300.00     7.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.30ms
     90%    2.00ms
     99%    1.10s
  32500 requests in 5.00s, 3.10MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   6499.50
Transfer/sec:    634.00KB
";
        let w = parse_wrk(out).unwrap();
        assert_eq!(
            w,
            WrkOutput {
                rps: 6499.5,
                p50_ms: 0.85,
                p99_ms: 1100.0,
                requests: 32500,
                errors: 10,
            }
        );
    }
}
