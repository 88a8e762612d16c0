//! Decisions into the data plane.
//!
//! Order of writes for one decision, chosen so a packet never meets a
//! worse state than the one decided:
//! 1. Backends that went down get `state = DOWN` first, one map write
//!    each. This alone is the failover: the XDP program resets or moves
//!    their flows and skips them in the rings on the very next packet.
//! 2. The affected services are planned again.
//! 3. Backends that now take traffic get `UP` (or `DRAINING`) before any
//!    ring holds them.
//! 4. Each service whose ring or entry changed gets its new ring in the
//!    inactive slot, then one write of its `SERVICES` entry flips to it.
//! 5. The VIP filter, when the set of VIPs changed (start, reload): a new
//!    VIP lets packets in once its service is in place.
//! 6. Other backends leaving service get `DOWN`; ids no longer in the
//!    config get `UNUSED`, once no ring refers to them.
//! 7. A little later, the clients of the backends of step 1 are nudged
//!    ([`Applier::flush_nudges`]).
//!
//! What to write is decided by pure functions ([`super::reconcile`]: step
//! 1 is [`reconcile::take_out`], steps 2 to 6 [`reconcile::reconcile`]);
//! an [`Executor`] performs the writes ([`super::execute`]: the maps, or a
//! recorder in tests), and the applier records each one that succeeded
//! ([`Current`]). Step 1 is written before step 2 is even planned: a
//! failover never waits for the planner.
//!
//! Keep-last-good: an agent that starts on pinned state keeps each
//! recovered service's ring until every backend of its pool has a first
//! verdict (or a start-up bound passes), so a restart never empties a
//! ring the previous agent had filled. Operator drains and overrides are
//! restored before the first plan ([`super::operator_state`]).
//!
//! Dead or slow ([`super::grace`]): a backend that went down dead is
//! written `DOWN` in step 1; one that went down sick stays `DRAINING` for
//! its grace (its streams in progress finish), and `DOWN` once the grace
//! ends ([`Applier::end_graces`]) or it is found dead.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use failover_common::{Node, RING_MAX};

pub use super::reconcile::Programmed;
use super::{
    AgentError,
    execute::{Executor, Maps},
    grace::{self, Exit, Graces},
    ids::{Ids, ServiceEndpoint},
    journal::Journal,
    latency::{LatencyWindow, Percentiles},
    operator_state::{self, Deadline, OperatorState, TimedOverride},
    reconcile::{self, Current, Inputs, Write},
    states::DataplaneState,
};
use crate::{
    audit::DecisionRecord,
    config::{self, Config, ConfigDiff, ConfigError},
    dataplane::{Dataplane, XdpMode},
    health::{EventSource, HealthEvent, HealthState},
    planner::{self, HealthView},
};

/// How long a restarted agent keeps recovered rings while waiting for
/// first verdicts, when the caller does not say.
pub const DEFAULT_STARTUP_HOLD: Duration = Duration::from_secs(10);

/// What triggers an apply.
#[derive(Clone, Debug)]
pub struct Decision {
    /// When it was decided: the start of the measured apply latency.
    pub at: Instant,
    /// Why, for logs and the audit log.
    pub reason: String,
    /// Backends whose health or drain state changed.
    pub backends: Vec<String>,
    /// Plan every service, not only those with a changed backend.
    pub all: bool,
}

impl Decision {
    pub fn all(reason: impl Into<String>, at: Instant) -> Self {
        Self {
            at,
            reason: reason.into(),
            backends: Vec::new(),
            all: true,
        }
    }
}

/// What one apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Services whose ring was switched, with the new generation.
    pub flipped: Vec<(String, u64)>,
    /// `BACKENDS` writes.
    pub state_writes: usize,
    /// Decision to the last flip, when something flipped.
    pub latency: Option<Duration>,
    /// Recovered services still kept as they were (start-up hold).
    pub held: Vec<String>,
}

pub struct ApplyOptions {
    pub journal: Option<Journal>,
    /// Keep-last-good bound for recovered services at start.
    pub startup_hold: Duration,
    /// Drains and overrides to start with (restored from the state file),
    /// in force from the first plan.
    pub operator: OperatorState,
    /// Where every change of the operator state is written
    /// ([`operator_state::save`]); none: kept in memory only.
    pub state_file: Option<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            journal: None,
            startup_hold: DEFAULT_STARTUP_HOLD,
            operator: OperatorState::default(),
            state_file: None,
        }
    }
}

