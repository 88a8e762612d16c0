//! Every backend's load state, in one owner: its facet, controller,
//! latest figures, the factor its weight carries now, and when each
//! service's ring was last rebuilt for load.
//!
//! A target factor becomes the applied one only when
//! - it differs from the applied factor by at least `min_change`
//!   (relative), or reaches a bound (1 or `min_factor`), which a run of
//!   small steps would otherwise never reach; and
//! - no service listing the backend was rebuilt for load within its
//!   `rebuild_interval`. A change held back goes with the next one due:
//!   several backends of a service change in one rebuild.
//!
//! Targets are relative: after each good scrape, the targets of the
//! backends of each service it touches are scaled so that the highest of
//! those serving is one. A whole service over capacity then keeps its
//! backends' shares in the ratio of what each serves, rather than all
//! sinking to the floor, where the shares would be equal again. (A
//! backend out of service has no queue: it would always be the highest.)
//!
//! A refused scrape changes nothing. No good scrape for `stale_after`
//! (three intervals) resets the target to 1, probe-only health, which is
//! applied under the same bounds.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{
    Figures, Refusal,
    factor::{Controller, Params},
};
use crate::config::{Config, LoadScrape};

/// One weight change for load, with its numbers (for the audit log).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub backend: String,
    pub from: f64,
    pub to: f64,
    /// The figures behind it; none when the metrics went missing.
    pub figures: Option<Figures>,
}

/// What one scrape result did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The refusal reason differs from the previous scrape's (log it).
    pub refusal_changed: bool,
    /// The metrics went missing for `stale_after`: back to probe-only.
    pub went_stale: bool,
}

#[derive(Clone, Debug)]
struct BackendLoad {
    facet: LoadScrape,
    params: Params,
    /// Services listing the backend.
    services: Vec<String>,
    controller: Controller,
    /// The factor its weight carries now.
    applied: f64,
    figures: Option<Figures>,
    /// Last good scrape, or when tracking began.
    fresh: Instant,
    refusal: Option<&'static str>,
}

/// See the module doc.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    backends: BTreeMap<String, BackendLoad>,
    rebuilt: BTreeMap<String, Instant>,
}

impl Tracker {
    /// Tracks the backends whose probe has a load facet; one whose facet
    /// changed starts over at 1, one without a facet any more is dropped
    /// (its factor is 1 from the next plan on).
    pub fn sync(&mut self, cfg: &Config, now: Instant) {
        let mut want: BTreeMap<String, (LoadScrape, Vec<String>)> = BTreeMap::new();
        for svc in &cfg.services {
            let Some(facet) = &svc.probe.load else {
                continue;
            };
            for b in &svc.backends {
                want.entry(b.clone())
                    .or_insert_with(|| (facet.clone(), Vec::new()))
                    .1
                    .push(svc.name.clone());
            }
        }
        self.backends
            .retain(|b, s| want.get(b).is_some_and(|(f, _)| *f == s.facet));
        for (b, (facet, services)) in want {
            let entry = self.backends.entry(b).or_insert_with(|| BackendLoad {
                params: Params::of(&facet),
                facet,
                services: Vec::new(),
                controller: Controller::default(),
                applied: 1.0,
                figures: None,
                fresh: now,
                refusal: None,
            });
            entry.services = services;
        }
        self.rebuilt
            .retain(|s, _| cfg.service(s).is_some_and(|s| s.probe.load.is_some()));
    }

    /// One scrape's result for `backend` (ignored when it is not tracked:
    /// a scraper of a facet a reload removed), every backend serving.
    pub fn observe(
        &mut self,
        backend: &str,
        result: &Result<Figures, Refusal>,
        now: Instant,
    ) -> Observed {
        self.observe_among(backend, result, now, &|_| true)
    }

