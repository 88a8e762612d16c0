//! Passive health wiring: read each watched backend's `BE_STATS` every few
//! milliseconds, feed its [`PassiveDetector`], and report ejections. The
//! run loop then writes the backend DOWN at once (no round trip through
//! the prober) and tells the prober, whose rise rule brings it back.
//!
//! Only backends with new connections are read every [`POLL_INTERVAL`];
//! idle ones are read together in one sweep every [`IDLE_POLL_INTERVAL`],
//! and the run loop sleeps until [`PassiveMonitor::next_due`]. With no
//! traffic the agent wakes ten times a second for this, not two hundred.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use failover_common::BackendStats;

use crate::health::{
    Ejection, HandshakeCounters, PassiveConfig, PassiveDetector, ProberSignals, ReplyCounters,
    WedgeConfig, WedgeDetector,
};

/// Period of the counter reads for backends with new connections.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Period of the sweep over idle backends: with no SYNs toward a backend
/// there is nothing to detect.
pub const IDLE_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a backend counts as active after its last new SYN.
const ACTIVE_FOR: Duration = Duration::from_secs(1);

struct Watched {
    id: u32,
    detector: PassiveDetector,
    /// Inference backends only: its suspicions go to the prober, which
    /// confirms them with a generation.
    wedge: Option<WedgeDetector>,
    signals: Option<ProberSignals>,
    last_syns: u64,
    active_until: Option<Instant>,
    /// The last read found the edge under a SYN flood.
    flooded: bool,
}

impl Watched {
    fn active(&self, now: Instant) -> bool {
        self.active_until.is_some_and(|t| now < t)
    }
}

/// A passive ejection to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveEjection {
    pub backend: String,
    pub id: u32,
    pub why: Ejection,
}

/// The detectors of every backend with passive checking on.
#[derive(Default)]
pub struct PassiveMonitor {
    cfg: PassiveConfig,
    watched: BTreeMap<String, Watched>,
    /// When every backend is next read; `None`: at the next poll.
    next_sweep: Option<Instant>,
    /// The last poll, which read at least the active backends.
    last_poll: Option<Instant>,
    /// SYNs not taken as evidence because of a SYN flood, in all.
    suspended_total: u64,
    /// Wedge suspicions handed to probers, in all.
    suspicions_total: u64,
    /// A flood seen toward any backend holds every backend's unanswered
    /// rule until then: the edge forwarding the flood forwards the others'
    /// SYN-ACKs too.
    flood_until: Option<Instant>,
}

impl PassiveMonitor {
    pub fn new(cfg: PassiveConfig) -> Self {
        Self {
            cfg,
            watched: BTreeMap::new(),
            next_sweep: None,
            last_poll: None,
            suspended_total: 0,
            suspicions_total: 0,
            flood_until: None,
        }
    }

    /// Wedge suspicions handed to probers since the agent started.
    pub fn suspicions_total(&self) -> u64 {
        self.suspicions_total
    }

    /// SYNs the unanswered rule did not count because the edge was under
    /// a SYN flood, since the agent started.
    pub fn suspended_total(&self) -> u64 {
        self.suspended_total
    }

    /// Starts (or restarts, with fresh evidence) watching `backend` at `id`;
    /// `wedge`: also for a hung engine.
    pub fn watch(
        &mut self,
        backend: &str,
        id: u32,
        signals: Option<ProberSignals>,
        wedge: Option<WedgeConfig>,
    ) {
        self.watched.insert(
            backend.to_owned(),
            Watched {
                id,
                detector: PassiveDetector::new(self.cfg),
                wedge: wedge.map(WedgeDetector::new),
                signals,
                last_syns: 0,
                active_until: None,
                flooded: false,
            },
        );
        // Its baseline is read at the next poll.
        self.next_sweep = None;
    }

    pub fn unwatch(&mut self, backend: &str) {
        self.watched.remove(backend);
    }

    pub fn is_watching(&self, backend: &str) -> bool {
        self.watched.contains_key(backend)
    }

    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// When [`poll`](Self::poll) has work next: soon while a backend is
    /// active, else at the next sweep. `None` when nothing is watched.
    pub fn next_due(&self) -> Option<Instant> {
        if self.watched.is_empty() {
            return None;
        }
        let (Some(last), Some(sweep)) = (self.last_poll, self.next_sweep) else {
            return Some(Instant::now());
        };
        let any_active = self.watched.values().any(|w| w.active(last));
        let due = if any_active {
            sweep.min(last + POLL_INTERVAL)
        } else {
            sweep
        };
        // A detector whose bound ends sooner is read right then.
        let deadline = self
            .watched
            .values()
            .filter_map(|w| w.detector.deadline())
            .min();
        Some(deadline.map_or(due, |d| due.min(d)))
    }

    /// True when the next [`poll`](Self::poll) at `now` reads every
    /// backend (the caller may then fetch them all in one batch).
    pub fn sweep_due(&self, now: Instant) -> bool {
        self.next_sweep.is_none_or(|t| now >= t)
    }

