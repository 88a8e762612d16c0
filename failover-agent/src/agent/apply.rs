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
//! 5. Other backends leaving service get `DOWN`; ids no longer in the
//!    config get `UNUSED`, once no ring refers to them.
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

use failover_common::{
    Backend as MapBackend, MAX_BACKENDS, NO_BACKEND, Node, RING_MAX, Ring, SVC_F_RESET,
    Service as MapService, ServiceKey, state,
};

use super::{
    AgentError,
    grace::{self, Exit, Graces},
    ids::{Ids, ServiceEndpoint},
    journal::Journal,
    latency::{LatencyWindow, Percentiles},
    operator_state::{self, Deadline, OperatorState, TimedOverride},
};
use crate::{
    audit::{DecisionRecord, WeightChange},
    config::{self, Config, ConfigDiff, ConfigError, OnBackendDown},
    dataplane::{Dataplane, XdpMode},
    health::{EventSource, HealthEvent, HealthState},
    planner::{self, BackendHealth, HealthView, Mode, ServicePlan},
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

/// A service as it is in the data plane.
#[derive(Clone, Debug, PartialEq)]
pub struct Programmed {
    pub key: ServiceKey,
    pub entry: MapService,
    /// The active ring, `entry.ring_size` entries.
    pub ring: Vec<u32>,
    /// Backends taking new flows.
    pub to: Vec<String>,
    /// Backend ids in the ring because the service fails open: they must
    /// be `UP` in `BACKENDS` though their health is down.
    pub open: Vec<u32>,
    /// Effective weight of each backend in `to` (the plan's
    /// [`planner::BackendPlan::effective_weight`]); empty for a ring
    /// recovered from the pins, until it is planned.
    pub weights: BTreeMap<String, u32>,
}

/// A service's next state, before it is written.
struct Next {
    name: String,
    key: ServiceKey,
    entry: MapService,
    plan: ServicePlan,
    to: Vec<String>,
    open: Vec<u32>,
    changed: bool,
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

/// Owns the data plane and what the agent knows: config, ids, health.
pub struct Applier {
    dp: Dataplane,
    cfg: Config,
    ids: Ids,
    /// Last verdict per backend name; absent = no verdict yet.
    health: BTreeMap<String, HealthState>,
    /// Drains and overrides (with their expiry), as the operator set them.
    operator: OperatorState,
    state_file: Option<PathBuf>,
    /// Backends down as sick, `DRAINING` until their grace ends.
    graces: Graces,
    programmed: BTreeMap<String, Programmed>,
    /// `BACKENDS` entries in use, as written: a state change is then one
    /// write, no read.
    backends: BTreeMap<u32, MapBackend>,
    hold: Option<Instant>,
    /// Recovered services still waiting for their pool's first verdicts.
    held: BTreeSet<String>,
    flips: LatencyWindow,
    state_writes: LatencyWindow,
    journal: Option<Journal>,
    scratch: Box<Ring>,
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

fn service_flags(s: &config::Service) -> u32 {
    match s.policy.on_backend_down {
        OnBackendDown::Reset => SVC_F_RESET,
        OnBackendDown::Reselect => 0,
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

/// Effective weight of each backend a plan gives new flows to.
fn weights_of(plan: &ServicePlan) -> BTreeMap<String, u32> {
    plan.backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| (b.name.clone(), b.effective_weight))
        .collect()
}

/// Backends taking new flows before and after whose effective weight
/// changed (one only in `after` or `before` shows in `to` or `from`).
fn weight_changes(
    before: &BTreeMap<String, u32>,
    after: &BTreeMap<String, u32>,
) -> Vec<WeightChange> {
    after
        .iter()
        .filter_map(|(name, &to)| {
            let &from = before.get(name)?;
            (from != to).then(|| WeightChange {
                backend: name.clone(),
                from,
                to,
            })
        })
        .collect()
}

fn state_name(st: u8) -> &'static str {
    match st {
        state::UP => "up",
        state::DOWN => "down",
        state::DRAINING => "draining",
        _ => "unused",
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
        let pinned_services = dp.services()?;
        let mut pinned_backends = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = dp.backend(id)?;
            if b.state != state::UNUSED {
                pinned_backends.push((id, b));
            }
        }
        let ids = Ids::recover(&cfg, &pinned_services, &pinned_backends)?;
        // 256 KiB: built on the heap, never on a (2 MiB, task) stack.
        // SAFETY: `Ring` is a plain array of u32, valid when zeroed.
        let mut scratch: Box<Ring> = unsafe { Box::<Ring>::new_zeroed().assume_init() };
        scratch.backends.fill(NO_BACKEND);
        let mut a = Self {
            dp,
            cfg,
            ids,
            health: BTreeMap::new(),
            operator: opts.operator,
            state_file: opts.state_file,
            graces: Graces::default(),
            programmed: BTreeMap::new(),
            backends: pinned_backends.into_iter().collect(),
            hold: None,
            held: BTreeSet::new(),
            flips: LatencyWindow::new(),
            state_writes: LatencyWindow::new(),
            journal: opts.journal,
            scratch,
            nudges: Vec::new(),
        };
        a.dp.set_node(node_of(&a.cfg.node))?;
        a.dp.set_vips(a.cfg.services.iter().map(|s| s.vip))?;

        for (key, svc) in &pinned_services {
            let claimed = a
                .ids
                .services()
                .find(|(_, s)| s.id == svc.id && s.endpoint == ServiceEndpoint::from_key(key))
                .map(|(n, _)| n.to_owned());
            let Some(name) = claimed else {
                // Not in this config any more.
                a.dp.remove_service(key)?;
                tracing::info!(service_id = svc.id, "removed service not in the config");
                continue;
            };
            let ring = read_ring(&a.dp, svc.id, svc.active_slot, svc.ring_size)?;
            let to = a.names_in(&ring);
            tracing::info!(service = %name, generation = svc.generation, backends = ?to, "recovered pinned service");
            a.programmed.insert(
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

    /// Attaches the NAT program to the configured interfaces (swapping it
    /// into pinned links left by an earlier agent).
    pub fn attach(&mut self) -> Result<(), AgentError> {
        let mode = xdp_mode(self.cfg.node.xdp_mode);
        for iface in self.cfg.node.interfaces.clone() {
            let a = self.dp.attach(&iface, mode)?;
            tracing::info!(interface = %iface, mode = %a.mode, updated = a.updated, "XDP attached");
        }
        Ok(())
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn ids(&self) -> &Ids {
        &self.ids
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
        self.dp.expire_idle(now, |service_id, proto| {
            by_id.get(&service_id).map(|t| match proto {
                6 => t.tcp_idle,
                _ => t.udp_idle,
            })
        })
    }

    pub fn programmed(&self, service: &str) -> Option<&Programmed> {
        self.programmed.get(service)
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

    fn names_in(&self, ring: &[u32]) -> Vec<String> {
        let ids: BTreeSet<u32> = ring.iter().copied().filter(|&i| i != NO_BACKEND).collect();
        let mut names: Vec<String> = ids
            .iter()
            .map(|&id| {
                self.ids
                    .backend_name(id)
                    .map_or_else(|| format!("#{id}"), str::to_owned)
            })
            .collect();
        names.sort();
        names
    }

    /// Gives every config backend without a matching entry one, DOWN
    /// until its first verdict.
    fn write_new_backends(&mut self) -> Result<(), AgentError> {
        let fresh: Vec<(u32, MapBackend)> = self
            .ids
            .backends()
            .filter(|(_, a)| {
                self.backends.get(&a.id).is_none_or(|b| {
                    super::ids::BackendEndpoint::from_map(b) != a.endpoint
                        || b.state == state::UNUSED
                })
            })
            .map(|(_, a)| (a.id, a.endpoint.to_map(state::DOWN)))
            .collect();
        for (id, b) in fresh {
            self.dp.set_backend(id, b)?;
            self.backends.insert(id, b);
        }
        Ok(())
    }

    /// One `BACKENDS` write from the cached entry.
    fn write_state(&mut self, id: u32, st: u8) -> Result<bool, AgentError> {
        let Some(b) = self.backends.get_mut(&id) else {
            return Ok(false);
        };
        if b.state == st {
            return Ok(false);
        }
        let mut next = *b;
        next.state = st;
        self.dp.set_backend(id, next)?;
        *b = next;
        Ok(true)
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
        let serving = self
            .backends
            .get(&id)
            .is_some_and(|b| b.state == state::UP || b.state == state::DRAINING);
        if !serving || !self.write_state(id, state::DOWN)? {
            return Ok(false);
        }
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
        let ids: Vec<u32> = pending.iter().map(|(_, id)| *id).collect();
        let backends: Vec<&str> = pending.iter().map(|(b, _)| b.as_str()).collect();
        match self.dp.nudge_clients(&ids) {
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
        let serving = self.ids.backend(b).is_some_and(|a| {
            self.backends
                .get(&a.id)
                .is_some_and(|m| m.state == state::UP || m.state == state::DRAINING)
        });
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
                    .programmed
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
        let mut v = HealthView::new();
        for b in &self.cfg.backends {
            if self.operator.is_drained(&b.name) {
                v.set(b.name.clone(), BackendHealth::Draining);
                continue;
            }
            match self.health.get(&b.name) {
                Some(HealthState::Up) => v.set(b.name.clone(), BackendHealth::Up),
                Some(HealthState::Degraded) => v.set(
                    b.name.clone(),
                    BackendHealth::Degraded {
                        weight_factor: self.cfg.probe_of(&b.name).map_or(
                            config::Probe::DEFAULT_DEGRADED_WEIGHT,
                            config::Probe::degraded_weight,
                        ),
                    },
                ),
                Some(HealthState::Down) => v.set(b.name.clone(), BackendHealth::Down),
                Some(HealthState::Unknown) | None => {}
            }
        }
        v
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
        let mut fast = 0;
        for name in &d.backends {
            // Down for good: dead, or its slow grace over. An operator's
            // drain does not keep a dead backend's flows waiting.
            let down =
                self.health.get(name) == Some(&HealthState::Down) && !self.graces.contains(name);
            if let (true, Some(id)) = (down, self.ids.backend(name).map(|a| a.id))
                && self.take_out(name, id)?
            {
                fast += 1;
            }
        }
        if fast > 0 {
            self.state_writes.record(d.at.elapsed());
            report.state_writes += fast;
        }

        // 2. Plan. A held service waits for every pool backend's verdict.
        let health = &self.health;
        self.held.retain(|s| {
            self.cfg
                .service(s)
                .is_some_and(|svc| svc.backends.iter().any(|b| !health.contains_key(b)))
        });
        report.held = self.held.iter().cloned().collect();
        let view = self.view();
        let bids = self.ids.backend_ids();
        let overrides = self.operator.overrides();
        let mut next: Vec<Next> = Vec::new();
        for svc in &self.cfg.services {
            if self.held.contains(&svc.name) {
                continue;
            }
            let known = self.programmed.get(&svc.name);
            let touched =
                d.all || known.is_none() || svc.backends.iter().any(|b| d.backends.contains(b));
            if !touched {
                continue;
            }
            let Some(sid) = self.ids.service(&svc.name) else {
                continue;
            };
            let plan = planner::plan_service(&self.cfg, svc, &view, &bids, &overrides);
            let flags = service_flags(svc);
            let ring_size = plan.ring.len() as u32;
            let key = sid.endpoint.key();
            let changed = known.is_none_or(|p| {
                p.ring != plan.ring
                    || p.key != key
                    || p.entry.id != sid.id
                    || p.entry.flags != flags
                    || p.entry.ring_size != ring_size
            });
            let (active_slot, generation) = match known {
                Some(p) if p.key == key && p.entry.id == sid.id => {
                    (p.entry.active_slot, p.entry.generation)
                }
                _ => (1, 0), // flips to slot 0, generation 1
            };
            let to: Vec<String> = plan
                .backends
                .iter()
                .filter(|b| b.weight > 0)
                .map(|b| b.name.clone())
                .collect();
            let open = if plan.mode == Mode::PanicFailOpen {
                plan.backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .map(|b| b.id)
                    .collect()
            } else {
                Vec::new()
            };
            next.push(Next {
                name: svc.name.clone(),
                key,
                entry: MapService {
                    id: sid.id,
                    flags,
                    active_slot,
                    ring_size,
                    generation,
                    half_open_ms: u32::try_from(svc.timeouts.tcp_half_open.as_millis())
                        .unwrap_or(u32::MAX),
                    _pad: 0,
                },
                plan,
                to,
                open,
                changed,
            });
        }

        // 3. Target states, from every service's fail-open set.
        let mut open: BTreeSet<u32> = BTreeSet::new();
        for (name, p) in &self.programmed {
            if !next.iter().any(|n| &n.name == name) {
                open.extend(&p.open);
            }
        }
        for n in &next {
            open.extend(&n.open);
        }
        let holding = self.hold.is_some();
        let mut raise: Vec<(u32, u8)> = Vec::new();
        let mut lower: Vec<(u32, u8)> = Vec::new();
        for (name, a) in self.ids.backends() {
            let Some(cur) = self.backends.get(&a.id).map(|b| b.state) else {
                continue;
            };
            let grace = self.graces.contains(name);
            let want = match self.health.get(name) {
                // Dead, or its slow grace over: its flows go, drained or not.
                Some(HealthState::Down) if !grace && !open.contains(&a.id) => state::DOWN,
                _ if self.operator.is_drained(name) => state::DRAINING,
                Some(HealthState::Up | HealthState::Degraded) => state::UP,
                _ if open.contains(&a.id) => state::UP,
                // Down as sick: its streams in progress finish first.
                Some(HealthState::Down) => state::DRAINING,
                // No verdict yet: a restarted agent keeps what it found.
                Some(HealthState::Unknown) | None if holding => cur,
                Some(HealthState::Unknown) | None => state::DOWN,
            };
            if want == cur {
                continue;
            }
            if want == state::DOWN {
                lower.push((a.id, want));
            } else {
                raise.push((a.id, want));
            }
        }
        for &(id, st) in &raise {
            self.write_state(id, st)?;
            tracing::debug!(backend_id = id, state = state_name(st), "backend state");
        }
        report.state_writes += raise.len();

        // 4. Switch the rings that changed.
        let mut flipped: Vec<(&Next, Vec<String>, Vec<WeightChange>)> = Vec::new();
        for n in &next {
            if !n.changed {
                continue;
            }
            let ring = &n.plan.ring;
            self.scratch.backends[..ring.len()].copy_from_slice(ring);
            let slot = n.entry.active_slot ^ 1;
            self.dp.write_ring(n.entry.id, slot, &self.scratch)?;
            let entry = MapService {
                active_slot: slot,
                generation: n.entry.generation + 1,
                ..n.entry
            };
            // One write: packets see the old ring or the new one.
            self.dp.put_service(n.key, entry)?;
            let (from, from_weights) = self
                .programmed
                .get(&n.name)
                .map(|p| (p.to.clone(), p.weights.clone()))
                .unwrap_or_default();
            let weights = weights_of(&n.plan);
            let changes = weight_changes(&from_weights, &weights);
            self.programmed.insert(
                n.name.clone(),
                Programmed {
                    key: n.key,
                    entry,
                    ring: ring.clone(),
                    to: n.to.clone(),
                    open: n.open.clone(),
                    weights,
                },
            );
            report.flipped.push((n.name.clone(), entry.generation));
            flipped.push((n, from, changes));
        }
        if !flipped.is_empty() {
            let l = d.at.elapsed();
            self.flips.record(l);
            report.latency = Some(l);
        }
        for n in next.iter().filter(|n| !n.changed) {
            if let Some(p) = self.programmed.get_mut(&n.name) {
                p.open.clone_from(&n.open);
                // A ring kept as it was (start-up hold over, same ring):
                // its weights are known from now on.
                p.weights = weights_of(&n.plan);
            }
        }

        // 5. Leave service, then free ids no ring refers to any more.
        for &(id, st) in &lower {
            self.write_state(id, st)?;
        }
        report.state_writes += lower.len();
        // A held (recovered) ring may still name a removed backend: its id
        // is freed only once no ring does, so it is never handed on early.
        let mut live: BTreeSet<u32> = self.ids.backends().map(|(_, a)| a.id).collect();
        for p in self.programmed.values() {
            live.extend(p.ring.iter().copied().filter(|&i| i != NO_BACKEND));
        }
        let stale: Vec<u32> = self
            .backends
            .keys()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        for id in stale {
            let mut b = self.backends.remove(&id).unwrap_or_default();
            b.state = state::UNUSED;
            self.dp.set_backend(id, b)?;
            report.state_writes += 1;
            tracing::info!(backend_id = id, "released backend id");
        }

        let latency_us = report.latency.map(|l| l.as_secs_f64() * 1e6);
        for (n, from, weights) in &flipped {
            tracing::info!(
                service = %n.name,
                generation = n.entry.generation + 1,
                from = ?from,
                to = ?n.to,
                weights = ?weights,
                mode = ?n.plan.mode,
                reason = %d.reason,
                latency_us,
                "ring switched"
            );
            if let Some(j) = &self.journal {
                let mut r = DecisionRecord::new(n.name.clone(), n.entry.generation + 1);
                r.from.clone_from(from);
                r.to.clone_from(&n.to);
                r.weights.clone_from(weights);
                r.reason = format!("{}: {}", d.reason, n.plan.justification);
                r.policy_check.clone_from(&n.plan.sovereignty);
                r.apply_latency_us = latency_us;
                j.record(r);
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
            self.dp.set_node(node_of(&new.node))?;
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
                    let a = self.dp.attach(iface, mode)?;
                    tracing::info!(interface = %iface, mode = %a.mode, "XDP attached");
                }
            }
            for iface in &self.cfg.node.interfaces {
                if !new.node.interfaces.contains(iface) {
                    self.dp.detach(iface)?;
                    tracing::info!(interface = %iface, "XDP detached");
                }
            }
        }
        // Services gone, or at a new VIP/port (a new id): out first.
        let gone: Vec<String> = self
            .programmed
            .iter()
            .filter(|(name, p)| {
                ids.service(name)
                    .is_none_or(|s| s.id != p.entry.id || s.endpoint.key() != p.key)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(p) = self.programmed.remove(&name) {
                self.dp.remove_service(&p.key)?;
                tracing::info!(service = %name, "service removed");
            }
            self.held.remove(&name);
        }
        self.dp.set_vips(new.services.iter().map(|s| s.vip))?;
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

    #[test]
    fn a_reweight_is_a_weight_change_and_new_or_gone_backends_are_not() {
        let w = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect()
        };
        assert_eq!(
            weight_changes(
                &w(&[("a1", 100), ("a2", 100), ("b1", 50)]),
                &w(&[("a1", 50), ("a2", 100), ("c1", 10)])
            ),
            [WeightChange {
                backend: "a1".into(),
                from: 100,
                to: 50
            }]
        );
        assert!(weight_changes(&BTreeMap::new(), &w(&[("a1", 100)])).is_empty());
    }
}
