//! Prometheus metrics and the agent's own health endpoints, served on
//! `node.metrics_address` (read only: nothing here changes state).
//!
//! Two kinds of series:
//! - Events (ring switches and apply durations, seen by the control loop;
//!   probe durations, observed by each prober task) live in [`Metrics`],
//!   shared with the HTTP task; they are atomics or short uncontended
//!   locks, so neither the loop nor a prober waits for a scrape.
//! - State and data-plane counters (backend state, per-CPU packet
//!   counters, ring generations) are read at scrape time: the HTTP task
//!   asks the control loop, which owns the data plane, for a [`Snapshot`].
//!
//! `/healthz` answers from a heartbeat the loop bumps on every wake-up
//! (it wakes at least once a second); `/readyz` from a flag set once the
//! program is attached and the config applied. Neither goes through the
//! loop, so a stalled loop shows as unhealthy instead of hanging.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use failover_common::{BackendStats, Reason, ServiceStats};
use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};

use crate::agent::states::{DataplaneState, HealthState};

/// A control loop that has not woken for this long is reported dead.
pub const HEALTHZ_STALE: Duration = Duration::from_secs(10);

/// How long a scrape waits for the control loop's snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    service: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendDir {
    backend: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceDir {
    service: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    backend: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Data-plane reasons of SYN-shaped segments that never reach the passive
/// detector (dropped before they are counted as SYNs).
const EVIDENCE_DROPS: [Reason; 2] = [Reason::BadTcpFlags, Reason::BadL4Checksum];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn probe_histogram() -> Histogram {
    // 0.5 ms .. ~4 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// What triggered a ring switch (the `reason` label of
/// `failover_failover_events_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Trigger {
    /// Active probe verdicts.
    Health,
    /// Passive (data-plane) signals.
    Passive,
    /// Drain, undrain or override from the control API.
    Operator,
    ConfigReload,
    StartupHold,
    /// A load factor changed (`crate::load`).
    Load,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Series fed by the control loop as things happen.
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    last_event: Family<ServiceLabel, Gauge<f64, AtomicU64>>,
    apply_seconds: Histogram,
    probe_seconds: HistogramFamily<BackendLabel>,
    load: LoadSeries,
}

/// The load facet's series (`crate::load`), fed by the control loop.
#[derive(Default)]
struct LoadSeries {
    factor: Family<BackendLabel, Gauge<f64, AtomicU64>>,
    waiting: Family<BackendLabel, Gauge<f64, AtomicU64>>,
    running: Family<BackendLabel, Gauge<f64, AtomicU64>>,
    kv: Family<BackendLabel, Gauge<f64, AtomicU64>>,
    errors: Family<BackendReason, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendReason {
    backend: String,
    reason: String,
}

impl LoadSeries {
    fn register(&self, r: &mut Registry) {
        r.register(
            "load_factor",
            "Factor on the backend's weight from its model server's load (1: none or no load)",
            self.factor.clone(),
        );
        r.register(
            "load_waiting_requests",
            "Requests waiting, as the backend's metrics last said",
            self.waiting.clone(),
        );
        r.register(
            "load_running_requests",
            "Requests running, as the backend's metrics last said",
            self.running.clone(),
        );
        r.register(
            "load_kv_cache_usage_ratio",
            "KV-cache fill (0..1), as the backend's metrics last said",
            self.kv.clone(),
        );
        r.register(
            "load_scrape_errors",
            "Load scrapes refused, by reason; none changes a weight",
            self.errors.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("failover");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "failover_events",
            "Ring switches (failovers and failbacks) by service and trigger",
            events.clone(),
        );
        let last_event = Family::<ServiceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_failover_timestamp_seconds",
            "Unix time of the service's last ring switch",
            last_event.clone(),
        );
        // 10 us .. ~0.33 s
        let apply_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        registry.register(
            "apply_duration_seconds",
            "Decision (health verdict, drain, reload) to completed ring flip",
            apply_seconds.clone(),
        );
        let probe_seconds: HistogramFamily<BackendLabel> =
            Family::new_with_constructor(probe_histogram);
        registry.register(
            "probe_duration_seconds",
            "Duration of every active probe: its measured latency when the backend answers, the time to the failure or timeout otherwise",
            probe_seconds.clone(),
        );
        registry.register(
            "build",
            "Agent build",
            Info::new(vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )]),
        );
        let load = LoadSeries::default();
        load.register(&mut registry);
        Self {
            registry,
            events,
            last_event,
            apply_seconds,
            probe_seconds,
            load,
        }
    }

    /// The load factor `backend`'s weight carries now.
    pub fn load_factor(&self, backend: &str, factor: f64) {
        self.load
            .factor
            .get_or_create(&backend_label(backend))
            .set(factor);
    }

    /// A good load scrape of `backend`.
    pub fn load_figures(&self, backend: &str, f: &crate::load::Figures) {
        let l = backend_label(backend);
        self.load.waiting.get_or_create(&l).set(f.waiting);
        if let Some(r) = f.running {
            self.load.running.get_or_create(&l).set(r);
        }
        if let Some(kv) = f.kv {
            self.load.kv.get_or_create(&l).set(kv);
        }
    }

    /// A load scrape of `backend` refused for `reason`.
    pub fn load_refused(&self, backend: &str, reason: &str) {
        self.load
            .errors
            .get_or_create(&BackendReason {
                backend: backend.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// `backend` is no longer scraped: its gauges go (its error counts
    /// stay, as counters do).
    pub fn load_forget(&self, backend: &str) {
        let l = backend_label(backend);
        for g in [
            &self.load.factor,
            &self.load.waiting,
            &self.load.running,
            &self.load.kv,
        ] {
            g.remove(&l);
        }
    }

    /// One ring switch of `service`.
    pub fn ring_switched(&self, service: &str, trigger: Trigger) {
        self.events
            .get_or_create(&EventLabels {
                service: service.to_owned(),
                reason: trigger.as_str().to_owned(),
            })
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_event
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .set(now);
    }

    pub fn apply_latency(&self, d: Duration) {
        self.apply_seconds.observe(d.as_secs_f64());
    }

    /// One probe of `backend` took `d`.
    pub fn probe_latency(&self, backend: &str, d: Duration) {
        self.probe_durations(backend).observe(d);
    }

    /// `backend`'s probe duration histogram, for its prober task to feed
    /// directly: one lookup (and label allocation) when the prober starts,
    /// none per probe.
    pub fn probe_durations(&self, backend: &str) -> ProbeDurations {
        ProbeDurations(
            self.probe_seconds
                .get_or_create(&BackendLabel {
                    backend: backend.to_owned(),
                })
                .clone(),
        )
    }
}

fn backend_label(backend: &str) -> BackendLabel {
    BackendLabel {
        backend: backend.to_owned(),
    }
}

/// One backend's series of `failover_probe_duration_seconds`. Cheap to
/// clone (shared); observing takes an uncontended lock, no allocation.
#[derive(Clone, Debug)]
pub struct ProbeDurations(Histogram);

impl ProbeDurations {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// A backend as the control loop sees it at scrape time.
#[derive(Clone, Debug, Default)]
pub struct BackendSnapshot {
    pub name: String,
    pub tier: u8,
    pub weight: u32,
    /// The weight it takes new flows with: `weight` scaled by its health
    /// (0 down or drained; a degraded backend's by `degraded_weight`).
    pub effective_weight: u32,
    /// Probe verdict.
    pub health: HealthState,
    /// State in the data plane's `BACKENDS` map.
    pub dataplane: DataplaneState,
    /// Falls not yet forgotten (flap damping).
    pub flaps: u32,
    /// Time left before a recovery is allowed.
    pub hold_down: Duration,
    pub stats: Option<BackendStats>,
}

/// A service as the control loop sees it at scrape time.
#[derive(Clone, Debug, Default)]
pub struct ServiceSnapshot {
    pub name: String,
    /// Generation of the active ring (0 = never programmed).
    pub generation: u64,
    /// Lowest tier among the backends taking new flows.
    pub active_tier: Option<u8>,
    pub stats: Option<ServiceStats>,
}

/// State read at scrape time by the control loop.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<ServiceSnapshot>,
    pub backends: Vec<BackendSnapshot>,
    /// `(reason, verdict, packets)` from the data plane's `STATS`.
    pub reasons: Vec<(&'static str, &'static str, u64)>,
    /// SYNs passive health did not count because of a SYN flood.
    pub syns_in_floods: u64,
    /// Wedge suspicions handed to probers.
    pub wedge_suspicions: u64,
}

pub use crate::agent::states::HEALTH_STATES;
/// Every data-plane state, in the order the metrics list them.
pub const DATAPLANE_STATES: [DataplaneState; 4] = DataplaneState::ALL;

/// A counter per row and direction (`forward`: toward the backend,
/// `reverse`: back to the client).
fn dir_family<L>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    rows: &[(String, u64, u64)],
    label: fn(&str, &str) -> L,
) where
    L: EncodeLabelSet + Clone + std::fmt::Debug + std::hash::Hash + Eq + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    for (n, fwd, rev) in rows {
        for (direction, v) in [("forward", fwd), ("reverse", rev)] {
            f.get_or_create(&label(n, direction)).inc_by(*v);
        }
    }
    registry.register(name, help, f);
}

