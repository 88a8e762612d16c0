//! The running agent: probes every backend, turns health changes into
//! plans, and programs the data plane ([`apply`]).
//!
//! One task owns the data plane and every piece of state; it waits on
//! health events, the passive-check tick, the start-up hold, SIGHUP and
//! the config file check. Nothing is shared, so nothing is locked, and an
//! apply is never interleaved with another. This module is that task's
//! loop ([`Agent::run`]); each concern it serves has its own module:
//! - [`apply`]: the [`Applier`], owner of what the agent knows (config,
//!   ids, health, graces, the operator state) and of the data plane;
//!   [`reconcile`] decides the writes of a decision, purely, and
//!   [`execute`] performs them;
//! - [`operator_state`]: drains and overrides with their expiry (one
//!   owner, saved to the state file); [`grace`]: slow graces;
//! - `probers`: one prober per backend, its events, the passive feed's
//!   ejections ([`passive_feed`]); `load_feed`: the load scrapes of
//!   backends with a load facet (`crate::load`);
//! - `commands` and `operator`: the control API; `drill_run`: drills;
//!   `snapshot`: what a metrics scrape reads; [`reload`]: config reloads.
//!
//! Dead-man rule: the maps and the XDP link are pinned. If this process
//! stalls, crashes or exits (SIGTERM included), the data plane keeps its
//! last good state and keeps forwarding. Only `failover-agent detach`
//! removes it, deliberately.

pub mod apply;
mod commands;
mod drill_run;
pub mod execute;
pub mod grace;
pub mod ids;
pub mod journal;
pub mod latency;
mod load_feed;
mod operator;
pub mod operator_state;
pub mod passive_feed;
mod probers;
pub mod reconcile;
pub mod reload;
mod snapshot;
pub mod states;

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    time::MissedTickBehavior,
};

use crate::{
    api::{self, Command},
    audit::AuditError,
    config::ConfigError,
    dataplane::{Dataplane, DataplaneError},
    health::{HealthEvent, LoadEvent, PassiveConfig, TlsOptions},
    metrics::{self, Liveness, Metrics, SnapshotRequest, Trigger},
};

pub use apply::{Applier, ApplyOptions, ApplyReport, Decision, Programmed};
pub use ids::{IdError, Ids};
pub use journal::Journal;
pub use latency::Percentiles;
pub use passive_feed::PassiveMonitor;
pub use probers::probe_targets;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data plane: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Ids(#[from] IdError),
    #[error("installing the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// How often idle flows are swept (docs/datapath.md). Idle timeouts are
/// therefore kept to within this; one sweep reads both flow tables in
/// batches.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How to run the agent.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config_path: PathBuf,
    /// Append-only decision log; none = decisions are only logged.
    pub audit_path: Option<PathBuf>,
    pub tls: TlsOptions,
    /// Keep-last-good bound for recovered rings at start.
    pub startup_hold: Duration,
    pub passive: PassiveConfig,
    /// Reload on SIGHUP. Tests leave it off: the handler is process-wide.
    pub sighup: bool,
}

impl RunOptions {
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        Self {
            config_path: config_path.into(),
            audit_path: None,
            tls: TlsOptions::default(),
            startup_hold: apply::DEFAULT_STARTUP_HOLD,
            passive: PassiveConfig::default(),
            sighup: true,
        }
    }
}

/// Asks a running agent to reload its config (as SIGHUP does).
#[derive(Clone, Debug)]
pub struct ReloadHandle(mpsc::Sender<()>);

impl ReloadHandle {
    /// Returns false once the agent has stopped.
    pub fn reload(&self) -> bool {
        !matches!(
            self.0.try_send(()),
            Err(mpsc::error::TrySendError::Closed(()))
        )
    }
}

