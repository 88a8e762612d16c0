//! The running agent: probes every backend, turns health changes into
//! plans, and programs the data plane ([`apply`]).
//!
//! One task owns the data plane and every piece of state; it waits on
//! health events, the passive-check tick, the start-up hold, SIGHUP and
//! the config file check. Nothing is shared, so nothing is locked, and an
//! apply is never interleaved with another.
//!
//! Dead-man rule: the maps and the XDP link are pinned. If this process
//! stalls, crashes or exits (SIGTERM included), the data plane keeps its
//! last good state and keeps forwarding. Only `failover-agent detach`
//! removes it, deliberately.

pub mod apply;
pub mod ids;
pub mod journal;
pub mod latency;
pub mod passive;
pub mod reload;

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
    audit::AuditError,
    config::{self, Config, ConfigError},
    dataplane::{Dataplane, DataplaneError},
    health::{
        self, BackendTarget, EventSource, HealthEvent, HealthState, PassiveConfig, Prober,
        TlsOptions,
    },
    metrics::{self, Liveness, Metrics, Snapshot, SnapshotRequest, Trigger},
};

pub use apply::{Applier, ApplyOptions, ApplyReport, Decision, Programmed};
pub use ids::{IdError, Ids};
pub use journal::Journal;
pub use latency::Percentiles;
pub use passive::PassiveMonitor;

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

/// Which probe each backend gets: the probe of the first service (in
/// config order) that lists it. A backend in no service is not probed.
pub fn probe_targets(cfg: &Config) -> BTreeMap<String, (BackendTarget, config::Probe)> {
    let mut out = BTreeMap::new();
    for svc in &cfg.services {
        for name in &svc.backends {
            if out.contains_key(name) {
                continue;
            }
            if let Some(b) = cfg.backend(name) {
                out.insert(name.clone(), (BackendTarget::from(b), svc.probe.clone()));
            }
        }
    }
    out
}