fn backend_dir(backend: &str, direction: &str) -> BackendDir {
    BackendDir {
        backend: backend.to_owned(),
        direction: direction.to_owned(),
    }
}

fn service_dir(service: &str, direction: &str) -> ServiceDir {
    ServiceDir {
        service: service.to_owned(),
        direction: direction.to_owned(),
    }
}

/// The scrape-time series, as a registry of their own.
fn snapshot_registry(s: &Snapshot) -> Registry {
    let mut r = Registry::with_prefix("failover");

    let up = Family::<BackendLabel, Gauge>::default();
    let st = Family::<StateLabels, Gauge>::default();
    let dps = Family::<StateLabels, Gauge>::default();
    let tier = Family::<BackendLabel, Gauge>::default();
    let weight = Family::<BackendLabel, Gauge>::default();
    let effective_weight = Family::<BackendLabel, Gauge>::default();
    let flaps = Family::<BackendLabel, Gauge>::default();
    let hold_down = Family::<BackendLabel, Gauge<f64, AtomicU64>>::default();
    let new_flows = Family::<BackendLabel, Counter>::default();
    let resets = Family::<BackendLabel, Counter>::default();
    let syns = Family::<BackendLabel, Counter>::default();
    let syn_rsts = Family::<BackendLabel, Counter>::default();
    let asked = Family::<BackendLabel, Counter>::default();
    let answered = Family::<BackendLabel, Counter>::default();
    for b in &s.backends {
        let l = BackendLabel {
            backend: b.name.clone(),
        };
        up.get_or_create(&l).set(i64::from(b.health.is_serving()));
        for state in HEALTH_STATES {
            st.get_or_create(&StateLabels {
                backend: b.name.clone(),
                state: state.as_str().to_owned(),
            })
            .set(i64::from(b.health == state));
        }
        for state in DATAPLANE_STATES {
            dps.get_or_create(&StateLabels {
                backend: b.name.clone(),
                state: state.as_str().to_owned(),
            })
            .set(i64::from(b.dataplane == state));
        }
        tier.get_or_create(&l).set(i64::from(b.tier));
        weight.get_or_create(&l).set(i64::from(b.weight));
        effective_weight
            .get_or_create(&l)
            .set(i64::from(b.effective_weight));
        flaps.get_or_create(&l).set(i64::from(b.flaps));
        hold_down.get_or_create(&l).set(b.hold_down.as_secs_f64());
        if let Some(x) = &b.stats {
            new_flows.get_or_create(&l).inc_by(x.traffic.new_flows);
            resets.get_or_create(&l).inc_by(x.traffic.resets);
            syns.get_or_create(&l).inc_by(x.syns);
            syn_rsts.get_or_create(&l).inc_by(x.syn_rsts);
            asked.get_or_create(&l).inc_by(x.asked);
            answered.get_or_create(&l).inc_by(x.answered);
        }
    }
    r.register(
        "backend_up",
        "1 when the probes find the backend up or degraded",
        up,
    );
    r.register(
        "backend_state",
        "Probe verdict of the backend: 1 for the current state",
        st,
    );
    r.register(
        "backend_dataplane_state",
        "State of the backend in the data plane's BACKENDS map: 1 for the current state",
        dps,
    );
    r.register(
        "backend_tier",
        "Configured priority tier (0 = preferred)",
        tier,
    );
    r.register("backend_weight", "Configured weight", weight);
    r.register(
        "backend_effective_weight",
        "Weight the backend takes new flows with: configured, scaled by health (0 down or drained; degraded: by degraded_weight)",
        effective_weight,
    );
    r.register(
        "backend_flaps",
        "Falls (serving to down) not yet forgotten; from the second, recovery is held down",
        flaps,
    );
    r.register(
        "backend_hold_down_seconds",
        "Time left before the backend may recover (0: not held down)",
        hold_down,
    );
    let be_rows: Vec<(String, u64, u64)> = s
        .backends
        .iter()
        .filter_map(|b| {
            b.stats
                .as_ref()
                .map(|x| (b.name.clone(), x.traffic.fwd_packets, x.traffic.rev_packets))
        })
        .collect();
    dir_family(
        &mut r,
        "backend_packets",
        "Packets NATed to (forward) and from (reverse) the backend",
        &be_rows,
        backend_dir,
    );
    let be_rows: Vec<(String, u64, u64)> = s
        .backends
        .iter()
        .filter_map(|b| {
            b.stats
                .as_ref()
                .map(|x| (b.name.clone(), x.traffic.fwd_bytes, x.traffic.rev_bytes))
        })
        .collect();
    dir_family(
        &mut r,
        "backend_bytes",
        "Bytes NATed to (forward) and from (reverse) the backend",
        &be_rows,
        backend_dir,
    );
    r.register(
        "backend_new_flows",
        "Flows the data plane assigned to the backend",
        new_flows,
    );
    r.register(
        "backend_resets",
        "Flows of the backend the data plane reset",
        resets,
    );
    r.register(
        "backend_syns",
        "SYNs forwarded to the backend (passive signal)",
        syns,
    );
    r.register(
        "backend_syn_resets",
        "SYNs the backend answered with RST (passive signal)",
        syn_rsts,
    );
    r.register(
        "backend_flows_asked",
        "Established flows whose client sent a request (wedge signal)",
        asked,
    );
    r.register(
        "backend_flows_answered",
        "Established flows the backend sent a first byte back on (wedge signal)",
        answered,
    );
    let suspicions = Counter::<u64>::default();
    suspicions.inc_by(s.wedge_suspicions);
    r.register(
        "wedge_suspicions",
        "Wedge suspicions from the data plane, each confirmed by a generation before anything moves",
        suspicions,
    );

    let generation = Family::<ServiceLabel, Gauge>::default();
    let active_tier = Family::<ServiceLabel, Gauge>::default();
    let svc_new = Family::<ServiceLabel, Counter>::default();
    let svc_resets = Family::<ServiceLabel, Counter>::default();
    for v in &s.services {
        let l = ServiceLabel {
            service: v.name.clone(),
        };
        generation
            .get_or_create(&l)
            .set(i64::try_from(v.generation).unwrap_or(i64::MAX));
        active_tier
            .get_or_create(&l)
            .set(v.active_tier.map_or(-1, i64::from));
        if let Some(x) = &v.stats {
            svc_new.get_or_create(&l).inc_by(x.new_flows);
            svc_resets.get_or_create(&l).inc_by(x.resets);
        }
    }
    r.register(
        "ring_generation",
        "Generation of the service's active ring; bumps on every switch",
        generation,
    );
    r.register(
        "service_active_tier",
        "Lowest tier taking new flows (-1: none)",
        active_tier,
    );
    let rows: Vec<(String, u64, u64)> = s
        .services
        .iter()
        .filter_map(|v| {
            v.stats
                .as_ref()
                .map(|x| (v.name.clone(), x.fwd_packets, x.rev_packets))
        })
        .collect();
    dir_family(
        &mut r,
        "service_packets",
        "Packets of the service, client to backend (forward) and back (reverse)",
        &rows,
        service_dir,
    );
    let rows: Vec<(String, u64, u64)> = s
        .services
        .iter()
        .filter_map(|v| {
            v.stats
                .as_ref()
                .map(|x| (v.name.clone(), x.fwd_bytes, x.rev_bytes))
        })
        .collect();
    dir_family(
        &mut r,
        "service_bytes",
        "Bytes of the service, client to backend (forward) and back (reverse)",
        &rows,
        service_dir,
    );
    r.register("service_new_flows", "New flows of the service", svc_new);
    r.register(
        "service_resets",
        "Flows of the service the data plane reset",
        svc_resets,
    );

    let reasons = Family::<ReasonLabels, Counter>::default();
    for (reason, verdict, n) in &s.reasons {
        reasons
            .get_or_create(&ReasonLabels {
                reason: (*reason).to_owned(),
                verdict: (*verdict).to_owned(),
            })
            .inc_by(*n);
    }
    r.register(
        "datapath_packets",
        "Packets seen by the XDP program by verdict and reason (docs/datapath.md)",
        reasons,
    );

    // What a client sent that passive health did not take as evidence:
    // SYNs dropped for their flags or checksum, and SYNs forwarded that a
    // live backend may leave unanswered (docs/datapath.md, threats).
    let ignored = Family::<ReasonLabel, Counter>::default();
    for (reason, _, n) in &s.reasons {
        if EVIDENCE_DROPS.iter().any(|r| r.as_str() == *reason) {
            ignored
                .get_or_create(&ReasonLabel {
                    reason: (*reason).to_owned(),
                })
                .inc_by(*n);
        }
    }
    let syns_ignored: u64 = s
        .backends
        .iter()
        .filter_map(|b| b.stats.as_ref())
        .map(|x| x.syns_ignored)
        .sum();
    ignored
        .get_or_create(&ReasonLabel {
            reason: "syn_not_vanilla".to_owned(),
        })
        .inc_by(syns_ignored);
    ignored
        .get_or_create(&ReasonLabel {
            reason: "syn_flood".to_owned(),
        })
        .inc_by(s.syns_in_floods);
    r.register(
        "passive_evidence_ignored",
        "SYN-shaped segments passive health did not count, by reason",
        ignored,
    );
    r
}

