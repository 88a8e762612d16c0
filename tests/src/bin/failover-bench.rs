//! Benchmarks behind `cargo xtask bench ...` (needs root).

use anyhow::Result;
use clap::{Parser, Subcommand};
use failover_tests::bench;

#[derive(Parser)]
#[command(
    name = "failover-bench",
    about = "failover benchmarks (run via cargo xtask bench)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Decision-to-data-plane latency of the agent's apply path.
    Apply,
    /// Real traffic through the VIP with the real agent while a client
    /// floods the edge with bad SYNs: success, p99, ring switches and
    /// passive ejections per flood rate and source.
    Attack {
        /// Seconds per row.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Flood rates in bad SYNs per second, each from one spoofed
        /// source and from many.
        #[arg(long, value_delimiter = ',', default_values_t = [100, 1_000, 10_000])]
        pps: Vec<u32>,
    },
    /// Per-packet cost of the XDP program (BPF_PROG_TEST_RUN, repeat = 1).
    Datapath {
        /// Calls per case (the method needs at least 100,000).
        #[arg(long, default_value_t = 100_000)]
        calls: u64,
    },
    /// A SYN flood from spoofed sources at rising rates, with idle
    /// established flows and real connections through the VIP and the
    /// real agent: flows that survived, success and p99 connect time.
    Flood {
        /// Seconds of flood per rate.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Flood rates in SYNs per second, in order; 0 is as fast as the
        /// generator goes.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 50_000, 0])]
        pps: Vec<u32>,
        /// Idle TCP flows established before the flood.
        #[arg(long, default_value_t = 10_000)]
        flows: usize,
    },
    /// Packets/s forwarded through the edge: xdp vs nftables vs routing.
    Forward {
        /// Seconds per system.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Distinct 5-tuples (UDP source ports).
        #[arg(long, default_value_t = 1024)]
        flows: u16,
        /// Frames per kernel batch (1..=256): the live-frames batch, or
        /// the sendmmsg vector.
        #[arg(long, default_value_t = 64)]
        batch: u32,
        /// Traffic generator: live (XDP live-frames), socket (AF_PACKET
        /// sendmmsg), or auto (live when the kernel allows it).
        #[arg(long, default_value = "auto")]
        generator: failover_tests::generator::Choice,
    },
    /// HTTP with wrk: direct vs xdp vs nftables vs haproxy, keep-alive and
    /// new connection per request.
    Http {
        /// Seconds per system and mode.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// wrk threads.
        #[arg(long, default_value_t = 1)]
        threads: u32,
        /// Rounds over all systems (interleaved); figures are medians.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Systems to run (default: all).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<String>,
    },
    /// Failover time after a backend crash and a blackholed cloud:
    /// failover vs haproxy-tuned vs haproxy-default.
    Failover {
        /// Trials per system and scenario.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Systems to run (default: all).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<String>,
        /// Scenarios to run (default: crash,blackhole).
        #[arg(long, value_delimiter = ',')]
        scenarios: Vec<String>,
        /// Print each trial's outcomes, the agent's decisions and the XDP
        /// verdicts counted meanwhile (to stderr).
        #[arg(long)]
        trace: bool,
        /// IP family of the client, VIP and backends: 4 or 6.
        #[arg(long, default_value = "4")]
        family: failover_tests::topology::Family,
    },
    /// Time to first token under load (three backends, one at half the
    /// service rate): static weights vs load-aware weights vs HAProxy
    /// leastconn; and how fast a wedged backend stops getting new flows.
    Load {
        /// Seconds of load per mode.
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        /// Seconds of load after the wedge.
        #[arg(long, default_value_t = 5.0)]
        wedge_seconds: f64,
        /// Modes to run (default: static,load_aware,haproxy_leastconn,wedge).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Print each mode's second-by-second p99 and shares (to stderr).
        #[arg(long)]
        trace: bool,
    },
    /// The agent at rest: CPU and memory while probing healthy backends.
    Rest {
        /// Backends probed.
        #[arg(long, default_value_t = 100)]
        backends: u16,
        /// Probe interval, milliseconds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Measured seconds per probe kind.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Probe kinds (default: tcp,http,grpc,inference).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
    },
    /// Every benchmark this binary has, then the results page.
    All {
        /// Directory for README.md, results.jsonl and the SVG charts.
        #[arg(long)]
        report: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    // A list flag left empty means every choice.
    let or = |v: Vec<String>, d: &[&str]| -> Vec<String> {
        if v.is_empty() {
            d.iter().map(|s| s.to_string()).collect()
        } else {
            v
        }
    };
    match args.cmd {
        Cmd::Forward {
            seconds,
            flows,
            batch,
            generator,
        } => {
            let opts = bench::forward::Opts {
                seconds,
                flows,
                batch,
                generator,
            };
            bench::forward::print(&bench::forward::run(opts)?, args.json)
        }
        Cmd::Http {
            seconds,
            connections,
            threads,
            rounds,
            systems,
        } => {
            let opts = bench::http::Opts {
                seconds,
                connections,
                threads,
                rounds,
            };
            let systems = or(systems, &bench::http::SYSTEMS);
            bench::http::print(&bench::http::run(opts, &systems)?, args.json)
        }
        Cmd::Failover {
            trials,
            systems,
            scenarios,
            trace,
            family,
        } => {
            let systems = or(systems, &bench::failover::SYSTEMS);
            let scenarios = or(scenarios, &bench::failover::SCENARIOS);
            let opts = bench::failover::Opts {
                trials,
                trace,
                family,
            };
            bench::failover::print(
                &bench::failover::run(opts, &systems, &scenarios)?,
                args.json,
            )
        }
        Cmd::Rest {
            backends,
            interval_ms,
            seconds,
            kinds,
        } => {
            let kinds = or(kinds, &bench::rest::KINDS);
            let opts = bench::rest::Opts {
                backends,
                interval_ms,
                seconds,
            };
            bench::rest::print(&bench::rest::run(&opts, &kinds)?, args.json)
        }
        Cmd::Load {
            seconds,
            wedge_seconds,
            modes,
            trace,
        } => {
            let modes = or(modes, &bench::load::MODES);
            let opts = bench::load::Opts {
                seconds,
                wedge_seconds,
                trace,
            };
            bench::load::print(&bench::load::run(opts, &modes)?, args.json)
        }
        Cmd::All { report } => bench::report::all(&report)?,
        Cmd::Apply => bench::apply::print(&bench::apply::run()?, args.json),
        Cmd::Attack { seconds, pps } => {
            let opts = bench::attack::Opts { seconds, pps };
            bench::attack::print(&bench::attack::run(&opts)?, args.json)
        }
        Cmd::Flood {
            seconds,
            pps,
            flows,
        } => {
            let opts = bench::flood::Opts {
                seconds,
                rates: pps,
                flows,
            };
            bench::flood::print(&bench::flood::run(&opts)?, args.json)
        }
        Cmd::Datapath { calls } => {
            anyhow::ensure!(
                calls >= 100_000,
                "--calls must be at least 100000 for a stable mean"
            );
            let results = bench::datapath::run(calls)?;
            if args.json {
                for r in &results {
                    let mut o = serde_json::json!({
                        "case": r.case,
                        "raw_ns": (r.raw_ns * 10.0).round() / 10.0,
                        "own_ns": (r.own_ns * 10.0).round() / 10.0,
                        "x_empty": (r.x_empty * 100.0).round() / 100.0,
                        "return_code": r.return_code,
                    });
                    if let (Some(load), Some(m)) = (&r.load, o.as_object_mut()) {
                        for (k, v) in [
                            ("flows", serde_json::json!(load.flows)),
                            ("pending", serde_json::json!(load.pending)),
                            ("fill_s", serde_json::json!(load.fill_s)),
                            ("took_over_pct", serde_json::json!(load.took_over_pct)),
                            ("exhausted", serde_json::json!(load.exhausted)),
                        ] {
                            m.insert(k.into(), v);
                        }
                    }
                    println!("{o}");
                }
            } else {
                println!(
                    "{:<16} {:>10} {:>10} {:>8} {:>6} {:>9}",
                    "case", "raw_ns", "own_ns", "x_empty", "rc", "calls"
                );
                for r in &results {
                    println!(
                        "{:<16} {:>10.1} {:>10.1} {:>8.2} {:>6} {:>9}",
                        r.case, r.raw_ns, r.own_ns, r.x_empty, r.return_code, r.calls
                    );
                }
                println!(
                    "own_ns = raw_ns - empty raw_ns; x_empty = own_ns / empty raw_ns; BPF_PROG_TEST_RUN, one packet per call, kernel-timed"
                );
                if let Some(load) = results.iter().find_map(|r| r.load.as_ref()) {
                    println!(
                        "new_flow_loaded: {} established flows in FLOWS/REVERSE, {} live half-open slots, filled in {:.1} s; {:.1} % of its SYNs took a half-open slot over, {} found no NAT port (snat_ports_exhausted)",
                        load.flows, load.pending, load.fill_s, load.took_over_pct, load.exhausted
                    );
                }
                for (case, bound, x, met) in bench::datapath::targets(&results) {
                    println!(
                        "target (issue 16): {case} <= {bound} x empty: {x:.2} x, {}",
                        if met { "met" } else { "NOT met" }
                    );
                }
                for (v6, v4, x, met) in bench::datapath::v6_ratios(&results) {
                    println!(
                        "target (issue 21): {v6} own cost <= {} x {v4}'s: {x:.2} x, {}",
                        bench::datapath::V6_TARGET,
                        if met { "met" } else { "NOT met" }
                    );
                }
            }
        }
    }
    Ok(())
}
