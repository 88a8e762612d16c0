//! `failover-agent`: a thin CLI over the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use comfy_table::{Cell, Color};
use failover_agent::{
    agent::{
        Agent, RunOptions,
        states::{DataplaneState, HealthState},
    },
    api::{self, Client, ClientError},
    audit, config,
    dataplane::Dataplane,
};

#[derive(Parser)]
#[command(
    name = "failover-agent",
    version,
    about = "Real-time failover of AI inference traffic: the agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Program the data plane and keep it in line with backend health.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Append-only, hash-chained decision log.
        #[arg(long, default_value = "/var/lib/failover/audit.jsonl")]
        audit: PathBuf,
        /// Seconds a restarted agent keeps the rings it found while
        /// waiting for first probe verdicts.
        #[arg(long, default_value_t = 10)]
        startup_hold: u64,
    },
    /// Check a config file (no privileges needed).
    Validate {
        #[arg(long)]
        config: PathBuf,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove the pinned program and maps: traffic stops being handled.
    Detach {
        #[arg(long)]
        config: PathBuf,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Node, program, config generation, and each service's active tier
    /// and healthy backends, of those its policy admits (from the running
    /// agent).
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Every backend: probe verdict, data-plane state, tier, effective
    /// weight (with the configured one when they differ), probe latency,
    /// passive signals and flows.
    Backends {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Flows in the data plane's flow table, oldest first.
    Flows {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        backend: Option<String>,
        /// How many to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop sending new flows to BACKEND; its existing flows continue.
    /// Prints the flows still on it: removal is safe at 0. Refused when a
    /// service would be left below its floor (`policy.min_healthy`).
    Drain {
        backend: String,
        /// Drain even below a service's floor (audited as forced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Let BACKEND take new flows again.
    Undrain {
        backend: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Force a service onto a tier for a while (audited; ends by itself;
    /// kept across agent restarts). Refused when the service has no
    /// backend in the tier or its sovereignty policy forbids the tier, or
    /// when it would leave the service below its floor
    /// (`policy.min_healthy`).
    Failover {
        #[arg(long)]
        service: String,
        #[arg(long, required_unless_present = "cancel")]
        to_tier: Option<u8>,
        /// How long, e.g. 10m, 1h (at most 24h).
        #[arg(
            long = "for",
            value_name = "DURATION",
            required_unless_present = "cancel"
        )]
        for_: Option<String>,
        /// End the service's override now instead.
        #[arg(long, conflicts_with_all = ["to_tier", "for_", "force"])]
        cancel: bool,
        /// Fail over even below the floor (audited as forced; never past
        /// the sovereignty policy).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Mark a backend (or a service's whole tier) down in the data plane
    /// for a bounded time while traffic flows, measure the failover from
    /// the data plane's counters, restore, and print a report.
    Drill {
        #[arg(long)]
        service: String,
        #[arg(long, conflicts_with = "tier", required_unless_present = "tier")]
        backend: Option<String>,
        #[arg(long)]
        tier: Option<u8>,
        /// How long the target stays down (at most 5m).
        #[arg(long = "for", value_name = "DURATION", default_value = "3s")]
        for_: String,
        /// Also write a timeline chart (SVG) of traffic per backend.
        #[arg(long, value_name = "FILE.svg")]
        report: Option<PathBuf>,
        /// Drill even when the service would be left below its floor.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
}

/// Print a shell completion script, e.g.
/// `failover-agent completions bash > /etc/bash_completion.d/failover-agent`.
#[derive(Args)]
struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// How to reach the running agent.
#[derive(Args)]
struct ApiArgs {
    /// The agent's control socket (`node.api_socket`).
    #[arg(long, default_value = "/run/failover/agent.sock")]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain of an audit log.
    Verify {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    match cli.cmd {
        Cmd::Run {
            config,
            audit,
            startup_hold,
        } => run(config, audit, startup_hold),
        Cmd::Validate { config, json } => Ok(validate(&config, json)),
        Cmd::Detach { config } => {
            let cfg = config::load(&config)?;
            if !cfg.node.pin_path.exists() {
                println!("nothing pinned at {}", cfg.node.pin_path.display());
                return Ok(ExitCode::SUCCESS);
            }
            Dataplane::remove_pins(&cfg.node.pin_path)
                .with_context(|| format!("removing {}", cfg.node.pin_path.display()))?;
            println!(
                "detached: removed {} (XDP links and maps)",
                cfg.node.pin_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { file, json },
        } => Ok(verify(&file, json)),
        Cmd::Completions(CompletionsArgs { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "failover-agent", &mut script);
            if shell == clap_complete::Shell::Bash {
                script = fix_bash_completions(&script);
            }
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Drill {
            service,
            backend,
            tier,
            for_,
            report,
            force,
            api,
        } => operator(
            &api,
            Op::Drill(
                failover_agent::drill::DrillRequest {
                    service,
                    backend,
                    tier,
                    for_,
                    force,
                },
                report,
            ),
        ),
        Cmd::Status { api } => operator(&api, Op::Status),
        Cmd::Backends { api } => operator(&api, Op::Backends),
        Cmd::Flows {
            service,
            backend,
            limit,
            api,
        } => operator(
            &api,
            Op::Flows(api::FlowQuery {
                service,
                backend,
                limit: Some(limit),
            }),
        ),
        Cmd::Drain {
            backend,
            force,
            api,
        } => operator(&api, Op::Drain(backend, true, force)),
        Cmd::Undrain { backend, api } => operator(&api, Op::Drain(backend, false, false)),
        Cmd::Failover {
            service,
            to_tier,
            for_,
            cancel,
            force,
            api,
        } => match (to_tier, for_) {
            (Some(tier), Some(d)) if !cancel => {
                operator(&api, Op::Failover(service, tier, d, force))
            }
            _ => operator(&api, Op::CancelFailover(service)),
        },
    }
}

/// clap_complete's bash script spells the states of a hyphenated binary's
/// subcommands two ways: the loop sets `failover__agent__subcmd__drain`,
/// the case arm waits for `failover__subcmd__agent__subcmd__drain`, so no
/// subcommand's options ever complete (clap-rs/clap#6421). One spelling.
fn fix_bash_completions(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace(
            "failover__subcmd__agent__subcmd__",
            "failover__agent__subcmd__",
        )
        .into_bytes()
}

enum Op {
    Status,
    Backends,
    Flows(api::FlowQuery),
    /// Backend, drain (or undrain), force.
    Drain(String, bool, bool),
    /// Service, tier, duration, force.
    Failover(String, u8, String, bool),
    CancelFailover(String),
    Drill(failover_agent::drill::DrillRequest, Option<PathBuf>),
}

/// `HEALTHY`: healthy of the backends the policy admits, and how many
/// more of the pool it excludes.
fn healthy_cell(s: &api::ServiceStatus) -> String {
    match s.excluded {
        0 => format!("{}/{}", s.healthy, s.backends),
        n => format!("{}/{} ({n} excluded)", s.healthy, s.backends),
    }
}

/// `WEIGHT`: the effective weight, with the configured one when they differ.
fn weight_cell(b: &api::BackendInfo) -> String {
    if b.effective_weight == b.weight {
        b.weight.to_string()
    } else {
        format!("{} of {}", b.effective_weight, b.weight)
    }
}

/// `HEALTH`: the probe verdict, green up, yellow degraded, red down.
fn health_cell(h: HealthState) -> Cell {
    let fg = match h {
        HealthState::Up => Some(Color::DarkGreen),
        HealthState::Degraded => Some(Color::DarkYellow),
        HealthState::Down => Some(Color::DarkRed),
        HealthState::Unknown => None,
    };
    state_cell(h.as_str(), fg)
}

/// `STATE`: the data plane's state, green up, yellow draining, red down.
fn dataplane_cell(s: DataplaneState) -> Cell {
    let fg = match s {
        DataplaneState::Up => Some(Color::DarkGreen),
        DataplaneState::Draining => Some(Color::DarkYellow),
        DataplaneState::Down => Some(Color::DarkRed),
        DataplaneState::Unused => None,
    };
    state_cell(s.as_str(), fg)
}

fn state_cell(word: &str, fg: Option<Color>) -> Cell {
    fg.map_or_else(|| Cell::new(word), |fg| Cell::new(word).fg(fg))
}

/// Cells of plain text.
fn plain(row: Vec<String>) -> Vec<Cell> {
    row.into_iter().map(Cell::new).collect()
}

/// An aligned text table: a header line and rows, columns two spaces
/// apart, with the state cells' colours shown when `colour` (a terminal).
fn table(header: &[&str], rows: &[Vec<Cell>], colour: bool) -> String {
    use comfy_table::{Table, presets::NOTHING};
    let mut t = Table::new();
    t.load_style(NOTHING);
    if colour {
        t.enforce_styling();
    } else {
        t.force_no_tty();
    }
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r.clone());
    }
    let last = header.len().saturating_sub(1);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == last { 0 } else { 2 }));
    }
    t.lines().map(|l| format!("{}\n", l.trim_end())).collect()
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// One control API request, printed as a table or JSON. Refusals and a
/// missing agent are reported plainly, with exit status 1.
fn operator(a: &ApiArgs, op: Op) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(&a.socket);
    // Colour only on a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let out: Result<String, ClientError> = rt.block_on(async {
        Ok(match op {
            Op::Status => {
                let s = client.status().await?;
                if a.json {
                    serde_json::to_string_pretty(&s).unwrap_or_default()
                } else {
                    let rows: Vec<Vec<Cell>> = s
                        .services
                        .iter()
                        .map(|v| {
                            plain(vec![
                                v.name.clone(),
                                v.endpoint.clone(),
                                opt(v.active_tier),
                                healthy_cell(v),
                                v.generation.to_string(),
                                v.override_.as_ref().map_or_else(
                                    || "-".to_owned(),
                                    |o| format!("tier {} ({:.0}s left)", o.tier, o.expires_in_s),
                                ),
                                v.serving.join(","),
                            ])
                        })
                        .collect();
                    format!(
                        "node {}  interfaces {}  program {}  config generation {} ({})\n\n{}",
                        s.node,
                        s.interfaces.join(","),
                        if s.program_attached {
                            "attached"
                        } else {
                            "NOT attached"
                        },
                        s.config_generation,
                        s.config_path,
                        table(
                            &[
                                "SERVICE", "ENDPOINT", "TIER", "HEALTHY", "GEN", "OVERRIDE",
                                "SERVING"
                            ],
                            &rows,
                            colour
                        )
                    )
                }
            }
            Op::Backends => {
                let bs = client.backends().await?;
                if a.json {
                    serde_json::to_string_pretty(&bs).unwrap_or_default()
                } else {
                    let rows: Vec<Vec<Cell>> = bs
                        .iter()
                        .map(|b| {
                            vec![
                                Cell::new(&b.name),
                                Cell::new(&b.address),
                                health_cell(b.health),
                                Cell::new(b.flaps),
                                Cell::new(if b.hold_down_s > 0.0 {
                                    format!("{:.1}s", b.hold_down_s)
                                } else {
                                    "-".to_owned()
                                }),
                                dataplane_cell(b.state),
                                Cell::new(if b.grace_s > 0.0 {
                                    format!("{:.1}s", b.grace_s)
                                } else {
                                    "-".to_owned()
                                }),
                                Cell::new(b.tier),
                                Cell::new(weight_cell(b)),
                                Cell::new(opt(b.probe_latency_ms.map(|l| format!("{l:.1}ms")))),
                                Cell::new(format!(
                                    "{}/{}/{}",
                                    b.passive.syns, b.passive.synacks, b.passive.syn_resets
                                )),
                                Cell::new(opt(b.passive.rtt_ms.map(|l| format!("{l:.2}ms")))),
                                Cell::new(b.flows),
                                Cell::new(b.services.join(",")),
                            ]
                        })
                        .collect();
                    table(
                        &[
                            "BACKEND",
                            "ADDRESS",
                            "HEALTH",
                            "FLAPS",
                            "HOLD",
                            "STATE",
                            "GRACE",
                            "TIER",
                            "WEIGHT",
                            "PROBE",
                            "SYN/ACK/RST",
                            "RTT",
                            "FLOWS",
                            "SERVICES",
                        ],
                        &rows,
                        colour,
                    )
                }
            }
            Op::Flows(q) => {
                let f = client.flows(&q).await?;
                if a.json {
                    serde_json::to_string_pretty(&f).unwrap_or_default()
                } else {
                    let rows: Vec<Vec<Cell>> = f
                        .flows
                        .iter()
                        .map(|x| {
                            plain(vec![
                                x.client.clone(),
                                x.vip.clone(),
                                x.protocol.clone(),
                                x.service.clone(),
                                x.backend.clone(),
                                x.nat_port.to_string(),
                                format!("{:.1}s", x.age_s),
                            ])
                        })
                        .collect();
                    format!(
                        "{}{} of {} flows\n",
                        table(
                            &[
                                "CLIENT", "VIP", "PROTO", "SERVICE", "BACKEND", "NAT PORT", "AGE"
                            ],
                            &rows,
                            colour
                        ),
                        f.flows.len(),
                        f.total
                    )
                }
            }
            Op::Drain(b, on, force) => {
                let r = client.drain_with(&b, on, force).await?;
                if a.json {
                    serde_json::to_string_pretty(&r).unwrap_or_default()
                } else {
                    let what = if on { "draining" } else { "taking new flows" };
                    let already = if r.changed { "" } else { " (already)" };
                    let forced = if r.forced { " (forced)" } else { "" };
                    format!(
                        "{}: {what}{already}{forced}; {} flows still on it{}\n",
                        r.backend,
                        r.in_flight_flows,
                        if on && r.in_flight_flows == 0 {
                            ": safe to remove"
                        } else {
                            ""
                        }
                    )
                }
            }
            Op::Drill(req, svg) => {
                let started = client.drill(&req).await?;
                let bound = std::time::Duration::from_secs_f64(started.fault_end_s + 10.0);
                let t0 = std::time::Instant::now();
                let r = loop {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let r = client.drill_report().await?;
                    if r.state == failover_agent::drill::DrillState::Done || t0.elapsed() > bound {
                        break r;
                    }
                };
                if let Some(path) = &svg {
                    std::fs::write(path, failover_agent::drill::svg(&r)).map_err(|e| {
                        ClientError::Protocol {
                            path: path.clone(),
                            message: format!("writing the report: {e}"),
                        }
                    })?;
                }
                if a.json {
                    serde_json::to_string_pretty(&r).unwrap_or_default()
                } else {
                    format!(
                        "drill of {} in service {} ({:.1}s down)\n  failover time: {}\n  packets lost (dropped or reset during the fault): {}\n  took over: {}\n  samples: {}{}\n",
                        r.targets.join(", "),
                        r.service,
                        r.fault_end_s - r.fault_start_s,
                        r.failover_ms.map_or_else(
                            || "not observed (no traffic moved)".to_owned(),
                            |m| format!("{m:.0} ms (sampled every 10 ms)")
                        ),
                        r.lost_packets,
                        if r.took_over.is_empty() { "-".to_owned() } else { r.took_over.join(", ") },
                        r.samples.len(),
                        svg.as_ref().map_or_else(String::new, |p| format!("\n  chart: {}", p.display())),
                    )
                }
            }
            Op::CancelFailover(s) => {
                let r = client.cancel_failover(&s).await?;
                if a.json {
                    serde_json::to_string_pretty(&r).unwrap_or_default()
                } else if r.cancelled {
                    format!(
                        "{}: override cancelled (generation {}, serving {})\n",
                        r.service,
                        r.generation,
                        r.serving.join(",")
                    )
                } else {
                    format!("{}: no override to cancel\n", r.service)
                }
            }
            Op::Failover(s, tier, d, force) => {
                let r = client.failover_with(&s, tier, &d, force).await?;
                if a.json {
                    serde_json::to_string_pretty(&r).unwrap_or_default()
                } else {
                    format!(
                        "{}: forced to tier {} for {d}{} (generation {}, serving {})\n",
                        r.service,
                        r.tier,
                        if r.forced { ", past the floor check" } else { "" },
                        r.generation,
                        r.serving.join(",")
                    )
                }
            }
        })
    });
    match out {
        Ok(text) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                );
            } else {
                eprintln!("{e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn run(config: PathBuf, audit: PathBuf, startup_hold: u64) -> Result<ExitCode> {
    if let Some(dir) = audit.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut opts = RunOptions::new(&config);
        opts.audit_path = Some(audit);
        opts.startup_hold = std::time::Duration::from_secs(startup_hold);
        let agent = match Agent::start(opts).await {
            Ok(a) => a,
            Err(failover_agent::agent::AgentError::Config(e)) => {
                eprintln!("{e}");
                for w in e.warnings() {
                    eprintln!("{}", w.as_warning());
                }
                eprintln!("refusing to start: fix the config above");
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => return Err(e).context("starting the agent"),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let agent = agent.run(shutdown).await?;
        let p = agent.applier().flip_latency();
        tracing::info!(
            applies = p.count,
            p50_us = p.p50_us,
            p99_us = p.p99_us,
            "decision-to-flip latency"
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn validate(path: &std::path::Path, json: bool) -> ExitCode {
    let (ok, out, err) = validation_report(&config::load_checked(path), path, json);
    print!("{out}");
    eprint!("{err}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn field_json(fe: &config::FieldError) -> serde_json::Value {
    serde_json::json!({
        "origin": fe.origin,
        "line": fe.line,
        "field": fe.field,
        "message": fe.message,
    })
}

/// What `validate` prints: whether the file is valid, stdout and stderr.
/// Errors and warnings go to stderr (`file:line: warning: field: ...`);
/// with `--json`, one object on stdout with both lists.
fn validation_report(
    result: &Result<config::Loaded, config::ConfigError>,
    path: &std::path::Path,
    json: bool,
) -> (bool, String, String) {
    let file = path.display().to_string();
    let warnings = match result {
        Ok(loaded) => &loaded.warnings[..],
        Err(e) => e.warnings(),
    };
    let warning_lines: String = warnings
        .iter()
        .map(|w| format!("{}\n", w.as_warning()))
        .collect();
    match result {
        Ok(loaded) => {
            let cfg = &loaded.config;
            if json {
                let out = serde_json::json!({
                    "ok": true,
                    "file": file,
                    "services": cfg.services.len(),
                    "backends": cfg.backends.len(),
                    "warnings": warnings.iter().map(field_json).collect::<Vec<_>>(),
                });
                (true, format!("{out}\n"), String::new())
            } else {
                let noted = match warnings.len() {
                    0 => String::new(),
                    1 => "; 1 warning".to_owned(),
                    n => format!("; {n} warnings"),
                };
                (
                    true,
                    format!(
                        "{file}: ok ({} services, {} backends{noted})\n",
                        cfg.services.len(),
                        cfg.backends.len()
                    ),
                    warning_lines,
                )
            }
        }
        Err(e) => {
            if json {
                let errors: Vec<serde_json::Value> = if e.errors().is_empty() {
                    vec![serde_json::json!({ "message": e.to_string() })]
                } else {
                    e.errors().iter().map(field_json).collect()
                };
                let out = serde_json::json!({
                    "ok": false,
                    "file": file,
                    "errors": errors,
                    "warnings": warnings.iter().map(field_json).collect::<Vec<_>>(),
                });
                (false, format!("{out}\n"), String::new())
            } else {
                (false, String::new(), format!("{e}\n{warning_lines}"))
            }
        }
    }
}

fn verify(path: &std::path::Path, json: bool) -> ExitCode {
    match audit::verify(path) {
        Ok(r) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "records": r.records, "head": r.head})
                );
            } else {
                println!(
                    "{}: ok, {} records, head {}",
                    path.display(),
                    r.records,
                    r.head
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                let line = match &e {
                    audit::AuditError::Broken { line, .. } => Some(*line),
                    _ => None,
                };
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "line": line, "error": e.to_string()})
                );
            } else {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = include_str!("../../deploy/examples/minimal.yaml");

    fn report(text: &str, json: bool) -> (bool, String, String) {
        let parsed = config::parse_on(text, "f.yaml", &config::Host::defaults());
        validation_report(&parsed, std::path::Path::new("f.yaml"), json)
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "STATE", "FLOWS"],
            &[
                vec!["b1".into(), "up".into(), "3".into()],
                vec!["gpu-eu-1".into(), "draining".into(), "12".into()],
            ],
            false,
        );
        assert_eq!(
            t,
            "NAME      STATE     FLOWS\nb1        up        3\ngpu-eu-1  draining  12\n"
        );
    }

    #[test]
    fn colour_only_when_asked_and_columns_stay_aligned() {
        let rows = [vec![
            "b1".into(),
            dataplane_cell(DataplaneState::Down),
            "3".into(),
        ]];
        let plain = table(&["NAME", "STATE", "FLOWS"], &rows, false);
        assert!(!plain.contains('\x1b'));
        let coloured = table(&["NAME", "STATE", "FLOWS"], &rows, true);
        assert!(coloured.contains("\x1b[38;5;1mdown"), "{coloured:?}");
        let stripped = coloured.replace("\x1b[38;5;1m", "").replace("\x1b[39m", "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn status_and_backends_cells_say_what_the_numbers_mean() {
        let svc: api::ServiceStatus = serde_json::from_value(serde_json::json!({
            "name": "fraud", "endpoint": "192.0.2.20:443/tcp", "active_tier": null,
            "generation": 3, "healthy": 0, "backends": 2, "excluded": 3,
            "serving": [], "override": null,
        }))
        .unwrap();
        assert_eq!(healthy_cell(&svc), "0/2 (3 excluded)");
        let svc = api::ServiceStatus {
            healthy: 2,
            excluded: 0,
            ..svc
        };
        assert_eq!(healthy_cell(&svc), "2/2");

        let b: api::BackendInfo = serde_json::from_value(serde_json::json!({
            "name": "a1", "address": "203.0.113.11:8000", "tier": 0, "weight": 100,
            "effective_weight": 50, "health": "degraded", "state": "up",
            "draining": false, "probe_latency_ms": null,
            "passive": {"syns": 0, "synacks": 0, "syn_resets": 0, "rtt_ms": null},
            "flows": 0, "new_flows_total": 0, "services": ["chat"],
        }))
        .unwrap();
        assert_eq!(weight_cell(&b), "50 of 100");
        let b = api::BackendInfo {
            effective_weight: 100,
            ..b
        };
        assert_eq!(weight_cell(&b), "100");
    }

    #[test]
    fn validate_prints_warnings_and_errors() {
        let (ok, out, err) = report(MINIMAL, false);
        assert!(ok);
        assert_eq!(
            (out.as_str(), err.as_str()),
            ("f.yaml: ok (1 services, 2 backends)\n", "")
        );

        let warned = MINIMAL.replacen("min: 10000, max: 32767", "min: 40000, max: 40999", 1);
        let (ok, out, err) = report(&warned, false);
        assert!(ok, "a warning is no error");
        assert_eq!(out, "f.yaml: ok (1 services, 2 backends; 1 warning)\n");
        assert!(
            err.starts_with("f.yaml:6: warning: node.snat_ports: snat_ports 40000-40999: "),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
        let (_, out, _) = report(&warned, true);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["warnings"][0]["field"], "node.snat_ports");
        assert_eq!(v["warnings"][0]["line"], 6);

        // Errors first, then the warnings found with them.
        let bad = warned.replacen("port: 80\n", "port: 0\n", 1);
        let (ok, out, err) = report(&bad, false);
        assert!(!ok);
        assert_eq!(out, "");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert_eq!(
            lines[0],
            "f.yaml:11: services[0].port: port must be 1 to 65535"
        );
        assert!(
            lines[1].starts_with("f.yaml:6: warning: node.snat_ports:"),
            "{err}"
        );
        let (_, out, _) = report(&bad, true);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["ok"].as_bool(), v["errors"][0]["line"].as_u64()),
            (Some(false), Some(11))
        );
        assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1));
    }
}