    /// The highest backend id watched.
    pub fn max_id(&self) -> Option<u32> {
        self.watched.values().map(|w| w.id).max()
    }

    /// Reads the counters (summed over CPUs) of every active backend, and
    /// of all of them when a sweep is due, through `read`; returns the
    /// ejections. Each is also handed to the backend's prober. A failed
    /// read skips that backend this round.
    pub fn poll<E: std::fmt::Display>(
        &mut self,
        now: Instant,
        mut read: impl FnMut(u32) -> Result<BackendStats, E>,
    ) -> Vec<PassiveEjection> {
        let sweep = self.sweep_due(now);
        if sweep {
            self.next_sweep = Some(now + IDLE_POLL_INTERVAL);
        }
        self.last_poll = Some(now);
        let mut out = Vec::new();
        for (name, w) in &mut self.watched {
            let deadline_passed = w.detector.deadline().is_some_and(|d| d <= now);
            if !sweep && !w.active(now) && !deadline_passed {
                continue;
            }
            let stats = match read(w.id) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(backend = %name, error = %e, "BE_STATS read failed");
                    continue;
                }
            };
            if stats.syns != w.last_syns {
                w.last_syns = stats.syns;
                w.active_until = Some(now + ACTIVE_FOR);
            }
            if let Some(wd) = &mut w.wedge
                && let Some(why) = wd.observe(now, ReplyCounters::from(&stats))
            {
                self.suspicions_total += 1;
                match &w.signals {
                    Some(sig) if sig.suspect(why) => {}
                    _ => {
                        tracing::debug!(backend = %name, %why, "prober gone; wedge suspicion not forwarded")
                    }
                }
            }
            let c = HandshakeCounters::from_per_cpu(std::iter::once(&stats));
            let suspended = w.detector.suspended();
            if let Some(t) = self.flood_until {
                w.detector.hold_flood(t);
            }
            let ejection = w.detector.observe(now, c);
            if let Some(t) = w.detector.flood_until() {
                self.flood_until = Some(self.flood_until.map_or(t, |u| u.max(t)));
            }
            let flood = w.detector.suspended() - suspended;
            if flood > 0 && !w.flooded {
                tracing::info!(backend = %name, "SYN flood (half-open slots taken over): unanswered SYNs are no evidence");
            }
            w.flooded = flood > 0;
            self.suspended_total += flood;
            if let Some(why) = ejection {
                if let Some(sig) = &w.signals
                    && !sig.eject(why.clone())
                {
                    tracing::debug!(backend = %name, "prober gone; ejection not forwarded");
                }
                out.push(PassiveEjection {
                    backend: name.clone(),
                    id: w.id,
                    why,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Backends `a` (id 1) and `b` (id 2) watched, each with one SYN sent
    /// and answered in `stats`, read by [`read`].
    fn two_backends() -> (PassiveMonitor, Instant, BTreeMap<u32, BackendStats>) {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("a", 1, None, None);
        m.watch("b", 2, None, None);
        let stats = [1, 2]
            .map(|id| {
                (
                    id,
                    BackendStats {
                        syns: 1,
                        synacks: 1,
                        ..BackendStats::default()
                    },
                )
            })
            .into();
        (m, Instant::now(), stats)
    }

    fn read(stats: &BTreeMap<u32, BackendStats>, id: u32) -> Result<BackendStats, String> {
        Ok(stats.get(&id).copied().unwrap_or_default())
    }

    #[test]
    fn a_flood_toward_one_backend_holds_every_backends_silence_rule() {
        let (mut m, t0, mut stats) = two_backends();
        // Both answer within 1 ms: the silence bound is its 30 ms floor.
        for id in [1, 2] {
            let e = stats.entry(id).or_default();
            e.rtt_last_ns = 1_000_000;
            e.rtt_at_ns = 1;
        }
        assert!(m.poll(t0, |id| read(&stats, id)).is_empty(), "baseline");
        // 200 ms: a flood takes a's half-open slots over; b gets only its
        // own few SYNs, and the loaded edge forwards none of its SYN-ACKs.
        for step in 1..=40u64 {
            let a = stats.entry(1).or_default();
            a.pending_evicted += 100;
            a.syns_ignored += 100;
            stats.entry(2).or_default().syns += 1;
            let now = t0 + Duration::from_millis(5 * step);
            assert!(m.poll(now, |id| read(&stats, id)).is_empty(), "step {step}");
        }
        // The flood is over and b still says nothing: once the hold has
        // ended, that is evidence again.
        let mut ejected = None;
        for step in 41..=400u64 {
            stats.entry(2).or_default().syns += 1;
            let now = t0 + Duration::from_millis(5 * step);
            let ej = m.poll(now, |id| read(&stats, id));
            if !ej.is_empty() {
                ejected = Some((step, ej));
                break;
            }
        }
        let (step, ej) = ejected.expect("b ejected after the hold");
        assert_eq!(ej[0].backend, "b");
        // The hold is FLOOD_HOLD (1 s = 200 steps) from the flood's last read.
        assert!(step > 240, "step {step}");
    }

    #[test]
    fn refused_syns_eject_once_and_only_the_refused_backend() {
        // Both backends have live traffic (answered SYNs), so they are
        // polled at the fast period.
        let (mut m, t0, mut stats) = two_backends();
        assert!(m.poll(t0, |id| read(&stats, id)).is_empty(), "baseline");
        // b answers its SYNs; a's SYNs are refused.
        for step in 1..=3u32 {
            let a = stats.entry(1).or_default();
            a.syns += 1;
            a.syn_rsts += 1;
            let b = stats.entry(2).or_default();
            b.syns += 1;
            b.synacks += 1;
            b.rtt_last_ns = 100_000;
            b.rtt_at_ns = u64::from(step);
            let now = t0 + Duration::from_millis(5 * u64::from(step));
            let ej = m.poll(now, |id| read(&stats, id));
            if step == 2 {
                assert_eq!(
                    ej,
                    vec![PassiveEjection {
                        backend: "a".into(),
                        id: 1,
                        why: Ejection::Refused { rsts: 2 }
                    }]
                );
            } else {
                assert!(ej.is_empty(), "step {step}: {ej:?}");
            }
        }
        m.unwatch("a");
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn idle_backends_are_read_at_the_slow_period_until_syns_appear() {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("a", 1, None, None);
        let t0 = Instant::now();
        let reads = std::cell::Cell::new(0);
        let syns = std::cell::Cell::new(0u64);
        let read = |_| {
            reads.set(reads.get() + 1);
            Ok::<_, String>(BackendStats {
                syns: syns.get(),
                synacks: syns.get(),
                ..Default::default()
            })
        };
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(
            m.next_due().is_some_and(|t| t <= Instant::now()),
            "baseline due now"
        );
        m.poll(ms(0), read);
        assert_eq!(m.next_due(), Some(ms(100)), "idle: sleep until the sweep");
        m.poll(ms(5), read);
        m.poll(ms(50), read);
        assert_eq!(reads.get(), 1, "idle: no read before 100 ms");
        m.poll(ms(100), read);
        assert_eq!(reads.get(), 2);
        syns.set(3);
        m.poll(ms(200), read);
        assert_eq!(m.next_due(), Some(ms(205)), "active: due again in 5 ms");
        m.poll(ms(205), read);
        m.poll(ms(210), read);
        assert_eq!(reads.get(), 5, "active: read every 5 ms");
    }

    #[test]
    fn an_idle_backend_waits_for_the_sweep_while_another_is_active() {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("busy", 1, None, None);
        m.watch("idle", 2, None, None);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let reads: std::cell::RefCell<Vec<u32>> = Default::default();
        let syns = std::cell::Cell::new(0u64);
        let read = |id| {
            reads.borrow_mut().push(id);
            let s = if id == 1 { syns.get() } else { 0 };
            Ok::<_, String>(BackendStats {
                syns: s,
                synacks: s,
                ..Default::default()
            })
        };
        m.poll(ms(0), read);
        syns.set(1);
        m.poll(ms(100), read);
        m.poll(ms(105), read);
        m.poll(ms(110), read);
        assert_eq!(*reads.borrow(), vec![1, 2, 1, 2, 1, 1]);
        assert_eq!(m.next_due(), Some(ms(115)));
        m.unwatch("busy");
        m.unwatch("idle");
        assert_eq!(m.next_due(), None, "nothing watched: never due");
    }

    #[test]
    fn the_end_of_the_bound_is_read_on_time_not_at_the_next_period() {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("a", 1, None, None);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let syns = std::cell::Cell::new(2u64);
        let read = |_| {
            Ok::<_, String>(BackendStats {
                syns: syns.get(),
                synacks: 2,
                rtt_last_ns: 100_000,
                rtt_at_ns: 1,
                ..Default::default()
            })
        };
        m.poll(ms(0), read);
        // The path dies: two SYNs seen unanswered at the read of 3 ms, so
        // the 30 ms floor ends at 33 ms. The reads meanwhile come late
        // (a busy loop), off that grid.
        syns.set(4);
        assert!(m.poll(ms(3), read).is_empty());
        assert_eq!(m.next_due(), Some(ms(8)), "regular reads meanwhile");
        for t in [10, 17, 24, 31] {
            assert!(m.poll(ms(t), read).is_empty(), "{t} ms");
        }
        assert_eq!(m.next_due(), Some(ms(33)), "the deadline, not 31 + 5");
        let ej = m.poll(ms(33), read);
        assert!(
            matches!(&ej[..], [e] if matches!(e.why, Ejection::Unanswered { waited, .. } if waited == Duration::from_millis(30))),
            "{ej:?}"
        );
    }

    #[test]
    fn a_failed_read_skips_the_backend() {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("a", 1, None, None);
        let out = m.poll(Instant::now(), |_| Err::<BackendStats, _>("EPERM"));
        assert!(out.is_empty());
    }
}