pub struct Agent {
    applier: Applier,
    opts: RunOptions,
    probers: BTreeMap<String, probers::ProberSlot>,
    passive: PassiveMonitor,
    events_tx: mpsc::Sender<HealthEvent>,
    events_rx: mpsc::Receiver<HealthEvent>,
    /// Load scrape tasks, by backend, and their results.
    scrapers: BTreeMap<String, load_feed::ScraperSlot>,
    load_tx: mpsc::Sender<LoadEvent>,
    load_rx: mpsc::Receiver<LoadEvent>,
    reload_tx: mpsc::Sender<()>,
    reload_rx: mpsc::Receiver<()>,
    watch: reload::FileWatch,
    metrics: Arc<Metrics>,
    live: Arc<Liveness>,
    snapshot_rx: mpsc::Receiver<SnapshotRequest>,
    metrics_addr: Option<SocketAddr>,
    /// Listener tasks (metrics), stopped when the agent is dropped.
    servers: Vec<tokio::task::JoinHandle<()>>,
    api_rx: mpsc::Receiver<Command>,
    /// The control socket; removed when the agent is dropped.
    socket: Option<api::Socket>,
    /// 1 at start, +1 per applied config change.
    config_generation: u64,
    /// Latency of the probe behind each backend's last state change.
    probe_latency: BTreeMap<String, Duration>,
    drill: Option<drill_run::ActiveDrill>,
    last_drill: Option<crate::drill::DrillReport>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

/// Health events taken per apply: a region failing at once is one apply.
const EVENT_BATCH: usize = 256;

/// How long nudges wait after the latest backend went down. Nudging reads
/// the flow tables; backends lost together (a cloud) are ejected within a
/// few milliseconds of each other, and none of their switches may wait for
/// it.
/// A stalled client is still reset well under a second.
const NUDGE_DELAY: Duration = Duration::from_millis(5);
/// The longest nudges wait while more backends keep going down.
const NUDGE_MAX_WAIT: Duration = Duration::from_millis(50);

impl Agent {
    /// Loads and validates the config (refusing to start on a bad one),
    /// takes over the data plane at `node.pin_path`, programs it, attaches
    /// to the interfaces and starts the probers. Call inside a tokio
    /// runtime.
    pub async fn start(opts: RunOptions) -> Result<Self, AgentError> {
        let watch = reload::FileWatch::new(&opts.config_path);
        let cfg = reload::load_logged(&opts.config_path)?;
        let journal = opts.audit_path.as_deref().map(Journal::open).transpose()?;
        let state_file = cfg.node.state_file();
        // Before the first plan: a drained backend never takes a flow.
        let operator = operator_state::restore_logged(&state_file, &cfg, journal.as_ref());
        let dp = Dataplane::load_sized(&cfg.node.pin_path, cfg.node.flow_capacity)?;
        let maps = crate::dataplane::memory_estimate(
            cfg.node.flow_capacity,
            crate::dataplane::possible_cpus(),
        );
        let total: u64 = maps.iter().map(|(_, b)| b).sum();
        tracing::info!(
            flow_capacity = cfg.node.flow_capacity,
            total_mib = total >> 20,
            flows_mib = maps
                .iter()
                .filter(|(n, _)| matches!(*n, "FLOWS" | "REVERSE"))
                .map(|(_, b)| b)
                .sum::<u64>()
                >> 20,
            "maps' kernel memory (estimate)"
        );
        let mut applier = Applier::new(
            dp,
            cfg,
            ApplyOptions {
                journal,
                startup_hold: opts.startup_hold,
                operator,
                state_file: Some(state_file),
            },
        )?;
        // Maps first, then the program: it starts on a coherent state.
        applier.attach()?;
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (load_tx, load_rx) = mpsc::channel(1024);
        let (reload_tx, reload_rx) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::new());
        let live = Arc::new(Liveness::default());
        live.beat();
        let (snapshot_tx, snapshot_rx) = mpsc::channel(16);
        let mut servers = Vec::new();
        let mut metrics_addr = None;
        if let Some(addr) = applier.config().node.metrics_address {
            let router = metrics::router(metrics.clone(), live.clone(), snapshot_tx);
            // Metrics are not worth losing the data plane over: a busy
            // port is logged and the agent runs without them.
            match metrics::serve(addr, router).await {
                Ok((local, task)) => {
                    tracing::info!(address = %local, "metrics, /healthz and /readyz listening");
                    metrics_addr = Some(local);
                    servers.push(task);
                }
                Err(e) => {
                    tracing::error!(address = %addr, error = %e, "cannot listen for metrics; running without them");
                }
            }
        }
        let (api_tx, api_rx) = mpsc::channel(16);
        let sock = applier.config().node.api_socket.clone();
        // Like metrics: a socket in use is logged, the data plane matters more.
        let socket = match api::serve(&sock, api::router(api_tx)).await {
            Ok(s) => {
                tracing::info!(socket = %sock.display(), "control API listening");
                Some(s)
            }
            Err(e) => {
                tracing::error!(socket = %sock.display(), error = %e, "no control API");
                None
            }
        };
        // Attached and the config applied (Applier::new planned it).
        live.set_ready(true);
        let mut agent = Self {
            applier,
            passive: PassiveMonitor::new(opts.passive),
            opts,
            probers: BTreeMap::new(),
            events_tx,
            events_rx,
            scrapers: BTreeMap::new(),
            load_tx,
            load_rx,
            reload_tx,
            reload_rx,
            watch,
            metrics,
            live,
            snapshot_rx,
            metrics_addr,
            servers,
            api_rx,
            socket,
            config_generation: 1,
            probe_latency: BTreeMap::new(),
            drill: None,
            last_drill: None,
        };
        agent.sync_probers();
        agent.sync_scrapers();
        tracing::info!(
            config = %agent.opts.config_path.display(),
            services = agent.applier.config().services.len(),
            backends = agent.applier.config().backends.len(),
            probers = agent.probers.len(),
            load_scrapes = agent.scrapers.len(),
            passive = agent.passive.len(),
            "agent started"
        );
        Ok(agent)
    }

    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    pub fn applier_mut(&mut self) -> &mut Applier {
        &mut self.applier
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The control socket, when it is served.
    pub fn api_socket(&self) -> Option<&std::path::Path> {
        self.socket.as_ref().map(api::Socket::path)
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle(self.reload_tx.clone())
    }

    /// Backends with a running prober.
    pub fn probed(&self) -> impl Iterator<Item = &str> {
        self.probers.keys().map(String::as_str)
    }

    /// Runs until `shutdown` completes, then returns, leaving the data
    /// plane as it is (pinned, attached, forwarding).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Self, AgentError> {
        tokio::pin!(shutdown);
        let mut hup: Option<Signal> = if self.opts.sighup {
            Some(signal(SignalKind::hangup()).map_err(AgentError::Signal)?)
        } else {
            None
        };
        let mut drill_tick = tokio::time::interval(crate::drill::SAMPLE_INTERVAL);
        drill_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut file_tick = tokio::time::interval(reload::POLL_INTERVAL);
        file_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sweep_tick = tokio::time::interval(SWEEP_INTERVAL);
        sweep_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.live.beat();
            // Nudges wait a little after the last switch (see
            // `Applier::nudge_due`).
            let nudge_at = self.applier.nudge_due(NUDGE_DELAY, NUDGE_MAX_WAIT);
            let hold = self.applier.hold_deadline();
            let expiry = self.applier.next_expiry();
            let grace = self.applier.grace_deadline();
            let passive_due = self.passive.next_due();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(ev) = self.events_rx.recv() => self.on_events(ev),
                () = sleep_until(passive_due), if passive_due.is_some() => self.on_passive_tick(),
                Some(ev) = self.load_rx.recv() => self.on_load(ev),
                () = sleep_until(nudge_at), if nudge_at.is_some() => self.applier.flush_nudges(),
                () = sleep_until(hold), if hold.is_some() => {
                    match self.applier.end_hold(Instant::now()) {
                        Ok(report) => {
                            for (service, _) in &report.flipped {
                                self.metrics.ring_switched(service, Trigger::StartupHold);
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "apply failed"),
                    }
                }
                Some(cmd) = self.api_rx.recv() => self.on_command(cmd),
                _ = drill_tick.tick(), if self.drill.is_some() => self.on_drill_tick(),
                () = sleep_until(expiry), if expiry.is_some() => {
                    let before = self.generations();
                    if let Err(e) = self.applier.expire_overrides(Instant::now()) {
                        tracing::error!(error = %e, "clearing an override failed");
                    }
                    self.count_switches(&before, Trigger::Operator);
                }
                () = sleep_until(grace), if grace.is_some() => {
                    let before = self.generations();
                    if let Err(e) = self.applier.end_graces(Instant::now()) {
                        tracing::error!(error = %e, "ending a slow grace failed");
                    }
                    self.count_switches(&before, Trigger::Health);
                }
                Some(reply) = self.snapshot_rx.recv() => {
                    // The scrape may have timed out and gone: nothing to do.
                    let _ = reply.send(self.snapshot());
                }
                Some(()) = recv_signal(&mut hup) => {
                    tracing::info!("SIGHUP: reloading config");
                    self.reload();
                }
                Some(()) = self.reload_rx.recv() => self.reload(),
                _ = sweep_tick.tick() => match self.applier.expire_idle() {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(flows = n, "idle flows expired"),
                    Err(e) => tracing::warn!(error = %e, "idle flow sweep failed"),
                },
                _ = file_tick.tick() => {
                    if self.watch.changed() {
                        tracing::info!(config = %self.watch.path().display(), "config file changed");
                        self.reload();
                    }
                }
            }
        }
        self.applier.flush_audit();
        tracing::info!("agent stopping; the data plane keeps running on its last state");
        Ok(self)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn recv_signal(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}
