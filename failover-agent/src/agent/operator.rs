//! The operator's commands that change state (drain, failover and its
//! cancel), as the control loop answers them: each is checked by the
//! planner first ([`crate::planner::check_action`], refused with 409
//! unless forced), then handed to the applier, which owns the operator
//! state ([`super::operator_state`]) and audits the decision.

use std::time::{Duration, Instant, SystemTime};

use super::{Agent, operator_state::Deadline};
use crate::{
    api::{self, ApiError},
    metrics::Trigger,
    planner::{self, Action, Refusal},
};

impl Agent {
    /// The floor check of an operator action ([`Applier::check`]): refused
    /// with 409, or, when `force`, passed with the refusal it overrides.
    pub(super) fn check_action(
        &self,
        action: Action<'_>,
        force: bool,
    ) -> Result<Option<Refusal>, ApiError> {
        match self.applier.check(action) {
            Ok(()) => Ok(None),
            Err(r) if force => Ok(Some(r)),
            Err(r) => Err(ApiError::conflict(format!(
                "refused: {r}; force it with --force (\"force\": true)"
            ))),
        }
    }

    pub(super) fn api_drain(
        &mut self,
        backend: &str,
        on: bool,
        force: bool,
    ) -> Result<api::DrainReply, ApiError> {
        let cfg = self.applier.config();
        if cfg.backend(backend).is_none() {
            return Err(ApiError::not_found(format!("no backend named {backend:?}")));
        }
        let was = self.applier.is_draining(backend);
        // Undraining never takes a backend away.
        let forced = if on && !was {
            self.check_action(Action::Drain { backend }, force)?
        } else {
            None
        };
        let before = self.generations();
        self.applier
            .operator_drain(backend, on, Instant::now(), forced.as_ref())
            .map_err(|e| ApiError::new(500, format!("applying: {e}")))?;
        self.count_switches(&before, Trigger::Operator);
        let verb = if on { "drain" } else { "undrain" };
        tracing::info!(backend, changed = was != on, "operator {verb}");
        let id = self.applier.ids().backend(backend).map(|a| a.id);
        let in_flight = id
            .and_then(|i| self.flow_counts().get(&i).copied())
            .unwrap_or(0);
        Ok(api::DrainReply {
            backend: backend.to_owned(),
            draining: on,
            changed: was != on,
            in_flight_flows: in_flight,
            forced: forced.is_some(),
        })
    }

    pub(super) fn api_failover(
        &mut self,
        service: &str,
        tier: u8,
        duration: Duration,
        force: bool,
    ) -> Result<api::FailoverReply, ApiError> {
        let ov = planner::Override { to_tier: tier };
        // Sovereignty is never forced.
        planner::check_override(self.applier.config(), service, ov).map_err(|e| match e {
            planner::PlanError::UnknownService(_) => {
                ApiError::not_found(format!("no service named {service:?}"))
            }
            e @ planner::PlanError::NoSuchTier { .. } => ApiError::not_found(e.to_string()),
            other => ApiError::forbidden(other.to_string()),
        })?;
        let forced = self.check_action(Action::Failover { service, tier }, force)?;
        let now = Instant::now();
        let until = Deadline::after(now, SystemTime::now(), duration);
        let before = self.generations();
        self.applier
            .set_override(service, ov, until, now, forced.as_ref())
            .map_err(|e| ApiError::new(500, format!("applying: {e}")))?;
        self.count_switches(&before, Trigger::Operator);
        tracing::warn!(
            service,
            tier,
            for_s = duration.as_secs_f64(),
            forced = forced.is_some(),
            "operator override"
        );
        let p = self.applier.programmed(service);
        Ok(api::FailoverReply {
            service: service.to_owned(),
            tier,
            expires_in_s: duration.as_secs_f64(),
            generation: p.map_or(0, |p| p.entry.generation),
            serving: p.map(|p| p.to.clone()).unwrap_or_default(),
            forced: forced.is_some(),
        })
    }

    pub(super) fn api_cancel_failover(
        &mut self,
        service: &str,
    ) -> Result<api::CancelReply, ApiError> {
        if self.applier.config().service(service).is_none() {
            return Err(ApiError::not_found(format!("no service named {service:?}")));
        }
        let before = self.generations();
        let cancelled = self
            .applier
            .cancel_override(service, Instant::now())
            .map_err(|e| ApiError::new(500, format!("applying: {e}")))?;
        self.count_switches(&before, Trigger::Operator);
        if cancelled {
            tracing::warn!(service, "operator override cancelled");
        }
        let p = self.applier.programmed(service);
        Ok(api::CancelReply {
            service: service.to_owned(),
            cancelled,
            generation: p.map_or(0, |p| p.entry.generation),
            serving: p.map(|p| p.to.clone()).unwrap_or_default(),
        })
    }
}
