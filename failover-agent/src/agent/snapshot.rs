//! What a metrics scrape reads ([`Agent::snapshot`]), and the count of
//! ring switches by trigger.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{Agent, states::DataplaneState};
use crate::metrics::{self, Snapshot, Trigger};

impl Agent {
    /// Ring generation of every programmed service.
    pub(super) fn generations(&self) -> BTreeMap<String, u64> {
        self.applier
            .config()
            .services
            .iter()
            .filter_map(|s| {
                self.applier
                    .programmed(&s.name)
                    .map(|p| (s.name.clone(), p.entry.generation))
            })
            .collect()
    }

    /// Counts the ring switches since `before` (from generations).
    pub(super) fn count_switches(&self, before: &BTreeMap<String, u64>, trigger: Trigger) {
        for (name, generation) in self.generations() {
            if before.get(&name) != Some(&generation) {
                self.metrics.ring_switched(&name, trigger);
            }
        }
    }

    /// State and data-plane counters for a scrape.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let a = &self.applier;
        let dp = a.dataplane();
        let cfg = a.config();
        let ids = a.ids();
        let effective = a.effective_weights();
        let backends = cfg
            .backends
            .iter()
            .map(|b| {
                let id = ids.backend(&b.name).map(|x| x.id);
                let dataplane = id
                    .and_then(|id| dp.backend(id).ok())
                    .map_or(DataplaneState::Unused, |m| {
                        DataplaneState::from_raw(m.state)
                    });
                let damping = self
                    .probers
                    .get(&b.name)
                    .map(|s| s.prober.flap_state())
                    .unwrap_or_default();
                metrics::BackendSnapshot {
                    name: b.name.clone(),
                    tier: b.tier,
                    weight: b.weight,
                    effective_weight: effective.get(&b.name).copied().unwrap_or(0),
                    health: a.health(&b.name),
                    dataplane,
                    flaps: damping.flaps,
                    hold_down: damping
                        .held_until
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                    stats: id.and_then(|id| dp.backend_stats(id).ok()),
                }
            })
            .collect();
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let p = a.programmed(&s.name);
                metrics::ServiceSnapshot {
                    name: s.name.clone(),
                    generation: p.map_or(0, |p| p.entry.generation),
                    active_tier: p.and_then(|p| {
                        p.to.iter()
                            .filter_map(|n| cfg.backend(n).map(|b| b.tier))
                            .min()
                    }),
                    // A dual-stack service's traffic is that of both VIPs.
                    stats: {
                        let mut vips = ids
                            .service_vips(&s.name)
                            .filter_map(|x| dp.service_stats(x.id).ok());
                        vips.next()
                            .map(|first| vips.fold(first, |a, b| a.merge(&b)))
                    },
                }
            })
            .collect();
        let reasons = match dp.reason_counts() {
            Ok(r) => r
                .into_iter()
                .map(|c| (c.reason.as_str(), c.reason.verdict().as_str(), c.count))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading verdict counters failed");
                Vec::new()
            }
        };
        Snapshot {
            services,
            backends,
            reasons,
            syns_in_floods: self.passive.suspended_total(),
            wedge_suspicions: self.passive.suspicions_total(),
        }
    }
}
