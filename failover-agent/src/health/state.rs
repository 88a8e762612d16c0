//! The per-backend health state machine: pure, with time passed in, so the
//! rise/fall/dwell rules are tested without clocks or sockets.
//!
//! Rules (the counters are runs of *consecutive* outcomes):
//! - `Unknown` is the state before any verdict. It is not eligible for
//!   traffic (treat it as down), but it is kept distinct so the planner can
//!   hold the last programmed rings until every backend has a verdict, which
//!   keeps an agent restart from emptying the data plane.
//! - `Unknown`/`Down` -> `Up` after `rise` successes (healthy or degraded
//!   answers). It goes to `Degraded` instead when the latest of them was
//!   degraded: a backend that just came back slow gets the lower weight.
//! - `Unknown` -> `Down` after `fall` failures.
//! - `Up`/`Degraded` -> `Down` after `fall` failures.
//! - `Up` -> `Degraded` after `fall` degraded answers, and `Degraded` -> `Up`
//!   after `rise` healthy answers: one slow answer does not change the weight.
//! - No change happens sooner than `min_dwell` after the previous one. The
//!   runs keep counting meanwhile, so the change happens at the first outcome
//!   after the dwell if the evidence still holds.
//! - A passive ejection forces `Down` at once, bypassing `fall` and the dwell
//!   (the data plane already sees SYNs refused or unanswered; waiting costs
//!   client connections). It is undone only by the active probe's rise rule,
//!   and the dwell counts from the ejection, so eject/recover cannot flap.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ProbeOutcome;

/// Health of one backend as the planner sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// No verdict yet: not eligible.
    #[default]
    Unknown,
    Up,
    /// Serving, but slow or rate limited: eligible with a lower weight.
    Degraded,
    Down,
}

impl HealthState {
    /// Whether the planner may place this backend in a ring.
    pub fn is_serving(self) -> bool {
        matches!(self, HealthState::Up | HealthState::Degraded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Up => "up",
            HealthState::Degraded => "degraded",
            HealthState::Down => "down",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Hysteresis settings of one backend's state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
    pub min_dwell: Duration,
}

impl Thresholds {
    /// `rise` and `fall` below 1 are taken as 1 (zero would mean "change on
    /// no evidence").
    pub fn new(rise: u32, fall: u32, min_dwell: Duration) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            min_dwell,
        }
    }
}

impl From<&crate::config::Probe> for Thresholds {
    fn from(p: &crate::config::Probe) -> Self {
        Self::new(p.rise, p.fall, p.min_dwell)
    }
}

/// One state change, with the evidence that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: HealthState,
    pub to: HealthState,
    pub reason: String,
}

/// The state machine of one backend.
#[derive(Clone, Debug)]
pub struct HealthMachine {
    th: Thresholds,
    state: HealthState,
    /// When the last change happened; `None` before the first one, so the
    /// first verdict is never held back by the dwell.
    changed_at: Option<Instant>,
    successes: u32,
    healthy: u32,
    degraded: u32,
    failures: u32,
    ejected: bool,
}

impl HealthMachine {
    pub fn new(th: Thresholds) -> Self {
        Self {
            th,
            state: HealthState::Unknown,
            changed_at: None,
            successes: 0,
            healthy: 0,
            degraded: 0,
            failures: 0,
            ejected: false,
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    pub fn thresholds(&self) -> Thresholds {
        self.th
    }

    /// When the current state was entered (`None` while still `Unknown`).
    pub fn changed_at(&self) -> Option<Instant> {
        self.changed_at
    }

    /// Down because of a passive ejection that no rise has undone yet.
    pub fn is_ejected(&self) -> bool {
        self.ejected
    }

    /// Feeds one active probe outcome observed at `now`.
    pub fn observe(&mut self, now: Instant, outcome: &ProbeOutcome) -> Option<Transition> {
        match outcome {
            ProbeOutcome::Healthy { .. } => {
                self.successes = self.successes.saturating_add(1);
                self.healthy = self.healthy.saturating_add(1);
                self.degraded = 0;
                self.failures = 0;
            }
            ProbeOutcome::Degraded { .. } => {
                self.successes = self.successes.saturating_add(1);
                self.degraded = self.degraded.saturating_add(1);
                self.healthy = 0;
                self.failures = 0;
            }
            ProbeOutcome::Failed { .. } => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.healthy = 0;
                self.degraded = 0;
            }
        }
        let to = self.target();
        if to == self.state || !self.dwell_elapsed(now) {
            return None;
        }
        let reason = self.reason(to, outcome);
        Some(self.change(now, to, reason))
    }

    /// A passive ejection: `Down` now, whatever the runs and the dwell say.
    /// Returns `None` when already down (the success run still restarts, so
    /// recovery needs `rise` successes after the latest evidence).
    pub fn eject(&mut self, now: Instant, reason: &str) -> Option<Transition> {
        self.successes = 0;
        self.healthy = 0;
        self.degraded = 0;
        self.ejected = true;
        if self.state == HealthState::Down {
            return None;
        }
        Some(self.change(now, HealthState::Down, format!("passive: {reason}")))
    }

    fn target(&self) -> HealthState {
        let Thresholds { rise, fall, .. } = self.th;
        match self.state {
            HealthState::Unknown | HealthState::Down if self.successes >= rise => {
                if self.degraded > 0 {
                    HealthState::Degraded
                } else {
                    HealthState::Up
                }
            }
            HealthState::Unknown if self.failures >= fall => HealthState::Down,
            HealthState::Up | HealthState::Degraded if self.failures >= fall => HealthState::Down,
            HealthState::Up if self.degraded >= fall => HealthState::Degraded,
            HealthState::Degraded if self.healthy >= rise => HealthState::Up,
            s => s,
        }
    }

    fn dwell_elapsed(&self, now: Instant) -> bool {
        self.changed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= self.th.min_dwell)
    }

