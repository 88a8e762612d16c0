//! The agent in this test process: [`failover_agent::agent::Agent`]
//! running on a tokio task, stopped as `failover-agent run` is on SIGTERM
//! (the stop future resolves), and aborted on drop if a test fails first.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use failover_agent::agent::{Agent, AgentError, RunOptions};

/// The agent's run loop on a task.
pub struct Running {
    /// The metrics listener's address, when the config has one.
    pub metrics: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    run: tokio::task::JoinHandle<Result<Agent, AgentError>>,
}

/// Run options for the config at `config`: no SIGHUP handler (tests
/// reload through the handle or the file check), the audit log at `audit`
/// if given.
pub fn options(config: &Path, audit: Option<PathBuf>) -> RunOptions {
    let mut opts = RunOptions::new(config);
    opts.sighup = false;
    opts.audit_path = audit;
    opts
}

impl Running {
    /// Starts the agent with `opts` and runs it.
    pub async fn start(opts: RunOptions) -> Self {
        Self::run(Agent::start(opts).await.expect("agent starts"))
    }

    /// Runs an agent already started (after a test looked at it).
    pub fn run(agent: Agent) -> Self {
        let metrics = agent.metrics_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        Self {
            metrics,
            stop: Some(stop),
            run,
        }
    }

    /// The metrics listener's address; panics when there is none.
    pub fn metrics(&self) -> SocketAddr {
        self.metrics.expect("metrics listener bound")
    }

    /// Ends the run loop as SIGTERM would, and returns the agent; fails
    /// when it does not stop within 5 s.
    pub async fn stop(mut self) -> Agent {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.run)
            .await
            .expect("agent stops in time")
            .expect("run task")
            .expect("run loop ends cleanly")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.run.abort();
    }
}