struct ProberSlot {
    prober: Prober,
    target: BackendTarget,
    probe: config::Probe,
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
    probers: BTreeMap<String, ProberSlot>,
    passive: PassiveMonitor,
    events_tx: mpsc::Sender<HealthEvent>,
    events_rx: mpsc::Receiver<HealthEvent>,
    reload_tx: mpsc::Sender<()>,
    reload_rx: mpsc::Receiver<()>,
    watch: reload::FileWatch,
    metrics: Arc<Metrics>,
    live: Arc<Liveness>,
    snapshot_rx: mpsc::Receiver<SnapshotRequest>,
    metrics_addr: Option<SocketAddr>,
    /// Listener tasks (metrics), stopped when the agent is dropped.
    servers: Vec<tokio::task::JoinHandle<()>>,
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

impl Agent {
    /// Loads and validates the config (refusing to start on a bad one),
    /// takes over the data plane at `node.pin_path`, programs it, attaches
    /// to the interfaces and starts the probers. Call inside a tokio
    /// runtime.
    pub async fn start(opts: RunOptions) -> Result<Self, AgentError> {
        let watch = reload::FileWatch::new(&opts.config_path);
        let cfg = config::load(&opts.config_path)?;
        let journal = opts.audit_path.as_deref().map(Journal::open).transpose()?;
        let dp = Dataplane::load(&cfg.node.pin_path)?;
        let mut applier = Applier::new(
            dp,
            cfg,
            ApplyOptions {
                journal,
                startup_hold: opts.startup_hold,
            },
        )?;
        // Maps first, then the program: it starts on a coherent state.
        applier.attach()?;
        let (events_tx, events_rx) = mpsc::channel(1024);
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
        // Attached and the config applied (Applier::new planned it).
        live.set_ready(true);
        let mut agent = Self {
            applier,
            passive: PassiveMonitor::new(opts.passive),
            opts,
            probers: BTreeMap::new(),
            events_tx,
            events_rx,
            reload_tx,
            reload_rx,
            watch,
            metrics,
            live,
            snapshot_rx,
            metrics_addr,
            servers,
        };
        agent.sync_probers();
        tracing::info!(
            config = %agent.opts.config_path.display(),
            services = agent.applier.config().services.len(),
            backends = agent.applier.config().backends.len(),
            probers = agent.probers.len(),
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

    /// Ring generation of every programmed service.
    fn generations(&self) -> BTreeMap<String, u64> {
        self.applier
            .config()
            .services
            .iter()
            .filter_map(|s| {
                self.applier
                    .programmed(&s.name)
                    .map(|p| (s.name.clone(), p.entry.generation))
            })
            .collect()
    }

    /// Counts the ring switches since `before` (from generations).
    fn count_switches(&self, before: &BTreeMap<String, u64>, trigger: Trigger) {
        for (name, generation) in self.generations() {
            if before.get(&name) != Some(&generation) {
                self.metrics.ring_switched(&name, trigger);
            }
        }
    }

    /// State and data-plane counters for a scrape.
    pub fn snapshot(&self) -> Snapshot {
        let a = &self.applier;
        let dp = a.dataplane();
        let cfg = a.config();
        let ids = a.ids();
        let backends = cfg
            .backends
            .iter()
            .map(|b| {
                let id = ids.backend(&b.name).map(|x| x.id);
                let dataplane = id
                    .and_then(|id| dp.backend(id).ok())
                    .map_or("unused", |m| match m.state {
                        failover_common::state::UP => "up",
                        failover_common::state::DOWN => "down",
                        failover_common::state::DRAINING => "draining",
                        _ => "unused",
                    });
                metrics::BackendSnapshot {
                    name: b.name.clone(),
                    tier: b.tier,
                    weight: b.weight,
                    health: match a.health(&b.name) {
                        HealthState::Up => "up",
                        HealthState::Degraded => "degraded",
                        HealthState::Down => "down",
                        HealthState::Unknown => "unknown",
                    },
                    dataplane,
                    stats: id.and_then(|id| dp.backend_stats(id).ok()),
                }
            })
            .collect();
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let p = a.programmed(&s.name);
                metrics::ServiceSnapshot {
                    name: s.name.clone(),
                    generation: p.map_or(0, |p| p.entry.generation),
                    active_tier: p.and_then(|p| {
                        p.to.iter()
                            .filter_map(|n| cfg.backend(n).map(|b| b.tier))
                            .min()
                    }),
                    stats: ids
                        .service(&s.name)
                        .and_then(|x| dp.service_stats(x.id).ok()),
                }
            })
            .collect();
        let reasons = match dp.reason_counts() {
            Ok(r) => r
                .into_iter()
                .map(|c| (c.reason.as_str(), c.reason.verdict(), c.count))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading verdict counters failed");
                Vec::new()
            }
        };
        Snapshot {
            services,
            backends,
            reasons,
        }
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle(self.reload_tx.clone())
    }

    /// Backends with a running prober.
    pub fn probed(&self) -> impl Iterator<Item = &str> {
        self.probers.keys().map(String::as_str)
    }

    /// Starts and stops probers (and passive watches) to match the config.
    fn sync_probers(&mut self) {
        let cfg = self.applier.config();
        let want = probe_targets(cfg);
        let ids = self.applier.ids().clone();
        self.probers.retain(|name, slot| {
            let keep = want
                .get(name)
                .is_some_and(|(t, p)| *t == slot.target && *p == slot.probe);
            if !keep {
                tracing::info!(backend = %name, "prober stopped");
            }
            keep
        });
        let probed: Vec<String> = self.probers.keys().cloned().collect();
        for name in probed {
            if !want.contains_key(&name) {
                self.passive.unwatch(&name);
            }
        }
        for (name, (target, probe)) in want {
            if self.probers.contains_key(&name) {
                continue;
            }
            let Some(id) = ids.backend(&name).map(|a| a.id) else {
                continue;
            };
            match health::spawn_prober(
                target.clone(),
                &probe,
                &self.opts.tls,
                self.events_tx.clone(),
            ) {
                Ok(prober) => {
                    if probe.passive {
                        self.passive.watch(&name, id, Some(prober.ejector()));
                    } else {
                        self.passive.unwatch(&name);
                    }
                    tracing::info!(backend = %name, backend_id = id, kind = ?probe.kind, addr = %target.addr, "prober started");
                    self.probers.insert(
                        name,
                        ProberSlot {
                            prober,
                            target,
                            probe,
                        },
                    );
                }
                Err(e) => {
                    // It stays without a verdict: out of rings once the
                    // start-up hold ends.
                    tracing::error!(backend = %name, error = %e, "cannot build probe");
                    self.passive.unwatch(&name);
                }
            }
        }
        // Probers whose backend left the config.
        let gone: Vec<String> = self
            .probers
            .keys()
            .filter(|n| ids.backend(n).is_none())
            .cloned()
            .collect();
        for n in gone {
            self.probers.remove(&n);
            self.passive.unwatch(&n);
        }
        debug_assert!(self.probers.values().all(|s| !s.prober.is_finished()));
    }

