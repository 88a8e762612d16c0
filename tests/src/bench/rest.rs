//! The agent at rest: the real agent process probing `backends` healthy
//! backends every `interval`, with nothing changing. Measures its CPU (run
//! time of all its threads, from `/proc/PID/task/*/schedstat`, over a
//! window after every backend is up) and its resident memory, per probe
//! kind, and counts the probes the backends answered in that window so a
//! stalled prober cannot pass for a cheap one.
//!
//! The backends live in this process, on the lab namespace's loopback, on
//! one thread: their CPU is not the agent's.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use failover_agent::config::Config;
use failover_common::state;
use serde::Serialize;

use crate::{
    agentproc::AgentProc,
    backend::{BackendConfig, Fault, Faults, Stats, serve_grpc_health, serve_http_with_stats},
    configs,
    lab::Lab,
    scratch::TempDir,
};

pub const KINDS: [&str; 4] = ["tcp", "http", "grpc", "inference"];

pub struct Opts {
    pub backends: u16,
    pub interval_ms: u64,
    /// Measured window per kind, after every backend is up.
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct RestResult {
    pub kind: String,
    pub backends: u16,
    pub interval_ms: u64,
    /// Share of one core over the window, in percent.
    pub cpu_pct: f64,
    /// Resident set at the end of the window, and its high-water mark.
    pub rss_mib: f64,
    pub rss_peak_mib: f64,
    /// Probes the backends answered per second in the window.
    pub probes_per_s: f64,
    /// The same probes at the same rate from one plain thread with blocking
    /// sockets (see [`floor`]): what any prober pays on this machine. `tcp`
    /// and `http` only.
    pub floor_cpu_pct: Option<f64>,
}

const FIRST_PORT: u16 = 21_000;

/// A result's `--json` keys, in table order: the table header and the
/// results page's columns.
pub const COLUMNS: [&str; 8] = [
    "kind",
    "backends",
    "interval_ms",
    "cpu_pct",
    "rss_mib",
    "rss_peak_mib",
    "probes_per_s",
    "floor_cpu_pct",
];

fn yaml(pin: &Path, sock: &Path, kind: &str, o: &Opts) -> String {
    let mut probe = serde_json::json!({
        "kind": kind, "interval": format!("{}ms", o.interval_ms), "timeout": "1s",
        "rise": 2, "fall": 2,
    });
    match kind {
        "tcp" | "grpc" => {}
        "http" => probe["path"] = "/health".into(),
        "inference" => {
            probe["model"] = crate::backend::DEFAULT_MODEL.into();
            probe["ttft_budget"] = "1s".into();
        }
        _ => unreachable!("kinds are checked by run"),
    }
    let names: Vec<String> = (0..o.backends).map(|i| format!("b{i}")).collect();
    let pool: Vec<&str> = names.iter().map(String::as_str).collect();
    configs::to_yaml(&Config {
        node: crate::lab::node_config(pin, Some(sock)),
        services: vec![configs::service(
            "rest",
            crate::lab::VIP,
            80,
            &pool,
            configs::probe(probe),
        )],
        backends: names
            .iter()
            .enumerate()
            .map(|(i, n)| configs::backend(n, Ipv4Addr::LOCALHOST, FIRST_PORT + i as u16))
            .collect(),
    })
}

/// Probes answered so far, whatever the kind.
#[derive(Clone, Default)]
struct Answered {
    tcp: Arc<AtomicU64>,
    http: Stats,
}

impl Answered {
    fn count(&self, kind: &str) -> Option<u64> {
        match kind {
            "tcp" => Some(self.tcp.load(Ordering::Relaxed)),
            "http" => Some(self.http.snapshot("").health),
            "inference" => Some(self.http.snapshot("").requests),
            // tonic's server keeps no count we can read.
            _ => None,
        }
    }
}

/// Binds every backend's listener in the current (lab) namespace and
/// serves them on one thread until the returned guard drops.
struct Backends {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    answered: Answered,
}

impl Backends {
    fn start(kind: &str, n: u16) -> Result<Self> {
        let mut ls = Vec::new();
        for i in 0..n {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, FIRST_PORT + i))
                .with_context(|| format!("bind backend port {}", FIRST_PORT + i))?;
            l.set_nonblocking(true)?;
            ls.push(l);
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let answered = Answered::default();
        let a = answered.clone();
        let kind = kind.to_string();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
            rt.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for l in ls {
                    let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                    match kind.as_str() {
                        "tcp" => {
                            let n = a.tcp.clone();
                            set.spawn(async move {
                                while let Ok((s, _)) = l.accept().await {
                                    n.fetch_add(1, Ordering::Relaxed);
                                    drop(s);
                                }
                            });
                        }
                        "grpc" => {
                            set.spawn(async move {
                                let _ = serve_grpc_health(l, Faults::new(Fault::default())).await;
                            });
                        }
                        _ => {
                            let stats = a.http.clone();
                            set.spawn(async move {
                                let _ = serve_http_with_stats(
                                    l,
                                    BackendConfig::new("rest"),
                                    Faults::new(Fault::default()),
                                    stats,
                                )
                                .await;
                            });
                        }
                    }
                }
                let _ = stopped.await;
                set.shutdown().await;
            });
        });
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            answered,
        })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run time of every thread of `pid` so far (schedstat's first field, ns).
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let p = t?.path().join("schedstat");
        // A thread that just exited is gone; its time goes with it.
        if let Ok(s) = std::fs::read_to_string(&p) {
            total += run_ns(&s).with_context(|| format!("parse {}", p.display()))?;
        }
    }
    Ok(total)
}

