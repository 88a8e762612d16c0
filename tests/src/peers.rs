//! The peers users would pick instead of failover, set up on the same
//! topology: the kernel's DNAT+SNAT with conntrack in nftables (what
//! kube-proxy's nftables mode programs) and HAProxy in TCP mode. Both are
//! owned by guards: the nftables table is deleted and the HAProxy process
//! killed on drop, even when a benchmark fails.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{netns::Netns, topology::Proc};

/// The nftables table every rule here lives in.
pub const NFT_TABLE: &str = "failover_peer";

/// One load-balanced service for nftables.
#[derive(Clone, Debug)]
pub struct NatService {
    pub vip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub backends: Vec<SocketAddr>,
}

/// The ruleset, in kube-proxy's nftables-mode shape: a verdict map from
/// (VIP, protocol, port) to a per-service chain, a `numgen random` vmap to
/// one chain per endpoint that DNATs, and SNAT to `snat` in postrouting for
/// every DNATed connection (kube-proxy masquerades; a fixed address is the
/// same work without the address lookup, and matches failover's SNAT).
pub fn nft_ruleset(services: &[NatService], snat: Ipv4Addr) -> String {
    let mut r = format!("table ip {NFT_TABLE} {{\n");
    let mut vmap = Vec::new();
    for (s, svc) in services.iter().enumerate() {
        let mut arms = Vec::new();
        for (e, be) in svc.backends.iter().enumerate() {
            let _ = writeln!(
                r,
                "  chain svc{s}-ep{e} {{\n    meta l4proto {} dnat to {be}\n  }}",
                svc.proto
            );
            arms.push(format!("{e} : goto svc{s}-ep{e}"));
        }
        let _ = writeln!(
            r,
            "  chain svc{s} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            svc.backends.len(),
            arms.join(", ")
        );
        vmap.push(format!(
            "{} . {} . {} : jump svc{s}",
            svc.vip, svc.proto, svc.port
        ));
    }
    let _ = writeln!(
        r,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap {{ {} }}\n  }}",
        vmap.join(", ")
    );
    let _ = writeln!(
        r,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ct status dnat snat to {snat}\n  }}\n}}"
    );
    r
}

/// An nftables table in a namespace; deleted on drop.
pub struct Nft<'a> {
    ns: &'a Netns,
}

impl<'a> Nft<'a> {
    pub fn apply(ns: &'a Netns, services: &[NatService], snat: Ipv4Addr) -> Result<Self> {
        let rules = nft_ruleset(services, snat);
        let file = std::env::temp_dir().join(format!(
            "failover-nft-{}-{}.nft",
            std::process::id(),
            ns.name
        ));
        std::fs::write(&file, &rules)?;
        let res = ns.exec(&format!("nft -f {}", file.display()));
        let _ = std::fs::remove_file(&file);
        res.with_context(|| format!("nft ruleset:\n{rules}"))?;
        Ok(Self { ns })
    }

    /// Conntrack entries in the namespace (from the kernel's count).
    pub fn conntrack_count(&self) -> Result<u64> {
        Ok(self
            .ns
            .exec("cat /proc/sys/net/netfilter/nf_conntrack_count")?
            .trim()
            .parse()?)
    }
}

impl Drop for Nft<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .exec(&format!("nft delete table ip {NFT_TABLE} 2>/dev/null"));
    }
}

/// HAProxy health-check timing (`inter`, `fall`, `rise` on every server).
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    pub inter_ms: u32,
    pub fall: u32,
    pub rise: u32,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            inter_ms: 1000,
            fall: 2,
            rise: 2,
        }
    }
}

/// A TCP-mode HAProxy listener over health-checked backends.
#[derive(Clone, Debug)]
pub struct HaproxySpec {
    pub listen: SocketAddr,
    /// (name, address)
    pub backends: Vec<(String, SocketAddr)>,
    /// Source address of connections to the backends.
    pub source: Option<Ipv4Addr>,
    pub checks: Checks,
    /// `option httpchk GET <path>` instead of a plain TCP connect check.
    pub http_check: Option<String>,
    pub timeout_connect_ms: u32,
    /// `balance` algorithm: `roundrobin`, `leastconn`, ...
    pub balance: &'static str,
}

impl HaproxySpec {
    pub fn config(&self) -> String {
        let mut c =
            String::from("global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  option dontlognull\n");
        let _ = write!(
            c,
            "  timeout connect {}ms\n  timeout client 30s\n  timeout server 30s\n\n",
            self.timeout_connect_ms
        );
        let _ = write!(
            c,
            "frontend fe\n  bind {}\n  default_backend be\n\nbackend be\n  balance {}\n",
            self.listen, self.balance
        );
        if let Some(src) = self.source {
            let _ = writeln!(c, "  source {src}");
        }
        if let Some(path) = &self.http_check {
            let _ = writeln!(c, "  option httpchk GET {path}");
        }
        for (name, addr) in &self.backends {
            let _ = writeln!(
                c,
                "  server {name} {addr} check inter {}ms fall {} rise {}",
                self.checks.inter_ms, self.checks.fall, self.checks.rise
            );
        }
        c
    }
}

/// A running HAProxy; killed on drop, and its config and log files removed.
pub struct Haproxy {
    _proc: Proc,
    config: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy in `ns` (foreground, no daemon) and waits until the
    /// listener accepts connections from `probe_from` (or from `ns`).
    pub fn start(ns: &Netns, spec: &HaproxySpec, probe_from: Option<&Netns>) -> Result<Self> {
        let config = std::env::temp_dir().join(format!(
            "failover-haproxy-{}-{}.cfg",
            std::process::id(),
            ns.name
        ));
        std::fs::write(&config, spec.config())?;
        let check = Command::new("ip")
            .args(["netns", "exec", &ns.name, "haproxy", "-c", "-q", "-f"])
            .arg(&config)
            .output()
            .context("run haproxy -c (install it with cargo xtask setup)")?;
        if !check.status.success() {
            let _ = std::fs::remove_file(&config);
            bail!(
                "haproxy config rejected: {}\n{}",
                String::from_utf8_lossy(&check.stderr),
                spec.config()
            );
        }
        let log = config.with_extension("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "haproxy", "-db", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn haproxy")?;
        let mut me = Self {
            _proc: Proc(child),
            config,
            log,
        };
        let _in = probe_from.unwrap_or(ns).enter()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && me._proc.0.try_wait()?.is_none() {
            if TcpStream::connect_timeout(&spec.listen, Duration::from_millis(200)).is_ok() {
                return Ok(me);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "haproxy did not start listening on {}: {}",
            spec.listen,
            std::fs::read_to_string(&me.log).unwrap_or_default().trim()
        )
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}
