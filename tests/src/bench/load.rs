//! `cargo xtask bench load` (issue 20): time to first token under load,
//! with static equal weights, with load-aware weights, and with HAProxy
//! `leastconn` on the same backends, in the same run; and how fast a
//! wedged backend stops getting new flows.
//!
//! Method: three test backends with the queue model (a1 and a2 at
//! [`FAST_RATE`] requests a second, b1 at half that), each with
//! [`MAX_RUNNING`] slots. A client in the client namespace sends a
//! streaming chat request at a fixed interval, open loop, each on a new
//! connection (the balancer pins flows: weights only steer new ones), at
//! [`LOAD`] of the three backends' total capacity. Time to first token
//! (TTFT) is from the request's start (its connect included, so that
//! HAProxy's and the XDP path's connection set-up count alike) to the
//! first byte of the first SSE `data:` line. A request fails when it gets
//! no 200, no `data: [DONE]`, or does not end within [`TIMEOUT`].
//!
//! The agent's modes differ only in the probe's `load` facet. Both probe
//! with the inference probe every 500 ms with a 10 s timeout, so that a
//! queue, however long, never fails the probe: with static weights the
//! slow backend keeps its equal share, and only the load facet moves it.
//!
//! Each mode gets a fresh topology (namespaces, backends with empty
//! queues, data plane); everything is dropped before the next.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use failover_agent::config::Config;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    agentproc::{AgentProc, Scratch, admin, backend_stats},
    backend::DEFAULT_MODEL,
    bench::failover::{pct, round1},
    configs,
    pacer::{Pacer, Request},
    peers::{Checks, Haproxy, HaproxySpec},
    topology::{BACKEND_PORT, CLOUD_A, CLOUD_B, SNAT, Topology, VIP},
    traffic::Sample,
};

pub const MODES: [&str; 5] = [
    "static",
    "static_capacity",
    "load_aware",
    "haproxy_leastconn",
    "wedge",
];
/// The JSON fields, in the results page's column order.
pub const COLUMNS: [&str; 8] = [
    "mode",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "failed",
    "requests",
    "seconds_to_no_new_flows",
    "stuck_requests",
    "error",
];
/// Service rate of a1 and a2, requests a second; b1 has half.
pub const FAST_RATE: f64 = 50.0;
/// Slots per backend: a request holds one for `MAX_RUNNING / rate` (80 ms
/// on a1 and a2, 160 ms on b1) before its first token.
pub const MAX_RUNNING: usize = 4;
/// Offered load as a share of the capacity (of all three backends; in the
/// wedge row, of the two left once one is wedged).
pub const LOAD: f64 = 0.8;
/// Tokens per streamed answer (20 ms apart: the test backend's interval).
const MAX_TOKENS: u32 = 4;
/// A request not done within this has failed.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Wedge row: load before the fault.
const WEDGE_WARMUP: Duration = Duration::from_secs(2);
/// Wedge row: a request without its first token this long after its
/// start is stuck (healthy ones take ~100 ms); shorter than [`TIMEOUT`]
/// so that the run ends soon after the load.
const WEDGE_TIMEOUT: Duration = Duration::from_secs(3);
/// The wedge row's backend has "no new flows" only when none came in
/// this last stretch before the client stopped.
const QUIET: Duration = Duration::from_secs(1);

/// Name, in cloud-b, address, service rate.
const BACKENDS: [(&str, bool, Ipv4Addr, f64); 3] = [
    ("a1", false, CLOUD_A[0], FAST_RATE),
    ("a2", false, CLOUD_A[1], FAST_RATE),
    ("b1", true, CLOUD_B[0], FAST_RATE / 2.0),
];
/// Equal weights (the config's default).
const EQUAL: [u32; 3] = [100; 3];
/// The backend wedged in the wedge row. In cloud-b, flows through the
/// data plane come from the SNAT address and the agent's probes from the
/// edge's cloud-b address, so the backend's per-peer counts tell them
/// apart.
const WEDGED: &str = "b1";

#[derive(Clone, Copy, Debug)]
pub struct Opts {
    /// Seconds of load per TTFT mode.
    pub seconds: f64,
    /// Seconds of load after the wedge.
    pub wedge_seconds: f64,
    /// Print each TTFT mode's second-by-second p99 and shares (to stderr).
    pub trace: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            seconds: 15.0,
            wedge_seconds: 5.0,
            trace: false,
        }
    }
}

