//! The applier's health side: verdicts in ([`Applier::on_health`]), the
//! passive fast path ([`Applier::mark_down`]), slow graces
//! ([`super::super::grace`]) and the nudges of a down backend's clients.

use std::time::{Duration, Instant};

use super::{Applier, ApplyReport, Decision};
use crate::{
    agent::{
        AgentError,
        execute::Executor,
        grace::{self, Exit},
        reconcile::Write,
        states::DataplaneState,
    },
    audit::DecisionRecord,
    health::{EventSource, HealthEvent, HealthState},
};

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

impl<E: Executor> Applier<E> {
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
        self.queue_nudge(backend.to_owned(), id);
        Ok(true)
    }

    pub(super) fn queue_nudge(&mut self, backend: String, id: u32) {
        let now = Instant::now();
        self.nudges.push((backend, id));
        self.nudges_queued = Some(
            self.nudges_queued
                .map_or((now, now), |(first, _)| (first, now)),
        );
    }

    /// True when backends went down whose clients are not nudged yet.
    pub fn has_nudges(&self) -> bool {
        !self.nudges.is_empty()
    }

    /// When to [`flush_nudges`](Self::flush_nudges): `delay` after the
    /// latest backend went down, but no later than `max_wait` after the
    /// first. A nudge blocks the run loop while it reads the flow tables,
    /// and a backend written DOWN by a passive ejection gets its ring
    /// switch only once the loop has taken its health event: a nudge due
    /// for the cloud's first backend, run between the second's DOWN and
    /// its switch, left that ring pointing at DOWN backends (new SYNs
    /// reset) for the whole read (the failover bench's `!x13` to `!x46`).
    pub fn nudge_due(&self, delay: Duration, max_wait: Duration) -> Option<Instant> {
        let (first, last) = self.nudges_queued?;
        Some((last + delay).min(first + max_wait))
    }

    /// After backends went down and the rings switched: prompts their TCP
    /// clients so that flows stalled on a silent backend are reset now
    /// (see dataplane/nudge.rs), with one read of the flow table for all
    /// of them. Best effort, outside the measured path.
    pub fn flush_nudges(&mut self) {
        let pending = std::mem::take(&mut self.nudges);
        self.nudges_queued = None;
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

    /// An audit record of a decision about `backend` that switches no ring
    /// by itself.
    pub(super) fn note(&self, backend: &str, reason: &str, check: &str) {
        if let Some(j) = &self.journal {
            let mut r = DecisionRecord::new("*", 0);
            r.reason = format!("{backend}: {reason}");
            r.policy_check = check.to_owned();
            j.record(r);
        }
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
