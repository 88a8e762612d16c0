//! Weights from model-server load: a backend's own Prometheus metrics
//! (requests waiting, running, KV-cache fill) turned into a factor on its
//! weight, so a backend with less capacity than its peers gets fewer new
//! flows before its queue grows.
//!
//! - [`parse`]: exposition text -> [`Figures`], under a profile's metric
//!   names, refusing anything it cannot trust ([`Refusal`]);
//! - [`factor`]: the controller, a pure function of the figures;
//! - [`tracker`]: the one owner of every backend's load state (figures,
//!   controller, applied factor) and of the churn bounds: hysteresis
//!   (`min_change`), one rebuild per service per `rebuild_interval`, and
//!   the fallback to probe-only health when the metrics go missing.
//!
//! The scrape itself (HTTP, caps) is `health::load`. Refused input never
//! changes a weight: it is counted
//! (`failover_load_scrape_errors_total{backend,reason}`), logged when the
//! reason changes, and only the lack of a good scrape for
//! [`crate::config::LoadScrape::stale_after`] sets the factor back to 1.
//! A load factor never takes a backend out of a ring, and never moves a
//! pinned flow: rings only place new flows.

pub mod factor;
pub mod parse;
pub mod tracker;

pub use factor::Controller;
pub use parse::parse;
pub use tracker::{Change, Tracker};

use serde::{Deserialize, Serialize};

/// What one good scrape said. Several series of a name add up (engines of
/// one server); the KV fill is the fullest series'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests queued, not yet running.
    pub waiting: f64,
    /// Requests running, when the profile has the metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    /// KV-cache fill (0..=1), when the profile has the metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<f64>,
}

/// Why a scrape was refused (the `reason` label of
/// `failover_load_scrape_errors_total`). None changes a weight.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Connect, TLS or a broken answer.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// Not answered within the probe's timeout.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Not a 2xx.
    #[error("answered HTTP {0}")]
    Status(u16),
    /// Over [`parse::MAX_BODY`]: not read further.
    #[error("body over {} bytes", parse::MAX_BODY)]
    TooLarge,
    /// Over [`parse::MAX_SAMPLES`] sample lines.
    #[error("over {} samples", parse::MAX_SAMPLES)]
    TooManySamples,
    /// Not UTF-8, or not Prometheus text.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A metric the profile reads is absent.
    #[error("metric {0} missing")]
    Missing(String),
    /// A metric is not a gauge (or untyped).
    #[error("metric {name} is a {kind}, not a gauge")]
    WrongType { name: String, kind: String },
    /// NaN, infinite, negative, or past what any server reports.
    #[error("metric {name} has value {value}: {why}")]
    BadValue {
        name: String,
        value: String,
        why: &'static str,
    },
}

impl Refusal {
    /// The metric label: one word per kind of refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Timeout(_) => "timeout",
            Self::Status(_) => "status",
            Self::TooLarge => "too_large",
            Self::TooManySamples => "too_many_samples",
            Self::Malformed(_) => "malformed",
            Self::Missing(_) => "missing_metric",
            Self::WrongType { .. } => "wrong_type",
            Self::BadValue { .. } => "bad_value",
        }
    }

    /// Every reason, for tests and dashboards.
    pub const REASONS: [&'static str; 9] = [
        "unreachable",
        "timeout",
        "status",
        "too_large",
        "too_many_samples",
        "malformed",
        "missing_metric",
        "wrong_type",
        "bad_value",
    ];
}
