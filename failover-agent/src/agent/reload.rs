//! Config reloads: noticing a change (SIGHUP, and the file's metadata
//! polled once a second: a ConfigMap update replaces the file through a
//! symlink swap, which inotify on the path misses; a stat of the path
//! does not), and applying it ([`super::Agent::reload`]): a bad config is
//! refused and the running one kept; a good one is applied as a diff.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::{self, Config, ConfigError},
    metrics::Trigger,
};

/// Period of the file check.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // Follows symlinks: a swapped target shows as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// Tells when the config file changed since the last look.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    last: Option<Stamp>,
}

impl FileWatch {
    /// Starts from the file as it is now.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            last: stamp(path),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once per change. A file that disappears is not a change (an
    /// editor may be between delete and write); its return is.
    pub fn changed(&mut self) -> bool {
        match stamp(&self.path) {
            Some(s) if Some(s) != self.last => {
                self.last = Some(s);
                true
            }
            _ => false,
        }
    }

    /// Takes the current file as seen (after a SIGHUP-triggered reload),
    /// so the poll does not reload it a second time.
    pub fn mark_seen(&mut self) {
        if let Some(s) = stamp(&self.path) {
            self.last = Some(s);
        }
    }
}

impl super::Agent {
    /// Reloads the config file: a bad one is refused and logged, and the
    /// running state is kept; a good one is applied as a diff.
    pub fn reload(&mut self) {
        let before = self.generations();
        self.reload_config();
        self.count_switches(&before, Trigger::ConfigReload);
    }

    fn reload_config(&mut self) {
        self.watch.mark_seen();
        let path = self.opts.config_path.clone();
        match load_logged(&path) {
            Err(e) => {
                for fe in e.errors() {
                    tracing::error!(origin = %fe.origin, line = fe.line, field = %fe.field, message = %fe.message, "config error");
                }
                log_warnings(e.warnings());
                if e.errors().is_empty() {
                    tracing::error!(error = %e, "config unreadable");
                }
                tracing::error!(config = %path.display(), "reload refused; running config kept");
                self.applier.refuse_reload(&e);
            }
            Ok(new) => match self.applier.reload(new, Instant::now()) {
                Ok(diff) if diff.is_empty() => {
                    tracing::info!(config = %path.display(), "config unchanged");
                }
                Ok(diff) => {
                    self.config_generation += 1;
                    tracing::info!(config = %path.display(), %diff, "config reloaded");
                    self.sync_probers();
                    self.sync_scrapers();
                }
                Err(e) => {
                    tracing::error!(error = %e, "applying the reloaded config failed");
                    self.sync_probers();
                    self.sync_scrapers();
                }
            },
        }
    }
}

/// Loads the config; its warnings are logged (a refusal's errors are the
/// caller's to report).
pub(super) fn load_logged(path: &std::path::Path) -> Result<Config, ConfigError> {
    let loaded = config::load_checked(path)?;
    log_warnings(&loaded.warnings);
    Ok(loaded.config)
}

fn log_warnings(warnings: &[config::FieldError]) {
    for w in warnings {
        tracing::warn!(origin = %w.origin, line = w.line, field = %w.field, message = %w.message, "config warning");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_seen_once() {
        let dir = std::env::temp_dir().join(format!("failover-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(&f, "a").unwrap();
        let mut w = FileWatch::new(&f);
        assert!(!w.changed());
        std::fs::write(&f, "ab").unwrap();
        assert!(w.changed());
        assert!(!w.changed());
        std::fs::remove_file(&f).unwrap();
        assert!(!w.changed(), "a missing file is no change");
        // Replaced by rename, as editors and ConfigMaps do.
        let tmp = dir.join("c.tmp");
        std::fs::write(&tmp, "xy").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        assert!(w.changed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
