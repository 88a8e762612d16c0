//! Passive health: ejects a backend from the data plane's own handshake
//! signals, in milliseconds, before an active probe could notice.
//!
//! Input: successive snapshots of one backend's `BE_STATS` counters (summed
//! over CPUs), each with the time it was read. Two rules:
//! - **Refused**: SYNs answered by RST (`syn_rsts` grew by at least
//!   `rst_threshold` since the last SYN-ACK) while no SYN-ACK came back.
//! - **Unanswered**: at least `min_unanswered` SYNs went out and neither a
//!   SYN-ACK nor an RST came back for longer than
//!   `clamp(rtt_multiplier * srtt, floor, ceiling)`, where
//!   `srtt` is an EWMA of the handshake RTTs the data plane measured. Before
//!   any RTT is known the bound is `unknown_rtt_bound`, so the first SYN to a
//!   distant backend is not mistaken for a dead one.
//!
//! While the data plane takes half-open slots over (`pending_evicted` grew:
//! SYNs arrive faster than the port range holds handshakes, which is a SYN
//! flood), and for `FLOOD_HOLD` after, the unanswered rule is suspended: a
//! taken-over SYN's answer can no longer be seen, and a flood of valid SYNs
//! from spoofed sources must not eject the backends it lands on (docs/datapath.md, "What a client
//! can send"). The refused rule stays: only the backend sends its RSTs.
//! It is suspended the same way while SYNs toward the backend arrive at
//! [`FLOOD_SYN_RATE`] or more: a flood that has not filled the half-open
//! table yet takes no slot over, but its SYNs stall the backend's stack
//! (the flood bench ejected a live backend that way, SYNs unanswered for
//! 31 ms at 25,000 a second toward it). Inference backends take a few
//! hundred new connections a second each; above the rate, a dead backend
//! is left to the active probe.
//! The monitor holds every backend's rule while any of them sees a flood
//! (`hold_flood`): a flood toward one backend loads the edge that forwards
//! every backend's SYN-ACKs, and the flood bench saw a backend that got
//! none of the flood go unanswered for 30 ms.
//!
//! Any SYN-ACK proves the backend alive and clears both rules' evidence, so
//! ordinary traffic never ejects, and a backend with no traffic has no
//! evidence at all. The detector is pure (time is passed in) and works on
//! window deltas, never on the cumulative `syns - synacks`, which drifts with
//! client SYN retransmits and abandoned connections.

use std::fmt;
use std::time::{Duration, Instant};

use failover_common::BackendStats;

/// The handshake counters of one backend, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCounters {
    pub syns: u64,
    pub synacks: u64,
    pub syn_rsts: u64,
    /// Handshake RTT of the most recent SYN-ACK on any CPU (0 = none yet).
    pub rtt_last_ns: u64,
    /// Kernel monotonic time of that SYN-ACK: a change means a new sample.
    pub rtt_at_ns: u64,
    /// Half-open slots taken over by new flows toward this backend.
    pub pending_evicted: u64,
    /// Answers to SYNs other than SYN-ACK and RST (challenge ACKs).
    pub syn_other: u64,
    /// SYNs forwarded that are no evidence (options beyond the vanilla
    /// set, data): they load the backend all the same, so they count
    /// toward a SYN surge.
    pub syns_ignored: u64,
}

impl HandshakeCounters {
    /// Sums the per-CPU values of a backend's stats; the RTT is the one most
    /// recently measured on any CPU.
    pub fn from_per_cpu<'a>(per_cpu: impl IntoIterator<Item = &'a BackendStats>) -> Self {
        let s = per_cpu
            .into_iter()
            .fold(BackendStats::default(), BackendStats::merge);
        Self {
            syns: s.syns,
            synacks: s.synacks,
            syn_rsts: s.syn_rsts,
            rtt_last_ns: s.rtt_last_ns,
            rtt_at_ns: s.rtt_at_ns,
            pending_evicted: s.pending_evicted,
            syn_other: s.syn_other,
            syns_ignored: s.syns_ignored,
        }
    }
}

