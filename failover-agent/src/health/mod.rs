//! Health checking: one tokio task per backend runs an active probe on an
//! interval, feeds the outcomes to the backend's state machine ([`state`])
//! and reports each state change on a channel. The passive detector
//! ([`passive`]) reads the data plane's handshake counters and ejects a
//! backend through its task's [`ProberSignals`] within milliseconds.
//!
//! Probes follow pingora's `HealthCheck` shape: a small [`Probe`] trait with
//! one implementation per kind (tcp, http, grpc, inference, udp), dispatched
//! through [`AnyProbe`] (an enum, so no boxed future per probe). Every
//! failure carries its class ([`failure`]: dead or sick), set where it is
//! seen; a check its timeout cuts short is classed by the probe
//! ([`Probe::timed_out`]: still in its handshake, or answering too slowly). Each probe keeps one connection open across
//! checks (HTTP/1.1 keep-alive, an HTTP/2 connection for gRPC) and drives it
//! in the prober task itself: no connection tasks, no pool, and no
//! allocation on the way of a healthy HTTP probe. 100 backends probed every
//! 100 ms are then mostly the kernel's loopback TCP work (see `http` and
//! `grpc` for what that replaced and what it saved).
//!
//! The prober loop itself costs little per probe (a timer for the timeout,
//! an `mpsc` poll for ejections, one histogram observation, no allocation
//! unless the outcome carries a reason); profiles put each under 0.1% of a
//! core at 1000 probes a second, so it stays as plain as it is.

#[cfg(test)]
pub(crate) mod canned;
pub mod failure;
mod grpc;
mod h1;
mod http;
mod inference;
#[cfg(test)]
mod ipv6_tests;
pub mod load;
pub mod passive;
pub mod state;
mod tcp;
mod tls;
mod udp;
pub mod wedge;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::config::{self, ProbeKind};
use crate::metrics::ProbeDurations;

pub use failure::{DownCause, Failure, Reason};
pub use grpc::GrpcProbe;
pub use http::HttpProbe;
pub use inference::InferenceProbe;
pub use load::{LoadEvent, ScraperTask, spawn_scraper};
pub use passive::{Ejection, HandshakeCounters, PassiveConfig, PassiveDetector};
pub use state::{FlapState, HealthMachine, HealthState, HoldDown, Thresholds, Transition};
pub use tcp::TcpProbe;
pub use tls::TlsOptions;
pub use udp::{UdpExpect, UdpProbe};
pub use wedge::{ReplyCounters, Suspicion, WedgeConfig, WedgeDetector};

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Healthy {
        latency: Duration,
    },
    /// Answers, but slowly or rate limited: keep it, with less weight.
    Degraded {
        latency: Duration,
        reason: String,
    },
    Failed {
        /// What the failure says about the backend (gone or failing).
        failure: Failure,
        reason: String,
    },
}

impl ProbeOutcome {
    pub fn failed(failure: Failure, reason: impl Into<String>) -> Self {
        ProbeOutcome::Failed {
            failure,
            reason: reason.into(),
        }
    }

    /// The class of a failure; `None` unless failed.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            ProbeOutcome::Failed { failure, .. } => Some(*failure),
            ProbeOutcome::Healthy { .. } | ProbeOutcome::Degraded { .. } => None,
        }
    }

    pub fn latency(&self) -> Option<Duration> {
        match self {
            ProbeOutcome::Healthy { latency } | ProbeOutcome::Degraded { latency, .. } => {
                Some(*latency)
            }
            ProbeOutcome::Failed { .. } => None,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            ProbeOutcome::Healthy { .. } => None,
            ProbeOutcome::Degraded { reason, .. } | ProbeOutcome::Failed { reason, .. } => {
                Some(reason)
            }
        }
    }
}

impl From<failure::Fault> for ProbeOutcome {
    fn from(f: failure::Fault) -> Self {
        ProbeOutcome::Failed {
            failure: f.failure,
            reason: f.reason,
        }
    }
}

