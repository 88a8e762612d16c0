//! The applier's load side: scrape results in ([`Applier::on_load`]),
//! load-factor changes out as decisions, each audited with its numbers.

use std::time::Instant;

use super::{Applier, ApplyReport, Decision};
use crate::{
    agent::{AgentError, execute::Executor},
    audit::{DecisionRecord, LoadNote, WeightChange},
    load::{Change, Figures, Refusal, tracker::Observed},
};

/// What one scrape result did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub observed: Observed,
    /// Load factors changed (and planned) by it, its own backend's or
    /// others held back until now.
    pub changes: Vec<Change>,
    pub apply: ApplyReport,
}

/// A factor for logs and the audit log: four decimals.
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// `b1 load 1 -> 0.5 (waiting 8, running 4, kv 0.3)`.
pub fn describe(c: &Change) -> String {
    let figures = match &c.figures {
        None => "metrics missing: probe-only health".to_owned(),
        Some(f) => {
            let mut s = format!("waiting {}", f.waiting);
            if let Some(r) = f.running {
                s.push_str(&format!(", running {r}"));
            }
            if let Some(kv) = f.kv {
                s.push_str(&format!(", kv {}", round(kv)));
            }
            s
        }
    };
    format!(
        "{} load {} -> {} ({figures})",
        c.backend,
        round(c.from),
        round(c.to)
    )
}

fn note(c: &Change) -> LoadNote {
    LoadNote {
        waiting: c.figures.map(|f| f.waiting),
        running: c.figures.and_then(|f| f.running),
        kv: c.figures.and_then(|f| f.kv.map(round)),
        factor_from: round(c.from),
        factor_to: round(c.to),
    }
}

/// `w` with the numbers of its backend's load change, if it had one.
pub(super) fn with_note(w: &WeightChange, changes: &[Change]) -> WeightChange {
    let mut w = w.clone();
    if let Some(c) = changes.iter().find(|c| c.backend == w.backend) {
        w.load = Some(note(c));
    }
    w
}

impl<E: Executor> Applier<E> {
    /// One scrape result of `backend`'s metrics: feeds its controller and
    /// applies the load-factor changes due (module doc of
    /// [`crate::load::tracker`]). A refused scrape changes no weight.
    pub fn on_load(
        &mut self,
        backend: &str,
        result: &Result<Figures, Refusal>,
        at: Instant,
    ) -> Result<LoadReport, AgentError> {
        // Those taking new flows: factors are relative to theirs.
        let (health, operator) = (&self.health, &self.operator);
        let serving =
            |b: &str| health.get(b).is_some_and(|h| h.is_serving()) && !operator.is_drained(b);
        let observed = self.load.observe_among(backend, result, at, &serving);
        let changes = self.load.due(at);
        if changes.is_empty() {
            return Ok(LoadReport {
                observed,
                ..LoadReport::default()
            });
        }
        let reasons: Vec<String> = changes.iter().map(describe).collect();
        for r in &reasons {
            tracing::info!(change = %r, "load factor");
        }
        let before = self.effective_weights();
        self.load_changes.clone_from(&changes);
        let applied = self.apply(&Decision {
            at,
            reason: format!("load: {}", reasons.join("; ")),
            backends: changes.iter().map(|c| c.backend.clone()).collect(),
            all: false,
        });
        self.load_changes.clear();
        let apply = applied?;
        let after = self.effective_weights();
        let weight =
            |m: &std::collections::BTreeMap<String, u32>, b: &str| m.get(b).copied().unwrap_or(0);
        // A change no flip record carries (no ring switched: none serving,
        // or the ring came out the same; or its weight rounded the same)
        // is a decision all the same.
        for c in &changes {
            let (from, to) = (weight(&before, &c.backend), weight(&after, &c.backend));
            let flipped = self
                .cfg
                .services
                .iter()
                .filter(|s| s.backends.contains(&c.backend))
                .any(|s| apply.flipped.iter().any(|(f, _)| *f == s.name));
            if !(flipped && from != to)
                && let Some(j) = &self.journal
            {
                let mut r = DecisionRecord::new("*", 0);
                r.reason = format!("load: {}", describe(c));
                r.policy_check = if flipped {
                    "load factor: its effective weight rounds the same"
                } else {
                    "load factor: no ring change"
                }
                .into();
                r.weights = vec![WeightChange {
                    backend: c.backend.clone(),
                    from,
                    to,
                    load: Some(note(c)),
                }];
                j.record(r);
            }
        }
        Ok(LoadReport {
            observed,
            changes,
            apply,
        })
    }

    /// The load factor `backend`'s weight carries (1 without a facet).
    pub fn load_factor(&self, backend: &str) -> f64 {
        self.load.factor(backend)
    }

    /// `backend`'s latest good load figures, while fresh.
    pub fn load_figures(&self, backend: &str) -> Option<Figures> {
        self.load.figures(backend)
    }

    /// What the API shows of `backend`'s load; none without a facet.
    pub fn load_info(&self, backend: &str) -> Option<crate::api::LoadInfo> {
        self.load.facet(backend)?;
        Some(crate::api::LoadInfo {
            factor: self.load.factor(backend),
            figures: self.load.figures(backend),
        })
    }
}
