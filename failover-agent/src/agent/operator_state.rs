//! Operator decisions that must outlive the agent process: drained
//! backends, and manual overrides with their expiry.
//!
//! [`OperatorState`] is the one owner of both (the applier holds it and
//! plans from it); an override and its expiry are one value
//! ([`TimedOverride`]), and an expiry is both a monotonic instant, for the
//! control loop's timers, and a wall-clock time, which is what survives a
//! restart ([`Deadline`]).
//!
//! The state file (`node.state_file`) is JSON, rewritten whole after every
//! change: written to a temporary file in the same directory, synced,
//! renamed over the old one, and the directory synced, so a crash leaves
//! the old file or the new one, never half of either. No operator state
//! means no file: the last undrain or expiry removes it. A new agent
//! reads it before its first plan ([`restore`]), so a drained backend
//! never takes a flow in between; entries that no longer fit the config
//! (unknown names, a tier the policy now forbids) and overrides that
//! expired meanwhile are dropped, logged and audited.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    planner::{self, Override, Overrides},
};

/// Version of the state file's format.
const VERSION: u32 = 1;

/// A moment as the agent's monotonic clock and as wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    wall: SystemTime,
}

impl Deadline {
    /// `after` from now.
    pub fn after(now: Instant, wall_now: SystemTime, after: Duration) -> Self {
        Self {
            at: now + after,
            wall: wall_now + after,
        }
    }

    /// The deadline at wall-clock `wall`, seen at (`now`, `wall_now`);
    /// `None` when it has passed.
    pub fn at_wall(wall: SystemTime, now: Instant, wall_now: SystemTime) -> Option<Self> {
        let left = wall
            .duration_since(wall_now)
            .ok()
            .filter(|d| !d.is_zero())?;
        Some(Self {
            at: now + left,
            wall,
        })
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    pub fn wall(&self) -> SystemTime {
        self.wall
    }

    pub fn remaining(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }
}

/// A manual override and when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOverride {
    pub ov: Override,
    pub until: Deadline,
}

/// Drains and overrides (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorState {
    drains: BTreeSet<String>,
    overrides: BTreeMap<String, TimedOverride>,
}

impl OperatorState {
    pub fn is_empty(&self) -> bool {
        self.drains.is_empty() && self.overrides.is_empty()
    }

    pub fn is_drained(&self, backend: &str) -> bool {
        self.drains.contains(backend)
    }

    pub fn drained(&self) -> impl Iterator<Item = &str> {
        self.drains.iter().map(String::as_str)
    }

    /// Drains or undrains; returns whether that changed anything.
    pub fn set_drain(&mut self, backend: &str, on: bool) -> bool {
        if on {
            self.drains.insert(backend.to_owned())
        } else {
            self.drains.remove(backend)
        }
    }

    pub fn override_of(&self, service: &str) -> Option<&TimedOverride> {
        self.overrides.get(service)
    }

    pub fn overrides_iter(&self) -> impl Iterator<Item = (&str, &TimedOverride)> {
        self.overrides.iter().map(|(s, o)| (s.as_str(), o))
    }

    /// Sets (or replaces, with its new expiry) `service`'s override;
    /// returns whether the tier changed (an apply is then due).
    pub fn set_override(&mut self, service: &str, ov: Override, until: Deadline) -> bool {
        let old = self
            .overrides
            .insert(service.to_owned(), TimedOverride { ov, until });
        old.is_none_or(|o| o.ov != ov)
    }

    /// Returns whether there was one.
    pub fn clear_override(&mut self, service: &str) -> bool {
        self.overrides.remove(service).is_some()
    }

    /// The planner's input.
    pub fn overrides(&self) -> Overrides {
        self.overrides
            .iter()
            .map(|(s, o)| (s.clone(), o.ov))
            .collect()
    }

