//! Passive health wiring: read each watched backend's `BE_STATS` every few
//! milliseconds, feed its [`PassiveDetector`], and report ejections. The
//! run loop then writes the backend DOWN at once (no round trip through
//! the prober) and tells the prober, whose rise rule brings it back.

use std::{collections::BTreeMap, time::Instant};

use failover_common::BackendStats;

use crate::health::{Ejection, Ejector, HandshakeCounters, PassiveConfig, PassiveDetector};

/// Period of the counter reads for backends with new connections.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);
/// Period for idle backends: with no SYNs toward a backend there is nothing
/// to detect, and reading every backend's per-CPU counters every 5 ms is
/// most of the agent's CPU at rest.
pub const IDLE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a backend counts as active after its last new SYN.
const ACTIVE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

struct Watched {
    id: u32,
    detector: PassiveDetector,
    ejector: Option<Ejector>,
    last_read: Option<Instant>,
    last_syns: u64,
    active_until: Option<Instant>,
}

impl Watched {
    fn due(&self, now: Instant) -> bool {
        let active = self.active_until.is_some_and(|t| now < t);
        let period = if active {
            POLL_INTERVAL
        } else {
            IDLE_POLL_INTERVAL
        };
        self.last_read
            .is_none_or(|t| now.duration_since(t) >= period)
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
}

impl PassiveMonitor {
    pub fn new(cfg: PassiveConfig) -> Self {
        Self {
            cfg,
            watched: BTreeMap::new(),
        }
    }

    /// Starts (or restarts, with fresh evidence) watching `backend` at `id`.
    pub fn watch(&mut self, backend: &str, id: u32, ejector: Option<Ejector>) {
        self.watched.insert(
            backend.to_owned(),
            Watched {
                id,
                detector: PassiveDetector::new(self.cfg),
                ejector,
                last_read: None,
                last_syns: 0,
                active_until: None,
            },
        );
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

    /// Reads every watched backend's counters through `read` (summed over
    /// CPUs) and returns the ejections. Each is also handed to the
    /// backend's prober. A failed read skips that backend this round.
    pub fn poll<E: std::fmt::Display>(
        &mut self,
        now: Instant,
        mut read: impl FnMut(u32) -> Result<BackendStats, E>,
    ) -> Vec<PassiveEjection> {
        let mut out = Vec::new();
        for (name, w) in &mut self.watched {
            if !w.due(now) {
                continue;
            }
            w.last_read = Some(now);
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
            let c = HandshakeCounters::from_per_cpu(std::iter::once(&stats));
            if let Some(why) = w.detector.observe(now, c) {
                if let Some(ej) = &w.ejector
                    && !ej.eject(why.clone())
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

    #[test]
    fn refused_syns_eject_once_and_only_the_refused_backend() {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("a", 1, None);
        m.watch("b", 2, None);
        let t0 = Instant::now();
        let mut stats: BTreeMap<u32, BackendStats> = BTreeMap::new();
        let read = |stats: &BTreeMap<u32, BackendStats>, id: u32| {
            Ok::<_, String>(stats.get(&id).copied().unwrap_or_default())
        };
        // Both backends have live traffic (answered SYNs), so they are
        // polled at the fast period.
        for id in [1, 2] {
            let e = stats.entry(id).or_default();
            e.syns = 1;
            e.synacks = 1;
        }
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
        m.watch("a", 1, None);
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
        m.poll(ms(0), read);
        m.poll(ms(5), read);
        m.poll(ms(50), read);
        assert_eq!(reads.get(), 1, "idle: no read before 100 ms");
        m.poll(ms(100), read);
        assert_eq!(reads.get(), 2);
        syns.set(3);
        m.poll(ms(200), read);
        m.poll(ms(205), read);
        m.poll(ms(210), read);
        assert_eq!(reads.get(), 5, "active: read every 5 ms");
    }

    #[test]
    fn a_failed_read_skips_the_backend() {
        let mut m = PassiveMonitor::new(PassiveConfig::default());
        m.watch("a", 1, None);
        let out = m.poll(Instant::now(), |_| Err::<BackendStats, _>("EPERM"));
        assert!(out.is_empty());
    }
}
