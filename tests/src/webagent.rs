//! An agent in this process serving the lab's `web` service, with its
//! control socket in a scratch directory: the setup the operator tests
//! (`tests/operator.rs`) and the CLI tests (`tests/cli.rs`) share.

use std::{net::Ipv4Addr, time::Duration};

use failover_agent::{
    api::{Client, Status},
    config::{self, Config, Probe},
};

use crate::{
    configs,
    inproc::{self, Running},
    lab::{self, Lab},
    listener::Listener,
    scratch::TempDir,
    wait::wait_for_value,
};

/// Backend `name` on listener `l` at `address` (loopback, or an address
/// the namespace's DNAT sends there), in `tier`.
pub fn at(name: &str, address: Ipv4Addr, l: &Listener, tier: u8) -> config::Backend {
    let mut b = configs::backend(name, address, l.port);
    b.tier = tier;
    b
}

/// The lab's `web` over `backends` (all of them), probed every 20 ms with
/// `probe`, the control socket at `dir/agent.sock` and metrics on an
/// ephemeral loopback port.
pub fn config(lab: &Lab, dir: &TempDir, backends: Vec<config::Backend>, probe: Probe) -> Config {
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    let web: Vec<&str> = names.iter().map(String::as_str).collect();
    let sock = dir.0.join("agent.sock");
    lab::web_config(lab.pin_dir(), Some(&sock), &web, probe, backends)
}

/// Writes `cfg` to `dir/failover.yaml` and runs the agent on it, with
/// its audit log at `dir/audit.jsonl` when `audited`.
pub async fn start(dir: &TempDir, cfg: &Config, audited: bool) -> Running {
    let path = dir.0.join("failover.yaml");
    configs::write(cfg, &path);
    let audit = audited.then(|| dir.0.join("audit.jsonl"));
    let agent = Running::start(inproc::options(&path, audit)).await;
    assert!(agent.metrics().ip().is_loopback(), "{:?}", agent.metrics);
    agent
}

/// Three loopback listeners.
pub async fn listeners() -> (Listener, Listener, Listener) {
    (
        Listener::start().await,
        Listener::start().await,
        Listener::start().await,
    )
}

/// Waits up to 10 s for the agent's status to meet `cond`.
pub async fn wait_status(c: &Client, what: &str, cond: impl FnMut(&Status) -> bool) -> Status {
    let status = || async { c.status().await.expect("status") };
    wait_for_value(what, Duration::from_secs(10), status, cond).await
}