    /// When the next override ends.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.overrides.values().map(|o| o.until.at()).min()
    }

    /// Services whose override has ended by `now` (still set: the caller
    /// clears each, with its reason).
    pub fn expired(&self, now: Instant) -> Vec<String> {
        self.overrides
            .iter()
            .filter(|(_, o)| o.until.at() <= now)
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Drops entries naming backends or services `cfg` no longer has, and
    /// overrides its policies now forbid; returns why each went.
    pub fn retain_valid(&mut self, cfg: &Config) -> Vec<String> {
        let mut dropped = Vec::new();
        self.drains.retain(|b| {
            let keep = cfg.backend(b).is_some();
            if !keep {
                dropped.push(format!("drain of {b}: no such backend"));
            }
            keep
        });
        self.overrides
            .retain(|s, o| match planner::check_override(cfg, s, o.ov) {
                Ok(()) => true,
                Err(e) => {
                    dropped.push(format!("override of {s} to tier {}: {e}", o.ov.to_tier));
                    false
                }
            });
        dropped
    }

    /// One line for logs and the audit log.
    pub fn describe(&self, now: Instant) -> String {
        let drains: Vec<&str> = self.drained().collect();
        let overrides: Vec<String> = self
            .overrides
            .iter()
            .map(|(s, o)| {
                format!(
                    "{s} to tier {} for {}",
                    o.ov.to_tier,
                    humantime::format_duration(Duration::from_secs(
                        (o.until.remaining(now) + Duration::from_millis(500)).as_secs()
                    ))
                )
            })
            .collect();
        format!(
            "drained [{}]; overrides [{}]",
            drains.join(", "),
            overrides.join(", ")
        )
    }
}

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// When it was written (RFC 3339, UTC), for people.
    written: String,
    drains: Vec<String>,
    overrides: Vec<FileOverride>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOverride {
    service: String,
    tier: u8,
    /// RFC 3339, UTC.
    until: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a state file: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: state file version {found}, this agent reads {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{}: override of {service}: bad time {until:?}", path.display())]
    Time {
        path: PathBuf,
        service: String,
        until: String,
    },
}

/// Writes `state` to `path` atomically, or removes the file when the
/// state is empty.
pub fn save(path: &Path, state: &OperatorState) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    if state.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        };
    }
    let file = StateFile {
        version: VERSION,
        written: crate::audit::now(),
        drains: state.drains.iter().cloned().collect(),
        overrides: state
            .overrides
            .iter()
            .map(|(s, o)| FileOverride {
                service: s.clone(),
                tier: o.ov.to_tier,
                until: humantime::format_rfc3339_millis(o.until.wall()).to_string(),
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(|e| io(std::io::Error::other(e)))?;
    text.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// What a state file held, read at (`now`, `wall_now`).
#[derive(Debug, Default)]
pub struct Loaded {
    pub state: OperatorState,
    /// Entries not restored, and why (expired while the agent was away).
    pub dropped: Vec<String>,
}

/// Reads `path`; `Ok(None)` when there is no file.
pub fn load(path: &Path, now: Instant, wall_now: SystemTime) -> Result<Option<Loaded>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: StateFile = serde_json::from_slice(&text).map_err(|source| StateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if file.version != VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: file.version,
        });
    }
    let mut out = Loaded::default();
    for b in file.drains {
        out.state.drains.insert(b);
    }
    for o in file.overrides {
        let wall = humantime::parse_rfc3339(&o.until).map_err(|_| StateError::Time {
            path: path.to_owned(),
            service: o.service.clone(),
            until: o.until.clone(),
        })?;
        match Deadline::at_wall(wall, now, wall_now) {
            Some(until) => {
                out.state.overrides.insert(
                    o.service,
                    TimedOverride {
                        ov: Override { to_tier: o.tier },
                        until,
                    },
                );
            }
            None => out.dropped.push(format!(
                "override of {} to tier {}: expired at {}",
                o.service, o.tier, o.until
            )),
        }
    }
    Ok(Some(out))
}

/// The operator state a starting agent begins with: what `path` holds,
/// fitted to `cfg` (see [`OperatorState::retain_valid`]), with every
/// entry left out named. A file that cannot be read is reported and
/// nothing is restored: the agent still starts.
pub fn restore(
    path: &Path,
    cfg: &Config,
    now: Instant,
    wall_now: SystemTime,
) -> Result<Option<Loaded>, StateError> {
    let Some(mut loaded) = load(path, now, wall_now)? else {
        return Ok(None);
    };
    let dropped = loaded.state.retain_valid(cfg);
    loaded.dropped.extend(dropped);
    Ok(Some(loaded))
}

