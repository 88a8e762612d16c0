//! OpenAI-compatible test inference backend (plus optional gRPC health) for
//! failover's end-to-end tests and demo. Faults switch at runtime through
//! `POST /admin/fault`; `{"fault":"crash"}` exits the process with status 1.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use failover_tests::backend::{
    BackendConfig, DEFAULT_MODEL, Fault, Faults, QueueModel, serve_grpc_health, serve_http,
};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "failover-testbackend",
    about = "OpenAI-compatible test inference backend"
)]
struct Args {
    /// Backend name, echoed in every answer and the `x-backend` header.
    #[arg(long, default_value = "backend")]
    name: String,
    /// HTTP listen address (port 0 picks one; the start line prints it).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Also serve grpc.health.v1 here.
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Served model; repeat for several.
    #[arg(long = "model", default_values_t = [DEFAULT_MODEL.to_string()])]
    models: Vec<String>,
    /// Tokens per reply when a request sets no max_tokens.
    #[arg(long, default_value_t = 8)]
    tokens_per_reply: usize,
    /// Gap between streamed tokens.
    #[arg(long, default_value_t = 10)]
    token_interval_ms: u64,
    /// Initial fault: none, hang, slow:MS, too_many_requests, unhealthy, wedge.
    #[arg(long, default_value = "none")]
    fault: Fault,
    /// A model server's capacity in requests a second (the queue model,
    /// exported at /metrics under vLLM's names); unset: no queue.
    #[arg(long)]
    service_rate: Option<f64>,
    /// Requests served at once under the queue model.
    #[arg(long, default_value_t = 4, requires = "service_rate")]
    max_running: usize,
}

// One thread is plenty for a test backend and keeps a demo with many of them light.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let faults = Faults::new(args.fault);
    let cfg = BackendConfig {
        name: args.name.clone(),
        models: args.models.clone(),
        tokens_per_reply: args.tokens_per_reply,
        token_interval: Duration::from_millis(args.token_interval_ms),
        queue: args.service_rate.map(|service_rate| QueueModel {
            service_rate,
            max_running: args.max_running,
        }),
        // A crash must look like one to the data plane: the process dies.
        on_crash: Some(Arc::new(|| {
            eprintln!("failover-testbackend: crash fault, exiting 1");
            std::process::exit(1);
        })),
    };

    let http = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind http {}", args.listen))?;
    let http_addr = http.local_addr()?;
    let grpc = match args.grpc_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind grpc {addr}"))?,
        ),
        None => None,
    };
    let grpc_addr = match &grpc {
        Some(l) => l.local_addr()?.to_string(),
        None => "-".to_string(),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // Tests and the demo parse this line (http=... gives the bound port).
    println!(
        "failover-testbackend name={} http={http_addr} grpc={grpc_addr} models={} fault={} pid={}",
        args.name,
        args.models.join(","),
        args.fault,
        std::process::id()
    );
    std::io::stdout().flush()?;

    let grpc_task = async {
        match grpc {
            Some(l) => serve_grpc_health(l, faults.clone()).await.context("grpc"),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = serve_http(http, cfg, faults.clone()) => r.context("http")?,
        r = grpc_task => r?,
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
