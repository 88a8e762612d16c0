//! Wedge detection from the data plane: a hung engine accepts connections,
//! ACKs requests and answers `/health` and `/v1/models`, but sends no byte
//! of any answer. The XDP program counts, per backend, the established
//! flows whose client sent a request (`asked`, once per flow), those the
//! backend sent a first byte back on (`answered`), and every payload
//! segment the backend sends (`reply_data`). A backend is *suspected* when,
//! over the last `budget`, it sent no payload at all while at least
//! `min_flows` flows that asked more than `budget` ago (and within the
//! window) are still unanswered.
//!
//! A suspicion moves nothing by itself. It asks the backend's prober for
//! one generation now (`Prober`'s confirm); only a generation that fails
//! or gets no first token within the probe's timeout takes the backend
//! down, as sick (`DRAINING` for its grace, then `DOWN`). Why: the
//! counters come from packets clients shape. A client that sends a
//! request and never reads still gets the first bytes of the answer (the
//! window it opened takes them); but one that sends a partial request, or
//! garbage a backend legitimately ignores, or advertises a zero window,
//! makes flows that ask and get no answer. With real traffic beside it the
//! backend's other answers break the silence and nothing is suspected;
//! alone, it earns at most one generation per `WINDOWS × budget`, which
//! a live engine answers (docs/datapath.md, "what an outsider can send").
//!
//! Flows are counted in a window (`WINDOWS × budget`), not since the
//! start: unanswered garbage from an hour ago is no evidence now. Answers
//! in the window to flows asked before it can only lower the count.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use failover_common::BackendStats;

/// The window, in budgets, over which asked and answered flows are
/// compared (and the least time between two suspicions).
pub const WINDOWS: u32 = 4;

/// Tuning of the wedge detector (`probe.wedge_budget`,
/// `probe.wedge_min_flows` of an inference probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WedgeConfig {
    /// How long a backend with waiting requests may send nothing.
    pub budget: Duration,
    /// Unanswered flows needed for a suspicion.
    pub min_flows: u64,
}

impl Default for WedgeConfig {
    fn default() -> Self {
        Self {
            budget: Duration::from_millis(300),
            min_flows: 2,
        }
    }
}

/// The reply counters of one backend, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyCounters {
    pub asked: u64,
    pub answered: u64,
    pub reply_data: u64,
}

impl From<&BackendStats> for ReplyCounters {
    fn from(s: &BackendStats) -> Self {
        Self {
            asked: s.asked,
            answered: s.answered,
            reply_data: s.reply_data,
        }
    }
}

/// Why a backend is suspected of being wedged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspicion {
    /// Flows that asked at least a budget ago, unanswered.
    pub unanswered: u64,
    /// How long the backend has sent no payload (at least the budget).
    pub silent: Duration,
}

impl fmt::Display for Suspicion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests unanswered, no reply byte for {:?}",
            self.unanswered, self.silent
        )
    }
}

/// Wedge detector of one backend: samples of its counters over the
/// window.
#[derive(Clone, Debug)]
pub struct WedgeDetector {
    cfg: WedgeConfig,
    samples: VecDeque<(Instant, ReplyCounters)>,
    last_raised: Option<Instant>,
}

impl WedgeDetector {
    pub fn new(cfg: WedgeConfig) -> Self {
        Self {
            cfg,
            samples: VecDeque::new(),
            last_raised: None,
        }
    }

    fn window(&self) -> Duration {
        self.cfg.budget * WINDOWS
    }