/// Tuning of the passive detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveConfig {
    /// RSTs to SYNs, with no SYN-ACK in between, that eject.
    pub rst_threshold: u64,
    /// SYNs left unanswered, with no SYN-ACK in between, needed to eject:
    /// one SYN lost on the way, just as traffic to the backend stops (its
    /// ring moved away), is no evidence of a dead backend.
    pub min_unanswered: u64,
    /// Unanswered bound = `rtt_multiplier` x smoothed handshake RTT ...
    pub rtt_multiplier: u32,
    /// ... but never below this. A backend's kernel answers SYNs in
    /// softirq whatever its application is doing, so on a path under
    /// 7.5 ms RTT, 30 ms of silence with two SYNs waiting means the host
    /// or the path is gone; the floor covers scheduling noise here and
    /// a full accept queue there ...
    pub floor: Duration,
    /// ... nor above this (a client retransmits its SYN after 1 s anyway).
    pub ceiling: Duration,
    /// Bound used while no handshake RTT has been seen.
    pub unknown_rtt_bound: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            rst_threshold: 2,
            min_unanswered: 2,
            rtt_multiplier: 4,
            floor: Duration::from_millis(30),
            ceiling: Duration::from_secs(1),
            unknown_rtt_bound: Duration::from_millis(300),
        }
    }
}

/// Why the detector ejects a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// SYNs answered by RST (port closed, process dead).
    Refused { rsts: u64 },
    /// SYNs left unanswered past the RTT-derived bound (host or path dead).
    Unanswered { waited: Duration, bound: Duration },
    /// Requests unanswered while the backend sent nothing, and a
    /// generation that then failed (`super::wedge`).
    Wedged {
        suspicion: super::Suspicion,
        check: String,
    },
}

impl Ejection {
    /// Its class: handshake evidence is of a gone backend; a wedged one
    /// still completes handshakes, so its streams get their grace.
    pub fn failure(&self) -> super::Failure {
        match self {
            Ejection::Refused { .. } => super::Failure::Refused,
            Ejection::Unanswered { .. } => super::Failure::Unanswered,
            Ejection::Wedged { .. } => super::Failure::Timeout,
        }
    }
}

impl fmt::Display for Ejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ejection::Refused { rsts } => write!(f, "{rsts} SYNs refused with RST"),
            Ejection::Unanswered { waited, bound } => {
                write!(f, "SYNs unanswered for {waited:?} (bound {bound:?})")
            }
            Ejection::Wedged { suspicion, check } => {
                write!(f, "wedged: {suspicion}; generation: {check}")
            }
        }
    }
}

/// Passive detector of one backend.
#[derive(Clone, Debug)]
pub struct PassiveDetector {
    cfg: PassiveConfig,
    prev: Option<HandshakeCounters>,
    srtt_ns: Option<u64>,
    /// RSTs to SYNs since the last SYN-ACK.
    refused: u64,
    /// When SYNs were first seen outstanding with no answer since.
    unanswered_since: Option<Instant>,
    /// How many SYNs have gone unanswered since then.
    unanswered: u64,
    /// SYNs not taken as evidence because the edge was under a SYN flood.
    suspended: u64,
    /// The unanswered rule is suspended until then (the last take-over of
    /// a half-open slot, or the last window at `FLOOD_SYN_RATE`, plus
    /// `FLOOD_HOLD`).
    flood_until: Option<Instant>,
    /// When `prev` was read.
    prev_at: Option<Instant>,
}

/// How long after the last half-open slot taken over silence stays no
/// evidence: the backend may still be working through the flood's SYNs,
/// and a poll may fall between two bursts.
pub const FLOOD_HOLD: Duration = Duration::from_secs(1);

/// SYNs a second toward one backend from which silence is no evidence:
/// a SYN flood, whether or not it has filled the half-open table.
pub const FLOOD_SYN_RATE: f64 = 2_000.0;

impl PassiveDetector {
    pub fn new(cfg: PassiveConfig) -> Self {
        Self {
            cfg,
            prev: None,
            srtt_ns: None,
            refused: 0,
            unanswered_since: None,
            unanswered: 0,
            suspended: 0,
            flood_until: None,
            prev_at: None,
        }
    }

    /// SYNs the unanswered rule did not count because the edge was under a
    /// SYN flood, since this detector started.
    pub fn suspended(&self) -> u64 {
        self.suspended
    }

    /// Until when the unanswered rule is suspended for a flood, if it is.
    pub fn flood_until(&self) -> Option<Instant> {
        self.flood_until
    }

    /// Suspends the unanswered rule until `until` at least: a flood seen
    /// toward another backend of this edge (see `PassiveMonitor::poll`).
    pub fn hold_flood(&mut self, until: Instant) {
        self.flood_until = Some(self.flood_until.map_or(until, |t| t.max(until)));
    }