/// Owns the data plane (through its executor, [`Maps`] unless a test
/// says otherwise) and what the agent knows: config, ids, health.
pub struct Applier<E: Executor = Maps> {
    exec: E,
    cfg: Config,
    ids: Ids,
    /// Last verdict per backend name; absent = no verdict yet.
    health: BTreeMap<String, HealthState>,
    /// Drains and overrides (with their expiry), as the operator set them.
    operator: OperatorState,
    state_file: Option<PathBuf>,
    /// Backends down as sick, `DRAINING` until their grace ends.
    graces: Graces,
    /// What the data plane holds, as written.
    current: Current,
    hold: Option<Instant>,
    /// Recovered services still waiting for their pool's first verdicts.
    held: BTreeSet<String>,
    flips: LatencyWindow,
    state_writes: LatencyWindow,
    journal: Option<Journal>,
    /// Backends gone down whose clients are still to be nudged. Nudging
    /// reads the whole flow table, so the run loop does it a little after
    /// the rings switched, for every such backend at once: it must never
    /// delay a failover (see [`Applier::flush_nudges`]).
    nudges: Vec<(String, u32)>,
}

fn node_of(n: &config::Node) -> Node {
    Node {
        snat_be: u32::from(n.snat_address).to_be(),
        port_min: n.snat_ports.min,
        port_max: n.snat_ports.max,
        seed: n.hash_seed,
        flags: 0,
    }
}

fn xdp_mode(m: config::XdpMode) -> XdpMode {
    match m {
        config::XdpMode::Auto => XdpMode::Auto,
        config::XdpMode::Native => XdpMode::Native,
        config::XdpMode::Skb => XdpMode::Skb,
    }
}

/// The reason of an operator's decision in logs and the audit log.
fn operator_reason(what: &str, forced: Option<&planner::Refusal>) -> String {
    match forced {
        Some(_) => format!("operator (forced): {what}"),
        None => format!("operator: {what}"),
    }
}

/// A health event in a decision's reason: `b1 up -> down (active: ...)`.
fn event_reason(ev: &HealthEvent) -> String {
    let source = match ev.source {
        EventSource::Active => "active",
        EventSource::Passive => "passive",
    };
    format!(
        "{} {} -> {} ({})",
        ev.backend,
        ev.from,
        ev.to,
        with_source(source, ev.reason.as_str())
    )
}

/// The audit note of a backend in its slow grace found dead; the
/// evidence's own `found dead: ` is not repeated.
fn found_dead_note(reason: &str) -> String {
    let evidence = reason.strip_prefix("found dead: ").unwrap_or(reason);
    format!("found dead during its slow grace ({evidence}): down now")
}

/// `source: reason`, unless the reason names its source already (a
/// passive ejection's reads `passive: ...`, or `found dead: passive:
/// ...`): one label, never `passive: passive: ...`.
fn with_source(source: &str, reason: &str) -> String {
    if reason.split(": ").any(|part| part == source) {
        reason.to_owned()
    } else {
        format!("{source}: {reason}")
    }
}

/// Reads the first `len` entries of a ring slot. The map lookup moves the
/// 256 KiB value through several stack frames (over 1 MiB in debug
/// builds), more than a tokio worker's or test thread's 2 MiB allows; a
/// short-lived thread with a large stack does the read.
pub fn read_ring(dp: &Dataplane, id: u32, slot: u32, len: u32) -> Result<Vec<u32>, AgentError> {
    let len = (len as usize).min(RING_MAX);
    Ok(dp.ring(id, slot)?.backends[..len].to_vec())
}

impl Applier {
    /// Takes over the data plane: recovers ids and rings from its pinned
    /// maps, programs the node, VIPs and backends, and plans every service
    /// (recovered ones are held, see the module doc). Does not attach.
    pub fn new(dp: Dataplane, cfg: Config, opts: ApplyOptions) -> Result<Self, AgentError> {
        Self::with_executor(Maps::new(dp), cfg, opts)
    }

    pub fn dataplane(&self) -> &Dataplane {
        self.exec.dataplane()
    }