/// The full exposition (OpenMetrics text).
pub fn render(m: &Metrics, s: &Snapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = text::encode_registry(&mut out, &m.registry);
    let _ = text::encode_registry(&mut out, &snapshot_registry(s));
    let _ = text::encode_eof(&mut out);
    out
}

/// The control loop's pulse and readiness.
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    beat_ms: AtomicU64,
    ready: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            beat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }
}

impl Liveness {
    /// The loop is alive now.
    pub fn beat(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_beat(&self) -> Duration {
        let now = self.start.elapsed();
        now.saturating_sub(Duration::from_millis(self.beat_ms.load(Ordering::Relaxed)))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// A scrape's request to the control loop.
pub type SnapshotRequest = oneshot::Sender<Snapshot>;

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    live: Arc<Liveness>,
    snapshots: mpsc::Sender<SnapshotRequest>,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(
    metrics: Arc<Metrics>,
    live: Arc<Liveness>,
    snapshots: mpsc::Sender<SnapshotRequest>,
) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Http {
            metrics,
            live,
            snapshots,
        })
}

async fn snapshot(tx: &mpsc::Sender<SnapshotRequest>) -> Option<Snapshot> {
    let (reply, rx) = oneshot::channel();
    tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
        tx.send(reply).await.ok()?;
        rx.await.ok()
    })
    .await
    .ok()
    .flatten()
}

