//! A paced client for failover measurements: one request per interval
//! (a new connection each, so each is a new flow through the VIP), every
//! result recorded with its start time. Bounded by a deadline and a stop
//! flag; the thread runs inside the client namespace.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{client, netns};

#[derive(Clone, Debug)]
pub struct Sample {
    /// Start of the request, from the driver's start.
    pub at: Duration,
    /// When it ended (answered, refused or timed out), same clock.
    pub done: Duration,
    pub ok: bool,
    pub backend: String,
    /// Streaming chat requests ([`crate::pacer::Request::Chat`]): from the
    /// start to the first byte of the first SSE `data:` line, if any came.
    pub ttft: Option<Duration>,
}

pub struct Driver {
    pub started: Instant,
    stop: Arc<AtomicBool>,
    /// Every result so far, in start order (read while it runs).
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: JoinHandle<()>,
}

impl Driver {
    /// Starts sending `GET path` to `target` from inside namespace `ns`
    /// every `interval`, each bounded by `timeout`, for at most `max`.
    pub fn start(
        ns: &str,
        target: SocketAddr,
        path: &str,
        interval: Duration,
        timeout: Duration,
        max: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (ns, path, flag) = (ns.to_owned(), path.to_owned(), stop.clone());
        let out = samples.clone();
        let handle = std::thread::spawn(move || {
            let _in = netns::enter(&ns).expect("enter client namespace");
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) && started.elapsed() < max {
                let at = started.elapsed();
                let (ok, backend) = match client::get(target, &path, timeout) {
                    Ok(a) => (a.status == 200, a.backend),
                    Err(_) => (false, String::new()),
                };
                let done = started.elapsed();
                out.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Sample {
                        at,
                        done,
                        ok,
                        backend,
                        ttft: None,
                    });
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                } else {
                    next = Instant::now();
                }
            }
        });
        Self {
            started,
            stop,
            samples,
            handle,
        }
    }

    /// The results so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `n` requests have been answered (traffic flows);
    /// panics after `timeout`.
    pub fn wait_answered(&self, n: usize, timeout: Duration) {
        crate::wait::wait_for(&format!("{n} answered requests"), timeout, || {
            self.answered(|_| true) >= n
        });
    }

    /// How many answered requests `keep` accepts.
    pub fn answered(&self, mut keep: impl FnMut(&Sample) -> bool) -> usize {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.ok && keep(s))
            .count()
    }

    /// Time since the driver started (to stamp faults on the same clock).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("driver thread");
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Failover time: from `fault` to the first answer within the first
/// unbroken run of `run` successes among requests started after it (runs
/// in start order). The answer, not the start: a request sent into the
/// fault and rescued later (its SYN retransmitted to the new backend) shows
/// the service back only when it is answered, and a request sent after the
/// switch may be answered before it. Also returns the number of failed
/// requests started after the fault.
pub fn recovery(samples: &[Sample], fault: Duration, run: usize) -> (Option<Duration>, usize) {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= fault).collect();
    let failed = after.iter().filter(|s| !s.ok).count();
    let mut streak = 0;
    for (i, s) in after.iter().enumerate() {
        if s.ok {
            streak += 1;
            if streak == run {
                let back = after[i + 1 - run..=i]
                    .iter()
                    .map(|s| s.done)
                    .min()
                    .unwrap_or(fault);
                return (Some(back.max(fault) - fault), failed);
            }
        } else {
            streak = 0;
        }
    }
    (None, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64, ok: bool) -> Sample {
        Sample {
            at: Duration::from_millis(ms),
            done: Duration::from_millis(ms + 1),
            ok,
            backend: String::new(),
            ttft: None,
        }
    }

    #[test]
    fn recovery_is_measured_to_the_answer_of_the_first_of_an_unbroken_run() {
        let samples = [
            s(0, true),
            s(10, true),
            s(11, false),
            s(12, true),
            s(13, false),
            s(20, true),
            s(21, true),
            s(22, true),
        ];
        // The run starts with the request sent at 20 ms, answered at 21.
        assert_eq!(
            recovery(&samples, Duration::from_millis(10), 3),
            (Some(Duration::from_millis(11)), 2)
        );
        // A run that never completes is no recovery.
        assert_eq!(
            recovery(&samples[..7], Duration::from_millis(10), 3).0,
            None
        );
        // No failure at all: back as soon as the first request is answered.
        assert_eq!(
            recovery(&samples[..2], Duration::from_millis(0), 2),
            (Some(Duration::from_millis(1)), 0)
        );
        // Requests sent into the fault and answered late (their SYNs rescued
        // by the new backend) count from their answers, not their starts;
        // the service is back at the run's first answer.
        let mut rescued = samples[..2].to_vec();
        for (sent, answered) in [(12, 80), (13, 79), (70, 71), (72, 73)] {
            rescued.push(Sample {
                done: Duration::from_millis(answered),
                ..s(sent, true)
            });
        }
        assert_eq!(
            recovery(&rescued, Duration::from_millis(11), 3),
            (Some(Duration::from_millis(60)), 0)
        );
    }
}
