//! The audit log behind a thread: every append fsyncs, which takes
//! milliseconds, and must never sit between a decision and its flip or
//! block the agent's event loop.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
};

use crate::audit::{AuditError, AuditLog, DecisionRecord};

/// Queues decision records for the audit log. Dropping it writes what is
/// queued and closes the log.
#[derive(Debug)]
pub struct Journal {
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

enum Msg {
    Record(Box<DecisionRecord>),
    Flush(mpsc::Sender<()>),
}

impl Journal {
    /// Opens (and verifies) the log now, so a broken or locked log stops
    /// the agent at start rather than later.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let mut log = AuditLog::open(path)?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Msg::Record(r) => {
                            let service = r.service.clone();
                            if let Err(e) = log.append(*r) {
                                tracing::error!(%service, error = %e, "audit append failed");
                            }
                        }
                        Msg::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|source| AuditError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, r: DecisionRecord) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Record(Box::new(r)));
        }
    }

    /// Waits until every record queued so far is on disk.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = mpsc::channel();
            if tx.send(Msg::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