    fn reason(&self, to: HealthState, outcome: &ProbeOutcome) -> String {
        let detail = match outcome {
            ProbeOutcome::Healthy { latency } => format!("latency {latency:?}"),
            ProbeOutcome::Degraded { reason, .. } | ProbeOutcome::Failed { reason } => {
                reason.clone()
            }
        };
        let (run, what) = match (self.state, to) {
            (_, HealthState::Down) => (self.failures, "failures"),
            (HealthState::Up, HealthState::Degraded) => (self.degraded, "degraded answers"),
            (HealthState::Degraded, HealthState::Up) => (self.healthy, "healthy answers"),
            _ => (self.successes, "successes"),
        };
        format!("{run} consecutive {what}: {detail}")
    }

    fn change(&mut self, now: Instant, to: HealthState, reason: String) -> Transition {
        let from = self.state;
        self.state = to;
        self.changed_at = Some(now);
        if to.is_serving() {
            self.ejected = false;
        }
        Transition { from, to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn outcome(c: char) -> ProbeOutcome {
        match c {
            'h' => ProbeOutcome::Healthy {
                latency: Duration::from_millis(1),
            },
            's' => ProbeOutcome::Degraded {
                latency: Duration::from_millis(900),
                reason: "slow".into(),
            },
            'f' => ProbeOutcome::Failed {
                reason: "refused".into(),
            },
            _ => unreachable!("outcome letter {c}"),
        }
    }

    /// Runs `steps` (one letter per probe interval: h healthy, s slow/degraded,
    /// f failed, e passive ejection) and returns the state after each step as
    /// letters (? unknown, U up, G degraded, D down).
    fn run(th: Thresholds, steps: &str) -> String {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(th);
        let mut out = String::new();
        for (i, c) in steps.chars().enumerate() {
            let now = t0 + TICK * u32::try_from(i).unwrap();
            let before = m.state();
            let t = if c == 'e' {
                m.eject(now, "syn refused")
            } else {
                m.observe(now, &outcome(c))
            };
            match &t {
                Some(t) => {
                    assert_eq!(t.from, before);
                    assert_eq!(t.to, m.state());
                    assert_ne!(t.from, t.to);
                }
                None => assert_eq!(m.state(), before),
            }
            out.push(match m.state() {
                HealthState::Unknown => '?',
                HealthState::Up => 'U',
                HealthState::Degraded => 'G',
                HealthState::Down => 'D',
            });
        }
        out
    }

    #[test]
    fn table() {
        let ms = Duration::from_millis;
        // (name, rise, fall, dwell, steps, expected states)
        let cases: &[(&str, u32, u32, Duration, &str, &str)] = &[
            ("rise from unknown", 2, 2, ms(0), "hh", "?U"),
            ("fall from unknown", 2, 2, ms(0), "ff", "?D"),
            ("rise 3", 3, 2, ms(0), "hhfhhh", "?????U"),
            (
                "fall needs consecutive",
                2,
                3,
                ms(0),
                "hhffhfff",
                "?UUUUUUD",
            ),
            ("down to up needs rise", 2, 2, ms(0), "ffhfhh", "?DDDDU"),
            (
                "flapping up stays up",
                2,
                2,
                ms(0),
                "hhfhfhfhfhfh",
                "?UUUUUUUUUUU",
            ),
            (
                "flapping down stays down",
                2,
                2,
                ms(0),
                "fffhfhfhfhfh",
                "?DDDDDDDDDDD",
            ),
            (
                "flapping unknown stays",
                2,
                2,
                ms(0),
                "hfhfhfhf",
                "????????",
            ),
            // rise = fall = 1 and a 300 ms dwell: the dwell alone damps flaps.
            ("dwell holds", 1, 1, ms(300), "hffffhhhh", "UUUDDDUUU"),
            ("dwell flapping", 1, 1, ms(300), "hfhfhfhf", "UUUDDDUU"),
            ("first verdict not dwelled", 1, 1, ms(10_000), "f", "D"),
            ("degraded enter needs fall", 2, 2, ms(0), "hhsshh", "?UUGGU"),
            (
                "one slow answer ignored",
                2,
                2,
                ms(0),
                "hhshshsh",
                "?UUUUUUU",
            ),
            (
                "degraded leave needs rise",
                3,
                2,
                ms(0),
                "hhhsshhshhh",
                "??UUGGGGGGU",
            ),
            ("degraded to down", 2, 2, ms(0), "hhssff", "?UUGGD"),
            ("down to degraded", 2, 2, ms(0), "ffhs", "?DDG"),
            ("down to up on healthy last", 2, 2, ms(0), "ffsh", "?DDU"),
            ("eject then rise", 2, 2, ms(0), "hhehh", "?UDDU"),
            // The ejection bypasses the dwell; recovery waits for it.
            (
                "eject bypasses dwell",
                2,
                2,
                ms(1_000),
                "hhehhhhhhhhhhh",
                "?UDDDDDDDDDDUU",
            ),
            ("eject while down", 2, 2, ms(0), "ffhehh", "?DDDDU"),
            ("eject from unknown", 2, 2, ms(0), "ehh", "DDU"),
            ("eject restarts rise", 3, 2, ms(0), "hhhhhehhh", "??UUUDDDU"),
        ];
        for &(name, rise, fall, dwell, steps, want) in cases {
            let got = run(Thresholds::new(rise, fall, dwell), steps);
            assert_eq!(got, want, "case {name:?}: steps {steps}");
        }
    }

    #[test]
    fn flapping_never_changes_state_when_thresholds_at_least_two() {
        for rise in 2..=4 {
            for fall in 2..=4 {
                let th = Thresholds::new(rise, fall, Duration::ZERO);
                for start in ["hhhh", "ffff", "hhhhss"] {
                    let mut steps = start.to_string();
                    let settled = run(th, &steps).chars().last().unwrap();
                    for i in 0..200 {
                        steps.push(if i % 2 == 0 { 'f' } else { 'h' });
                    }
                    let got = run(th, &steps);
                    let tail = &got[start.len()..];
                    assert!(
                        tail.chars().all(|c| c == settled),
                        "rise {rise} fall {fall} start {start}: {tail}"
                    );
                }
            }
        }
    }

    #[test]
    fn transition_reasons_name_the_evidence() {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(Thresholds::new(1, 2, Duration::ZERO));
        let up = m.observe(t0, &outcome('h')).unwrap();
        assert_eq!((up.from, up.to), (HealthState::Unknown, HealthState::Up));
        assert!(
            up.reason.starts_with("1 consecutive successes"),
            "{}",
            up.reason
        );
        assert!(m.observe(t0 + TICK, &outcome('f')).is_none());
        let down = m.observe(t0 + TICK * 2, &outcome('f')).unwrap();
        assert_eq!(down.reason, "2 consecutive failures: refused");
        assert!(!m.is_ejected());
        m.observe(t0 + TICK * 3, &outcome('h')).unwrap();
        let ej = m.eject(t0 + TICK * 4, "3 SYNs refused").unwrap();
        assert_eq!(ej.reason, "passive: 3 SYNs refused");
        assert!(m.is_ejected());
        assert_eq!(m.changed_at(), Some(t0 + TICK * 4));
        m.observe(t0 + TICK * 5, &outcome('h')).unwrap();
        assert!(!m.is_ejected());
    }

    #[test]
    fn zero_thresholds_are_taken_as_one() {
        let th = Thresholds::new(0, 0, Duration::ZERO);
        assert_eq!((th.rise, th.fall), (1, 1));
        assert_eq!(run(th, "hf"), "UD");
    }
}
