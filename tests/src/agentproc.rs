//! The real agent as a process in the edge namespace of a [`Topology`]:
//! its config for the topology, and a guard that starts it, waits until it
//! serves, and stops it (SIGTERM, then wait) on drop. Its log goes to a
//! file in a scratch directory and is printed when a test panics.
//!
//! The agent is started with `nsenter --net=...` (not `ip netns exec`,
//! whose private mount namespace would give it a private bpffs: its pins
//! would vanish with it, and a restarted agent would find nothing).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use failover_agent::{
    audit::DecisionRecord,
    config::{Config, OnBackendDown, PanicMode},
};

use crate::configs;
use crate::topology::{BACKEND_PORT, Family, Topology, VIP6, sibling_bin};

/// Port of the EU-only service on the VIP, and of its backends.
pub const EU_PORT: u16 = 8443;
pub const EU_BACKEND_PORT: u16 = 8001;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Probe timing: fast enough for sub-second failover, slow enough to be
/// realistic for a production edge (10 probes/s per backend).
#[derive(Clone, Copy, Debug)]
pub struct ProbeTiming {
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
    /// `hold_down` in ms; `None` keeps the agent's default. The failover
    /// benchmark fails the same backend trial after trial, and measures
    /// each failover, not the damping of the ones before.
    pub hold_down_ms: Option<u32>,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        Self {
            interval_ms: 100,
            timeout_ms: 200,
            rise: 2,
            fall: 2,
            hold_down_ms: None,
        }
    }
}

/// The agent config for the topology, over IPv4 ([`config_for`]).
pub fn config(pin: &Path, t: ProbeTiming) -> Config {
    config_for(pin, t, &[Family::V4])
}

/// The agent config for the topology's `families` (IPv4, IPv6, or both:
/// then each service is dual-stack, `vip` and `vip6`, over the backends of
/// both families, named as [`Family::name`] has them):
/// - `chat` (VIP:80): a1, a2 in cloud-a (EU, tier 0), b1, b2 in cloud-b
///   (US, tier 1). Overprovisioning 2.0: one healthy tier-0 backend of two
///   keeps all the traffic in cloud-a; cloud-b takes over when both fail.
/// - `eu-only` (VIP:8443): a1-eu (EU) and b1-us (US) on port 8001; only EU
///   is allowed, and with no EU backend healthy it fails closed.
///
/// The node attaches to the edge's three legs in the default XDP mode
/// (`auto`: generic on these veths).
pub fn config_for(pin: &Path, t: ProbeTiming, families: &[Family]) -> Config {
    let mut probe = serde_json::json!({
        "kind": "http", "path": "/health", "expect_status": 200,
        "interval": format!("{}ms", t.interval_ms),
        "timeout": format!("{}ms", t.timeout_ms),
        "rise": t.rise, "fall": t.fall,
    });
    if let Some(ms) = t.hold_down_ms {
        probe["hold_down"] = format!("{ms}ms").into();
    }
    let probe = configs::probe(probe);
    let snat: Vec<IpAddr> = families.iter().map(|f| f.snat()).collect();
    let mut node = configs::dual_node(&["ec", "ea", "eb"], &snat, (10_000, 32_767), pin);
    node.hash_seed = 0x5eed;
    let names = |pool: &[(&str, bool, usize, u16)]| -> Vec<String> {
        families
            .iter()
            .flat_map(|f| pool.iter().map(|b| f.name(b.0)))
            .collect()
    };
    let service = |name: &str, port: u16, pool: &[(&str, bool, usize, u16)]| {
        let names = names(pool);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = configs::service(name, families[0].vip(), port, &names, probe.clone());
        if families.len() > 1 {
            s.vip6 = Some(VIP6);
        }
        s
    };
    let mut chat = service("chat", 80, &BACKENDS);
    chat.policy.overprovisioning = 2.0;
    let mut eu = service("eu-only", EU_PORT, &EU_BACKENDS);
    eu.policy.allowed_jurisdictions = vec!["EU".into()];
    for s in [&mut chat, &mut eu] {
        s.policy.panic = PanicMode::FailClosed;
        s.policy.on_backend_down = OnBackendDown::Reset;
    }
    const A: (&str, &str, &str) = ("cloud-a", "eu-west-1", "EU");
    const B: (&str, &str, &str) = ("cloud-b", "us-east-1", "US");
    let backends = families
        .iter()
        .flat_map(|&f| {
            BACKENDS
                .iter()
                .chain(&EU_BACKENDS)
                .map(move |&(name, in_b, i, port)| {
                    let mut b = configs::located(
                        &f.name(name),
                        f.backend_addr(in_b, i),
                        port,
                        if in_b { B } else { A },
                    );
                    // cloud-b's chat backends are the second tier.
                    b.tier = u8::from(in_b && port == BACKEND_PORT);
                    b
                })
        })
        .collect();
    Config {
        node,
        services: vec![chat, eu],
        backends,
    }
}