/// An active health check of one backend. `check` is not bounded in time by
/// itself: the prober task applies the probe's timeout around it.
pub trait Probe: Send + Sync + 'static {
    fn check(&self) -> impl Future<Output = ProbeOutcome> + Send;

    /// The class of a check the timeout cut short, asked right after it
    /// was dropped: by default the backend answered too slowly; a probe
    /// still in its handshake then says [`Failure::Unanswered`].
    fn timed_out(&self) -> Failure {
        Failure::Timeout
    }

    /// A check that shows the backend does its work (a generation), run
    /// at once when the data plane suspects it hangs ([`wedge`]); `None`:
    /// this kind has none, and the suspicion moves nothing.
    fn confirm(&self) -> impl Future<Output = Option<ProbeOutcome>> + Send {
        std::future::ready(None)
    }
}

/// Errors building a probe from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{kind} probe needs `{field}`")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("`{0}` is not valid hex")]
    BadBytes(&'static str),
    #[error("backend address {path}: {source}")]
    Uri {
        path: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("probe path {path:?}: {source}")]
    Path {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("expect_status {0} is not an HTTP status")]
    Status(u16),
    #[error("TLS server name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
    #[error("CA file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA file {} holds no certificate", .0.display())]
    EmptyCaFile(PathBuf),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// What a prober checks: the backend's name (for events and logs) and the
/// address probes connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTarget {
    pub name: Arc<str>,
    pub addr: SocketAddr,
}

impl BackendTarget {
    pub fn new(name: impl Into<Arc<str>>, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addr,
        }
    }
}

impl From<&config::Backend> for BackendTarget {
    fn from(b: &config::Backend) -> Self {
        Self::new(b.name.as_str(), SocketAddr::from((b.address, b.port)))
    }
}

/// Any configured probe kind; static dispatch over the implementations.
#[derive(Debug, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
pub enum AnyProbe {
    Tcp(TcpProbe),
    Http(HttpProbe),
    Grpc(GrpcProbe),
    Inference(InferenceProbe),
    Udp(UdpProbe),
}

impl AnyProbe {
    /// The config's `kind` of this probe.
    pub fn kind(&self) -> &'static str {
        self.into()
    }
}

impl Probe for AnyProbe {
    async fn check(&self) -> ProbeOutcome {
        match self {
            AnyProbe::Tcp(p) => p.check().await,
            AnyProbe::Http(p) => p.check().await,
            AnyProbe::Grpc(p) => p.check().await,
            AnyProbe::Inference(p) => p.check().await,
            AnyProbe::Udp(p) => p.check().await,
        }
    }

    async fn confirm(&self) -> Option<ProbeOutcome> {
        match self {
            AnyProbe::Inference(p) => p.confirm().await,
            AnyProbe::Tcp(_) | AnyProbe::Http(_) | AnyProbe::Grpc(_) | AnyProbe::Udp(_) => None,
        }
    }

    fn timed_out(&self) -> Failure {
        match self {
            AnyProbe::Tcp(p) => p.timed_out(),
            AnyProbe::Http(p) => p.timed_out(),
            AnyProbe::Grpc(p) => p.timed_out(),
            AnyProbe::Inference(p) => p.timed_out(),
            AnyProbe::Udp(p) => p.timed_out(),
        }
    }
}

/// Builds the probe `cfg` describes for `target`. `tls` applies when the
/// kind's `tls` is set. Connections are opened by the first check.
pub fn build_probe(
    target: &BackendTarget,
    cfg: &config::Probe,
    tls: &TlsOptions,
) -> Result<AnyProbe, ProbeError> {
    Ok(match &cfg.kind {
        ProbeKind::Tcp(_) => AnyProbe::Tcp(TcpProbe::new(target.addr)),
        ProbeKind::Http(http) => AnyProbe::Http(HttpProbe::new(
            target,
            http.path.as_deref().unwrap_or("/"),
            http.tls.then_some(tls),
            http.expect_status,
            http.body_contains.clone(),
            cfg.timeout,
        )?),
        ProbeKind::Grpc(grpc) => AnyProbe::Grpc(GrpcProbe::new(
            target,
            grpc.grpc_service.as_deref().unwrap_or(""),
            grpc.tls.then_some(tls),
            cfg.timeout,
        )?),
        ProbeKind::Inference(inference) => {
            let model = inference.model.as_deref().ok_or(ProbeError::MissingField {
                kind: "inference",
                field: "model",
            })?;
            // `path`: the prefix the OpenAI routes sit under (a gateway's);
            // none: at the root.
            AnyProbe::Inference(InferenceProbe::new(
                target,
                inference.path.as_deref().unwrap_or(""),
                model,
                inference.ttft_budget,
                inference
                    .generation_interval
                    .unwrap_or(inference::GENERATION_EVERY),
                inference.tls.then_some(tls),
                cfg.timeout,
            )?)
        }
        ProbeKind::Udp(udp) => {
            let missing = ProbeError::MissingField {
                kind: "udp",
                field: "payload",
            };
            let payload = udp
                .payload
                .as_ref()
                .and_then(config::Bytes::to_vec)
                .ok_or(missing)?;
            let bytes = |b: &config::Bytes, field: &'static str| {
                b.to_vec().ok_or(ProbeError::BadBytes(field))
            };
            let expect = match (&udp.expect, &udp.expect_prefix) {
                (Some(b), _) => UdpExpect::Exact(bytes(b, "expect")?.into()),
                (None, Some(b)) => UdpExpect::Prefix(bytes(b, "expect_prefix")?.into()),
                (None, None) => UdpExpect::Any,
            };
            AnyProbe::Udp(UdpProbe::new(target.addr, payload, expect))
        }
    })
}