    /// Smoothed handshake RTT, when one is known.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt_ns.map(Duration::from_nanos)
    }

    /// Seeds the RTT estimate (e.g. from the active TCP probe's connect time,
    /// measured from the same node) while the data plane has none.
    pub fn seed_rtt(&mut self, rtt: Duration) {
        if self.srtt_ns.is_none() && !rtt.is_zero() {
            self.srtt_ns = Some(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
        }
    }

    /// How long SYNs may stay unanswered before the backend is ejected.
    pub fn unanswered_bound(&self) -> Duration {
        match self.srtt() {
            Some(srtt) => (srtt * self.cfg.rtt_multiplier).clamp(self.cfg.floor, self.cfg.ceiling),
            None => self.cfg.unknown_rtt_bound,
        }
    }

    /// When the unanswered rule fires if nothing is answered meanwhile:
    /// the end of the bound, once enough SYNs are outstanding. The monitor
    /// reads the counters then, instead of at its next regular read.
    pub fn deadline(&self) -> Option<Instant> {
        let since = self.unanswered_since?;
        (self.unanswered >= self.cfg.min_unanswered).then(|| since + self.unanswered_bound())
    }

    /// Feeds the snapshot read at `now`. Returns an ejection once per episode:
    /// after one, fresh evidence is needed for the next.
    pub fn observe(&mut self, now: Instant, c: HandshakeCounters) -> Option<Ejection> {
        let prev_at = self.prev_at.replace(now);
        let Some(prev) = self.prev.replace(c) else {
            self.sample_rtt(None, &c);
            return None;
        };
        if c.syns < prev.syns
            || c.synacks < prev.synacks
            || c.syn_rsts < prev.syn_rsts
            || c.pending_evicted < prev.pending_evicted
            || c.syn_other < prev.syn_other
        {
            // Counters went back: the map was re-created. Start over from here.
            self.clear_evidence();
            return None;
        }
        self.sample_rtt(Some(&prev), &c);
        let syns = c.syns - prev.syns;
        let synacks = c.synacks - prev.synacks;
        let rsts = c.syn_rsts - prev.syn_rsts;
        // Challenge ACKs answer their SYNs without proving the port open.
        let answered = rsts + (c.syn_other - prev.syn_other);

        if synacks > 0 {
            // The backend answers: earlier refusals or silence no longer count.
            // SYNs of this window beyond the answers may still be in flight.
            self.refused = 0;
            self.unanswered = syns.saturating_sub(synacks + answered);
            self.unanswered_since = (self.unanswered > 0).then_some(now);
            return None;
        }
        if rsts > 0 {
            self.refused += rsts;
            if self.refused >= self.cfg.rst_threshold {
                let rsts = self.refused;
                self.clear_evidence();
                return Some(Ejection::Refused { rsts });
            }
        }
        let window = prev_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let all_syns = syns + c.syns_ignored.saturating_sub(prev.syns_ignored);
        let surge = !window.is_zero() && all_syns as f64 / window.as_secs_f64() >= FLOOD_SYN_RATE;
        if c.pending_evicted > prev.pending_evicted || surge {
            self.flood_until = Some(now + FLOOD_HOLD);
        }
        if self.flood_until.is_some_and(|t| now < t) {
            // A SYN flood: silence is no evidence (see the module doc).
            self.suspended += syns.saturating_sub(answered);
            self.unanswered = 0;
            self.unanswered_since = None;
            return None;
        }
        if syns > answered {
            self.unanswered += syns - answered;
            if self.unanswered_since.is_none() {
                self.unanswered_since = Some(now);
            }
        }
        let since = self.unanswered_since?;
        let waited = now.saturating_duration_since(since);
        let bound = self.unanswered_bound();
        if waited >= bound && self.unanswered >= self.cfg.min_unanswered {
            self.clear_evidence();
            return Some(Ejection::Unanswered { waited, bound });
        }
        None
    }

    fn sample_rtt(&mut self, prev: Option<&HandshakeCounters>, c: &HandshakeCounters) {
        let fresh = prev.is_none_or(|p| p.rtt_at_ns != c.rtt_at_ns);
        if !fresh || c.rtt_last_ns == 0 {
            return;
        }
        // EWMA with gain 1/8, as TCP's SRTT.
        self.srtt_ns = Some(match self.srtt_ns {
            None => c.rtt_last_ns,
            Some(s) => s - s / 8 + c.rtt_last_ns / 8,
        });
    }

    fn clear_evidence(&mut self) {
        self.refused = 0;
        self.unanswered_since = None;
        self.unanswered = 0;
    }
}

