//! Probers and the health events they send: one prober (and passive
//! watch) per probed backend, kept in step with the config
//! ([`Agent::sync_probers`]); their events applied in batches, and the
//! passive feed's ejections applied at once, before the prober's own
//! event arrives.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{Agent, EVENT_BATCH};
use crate::{
    config::{self, Config},
    health::{self, BackendTarget, EventSource, HealthEvent, HealthState, Prober},
    metrics::Trigger,
};

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

pub(super) struct ProberSlot {
    pub(super) prober: Prober,
    target: BackendTarget,
    probe: config::Probe,
}

impl Agent {
    /// Starts and stops probers (and passive watches) to match the config.
    pub(super) fn sync_probers(&mut self) {
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
                        self.passive
                            .watch(&name, id, Some(prober.signals()), probe.wedge());
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

    pub(super) fn on_events(&mut self, first: HealthEvent) {
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

    /// Reads the passive feed. Its ejections and wedge suspicions went to
    /// the backends' probers, which own the health verdict: the prober's
    /// `Down` event re-plans (`on_events`), a task hop later. Only the
    /// data-plane write is done here, at once: new flows skip the backend
    /// within microseconds of the evidence, and the re-plan finds it done.
    pub(super) fn on_passive_tick(&mut self) {
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
        for e in ejections {
            tracing::warn!(backend = %e.backend, backend_id = e.id, reason = %e.why, "passive ejection");
            if let Err(err) = self.applier.mark_down(&e.backend, now) {
                tracing::error!(backend = %e.backend, error = %err, "writing DOWN failed");
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