/// When a prober probes and how its verdicts are damped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
}

impl From<&config::Probe> for Schedule {
    fn from(p: &config::Probe) -> Self {
        Self {
            interval: p.interval,
            timeout: p.timeout,
            thresholds: Thresholds::from(p),
        }
    }
}

/// Which detector caused a state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    Active,
    Passive,
}

/// A backend's state changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub backend: Arc<str>,
    pub from: HealthState,
    /// `Down` with `from` `Down` too: the backend was down as sick, and
    /// new evidence shows it dead ([`Transition`]).
    pub to: HealthState,
    /// The evidence; for a fall, also its class ([`Reason::down_cause`]).
    pub reason: Reason,
    /// Latency of the probe that caused it (none for failures and passive).
    pub latency: Option<Duration>,
    pub source: EventSource,
    /// When the decision was made: the start of decision-to-flip latency.
    pub at: Instant,
}

/// What the data plane's detectors hand a prober.
#[derive(Clone, Debug)]
enum Signal {
    /// Down now (passive handshake evidence).
    Eject(Ejection),
    /// Run the probe's confirming check now; down only if it fails.
    Suspect(Suspicion),
}

/// Hands passive ejections and wedge suspicions to one backend's prober
/// task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ProberSignals(mpsc::Sender<Signal>);

impl ProberSignals {
    /// Queues an ejection without waiting. Returns false once the prober
    /// is gone. A full queue already holds an ejection, so dropping this
    /// one loses nothing.
    pub fn eject(&self, why: Ejection) -> bool {
        !matches!(
            self.0.try_send(Signal::Eject(why)),
            Err(TrySendError::Closed(_))
        )
    }

    /// Queues a wedge suspicion: the prober confirms it with a generation
    /// before anything moves. Returns false once the prober is gone.
    pub fn suspect(&self, why: Suspicion) -> bool {
        !matches!(
            self.0.try_send(Signal::Suspect(why)),
            Err(TrySendError::Closed(_))
        )
    }
}

/// A running prober task. Dropping it stops the task (config reload just
/// drops the probers of removed backends).
#[derive(Debug)]
pub struct Prober {
    backend: Arc<str>,
    signals: ProberSignals,
    /// The state machine's flap damping, published by the task after
    /// every probe and ejection (before any event they cause is sent).
    flaps: watch::Receiver<FlapState>,
    task: JoinHandle<()>,
}

impl Prober {
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The backend's flap count and hold-down, as of its last probe.
    pub fn flap_state(&self) -> FlapState {
        *self.flaps.borrow()
    }

    /// The handle the data plane's detectors signal this prober through.
    pub fn signals(&self) -> ProberSignals {
        self.signals.clone()
    }

    /// See [`ProberSignals::eject`].
    pub fn eject(&self, why: Ejection) -> bool {
        self.signals.eject(why)
    }