impl Default for PassiveDetector {
    fn default() -> Self {
        Self::new(PassiveConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: Duration = Duration::from_millis(5);
    const MS: u64 = 1_000_000;

    /// Drives a detector with counter deltas, one sample every 5 ms, and
    /// returns the ejections with the sample index they happened at.
    struct Feed {
        det: PassiveDetector,
        t0: Instant,
        i: u32,
        c: HandshakeCounters,
        clock_ns: u64,
    }

    impl Feed {
        fn new(cfg: PassiveConfig) -> Self {
            let mut f = Self {
                det: PassiveDetector::new(cfg),
                t0: Instant::now(),
                i: 0,
                c: HandshakeCounters::default(),
                clock_ns: 1_000 * MS,
            };
            assert_eq!(f.step(0, 0, 0, None), None, "baseline never ejects");
            f
        }

        fn now(&self) -> Instant {
            self.t0 + SAMPLE * self.i
        }

        /// One sample in which `syns`, `synacks`, `rsts` happened; `rtt_ms`
        /// is the handshake RTT measured in it, if any.
        fn step(
            &mut self,
            syns: u64,
            synacks: u64,
            rsts: u64,
            rtt_ms: Option<u64>,
        ) -> Option<Ejection> {
            self.clock_ns += 5 * MS;
            self.c.syns += syns;
            self.c.synacks += synacks;
            self.c.syn_rsts += rsts;
            if let Some(rtt) = rtt_ms {
                self.c.rtt_last_ns = rtt * MS;
                self.c.rtt_at_ns = self.clock_ns;
            }
            let e = self.det.observe(self.now(), self.c);
            self.i += 1;
            e
        }

        /// Repeats a step `n` times; returns the first ejection and its step.
        fn repeat(
            &mut self,
            n: u32,
            syns: u64,
            synacks: u64,
            rsts: u64,
            rtt: Option<u64>,
        ) -> Option<(u32, Ejection)> {
            for k in 0..n {
                if let Some(e) = self.step(syns, synacks, rsts, rtt) {
                    return Some((k, e));
                }
            }
            None
        }
    }

    #[test]
    fn zero_traffic_never_ejects() {
        let mut f = Feed::new(PassiveConfig::default());
        // 10 s of nothing.
        assert_eq!(f.repeat(2_000, 0, 0, 0, None), None);
    }

    #[test]
    fn ordinary_traffic_never_ejects() {
        let mut f = Feed::new(PassiveConfig::default());
        // Answered in the same window.
        assert_eq!(f.repeat(400, 3, 3, 0, Some(1)), None);
        // Answered one window later: 3 out, 2 back, then 3 out, 4 back.
        for _ in 0..400 {
            assert_eq!(f.step(3, 2, 0, Some(2)), None);
            assert_eq!(f.step(3, 4, 0, Some(2)), None);
        }
        // Sparse connections answered within the RTT (each 20 ms apart).
        for _ in 0..100 {
            assert_eq!(f.step(1, 0, 0, None), None);
            assert_eq!(f.step(0, 1, 0, Some(3)), None);
            assert_eq!(f.repeat(2, 0, 0, 0, None), None);
        }
        // Client SYN retransmits to a live backend (syns > synacks forever).
        assert_eq!(f.repeat(400, 2, 1, 0, Some(1)), None);
    }

    #[test]
    fn refused_syns_eject() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(100, 2, 2, 0, Some(1)), None);
        // The process died: each SYN gets an RST; the second one ejects.
        assert_eq!(f.step(1, 0, 1, None), None);
        assert_eq!(f.step(1, 0, 1, None), Some(Ejection::Refused { rsts: 2 }));
    }

    #[test]
    fn refused_threshold_one_ejects_on_first_rst() {
        let cfg = PassiveConfig {
            rst_threshold: 1,
            ..PassiveConfig::default()
        };
        let mut f = Feed::new(cfg);
        assert_eq!(f.step(1, 0, 1, None), Some(Ejection::Refused { rsts: 1 }));
    }

    #[test]
    fn rsts_alongside_synacks_do_not_eject() {
        let mut f = Feed::new(PassiveConfig::default());
        // Some SYNs refused (e.g. a full backlog), but the backend answers.
        assert_eq!(f.repeat(400, 4, 3, 1, Some(1)), None);
    }