    /// Removes the established flows idle for longer than their service's
    /// `timeouts` (docs/datapath.md, idle timeouts). Returns how many went.
    pub fn expire_idle(&mut self) -> Result<usize, crate::dataplane::DataplaneError> {
        let by_id: std::collections::HashMap<u32, config::Timeouts> = self
            .cfg
            .services
            .iter()
            .filter_map(|s| self.ids.service(&s.name).map(|a| (a.id, s.timeouts)))
            .collect();
        let now = crate::dataplane::now_stamp();
        self.exec
            .dataplane_mut()
            .expire_idle(now, |service_id, proto| {
                by_id.get(&service_id).map(|t| match proto {
                    6 => t.tcp_idle,
                    _ => t.udp_idle,
                })
            })
    }
}

impl<E: Executor> Applier<E> {
    /// [`Applier::new`] over any executor: reads what `exec` has pinned,
    /// recovers ids and rings from it, and plans every service.
    pub fn with_executor(exec: E, cfg: Config, opts: ApplyOptions) -> Result<Self, AgentError> {
        let pinned = exec.pinned()?;
        let ids = Ids::recover(&cfg, &pinned.services, &pinned.backends)?;
        let mut a = Self {
            exec,
            cfg,
            ids,
            health: BTreeMap::new(),
            operator: opts.operator,
            state_file: opts.state_file,
            graces: Graces::default(),
            current: Current {
                backends: pinned.backends.into_iter().collect(),
                ..Current::default()
            },
            hold: None,
            held: BTreeSet::new(),
            flips: LatencyWindow::new(),
            state_writes: LatencyWindow::new(),
            journal: opts.journal,
            nudges: Vec::new(),
        };
        a.run(Write::Node(node_of(&a.cfg.node)))?;

        for (key, svc) in &pinned.services {
            let claimed = a
                .ids
                .services()
                .find(|(_, s)| s.id == svc.id && s.endpoint == ServiceEndpoint::from_key(key))
                .map(|(n, _)| n.to_owned());
            let Some(name) = claimed else {
                // Not in this config any more.
                a.run(Write::RemoveService {
                    id: svc.id,
                    key: *key,
                })?;
                tracing::info!(service_id = svc.id, "removed service not in the config");
                continue;
            };
            let ring = a.exec.ring(svc.id, svc.active_slot, svc.ring_size)?;
            let to = Current::names_in(&a.ids, &ring);
            tracing::info!(service = %name, generation = svc.generation, backends = ?to, "recovered pinned service");
            a.current.services.insert(
                name.clone(),
                Programmed {
                    key: *key,
                    entry: *svc,
                    ring,
                    to,
                    open: Vec::new(),
                    weights: BTreeMap::new(),
                },
            );
            a.held.insert(name);
        }
        a.write_new_backends()?;
        if !a.held.is_empty() {
            a.hold = Some(Instant::now() + opts.startup_hold);
        }
        a.apply(&Decision::all("agent start", Instant::now()))?;
        Ok(a)
    }

    /// Performs one write and records it.
    fn run(&mut self, w: Write) -> Result<usize, AgentError> {
        let n = self.exec.write(&w)?;
        self.current.record(w);
        Ok(n)
    }

