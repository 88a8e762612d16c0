//! A drill as the run loop runs it (see [`crate::drill`] for the report
//! and its analysis): the targets are marked down through the normal apply
//! path after a baseline, restored after the fault, and the traffic is
//! sampled every [`crate::drill::SAMPLE_INTERVAL`] meanwhile.

use std::time::{Duration, Instant};

use super::Agent;
use crate::{
    api::ApiError,
    health::{EventSource, HealthEvent, HealthState},
    metrics::Trigger,
};

/// A drill in progress (see [`crate::drill`]).
pub(super) struct ActiveDrill {
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
    /// The service's data-plane ids: one per VIP.
    service_ids: Vec<u32>,
}

impl Agent {
    pub(super) fn start_drill(
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
        let service_ids = ids.service_vips(&svc.name).map(|a| a.id).collect();
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
            state: crate::drill::DrillState::Running,
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
            service_ids,
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

    pub(super) fn on_drill_tick(&mut self) {
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
        let resets: u64 = d
            .service_ids
            .iter()
            .filter_map(|&id| dp.service_stats(id).ok())
            .map(|s| s.resets)
            .sum();
        d.report.samples.push(crate::drill::Sample {
            t_s: now.duration_since(d.began).as_secs_f64(),
            packets,
            dropped: drops + resets,
        });
        crate::drill::analyze(&mut d.report);
        if d.restored && now >= d.end_at {
            d.report.state = crate::drill::DrillState::Done;
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

    /// The running drill's report, else the last one.
    pub(super) fn drill_report(&self) -> Result<crate::drill::DrillReport, ApiError> {
        match (&self.drill, &self.last_drill) {
            (Some(d), _) => Ok(d.report.clone()),
            (None, Some(r)) => Ok(r.clone()),
            (None, None) => Err(ApiError::not_found("no drill has run")),
        }
    }
}