    /// Reloads the config file: a bad one is refused and logged, and the
    /// running state is kept; a good one is applied as a diff.
    pub fn reload(&mut self) {
        let before = self.generations();
        self.reload_config();
        self.count_switches(&before, Trigger::ConfigReload);
    }

    fn reload_config(&mut self) {
        self.watch.mark_seen();
        let path = self.opts.config_path.clone();
        match config::load(&path) {
            Err(e) => {
                for fe in e.errors() {
                    tracing::error!(origin = %fe.origin, line = fe.line, field = %fe.field, message = %fe.message, "config error");
                }
                if e.errors().is_empty() {
                    tracing::error!(error = %e, "config unreadable");
                }
                tracing::error!(config = %path.display(), "reload refused; running config kept");
                self.applier.refuse_reload(&e);
            }
            Ok(new) => match self.applier.reload(new, Instant::now()) {
                Ok(diff) if diff.is_empty() => {
                    tracing::info!(config = %path.display(), "config unchanged");
                }
                Ok(diff) => {
                    tracing::info!(config = %path.display(), %diff, "config reloaded");
                    self.sync_probers();
                }
                Err(e) => {
                    tracing::error!(error = %e, "applying the reloaded config failed");
                    self.sync_probers();
                }
            },
        }
    }

    fn on_events(&mut self, first: HealthEvent) {
        let mut batch = vec![first];
        while batch.len() < EVENT_BATCH {
            match self.events_rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        for ev in &batch {
            if let Some(l) = ev.latency {
                self.metrics.probe_latency(&ev.backend, l);
            }
        }
        let trigger = if batch.iter().any(|e| e.source == EventSource::Passive) {
            Trigger::Passive
        } else {
            Trigger::Health
        };
        match self.applier.on_health(&batch) {
            Ok(report) => {
                for (service, _) in &report.flipped {
                    self.metrics.ring_switched(service, trigger);
                }
                if let Some(l) = report.latency {
                    self.metrics.apply_latency(l);
                }
            }
            Err(e) => {
                // The data plane keeps its last good state; the next event
                // re-plans from scratch.
                tracing::error!(error = %e, "apply failed");
            }
        }
    }

    fn on_passive_tick(&mut self) {
        let now = Instant::now();
        let dp = self.applier.dataplane();
        let ejections = self.passive.poll(now, |id| dp.backend_stats(id));
        for e in ejections {
            tracing::warn!(backend = %e.backend, backend_id = e.id, reason = %e.why, "passive ejection");
            if let Err(err) = self.applier.mark_down(&e.backend, now) {
                tracing::error!(backend = %e.backend, error = %err, "writing DOWN failed");
            }
        }
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
        let mut passive_tick = tokio::time::interval(passive::POLL_INTERVAL);
        passive_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut file_tick = tokio::time::interval(reload::POLL_INTERVAL);
        file_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.live.beat();
            let hold = self.applier.hold_deadline();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(ev) = self.events_rx.recv() => self.on_events(ev),
                _ = passive_tick.tick(), if !self.passive.is_empty() => self.on_passive_tick(),
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
                Some(reply) = self.snapshot_rx.recv() => {
                    // The scrape may have timed out and gone: nothing to do.
                    let _ = reply.send(self.snapshot());
                }
                Some(()) = recv_signal(&mut hup) => {
                    tracing::info!("SIGHUP: reloading config");
                    self.reload();
                }
                Some(()) = self.reload_rx.recv() => self.reload(),
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