/// [`config_for`] as the YAML the agent reads.
pub fn config_yaml(pin: &Path, t: ProbeTiming, families: &[Family]) -> String {
    configs::to_yaml(&config_for(pin, t, families))
}

/// A scratch directory (config, audit log, agent log); removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(format!(
            "failover-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent process. Stops it with SIGTERM on drop (the data plane stays
/// pinned: the topology's `Pins` guard removes it), and prints its log if
/// the thread is panicking.
pub struct AgentProc {
    child: Option<Child>,
    pub edge_ns: String,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub log: PathBuf,
    pub startup_hold_s: u64,
    /// Prints the log on drop even without a panic.
    pub print_log: bool,
}

impl AgentProc {
    /// Starts the agent with the config for `topo` and `families` put in
    /// place by `place` (given `dir` and the config text; returns the path
    /// for `--config`), e.g. behind symlinks as a Kubernetes ConfigMap
    /// volume has it.
    pub fn start_with(
        topo: &Topology,
        dir: &Path,
        timing: ProbeTiming,
        families: &[Family],
        place: impl FnOnce(&Path, &str) -> Result<PathBuf>,
    ) -> Result<Self> {
        let config = place(dir, &config_yaml(&topo.pins.0, timing, families))?;
        let mut me = Self::unspawned(&topo.edge.name, dir, config);
        me.spawn()?;
        Ok(me)
    }

    /// Writes `yaml` as the config into `dir` and starts the agent in
    /// namespace `edge_ns`: for topologies other than [`Topology`] (e.g.
    /// `twoedge`, one agent per edge).
    pub fn start_with_config(edge_ns: &str, dir: &Path, yaml: &str) -> Result<Self> {
        let mut me = Self::configured(edge_ns, dir, yaml)?;
        me.spawn()?;
        Ok(me)
    }

    /// Like [`start_with_config`](Self::start_with_config), but not started
    /// yet: set the public fields, then [`spawn`](Self::spawn).
    pub fn configured(edge_ns: &str, dir: &Path, yaml: &str) -> Result<Self> {
        Ok(Self::unspawned(edge_ns, dir, write_config(dir, yaml)?))
    }

    fn unspawned(edge_ns: &str, dir: &Path, config: PathBuf) -> Self {
        Self {
            child: None,
            edge_ns: edge_ns.to_owned(),
            config,
            audit: dir.join("audit.jsonl"),
            log: dir.join("agent.log"),
            startup_hold_s: 10,
            print_log: false,
        }
    }