/// A TTFT mode's figures (its JSON object, less `shares`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ttft {
    pub mode: String,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub failed: usize,
    pub requests: usize,
    /// Requests answered, by backend (the table only).
    #[serde(skip)]
    pub shares: BTreeMap<String, usize>,
}

/// The wedge row (its JSON object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Wedge {
    /// Always `wedge`.
    pub mode: &'static str,
    /// From the fault to the last new flow the wedged backend got; `None`
    /// when flows still came in the last [`QUIET`].
    pub seconds_to_no_new_flows: Option<f64>,
    /// Requests started after the fault that never got a first token.
    pub stuck_requests: usize,
    /// Requests started after the fault.
    pub requests: usize,
}

/// One line of the output; as JSON, the fields of the variant's value.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Row {
    Ttft(Ttft),
    Wedge(Wedge),
    /// The mode could not run (e.g. the agent refused its config).
    Error {
        mode: String,
        error: String,
    },
}

/// Runs `modes` in order; a mode that fails is reported as an error row
/// and the others still run.
pub fn run(opts: Opts, modes: &[String]) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for mode in modes {
        if !MODES.contains(&mode.as_str()) {
            bail!("unknown mode {mode:?} ({})", MODES.join(", "));
        }
        eprintln!("load bench: {mode}");
        let row = match mode.as_str() {
            "wedge" => wedge(opts),
            _ => ttft(mode, opts),
        };
        out.push(row.unwrap_or_else(|e| {
            eprintln!("load bench: {mode} failed: {e:#}");
            Row::Error {
                mode: mode.clone(),
                error: short(&format!("{e:#}")),
            }
        }));
    }
    Ok(out)
}