    #[test]
    fn rsts_since_last_synack_accumulate_across_windows() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.step(1, 0, 1, None), None);
        assert_eq!(
            f.step(1, 1, 0, Some(1)),
            None,
            "a SYN-ACK clears the refusal"
        );
        assert_eq!(f.step(1, 0, 1, None), None);
        assert_eq!(f.repeat(20, 0, 0, 0, None), None);
        assert_eq!(f.step(1, 0, 1, None), Some(Ejection::Refused { rsts: 2 }));
    }

    #[test]
    fn blackhole_ejects_after_floor_on_fast_path() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(200, 3, 3, 0, Some(1)), None);
        // The link died: SYNs keep coming, nothing comes back. srtt = 1 ms,
        // so the bound is the 30 ms floor: sample 6 (30 ms after the first
        // unanswered one) ejects.
        let (k, e) = f.repeat(100, 3, 0, 0, None).expect("ejected");
        assert_eq!(k, 6);
        assert_eq!(
            e,
            Ejection::Unanswered {
                waited: Duration::from_millis(30),
                bound: Duration::from_millis(30)
            }
        );
    }

    #[test]
    fn blackhole_bound_follows_rtt() {
        let mut f = Feed::new(PassiveConfig::default());
        // A distant backend: 40 ms handshakes; bound = 4 x 40 = 160 ms.
        assert_eq!(f.repeat(200, 1, 1, 0, Some(40)), None);
        assert_eq!(f.det.srtt(), Some(Duration::from_millis(40)));
        assert_eq!(f.det.unanswered_bound(), Duration::from_millis(160));
        // Two unanswered SYNs, then silence: 32 samples x 5 ms = 160 ms.
        assert_eq!(f.step(2, 0, 0, None), None);
        let (k, e) = f.repeat(100, 0, 0, 0, None).expect("ejected");
        assert_eq!(k + 1, 32);
        assert!(matches!(e, Ejection::Unanswered { .. }), "{e}");
    }

    #[test]
    fn one_stray_syn_as_traffic_stops_does_not_eject() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(200, 3, 3, 0, Some(1)), None);
        // The ring moved away: the last window's SYNs are answered but one,
        // which was lost; then no more SYNs come. Nothing to go on.
        assert_eq!(f.step(3, 2, 0, None), None);
        assert_eq!(f.repeat(100, 0, 0, 0, None), None);
        // A second SYN, unanswered too: now it is evidence, and the wait
        // counts from the first.
        assert!(matches!(
            f.step(1, 0, 0, None),
            Some(Ejection::Unanswered { .. })
        ));
    }

    #[test]
    fn late_answer_within_bound_does_not_eject() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(20, 1, 1, 0, Some(30)), None);
        // 100 ms without an answer, under the 120 ms bound, then the SYN-ACK.
        assert_eq!(f.step(1, 0, 0, None), None);
        assert_eq!(f.repeat(20, 0, 0, 0, None), None);
        assert_eq!(f.step(0, 1, 0, Some(30)), None);
        assert_eq!(f.repeat(200, 0, 0, 0, None), None);
    }

    #[test]
    fn unknown_rtt_uses_conservative_bound() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.det.unanswered_bound(), Duration::from_millis(300));
        assert_eq!(f.step(2, 0, 0, None), None);
        let (k, _) = f.repeat(100, 0, 0, 0, None).expect("ejected");
        assert_eq!(k + 1, 60, "300 ms / 5 ms");
    }

    #[test]
    fn seeded_rtt_sets_bound_until_data_plane_measures() {
        let mut d = PassiveDetector::default();
        d.seed_rtt(Duration::from_millis(20));
        assert_eq!(d.unanswered_bound(), Duration::from_millis(80));
        d.seed_rtt(Duration::from_millis(500));
        assert_eq!(d.srtt(), Some(Duration::from_millis(20)), "seed only once");
        // The bound stays within [floor, ceiling].
        let mut far = PassiveDetector::default();
        far.seed_rtt(Duration::from_secs(2));
        assert_eq!(far.unanswered_bound(), Duration::from_secs(1));
    }

    #[test]
    fn one_ejection_per_episode() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(10, 1, 1, 0, Some(1)), None);
        let (k, _) = f.repeat(100, 1, 0, 0, None).expect("first");
        assert_eq!(k, 6);
        // Still dead: the next report needs a whole new bound of evidence.
        let (k, _) = f.repeat(100, 1, 0, 0, None).expect("second");
        assert_eq!(k, 6);
    }

    #[test]
    fn silence_under_a_syn_flood_is_no_evidence_but_refusals_are() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(20, 3, 3, 0, Some(1)), None);
        // Spoofed SYNs fill the half-open slots: each window takes some
        // over, and the backend's answers to the taken-over ones are lost.
        for _ in 0..200 {
            f.c.pending_evicted += 50;
            assert_eq!(f.step(60, 0, 0, None), None, "no ejection during a flood");
        }
        assert_eq!(f.det.suspended(), 200 * 60);
        // The flood stops: silence counts again a second later.
        assert_eq!(f.repeat(199, 3, 0, 0, None), None);
        let (k, _) = f.repeat(100, 3, 0, 0, None).expect("ejected");
        assert_eq!(k, 6);
        // A refusal is the backend's own word, flood or not.
        f.c.pending_evicted += 50;
        assert_eq!(f.step(1, 0, 1, None), None);
        f.c.pending_evicted += 50;
        assert_eq!(f.step(1, 0, 1, None), Some(Ejection::Refused { rsts: 2 }));
    }

    #[test]
    fn a_flood_still_filling_the_half_open_table_is_no_evidence_either() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(20, 3, 3, 0, Some(1)), None);
        // 25,000 SYNs a second (125 a 5 ms window), no slot taken over yet,
        // and the backend's stack stalls for 40 ms: no answer at all.
        assert_eq!(f.repeat(8, 125, 0, 0, None), None, "no ejection");
        // It answers again, the flood goes on.
        assert_eq!(f.repeat(100, 125, 120, 0, Some(5)), None);
        assert!(f.det.suspended() >= 8 * 125);
        // A flood of SYNs that are no evidence (options a backend may
        // ignore) loads the backend all the same: its stall is no evidence.
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(20, 3, 3, 0, Some(1)), None);
        for _ in 0..8 {
            f.c.syns_ignored += 125;
            assert_eq!(f.step(3, 0, 0, None), None, "no ejection");
        }
        // The same stall at an ordinary rate (600 a second) is evidence.
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(20, 3, 3, 0, Some(1)), None);
        let (k, _) = f.repeat(100, 3, 0, 0, None).expect("ejected");
        assert_eq!(k, 6);
    }

    #[test]
    fn challenge_acks_offset_silence_but_not_refusals() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(20, 3, 3, 0, Some(1)), None);
        // Valid SYNs on tuples the backend still holds: each is answered
        // with a bare ACK. No SYN-ACK, but no silence either.
        for _ in 0..100 {
            f.c.syn_other += 2;
            assert_eq!(f.step(2, 0, 0, None), None);
        }
        // A closed port: RSTs, while the host still ACKs its dying
        // connections. The refusals count all the same.
        f.c.syn_other += 3;
        assert_eq!(f.step(1, 0, 1, None), None);
        f.c.syn_other += 3;
        assert_eq!(f.step(1, 0, 1, None), Some(Ejection::Refused { rsts: 2 }));
    }

    #[test]
    fn counter_reset_rebaselines() {
        let mut f = Feed::new(PassiveConfig::default());
        assert_eq!(f.repeat(10, 5, 0, 0, None), None);
        // The map was re-created: counters restart near zero.
        f.c = HandshakeCounters::default();
        assert_eq!(f.step(1, 1, 0, Some(1)), None);
        assert_eq!(f.repeat(100, 1, 1, 0, Some(1)), None);
    }

    #[test]
    fn per_cpu_sum_takes_latest_rtt() {
        let a = BackendStats {
            syns: 3,
            synacks: 2,
            syn_rsts: 1,
            rtt_last_ns: 7,
            rtt_at_ns: 100,
            ..BackendStats::default()
        };
        let b = BackendStats {
            syns: 4,
            synacks: 4,
            rtt_last_ns: 9,
            rtt_at_ns: 200,
            ..BackendStats::default()
        };
        let c = HandshakeCounters::from_per_cpu(&[a, b, BackendStats::default()]);
        assert_eq!(
            c,
            HandshakeCounters {
                syns: 7,
                synacks: 6,
                syn_rsts: 1,
                rtt_last_ns: 9,
                rtt_at_ns: 200,
                pending_evicted: 0,
                syn_other: 0,
                syns_ignored: 0,
            }
        );
    }
}
