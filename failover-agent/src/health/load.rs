//! The load facet's scrape: one task per backend with `probe.load`, which
//! `GET`s its metrics every `interval` on a kept connection (the probes'
//! HTTP/1.1 client, [`super::http::KeepAlive`]) and sends every result,
//! good or refused, to the agent ([`LoadEvent`]); `crate::load` decides
//! what they mean.
//!
//! Caps: the body is read up to [`parse::MAX_BODY`] and no further (the
//! connection is then dropped), the whole exchange must end within the
//! interval (a slow or dribbling server is a timeout), and at most
//! [`parse::MAX_SAMPLES`] samples are parsed. The body is parsed in the
//! task: at 1 MiB at most, a few milliseconds of one worker.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle, time::MissedTickBehavior};

use super::{
    BackendTarget, ProbeError,
    http::{KeepAlive, request_path},
    tls::TlsOptions,
};
use crate::{
    config::{self, LoadScrape, ProbeKind, ProfileNames},
    load::{Figures, Refusal, parse},
};

/// One scrape's result.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadEvent {
    pub backend: Arc<str>,
    pub result: Result<Figures, Refusal>,
    pub at: Instant,
}

/// The metric names a scrape reads, owned.
#[derive(Clone, Debug)]
struct Names {
    waiting: String,
    running: Option<String>,
    kv: Option<String>,
}

impl Names {
    fn borrow(&self) -> ProfileNames<'_> {
        ProfileNames {
            waiting: &self.waiting,
            running: self.running.as_deref(),
            kv: self.kv.as_deref(),
        }
    }
}

/// Scrapes one backend's metrics.
#[derive(Debug)]
pub struct Scraper {
    client: KeepAlive,
    request: Box<[u8]>,
    names: Names,
    timeout: Duration,
}

impl Scraper {
    /// `tls`: scrape over TLS (the probe kind's `tls`); `timeout` bounds
    /// the whole exchange.
    pub fn new(
        target: &BackendTarget,
        facet: &LoadScrape,
        tls: Option<&TlsOptions>,
        timeout: Duration,
    ) -> Result<Self, ProbeError> {
        let names = facet.names().ok_or(ProbeError::MissingField {
            kind: "load",
            field: "metrics",
        })?;
        let names = Names {
            waiting: names.waiting.to_owned(),
            running: names.running.map(str::to_owned),
            kv: names.kv.map(str::to_owned),
        };
        let client = KeepAlive::new(target, tls, timeout)?;
        let path = request_path(&facet.path)?;
        Ok(Self {
            request: client.request("GET", &path, &[("Accept", "text/plain")], b""),
            client,
            names,
            timeout,
        })
    }

    /// One scrape: the figures, or why they were refused.
    pub async fn scrape(&self) -> Result<Figures, Refusal> {
        let body = tokio::time::timeout(self.timeout, self.fetch())
            .await
            .map_err(|_| Refusal::Timeout(self.timeout))??;
        parse(&body, &self.names.borrow())
    }

    async fn fetch(&self) -> Result<Vec<u8>, Refusal> {
        let mut session = self.client.session();
        let mut resp = session
            .send(&self.request)
            .await
            .map_err(|e| Refusal::Unreachable(e.to_string()))?;
        if !resp.status.is_success() {
            // The body is left unread: the connection is not kept.
            return Err(Refusal::Status(resp.status.as_u16()));
        }
        let (body, whole) = resp
            .read_body(parse::MAX_BODY, true)
            .await
            .map_err(Refusal::Unreachable)?;
        if !whole {
            return Err(Refusal::TooLarge);
        }
        Ok(body)
    }
}

/// A running scrape task; dropping it stops the task.
#[derive(Debug)]
pub struct ScraperTask(JoinHandle<()>);

impl Drop for ScraperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts scraping `target` as `probe.load` says (`None` without a load
/// facet): a scrape at once, then one per `interval`, each bounded by
/// the interval, each result sent to `events`.
pub fn spawn_scraper(
    target: &BackendTarget,
    probe: &config::Probe,
    tls: &TlsOptions,
    events: mpsc::Sender<LoadEvent>,
) -> Result<Option<ScraperTask>, ProbeError> {
    let Some(facet) = &probe.load else {
        return Ok(None);
    };
    let over_tls = match &probe.kind {
        ProbeKind::Http(h) => h.tls,
        ProbeKind::Grpc(g) => g.tls,
        ProbeKind::Inference(i) => i.tls,
        ProbeKind::Tcp(_) | ProbeKind::Udp(_) => false,
    };
    let scraper = Scraper::new(target, facet, over_tls.then_some(tls), facet.interval)?;
    let backend = target.name.clone();
    let every = facet.interval;
    Ok(Some(ScraperTask(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = scraper.scrape().await;
            let ev = LoadEvent {
                backend: backend.clone(),
                result,
                at: Instant::now(),
            };
            if events.send(ev).await.is_err() {
                return;
            }
        }
    }))))
}

#[cfg(test)]
mod tests;
