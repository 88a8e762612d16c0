//! Scratch directories for tests (configs, sockets, audit logs), removed
//! on drop like the namespaces and pins.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A scratch directory under the system temp dir; `.0` is its path.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let d = std::env::temp_dir().join(format!(
            "failover-test-scratch-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).expect("create scratch dir");
        Self(d)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
