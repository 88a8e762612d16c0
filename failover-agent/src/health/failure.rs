//! What a failed probe says about a backend: gone, or there but failing.
//!
//! Every failed probe carries a typed [`Failure`], set where the failure
//! is seen (a connect error's errno, a timeout's phase, a bad answer),
//! never guessed from the message text. Its [`DownCause`] decides what
//! happens to the flows of a backend that goes down (`agent::grace`):
//!
//! | failure | seen when | cause |
//! |---|---|---|
//! | `refused` | RST to the SYN; ICMP port unreachable to a UDP probe | dead |
//! | `unreachable` | no route, host or network unreachable (link down) | dead |
//! | `unanswered` | the TCP handshake (or a UDP probe's datagram) got no answer in time | dead |
//! | `timeout` | connected, but no complete answer in time | sick |
//! | `bad_answer` | answered, not healthy: HTTP status, body, gRPC `NOT_SERVING`, model missing, UDP reply | sick |
//! | `broken` | the connection failed after it was established: reset, closed early, TLS, protocol | sick |
//! | `local` | the agent's own trouble (no socket, fd limit): says nothing about the backend | sick |
//!
//! The rule behind the table: a backend whose handshake completes is alive,
//! and its streams in progress may still finish; one whose handshake fails
//! is gone, and so are its flows. Passive handshake ejections are dead
//! (SYNs refused or unanswered); a wedge, confirmed by a failed
//! generation, is sick ([`super::Ejection::failure`]).

use std::fmt;
use std::io;

use serde::Serialize;

/// The class of a failed probe (see the module doc).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Failure {
    Refused,
    Unreachable,
    Unanswered,
    Timeout,
    BadAnswer,
    Broken,
    Local,
}

/// Why a backend left service, which decides what happens to its flows.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum DownCause {
    /// Nothing answers: its flows are dead too. `DOWN` at once.
    Dead,
    /// Slow or failing, but it answers: its streams in progress get
    /// `policy.slow_grace` to finish (`DRAINING`), then `DOWN`.
    Sick,
}

impl Failure {
    /// What this failure says about the backend. Exhaustive: a new class
    /// cannot silently take a default.
    pub fn cause(self) -> DownCause {
        match self {
            Failure::Refused | Failure::Unreachable | Failure::Unanswered => DownCause::Dead,
            Failure::Timeout | Failure::BadAnswer | Failure::Broken | Failure::Local => {
                DownCause::Sick
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// A failed `connect` (TCP) or `send`/`recv` on a connected UDP socket.
    pub fn of_io(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Failure::Refused,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ENETDOWN | libc::EHOSTDOWN) => {
                Failure::Unreachable
            }
            Some(libc::ETIMEDOUT) => Failure::Unanswered,
            Some(libc::ECONNRESET | libc::ECONNABORTED | libc::EPIPE) => Failure::Broken,
            _ => Failure::Local,
        }
    }
}

/// A failed probe step: its class and what happened, for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fault {
    pub failure: Failure,
    pub reason: String,
}

impl Fault {
    pub fn new(failure: Failure, reason: impl Into<String>) -> Self {
        Self {
            failure,
            reason: reason.into(),
        }
    }

    /// The same fault with `prefix: ` in front of its text.
    pub fn context(self, prefix: impl fmt::Display) -> Self {
        Self {
            failure: self.failure,
            reason: format!("{prefix}: {}", self.reason),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Why a backend's health changed: the evidence as text, and, for a fall,
/// its class. `From<&str>`/`From<String>` give an unclassified reason
/// (drills, tests), which [`Reason::down_cause`] takes as dead: down at
/// once, as before classes existed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    text: String,
    failure: Option<Failure>,
}

impl Reason {
    pub fn new(text: impl Into<String>, failure: Option<Failure>) -> Self {
        Self {
            text: text.into(),
            failure,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The class of the failure behind a fall; `None` for recoveries and
    /// unclassified reasons.
    pub fn failure(&self) -> Option<Failure> {
        self.failure
    }

    /// What a fall for this reason means for the backend's flows.
    pub fn down_cause(&self) -> DownCause {
        self.failure.map_or(DownCause::Dead, Failure::cause)
    }
}

impl From<&str> for Reason {
    fn from(text: &str) -> Self {
        Self::new(text, None)
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        Self::new(text, None)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_are_classified_by_errno() {
        let e = io::Error::from_raw_os_error;
        let cases = [
            (libc::ECONNREFUSED, Failure::Refused, DownCause::Dead),
            (libc::EHOSTUNREACH, Failure::Unreachable, DownCause::Dead),
            (libc::ENETUNREACH, Failure::Unreachable, DownCause::Dead),
            (libc::ENETDOWN, Failure::Unreachable, DownCause::Dead),
            (libc::ETIMEDOUT, Failure::Unanswered, DownCause::Dead),
            (libc::ECONNRESET, Failure::Broken, DownCause::Sick),
            (libc::EMFILE, Failure::Local, DownCause::Sick),
            (libc::EADDRNOTAVAIL, Failure::Local, DownCause::Sick),
        ];
        for (errno, failure, cause) in cases {
            let got = Failure::of_io(&e(errno));
            assert_eq!((got, got.cause()), (failure, cause), "errno {errno}");
        }
        // Not from the OS at all: the agent's own business.
        assert_eq!(Failure::of_io(&io::Error::other("x")), Failure::Local);
    }

    #[test]
    fn names_are_the_serialized_ones() {
        use Failure::*;
        for f in [
            Refused,
            Unreachable,
            Unanswered,
            Timeout,
            BadAnswer,
            Broken,
            Local,
        ] {
            assert_eq!(serde_json::to_value(f).unwrap(), f.as_str());
            assert_eq!(f.to_string(), f.as_str());
        }
        assert_eq!(Failure::BadAnswer.as_str(), "bad_answer");
        for c in [DownCause::Dead, DownCause::Sick] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.to_string());
        }
    }

    #[test]
    fn unclassified_reasons_are_dead() {
        assert_eq!(
            Reason::from("drill: marked down").down_cause(),
            DownCause::Dead
        );
        let slow = Reason::new("2 consecutive failures: timeout", Some(Failure::Timeout));
        assert_eq!(slow.down_cause(), DownCause::Sick);
        assert_eq!(slow, "2 consecutive failures: timeout");
        assert_eq!(slow.to_string(), "2 consecutive failures: timeout");
    }
}