    /// The executor (in tests, the recorder of every write).
    pub fn executor(&self) -> &E {
        &self.exec
    }

    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.exec
    }

    /// What the data plane holds, as this applier wrote it.
    pub fn current(&self) -> &Current {
        &self.current
    }

    /// Attaches the NAT program to the configured interfaces (swapping it
    /// into pinned links left by an earlier agent).
    pub fn attach(&mut self) -> Result<(), AgentError> {
        let mode = xdp_mode(self.cfg.node.xdp_mode);
        for iface in self.cfg.node.interfaces.clone() {
            let a = self.exec.attach(&iface, mode)?;
            tracing::info!(interface = %iface, mode = %a.mode, updated = a.updated, "XDP attached");
        }
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    pub fn programmed(&self, service: &str) -> Option<&Programmed> {
        self.current.services.get(service)
    }

    pub fn health(&self, backend: &str) -> HealthState {
        self.health.get(backend).copied().unwrap_or_default()
    }

    /// Decision to completed flip, per apply that flipped a ring.
    pub fn flip_latency(&self) -> Percentiles {
        self.flips.percentiles()
    }

    /// Decision to completed `BACKENDS` write, per fast-path state change.
    pub fn state_latency(&self) -> Percentiles {
        self.state_writes.percentiles()
    }

    /// When the start-up hold ends, if one is running.
    pub fn hold_deadline(&self) -> Option<Instant> {
        self.hold
    }

    /// Waits until queued audit records are on disk.
    pub fn flush_audit(&self) {
        if let Some(j) = &self.journal {
            j.flush();
        }
    }

    /// Gives every config backend without a matching entry one, DOWN
    /// until its first verdict.
    fn write_new_backends(&mut self) -> Result<(), AgentError> {
        for w in reconcile::new_backends(&self.ids, &self.current) {
            self.run(w)?;
        }
        Ok(())
    }

    /// The fast path on its own: takes `backend` out of the data plane
    /// with one map write, before any planning. Used by passive ejection;
    /// the re-plan follows. Returns whether a write happened (false if it
    /// was not serving already).
    pub fn mark_down(&mut self, backend: &str, at: Instant) -> Result<bool, AgentError> {
        let Some(id) = self.ids.backend(backend).map(|a| a.id) else {
            return Ok(false);
        };
        let written = self.take_out(backend, id)?;
        if written {
            self.state_writes.record(at.elapsed());
        }
        Ok(written)
    }

    /// Writes a serving backend DOWN (one map write: new flows skip it, its
    /// pinned flows are reset or moved) and queues the nudge of its clients
    /// for after the switch. Returns whether a write happened.
    fn take_out(&mut self, backend: &str, id: u32) -> Result<bool, AgentError> {
        if !self.current.serving(id) {
            return Ok(false);
        }
        let Some(w) = self.current.set_state(id, DataplaneState::Down) else {
            return Ok(false);
        };
        self.run(w)?;
        self.nudges.push((backend.to_owned(), id));
        Ok(true)
    }

    /// True when backends went down whose clients are not nudged yet.
    pub fn has_nudges(&self) -> bool {
        !self.nudges.is_empty()
    }

    /// After backends went down and the rings switched: prompts their TCP
    /// clients so that flows stalled on a silent backend are reset now
    /// (see dataplane/nudge.rs), with one read of the flow table for all
    /// of them. Best effort, outside the measured path.
    pub fn flush_nudges(&mut self) {
        let pending = std::mem::take(&mut self.nudges);
        if pending.is_empty() {
            return;
        }
        let backend_ids: Vec<u32> = pending.iter().map(|(_, id)| *id).collect();
        let backends: Vec<&str> = pending.iter().map(|(b, _)| b.as_str()).collect();
        match self.exec.write(&Write::Nudge { backend_ids }) {
            Ok(0) => {}
            Ok(n) => tracing::info!(?backends, clients = n, "nudged clients of down backends"),
            Err(e) => tracing::warn!(?backends, error = %e, "could not nudge clients"),
        }
    }

    /// Feeds health state changes (a batch, as they arrived) and applies.
    pub fn on_health(&mut self, events: &[HealthEvent]) -> Result<ApplyReport, AgentError> {
        let mut names = Vec::new();
        let mut reasons = Vec::new();
        let mut at: Option<Instant> = None;
        for ev in events {
            if self.ids.backend(&ev.backend).is_none() {
                // A prober of a backend removed by a reload, still draining.
                continue;
            }
            if ev.to != HealthState::Unknown {
                self.health.insert(ev.backend.to_string(), ev.to);
            }
            self.grace_on(ev);
            reasons.push(event_reason(ev));
            names.push(ev.backend.to_string());
            at = Some(at.map_or(ev.at, |t: Instant| t.min(ev.at)));
        }
        let Some(at) = at else {
            return Ok(ApplyReport::default());
        };
        self.apply(&Decision {
            at,
            reason: reasons.join("; "),
            backends: names,
            all: false,
        })
    }

    /// What a health event means for `ev.backend`'s grace (module doc).
    fn grace_on(&mut self, ev: &HealthEvent) {
        let b = &*ev.backend;
        if ev.to.is_serving() {
            if self.graces.end(b) {
                self.note(b, "recovered during its slow grace", "grace ended");
            }
            return;
        }
        if ev.to != HealthState::Down {
            return;
        }
        let serving = self
            .ids
            .backend(b)
            .is_some_and(|a| self.current.serving(a.id));
        let cause = ev.reason.down_cause();
        match grace::exit(cause, serving, grace::grace_of(&self.cfg, b), ev.at) {
            Exit::Now => {
                if self.graces.end(b) {
                    tracing::warn!(backend = b, reason = %ev.reason, "found dead during its slow grace: down now");
                    let why = found_dead_note(ev.reason.as_str());
                    self.note(b, &why, "grace ended: dead");
                }
            }
            Exit::Drain { until } => {
                if self.graces.start(b, until) {
                    let left = until.saturating_duration_since(ev.at);
                    tracing::warn!(backend = b, reason = %ev.reason, grace_s = left.as_secs_f64(), "down as slow or failing: draining for its grace");
                    let why = format!(
                        "down as slow or failing ({}): draining {} for its streams in progress, then down",
                        ev.reason,
                        humantime::format_duration(left)
                    );
                    self.note(b, &why, "slow grace: no new flows, existing ones continue");
                }
            }
        }
    }

    /// When the next slow grace ends.
    pub fn grace_deadline(&self) -> Option<Instant> {
        self.graces.next_deadline()
    }

    /// Time left of `backend`'s slow grace, if one runs.
    pub fn grace_left(&self, backend: &str, now: Instant) -> Option<Duration> {
        self.graces.remaining(backend, now)
    }

    /// Ends the slow graces over by `at`: their backends go `DOWN`.
    pub fn end_graces(&mut self, at: Instant) -> Result<ApplyReport, AgentError> {
        let due = self.graces.take_due(at);
        if due.is_empty() {
            return Ok(ApplyReport::default());
        }
        for b in &due {
            tracing::warn!(backend = %b, "slow grace over: down");
            self.note(b, "slow grace over: down", "grace ended");
        }
        self.apply(&Decision {
            at,
            reason: format!("slow grace over: {}", due.join(", ")),
            backends: due,
            all: false,
        })
    }

    /// Operator drain: no new flows, existing ones continue.
    pub fn set_draining(
        &mut self,
        backend: &str,
        on: bool,
        at: Instant,
    ) -> Result<ApplyReport, AgentError> {
        self.operator_drain(backend, on, at, None)
    }

    /// [`Self::set_draining`], `forced` past the operator check
    /// ([`Self::check`]) with the refusal it overrode: audited as forced.
    pub fn operator_drain(
        &mut self,
        backend: &str,
        on: bool,
        at: Instant,
        forced: Option<&planner::Refusal>,
    ) -> Result<ApplyReport, AgentError> {
        let verb = if on { "drain" } else { "undrain" };
        let what = format!("{verb} {backend}");
        self.audit_forced(&what, forced);
        if self.ids.backend(backend).is_none() || !self.operator.set_drain(backend, on) {
            return Ok(ApplyReport::default());
        }
        self.persist();
        self.apply(&Decision {
            at,
            reason: operator_reason(&what, forced),
            backends: vec![backend.to_owned()],
            all: false,
        })
    }

    /// The weight each backend takes new flows with: the effective
    /// weight its rings give it ([`Programmed::weights`], the largest
    /// when several do), or else its configured weight scaled by its
    /// health (0 when down, drained or without a verdict; a degraded
    /// backend's by its probe's `degraded_weight`).
    pub fn effective_weights(&self) -> BTreeMap<String, u32> {
        let view = self.view();
        self.cfg
            .backends
            .iter()
            .map(|b| {
                let planned = self
                    .current
                    .services
                    .values()
                    .filter_map(|p| p.weights.get(&b.name))
                    .max()
                    .copied();
                let weight =
                    planned.unwrap_or_else(|| view.get(&b.name).effective_weight(b.weight));
                (b.name.clone(), weight)
            })
            .collect()
    }

    /// Whether `backend` is drained by the operator.
    pub fn is_draining(&self, backend: &str) -> bool {
        self.operator.is_drained(backend)
    }

    /// The operator override of `service` and when it ends, if one is set.
    pub fn override_of(&self, service: &str) -> Option<TimedOverride> {
        self.operator.override_of(service).copied()
    }

    /// When the next operator override ends.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.operator.next_expiry()
    }

    /// The operator's drains and overrides.
    pub fn operator_state(&self) -> &OperatorState {
        &self.operator
    }

    /// Operator override: keeps `service` on a tier until `until`. The
    /// caller checks it against the policy first
    /// ([`planner::check_override`]) and the floor ([`Self::check`]);
    /// the switch is audited like any other, a forced one as forced.
    pub fn set_override(
        &mut self,
        service: &str,
        ov: planner::Override,
        until: Deadline,
        at: Instant,
        forced: Option<&planner::Refusal>,
    ) -> Result<ApplyReport, AgentError> {
        let what = format!(
            "failover {service} to tier {} for {}",
            ov.to_tier,
            humantime::format_duration(Duration::from_secs(until.remaining(at).as_secs()))
        );
        self.audit_forced(&what, forced);
        if self.cfg.service(service).is_none() {
            return Ok(ApplyReport::default());
        }
        let changed = self.operator.set_override(service, ov, until);
        self.persist();
        if !changed {
            return Ok(ApplyReport::default());
        }
        self.apply(&Decision::all(operator_reason(&what, forced), at))
    }

    /// Ends `service`'s override now (the operator's cancel); returns
    /// whether one was set.
    pub fn cancel_override(&mut self, service: &str, at: Instant) -> Result<bool, AgentError> {
        if !self.operator.clear_override(service) {
            return Ok(false);
        }
        self.persist();
        self.apply(&Decision::all(
            format!("operator: override of {service} cancelled"),
            at,
        ))?;
        Ok(true)
    }

    /// Ends the overrides over by `at`; the planner's own choice returns.
    pub fn expire_overrides(&mut self, at: Instant) -> Result<ApplyReport, AgentError> {
        let due = self.operator.expired(at);
        if due.is_empty() {
            return Ok(ApplyReport::default());
        }
        for s in &due {
            self.operator.clear_override(s);
            tracing::info!(service = %s, "operator override expired");
        }
        self.persist();
        let names: Vec<String> = due.iter().map(|s| format!("override of {s}")).collect();
        self.apply(&Decision::all(
            format!("operator: {} expired", names.join(", ")),
            at,
        ))
    }

    /// Plans `action` as if applied and refuses it when a service would be
    /// left below its floor ([`planner::check_action`]), from what this
    /// applier knows now.
    pub fn check(&self, action: planner::Action<'_>) -> Result<(), planner::Refusal> {
        planner::check_action(
            &self.cfg,
            &self.view(),
            &self.ids.backend_ids(),
            &self.operator.overrides(),
            action,
        )
    }

    /// Writes the operator state to the state file. A failure is logged:
    /// the decision stands, only its survival of a restart is at risk.
    fn persist(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        if let Err(e) = operator_state::save(path, &self.operator) {
            tracing::error!(error = %e, "writing the operator state failed; a restart would forget it");
        }
    }

    fn audit_forced(&self, what: &str, forced: Option<&planner::Refusal>) {
        if let Some(r) = forced {
            self.record_forced(what, r);
        }
    }

    /// Audits an operator action forced past the refusal `r`, whether or
    /// not it changes a ring.
    pub fn record_forced(&self, what: &str, r: &planner::Refusal) {
        tracing::warn!(action = what, refusal = %r, "operator action forced");
        if let Some(j) = &self.journal {
            let mut rec = DecisionRecord::new("*", 0);
            rec.reason = format!("operator (forced): {what}");
            rec.policy_check = format!("forced past the floor check: {r}");
            j.record(rec);
        }
    }

    /// An audit record of a decision about `backend` that switches no ring
    /// by itself.
    fn note(&self, backend: &str, reason: &str, check: &str) {
        if let Some(j) = &self.journal {
            let mut r = DecisionRecord::new("*", 0);
            r.reason = format!("{backend}: {reason}");
            r.policy_check = check.to_owned();
            j.record(r);
        }
    }

    /// Ends the start-up hold and plans every service with what is known.
    pub fn end_hold(&mut self, at: Instant) -> Result<ApplyReport, AgentError> {
        if self.hold.take().is_none() {
            return Ok(ApplyReport::default());
        }
        if !self.held.is_empty() {
            tracing::warn!(services = ?self.held, "start-up hold expired before every backend had a verdict");
        }
        self.held.clear();
        self.apply(&Decision::all("start-up hold expired", at))
    }

    fn view(&self) -> HealthView {
        reconcile::health_view(&self.cfg, &self.operator, &self.health)
    }

    /// What the reconciler reads.
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            cfg: &self.cfg,
            ids: &self.ids,
            health: &self.health,
            operator: &self.operator,
            graces: &self.graces,
            held: &self.held,
            holding: self.hold.is_some(),
        }
    }

    fn holding(&self) -> bool {
        self.hold.is_some_and(|t| Instant::now() < t)
    }

    /// Applies one decision; see the module doc for the order of writes.
    pub fn apply(&mut self, d: &Decision) -> Result<ApplyReport, AgentError> {
        let mut report = ApplyReport::default();
        if !self.holding() {
            self.hold = None;
            self.held.clear();
        }

        // 1. The microsecond failover: backends decided down leave first.
        let fast = reconcile::take_out(&self.inputs(), &self.current, &d.backends);
        let taken = fast.len();
        for w in fast {
            let Some((id, _)) = w.backend_state() else {
                continue;
            };
            self.run(w)?;
            let name = self.ids.backend_name(id).unwrap_or_default().to_owned();
            self.nudges.push((name, id));
        }
        if taken > 0 {
            self.state_writes.record(d.at.elapsed());
            report.state_writes += taken;
        }

        // 2. Plan. A held service waits for every pool backend's verdict.
        let health = &self.health;
        let cfg = &self.cfg;
        self.held.retain(|s| {
            cfg.service(s)
                .is_some_and(|svc| svc.backends.iter().any(|b| !health.contains_key(b)))
        });
        report.held = self.held.iter().cloned().collect();
        let r = reconcile::reconcile(&self.inputs(), &self.current, d);

        // 3 to 6, in the reconciler's order.
        let last_flip = r
            .writes
            .iter()
            .rposition(|w| matches!(w, Write::Flip { .. }));
        for (i, w) in r.writes.into_iter().enumerate() {
            match &w {
                Write::State { id, entry } => {
                    report.state_writes += 1;
                    let state = DataplaneState::from_raw(entry.state);
                    if state != DataplaneState::Down {
                        tracing::debug!(backend_id = id, %state, "backend state");
                    }
                }
                Write::Unused { id, .. } => {
                    report.state_writes += 1;
                    tracing::info!(backend_id = id, "released backend id");
                }
                Write::Flip { service, next } => {
                    report
                        .flipped
                        .push((service.clone(), next.entry.generation));
                }
                _ => {}
            }
            self.run(w)?;
            if Some(i) == last_flip {
                let l = d.at.elapsed();
                self.flips.record(l);
                report.latency = Some(l);
            }
        }
        for k in r.kept {
            if let Some(p) = self.current.services.get_mut(&k.service) {
                p.open = k.open;
                // A ring kept as it was (start-up hold over, same ring):
                // its weights are known from now on.
                p.weights = k.weights;
            }
        }

        let latency_us = report.latency.map(|l| l.as_secs_f64() * 1e6);
        for s in &r.switched {
            tracing::info!(
                service = %s.service,
                generation = s.generation,
                from = ?s.from,
                to = ?s.to,
                weights = ?s.weights,
                mode = ?s.mode,
                reason = %d.reason,
                latency_us,
                "ring switched"
            );
            if let Some(j) = &self.journal {
                let mut rec = DecisionRecord::new(s.service.clone(), s.generation);
                rec.from.clone_from(&s.from);
                rec.to.clone_from(&s.to);
                rec.weights.clone_from(&s.weights);
                rec.reason = format!("{}: {}", d.reason, s.justification);
                rec.policy_check.clone_from(&s.sovereignty);
                rec.apply_latency_us = latency_us;
                j.record(rec);
            }
        }
        Ok(report)
    }

    /// Applies a new valid config as a diff: unchanged services keep their
    /// rings and flows. Returns what changed.
    pub fn reload(&mut self, new: Config, at: Instant) -> Result<ConfigDiff, AgentError> {
        let diff = config::diff(&self.cfg, &new);
        if diff.is_empty() {
            return Ok(diff);
        }
        let ids = self.ids.update(&new)?;
        if !diff.node.is_empty() {
            self.run(Write::Node(node_of(&new.node)))?;
            if new.node.pin_path != self.cfg.node.pin_path {
                tracing::warn!(pin_path = %new.node.pin_path.display(), "pin_path changes take effect at the next start");
            }
            if new.node.xdp_mode != self.cfg.node.xdp_mode {
                tracing::warn!(
                    "xdp_mode changes need `failover-agent detach` and a restart; kept the current mode"
                );
            }
            let mode = xdp_mode(self.cfg.node.xdp_mode);
            for iface in &new.node.interfaces {
                if !self.cfg.node.interfaces.contains(iface) {
                    let a = self.exec.attach(iface, mode)?;
                    tracing::info!(interface = %iface, mode = %a.mode, "XDP attached");
                }
            }
            for iface in &self.cfg.node.interfaces {
                if !new.node.interfaces.contains(iface) {
                    self.exec.detach(iface)?;
                    tracing::info!(interface = %iface, "XDP detached");
                }
            }
        }
        // Services gone, or at a new VIP/port (a new id): out first. The
        // VIP filter follows with the plan (module doc, step 5).
        for (name, w) in reconcile::gone_services(&ids, &self.current) {
            self.run(w)?;
            tracing::info!(service = %name, "service removed");
            self.held.remove(&name);
        }
        // Health belongs to an endpoint: a moved or removed backend starts over.
        let old = std::mem::replace(&mut self.ids, ids);
        let health = std::mem::take(&mut self.health);
        self.health = health
            .into_iter()
            .filter(|(name, _)| {
                self.ids
                    .backend(name)
                    .zip(old.backend(name))
                    .is_some_and(|(n, o)| n.id == o.id)
            })
            .collect();
        let ids = &self.ids;
        self.graces.retain(|n| ids.backend(n).is_some());
        let dropped = self.operator.retain_valid(&new);
        for d in &dropped {
            tracing::warn!(dropped = %d, "operator state no longer fits the config");
        }
        let new_file = new.node.state_file();
        let moved = self.state_file.as_ref().is_some_and(|f| *f != new_file);
        if moved {
            tracing::info!(state_file = %new_file.display(), "operator state moves to a new file");
            if let Some(old) = self.state_file.replace(new_file) {
                let _ = std::fs::remove_file(old);
            }
        }
        if moved || !dropped.is_empty() {
            self.persist();
        }
        self.cfg = new;
        self.write_new_backends()?;
        if let Some(j) = &self.journal {
            let mut r = DecisionRecord::new("*", 0);
            r.reason = format!("config reload applied: {diff}");
            r.policy_check = "config valid".into();
            j.record(r);
        }
        self.apply(&Decision::all(format!("config reload ({diff})"), at))?;
        Ok(diff)
    }

    /// Records a damped health decision about `backend`: it changes no
    /// ring by itself, so no flip record carries it.
    pub fn record_damping(&self, backend: &str, reason: &str) {
        if let Some(j) = &self.journal {
            let mut r = DecisionRecord::new("*", 0);
            r.reason = format!("{backend}: {reason}");
            r.policy_check = "hold-down: no ring change".into();
            j.record(r);
        }
    }

    /// Records a refused reload; the running state is untouched.
    pub fn refuse_reload(&self, err: &ConfigError) {
        if let Some(j) = &self.journal {
            let mut r = DecisionRecord::new("*", 0);
            r.reason = format!("reload refused: {}", err.to_string().replace('\n', "; "));
            r.policy_check = "config invalid: running config kept".into();
            j.record(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Ejection, HealthMachine, ProbeOutcome, Thresholds};

    fn event(from: HealthState, to: HealthState, reason: &str, source: EventSource) -> HealthEvent {
        HealthEvent {
            backend: "b1".into(),
            from,
            to,
            reason: reason.into(),
            latency: None,
            source,
            at: Instant::now(),
        }
    }

    #[test]
    fn reasons_name_their_source_once() {
        let now = Instant::now();
        let mut m = HealthMachine::new(Thresholds::new(1, 1, Duration::ZERO));
        let healthy = ProbeOutcome::Healthy {
            latency: Duration::from_millis(1),
        };
        m.observe(now, &healthy).unwrap();
        // The state machine's own passive reason, as the prober sends it
        // (and as the agent builds it for its own re-plan).
        let fall = m.eject(now, &Ejection::Refused { rsts: 2 }).unwrap();
        let ev = HealthEvent {
            reason: fall.reason,
            ..event(HealthState::Up, HealthState::Down, "", EventSource::Passive)
        };
        assert_eq!(
            event_reason(&ev),
            "b1 up -> down (passive: 2 SYNs refused with RST)"
        );
        // Escalated: "found dead: passive: ...", still one label.
        let ev = event(
            HealthState::Down,
            HealthState::Down,
            "found dead: passive: 2 SYNs refused with RST",
            EventSource::Passive,
        );
        assert_eq!(
            event_reason(&ev),
            "b1 down -> down (found dead: passive: 2 SYNs refused with RST)"
        );
        // An active probe's reason gets its label.
        let ev = event(
            HealthState::Up,
            HealthState::Down,
            "refused",
            EventSource::Active,
        );
        assert_eq!(event_reason(&ev), "b1 up -> down (active: refused)");
        // A reason that merely mentions the word keeps the label.
        assert_eq!(
            with_source("passive", "passive ejection disabled"),
            "passive: passive ejection disabled"
        );
        assert_eq!(
            found_dead_note("found dead: passive: 2 SYNs refused with RST"),
            "found dead during its slow grace (passive: 2 SYNs refused with RST): down now"
        );
        assert_eq!(
            found_dead_note("refused"),
            "found dead during its slow grace (refused): down now"
        );
    }
}