    /// True once the task ended (its event receiver was dropped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts probing `target` as `cfg` says; state changes go to `events`,
/// every probe's duration to `durations` (the task observes it itself:
/// no message per probe).
pub fn spawn_prober(
    target: BackendTarget,
    cfg: &config::Probe,
    tls: &TlsOptions,
    events: mpsc::Sender<HealthEvent>,
    durations: Option<ProbeDurations>,
) -> Result<Prober, ProbeError> {
    let probe = build_probe(&target, cfg, tls)?;
    Ok(spawn_with_probe(
        target.name,
        probe,
        Schedule::from(cfg),
        events,
        durations,
    ))
}

/// Starts a prober task around any [`Probe`] (tests use scripted ones).
pub fn spawn_with_probe<P: Probe>(
    backend: Arc<str>,
    probe: P,
    schedule: Schedule,
    events: mpsc::Sender<HealthEvent>,
    durations: Option<ProbeDurations>,
) -> Prober {
    let (tx, rx) = mpsc::channel(4);
    let (flaps_tx, flaps) = watch::channel(FlapState::default());
    let rep = Reporter {
        backend: backend.clone(),
        events,
        machine: HealthMachine::new(schedule.thresholds),
        durations,
        flaps: flaps_tx,
    };
    let task = tokio::spawn(run(rep, probe, schedule, rx));
    Prober {
        backend,
        signals: ProberSignals(tx),
        flaps,
        task,
    }
}

struct Reporter {
    backend: Arc<str>,
    events: mpsc::Sender<HealthEvent>,
    machine: HealthMachine,
    durations: Option<ProbeDurations>,
    flaps: watch::Sender<FlapState>,
}

impl Reporter {
    /// An ejection acts at once; a suspicion waits for its check.
    /// Returns false when nobody listens any more.
    async fn signal(&mut self, sig: Signal, suspected: &mut Option<Suspicion>) -> bool {
        match sig {
            Signal::Eject(why) => self.eject(&why).await,
            // A backend already down takes no new flows: nothing to confirm.
            Signal::Suspect(_) if self.machine.state() == HealthState::Down => true,
            Signal::Suspect(why) => {
                tracing::info!(backend = %self.backend, %why, "wedge suspected; confirming with a generation");
                *suspected = Some(why);
                true
            }
        }
    }

    /// The confirming check of a wedge suspicion: a failure takes the
    /// backend down (as sick); an answer clears it and counts as a probe.
    async fn confirmed(
        &mut self,
        why: Suspicion,
        outcome: &ProbeOutcome,
        started: Instant,
    ) -> bool {
        match outcome {
            ProbeOutcome::Failed { reason, .. } => {
                let ej = Ejection::Wedged {
                    suspicion: why,
                    check: reason.clone(),
                };
                self.eject(&ej).await
            }
            ProbeOutcome::Healthy { .. } | ProbeOutcome::Degraded { .. } => {
                tracing::info!(backend = %self.backend, %why, latency = ?outcome.latency(), "wedge suspicion cleared: the generation answered");
                self.observe(outcome, started).await
            }
        }
    }

    /// Returns false when nobody listens any more.
    async fn eject(&mut self, why: &Ejection) -> bool {
        let now = Instant::now();
        let t = self.machine.eject(now, why);
        self.publish(now);
        match t {
            Some(t) => self.send(t, None, EventSource::Passive, now).await,
            None => true,
        }
    }

    fn publish(&self, now: Instant) {
        let new = self.machine.flap_state(now);
        self.flaps
            .send_if_modified(|s| std::mem::replace(s, new) != new);
    }

    /// One probe's outcome; the probe began at `started`.
    async fn observe(&mut self, outcome: &ProbeOutcome, started: Instant) -> bool {
        if let ProbeOutcome::Failed { reason, .. } | ProbeOutcome::Degraded { reason, .. } = outcome
        {
            tracing::debug!(backend = %self.backend, %reason, "probe not healthy");
        }
        let now = Instant::now();
        if let Some(d) = &self.durations {
            d.observe(
                outcome
                    .latency()
                    .unwrap_or_else(|| now.saturating_duration_since(started)),
            );
        }
        let t = self.machine.observe(now, outcome);
        self.publish(now);
        match t {
            Some(t) => {
                self.send(t, outcome.latency(), EventSource::Active, now)
                    .await
            }
            None => true,
        }
    }

