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
//!   and the dwell counts from the ejection.
//!
//! Flap damping (hold-down, after Envoy's outlier detection, with the
//! ejection time doubling instead of growing linearly):
//! - Every serving (`Up`/`Degraded`) -> `Down` change, by probe fall or
//!   passive ejection, is one flap. While the backend keeps serving, the
//!   count drops by one per full `decay` without a fall.
//! - After flap `n`, recovery waits until `hold(n)` has passed since the
//!   fall: `hold(1) = 0` (an ordinary failure fails back by the rise rule
//!   alone), `hold(n) = min(base * 2^(n-2), max)`. The rise rule must hold
//!   too; the runs keep counting meanwhile, as with the dwell. The count
//!   stops growing once the hold reaches `max`.
//! - A passive ejection while down restarts the hold from the new
//!   evidence: a backend that keeps failing its traffic stays out.
//! - Going down is never delayed by a hold: leaving the rings is the safe
//!   direction, and a tier that goes dark must fail over at once.
//!
//! Dead or sick: a fall carries the class of the failure that completed
//! the run ([`super::Failure`], in the transition's [`Reason`]), which says
//! whether the backend is gone or only slow or failing. A backend down as
//! sick that then shows itself dead (one probe refused, unreachable or
//! unanswered, or a passive ejection) reports `Down -> Down` once, with
//! the dead evidence: its flows are dead too, and must not wait out a
//! grace meant for streams in progress. Neither the dwell nor a hold
//! delays it.
//!
//! The bound this gives: a backend re-enters service at most once per
//! current hold, and from a count of 0 the `k`-th recovery in a row comes
//! `base * (2^(k-1) - 1)` after the first fall at the earliest. In a window
//! `T` shorter than `decay` it therefore recovers at most
//! `k = 1 + floor(log2(T / base + 1))` times and changes between serving
//! and down at most `2k + 1` times, each of which switches a service's
//! ring at most once. With the defaults (`base` 1 s, `max` 60 s, `decay`
//! 30 s) a backend ejected every 200 ms while its probes pass makes at
//! most 7 changes in 5 s (3 recoveries, after holds of 0, 1 and 2 s),
//! where it made about 50 undamped, and at most one recovery a minute
//! once the hold reaches `max`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{DownCause, Ejection, Failure, ProbeOutcome, Reason};

/// Health of one backend as the planner sees it.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
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
        self.into()
    }
}

/// Flap damping settings (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldDown {
    /// Hold after the second flap; it doubles with each further one.
    pub base: Duration,
    pub max: Duration,
    /// Serving this long without a fall forgets one flap.
    pub decay: Duration,
}

impl HoldDown {
    /// No damping: every recovery follows the rise rule alone.
    pub const OFF: Self = Self {
        base: Duration::ZERO,
        max: Duration::ZERO,
        decay: Duration::MAX,
    };

    /// How long recovery waits after flap `n`.
    pub fn hold(&self, n: u32) -> Duration {
        if n < 2 {
            return Duration::ZERO;
        }
        self.base.saturating_mul(1 << (n - 2).min(31)).min(self.max)
    }

    /// The count where the hold reaches `max`: counting further would only
    /// make the count slower to decay, not the hold longer.
    fn cap(&self) -> u32 {
        (2..=33).find(|&n| self.hold(n) >= self.max).unwrap_or(33)
    }
}

/// Hysteresis settings of one backend's state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
    pub min_dwell: Duration,
    pub hold_down: HoldDown,
}

impl Thresholds {
    /// `rise` and `fall` below 1 are taken as 1 (zero would mean "change on
    /// no evidence"). No flap damping: see [`Thresholds::with_hold_down`].
    pub fn new(rise: u32, fall: u32, min_dwell: Duration) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            min_dwell,
            hold_down: HoldDown::OFF,
        }
    }

    pub fn with_hold_down(self, hold_down: HoldDown) -> Self {
        Self { hold_down, ..self }
    }
}

impl From<&crate::config::Probe> for Thresholds {
    fn from(p: &crate::config::Probe) -> Self {
        Self::new(p.rise, p.fall, p.min_dwell).with_hold_down(HoldDown {
            base: p.hold_down,
            max: p.hold_down_max,
            decay: p.hold_down_decay,
        })
    }
}

/// A backend's flap damping at one moment, for the API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlapState {
    /// Flaps not decayed yet.
    pub flaps: u32,
    /// No recovery before this; `None` when not held.
    pub held_until: Option<Instant>,
}

