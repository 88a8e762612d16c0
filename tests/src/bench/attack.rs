//! `cargo xtask bench attack`: real traffic through the VIP while a client
//! floods the edge with bad SYNs (`crate::flood`: every kind that must not
//! count as passive-health evidence), for the real agent with its default
//! probe and damping settings (issue 15: no client can move traffic).
//!
//! Rows: no attack, then floods at each rate from one spoofed source and
//! from many. Each row gets a fresh world (topology, backends, agent), so
//! no flow, SYN queue or flap count of one row reaches the next. The real
//! client sends one request every 10 ms, each on a new connection, open
//! loop ([`Pacer`]), for the row's duration; the flood runs meanwhile.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use serde::Serialize;

use super::failover::{pct, round1};
use crate::{
    agentproc::{ProbeTiming, World},
    flood::{self, Seen, Sources},
    pacer::Pacer,
    topology::VIP,
};

pub const COLUMNS: [&str; 6] = [
    "attack",
    "pps",
    "ok_ratio",
    "p99_ms",
    "ring_switches",
    "ejections",
];
const PATH: &str = "/v1/models";
const INTERVAL: Duration = Duration::from_millis(10);
/// A request not answered within this counts as failed.
const TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Opts {
    /// Seconds per row.
    pub seconds: f64,
    /// Flood rates, bad SYNs per second; each from one source and many.
    pub pps: Vec<u32>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            seconds: 5.0,
            pps: vec![100, 1_000, 10_000],
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `none`, `one-source` or `many-sources`.
    pub attack: &'static str,
    pub pps: u32,
    /// Real requests answered 200, of those sent.
    pub ok_ratio: f64,
    /// p99 time of the answered requests, connect to last byte.
    pub p99_ms: f64,
    /// Ring flips over all services during the row.
    pub ring_switches: u64,
    /// Passive ejections during the row.
    pub ejections: usize,
    /// Real requests sent.
    #[serde(skip)]
    pub requests: usize,
    /// Bad SYNs the client's kernel took.
    #[serde(skip)]
    pub sent: u64,
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let duration = Duration::from_secs_f64(opts.seconds);
    let mut rows = vec![row(None, 0, duration)?];
    for sources in [Sources::One, Sources::Many] {
        for &pps in &opts.pps {
            rows.push(row(Some(sources), pps, duration)?);
        }
    }
    Ok(rows)
}

fn row(sources: Option<Sources>, pps: u32, duration: Duration) -> Result<Row> {
    let attack = sources.map_or("none", Sources::name);
    eprintln!("attack bench: {attack} at {pps} pps for {duration:?}");
    let w = World::start(false, ProbeTiming::default())?;
    let before = Seen::read(&w)?;
    let p = Pacer::start(
        &w.topo.client.name,
        SocketAddr::from((VIP, 80)),
        PATH,
        INTERVAL,
        TIMEOUT,
        duration + TIMEOUT,
    );
    // The no-attack row waits out the same time, sending nothing.
    let sent = flood::flood(&w.topo, sources.unwrap_or(Sources::One), pps, duration)?;
    let samples = p.stop();
    let after = Seen::read(&w)?;
    let mut ms: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| (s.done - s.at).as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(Row {
        attack,
        pps,
        ok_ratio: ms.len() as f64 / samples.len().max(1) as f64,
        p99_ms: round1(pct(&ms, 0.99)),
        ring_switches: before.ring_switches(&after),
        ejections: after.ejections - before.ejections,
        requests: samples.len(),
        sent,
    })
}

/// Whether every attack row meets issue 15's target: `ok_ratio` at least
/// 0.999 of the no-attack row's, no ring switch, no ejection.
pub fn target_met(rows: &[Row]) -> bool {
    let base = rows
        .iter()
        .find(|r| r.attack == "none")
        .map_or(1.0, |r| r.ok_ratio);
    rows.iter()
        .filter(|r| r.attack != "none")
        .all(|r| r.ok_ratio >= 0.999 * base && r.ring_switches == 0 && r.ejections == 0)
}

pub fn print(rows: &[Row], json: bool) {
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(r).expect("row serializes"));
        }
        return;
    }
    let [attack, pps, ok, p99, switches, ejections] = COLUMNS;
    println!(
        "{attack:<13} {pps:>6} {:>7} {:>9} {ok:>9} {p99:>8} {switches:>14} {ejections:>10}",
        "sent", "requests"
    );
    for r in rows {
        println!(
            "{:<13} {:>6} {:>7} {:>9} {:>9.4} {:>8.1} {:>14} {:>10}",
            r.attack, r.pps, r.sent, r.requests, r.ok_ratio, r.p99_ms, r.ring_switches, r.ejections
        );
    }
    println!(
        "real traffic: one request every {} ms, new connection each; sent = bad SYNs the client's kernel took",
        INTERVAL.as_millis()
    );
    println!(
        "target (issue 15): under every attack ok_ratio >= 0.999 x no attack, 0 ring switches, 0 ejections: {}",
        if target_met(rows) { "met" } else { "NOT met" }
    );
}