    async fn send(
        &self,
        t: Transition,
        latency: Option<Duration>,
        source: EventSource,
        at: Instant,
    ) -> bool {
        if t.from == t.to {
            tracing::warn!(backend = %self.backend, state = %t.to, ?source, reason = %t.reason, "down backend found dead");
        } else if t.to == HealthState::Down {
            let f = self.machine.flap_state(at);
            let hold_s = f
                .held_until
                .map_or(0.0, |u| u.saturating_duration_since(at).as_secs_f64());
            let cause = t.reason.down_cause();
            tracing::warn!(backend = %self.backend, from = %t.from, to = %t.to, ?source, reason = %t.reason, %cause, flaps = f.flaps, hold_s, "backend health changed");
        } else {
            tracing::info!(backend = %self.backend, from = %t.from, to = %t.to, ?source, reason = %t.reason, "backend health changed");
        }
        let event = HealthEvent {
            backend: self.backend.clone(),
            from: t.from,
            to: t.to,
            reason: t.reason,
            latency,
            source,
            at,
        };
        self.events.send(event).await.is_ok()
    }
}

async fn run<P: Probe>(
    mut rep: Reporter,
    probe: P,
    schedule: Schedule,
    mut signals: mpsc::Receiver<Signal>,
) {
    let mut ticker = tokio::time::interval(schedule.interval);
    // A slow probe delays the next one instead of bursting to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // A wedge suspicion waiting for its confirming check, which takes the
    // next tick's place.
    let mut suspected: Option<Suspicion> = None;
    loop {
        tokio::select! {
            biased;
            Some(sig) = signals.recv() => {
                if !rep.signal(sig, &mut suspected).await {
                    return;
                }
                if suspected.is_some() {
                    ticker.reset_immediately();
                }
            }
            _ = ticker.tick() => {
                let started = Instant::now();
                if let Some(why) = suspected.take() {
                    let Some(res) = bounded(&mut rep, &mut signals, &mut suspected, schedule.timeout, probe.confirm()).await else {
                        return;
                    };
                    let outcome = match res {
                        Ok(Some(o)) => o,
                        Ok(None) => {
                            tracing::debug!(backend = %rep.backend, %why, "wedge suspected; this probe kind has no confirming check");
                            continue;
                        }
                        Err(_) => timeout_outcome(probe.timed_out(), schedule.timeout),
                    };
                    if !rep.confirmed(why, &outcome, started).await {
                        return;
                    }
                    continue;
                }
                let Some(res) = bounded(&mut rep, &mut signals, &mut suspected, schedule.timeout, probe.check()).await else {
                    return;
                };
                let outcome = res.unwrap_or_else(|_| timeout_outcome(probe.timed_out(), schedule.timeout));
                if !rep.observe(&outcome, started).await {
                    return;
                }
                if suspected.is_some() {
                    ticker.reset_immediately();
                }
            }
        }
    }
}

/// Runs `check` within `timeout`, handling signals meanwhile: a check can
/// take up to its timeout, an ejection must not wait. `None`: nobody
/// listens to the prober any more.
async fn bounded<T>(
    rep: &mut Reporter,
    signals: &mut mpsc::Receiver<Signal>,
    suspected: &mut Option<Suspicion>,
    timeout: Duration,
    check: impl Future<Output = T>,
) -> Option<Result<T, tokio::time::error::Elapsed>> {
    let check = tokio::time::timeout(timeout, check);
    tokio::pin!(check);
    loop {
        tokio::select! {
            biased;
            Some(sig) = signals.recv() => {
                if !rep.signal(sig, suspected).await {
                    return None;
                }
            }
            res = &mut check => return Some(res),
        }
    }
}

/// The outcome of a check its timeout cut short, classed by the probe.
fn timeout_outcome(failure: Failure, timeout: Duration) -> ProbeOutcome {
    let phase = match failure {
        Failure::Unanswered => " (handshake unanswered)",
        _ => "",
    };
    ProbeOutcome::failed(failure, format!("timeout after {timeout:?}{phase}"))
}

/// An error with its sources, `a: b: c` (h2's and hyper's own text often
/// leaves the cause further down).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Plays back a list of outcomes, then repeats the last one; a `None`
    /// entry hangs until the prober's timeout.
    struct Scripted(Mutex<VecDeque<Option<ProbeOutcome>>>);

    impl Scripted {
        fn new(steps: Vec<Option<ProbeOutcome>>) -> Self {
            Self(Mutex::new(steps.into()))
        }
    }

