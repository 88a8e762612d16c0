//! The applier's operator side: drains, overrides with their expiry
//! (held by [`OperatorState`], their one owner, and saved to the state
//! file after every change), the floor check, and forced actions audited.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{Applier, ApplyReport, Decision};
use crate::{
    agent::{
        AgentError,
        execute::Executor,
        operator_state::{self, Deadline, OperatorState, TimedOverride},
    },
    audit::DecisionRecord,
    planner,
};

/// The reason of an operator's decision in logs and the audit log.
fn operator_reason(what: &str, forced: Option<&planner::Refusal>) -> String {
    match forced {
        Some(_) => format!("operator (forced): {what}"),
        None => format!("operator: {what}"),
    }
}

impl<E: Executor> Applier<E> {
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
    pub(super) fn persist(&self) {
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
}
