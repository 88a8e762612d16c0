//! A backend's states as typed values, and their one spelling.
//!
//! Two states describe a backend: the probe verdict ([`HealthState`],
//! from [`crate::health`]) and its entry in the data plane's `BACKENDS`
//! map ([`DataplaneState`]). Each is spelled once, by its derives (serde
//! for the API's JSON, strum for the metrics' labels and the CLI, the same
//! lowercase words); the API carries the typed values, and nothing else
//! turns a state into a string.

use failover_common::state;
use serde::{Deserialize, Serialize};

pub use crate::health::HealthState;

/// Every probe verdict, in the order the metrics list them.
pub const HEALTH_STATES: [HealthState; 4] = [
    HealthState::Up,
    HealthState::Degraded,
    HealthState::Down,
    HealthState::Unknown,
];

/// A backend's state in `BACKENDS` (`failover_common::state`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum DataplaneState {
    /// Takes new and existing flows.
    Up,
    /// Existing flows continue; never selected for new ones.
    Draining,
    /// Existing flows are reset or moved; never selected.
    Down,
    /// The id is not in use.
    #[default]
    Unused,
}

impl DataplaneState {
    /// Every state, in the order the metrics list them.
    pub const ALL: [Self; 4] = [Self::Up, Self::Draining, Self::Down, Self::Unused];

    /// The state of a raw `BACKENDS` value; an unknown value reads as
    /// unused, as the XDP program treats it (never selected).
    pub fn from_raw(raw: u8) -> Self {
        match raw {
            state::UP => Self::Up,
            state::DOWN => Self::Down,
            state::DRAINING => Self::Draining,
            _ => Self::Unused,
        }
    }

    /// The value written into `BACKENDS`.
    pub fn raw(self) -> u8 {
        match self {
            Self::Up => state::UP,
            Self::Down => state::DOWN,
            Self::Draining => state::DRAINING,
            Self::Unused => state::UNUSED,
        }
    }

    /// Takes flows (new ones when up, existing ones when draining).
    pub fn is_serving(self) -> bool {
        matches!(self, Self::Up | Self::Draining)
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_the_map_value_and_their_name() {
        for s in DataplaneState::ALL {
            assert_eq!(DataplaneState::from_raw(s.raw()), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<DataplaneState>(&json).unwrap(), s);
        }
        let names: Vec<&str> = DataplaneState::ALL.iter().map(|d| d.as_str()).collect();
        assert_eq!(names, ["up", "draining", "down", "unused"]);
        assert_eq!(DataplaneState::from_raw(200), DataplaneState::Unused);
        let names: Vec<&str> = HEALTH_STATES.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, ["up", "degraded", "down", "unknown"]);
        for h in HEALTH_STATES {
            let json = serde_json::to_string(&h).unwrap();
            assert_eq!(json, format!("\"{h}\""));
            assert_eq!(serde_json::from_str::<HealthState>(&json).unwrap(), h);
        }
    }
}
