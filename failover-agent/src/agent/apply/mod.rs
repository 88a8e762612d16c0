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
//!
//! This module holds the applier's core (taking over, applying, reloads);
//! `health.rs` its health side (verdicts, passive fast path, graces,
//! nudges), `operator.rs` its operator side (drains, overrides with their
//! expiry, the floor check); `tests.rs` runs it over a recorder.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use failover_common::{Node, Node6, RING_MAX};

pub use super::reconcile::Programmed;
use super::{
    AgentError,
    execute::{Executor, Maps},
    grace::Graces,
    ids::{self, Ids, ServiceEndpoint},
    journal::Journal,
    latency::{LatencyWindow, Percentiles},
    operator_state::OperatorState,
    reconcile::{self, Current, Inputs, Write},
    states::DataplaneState,
};
use crate::{
    audit::DecisionRecord,
    config::{self, Config, ConfigDiff, ConfigError},
    dataplane::{Dataplane, XdpMode},
    health::HealthState,
    load::{Change as LoadChange, Tracker as LoadTracker},
    planner::HealthView,
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
    /// Every backend's load state and the factor its weight carries.
    load: LoadTracker,
    /// The load changes of the decision being applied, for its audit
    /// records (set and taken by [`Applier::on_load`]).
    load_changes: Vec<LoadChange>,
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
    /// When the first and the latest of `nudges` were queued.
    nudges_queued: Option<(Instant, Instant)>,
}

/// `NODE`, and `NODE6` when the node has an IPv6 SNAT address or `old`
/// had one (an address of a family the node has none of is 0).
fn node_writes(n: &config::Node, old: Option<&config::Node>) -> Vec<Write> {
    let mut out = vec![Write::Node(node_of(n))];
    if n.snat6().is_some() || old.is_some_and(|o| o.snat6().is_some()) {
        out.push(Write::Node6(Node6 {
            snat: n.snat6().map(ids::addr6).unwrap_or_default(),
        }));
    }
    out
}

fn node_of(n: &config::Node) -> Node {
    Node {
        snat_be: n.snat4().map(ids::addr4).unwrap_or(0),
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
            .flat_map(|s| self.ids.service_vips(&s.name).map(|a| (a.id, s.timeouts)))
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
        let ids = Ids::recover(&cfg, &pinned.services, &pinned.backends, &pinned.addr6)?;
        let mut a = Self {
            exec,
            cfg,
            ids,
            health: BTreeMap::new(),
            load: LoadTracker::default(),
            load_changes: Vec::new(),
            operator: opts.operator,
            state_file: opts.state_file,
            graces: Graces::default(),
            current: Current {
                backends: pinned.backends.into_iter().collect(),
                addr6: pinned.addr6,
                path_mss: pinned.path_mss.into_iter().collect(),
                ..Current::default()
            },
            hold: None,
            held: BTreeSet::new(),
            flips: LatencyWindow::new(),
            state_writes: LatencyWindow::new(),
            journal: opts.journal,
            nudges: Vec::new(),
            nudges_queued: None,
        };
        for w in node_writes(&a.cfg.node, None) {
            a.run(w)?;
        }

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
        a.load.sync(&a.cfg, Instant::now());
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
    /// into pinned links left by an earlier agent), then writes the VIP
    /// filter exactly: until then it kept the bits an older program may
    /// read (`Dataplane::add_vips`).
    pub fn attach(&mut self) -> Result<(), AgentError> {
        let mode = xdp_mode(self.cfg.node.xdp_mode);
        for iface in self.cfg.node.interfaces.clone() {
            let a = self.exec.attach(&iface, mode)?;
            tracing::info!(interface = %iface, mode = %a.mode, updated = a.updated, "XDP attached");
        }
        if let Some(vips) = self.current.vips.clone() {
            self.run(Write::VipFilter(vips))?;
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
    /// until its first verdict, after its MSS clamp.
    fn write_new_backends(&mut self) -> Result<(), AgentError> {
        let mut writes = reconcile::path_mss(&self.cfg, &self.ids, &self.current);
        writes.extend(reconcile::new_backends(&self.ids, &self.current));
        for w in writes {
            self.run(w)?;
        }
        Ok(())
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
        reconcile::health_view(&self.cfg, &self.operator, &self.health, &self.load)
    }

    /// What the reconciler reads.
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            cfg: &self.cfg,
            ids: &self.ids,
            health: &self.health,
            load: &self.load,
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
            self.queue_nudge(name, id);
        }
        if taken > 0 {
            self.state_writes.record(d.at.elapsed());
            report.state_writes += taken;
        }

        // 2. Plan. A held service waits for every pool backend's verdict.
        let health = &self.health;
        let cfg = &self.cfg;
        self.held.retain(|s| {
            cfg.service(ids::base_name(s))
                .is_some_and(|svc| svc.backends.iter().any(|b| !health.contains_key(b)))
        });
        report.held = self
            .held
            .iter()
            .filter(|s| ids::base_name(s) == s.as_str())
            .cloned()
            .collect();
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
                // A dual-stack service's `vip6` flips with its `vip`,
                // which reports the switch.
                Write::Flip { service, next } if ids::base_name(service) == service => {
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
        for w in reconcile::release(&self.ids, &self.current) {
            if let Write::Unused { id, .. } = &w {
                tracing::info!(backend_id = id, "released backend id");
            }
            report.state_writes += 1;
            self.run(w)?;
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
                mode6 = ?s.mode6,
                reason = %d.reason,
                latency_us,
                "ring switched"
            );
            if let Some(j) = &self.journal {
                let mut rec = DecisionRecord::new(s.service.clone(), s.generation);
                rec.from.clone_from(&s.from);
                rec.to.clone_from(&s.to);
                rec.weights = s
                    .weights
                    .iter()
                    .map(|w| load::with_note(w, &self.load_changes))
                    .collect();
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
            for w in node_writes(&new.node, Some(&self.cfg.node)) {
                self.run(w)?;
            }
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
        self.load.sync(&self.cfg, at);
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

mod health;
pub mod load;
mod operator;
#[cfg(test)]
mod tests;
