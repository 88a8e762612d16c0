//! Waiting for a condition instead of sleeping for a fixed time: poll
//! until it holds, and fail loudly, naming what was awaited, when it does
//! not within the bound.

use std::{
    fmt::Debug,
    future::Future,
    time::{Duration, Instant},
};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);

/// Blocks until `cond` holds; panics after `timeout` naming `what`.
/// Returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
    t0.elapsed()
}

/// [`wait_for`] on a tokio runtime: sleeps between polls without
/// blocking the runtime's other tasks (such as an agent under test).
pub async fn wait_for_async(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Fetches a value with `get` until `done` holds for it, and returns it;
/// panics after `timeout` naming `what` and showing the last value.
pub async fn wait_for_value<T: Debug, F: Future<Output = T>>(
    what: &str,
    timeout: Duration,
    mut get: impl FnMut() -> F,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let t0 = Instant::now();
    loop {
        let v = get().await;
        if done(&v) {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last: {v:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