    /// One read of the counters at `now`; a suspicion when the rule holds
    /// (at most one per window).
    pub fn observe(&mut self, now: Instant, c: ReplyCounters) -> Option<Suspicion> {
        if let Some(&(_, last)) = self.samples.back()
            && (c.asked < last.asked
                || c.answered < last.answered
                || c.reply_data < last.reply_data)
        {
            // The maps were recreated: start over.
            self.samples.clear();
        }
        self.samples.push_back((now, c));
        let window_start = now.checked_sub(self.window());
        // Keep one sample at or before the window's start: the base.
        while self.samples.len() >= 2 && window_start.is_some_and(|ws| self.samples[1].0 <= ws) {
            self.samples.pop_front();
        }
        let &(_, base) = self.samples.front()?;
        let budget_ago = now.checked_sub(self.cfg.budget)?;
        // The latest sample at least a budget old.
        let &(then, old) = self.samples.iter().rev().find(|(t, _)| *t <= budget_ago)?;
        if c.reply_data != old.reply_data {
            return None;
        }
        let asked = old.asked - base.asked;
        let answered = c.answered - base.answered;
        let unanswered = asked.saturating_sub(answered);
        if unanswered < self.cfg.min_flows.max(1) {
            return None;
        }
        if self
            .last_raised
            .is_some_and(|t| now.saturating_duration_since(t) < self.window())
        {
            return None;
        }
        self.last_raised = Some(now);
        Some(Suspicion {
            unanswered,
            silent: now.saturating_duration_since(then),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds one sample every 50 ms; `f(i)` gives the counters of tick i.
    struct Run {
        d: WedgeDetector,
        t0: Instant,
    }

    impl Run {
        fn new() -> Self {
            Self {
                d: WedgeDetector::new(WedgeConfig::default()),
                t0: Instant::now(),
            }
        }

        /// The first tick (from `from`) that raises a suspicion, and it.
        fn first(
            &mut self,
            ticks: std::ops::Range<u32>,
            f: impl Fn(u32) -> ReplyCounters,
        ) -> Option<(u32, Suspicion)> {
            ticks
                .into_iter()
                .find_map(|i| self.d.observe(self.t0 + 50 * MS * i, f(i)).map(|s| (i, s)))
        }
    }

    fn c(asked: u64, answered: u64, reply_data: u64) -> ReplyCounters {
        ReplyCounters {
            asked,
            answered,
            reply_data,
        }
    }

    #[test]
    fn a_serving_backend_is_never_suspected() {
        // Two new flows a tick, each answered the next tick, streaming.
        let mut r = Run::new();
        let got = r.first(0..200, |i| {
            let i = u64::from(i);
            c(2 * i, (2 * i).saturating_sub(2), 10 * i)
        });
        assert_eq!(got, None);
    }

    #[test]
    fn a_backend_that_stops_answering_is_suspected_after_the_budget() {
        // Serving until tick 20 (1 s), then hung: requests keep coming.
        let mut r = Run::new();
        let got = r.first(0..100, |i| {
            let i = u64::from(i);
            let served = i.min(20);
            c(2 * i, 2 * served, 10 * served)
        });
        let (tick, s) = got.expect("suspected");
        // The first flows that asked after the hang are a budget old at
        // tick 27 (the budget is 300 ms = 6 ticks; 2 flows needed).
        assert!((26..=28).contains(&tick), "tick {tick}");
        assert!(s.unanswered >= 2, "{s}");
        assert!(s.silent >= 300 * MS, "{s}");
    }

    #[test]
    fn an_idle_backend_after_a_burst_is_not_suspected() {
        // 40 flows asked and were answered, then nothing at all.
        let mut r = Run::new();
        let got = r.first(0..200, |i| {
            let i = u64::from(i.min(20));
            c(2 * i, 2 * i, 10 * i)
        });
        assert_eq!(got, None);
    }

    #[test]
    fn old_unanswered_flows_age_out() {
        // 50 garbage flows early on, never answered, then a quiet backend
        // that answers what real clients ask: one suspicion while the
        // garbage is in the window, none once it left.
        let mut r = Run::new();
        let f = |i: u32| c(50 + u64::from(i), u64::from(i), 10 * u64::from(i));
        // Answers keep coming: the backend is not silent, never suspected.
        assert_eq!(r.first(0..200, f), None);
        // Silent now, with only the garbage: it raises at most once per
        // window, and never once the garbage aged out of the window.
        let mut r = Run::new();
        let raised: Vec<u32> = (0..200)
            .filter(|&i| r.d.observe(r.t0 + 50 * MS * i, c(50, 0, 0)).is_some())
            .collect();
        assert_eq!(
            raised,
            Vec::<u32>::new(),
            "garbage asked before the first read is the base"
        );
        let mut r = Run::new();
        let raised: Vec<u32> = (0..200)
            .filter(|&i| {
                let asked = if i >= 2 { 50 } else { 0 };
                r.d.observe(r.t0 + 50 * MS * i, c(asked, 0, 0)).is_some()
            })
            .collect();
        // Asked at tick 2; the window is 1.2 s = 24 ticks.
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert!(raised[0] <= 10, "{raised:?}");
    }

    #[test]
    fn one_reply_byte_in_the_budget_clears_the_silence() {
        let mut r = Run::new();
        let got = r.first(0..100, |i| {
            let i = u64::from(i);
            // Hung for new flows, but one old stream sends a segment
            // every 250 ms.
            c(2 * i, 40.min(2 * i), 20 + i / 5)
        });
        assert_eq!(got, None);
    }

    #[test]
    fn counters_that_go_back_start_over() {
        let mut d = WedgeDetector::new(WedgeConfig::default());
        let t0 = Instant::now();
        for i in 0..10u32 {
            assert_eq!(d.observe(t0 + 50 * MS * i, c(100, 0, 0)), None);
        }
        // Maps recreated (agent restarted the program): zeroes again, and
        // no sample from before counts.
        for i in 10..16u32 {
            assert_eq!(d.observe(t0 + 50 * MS * i, c(0, 0, 0)), None);
        }
    }
}
