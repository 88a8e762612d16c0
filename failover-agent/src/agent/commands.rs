//! The control API's commands as the run loop answers them: the dispatch
//! ([`Agent::on_command`]) and the read-only queries (`status`,
//! `backends`, `flows`). Commands that change state are in
//! [`super::operator`], drills in [`super::drill_run`].

use std::{collections::BTreeMap, time::Instant};

use super::Agent;
use crate::{
    api::{self, ApiError, Command},
    config::{self, Config},
    health::HealthState,
};

impl Agent {
    pub(super) fn on_command(&mut self, cmd: Command) {
        // A requester that gave up is no error: send results are ignored.
        match cmd {
            Command::Status(r) => {
                let _ = r.send(Ok(self.api_status()));
            }
            Command::Backends(r) => {
                let _ = r.send(Ok(self.api_backends()));
            }
            Command::Flows(q, r) => {
                let _ = r.send(self.api_flows(&q));
            }
            Command::Drain {
                backend,
                on,
                force,
                reply,
            } => {
                let _ = reply.send(self.api_drain(&backend, on, force));
            }
            Command::Failover {
                service,
                tier,
                duration,
                force,
                reply,
            } => {
                let _ = reply.send(self.api_failover(&service, tier, duration, force));
            }
            Command::CancelFailover { service, reply } => {
                let _ = reply.send(self.api_cancel_failover(&service));
            }
            Command::Drill {
                req,
                duration,
                reply,
            } => {
                let _ = reply.send(self.start_drill(&req, duration));
            }
            Command::DrillReport(r) => {
                let _ = r.send(self.drill_report());
            }
        }
    }

    pub(super) fn healthy(&self, backend: &str) -> bool {
        matches!(
            self.applier.health(backend),
            HealthState::Up | HealthState::Degraded
        )
    }