/// The first line of an error and the log lines that say what went
/// wrong, not the whole agent log.
fn short(e: &str) -> String {
    let mut lines = e.lines();
    let mut out: Vec<&str> = lines.next().into_iter().collect();
    out.extend(
        lines
            .filter(|l| {
                ["ERROR", "error", "unknown field", "refus"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .take(3),
    );
    out.join(" | ")
}

/// What serves the VIP in a mode. Drop order: agent or HAProxy, scratch
/// directory, then the topology (backends, pins, namespaces).
struct Lab {
    agent: Option<AgentProc>,
    _haproxy: Option<Haproxy>,
    _scratch: Scratch,
    topo: Topology,
}

impl Lab {
    /// The topology with the three backends, at `rates`.
    fn backends(rates: [f64; 3]) -> Result<(Topology, Scratch)> {
        let mut topo = Topology::new()?;
        for ((name, in_b, addr, _), rate) in BACKENDS.iter().zip(rates) {
            let args = [
                "--service-rate".to_string(),
                rate.to_string(),
                "--max-running".to_string(),
                MAX_RUNNING.to_string(),
            ];
            topo.start_backend_with(name, *in_b, *addr, BACKEND_PORT, &args)?;
        }
        Ok((topo, Scratch::new("bench-load")?))
    }

    /// The real agent with `yaml`, serving all three backends.
    fn agent(rates: [f64; 3], yaml: impl FnOnce(&Path) -> Result<String>) -> Result<Self> {
        let (topo, scratch) = Self::backends(rates)?;
        let yaml = yaml(&topo.pins.0)?;
        let mut agent = AgentProc::start_with_config(&topo.edge.name, &scratch.0, &yaml)?;
        agent
            .wait_serving("chat", &names(), Duration::from_secs(20))
            .context("the agent did not serve the three backends")?;
        Ok(Self {
            agent: Some(agent),
            _haproxy: None,
            _scratch: scratch,
            topo,
        })
    }

    /// HAProxy `leastconn` in the edge, TCP mode, HTTP health checks.
    fn haproxy(rates: [f64; 3]) -> Result<Self> {
        let (topo, scratch) = Self::backends(rates)?;
        topo.edge.exec(&format!("ip addr add {VIP}/32 dev lo"))?;
        let spec = HaproxySpec {
            listen: vip(),
            backends: BACKENDS
                .iter()
                .map(|(n, _, a, _)| (n.to_string(), SocketAddr::from((*a, BACKEND_PORT))))
                .collect(),
            source: Some(SNAT),
            checks: Checks::default(),
            http_check: Some("/health".into()),
            timeout_connect_ms: 2000,
            balance: "leastconn",
        };
        let haproxy = Haproxy::start(&topo.edge, &spec, Some(&topo.client))?;
        wait_all_answer(&topo)?;
        Ok(Self {
            agent: None,
            _haproxy: Some(haproxy),
            _scratch: scratch,
            topo,
        })
    }
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn names() -> Vec<&'static str> {
    BACKENDS.iter().map(|b| b.0).collect()
}

/// Until each backend has answered through the VIP (HAProxy starts its
/// servers before their first checks).
fn wait_all_answer(topo: &Topology) -> Result<()> {
    let _in = topo.client.enter()?;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(a) = crate::client::get(vip(), "/v1/models", Duration::from_millis(500))
            && a.status == 200
        {
            seen.insert(a.backend);
        }
        if seen.len() == BACKENDS.len() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("only {seen:?} answered through the VIP")
}

/// The agent's config: one service `chat` on VIP:80 over the three
/// backends (one tier) with `weights`, with `probe`; `load` is the
/// probe's load facet, if any.
fn agent_yaml(pin: &Path, probe: Value, load: Option<Value>, weights: [u32; 3]) -> Result<String> {
    let node = configs::node(&["ec", "ea", "eb"], SNAT, (10_000, 32_767), pin);
    let mut probe = configs::probe(probe);
    probe.load = load.map(serde_json::from_value).transpose()?;
    let chat = configs::service("chat", VIP, 80, &names(), probe);
    let cfg = Config {
        node,
        services: vec![chat],
        backends: BACKENDS
            .iter()
            .zip(weights)
            .map(|((n, _, a, _), w)| {
                let mut b = configs::backend(n, *a, BACKEND_PORT);
                b.weight = w;
                b
            })
            .collect(),
    };
    Ok(configs::to_yaml(&cfg))
}

/// The inference probe of the TTFT modes (see the module's doc).
fn load_probe() -> Value {
    json!({
        "kind": "inference", "model": DEFAULT_MODEL,
        "interval": "500ms", "timeout": "10s",
    })
}

/// The vLLM profile, as issue 20 proposes it.
fn load_facet() -> Value {
    json!({
        "profile": "vllm", "path": "/metrics", "interval": "250ms",
        "min_change": 0.1, "rebuild_interval": "500ms",
    })
}

/// The interval between requests for `LOAD` of `capacity` requests a second.
fn pace(capacity: f64) -> Duration {
    Duration::from_secs_f64(1.0 / (LOAD * capacity))
}

fn chat_request() -> Request {
    Request::Chat {
        model: DEFAULT_MODEL.into(),
        max_tokens: MAX_TOKENS,
    }
}

fn ttft(mode: &str, opts: Opts) -> Result<Row> {
    let rates = BACKENDS.map(|b| b.3);
    let mut lab = match mode {
        "static" => Lab::agent(rates, |pin| agent_yaml(pin, load_probe(), None, EQUAL))?,
        // The best any weights can do: each backend's share of new flows
        // its share of the capacity, known in advance. What is left between
        // this and `leastconn` is the hash's spread, not the weights.
        "static_capacity" => Lab::agent(rates, |pin| {
            agent_yaml(pin, load_probe(), None, rates.map(|r| r as u32))
        })?,
        "load_aware" => Lab::agent(rates, |pin| {
            agent_yaml(pin, load_probe(), Some(load_facet()), EQUAL)
        })?,
        "haproxy_leastconn" => Lab::haproxy(rates)?,
        other => bail!("not a TTFT mode: {other}"),
    };
    let p = Pacer::start_request(
        &lab.topo.client.name,
        vip(),
        chat_request(),
        pace(rates.iter().sum()),
        TIMEOUT,
        Duration::from_secs_f64(opts.seconds),
    );
    std::thread::sleep(Duration::from_secs_f64(opts.seconds));
    let samples = p.stop();
    if let Some(a) = lab.agent.as_mut() {
        // A mode whose agent died mid-run measured something else.
        a.check_alive().context("during the run")?;
    }
    if opts.trace {
        print_trace(&samples);
    }
    Ok(summarize(mode, &samples))
}

fn summarize(mode: &str, samples: &[Sample]) -> Row {
    let mut ttfts: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.ttft)
        .map(|t| t.as_secs_f64() * 1e3)
        .collect();
    ttfts.sort_by(f64::total_cmp);
    let mut shares = BTreeMap::new();
    for s in samples.iter().filter(|s| !s.backend.is_empty()) {
        *shares.entry(s.backend.clone()).or_default() += 1;
    }
    Row::Ttft(Ttft {
        mode: mode.into(),
        ttft_p50_ms: round1(pct(&ttfts, 0.50)),
        ttft_p99_ms: round1(pct(&ttfts, 0.99)),
        failed: samples.iter().filter(|s| !s.ok).count(),
        requests: samples.len(),
        shares,
    })
}

/// Per second of start time: requests, their p99 TTFT, and who answered
/// (how fast the weights settle, and what the p99 is made of).
fn print_trace(samples: &[Sample]) {
    let mut by_second: BTreeMap<u64, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_second.entry(s.at.as_secs()).or_default().push(s);
    }
    for (second, ss) in by_second {
        let mut ttfts: Vec<f64> = ss
            .iter()
            .filter_map(|s| s.ttft)
            .map(|t| t.as_secs_f64() * 1e3)
            .collect();
        ttfts.sort_by(f64::total_cmp);
        let mut shares: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &ss {
            *shares.entry(s.backend.as_str()).or_default() += 1;
        }
        let by: Vec<String> = shares.iter().map(|(b, n)| format!("{b} {n}")).collect();
        eprintln!(
            "  {second:>3} s: {:>4} requests, ttft p99 {:>8.1} ms, {}",
            ss.len(),
            pct(&ttfts, 0.99),
            by.join(", ")
        );
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Three equal backends under the agent with the inference probe's
/// defaults; b1 is wedged under load.
fn wedge(opts: Opts) -> Result<Row> {
    let rates = [FAST_RATE; 3];
    let probe = json!({ "kind": "inference", "model": DEFAULT_MODEL });
    let lab = Lab::agent(rates, |pin| agent_yaml(pin, probe, None, EQUAL))?;
    let (_, in_b, addr, _) = BACKENDS
        .iter()
        .find(|b| b.0 == WEDGED)
        .context("wedged backend")?;
    let ns = if *in_b {
        &lab.topo.cloud_b
    } else {
        &lab.topo.cloud_a
    };
    let target = SocketAddr::from((*addr, BACKEND_PORT));
    // The two backends left take LOAD of their capacity once b1 is out.
    let p = Pacer::start_request(
        &lab.topo.client.name,
        vip(),
        chat_request(),
        pace(2.0 * FAST_RATE),
        WEDGE_TIMEOUT,
        WEDGE_WARMUP + Duration::from_secs_f64(opts.wedge_seconds) + Duration::from_secs(1),
    );
    std::thread::sleep(WEDGE_WARMUP);
    admin(ns, target, "/admin/fault", Some(r#"{"fault":"wedge"}"#))?;
    // Stamped once the fault is in place (the admin call returned).
    let (fault, fault_ms) = (p.now(), unix_ms());
    std::thread::sleep(Duration::from_secs_f64(opts.wedge_seconds));
    let end_ms = unix_ms();
    let samples = p.stop();
    let stats = backend_stats(ns, target)?;
    let flows = stats.peers.get(&IpAddr::V4(SNAT)).copied();
    eprintln!(
        "  {WEDGED}: connections by peer {:?} (SNAT {SNAT} = flows through the data plane)",
        stats.peers
    );
    let Some(flows) = flows else {
        bail!("{WEDGED} never got a flow through the data plane");
    };
    let quiet_ms = u64::try_from(QUIET.as_millis()).unwrap_or(u64::MAX);
    let seconds_to_no_new_flows = (flows.last_unix_ms + quiet_ms <= end_ms)
        .then(|| flows.last_unix_ms.saturating_sub(fault_ms) as f64 / 1e3);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= fault).collect();
    Ok(Row::Wedge(Wedge {
        mode: "wedge",
        seconds_to_no_new_flows: seconds_to_no_new_flows.map(|s| (s * 1e3).round() / 1e3),
        stuck_requests: after.iter().filter(|s| s.ttft.is_none()).count(),
        requests: after.len(),
    }))
}

pub fn print(rows: &[Row], json: bool) {
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return;
    }
    println!(
        "{:<18} {:>12} {:>12} {:>7} {:>9}  answered by",
        "mode", "ttft_p50_ms", "ttft_p99_ms", "failed", "requests"
    );
    for r in rows {
        match r {
            Row::Ttft(t) => {
                let by: Vec<String> = t.shares.iter().map(|(b, n)| format!("{b} {n}")).collect();
                println!(
                    "{:<18} {:>12.1} {:>12.1} {:>7} {:>9}  {}",
                    t.mode,
                    t.ttft_p50_ms,
                    t.ttft_p99_ms,
                    t.failed,
                    t.requests,
                    by.join(", ")
                );
            }
            Row::Wedge(w) => println!(
                "wedge: {WEDGED} wedged under load; no new flows after {} (target <= 1 s); {} of {} requests sent after the fault stuck",
                w.seconds_to_no_new_flows.map_or_else(
                    || format!("- (flows still came in the last {QUIET:?})"),
                    |s| format!("{s:.3} s")
                ),
                w.stuck_requests,
                w.requests,
            ),
            Row::Error { mode, error } => println!("{mode:<18} error: {error}"),
        }
    }
    println!(
        "backends a1, a2 at {FAST_RATE} req/s, b1 at {} req/s ({MAX_RUNNING} slots each); streaming chat requests at {:.0}% of capacity, a new connection each; ttft from the request's start to the first SSE data byte; failed: no 200, no [DONE], or not done within {TIMEOUT:?}",
        FAST_RATE / 2.0,
        LOAD * 100.0
    );
    let p99 = |mode: &str| {
        rows.iter().find_map(|r| match r {
            Row::Ttft(t) if t.mode == mode => Some(t.ttft_p99_ms),
            _ => None,
        })
    };
    if let Some(l) = p99("load_aware") {
        if let Some(s) = p99("static") {
            println!(
                "load_aware p99 / static p99 = {:.2} (target <= 0.5)",
                l / s.max(1e-9)
            );
        }
        if let Some(h) = p99("haproxy_leastconn") {
            println!(
                "load_aware p99 / haproxy_leastconn p99 = {:.2} (target <= 1)",
                l / h.max(1e-9)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_facet_goes_into_the_probe_of_the_yaml() {
        let yaml = agent_yaml(
            Path::new("/sys/fs/bpf/x"),
            load_probe(),
            Some(load_facet()),
            EQUAL,
        )
        .unwrap();
        let v: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
        let probe = &v["services"][0]["probe"];
        assert_eq!(probe["kind"].as_str(), Some("inference"));
        assert_eq!(probe["load"]["profile"].as_str(), Some("vllm"));
        assert_eq!(probe["load"]["rebuild_interval"].as_str(), Some("500ms"));
        // Without the facet, no load (the agent's type may write `null`).
        let plain = agent_yaml(Path::new("/sys/fs/bpf/x"), load_probe(), None, EQUAL).unwrap();
        let plain: serde_norway::Value = serde_norway::from_str(&plain).unwrap();
        let load = plain["services"][0]["probe"].get("load");
        assert!(load.is_none_or(serde_norway::Value::is_null), "{load:?}");
    }

    #[test]
    fn percentiles_count_only_requests_with_a_first_token() {
        let s = |ms: Option<u64>, ok| Sample {
            at: Duration::ZERO,
            done: Duration::from_millis(1),
            ok,
            backend: if ok { "a1".into() } else { String::new() },
            ttft: ms.map(Duration::from_millis),
        };
        let row = summarize(
            "static",
            &[s(Some(10), true), s(Some(30), true), s(None, false)],
        );
        let Row::Ttft(t) = &row else {
            panic!("{row:?}")
        };
        assert_eq!(
            (t.ttft_p50_ms, t.ttft_p99_ms, t.failed, t.requests),
            (10.0, 30.0, 1, 3)
        );
        assert_eq!(t.shares.get("a1"), Some(&2));
        // The JSON object has the issue's fields, not the table's shares.
        assert_eq!(
            serde_json::to_value(&row).unwrap(),
            json!({"mode": "static", "ttft_p50_ms": 10.0, "ttft_p99_ms": 30.0, "failed": 1, "requests": 3})
        );
    }
}
