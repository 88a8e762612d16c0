//! A probe's load facet (`probe.load`): where a backend's model server
//! exports its Prometheus metrics, which ones say how loaded it is, and
//! how fast the weight may follow them (see `crate::load`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `probe.load`: scrape the backend's own metrics and scale its weight by
/// its load. Any probe kind may carry it; the port is the backend's.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadScrape {
    /// Whose metric names and default thresholds.
    pub profile: LoadProfile,
    /// Path of the metrics (`GET`), over TLS when the probe kind has `tls`.
    #[serde(default = "default_path")]
    pub path: String,
    /// Time between scrapes.
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    /// Relative change of the load factor needed before a weight is
    /// rewritten (hysteresis): 0.1 = 10%.
    #[serde(default = "default_min_change")]
    pub min_change: f64,
    /// At most one ring rebuild per service per this, for load changes.
    #[serde(with = "humantime_serde", default = "default_rebuild_interval")]
    pub rebuild_interval: Duration,
    /// The metric names of a `custom` profile (only there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<LoadMetrics>,
    /// Waiting requests at which the factor falls fastest (halves per
    /// scrape); unset: the profile's ([`LoadProfile::queue_high`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_high: Option<f64>,
    /// KV-cache fill (0..1) above which the factor falls; unset: the
    /// profile's ([`LoadProfile::kv_high`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_high: Option<f64>,
    /// The lowest load factor: a loaded backend keeps this share of its
    /// weight, so it keeps being measured with real traffic.
    #[serde(default = "default_min_factor")]
    pub min_factor: f64,
}

/// The metric names a `custom` profile reads. Each is a gauge; several
/// series of one name (engines, models) add up, the KV fill's take the
/// highest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoadMetrics {
    /// Requests queued, not yet running (required).
    pub waiting: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// KV-cache fill, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<String>,
}

/// A model server whose metric names are known.
#[derive(
    Clone,
    Copy,
    Debug,
    Deserialize,
    Serialize,
    PartialEq,
    Eq,
    strum::IntoStaticStr,
    strum::Display,
    strum::EnumIter,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum LoadProfile {
    Vllm,
    Sglang,
    Tgi,
    Triton,
    /// `metrics` names them, `queue_high` (and `kv_high` with a KV metric)
    /// are required.
    Custom,
}

/// The names a profile reads: (waiting, running, kv).
pub struct ProfileNames<'a> {
    pub waiting: &'a str,
    pub running: Option<&'a str>,
    pub kv: Option<&'a str>,
}

impl LoadProfile {
    /// The built-in names; `None` for `custom`.
    pub fn names(self) -> Option<ProfileNames<'static>> {
        let (waiting, running, kv) = match self {
            Self::Vllm => (
                "vllm:num_requests_waiting",
                Some("vllm:num_requests_running"),
                Some("vllm:kv_cache_usage_perc"),
            ),
            Self::Sglang => (
                "sglang:num_queue_reqs",
                Some("sglang:num_running_reqs"),
                Some("sglang:token_usage"),
            ),
            Self::Tgi => ("tgi_queue_size", Some("tgi_batch_current_size"), None),
            Self::Triton => ("nv_inference_pending_request_count", None, None),
            Self::Custom => return None,
        };
        Some(ProfileNames {
            waiting,
            running,
            kv,
        })
    }

    /// Default `queue_high`: a few requests waiting already costs each of
    /// them a whole prefill slot of time to first token.
    pub fn queue_high(self) -> Option<f64> {
        (self != Self::Custom).then_some(8.0)
    }

    /// Default `kv_high`, for profiles with a KV metric: past it the
    /// engine starts to preempt running requests.
    pub fn kv_high(self) -> Option<f64> {
        matches!(self, Self::Vllm | Self::Sglang).then_some(0.9)
    }
}

impl LoadScrape {
    /// The names this facet reads: the profile's, or `metrics` for custom.
    pub fn names(&self) -> Option<ProfileNames<'_>> {
        self.profile.names().or_else(|| {
            self.metrics.as_ref().map(|m| ProfileNames {
                waiting: &m.waiting,
                running: m.running.as_deref(),
                kv: m.kv.as_deref(),
            })
        })
    }

    /// `queue_high`, or the profile's default (validation makes one exist).
    pub fn queue_high(&self) -> f64 {
        self.queue_high
            .or(self.profile.queue_high())
            .unwrap_or(DEFAULT_QUEUE_HIGH)
    }

    /// `kv_high`, or the profile's default.
    pub fn kv_high(&self) -> f64 {
        self.kv_high
            .or(self.profile.kv_high())
            .unwrap_or(DEFAULT_KV_HIGH)
    }

    /// How long without a good scrape before the backend falls back to
    /// probe-only health (factor 1): three scrapes missed.
    pub fn stale_after(&self) -> Duration {
        self.interval.saturating_mul(3)
    }

    /// A facet of `profile` with every default.
    pub fn new(profile: LoadProfile) -> Self {
        Self {
            profile,
            path: default_path(),
            interval: default_interval(),
            min_change: default_min_change(),
            rebuild_interval: default_rebuild_interval(),
            metrics: None,
            queue_high: None,
            kv_high: None,
            min_factor: default_min_factor(),
        }
    }
}

/// Fallbacks for a custom profile's thresholds; validation requires them,
/// so these only serve a config built in code.
const DEFAULT_QUEUE_HIGH: f64 = 8.0;
const DEFAULT_KV_HIGH: f64 = 0.9;

fn default_path() -> String {
    "/metrics".to_owned()
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_min_change() -> f64 {
    0.1
}
fn default_rebuild_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_min_factor() -> f64 {
    0.1
}