    impl Probe for Scripted {
        async fn check(&self) -> ProbeOutcome {
            let step = {
                let mut q = self.0.lock().unwrap();
                if q.len() > 1 {
                    q.pop_front()
                } else {
                    q.front().cloned()
                }
            };
            match step.flatten() {
                Some(o) => o,
                None => std::future::pending().await,
            }
        }
    }

    fn healthy() -> Option<ProbeOutcome> {
        Some(ProbeOutcome::Healthy {
            latency: Duration::from_millis(1),
        })
    }

    fn schedule(rise: u32, fall: u32) -> Schedule {
        Schedule {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(50),
            thresholds: Thresholds::new(rise, fall, Duration::ZERO),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("channel open")
    }

    #[tokio::test]
    async fn prober_reports_rise_fall_and_timeouts() {
        let (tx, mut rx) = mpsc::channel(16);
        let script = vec![
            healthy(),
            healthy(),
            Some(ProbeOutcome::failed(Failure::Refused, "refused")),
            None,
            healthy(),
            healthy(),
        ];
        let _p = spawn_with_probe("b1".into(), Scripted::new(script), schedule(2, 2), tx, None);
        let up = next(&mut rx).await;
        assert_eq!(
            (up.from, up.to, up.source),
            (HealthState::Unknown, HealthState::Up, EventSource::Active)
        );
        assert_eq!(&*up.backend, "b1");
        assert_eq!(up.latency, Some(Duration::from_millis(1)));
        let down = next(&mut rx).await;
        assert_eq!(down.to, HealthState::Down);
        assert!(
            down.reason.as_str().contains("timeout after 50ms"),
            "{}",
            down.reason
        );
        assert_eq!(down.latency, None);
        assert_eq!(next(&mut rx).await.to, HealthState::Up);
    }

    #[tokio::test]
    async fn ejection_is_handled_while_a_probe_hangs() {
        let (tx, mut rx) = mpsc::channel(16);
        let sch = Schedule {
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(30),
            thresholds: Thresholds::new(1, 1, Duration::from_secs(60)),
        };
        let p = spawn_with_probe(
            "b1".into(),
            Scripted::new(vec![healthy(), None]),
            sch,
            tx,
            None,
        );
        assert_eq!(next(&mut rx).await.to, HealthState::Up);
        // The second probe is now hanging for up to 30 s; the ejection
        // still lands at once, despite the 60 s dwell.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let sent = Instant::now();
        assert!(p.eject(Ejection::Refused { rsts: 2 }));
        let ev = next(&mut rx).await;
        assert_eq!(
            (ev.to, ev.source),
            (HealthState::Down, EventSource::Passive)
        );
        assert_eq!(ev.reason, "passive: 2 SYNs refused with RST");
        assert!(ev.at.duration_since(sent) < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn the_flap_state_is_published_before_the_fall_is_reported() {
        let (tx, mut rx) = mpsc::channel(16);
        let hold = Duration::from_secs(1);
        let sch = Schedule {
            thresholds: schedule(1, 1).thresholds.with_hold_down(HoldDown {
                base: hold,
                max: hold,
                decay: Duration::from_secs(30),
            }),
            ..schedule(1, 1)
        };
        let p = spawn_with_probe("b1".into(), Scripted::new(vec![healthy()]), sch, tx, None);
        assert_eq!(next(&mut rx).await.to, HealthState::Up);
        assert_eq!(p.flap_state(), FlapState::default());
        // The first fall fails back on the next probe.
        assert!(p.eject(Ejection::Refused { rsts: 2 }));
        assert_eq!(next(&mut rx).await.to, HealthState::Down);
        assert_eq!(p.flap_state().flaps, 1);
        assert_eq!(p.flap_state().held_until, None);
        assert_eq!(next(&mut rx).await.to, HealthState::Up);
        // The second is held down for `base`, though probes pass every 10 ms.
        assert!(p.eject(Ejection::Refused { rsts: 2 }));
        let down = next(&mut rx).await;
        assert_eq!(down.to, HealthState::Down);
        let f = p.flap_state();
        assert_eq!((f.flaps, f.held_until), (2, Some(down.at + hold)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "no recovery while held");
    }

    #[tokio::test]
    async fn dropping_the_prober_stops_it() {
        let (tx, mut rx) = mpsc::channel(16);
        let p = spawn_with_probe(
            "b1".into(),
            Scripted::new(vec![healthy()]),
            schedule(1, 1),
            tx,
            None,
        );
        let sig = p.signals();
        assert_eq!(next(&mut rx).await.to, HealthState::Up);
        drop(p);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.recv().await.is_none(), "task gone, sender dropped");
        assert!(!sig.eject(Ejection::Refused { rsts: 1 }));
    }

    /// `_count` and `_sum` of `backend`'s probe duration histogram.
    fn probe_histogram(m: &crate::metrics::Metrics, backend: &str) -> (u64, f64) {
        let out = crate::metrics::render(m, &crate::metrics::Snapshot::default());
        let field = |suffix: &str| {
            let key = format!("failover_probe_duration_seconds_{suffix}{{backend=\"{backend}\"}} ");
            out.lines()
                .find_map(|l| l.strip_prefix(&key))
                .unwrap_or_else(|| panic!("no {key} in\n{out}"))
                .to_owned()
        };
        (
            field("count").parse().unwrap(),
            field("sum").parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn every_probe_is_timed_not_only_state_changes() {
        let m = crate::metrics::Metrics::new();
        let (tx, mut rx) = mpsc::channel(16);
        // Fails at once, then hangs until the 50 ms timeout, again and
        // again: one state change (to down), many probes.
        let _p = spawn_with_probe(
            "b1".into(),
            Scripted::new(vec![
                Some(ProbeOutcome::failed(Failure::Refused, "refused")),
                None,
            ]),
            schedule(1, 1),
            tx,
            Some(m.probe_durations("b1")),
        );
        assert_eq!(next(&mut rx).await.to, HealthState::Down);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (count, sum) = probe_histogram(&m, "b1");
        // 60 ms a probe (10 ms interval, 50 ms timeout): ~6 in 400 ms.
        assert!(count >= 4, "{count}");
        assert!(
            sum >= 0.05 * (count - 2) as f64,
            "timeouts timed: {sum} s over {count}"
        );
        assert!(rx.try_recv().is_err(), "no further state change");

        // A healthy backend: its own latency, every time.
        let (tx, mut rx) = mpsc::channel(16);
        let _p = spawn_with_probe(
            "b2".into(),
            Scripted::new(vec![healthy()]),
            schedule(1, 1),
            tx,
            Some(m.probe_durations("b2")),
        );
        assert_eq!(next(&mut rx).await.to, HealthState::Up);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (count, sum) = probe_histogram(&m, "b2");
        assert!(count >= 5, "{count}");
        assert!(
            (sum - 0.001 * count as f64).abs() < 1e-3,
            "{sum} over {count}"
        );
    }

    #[tokio::test]
    async fn build_probe_checks_required_fields() {
        let cfg: config::Probe =
            serde_json::from_value(serde_json::json!({"kind": "inference"})).unwrap();
        let t = BackendTarget::new("b", "127.0.0.1:9".parse().unwrap());
        let err = build_probe(&t, &cfg, &TlsOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), "inference probe needs `model`");
        // `tls` on a tcp probe: refused with the config, before any probe.
        let err = serde_json::from_value::<config::Probe>(
            serde_json::json!({"kind": "tcp", "tls": true}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `tls`"), "{err}");
        let cfg: config::Probe =
            serde_json::from_value(serde_json::json!({"kind": "http", "expect_status": 1000}))
                .unwrap();
        assert!(matches!(
            build_probe(&t, &cfg, &TlsOptions::default()),
            Err(ProbeError::Status(1000))
        ));
        for fields in [
            serde_json::json!({"kind": "tcp"}),
            serde_json::json!({"kind": "http", "tls": true}),
            serde_json::json!({"kind": "grpc", "tls": true}),
        ] {
            let cfg: config::Probe = serde_json::from_value(fields).unwrap();
            assert_eq!(
                build_probe(&t, &cfg, &TlsOptions::default())
                    .unwrap()
                    .kind(),
                cfg.kind.name()
            );
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_includes_causes() {
        let inner =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(
            error_chain(&Outer(inner)),
            "client error (Connect): connection refused"
        );
    }
}
