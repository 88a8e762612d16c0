//! Load scrapes: one scrape task per backend whose probe has a load facet,
//! kept in step with the config ([`Agent::sync_scrapers`]), and their
//! results handed to the applier, which owns the load state
//! ([`Agent::on_load`]).

use std::collections::BTreeMap;

use super::Agent;
use crate::{
    config,
    health::{self, BackendTarget, LoadEvent, ScraperTask},
    metrics::Trigger,
};

pub(super) struct ScraperSlot {
    _task: ScraperTask,
    target: BackendTarget,
    probe: config::Probe,
}

impl Agent {
    /// Starts and stops scrape tasks to match the config: a backend's is
    /// restarted when its address or probe changed.
    pub(super) fn sync_scrapers(&mut self) {
        let want: BTreeMap<String, (BackendTarget, config::Probe)> =
            super::probe_targets(self.applier.config())
                .into_iter()
                .filter(|(_, (_, p))| p.load.is_some())
                .collect();
        self.scrapers.retain(|name, slot| {
            let keep = want
                .get(name)
                .is_some_and(|(t, p)| *t == slot.target && *p == slot.probe);
            if !keep {
                tracing::info!(backend = %name, "load scrape stopped");
                self.metrics.load_forget(name);
            }
            keep
        });
        for (name, (target, probe)) in want {
            if self.scrapers.contains_key(&name) {
                continue;
            }
            match health::spawn_scraper(&target, &probe, &self.opts.tls, self.load_tx.clone()) {
                Ok(Some(task)) => {
                    tracing::info!(backend = %name, addr = %target.addr, profile = ?probe.load.as_ref().map(|l| l.profile), "load scrape started");
                    self.metrics
                        .load_factor(&name, self.applier.load_factor(&name));
                    self.scrapers.insert(
                        name,
                        ScraperSlot {
                            _task: task,
                            target,
                            probe,
                        },
                    );
                }
                Ok(None) => {}
                // Its weight goes on without a load factor.
                Err(e) => tracing::error!(backend = %name, error = %e, "cannot scrape load"),
            }
        }
    }

    /// One scrape result: metrics, a log line when the refusal reason
    /// changes, and the weight changes it makes due.
    pub(super) fn on_load(&mut self, ev: LoadEvent) {
        let b = &*ev.backend;
        match &ev.result {
            Ok(f) => self.metrics.load_figures(b, f),
            Err(e) => self.metrics.load_refused(b, e.reason()),
        }
        let report = match self.applier.on_load(b, &ev.result, ev.at) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(backend = b, error = %e, "applying a load change failed");
                return;
            }
        };
        if report.observed.refusal_changed {
            match &ev.result {
                Err(e) => tracing::warn!(
                    backend = b,
                    reason = e.reason(),
                    error = %e,
                    "load scrape refused; weights unchanged"
                ),
                Ok(_) => tracing::info!(backend = b, "load scrape good again"),
            }
        }
        if report.observed.went_stale {
            tracing::warn!(
                backend = b,
                "no good load scrape for three intervals: probe-only health (load factor 1)"
            );
        }
        for c in &report.changes {
            self.metrics.load_factor(&c.backend, c.to);
        }
        for (service, _) in &report.apply.flipped {
            self.metrics.ring_switched(service, Trigger::Load);
        }
        if let Some(l) = report.apply.latency {
            self.metrics.apply_latency(l);
        }
    }
}
