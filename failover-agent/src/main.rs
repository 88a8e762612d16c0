//! `failover-agent`: a thin CLI over the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use failover_agent::{
    agent::{Agent, RunOptions},
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
    match config::load(path) {
        Ok(cfg) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "file": path.display().to_string(),
                        "services": cfg.services.len(),
                        "backends": cfg.backends.len(),
                    })
                );
            } else {
                println!(
                    "{}: ok ({} services, {} backends)",
                    path.display(),
                    cfg.services.len(),
                    cfg.backends.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                let errors: Vec<serde_json::Value> = if e.errors().is_empty() {
                    vec![serde_json::json!({ "message": e.to_string() })]
                } else {
                    e.errors()
                        .iter()
                        .map(|fe| {
                            serde_json::json!({
                                "origin": fe.origin,
                                "line": fe.line,
                                "field": fe.field,
                                "message": fe.message,
                            })
                        })
                        .collect()
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": false,
                        "file": path.display().to_string(),
                        "errors": errors,
                    })
                );
            } else {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
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
