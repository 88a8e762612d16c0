//! Dead or slow: what happens to the flows of a backend that went down.
//!
//! The data plane has three states for a backend: `UP`, `DRAINING`
//! (existing flows continue, no new ones) and `DOWN` (its flows are reset
//! or moved, by `policy.on_backend_down`). A backend that goes down leaves
//! the rings at once either way; the question is its flows:
//!
//! - **Dead** (refused, unreachable, handshake unanswered, passive
//!   ejection; [`crate::health::failure`]): its flows are dead too.
//!   `DOWN` at once, so clients learn now rather than at their own
//!   timeout.
//! - **Sick** (a timeout after connecting, an error status, `NOT_SERVING`,
//!   a model missing): it still answers, and its streams in progress may
//!   well finish. `DRAINING` for the grace, then `DOWN`. The grace is the
//!   longest `policy.slow_grace` of the services listing the backend (so
//!   each service's streams get at least its own); `0s` turns it off.
//!   Sick evidence that turns dead during the grace ends it at once
//!   (the prober's `Down -> Down`).
//!
//! A grace starts only for a backend that was serving in the data plane
//! (`UP`, or `DRAINING` by an operator); one already `DOWN` has no flows
//! to protect. [`Graces`] is the one owner of the running graces; the
//! applier asks it which state to write.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::{config::Config, health::DownCause};

/// What a backend that went down gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `DOWN` now.
    Now,
    /// `DRAINING` until then, `DOWN` after.
    Drain { until: Instant },
}

/// The rule of the module doc, for one fall at `at`. Exhaustive over the
/// causes: a new cause cannot silently take a default.
pub fn exit(cause: DownCause, serving: bool, grace: Duration, at: Instant) -> Exit {
    match cause {
        DownCause::Dead => Exit::Now,
        DownCause::Sick if !serving || grace.is_zero() => Exit::Now,
        DownCause::Sick => Exit::Drain { until: at + grace },
    }
}

/// The grace `backend` gets: the longest `slow_grace` of its services.
pub fn grace_of(cfg: &Config, backend: &str) -> Duration {
    cfg.services
        .iter()
        .filter(|s| s.backends.iter().any(|b| b == backend))
        .map(|s| s.policy.slow_grace)
        .max()
        .unwrap_or_default()
}

/// Backends draining out their grace, and when each ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graces(BTreeMap<String, Instant>);

impl Graces {
    /// Starts `backend`'s grace; a grace already running keeps its end.
    /// Returns whether one started.
    pub fn start(&mut self, backend: &str, until: Instant) -> bool {
        if self.0.contains_key(backend) {
            return false;
        }
        self.0.insert(backend.to_owned(), until);
        true
    }

    /// Ends `backend`'s grace (recovered, found dead, or removed); returns
    /// whether one was running.
    pub fn end(&mut self, backend: &str) -> bool {
        self.0.remove(backend).is_some()
    }

    pub fn contains(&self, backend: &str) -> bool {
        self.0.contains_key(backend)
    }

    /// Time left of `backend`'s grace, if one runs.
    pub fn remaining(&self, backend: &str, now: Instant) -> Option<Duration> {
        self.0
            .get(backend)
            .map(|t| t.saturating_duration_since(now))
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.0.values().min().copied()
    }

    /// Ends and returns the graces over by `now`.
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .0
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(b, _)| b.clone())
            .collect();
        for b in &due {
            self.0.remove(b);
        }
        due
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|b, _| keep(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_goes_now_sick_drains_for_its_grace() {
        let at = Instant::now();
        let g = Duration::from_secs(30);
        let cases = [
            (DownCause::Dead, true, g, Exit::Now),
            (DownCause::Dead, false, g, Exit::Now),
            (DownCause::Sick, true, g, Exit::Drain { until: at + g }),
            // Nothing to protect: not serving, or no grace configured.
            (DownCause::Sick, false, g, Exit::Now),
            (DownCause::Sick, true, Duration::ZERO, Exit::Now),
        ];
        for (cause, serving, grace, want) in cases {
            assert_eq!(
                exit(cause, serving, grace, at),
                want,
                "{cause} {serving} {grace:?}"
            );
        }
    }

    #[test]
    fn graces_end_when_due_or_when_ended() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = Graces::default();
        assert!(g.start("a", t0 + s(10)));
        assert!(!g.start("a", t0 + s(99)), "keeps its end");
        assert!(g.start("b", t0 + s(5)));
        assert_eq!(g.next_deadline(), Some(t0 + s(5)));
        assert_eq!(g.remaining("a", t0 + s(4)), Some(s(6)));
        assert_eq!(g.take_due(t0 + s(5)), ["b"]);
        assert!(g.end("a"));
        assert!(!g.end("a"));
        assert_eq!(g.next_deadline(), None);
    }

    #[test]
    fn the_longest_grace_of_a_backends_services_applies() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples/two-clouds.yaml"),
        )
        .unwrap();
        let mut cfg = crate::config::parse(&text, "two-clouds.yaml").unwrap();
        assert_eq!(grace_of(&cfg, "a1"), Duration::from_secs(45), "chat's");
        assert_eq!(grace_of(&cfg, "a1-embed"), Duration::ZERO, "embed's");
        assert_eq!(
            grace_of(&cfg, "eu-fraud-1"),
            Duration::from_secs(30),
            "default"
        );
        cfg.services[0].policy.slow_grace = Duration::from_secs(5);
        let extra = crate::config::Service {
            name: "more".into(),
            port: 81,
            policy: crate::config::Policy {
                slow_grace: Duration::from_secs(90),
                ..cfg.services[0].policy.clone()
            },
            ..cfg.services[0].clone()
        };
        cfg.services.push(extra);
        assert_eq!(grace_of(&cfg, "a1"), Duration::from_secs(90));
        assert_eq!(grace_of(&cfg, "no-such"), Duration::ZERO);
    }
}
