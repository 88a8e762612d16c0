//! Decision-to-data-plane latency of the agent's apply path, on the real
//! maps of a throwaway lab (namespace and pin directory removed on drop).
//!
//! Each trial is one health decision fed to `Applier::on_health`, timed
//! from the decision's `at` (taken just before the call) to:
//! - `backend_state`: the backend's `BACKENDS` write (the failover itself;
//!   the re-plan and flip that follow in the same apply are not counted
//!   here, they are the next two cases);
//! - `ring_flip_small`: the flip, for one service of 3 backends and a
//!   251-slot ring (plan, Maglev, ring write, flip);
//! - `full_rebuild`: the flip, for one service of 100 backends and a
//!   65537-slot ring.
//!
//! A ring slot is one map value of `RING_MAX` entries, so every ring write
//! copies 256 KiB into the kernel whatever the ring size.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use failover_agent::{
    agent::{Applier, ApplyOptions, latency::percentile},
    config,
    dataplane::Dataplane,
    health::{EventSource, HealthEvent, HealthState},
};
use serde::Serialize;

use crate::{configs, lab::Lab};

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub case: &'static str,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub trials: usize,
}

/// Trials per case; the flip cases rebuild a ring each time.
pub const STATE_TRIALS: usize = 2000;
pub const SMALL_TRIALS: usize = 1000;
pub const FULL_TRIALS: usize = 200;

/// The bench config, as the agent loads it (validated).
fn cfg(pin: &Path, backends: usize, ring: u32) -> Result<config::Config> {
    let names: Vec<String> = (1..=backends).map(|i| format!("b{i}")).collect();
    let pool: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut bench = configs::service(
        "bench",
        Ipv4Addr::new(203, 0, 113, 10),
        80,
        &pool,
        configs::tcp_probe(),
    );
    bench.policy.ring_size = ring;
    let cfg = config::Config {
        node: crate::lab::node_config(pin, None),
        services: vec![bench],
        backends: names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 100)) + i as u32);
                configs::backend(n, a, 8000)
            })
            .collect(),
    };
    Ok(config::parse(&configs::to_yaml(&cfg), "bench")?)
}

fn event(backend: &str, from: HealthState, to: HealthState) -> HealthEvent {
    HealthEvent {
        backend: backend.into(),
        from,
        to,
        reason: "bench".into(),
        latency: None,
        source: EventSource::Active,
        at: Instant::now(),
    }
}

/// An applier on a fresh lab with every backend up.
fn setup(lab: &Lab, backends: usize, ring: u32) -> Result<Applier> {
    let dp = Dataplane::load(lab.pin_dir()).context("load the data plane")?;
    let mut a = Applier::new(
        dp,
        cfg(lab.pin_dir(), backends, ring)?,
        ApplyOptions::default(),
    )?;
    let ups: Vec<HealthEvent> = (1..=backends)
        .map(|i| event(&format!("b{i}"), HealthState::Unknown, HealthState::Up))
        .collect();
    a.on_health(&ups)?;
    Ok(a)
}

fn result(case: &'static str, mut ns: Vec<u64>) -> CaseResult {
    ns.sort_unstable();
    CaseResult {
        case,
        p50_us: percentile(&ns, 0.50),
        p99_us: percentile(&ns, 0.99),
        max_us: percentile(&ns, 1.0),
        trials: ns.len(),
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Alternates backend b1 down and up; every apply must flip the ring.
/// Returns the decision-to-flip latencies.
fn flips(a: &mut Applier, trials: usize) -> Result<Vec<u64>> {
    let mut flip = Vec::with_capacity(trials);
    for t in 0..trials {
        let (from, to) = if t % 2 == 0 {
            (HealthState::Up, HealthState::Down)
        } else {
            (HealthState::Down, HealthState::Up)
        };
        let r = a.on_health(&[event("b1", from, to)])?;
        ensure!(r.flipped.len() == 1, "trial {t}: expected one flip: {r:?}");
        flip.push(ns(r.latency.context("a flip has a latency")?));
    }
    Ok(flip)
}

pub fn run() -> Result<Vec<CaseResult>> {
    let mut out = Vec::new();

    // backend_state: decision -> BACKENDS write, read from the applier's
    // own window (recorded right after the write, before planning).
    {
        let lab = Lab::new()?;
        let mut a = setup(&lab, 3, 251)?;
        for t in 0..STATE_TRIALS {
            let at = Instant::now();
            let mut down = event("b1", HealthState::Up, HealthState::Down);
            down.at = at;
            let r = a.on_health(&[down])?;
            ensure!(r.state_writes >= 1, "trial {t}: no state write: {r:?}");
            a.on_health(&[event("b1", HealthState::Down, HealthState::Up)])?;
        }
        let p = a.state_latency();
        ensure!(
            p.count as usize == STATE_TRIALS,
            "one state sample per trial"
        );
        // The window holds every trial (STATE_TRIALS <= its size).
        out.push(CaseResult {
            case: "backend_state",
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            max_us: p.max_us,
            trials: p.window,
        });
    }
    {
        let lab = Lab::new()?;
        let mut a = setup(&lab, 3, 251)?;
        let flip = flips(&mut a, SMALL_TRIALS)?;
        out.push(result("ring_flip_small", flip));
    }
    {
        let lab = Lab::new()?;
        let mut a = setup(&lab, 100, failover_common::RING_DEFAULT)?;
        let flip = flips(&mut a, FULL_TRIALS)?;
        out.push(result("full_rebuild", flip));
    }
    Ok(out)
}

/// Prints the results as a table, or one JSON object per line.
pub fn print(results: &[CaseResult], json: bool) {
    if json {
        for r in results {
            println!(
                "{}",
                serde_json::json!({
                    "case": r.case,
                    "p50_us": (r.p50_us * 10.0).round() / 10.0,
                    "p99_us": (r.p99_us * 10.0).round() / 10.0,
                    "max_us": (r.max_us * 10.0).round() / 10.0,
                    "trials": r.trials,
                })
            );
        }
        return;
    }
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>7}",
        "case", "p50_us", "p99_us", "max_us", "trials"
    );
    for r in results {
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>10.1} {:>7}",
            r.case, r.p50_us, r.p99_us, r.max_us, r.trials
        );
    }
    println!(
        "decision -> BACKENDS write (backend_state) or -> ring flip complete (others); \
         ring_flip_small: 3 backends, M=251; full_rebuild: 100 backends, M=65537"
    );
}
