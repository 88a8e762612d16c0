//! Apply latencies kept in memory: the most recent samples in a fixed
//! window (bounded memory, percentiles of current behaviour) plus totals
//! since start.

use std::time::Duration;

/// Samples kept for percentiles.
pub const WINDOW: usize = 4096;

#[derive(Clone, Debug)]
pub struct LatencyWindow {
    /// Nanoseconds, a ring buffer of the last `WINDOW` samples.
    samples: Vec<u64>,
    at: usize,
    count: u64,
    max_ns: u64,
}

/// Percentiles of the window, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Samples since start.
    pub count: u64,
    /// Samples the percentiles are computed from.
    pub window: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyWindow {
    pub fn new() -> Self {
        Self {
            samples: Vec::with_capacity(WINDOW),
            at: 0,
            count: 0,
            max_ns: 0,
        }
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if self.samples.len() < WINDOW {
            self.samples.push(ns);
        } else {
            self.samples[self.at] = ns;
        }
        self.at = (self.at + 1) % WINDOW;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn percentiles(&self) -> Percentiles {
        let mut v = self.samples.clone();
        v.sort_unstable();
        Percentiles {
            count: self.count,
            window: v.len(),
            p50_us: percentile(&v, 0.50),
            p99_us: percentile(&v, 0.99),
            max_us: self.max_ns as f64 / 1e3,
        }
    }
}

/// Nearest-rank percentile of sorted nanoseconds, in microseconds.
pub fn percentile(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_bounded_and_percentiles_are_nearest_rank() {
        let mut w = LatencyWindow::new();
        for us in 1..=100u64 {
            w.record(Duration::from_micros(us));
        }
        let p = w.percentiles();
        assert_eq!((p.p50_us, p.p99_us, p.max_us), (50.0, 99.0, 100.0));
        for _ in 0..2 * WINDOW {
            w.record(Duration::from_micros(7));
        }
        let p = w.percentiles();
        assert_eq!(p.window, WINDOW);
        assert_eq!(p.count, 100 + 2 * WINDOW as u64);
        assert_eq!((p.p50_us, p.p99_us), (7.0, 7.0));
        assert_eq!(p.max_us, 100.0, "max is since start");
        assert_eq!(LatencyWindow::new().percentiles().p99_us, 0.0);
    }
}
