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
pub mod grace;
pub mod ids;
pub mod journal;
pub mod latency;
mod operator;
pub mod operator_state;
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
    api::{self, ApiError, Command},
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
    api_rx: mpsc::Receiver<Command>,
    /// The control socket; removed when the agent is dropped.
    socket: Option<api::Socket>,
    /// 1 at start, +1 per applied config change.
    config_generation: u64,
    /// Latency of the probe behind each backend's last state change.
    probe_latency: BTreeMap<String, Duration>,
    drill: Option<ActiveDrill>,
    last_drill: Option<crate::drill::DrillReport>,
}

/// A drill in progress (see [`crate::drill`]).
struct ActiveDrill {
    report: crate::drill::DrillReport,
    began: Instant,
    fault_at: Instant,
    restore_at: Instant,
    end_at: Instant,
    /// Targets and their verdict before the fault, restored after it.
    prev: Vec<(String, HealthState)>,
    faulted: bool,
    restored: bool,
    /// Pool backends and their ids.
    pool: Vec<(String, u32)>,
    service_id: Option<u32>,
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

/// How long nudges wait after a backend went down. Nudging reads the whole
/// flow table; backends lost together (a cloud) are ejected within a few
/// milliseconds of each other, and none of their switches may wait for it.
/// A stalled client is still reset well under a second.
const NUDGE_DELAY: Duration = Duration::from_millis(5);

impl Agent {
    /// Loads and validates the config (refusing to start on a bad one),
    /// takes over the data plane at `node.pin_path`, programs it, attaches
    /// to the interfaces and starts the probers. Call inside a tokio
    /// runtime.
    pub async fn start(opts: RunOptions) -> Result<Self, AgentError> {
        let watch = reload::FileWatch::new(&opts.config_path);
        let cfg = load_logged(&opts.config_path)?;
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

    /// The control socket, when it is served.
    pub fn api_socket(&self) -> Option<&std::path::Path> {
        self.socket.as_ref().map(api::Socket::path)
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
        let now = Instant::now();
        let a = &self.applier;
        let dp = a.dataplane();
        let cfg = a.config();
        let ids = a.ids();
        let effective = a.effective_weights();
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
                let damping = self
                    .probers
                    .get(&b.name)
                    .map(|s| s.prober.flap_state())
                    .unwrap_or_default();
                metrics::BackendSnapshot {
                    name: b.name.clone(),
                    tier: b.tier,
                    weight: b.weight,
                    effective_weight: effective.get(&b.name).copied().unwrap_or(0),
                    health: match a.health(&b.name) {
                        HealthState::Up => "up",
                        HealthState::Degraded => "degraded",
                        HealthState::Down => "down",
                        HealthState::Unknown => "unknown",
                    },
                    dataplane,
                    flaps: damping.flaps,
                    hold_down: damping
                        .held_until
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
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
                .map(|c| (c.reason.as_str(), c.reason.verdict().as_str(), c.count))
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
            syns_in_floods: self.passive.suspended_total(),
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
                Some(self.metrics.probe_durations(&name)),
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
        match load_logged(&path) {
            Err(e) => {
                for fe in e.errors() {
                    tracing::error!(origin = %fe.origin, line = fe.line, field = %fe.field, message = %fe.message, "config error");
                }
                log_warnings(e.warnings());
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
                    self.config_generation += 1;
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
        // Every probe's duration is already in the metrics (the prober
        // observes it); the API keeps the one behind the last change.
        for ev in &batch {
            if let Some(l) = ev.latency {
                self.probe_latency.insert(ev.backend.to_string(), l);
            }
        }
        self.apply_health(&batch);
        for ev in &batch {
            self.audit_hold_down(ev);
        }
    }

    /// Audits the hold-down a prober's fall starts (it publishes its flap
    /// state before sending the event, and logs both).
    fn audit_hold_down(&self, ev: &HealthEvent) {
        let Some(slot) = self.probers.get(&*ev.backend) else {
            return;
        };
        if let Some(reason) = hold_down_note(ev, slot.prober.flap_state()) {
            self.applier.record_damping(&ev.backend, &reason);
        }
    }

    /// Plans and applies a batch of health changes, with their metrics.
    fn apply_health(&mut self, batch: &[HealthEvent]) {
        let trigger = if batch.iter().any(|e| e.source == EventSource::Passive) {
            Trigger::Passive
        } else {
            Trigger::Health
        };
        match self.applier.on_health(batch) {
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
        // A sweep reads every backend: one batched syscall, not one each.
        let batch = match self.passive.max_id() {
            Some(max) if self.passive.sweep_due(now) => dp
                .backend_stats_batch(max + 1)
                .inspect_err(|e| tracing::debug!(error = %e, "BE_STATS batch read failed"))
                .ok(),
            _ => None,
        };
        let ejections = self.passive.poll(now, |id| {
            match batch.as_ref().and_then(|b| b.get(id as usize)) {
                Some(s) => Ok(*s),
                None => dp.backend_stats(id),
            }
        });
        if ejections.is_empty() {
            return;
        }
        let mut events = Vec::with_capacity(ejections.len());
        for e in ejections {
            tracing::warn!(backend = %e.backend, backend_id = e.id, reason = %e.why, "passive ejection");
            if let Err(err) = self.applier.mark_down(&e.backend, now) {
                tracing::error!(backend = %e.backend, error = %err, "writing DOWN failed");
            }
            events.push(HealthEvent {
                backend: e.backend.as_str().into(),
                from: self.applier.health(&e.backend),
                to: HealthState::Down,
                reason: health::Reason::new(format!("passive: {}", e.why), Some(e.why.failure())),
                latency: None,
                source: EventSource::Passive,
                at: now,
            });
        }
        // Re-plan now rather than after the round trip through the probers
        // (their own Down event follows and changes nothing): several
        // backends lost together leave the rings in one switch.
        self.apply_health(&events);
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
        // Nudges wait a little after a switch (see `Applier::flush_nudges`).
        let mut nudge_at: Option<Instant> = None;
        loop {
            self.live.beat();
            if nudge_at.is_none() && self.applier.has_nudges() {
                nudge_at = Some(Instant::now() + NUDGE_DELAY);
            }
            let hold = self.applier.hold_deadline();
            let expiry = self.applier.next_expiry();
            let grace = self.applier.grace_deadline();
            let passive_due = self.passive.next_due();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(ev) = self.events_rx.recv() => self.on_events(ev),
                () = sleep_until(passive_due), if passive_due.is_some() => self.on_passive_tick(),
                () = sleep_until(nudge_at), if nudge_at.is_some() => {
                    nudge_at = None;
                    self.applier.flush_nudges();
                }
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

impl Agent {
    fn on_command(&mut self, cmd: Command) {
        // A requester that gave up is no error: send results are ignored.
        match cmd {
            Command::Status(r) => {
                let _ = r.send(Ok(self.api_status()));
            }
            Command::Backends(r) => {
                let _ = r.send(Ok(self.api_backends()));
            }
            Command::Flows(q, r) => {
                let _ = r.send(self.api_flows(&q));
            }
            Command::Drain {
                backend,
                on,
                force,
                reply,
            } => {
                let _ = reply.send(self.api_drain(&backend, on, force));
            }
            Command::Failover {
                service,
                tier,
                duration,
                force,
                reply,
            } => {
                let _ = reply.send(self.api_failover(&service, tier, duration, force));
            }
            Command::CancelFailover { service, reply } => {
                let _ = reply.send(self.api_cancel_failover(&service));
            }
            Command::Drill {
                req,
                duration,
                reply,
            } => {
                let _ = reply.send(self.start_drill(&req, duration));
            }
            Command::DrillReport(r) => {
                let out = match (&self.drill, &self.last_drill) {
                    (Some(d), _) => Ok(d.report.clone()),
                    (None, Some(r)) => Ok(r.clone()),
                    (None, None) => Err(ApiError::not_found("no drill has run")),
                };
                let _ = r.send(out);
            }
        }
    }

    fn start_drill(
        &mut self,
        req: &crate::drill::DrillRequest,
        duration: Duration,
    ) -> Result<crate::drill::DrillReport, ApiError> {
        if self.drill.is_some() {
            return Err(ApiError::conflict("a drill is already running"));
        }
        let cfg = self.applier.config();
        let svc = cfg
            .service(&req.service)
            .ok_or_else(|| ApiError::not_found(format!("no service named {:?}", req.service)))?;
        let targets: Vec<String> = match (&req.backend, req.tier) {
            (Some(b), None) => {
                if !svc.backends.contains(b) {
                    return Err(ApiError::not_found(format!(
                        "service {} has no backend named {b:?}",
                        svc.name
                    )));
                }
                vec![b.clone()]
            }
            (None, Some(t)) => svc
                .backends
                .iter()
                .filter(|b| cfg.backend(b).is_some_and(|x| x.tier == t))
                .cloned()
                .collect(),
            _ => {
                return Err(ApiError::new(400, "name either a backend or a tier"));
            }
        };
        let targets: Vec<String> = targets.into_iter().filter(|b| self.healthy(b)).collect();
        if targets.is_empty() {
            return Err(ApiError::conflict(
                "nothing to drill: no healthy backend matches",
            ));
        }
        let forced = self.check_action(
            crate::planner::Action::MarkDown {
                service: &svc.name,
                backends: &targets,
            },
            req.force,
        )?;
        if let Some(r) = &forced {
            self.applier.record_forced(
                &format!("drill of {} in {}", targets.join(", "), svc.name),
                r,
            );
        }
        let ids = self.applier.ids();
        let pool: Vec<(String, u32)> = svc
            .backends
            .iter()
            .filter_map(|b| ids.backend(b).map(|a| (b.clone(), a.id)))
            .collect();
        let service_id = ids.service(&svc.name).map(|a| a.id);
        let prev = targets
            .iter()
            .map(|b| (b.clone(), self.applier.health(b)))
            .collect();
        let began = Instant::now();
        let fault_at = began + crate::drill::BASELINE;
        let restore_at = fault_at + duration;
        let report = crate::drill::DrillReport {
            service: svc.name.clone(),
            targets: targets.clone(),
            state: "running".into(),
            fault_start_s: crate::drill::BASELINE.as_secs_f64(),
            fault_end_s: (crate::drill::BASELINE + duration).as_secs_f64(),
            samples: Vec::new(),
            failover_ms: None,
            lost_packets: 0,
            took_over: Vec::new(),
        };
        tracing::warn!(service = %svc.name, targets = ?targets, for_s = duration.as_secs_f64(), "drill starting");
        self.drill = Some(ActiveDrill {
            report: report.clone(),
            began,
            fault_at,
            restore_at,
            end_at: restore_at + crate::drill::TAIL,
            prev,
            faulted: false,
            restored: false,
            pool,
            service_id,
        });
        self.on_drill_tick();
        Ok(report)
    }

    /// Injects a verdict for drill targets through the normal apply path
    /// (state write first, then the rings; audited).
    fn drill_events(&mut self, to: &[(String, HealthState)], from: HealthState, why: &str) {
        let now = Instant::now();
        let evs: Vec<HealthEvent> = to
            .iter()
            .map(|(b, st)| HealthEvent {
                backend: b.as_str().into(),
                from,
                to: *st,
                reason: why.into(),
                latency: None,
                source: EventSource::Active,
                at: now,
            })
            .collect();
        let before = self.generations();
        if let Err(e) = self.applier.on_health(&evs) {
            tracing::error!(error = %e, "drill apply failed");
        }
        self.count_switches(&before, Trigger::Operator);
    }

    fn on_drill_tick(&mut self) {
        let Some(mut d) = self.drill.take() else {
            return;
        };
        let now = Instant::now();
        if !d.faulted && now >= d.fault_at {
            d.faulted = true;
            let down: Vec<(String, HealthState)> = d
                .prev
                .iter()
                .map(|(b, _)| (b.clone(), HealthState::Down))
                .collect();
            self.drill_events(&down, HealthState::Up, "drill: marked down");
        }
        if d.faulted && !d.restored && now >= d.restore_at {
            d.restored = true;
            let prev = d.prev.clone();
            self.drill_events(&prev, HealthState::Down, "drill: restored");
        }
        let dp = self.applier.dataplane();
        let packets = d
            .pool
            .iter()
            .map(|(n, id)| {
                (
                    n.clone(),
                    dp.backend_stats(*id).map_or(0, |s| s.traffic.fwd_packets),
                )
            })
            .collect();
        let drops: u64 = dp.reason_counts().map_or(0, |r| {
            r.iter()
                .filter(|c| c.reason.verdict() == failover_common::Verdict::Drop)
                .map(|c| c.count)
                .sum()
        });
        let resets = d
            .service_id
            .and_then(|id| dp.service_stats(id).ok())
            .map_or(0, |s| s.resets);
        d.report.samples.push(crate::drill::Sample {
            t_s: now.duration_since(d.began).as_secs_f64(),
            packets,
            dropped: drops + resets,
        });
        crate::drill::analyze(&mut d.report);
        if d.restored && now >= d.end_at {
            d.report.state = "done".into();
            tracing::info!(
                service = %d.report.service,
                failover_ms = d.report.failover_ms,
                lost_packets = d.report.lost_packets,
                took_over = ?d.report.took_over,
                "drill done"
            );
            self.last_drill = Some(d.report);
        } else {
            self.drill = Some(d);
        }
    }

    fn healthy(&self, backend: &str) -> bool {
        matches!(
            self.applier.health(backend),
            HealthState::Up | HealthState::Degraded
        )
    }

    /// Flows in the table per backend id.
    fn flow_counts(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        match self.applier.dataplane().flows() {
            Ok(flows) => {
                for (_, f) in flows {
                    *out.entry(f.backend_id).or_insert(0) += 1;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the flow table failed"),
        }
        out
    }

    fn api_status(&self) -> api::Status {
        let cfg = self.applier.config();
        let now = Instant::now();
        let links = cfg.node.pin_path.join("links");
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let p = self.applier.programmed(&s.name);
                let serving = p.map(|p| p.to.clone()).unwrap_or_default();
                let (healthy, backends, excluded) = pool_counts(cfg, s, |b| self.healthy(b));
                api::ServiceStatus {
                    name: s.name.clone(),
                    endpoint: format!(
                        "{}:{}/{}",
                        s.vip,
                        s.port,
                        format!("{:?}", s.protocol).to_lowercase()
                    ),
                    active_tier: serving
                        .iter()
                        .filter_map(|n| cfg.backend(n).map(|b| b.tier))
                        .min(),
                    generation: p.map_or(0, |p| p.entry.generation),
                    healthy,
                    backends,
                    excluded,
                    serving,
                    override_: self
                        .applier
                        .override_of(&s.name)
                        .map(|o| api::OverrideInfo {
                            tier: o.ov.to_tier,
                            expires_in_s: o.until.remaining(now).as_secs_f64(),
                        }),
                }
            })
            .collect();
        api::Status {
            node: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            interfaces: cfg.node.interfaces.clone(),
            program_attached: cfg.node.interfaces.iter().all(|i| links.join(i).exists()),
            config_path: self.opts.config_path.display().to_string(),
            config_generation: self.config_generation,
            services,
        }
    }

    fn api_backends(&self) -> Vec<api::BackendInfo> {
        let snap = self.snapshot();
        let flows = self.flow_counts();
        let cfg = self.applier.config();
        let ids = self.applier.ids();
        snap.backends
            .into_iter()
            .filter_map(|b| {
                let c = cfg.backend(&b.name)?;
                let id = ids.backend(&b.name).map(|a| a.id);
                let st = b.stats.unwrap_or_default();
                Some(api::BackendInfo {
                    address: format!("{}:{}", c.address, c.port),
                    tier: b.tier,
                    weight: b.weight,
                    effective_weight: b.effective_weight,
                    health: b.health.to_owned(),
                    state: b.dataplane.to_owned(),
                    draining: self.applier.is_draining(&b.name),
                    flaps: b.flaps,
                    hold_down_s: b.hold_down.as_secs_f64(),
                    grace_s: self
                        .applier
                        .grace_left(&b.name, Instant::now())
                        .map_or(0.0, |d| d.as_secs_f64()),
                    probe_latency_ms: self
                        .probe_latency
                        .get(&b.name)
                        .map(|d| d.as_secs_f64() * 1e3),
                    passive: api::PassiveSignals {
                        syns: st.syns,
                        synacks: st.synacks,
                        syn_resets: st.syn_rsts,
                        syns_ignored: st.syns_ignored,
                        #[allow(clippy::cast_precision_loss)]
                        rtt_ms: (st.rtt_at_ns != 0).then(|| st.rtt_last_ns as f64 / 1e6),
                    },
                    flows: id.and_then(|i| flows.get(&i).copied()).unwrap_or(0),
                    new_flows_total: st.traffic.new_flows,
                    services: cfg
                        .services
                        .iter()
                        .filter(|s| s.backends.contains(&b.name))
                        .map(|s| s.name.clone())
                        .collect(),
                    name: b.name,
                })
            })
            .collect()
    }

    fn api_flows(&self, q: &api::FlowQuery) -> Result<api::Flows, ApiError> {
        let ids = self.applier.ids();
        let cfg = self.applier.config();
        if let Some(s) = &q.service
            && cfg.service(s).is_none()
        {
            return Err(ApiError::not_found(format!("no service named {s:?}")));
        }
        if let Some(b) = &q.backend
            && cfg.backend(b).is_none()
        {
            return Err(ApiError::not_found(format!("no backend named {b:?}")));
        }
        let want_svc = q
            .service
            .as_deref()
            .and_then(|s| ids.service(s))
            .map(|a| a.id);
        let want_be = q
            .backend
            .as_deref()
            .and_then(|b| ids.backend(b))
            .map(|a| a.id);
        let flows = self
            .applier
            .dataplane()
            .flows()
            .map_err(|e| ApiError::new(500, format!("reading the flow table: {e}")))?;
        let now_ns = crate::dataplane::monotonic_ns();
        let mut out: Vec<(u64, api::FlowInfo)> = flows
            .into_iter()
            .filter(|(_, f)| want_svc.is_none_or(|i| f.service_id == i))
            .filter(|(_, f)| want_be.is_none_or(|i| f.backend_id == i))
            .map(|(k, f)| {
                let service = cfg
                    .services
                    .iter()
                    .find(|s| ids.service(&s.name).is_some_and(|a| a.id == f.service_id))
                    .map_or_else(|| format!("#{}", f.service_id), |s| s.name.clone());
                let backend = ids
                    .backend_name(f.backend_id)
                    .map_or_else(|| format!("#{}", f.backend_id), str::to_owned);
                let ip = |be: u32| std::net::Ipv4Addr::from(u32::from_be(be));
                #[allow(clippy::cast_precision_loss)]
                let age_s = now_ns.saturating_sub(f.created_ns) as f64 / 1e9;
                (
                    f.created_ns,
                    api::FlowInfo {
                        client: format!("{}:{}", ip(k.src_be), u16::from_be(k.sport_be)),
                        vip: format!("{}:{}", ip(k.dst_be), u16::from_be(k.dport_be)),
                        protocol: match k.proto {
                            6 => "tcp".to_owned(),
                            17 => "udp".to_owned(),
                            p => p.to_string(),
                        },
                        service,
                        backend,
                        nat_port: u16::from_be(f.nat_port_be),
                        age_s,
                    },
                )
            })
            .collect();
        let total = out.len();
        out.sort_by_key(|(created, _)| *created);
        out.truncate(q.limit.unwrap_or(50));
        Ok(api::Flows {
            total,
            flows: out.into_iter().map(|(_, f)| f).collect(),
        })
    }
}

/// A service's `status` counts: of the pool's backends its sovereignty
/// policy admits (the only ones it may ever use), how many are `healthy`
/// and how many there are; and how many the policy excludes.
fn pool_counts(
    cfg: &Config,
    service: &config::Service,
    healthy: impl Fn(&str) -> bool,
) -> (usize, usize, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let (admitted, excluded): (Vec<&str>, Vec<&str>) = service
        .backends
        .iter()
        .map(String::as_str)
        .filter(|name| seen.insert(*name))
        .partition(|name| cfg.backend(name).is_some_and(|b| service.policy.admits(b)));
    let up = admitted.iter().filter(|name| healthy(name)).count();
    (up, admitted.len(), excluded.len())
}

/// Loads the config; its warnings are logged (a refusal's errors are the
/// caller's to report).
fn load_logged(path: &std::path::Path) -> Result<Config, ConfigError> {
    let loaded = config::load_checked(path)?;
    log_warnings(&loaded.warnings);
    Ok(loaded.config)
}

fn log_warnings(warnings: &[config::FieldError]) {
    for w in warnings {
        tracing::warn!(origin = %w.origin, line = w.line, field = %w.field, message = %w.message, "config warning");
    }
}

/// The audit reason for a fall that holds the backend's recovery down;
/// `None` for any other event. A hold starts only with a fall (or is
/// restarted while down, which reports nothing): one record per episode.
fn hold_down_note(ev: &HealthEvent, f: health::FlapState) -> Option<String> {
    if ev.to != HealthState::Down || !ev.from.is_serving() {
        return None;
    }
    let hold = f.held_until?.saturating_duration_since(ev.at);
    let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
    Some(format!(
        "recovery held down for {} (flap {} in a row; {})",
        humantime::format_duration(Duration::from_millis(ms)),
        f.flaps,
        ev.reason
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_only_the_backends_the_policy_admits() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples/two-clouds.yaml"),
        )
        .unwrap();
        let mut cfg = config::parse(&text, "two-clouds.yaml").unwrap();
        // fraud: eu-fraud-1, eu-fraud-2 (EU, admitted), us-fraud-1 (US,
        // excluded); two more US backends make it five, two admitted.
        let fraud = cfg.services.iter().position(|s| s.name == "fraud").unwrap();
        for name in ["us-fraud-2", "us-fraud-3"] {
            let mut b = cfg.backend("us-fraud-1").unwrap().clone();
            b.name = name.into();
            cfg.backends.push(b);
            cfg.services[fraud].backends.push(name.into());
        }
        let svc = &cfg.services[fraud];
        // Everything up: 2 of the 2 it may use, not 5 of 5.
        assert_eq!(pool_counts(&cfg, svc, |_| true), (2, 2, 3));
        // Failing closed (its EU backends down) while the US ones are up:
        // none of 2, not 3 of 5.
        assert_eq!(pool_counts(&cfg, svc, |b| b.starts_with("us-")), (0, 2, 3));
        // No policy: the whole pool.
        let chat = cfg.service("chat").unwrap();
        assert_eq!(pool_counts(&cfg, chat, |b| b != "a1"), (3, 4, 0));
    }

    #[test]
    fn only_a_fall_into_a_hold_down_is_audited() {
        let at = Instant::now();
        let ev = |from, to| HealthEvent {
            backend: "b1".into(),
            from,
            to,
            reason: "passive: 2 SYNs refused with RST".into(),
            latency: None,
            source: EventSource::Passive,
            at,
        };
        let held = health::FlapState {
            flaps: 3,
            held_until: Some(at + Duration::from_secs(2)),
        };
        assert_eq!(
            hold_down_note(&ev(HealthState::Up, HealthState::Down), held).as_deref(),
            Some("recovery held down for 2s (flap 3 in a row; passive: 2 SYNs refused with RST)")
        );
        let first = health::FlapState {
            flaps: 1,
            held_until: None,
        };
        for (from, to, f) in [
            (HealthState::Degraded, HealthState::Down, first),
            (HealthState::Down, HealthState::Up, held),
            (HealthState::Unknown, HealthState::Down, held),
            (HealthState::Up, HealthState::Degraded, held),
        ] {
            assert_eq!(hold_down_note(&ev(from, to), f), None, "{from} -> {to}");
        }
    }
}
