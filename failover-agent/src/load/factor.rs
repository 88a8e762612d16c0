//! The load controller: multiplicative decrease while a backend queues,
//! gentle additive increase while it does not (the AIMD of TCP congestion
//! control, for the same reason: it finds the share a backend can serve
//! without knowing its capacity, and backs off fast when it overshoots).
//!
//! A scrape is a snapshot: a backend serving well below its capacity
//! still shows a full batch or a short queue now and then. So the inputs
//! are smoothed first, `w = EWMA(waiting)` and `kv = EWMA(kv fill)` with
//! weight [`SMOOTHING`] on the new scrape. Then, with
//! `q = min(1, w / queue_high)` (at least [`MIN_PRESSURE`] once `w >= 1`,
//! a whole request waiting on average) and, when the profile has a KV
//! metric and `kv >= kv_high`, `k = 0.25 + 0.75 * (kv - kv_high) / (1 -
//! kv_high)` (else 0):
//!
//! - pressure `p = max(q, k)`;
//! - `p > DEADBAND`: `factor *= 1 - DECREASE * p` (-15% a scrape at
//!   `queue_high`);
//! - else: `factor += INCREASE` (from the floor back to 1 in 90 scrapes);
//! - always within `[min_factor, 1]`.
//!
//! A backend at half the capacity of its peers queues under an equal share
//! of a load its peers would serve; its factor falls until its share fits
//! its capacity, then saws gently just under that point, its queue near
//! zero, while its peers stay near 1. The factor is relative: the tracker
//! scales a service's factors so that its highest is 1
//! (`super::tracker`), so when every backend is loaded (the service
//! itself is over capacity) their shares follow their measured
//! capacities instead of all sinking to the floor.

use super::Figures;
use crate::config::LoadScrape;

/// Share of the factor cut per scrape at full pressure. Small steps, as
/// the increase: every step past a backend's share queues requests
/// (`bench load`: with 0.5 and 0.05, p50 time to first token 243 ms and
/// p99 2,052 ms; with 0.15 and 0.01, 111 and 623 ms).
pub const DECREASE: f64 = 0.15;
/// Added per scrape without pressure.
pub const INCREASE: f64 = 0.01;
/// Least pressure of one whole waiting request: a queue, however short
/// against `queue_high`, means the backend already gets more than it
/// serves.
pub const MIN_PRESSURE: f64 = 0.1;
/// Least pressure past `kv_high`.
const KV_PRESSURE: f64 = 0.25;
/// Weight of a new scrape in the smoothed figures.
pub const SMOOTHING: f64 = 0.3;
/// Pressure below this is noise: the factor grows.
pub const DEADBAND: f64 = 0.05;

/// The thresholds of one backend's facet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub queue_high: f64,
    pub kv_high: f64,
    pub min_factor: f64,
}

impl Params {
    pub fn of(load: &LoadScrape) -> Self {
        Self {
            queue_high: load.queue_high(),
            kv_high: load.kv_high(),
            min_factor: load.min_factor,
        }
    }
}

/// How loaded a backend is, 0..=1 (see the module doc).
pub fn pressure(f: &Figures, p: &Params) -> f64 {
    let mut q = (f.waiting / p.queue_high.max(1.0)).min(1.0);
    if f.waiting >= 1.0 {
        q = q.max(MIN_PRESSURE);
    }
    let k = match f.kv {
        Some(kv) if kv >= p.kv_high => {
            let room = (1.0 - p.kv_high).max(f64::EPSILON);
            (KV_PRESSURE + (1.0 - KV_PRESSURE) * (kv - p.kv_high) / room).min(1.0)
        }
        _ => 0.0,
    };
    q.max(k)
}

/// One backend's controller: its target factor and smoothed figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Controller {
    factor: f64,
    /// Smoothed figures; none before the first scrape.
    smooth: Option<Figures>,
}

impl Default for Controller {
    fn default() -> Self {
        Self {
            factor: 1.0,
            smooth: None,
        }
    }
}

/// `new` blended into `old` with weight [`SMOOTHING`].
fn blend(old: &Figures, new: &Figures) -> Figures {
    let mix = |o: f64, n: f64| o + SMOOTHING * (n - o);
    Figures {
        waiting: mix(old.waiting, new.waiting),
        running: new.running.map(|n| old.running.map_or(n, |o| mix(o, n))),
        kv: new.kv.map(|n| old.kv.map_or(n, |o| mix(o, n))),
    }
}

impl Controller {
    /// The target factor, in `[min_factor, 1]`.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// One good scrape; returns the new target.
    pub fn update(&mut self, f: &Figures, p: &Params) -> f64 {
        let smooth = self.smooth.map_or(*f, |old| blend(&old, f));
        self.smooth = Some(smooth);
        let pressure = pressure(&smooth, p);
        let next = if pressure > DEADBAND {
            self.factor * (1.0 - DECREASE * pressure)
        } else {
            self.factor + INCREASE
        };
        self.factor = next;
        self.clamp(p);
        self.factor
    }

    /// Scales the target by `by` (the tracker's normalisation), within
    /// `[min_factor, 1]`.
    pub fn scale(&mut self, by: f64, p: &Params) {
        self.factor *= by;
        self.clamp(p);
    }

    fn clamp(&mut self, p: &Params) {
        self.factor = self
            .factor
            .clamp(p.min_factor.clamp(f64::EPSILON, 1.0), 1.0);
    }

    /// Back to 1, nothing smoothed: no load known (probe-only health).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests;