/// A schedstat file's first field: run time so far, in ns.
fn run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// VmRSS and VmHWM of `pid`, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> Result<f64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("{key} in /proc/{pid}/status"))?;
        let v: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("parse {line:?}"))?;
        Ok(v / 1024.0)
    };
    Ok((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// This thread's run time so far (schedstat's first field, ns).
fn thread_cpu_ns() -> Result<u64> {
    run_ns(&std::fs::read_to_string("/proc/thread-self/schedstat")?)
        .context("parse /proc/thread-self/schedstat")
}

/// Reads one HTTP/1.1 response with a Content-Length from `s` into `buf`.
fn read_response(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    use std::io::Read;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        ensure!(n > 0, "backend closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = r.parse(buf)? {
            ensure!(r.code == Some(200), "status {:?}", r.code);
            let len: usize = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .context("no Content-Length")?;
            if buf.len() >= head + len {
                return Ok(());
            }
        }
    }
}

/// The floor under any prober: the agent's probes of `kind` at the agent's
/// rate, from one thread with blocking sockets and nothing else: no
/// runtime, no timers, no metrics, no state machine. Every interval it
/// probes all backends back to back (as the agent's probe tasks, started
/// together, also tick together), then sleeps once. `tcp`: connect, then
/// close with RST. `http`: `GET /health` written on every backend's
/// kept-alive connection, then every answer read. On loopback the prober
/// is also charged for the backend's side of each exchange, as the agent
/// is. Returns the thread's CPU in percent of a core.
fn floor(kind: &str, o: &Opts) -> Result<Option<f64>> {
    if kind != "tcp" && kind != "http" {
        return Ok(None);
    }
    let addrs: Vec<std::net::SocketAddr> = (0..o.backends)
        .map(|i| (Ipv4Addr::LOCALHOST, FIRST_PORT + i).into())
        .collect();
    let interval = Duration::from_millis(o.interval_ms);
    let (kind, seconds) = (kind.to_string(), o.seconds);
    // Spawned from this thread, so in the lab namespace with the backends.
    let t = std::thread::spawn(move || -> Result<f64> {
        use std::io::Write;
        let mut conns = Vec::new();
        if kind == "http" {
            for a in &addrs {
                let s = std::net::TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                conns.push(s);
            }
        }
        let req = b"GET /health HTTP/1.1\r\nHost: backend\r\n\r\n";
        let mut buf = Vec::with_capacity(4096);
        let (c0, t0) = (thread_cpu_ns()?, Instant::now());
        let mut rounds = 0u32;
        while t0.elapsed().as_secs_f64() < seconds {
            if kind == "tcp" {
                for a in &addrs {
                    let s = std::net::TcpStream::connect(a)?;
                    // As the agent's TCP probe: close with RST, no TIME_WAIT.
                    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                }
            } else {
                for s in &mut conns {
                    s.write_all(req)?;
                }
                for s in &mut conns {
                    read_response(s, &mut buf)?;
                }
            }
            rounds += 1;
            if let Some(wait) = (interval * rounds).checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        Ok((thread_cpu_ns()? - c0) as f64 / 1e9 / wall * 100.0)
    });
    let pct = t
        .join()
        .map_err(|_| anyhow::anyhow!("floor thread panicked"))??;
    Ok(Some(pct))
}

fn one(kind: &str, o: &Opts) -> Result<RestResult> {
    let lab = Lab::new()?;
    let dir = TempDir::new();
    let backends = Backends::start(kind, o.backends)?;
    let mut agent = AgentProc::configured(
        &lab.ns.name,
        &dir.0,
        &yaml(lab.pin_dir(), &dir.0.join("api.sock"), kind, o),
    )?;
    agent.startup_hold_s = 0;
    agent.spawn()?;
    // nsenter execs the agent: the child's pid is the agent's.
    let pid = agent.pid().context("agent pid")?;

    // Wait until every backend is UP in the data plane.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        agent.check_alive()?;
        let up = (0..u32::from(o.backends))
            .filter(|&id| lab.dp.backend(id).is_ok_and(|b| b.state == state::UP))
            .count();
        if up == usize::from(o.backends) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{kind}: {up} of {} backends up after 30 s",
            o.backends
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Settle: start-up allocations and the first passive-counter reads.
    std::thread::sleep(Duration::from_secs(2));

    let (c0, p0, t0) = (cpu_ns(pid)?, backends.answered.count(kind), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    let (c1, p1, wall) = (
        cpu_ns(pid)?,
        backends.answered.count(kind),
        t0.elapsed().as_secs_f64(),
    );
    let (rss, peak) = rss_mib(pid)?;
    let probes_per_s = match (p0, p1) {
        (Some(a), Some(b)) => (b - a) as f64 / wall,
        _ => f64::NAN,
    };
    if probes_per_s.is_finite() {
        let expected = f64::from(o.backends) * 1000.0 / o.interval_ms as f64;
        ensure!(
            probes_per_s > 0.8 * expected,
            "{kind}: {probes_per_s:.0} probes/s answered, expected about {expected:.0}"
        );
    }
    drop(agent);
    let floor_cpu_pct = floor(kind, o)?;
    drop(backends);
    Ok(RestResult {
        kind: kind.to_string(),
        backends: o.backends,
        interval_ms: o.interval_ms,
        cpu_pct: (c1 - c0) as f64 / 1e9 / wall * 100.0,
        rss_mib: rss,
        rss_peak_mib: peak,
        probes_per_s,
        floor_cpu_pct,
    })
}

pub fn run(o: &Opts, kinds: &[String]) -> Result<Vec<RestResult>> {
    ensure!(o.backends >= 1 && o.interval_ms >= 1 && o.seconds > 0.0);
    let mut out = Vec::new();
    for k in kinds {
        ensure!(
            KINDS.contains(&k.as_str()),
            "unknown probe kind {k:?}; available: {KINDS:?}"
        );
        out.push(one(k, o)?);
    }
    Ok(out)
}

pub fn print(results: &[RestResult], json: bool) {
    if json {
        for r in results {
            println!(
                "{}",
                serde_json::json!({
                    "kind": r.kind,
                    "backends": r.backends,
                    "interval_ms": r.interval_ms,
                    "cpu_pct": (r.cpu_pct * 100.0).round() / 100.0,
                    "rss_mib": (r.rss_mib * 10.0).round() / 10.0,
                    "rss_peak_mib": (r.rss_peak_mib * 10.0).round() / 10.0,
                    "probes_per_s": if r.probes_per_s.is_finite() {
                        serde_json::json!(r.probes_per_s.round())
                    } else {
                        serde_json::Value::Null
                    },
                    "floor_cpu_pct": r.floor_cpu_pct.map(|f| (f * 100.0).round() / 100.0),
                })
            );
        }
        return;
    }
    let [kind, backends, interval, cpu, rss, peak, probes, floor] = COLUMNS;
    println!(
        "{kind:<10} {backends:>8} {interval:>11} {cpu:>8} {rss:>8} {peak:>13} {probes:>12} {floor:>13}"
    );
    for r in results {
        let probes = if r.probes_per_s.is_finite() {
            format!("{:.0}", r.probes_per_s)
        } else {
            "-".into()
        };
        let floor = r
            .floor_cpu_pct
            .map_or_else(|| "-".into(), |f| format!("{f:.2}"));
        println!(
            "{:<10} {:>8} {:>11} {:>8.2} {:>8.1} {:>13.1} {:>12} {:>13}",
            r.kind, r.backends, r.interval_ms, r.cpu_pct, r.rss_mib, r.rss_peak_mib, probes, floor
        );
    }
}