    /// Flows in the table per backend id.
    pub(super) fn flow_counts(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        match self.applier.dataplane().all_flows() {
            Ok(flows) => {
                for f in flows {
                    *out.entry(f.flow.backend_id).or_insert(0) += 1;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the flow table failed"),
        }
        out
    }

    fn api_status(&self) -> api::Status {
        let cfg = self.applier.config();
        let now = Instant::now();
        let links = cfg.node.pin_path.join("links");
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let p = self.applier.programmed(&s.name);
                let serving = p.map(|p| p.to.clone()).unwrap_or_default();
                let (healthy, backends, excluded) = pool_counts(cfg, s, |b| self.healthy(b));
                api::ServiceStatus {
                    name: s.name.clone(),
                    // Each VIP, canonical: `192.0.2.10:80/tcp,
                    // [2001:db8::10]:80/tcp` for a dual-stack service.
                    endpoint: s
                        .vips()
                        .map(|vip| {
                            format!(
                                "{}/{}",
                                std::net::SocketAddr::new(vip, s.port),
                                format!("{:?}", s.protocol).to_lowercase()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    active_tier: serving
                        .iter()
                        .filter_map(|n| cfg.backend(n).map(|b| b.tier))
                        .min(),
                    generation: p.map_or(0, |p| p.entry.generation),
                    healthy,
                    backends,
                    excluded,
                    serving,
                    override_: self
                        .applier
                        .override_of(&s.name)
                        .map(|o| api::OverrideInfo {
                            tier: o.ov.to_tier,
                            expires_in_s: o.until.remaining(now).as_secs_f64(),
                        }),
                }
            })
            .collect();
        api::Status {
            node: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            interfaces: cfg.node.interfaces.clone(),
            program_attached: cfg.node.interfaces.iter().all(|i| links.join(i).exists()),
            config_path: self.opts.config_path.display().to_string(),
            config_generation: self.config_generation,
            services,
        }
    }

    fn api_backends(&self) -> Vec<api::BackendInfo> {
        let snap = self.snapshot();
        let flows = self.flow_counts();
        let cfg = self.applier.config();
        let ids = self.applier.ids();
        snap.backends
            .into_iter()
            .filter_map(|b| {
                let c = cfg.backend(&b.name)?;
                let id = ids.backend(&b.name).map(|a| a.id);
                let st = b.stats.unwrap_or_default();
                Some(api::BackendInfo {
                    address: std::net::SocketAddr::new(c.address, c.port).to_string(),
                    tier: b.tier,
                    weight: b.weight,
                    effective_weight: b.effective_weight,
                    load: self.applier.load_info(&b.name),
                    health: b.health,
                    state: b.dataplane,
                    draining: self.applier.is_draining(&b.name),
                    flaps: b.flaps,
                    hold_down_s: b.hold_down.as_secs_f64(),
                    grace_s: self
                        .applier
                        .grace_left(&b.name, Instant::now())
                        .map_or(0.0, |d| d.as_secs_f64()),
                    probe_latency_ms: self
                        .probe_latency
                        .get(&b.name)
                        .map(|d| d.as_secs_f64() * 1e3),
                    passive: api::PassiveSignals {
                        syns: st.syns,
                        synacks: st.synacks,
                        syn_resets: st.syn_rsts,
                        syns_ignored: st.syns_ignored,
                        #[allow(clippy::cast_precision_loss)]
                        rtt_ms: (st.rtt_at_ns != 0).then(|| st.rtt_last_ns as f64 / 1e6),
                    },
                    flows: id.and_then(|i| flows.get(&i).copied()).unwrap_or(0),
                    new_flows_total: st.traffic.new_flows,
                    services: cfg
                        .services
                        .iter()
                        .filter(|s| s.backends.contains(&b.name))
                        .map(|s| s.name.clone())
                        .collect(),
                    name: b.name,
                })
            })
            .collect()
    }

    fn api_flows(&self, q: &api::FlowQuery) -> Result<api::Flows, ApiError> {
        let ids = self.applier.ids();
        let cfg = self.applier.config();
        if let Some(s) = &q.service
            && cfg.service(s).is_none()
        {
            return Err(ApiError::not_found(format!("no service named {s:?}")));
        }
        if let Some(b) = &q.backend
            && cfg.backend(b).is_none()
        {
            return Err(ApiError::not_found(format!("no backend named {b:?}")));
        }
        // A dual-stack service's flows are those of both its VIPs.
        let want_svc: Option<Vec<u32>> = q
            .service
            .as_deref()
            .map(|s| ids.service_vips(s).map(|a| a.id).collect());
        let want_be = q
            .backend
            .as_deref()
            .and_then(|b| ids.backend(b))
            .map(|a| a.id);
        let flows = self
            .applier
            .dataplane()
            .all_flows()
            .map_err(|e| ApiError::new(500, format!("reading the flow table: {e}")))?;
        let now_ns = crate::dataplane::monotonic_ns();
        let mut out: Vec<(u64, api::FlowInfo)> = flows
            .into_iter()
            .filter(|v| {
                want_svc
                    .as_ref()
                    .is_none_or(|i| i.contains(&v.flow.service_id))
            })
            .filter(|v| want_be.is_none_or(|i| v.flow.backend_id == i))
            .map(|v| {
                let f = v.flow;
                let service = ids
                    .service_of_id(f.service_id)
                    .map_or_else(|| format!("#{}", f.service_id), str::to_owned);
                let backend = ids
                    .backend_name(f.backend_id)
                    .map_or_else(|| format!("#{}", f.backend_id), str::to_owned);
                #[allow(clippy::cast_precision_loss)]
                let age_s = now_ns.saturating_sub(f.created_ns) as f64 / 1e9;
                (
                    f.created_ns,
                    api::FlowInfo {
                        client: v.client.to_string(),
                        vip: v.vip.to_string(),
                        protocol: match v.proto {
                            6 => "tcp".to_owned(),
                            17 => "udp".to_owned(),
                            p => p.to_string(),
                        },
                        service,
                        backend,
                        nat_port: u16::from_be(f.nat_port_be),
                        age_s,
                    },
                )
            })
            .collect();
        let total = out.len();
        out.sort_by_key(|(created, _)| *created);
        out.truncate(q.limit.unwrap_or(50));
        Ok(api::Flows {
            total,
            flows: out.into_iter().map(|(_, f)| f).collect(),
        })
    }
}

/// A service's `status` counts: of the pool's backends its sovereignty
/// policy admits (the only ones it may ever use), how many are `healthy`
/// and how many there are; and how many the policy excludes.
fn pool_counts(
    cfg: &Config,
    service: &config::Service,
    healthy: impl Fn(&str) -> bool,
) -> (usize, usize, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let (admitted, excluded): (Vec<&str>, Vec<&str>) = service
        .backends
        .iter()
        .map(String::as_str)
        .filter(|name| seen.insert(*name))
        .partition(|name| cfg.backend(name).is_some_and(|b| service.policy.admits(b)));
    let up = admitted.iter().filter(|name| healthy(name)).count();
    (up, admitted.len(), excluded.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_only_the_backends_the_policy_admits() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples/two-clouds.yaml"),
        )
        .unwrap();
        let mut cfg = config::parse(&text, "two-clouds.yaml").unwrap();
        // fraud: eu-fraud-1, eu-fraud-2 (EU, admitted), us-fraud-1 (US,
        // excluded); two more US backends make it five, two admitted.
        let fraud = cfg.services.iter().position(|s| s.name == "fraud").unwrap();
        for name in ["us-fraud-2", "us-fraud-3"] {
            let mut b = cfg.backend("us-fraud-1").unwrap().clone();
            b.name = name.into();
            cfg.backends.push(b);
            cfg.services[fraud].backends.push(name.into());
        }
        let svc = &cfg.services[fraud];
        // Everything up: 2 of the 2 it may use, not 5 of 5.
        assert_eq!(pool_counts(&cfg, svc, |_| true), (2, 2, 3));
        // Failing closed (its EU backends down) while the US ones are up:
        // none of 2, not 3 of 5.
        assert_eq!(pool_counts(&cfg, svc, |b| b.starts_with("us-")), (0, 2, 3));
        // No policy: the whole pool.
        let chat = cfg.service("chat").unwrap();
        assert_eq!(pool_counts(&cfg, chat, |b| b != "a1"), (3, 4, 0));
    }
}