    /// The running process's id (for leftover checks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts) the process; its log is appended to.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("agent already running");
        }
        let bin = sibling_bin("failover-agent")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.edge_ns))
            .arg(bin)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--audit")
            .arg(&self.audit)
            .args(["--startup-hold", &self.startup_hold_s.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn failover-agent via nsenter")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM and wait (bounded: SIGKILL after 5 s).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if !terminate(&mut child)? {
            bail!("agent did not stop within 5 s of SIGTERM")
        }
        Ok(())
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(st) = c.try_wait()?
        {
            bail!("agent exited ({st}):\n{}", self.log_text());
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every decision in the audit log so far.
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        read_decisions(&self.audit)
    }

    /// Waits until the last decision for `service` sends traffic to exactly
    /// `backends`. Returns that decision.
    pub fn wait_serving(
        &mut self,
        service: &str,
        backends: &[&str],
        timeout: Duration,
    ) -> Result<DecisionRecord> {
        let want: BTreeSet<&str> = backends.iter().copied().collect();
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = self
                .decisions()
                .into_iter()
                .rev()
                .find(|d| d.service == service);
            if let Some(d) = &last
                && d.to.iter().map(String::as_str).collect::<BTreeSet<_>>() == want
            {
                return Ok(last.expect("some"));
            }
            if Instant::now() > deadline {
                bail!(
                    "{service} not serving {backends:?} after {timeout:?}; last decision: {last:?}\nagent log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGTERM to `child`, then waits up to 5 s before a SIGKILL. True when it
/// stopped on the SIGTERM (the agent's graceful path).
pub fn terminate(child: &mut Child) -> Result<bool> {
    // SAFETY: kill has no memory preconditions; the pid is our child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(false)
}

/// The default config placement: a plain file, `dir/agent.yaml`.
pub fn write_config(dir: &Path, yaml: &str) -> Result<PathBuf> {
    let config = dir.join("agent.yaml");
    std::fs::write(&config, yaml)?;
    Ok(config)
}

/// Parses an audit log (records only; the chain fields are ignored).
pub fn read_decisions(path: &Path) -> Vec<DecisionRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.stop();
        if std::thread::panicking() || self.print_log {
            eprintln!(
                "---- agent log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// One HTTP/1.1 request to a backend's admin API from inside namespace
/// `ns` (`GET` without a body, `POST` with a JSON body). Returns the body.
/// A crashing backend may close without answering: that is an error here.
pub fn admin(
    ns: &crate::netns::Netns,
    addr: std::net::SocketAddr,
    path: &str,
    json: Option<&str>,
) -> Result<String> {
    use std::io::{Read, Write};
    let _in = ns.enter()?;
    let t = Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    match json {
        None => write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )?,
        Some(b) => write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )?,
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text))
}

/// A backend's `/admin/stats`.
pub fn backend_stats(
    ns: &crate::netns::Netns,
    addr: std::net::SocketAddr,
) -> Result<crate::backend::StatsSnapshot> {
    let body = admin(ns, addr, "/admin/stats", None)?;
    serde_json::from_str(&body).with_context(|| format!("stats body {body:?}"))
}

/// The whole product on the topology: four backends (a1, a2 in cloud-a;
/// b1, b2 in cloud-b), the pass program on the peers, and the agent.
/// Drop order: the agent, the peers' data plane handle, the scratch
/// directory, then the topology (backends, pins, namespaces).
pub struct World {
    pub agent: AgentProc,
    pub dp: failover_agent::dataplane::Dataplane,
    pub scratch: Scratch,
    pub topo: Topology,
}

/// Backend base name (see [`Family::name`]), in cloud-b, index in its
/// cloud ([`Family::backend_addr`]), port.
pub const BACKENDS: [(&str, bool, usize, u16); 4] = [
    ("a1", false, 0, BACKEND_PORT),
    ("a2", false, 1, BACKEND_PORT),
    ("b1", true, 0, BACKEND_PORT),
    ("b2", true, 1, BACKEND_PORT),
];
pub const EU_BACKENDS: [(&str, bool, usize, u16); 2] = [
    ("a1-eu", false, 0, EU_BACKEND_PORT),
    ("b1-us", true, 0, EU_BACKEND_PORT),
];

/// A backend of the topology: its name, whether in cloud-b, and where it
/// listens.
#[derive(Clone, Debug)]
pub struct BackendAt {
    pub name: String,
    pub in_cloud_b: bool,
    pub addr: SocketAddr,
}

/// The backends of `families` (with the EU-only service's when `with_eu`).
pub fn backends_of(families: &[Family], with_eu: bool) -> Vec<BackendAt> {
    let extra: &[_] = if with_eu { &EU_BACKENDS } else { &[] };
    families
        .iter()
        .flat_map(|&f| {
            BACKENDS
                .iter()
                .chain(extra)
                .map(move |&(name, in_cloud_b, i, port)| BackendAt {
                    name: f.name(name),
                    in_cloud_b,
                    addr: (f.backend_addr(in_cloud_b, i), port).into(),
                })
        })
        .collect()
}

impl World {
    /// Everything up over IPv4, and `chat` served by a1 and a2.
    pub fn start(with_eu: bool, timing: ProbeTiming) -> Result<Self> {
        Self::start_with(with_eu, timing, write_config)
    }

    /// As [`World::start`], with the config put in place by `place` (see
    /// [`AgentProc::start_with`]) in the scratch directory.
    pub fn start_with(
        with_eu: bool,
        timing: ProbeTiming,
        place: impl FnOnce(&Path, &str) -> Result<PathBuf>,
    ) -> Result<Self> {
        Self::start_in(&[Family::V4], with_eu, timing, place)
    }

    /// Everything up for `families` (both: dual-stack services), and
    /// `chat` served by cloud-a's backends of every family.
    pub fn start_in(
        families: &[Family],
        with_eu: bool,
        timing: ProbeTiming,
        place: impl FnOnce(&Path, &str) -> Result<PathBuf>,
    ) -> Result<Self> {
        let topo = Self::backends_in(families, with_eu)?;
        let dp = topo.open_dataplane()?;
        let scratch = Scratch::new("e2e")?;
        let mut agent = AgentProc::start_with(&topo, &scratch.0, timing, families, place)?;
        let home: Vec<String> = families
            .iter()
            .flat_map(|f| [f.name("a1"), f.name("a2")])
            .collect();
        let home: Vec<&str> = home.iter().map(String::as_str).collect();
        agent.wait_serving("chat", &home, Duration::from_secs(20))?;
        Ok(Self {
            agent,
            dp,
            scratch,
            topo,
        })
    }

    /// The topology with its IPv4 backends started, and nothing on the
    /// edge.
    pub fn backends(with_eu: bool) -> Result<Topology> {
        Self::backends_in(&[Family::V4], with_eu)
    }

    /// The topology with the backends of `families` started.
    pub fn backends_in(families: &[Family], with_eu: bool) -> Result<Topology> {
        let mut topo = Topology::new()?;
        for b in backends_of(families, with_eu) {
            topo.start_backend_on(&b.name, b.in_cloud_b, b.addr.ip(), b.addr.port())?;
        }
        Ok(topo)
    }

    /// Where backend `name` (of either family) listens, and the namespace
    /// to reach it from.
    pub fn backend<'a>(topo: &'a Topology, name: &str) -> (SocketAddr, &'a crate::netns::Netns) {
        let b = backends_of(&[Family::V4, Family::V6], true)
            .into_iter()
            .find(|b| b.name == name)
            .expect("known backend");
        let ns = if b.in_cloud_b {
            &topo.cloud_b
        } else {
            &topo.cloud_a
        };
        (b.addr, ns)
    }

    /// Client requests (not probes) backend `name` has answered.
    pub fn served(&self, name: &str) -> Result<u64> {
        let (addr, ns) = Self::backend(&self.topo, name);
        let s = backend_stats(ns, addr)?;
        Ok(s.requests - s.health)
    }

    /// Makes backend `name`'s process exit.
    pub fn crash(topo: &Topology, name: &str) -> Result<()> {
        let (addr, ns) = Self::backend(topo, name);
        // The process exits while answering: no reply is expected.
        let _ = admin(ns, addr, "/admin/fault", Some(r#"{"fault":"crash"}"#));
        Ok(())
    }

    /// Cloud-a's link goes dark: nothing in or out.
    pub fn blackhole_a(topo: &Topology) -> Result<()> {
        topo.cloud_a.exec("ip link set a0 down").map(drop)
    }

    /// Cloud-a's link back (its default routes left with the link; its
    /// IPv6 addresses stay, `keep_addr_on_down`).
    pub fn restore_a(topo: &Topology) -> Result<()> {
        topo.cloud_a
            .exec(
                "ip link set a0 up && ip route replace default via 198.51.100.1 && \
                 ip -6 route replace default via 2001:db8:a::1",
            )
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The topology's config over IPv4, over IPv6 and dual-stack: the
    /// agent takes each, with a SNAT address and backends per family and
    /// `vip6` only when both families are there.
    #[test]
    fn the_topology_config_validates_per_family_and_dual_stack() {
        use Family::{V4, V6};
        for families in [&[V4][..], &[V6], &[V4, V6]] {
            let cfg = config_for(Path::new("/x"), ProbeTiming::default(), families);
            let cfg = configs::checked(&cfg);
            assert_eq!(cfg.node.snat_addresses.len(), families.len());
            assert_eq!(cfg.backends.len(), 6 * families.len());
            let chat = &cfg.services[0];
            assert_eq!(chat.vip, families[0].vip());
            assert_eq!(chat.vip6.is_some(), families.len() == 2);
            for f in families {
                let b1 = f.name("b1");
                let b1 = cfg.backends.iter().find(|b| b.name == b1).unwrap();
                assert_eq!((b1.address, b1.tier), (f.backend_addr(true, 0), 1));
            }
        }
    }
}
