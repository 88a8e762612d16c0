//! The load controller: multiplicative decrease while a backend queues,
//! gentle additive increase while it does not (the AIMD of TCP congestion
//! control, for the same reason: it finds the share a backend can serve
//! without knowing its capacity, and backs off fast when it overshoots).
//!
//! Per good scrape, with `q = min(1, waiting / queue_high)` and, when the
//! profile has a KV metric and `kv >= kv_high`,
//! `k = 0.25 + 0.75 * (kv - kv_high) / (1 - kv_high)` (else 0):
//!
//! - pressure `p = max(q, k)`, and at least [`MIN_PRESSURE`] when a whole
//!   request waits;
//! - `p > 0`: `factor *= 1 - DECREASE * p` (halved at `queue_high`);
//! - `p = 0`: `factor += INCREASE` (from the floor back to 1 in under 20
//!   scrapes);
//! - always within `[min_factor, 1]`.
//!
//! A backend at half the capacity of its peers queues under an equal share
//! of a load its peers would serve; its factor falls until its share fits
//! its capacity, then saws gently just under that point, its queue near
//! zero, while its peers (never queueing) stay at 1. The factor is
//! relative: equally loaded backends all fall alike and their shares do
//! not change.

use super::Figures;
use crate::config::LoadScrape;

/// Share of the factor cut per scrape at full pressure.
pub const DECREASE: f64 = 0.5;
/// Added per scrape without pressure.
pub const INCREASE: f64 = 0.05;
/// Least pressure of one whole waiting request: a queue, however short
/// against `queue_high`, means the backend already gets more than it
/// serves.
pub const MIN_PRESSURE: f64 = 0.2;
/// Least pressure past `kv_high`.
const KV_PRESSURE: f64 = 0.25;

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

/// One backend's controller: its target factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Controller {
    factor: f64,
}

impl Default for Controller {
    fn default() -> Self {
        Self { factor: 1.0 }
    }
}

impl Controller {
    /// The target factor, in `[min_factor, 1]`.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// One good scrape; returns the new target.
    pub fn update(&mut self, f: &Figures, p: &Params) -> f64 {
        let pressure = pressure(f, p);
        let next = if pressure > 0.0 {
            self.factor * (1.0 - DECREASE * pressure)
        } else {
            self.factor + INCREASE
        };
        self.factor = next.clamp(p.min_factor.clamp(f64::EPSILON, 1.0), 1.0);
        self.factor
    }

    /// Back to 1: no load known (probe-only health).
    pub fn reset(&mut self) {
        self.factor = 1.0;
    }
}

#[cfg(test)]
mod tests;