    /// [`Self::observe`], with the backends that take traffic now: the
    /// targets are relative to theirs.
    pub fn observe_among(
        &mut self,
        backend: &str,
        result: &Result<Figures, Refusal>,
        now: Instant,
        serving: &dyn Fn(&str) -> bool,
    ) -> Observed {
        let Some(b) = self.backends.get_mut(backend) else {
            return Observed::default();
        };
        let reason = result.as_ref().err().map(Refusal::reason);
        let mut out = Observed {
            refusal_changed: reason != b.refusal,
            went_stale: false,
        };
        b.refusal = reason;
        match result {
            Ok(figures) => {
                b.controller.update(figures, &b.params);
                b.figures = Some(*figures);
                b.fresh = now;
                let services = b.services.clone();
                self.normalise(&services, serving);
            }
            Err(_) => {
                let stale = now.saturating_duration_since(b.fresh) >= b.facet.stale_after();
                if stale && b.figures.is_some() {
                    out.went_stale = true;
                }
                if stale {
                    b.controller.reset();
                    b.figures = None;
                }
            }
        }
        out
    }

    /// Scales the targets of each of `services` so that the highest of
    /// those `serving` is 1.
    fn normalise(&mut self, services: &[String], serving: &dyn Fn(&str) -> bool) {
        for s in services {
            let of_s = |b: &BackendLoad| b.services.contains(s);
            let top = self
                .backends
                .iter()
                .filter(|(name, b)| of_s(b) && serving(name))
                .map(|(_, b)| b.controller.factor())
                .fold(0.0, f64::max);
            if top > 0.0 && top < 1.0 {
                for b in self.backends.values_mut().filter(|b| of_s(b)) {
                    b.controller.scale(1.0 / top, &b.params);
                }
            }
        }
    }

    /// The changes due at `now` (see the module doc), applied: from now on
    /// [`Self::factor`] returns their `to`.
    pub fn due(&mut self, now: Instant) -> Vec<Change> {
        let open = |s: &String, every: Duration| {
            self.rebuilt
                .get(s)
                .is_none_or(|&t| now.saturating_duration_since(t) >= every)
        };
        let wanted: Vec<String> = self
            .backends
            .iter()
            .filter(|(_, b)| wants_change(b))
            .filter(|(_, b)| b.services.iter().all(|s| open(s, b.facet.rebuild_interval)))
            .map(|(name, _)| name.clone())
            .collect();
        let mut out = Vec::with_capacity(wanted.len());
        for name in wanted {
            let Some(b) = self.backends.get_mut(&name) else {
                continue;
            };
            let to = b.controller.factor();
            out.push(Change {
                backend: name,
                from: b.applied,
                to,
                figures: b.figures,
            });
            b.applied = to;
            for s in &b.services {
                self.rebuilt.insert(s.clone(), now);
            }
        }
        out
    }

    /// The factor `backend`'s weight carries: 1 when it has no facet.
    pub fn factor(&self, backend: &str) -> f64 {
        self.backends.get(backend).map_or(1.0, |b| b.applied)
    }

    /// Every tracked backend's applied factor.
    pub fn factors(&self) -> impl Iterator<Item = (&str, f64)> {
        self.backends.iter().map(|(n, b)| (n.as_str(), b.applied))
    }

    /// The latest good figures of `backend`, while they are fresh.
    pub fn figures(&self, backend: &str) -> Option<Figures> {
        self.backends.get(backend).and_then(|b| b.figures)
    }

    /// The facet of `backend`, when it has one.
    pub fn facet(&self, backend: &str) -> Option<&LoadScrape> {
        self.backends.get(backend).map(|b| &b.facet)
    }
}

/// Hysteresis: a relative change of `min_change`, or a bound reached.
fn wants_change(b: &BackendLoad) -> bool {
    let (to, from) = (b.controller.factor(), b.applied);
    if to == from {
        return false;
    }
    let at_bound = to >= 1.0 || to <= b.params.min_factor;
    // The tolerance keeps 1 -> 0.9 a 10% change in floating point.
    at_bound || (to - from).abs() >= b.facet.min_change * from - 1e-9
}

#[cfg(test)]
mod tests;
