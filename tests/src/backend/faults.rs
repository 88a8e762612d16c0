//! Runtime-switchable faults, shared between the HTTP and gRPC servers.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One fault mode; the servers read it per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Serve normally.
    #[default]
    None,
    /// Accept the connection, never answer (admin endpoints still answer).
    Hang,
    /// Delay this long before the first byte of a `/v1/*` answer.
    Slow(Duration),
    /// `429` with `Retry-After` on `/v1/chat/completions`; health stays 200.
    TooManyRequests,
    /// `/health` answers 503 and gRPC health says `NOT_SERVING`; inference still works.
    Unhealthy,
    /// A hung engine: connections and requests are accepted, `/health` and
    /// `/v1/models` answer 200, and a chat completion never generates (no
    /// byte of its answer) until the fault is cleared.
    Wedge,
}

/// Shared fault switch: cheap to clone, every clone sees every `set`.
#[derive(Clone, Debug)]
pub struct Faults(Arc<watch::Sender<Fault>>);

impl Faults {
    pub fn new(initial: Fault) -> Self {
        Self(Arc::new(watch::Sender::new(initial)))
    }

    pub fn set(&self, fault: Fault) {
        self.0.send_replace(fault);
    }

    pub fn get(&self) -> Fault {
        *self.0.borrow()
    }

    /// A receiver that wakes on every change (used by gRPC Watch and by hangs).
    pub fn subscribe(&self) -> watch::Receiver<Fault> {
        self.0.subscribe()
    }

    /// Returns once the fault is no longer [`Fault::Hang`]; never returns while it is.
    pub async fn wait_while_hang(&self) {
        self.wait_while(Fault::Hang).await;
    }

    /// Returns once the fault is no longer `fault`; never returns while it is.
    pub async fn wait_while(&self, fault: Fault) {
        let mut rx = self.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we wait.
        let _ = rx.wait_for(|f| *f != fault).await;
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self::new(Fault::None)
    }
}

/// Body of `POST /admin/fault`, e.g. `{"fault":"slow","delay_ms":500}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum FaultRequest {
    None,
    Hang,
    Slow {
        delay_ms: u64,
    },
    TooManyRequests,
    Unhealthy,
    Wedge,
    /// Not a state: the process exits (binary) or the server stops (library).
    Crash,
}

impl FaultRequest {
    /// The state to set, or `None` for [`FaultRequest::Crash`].
    pub fn to_fault(self) -> Option<Fault> {
        Some(match self {
            FaultRequest::None => Fault::None,
            FaultRequest::Hang => Fault::Hang,
            FaultRequest::Slow { delay_ms } => Fault::Slow(Duration::from_millis(delay_ms)),
            FaultRequest::TooManyRequests => Fault::TooManyRequests,
            FaultRequest::Unhealthy => Fault::Unhealthy,
            FaultRequest::Wedge => Fault::Wedge,
            FaultRequest::Crash => return None,
        })
    }
}

impl From<Fault> for FaultRequest {
    fn from(f: Fault) -> Self {
        match f {
            Fault::None => FaultRequest::None,
            Fault::Hang => FaultRequest::Hang,
            Fault::Slow(d) => FaultRequest::Slow {
                delay_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            },
            Fault::TooManyRequests => FaultRequest::TooManyRequests,
            Fault::Unhealthy => FaultRequest::Unhealthy,
            Fault::Wedge => FaultRequest::Wedge,
        }
    }
}

/// `none`, `hang`, `slow:MS`, `too_many_requests` (or `429`), `unhealthy`,
/// `wedge`.
impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(ms) = s.strip_prefix("slow:").or_else(|| s.strip_prefix("slow=")) {
            let ms = ms.trim_end_matches("ms");
            return ms
                .parse::<u64>()
                .map(|ms| Fault::Slow(Duration::from_millis(ms)))
                .map_err(|e| format!("bad slow delay {ms:?}: {e}"));
        }
        match s {
            "none" => Ok(Fault::None),
            "hang" => Ok(Fault::Hang),
            "slow" => Err("slow needs a delay: slow:MS".to_string()),
            "too_many_requests" | "429" => Ok(Fault::TooManyRequests),
            "unhealthy" => Ok(Fault::Unhealthy),
            "wedge" => Ok(Fault::Wedge),
            other => Err(format!(
                "unknown fault {other:?} (none, hang, slow:MS, too_many_requests, unhealthy, wedge)"
            )),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => f.write_str("none"),
            Fault::Hang => f.write_str("hang"),
            Fault::Slow(d) => write!(f, "slow:{}", d.as_millis()),
            Fault::TooManyRequests => f.write_str("too_many_requests"),
            Fault::Unhealthy => f.write_str("unhealthy"),
            Fault::Wedge => f.write_str("wedge"),
        }
    }
}