async fn scrape(State(h): State<Http>) -> Response {
    let snap = match snapshot(&h.snapshots).await {
        Some(s) => s,
        None => {
            // The event series are still worth having.
            tracing::warn!(
                timeout_ms = SNAPSHOT_TIMEOUT.as_millis(),
                "control loop gave no snapshot; scrape without data-plane series"
            );
            Snapshot::default()
        }
    };
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&h.metrics, &snap),
    )
        .into_response()
}

async fn healthz(State(h): State<Http>) -> Response {
    let since = h.live.since_beat();
    if since > HEALTHZ_STALE {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "control loop silent for {:.1}s (limit {}s)\n",
                since.as_secs_f64(),
                HEALTHZ_STALE.as_secs()
            ),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn readyz(State(h): State<Http>) -> Response {
    if h.live.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: program not attached or config not applied\n",
        )
            .into_response()
    }
}

/// Binds `addr` and serves the router until the task is aborted.
/// Returns the bound address (useful with port 0) and the task.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            services: vec![ServiceSnapshot {
                name: "chat".into(),
                generation: 3,
                active_tier: Some(1),
                stats: Some(ServiceStats {
                    fwd_packets: 10,
                    fwd_bytes: 1000,
                    rev_packets: 8,
                    rev_bytes: 800,
                    new_flows: 2,
                    resets: 1,
                }),
            }],
            backends: vec![BackendSnapshot {
                name: "gpu-a".into(),
                tier: 1,
                weight: 100,
                effective_weight: 50,
                health: HealthState::Degraded,
                dataplane: DataplaneState::Up,
                flaps: 3,
                hold_down: Duration::from_millis(1500),
                stats: Some(BackendStats {
                    traffic: failover_common::Traffic {
                        fwd_packets: 7,
                        ..Default::default()
                    },
                    syns_ignored: 2,
                    ..BackendStats::default()
                }),
            }],
            reasons: vec![("no_backend", "drop", 5), ("bad_l4_checksum", "drop", 4)],
            syns_in_floods: 7,
            wedge_suspicions: 0,
        }
    }

    #[test]
    fn renders_the_documented_series() {
        let m = Metrics::new();
        m.ring_switched("chat", Trigger::Health);
        m.apply_latency(Duration::from_micros(120));
        m.probe_latency("gpu-a", Duration::from_millis(3));
        m.ring_switched("chat", Trigger::Load);
        m.load_factor("gpu-a", 0.5);
        m.load_figures(
            "gpu-a",
            &crate::load::Figures {
                waiting: 3.0,
                running: Some(8.0),
                kv: Some(0.75),
            },
        );
        m.load_refused("gpu-b", "malformed");
        m.load_refused("gpu-b", "malformed");
        m.load_factor("gpu-b", 1.0);
        m.load_forget("gpu-b");
        let out = render(&m, &sample());
        for want in [
            "failover_failover_events_total{service=\"chat\",reason=\"load\"} 1",
            "failover_load_factor{backend=\"gpu-a\"} 0.5",
            "failover_load_waiting_requests{backend=\"gpu-a\"} 3",
            "failover_load_running_requests{backend=\"gpu-a\"} 8",
            "failover_load_kv_cache_usage_ratio{backend=\"gpu-a\"} 0.75",
            "failover_load_scrape_errors_total{backend=\"gpu-b\",reason=\"malformed\"} 2",
            "failover_failover_events_total{service=\"chat\",reason=\"health\"} 1",
            "failover_ring_generation{service=\"chat\"} 3",
            "failover_service_active_tier{service=\"chat\"} 1",
            "failover_service_packets_total{service=\"chat\",direction=\"forward\"} 10",
            "failover_service_bytes_total{service=\"chat\",direction=\"reverse\"} 800",
            "failover_backend_packets_total{backend=\"gpu-a\",direction=\"forward\"} 7",
            "failover_backend_up{backend=\"gpu-a\"} 1",
            "failover_backend_state{backend=\"gpu-a\",state=\"degraded\"} 1",
            "failover_backend_state{backend=\"gpu-a\",state=\"down\"} 0",
            "failover_backend_flaps{backend=\"gpu-a\"} 3",
            "failover_backend_weight{backend=\"gpu-a\"} 100",
            "failover_backend_effective_weight{backend=\"gpu-a\"} 50",
            "failover_backend_hold_down_seconds{backend=\"gpu-a\"} 1.5",
            "failover_datapath_packets_total{reason=\"no_backend\",verdict=\"drop\"} 5",
            "failover_passive_evidence_ignored_total{reason=\"bad_l4_checksum\"} 4",
            "failover_passive_evidence_ignored_total{reason=\"syn_not_vanilla\"} 2",
            "failover_passive_evidence_ignored_total{reason=\"syn_flood\"} 7",
            "failover_apply_duration_seconds_count 1",
            "failover_probe_duration_seconds_count{backend=\"gpu-a\"} 1",
            "failover_build_info{version=\"",
            "# TYPE failover_last_failover_timestamp_seconds gauge",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");
        assert_eq!(out.matches("# EOF").count(), 1);
        assert!(
            !out.contains("failover_load_factor{backend=\"gpu-b\"}"),
            "forgotten"
        );
    }

    #[test]
    fn liveness_goes_stale_and_ready_is_a_flag() {
        let l = Liveness::default();
        l.beat();
        assert!(l.since_beat() < Duration::from_secs(1));
        assert!(!l.is_ready());
        l.set_ready(true);
        assert!(l.is_ready());
    }

    #[test]
    fn trigger_labels_keep_their_spelling() {
        use strum::IntoEnumIterator as _;
        let labels: Vec<&str> = Trigger::iter().map(Trigger::as_str).collect();
        assert_eq!(
            labels,
            [
                "health",
                "passive",
                "operator",
                "config_reload",
                "startup_hold",
                "load"
            ]
        );
    }
}