/// [`restore`] at agent start, logged and audited: what was restored,
/// what was dropped and why. A file that cannot be read is logged as an
/// error and nothing is restored (the agent still starts: the data plane
/// matters more); the next change rewrites it.
pub fn restore_logged(
    path: &Path,
    cfg: &Config,
    journal: Option<&super::Journal>,
) -> OperatorState {
    let now = Instant::now();
    let audit = |reason: String, check: &str| {
        if let Some(j) = journal {
            let mut r = crate::audit::DecisionRecord::new("*", 0);
            r.reason = reason;
            r.policy_check = check.to_owned();
            j.record(r);
        }
    };
    match restore(path, cfg, now, SystemTime::now()) {
        Ok(None) => OperatorState::default(),
        Ok(Some(loaded)) => {
            let what = loaded.state.describe(now);
            tracing::warn!(file = %path.display(), restored = %what, dropped = ?loaded.dropped, "operator state restored");
            let mut reason = format!("operator state restored from {}: {what}", path.display());
            if !loaded.dropped.is_empty() {
                reason.push_str(&format!("; dropped: {}", loaded.dropped.join("; ")));
            }
            audit(reason, "restored before the first plan");
            loaded.state
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the operator state; starting without drains or overrides");
            audit(
                format!("operator state not restored: {e}"),
                "unreadable: started without drains or overrides",
            );
            OperatorState::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/two-clouds.yaml"),
        )
        .unwrap();
        crate::config::parse(&text, "two-clouds.yaml").unwrap()
    }

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "failover-state-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn drains_and_overrides_round_trip_with_wall_clock_expiry() {
        let d = dir();
        let path = d.join("sub/failover.state.json");
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut s = OperatorState::default();
        assert!(s.set_drain("a1", true));
        assert!(!s.set_drain("a1", true), "no change");
        let until = Deadline::after(now, wall, Duration::from_secs(600));
        assert!(s.set_override("chat", Override { to_tier: 1 }, until));
        assert!(
            !s.set_override("chat", Override { to_tier: 1 }, until),
            "same tier: no re-plan"
        );
        save(&path, &s).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["failover.state.json"], "no temporary file left");

        // Read back 100 s later, as another process would: the override
        // ends at the same wall-clock time, so 500 s are left.
        let later = (
            now + Duration::from_secs(100),
            wall + Duration::from_secs(100),
        );
        let back = load(&path, later.0, later.1).unwrap().unwrap();
        assert!(back.dropped.is_empty());
        assert!(back.state.is_drained("a1"));
        let o = back.state.override_of("chat").unwrap();
        assert_eq!(o.ov, Override { to_tier: 1 });
        let left = o.until.remaining(later.0).as_secs_f64();
        assert!((left - 500.0).abs() < 0.01, "{left}");
        assert_eq!(back.state.next_expiry(), Some(o.until.at()));

        // After the expiry, it is not restored, and says why.
        let gone = load(
            &path,
            now + Duration::from_secs(700),
            wall + Duration::from_secs(700),
        )
        .unwrap()
        .unwrap();
        assert!(gone.state.override_of("chat").is_none());
        assert_eq!(gone.dropped.len(), 1);
        assert!(gone.dropped[0].starts_with("override of chat to tier 1: expired at "));

        // Empty state: no file.
        let mut s = back.state;
        s.set_drain("a1", false);
        s.clear_override("chat");
        save(&path, &s).unwrap();
        assert!(!path.exists());
        assert!(load(&path, now, wall).unwrap().is_none());
        save(&path, &s).unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn restore_drops_what_the_config_no_longer_allows() {
        let d = dir();
        let path = d.join("s.json");
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut s = OperatorState::default();
        s.set_drain("a1", true);
        s.set_drain("gone-backend", true);
        let until = Deadline::after(now, wall, Duration::from_secs(60));
        s.set_override("chat", Override { to_tier: 1 }, until);
        // fraud's tier 1 holds eu-fraud-2 (EU): allowed.
        s.set_override("fraud", Override { to_tier: 1 }, until);
        // No service "nope"; fraud's policy forbids... nothing in tier 7.
        s.set_override("nope", Override { to_tier: 0 }, until);
        s.set_override("embed", Override { to_tier: 7 }, until);
        save(&path, &s).unwrap();

        let got = restore(&path, &cfg(), now, wall).unwrap().unwrap();
        assert_eq!(got.state.drained().collect::<Vec<_>>(), ["a1"]);
        let kept: Vec<&str> = got.state.overrides_iter().map(|(s, _)| s).collect();
        assert_eq!(kept, ["chat", "fraud"]);
        let mut dropped = got.dropped.clone();
        dropped.sort();
        assert_eq!(dropped.len(), 3, "{dropped:?}");
        assert!(dropped[0].starts_with("drain of gone-backend: no such backend"));
        assert!(dropped[1].starts_with("override of embed to tier 7: "));
        assert!(dropped[2].starts_with("override of nope to tier 0: no service"));
        assert_eq!(
            got.state.describe(now),
            "drained [a1]; overrides [chat to tier 1 for 1m, fraud to tier 1 for 1m]"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn broken_files_are_reported_not_guessed_at() {
        let d = dir();
        let path = d.join("s.json");
        let (now, wall) = (Instant::now(), SystemTime::now());
        for (text, needle) in [
            ("{", "not a state file"),
            (
                r#"{"version": 9, "written": "", "drains": [], "overrides": []}"#,
                "state file version 9",
            ),
            (
                r#"{"version": 1, "written": "", "drains": [], "overrides": [{"service": "chat", "tier": 1, "until": "soon"}]}"#,
                "override of chat: bad time \"soon\"",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load(&path, now, wall).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }
}