/// One state change, with the evidence that caused it. `Down -> Down` is
/// the one change of a down backend's cause, from sick to dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: HealthState,
    pub to: HealthState,
    pub reason: Reason,
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
    /// Class of the latest failure of the current failure run.
    failure: Option<Failure>,
    /// Why it is down, while `Down`.
    down_cause: Option<DownCause>,
    ejected: bool,
    /// Flaps not decayed yet.
    flaps: u32,
    /// Start of the current decay period: the recovery or the last decay.
    decay_from: Option<Instant>,
    /// The current hold-down: no recovery before this.
    held_until: Option<Instant>,
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
            failure: None,
            down_cause: None,
            ejected: false,
            flaps: 0,
            decay_from: None,
            held_until: None,
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

    /// Why it is down (`None` unless `Down`).
    pub fn down_cause(&self) -> Option<DownCause> {
        self.down_cause
    }

    /// Flap count and hold-down as of `now`.
    pub fn flap_state(&self, now: Instant) -> FlapState {
        FlapState {
            flaps: self.decayed(now).0,
            held_until: self.held_until,
        }
    }

    /// Feeds one active probe outcome observed at `now`.
    pub fn observe(&mut self, now: Instant, outcome: &ProbeOutcome) -> Option<Transition> {
        self.decay(now);
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
            ProbeOutcome::Failed { failure, .. } => {
                self.failures = self.failures.saturating_add(1);
                self.failure = Some(*failure);
                self.successes = 0;
                self.healthy = 0;
                self.degraded = 0;
            }
        }
        let to = self.target();
        if let Some(t) = self.escalate(outcome.failure(), || Self::detail(outcome)) {
            return Some(t);
        }
        let held = to.is_serving() && self.held_until.is_some_and(|t| now < t);
        if to == self.state || !self.dwell_elapsed(now) || held {
            return None;
        }
        let reason = self.reason(to, outcome);
        Some(self.change(now, to, reason))
    }

    /// A passive ejection: `Down` now, whatever the runs, the dwell and the
    /// hold say. Returns `None` when already down (the success run and the
    /// hold still restart, so recovery needs `rise` successes and the hold
    /// after the latest evidence), unless it was down as sick: then the
    /// `Down -> Down` of a backend found dead.
    pub fn eject(&mut self, now: Instant, why: &Ejection) -> Option<Transition> {
        self.decay(now);
        self.successes = 0;
        self.healthy = 0;
        self.degraded = 0;
        self.ejected = true;
        let text = || format!("passive: {why}");
        if self.state == HealthState::Down {
            self.hold(now);
            return self.escalate(Some(why.failure()), text);
        }
        self.failure = Some(why.failure());
        let reason = Reason::new(text(), Some(why.failure()));
        Some(self.change(now, HealthState::Down, reason))
    }

    /// The `Down -> Down` of a backend down as sick that `failure` shows
    /// dead; `None` otherwise.
    fn escalate(
        &mut self,
        failure: Option<Failure>,
        text: impl FnOnce() -> String,
    ) -> Option<Transition> {
        let failure = failure.filter(|f| f.cause() == DownCause::Dead)?;
        if self.state != HealthState::Down || self.down_cause != Some(DownCause::Sick) {
            return None;
        }
        self.down_cause = Some(DownCause::Dead);
        Some(Transition {
            from: HealthState::Down,
            to: HealthState::Down,
            reason: Reason::new(format!("found dead: {}", text()), Some(failure)),
        })
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

    fn detail(outcome: &ProbeOutcome) -> String {
        match outcome {
            ProbeOutcome::Healthy { latency } => format!("latency {latency:?}"),
            ProbeOutcome::Degraded { reason, .. } | ProbeOutcome::Failed { reason, .. } => {
                reason.clone()
            }
        }
    }

    fn reason(&self, to: HealthState, outcome: &ProbeOutcome) -> Reason {
        let detail = Self::detail(outcome);
        let (run, what) = match (self.state, to) {
            (_, HealthState::Down) => (self.failures, "failures"),
            (HealthState::Up, HealthState::Degraded) => (self.degraded, "degraded answers"),
            (HealthState::Degraded, HealthState::Up) => (self.healthy, "healthy answers"),
            _ => (self.successes, "successes"),
        };
        let failure = (to == HealthState::Down).then_some(self.failure).flatten();
        Reason::new(format!("{run} consecutive {what}: {detail}"), failure)
    }

    fn change(&mut self, now: Instant, to: HealthState, reason: Reason) -> Transition {
        let from = self.state;
        self.state = to;
        self.changed_at = Some(now);
        self.down_cause = (to == HealthState::Down).then(|| reason.down_cause());
        if from.is_serving() && to == HealthState::Down {
            self.flaps = (self.flaps + 1).min(self.th.hold_down.cap());
            self.hold(now);
        }
        if to.is_serving() {
            self.ejected = false;
            self.held_until = None;
            if !from.is_serving() {
                self.decay_from = Some(now);
            }
        }
        Transition { from, to, reason }
    }

    /// Starts the hold of the current flap count at `now`.
    fn hold(&mut self, now: Instant) {
        let hold = self.th.hold_down.hold(self.flaps);
        self.held_until = (!hold.is_zero()).then(|| now + hold);
    }

    fn decay(&mut self, now: Instant) {
        (self.flaps, self.decay_from) = self.decayed(now);
    }

    /// The flap count and decay start after the full decay periods served
    /// by `now`.
    fn decayed(&self, now: Instant) -> (u32, Option<Instant>) {
        let decay = self.th.hold_down.decay;
        match self.decay_from {
            Some(from) if self.state.is_serving() && self.flaps > 0 => {
                let periods = now
                    .saturating_duration_since(from)
                    .as_nanos()
                    .checked_div(decay.as_nanos())
                    .unwrap_or(0);
                let n = u32::try_from(periods).unwrap_or(u32::MAX).min(self.flaps);
                // n periods fit in the time served: no overflow.
                (self.flaps - n, Some(from + decay * n))
            }
            _ => (self.flaps, self.decay_from),
        }
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
                failure: Failure::Refused,
                reason: "refused".into(),
            },
            't' => ProbeOutcome::Failed {
                failure: Failure::Timeout,
                reason: "timeout".into(),
            },
            _ => unreachable!("outcome letter {c}"),
        }
    }

    fn refused(rsts: u64) -> Ejection {
        Ejection::Refused { rsts }
    }

    /// Runs `steps` (one letter per probe interval: h healthy, s slow/degraded,
    /// f failed (refused: dead), t timed out (sick), e passive ejection) and
    /// returns the state after each step as letters (? unknown, U up, G
    /// degraded, D down).
    fn run(th: Thresholds, steps: &str) -> String {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(th);
        let mut out = String::new();
        for (i, c) in steps.chars().enumerate() {
            let now = t0 + TICK * u32::try_from(i).unwrap();
            let before = m.state();
            let t = if c == 'e' {
                m.eject(now, &refused(2))
            } else {
                m.observe(now, &outcome(c))
            };
            match &t {
                Some(t) => {
                    assert_eq!(t.from, before);
                    assert_eq!(t.to, m.state());
                    // Only a sick -> dead change keeps the state.
                    assert!(
                        t.from != t.to || t.reason.down_cause() == DownCause::Dead,
                        "{t:?}"
                    );
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
    fn state_names_are_the_serialized_ones() {
        for h in [
            HealthState::Unknown,
            HealthState::Up,
            HealthState::Degraded,
            HealthState::Down,
        ] {
            assert_eq!(serde_json::to_value(h).unwrap(), h.as_str());
            assert_eq!(h.to_string(), h.as_str());
        }
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
    fn hold_down_table() {
        let ms = Duration::from_millis;
        // rise = fall = 1, so a hold shows as the steps a recovery waits;
        // base 200 ms, max 800 ms, one flap forgotten per 500 ms served.
        let hold = HoldDown {
            base: ms(200),
            max: ms(800),
            decay: ms(500),
        };
        // (name, dwell, steps, expected states)
        let cases: &[(&str, Duration, &str, &str)] = &[
            ("first failure recovers normally", ms(0), "hehh", "UDUU"),
            ("first verdict is no flap", ms(0), "eheh", "DUDU"),
            ("second flap held base", ms(0), "hehehhh", "UDUDDUU"),
            (
                "hold doubles and caps at max",
                ms(0),
                "hehehhehhhhehhhhhhhhehhhhhhhh",
                "UDUDDUDDDDUDDDDDDDDUDDDDDDDDU",
            ),
            (
                "decay restores normal recovery",
                ms(0),
                "hehehhhhhhhhhhhheh",
                "UDUDDUUUUUUUUUUUDU",
            ),
            (
                "one decay forgets one flap",
                ms(0),
                "hehehhhhhhhehh",
                "UDUDDUUUUUUDDU",
            ),
            (
                "ejection while held restarts it",
                ms(0),
                "hehehehh",
                "UDUDDDDU",
            ),
            // Each fall is at once, held or not; the probe fall counts too.
            (
                "going down is never delayed",
                ms(0),
                "hehehhfhhhh",
                "UDUDDUDDDDU",
            ),
            (
                "dwell and hold both apply",
                ms(300),
                "hehhhehhh",
                "UDDDUDDDU",
            ),
        ];
        for &(name, dwell, steps, want) in cases {
            let got = run(Thresholds::new(1, 1, dwell).with_hold_down(hold), steps);
            assert_eq!(got, want, "case {name:?}: steps {steps}");
        }
    }

    /// The probe settings a config gets by default.
    fn default_probe() -> crate::config::Probe {
        serde_json::from_value(serde_json::json!({"kind": "tcp"})).unwrap()
    }

    #[test]
    fn default_holds_double_from_one_second_to_a_minute() {
        let th = Thresholds::from(&default_probe());
        let h = th.hold_down;
        let secs: Vec<u64> = (0..=9).map(|n| h.hold(n).as_secs()).collect();
        assert_eq!(secs, [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(h.cap(), 8);

        // The count stops at the cap and is forgotten at one per 30 s served.
        let t0 = Instant::now();
        let mut m = HealthMachine::new(th);
        let mut now = t0;
        for _ in 0..12 {
            m.observe(now, &outcome('h'));
            now += Duration::from_millis(100);
            m.observe(now, &outcome('h'));
            m.eject(now, &refused(1)).unwrap();
            now = m.flap_state(now).held_until.unwrap_or(now);
        }
        let f = m.flap_state(now);
        assert_eq!(f.flaps, 8);
        assert_eq!(f.held_until, Some(now));
        m.observe(now, &outcome('h'));
        let up = m
            .observe(now, &outcome('h'))
            .expect("recovers at the end of the hold");
        assert_eq!(up.to, HealthState::Up);
        assert_eq!(m.flap_state(now).held_until, None);
        let served = |s: u64| now + Duration::from_secs(s);
        assert_eq!(m.flap_state(served(29)).flaps, 8);
        assert_eq!(m.flap_state(served(30)).flaps, 7);
        assert_eq!(m.flap_state(served(95)).flaps, 5);
        assert_eq!(m.flap_state(served(240)).flaps, 0);
    }

    /// Serving <-> down changes of a backend ejected every 200 ms while it
    /// serves (its traffic fails) and its probes pass, for 5 s from Up.
    fn flap_for_5s(th: Thresholds) -> usize {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(th);
        m.observe(t0, &outcome('h'));
        m.observe(t0, &outcome('h'));
        assert_eq!(m.state(), HealthState::Up);
        let mut changes = 0;
        for step in 1..=500u32 {
            let now = t0 + Duration::from_millis(10) * step;
            let t = if step % 10 == 0 {
                m.observe(now, &outcome('h'))
            } else {
                None
            };
            let e = if step % 20 == 0 && m.state().is_serving() {
                m.eject(
                    now,
                    &Ejection::Unanswered {
                        waited: Duration::from_millis(50),
                        bound: Duration::from_millis(30),
                    },
                )
            } else {
                None
            };
            changes += usize::from(t.is_some()) + usize::from(e.is_some());
        }
        changes
    }

    #[test]
    fn a_flapping_backend_changes_state_within_the_documented_bound() {
        let th = Thresholds::from(&default_probe());
        // The module doc's bound with the defaults: 3 recoveries (holds of
        // 0, 1 and 2 s) and 4 falls in 5 s.
        let changes = flap_for_5s(th);
        assert!(changes <= 7, "{changes} changes");
        assert_eq!(changes, 7, "the bound is reached");
        let undamped = flap_for_5s(th.with_hold_down(HoldDown::OFF));
        assert!(undamped >= 40, "{undamped} changes undamped");
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
            up.reason.as_str().starts_with("1 consecutive successes"),
            "{}",
            up.reason
        );
        assert!(m.observe(t0 + TICK, &outcome('f')).is_none());
        let down = m.observe(t0 + TICK * 2, &outcome('f')).unwrap();
        assert_eq!(down.reason, "2 consecutive failures: refused");
        assert_eq!(down.reason.failure(), Some(Failure::Refused));
        assert!(!m.is_ejected());
        m.observe(t0 + TICK * 3, &outcome('h')).unwrap();
        let ej = m.eject(t0 + TICK * 4, &refused(3)).unwrap();
        assert_eq!(ej.reason, "passive: 3 SYNs refused with RST");
        assert_eq!(ej.reason.failure(), Some(Failure::Refused));
        assert!(m.is_ejected());
        assert_eq!(m.changed_at(), Some(t0 + TICK * 4));
        m.observe(t0 + TICK * 5, &outcome('h')).unwrap();
        assert!(!m.is_ejected());
    }

    #[test]
    fn a_fall_carries_the_class_of_its_last_failure() {
        let t0 = Instant::now();
        let at = |i: u32| t0 + TICK * i;
        let mut m = HealthMachine::new(Thresholds::new(1, 2, Duration::ZERO));
        m.observe(at(0), &outcome('h')).unwrap();
        // Refused, then timed out: the run ends sick.
        assert!(m.observe(at(1), &outcome('f')).is_none());
        let down = m.observe(at(2), &outcome('t')).unwrap();
        assert_eq!(
            (down.to, down.reason.down_cause()),
            (HealthState::Down, DownCause::Sick)
        );
        assert_eq!(m.down_cause(), Some(DownCause::Sick));
        // More sick evidence changes nothing; one dead probe escalates once.
        assert!(m.observe(at(3), &outcome('t')).is_none());
        let dead = m.observe(at(4), &outcome('f')).unwrap();
        assert_eq!((dead.from, dead.to), (HealthState::Down, HealthState::Down));
        assert_eq!(dead.reason, "found dead: refused");
        assert_eq!(dead.reason.down_cause(), DownCause::Dead);
        assert!(m.observe(at(5), &outcome('f')).is_none());
        // Recovery forgets the cause.
        let up = m.observe(at(6), &outcome('h')).unwrap();
        assert_eq!(up.reason.failure(), None);
        assert_eq!(m.down_cause(), None);

        // A passive ejection of a backend down as sick escalates too.
        m.observe(at(7), &outcome('t'));
        assert_eq!(
            m.observe(at(8), &outcome('t')).unwrap().to,
            HealthState::Down
        );
        let dead = m.eject(at(9), &refused(2)).unwrap();
        assert_eq!((dead.from, dead.to), (HealthState::Down, HealthState::Down));
        assert_eq!(dead.reason, "found dead: passive: 2 SYNs refused with RST");
        assert!(m.eject(at(10), &refused(2)).is_none(), "once");

        // Dead from the start: nothing to escalate.
        let mut m = HealthMachine::new(Thresholds::new(1, 1, Duration::ZERO));
        m.observe(at(0), &outcome('h')).unwrap();
        let down = m.eject(at(1), &refused(1)).unwrap();
        assert_eq!(down.reason.down_cause(), DownCause::Dead);
        assert!(m.observe(at(2), &outcome('f')).is_none());
    }

    #[test]
    fn sick_and_dead_table() {
        // rise = 1, fall = 2; the escalation shows as a step where the
        // state stays D but the machine reported a change ('!').
        let t0 = Instant::now();
        let cases: &[(&str, &str, &str)] = &[
            ("slow run is sick", "htt", "UUD"),
            ("dead run is dead", "hff", "UUD"),
            ("sick then dead escalates once", "htttff", "UUDD!D"),
            ("dead never escalates", "hfftf", "UUDDD"),
            ("ejection is dead", "hehf", "UDUU"),
        ];
        for &(name, steps, want) in cases {
            let mut m = HealthMachine::new(Thresholds::new(1, 2, Duration::ZERO));
            let mut got = String::new();
            for (i, c) in steps.chars().enumerate() {
                let now = t0 + TICK * u32::try_from(i).unwrap();
                let t = if c == 'e' {
                    m.eject(now, &refused(1))
                } else {
                    m.observe(now, &outcome(c))
                };
                got.push(match (&t, m.state()) {
                    (Some(t), _) if t.from == t.to => '!',
                    (_, HealthState::Up) => 'U',
                    (_, HealthState::Down) => 'D',
                    (_, s) => panic!("{s}"),
                });
            }
            assert_eq!(got, want, "case {name:?}: steps {steps}");
        }
    }

    #[test]
    fn zero_thresholds_are_taken_as_one() {
        let th = Thresholds::new(0, 0, Duration::ZERO);
        assert_eq!((th.rise, th.fall), (1, 1));
        assert_eq!(run(th, "hf"), "UD");
    }
}
