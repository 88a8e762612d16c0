//! The planner: a pure function from (config, health, overrides) to the
//! Maglev ring each service should use, with a written justification.
//!
//! Order of rules, per service:
//! 1. Sovereignty: only the pool's backends the policy allows are ever
//!    considered ([`policy`]). Nothing below can add one back.
//! 2. A manual override to tier N sends everything to N's healthy allowed
//!    backends, when it has any.
//! 3. Otherwise tiers share traffic by Envoy's priority rule with the
//!    overprovisioning factor, plus the standby floor ([`tiers`]).
//! 4. With nothing allowed healthy: fail open (every allowed, non-draining
//!    backend) or fail closed (an empty ring).
//! 5. Per-tier shares become Maglev weights; the ring is built and checked
//!    once more against the policy before it is returned.
//!
//! Damping flaps is the health state machine's job: the same inputs always
//! give the same plan, on every node.

pub mod check;
pub mod policy;
pub mod tiers;

pub use check::{Action, Refusal, Shortfall, check_action, healthy_serving};

#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt::Write as _};

use failover_common::{NO_BACKEND, RING_MAX};

use crate::{
    config::{Backend, Config, PanicMode, Service},
    maglev,
};

/// What the health checker concluded about one backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BackendHealth {
    Up,
    /// Serving, but slow or rate limited: its weight is scaled by the
    /// factor (clamped to [0, 1]; 0 counts as down).
    Degraded {
        weight_factor: f64,
    },
    Down,
    /// Operator's choice: no new flows; existing ones continue.
    Draining,
}

impl BackendHealth {
    /// Multiplier on the configured weight for new flows.
    #[must_use]
    pub fn factor(self) -> f64 {
        match self {
            Self::Up => 1.0,
            Self::Degraded { weight_factor } if weight_factor.is_finite() => {
                weight_factor.clamp(0.0, 1.0)
            }
            Self::Degraded { .. } | Self::Down | Self::Draining => 0.0,
        }
    }
}

/// Health of every backend, by name, and the load factor of those whose
/// model server reports its load. A backend missing from the view is
/// treated as down: it has not been shown healthy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthView {
    states: BTreeMap<String, BackendHealth>,
    /// Load factors (`crate::load`); absent: 1.
    load: BTreeMap<String, f64>,
}

impl HealthView {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, backend: impl Into<String>, state: BackendHealth) {
        self.states.insert(backend.into(), state);
    }

    #[must_use]
    pub fn get(&self, backend: &str) -> BackendHealth {
        self.states
            .get(backend)
            .copied()
            .unwrap_or(BackendHealth::Down)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, BackendHealth)> {
        self.states.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Scales `backend`'s share of its tier's new flows by `factor`, on
    /// top of its health factor (see [`load_factor`]).
    pub fn set_load(&mut self, backend: impl Into<String>, factor: f64) {
        self.load.insert(backend.into(), factor);
    }

    /// `backend`'s load factor, in (0, 1]; 1 without one.
    #[must_use]
    pub fn load(&self, backend: &str) -> f64 {
        self.load.get(backend).copied().map_or(1.0, load_factor)
    }
}

/// A load factor as the planner uses it: in (0, 1], anything else 1. Load
/// only shifts new flows between serving backends: it never takes one out
/// (that is health's call) and never counts toward a tier's health, so a
/// busy tier does not spill to the next.
#[must_use]
pub fn load_factor(factor: f64) -> f64 {
    if factor.is_finite() && factor > 0.0 {
        factor.min(1.0)
    } else {
        1.0
    }
}

impl<S: Into<String>> FromIterator<(S, BackendHealth)> for HealthView {
    fn from_iter<I: IntoIterator<Item = (S, BackendHealth)>>(iter: I) -> Self {
        Self {
            states: iter.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            load: BTreeMap::new(),
        }
    }
}

/// Backend name -> data-plane backend id.
pub type BackendIds = BTreeMap<String, u32>;

/// "Force tier N" for one service. Its expiry ("until T") is the caller's:
/// it drops the override when the time has come, the planner has no clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Override {
    pub to_tier: u8,
}

/// Service name -> active override.
pub type Overrides = BTreeMap<String, Override>;

/// How a service's traffic is placed.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// The home tier (first with allowed backends) takes all it is offered;
    /// only a standby floor, if any, goes elsewhere.
    Normal,
    /// Health pushed `spilled` (0..=1) of the traffic off the home tier;
    /// `normalised` when all tiers together offered less than 100%.
    Spill {
        from_tier: u8,
        spilled: f64,
        normalised: bool,
    },
    /// A manual override pins the service to one tier.
    Override { tier: u8 },
    /// Nothing allowed is healthy: every allowed, non-draining backend.
    PanicFailOpen,
    /// Empty ring: the data plane resets TCP and drops UDP.
    FailClosed,
}

/// One tier as the planner saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct TierPlan {
    pub tier: u8,
    /// Allowed backends with a data-plane id.
    pub backends: usize,
    /// Of those, with a positive health factor.
    pub healthy: usize,
    /// Healthy weight over configured weight.
    pub health: f64,
    /// Share of new flows it receives.
    pub traffic: f64,
}

/// One allowed backend's part in the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendPlan {
    pub name: String,
    pub id: u32,
    /// An IPv6 backend (a dual-stack service's `vip6` reaches these).
    pub ipv6: bool,
    pub tier: u8,
    pub health: BackendHealth,
    /// Its load factor (1 without a load facet).
    pub load: f64,
    /// Share of the service's new flows (0..=1); in a dual-stack service,
    /// of its own family's VIP's.
    pub share: f64,
    /// Maglev weight (share scaled to [`WEIGHT_SCALE`]); 0 = not in ring.
    pub weight: u32,
    /// The configured weight as the plan uses it: scaled by the health
    /// factor (a degraded backend's by its `degraded_weight`) times the
    /// load factor, the configured weight itself in a fail-open ring; 0 =
    /// not in ring.
    pub effective_weight: u32,
}

impl BackendHealth {
    /// `configured` scaled by [`Self::factor`], rounded; a positive
    /// factor never rounds a weight to 0.
    #[must_use]
    pub fn effective_weight(self, configured: u32) -> u32 {
        self.loaded_weight(configured, 1.0)
    }

    /// `configured` scaled by [`Self::factor`] times the load factor
    /// `load` ([`load_factor`]): the two multiply, so a degraded (429,
    /// slow first token) and loaded backend keeps the product.
    #[must_use]
    pub fn loaded_weight(self, configured: u32, load: f64) -> u32 {
        let factor = self.factor() * load_factor(load);
        if factor <= 0.0 {
            return 0;
        }
        ((f64::from(configured) * factor).round() as u32).max(1)
    }
}

/// Maglev weight of a backend taking 100% of the traffic.
pub const WEIGHT_SCALE: f64 = 1_000_000.0;

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePlan {
    pub service: String,
    /// How `vip`'s new flows are placed.
    pub mode: Mode,
    /// A dual-stack service's `vip6`: how its new flows are placed. Each
    /// family is planned on its own backends (`plan_with`).
    pub mode6: Option<Mode>,
    /// Tiers receiving new flows, preferred first.
    pub active_tiers: Vec<u8>,
    /// In a dual-stack service, `vip`'s tiers, then `vip6`'s.
    pub tiers: Vec<TierPlan>,
    /// Every allowed backend with an id, in pool order.
    pub backends: Vec<BackendPlan>,
    /// Maglev table of `policy.ring_size` backend ids (`NO_BACKEND` = none):
    /// of the backends of `vip`'s family.
    pub ring: Vec<u32>,
    /// A dual-stack service's second ring, for `vip6`: its IPv6 backends
    /// as their own family's plan places them.
    pub ring6: Option<Vec<u32>>,
    /// Why this placement, for operators and the audit log.
    pub justification: String,
    /// Result of the sovereignty check, for the audit log.
    pub sovereignty: String,
    /// False only if the final check caught a disallowed id in the ring
    /// (then the ring was emptied). Never expected; kept for the audit.
    pub sovereignty_ok: bool,
}

impl ServicePlan {
    /// How new flows to the backends of this family are placed.
    #[must_use]
    pub fn mode_of(&self, ipv6: bool) -> &Mode {
        match &self.mode6 {
            Some(m) if ipv6 => m,
            _ => &self.mode,
        }
    }

    /// True when the ring sends no new flow anywhere.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.ring.iter().all(|&id| id == NO_BACKEND)
            && self
                .ring6
                .as_ref()
                .is_none_or(|r| r.iter().all(|&id| id == NO_BACKEND))
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// In config order.
    pub services: Vec<ServicePlan>,
}

impl Plan {
    #[must_use]
    pub fn service(&self, name: &str) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.service == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error(
        "service {service:?} has no backend in tier {tier} (its pool's tiers: {})",
        tiers.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")
    )]
    NoSuchTier {
        service: String,
        tier: u8,
        /// The tiers of the service's pool.
        tiers: Vec<u8>,
    },
    #[error(
        "service {service:?} may not be forced to tier {tier}: its sovereignty policy ({policy}) allows no backend there (tiers with allowed backends: {allowed_tiers:?})"
    )]
    TierNotAllowed {
        service: String,
        tier: u8,
        policy: String,
        allowed_tiers: Vec<u8>,
    },
}

/// Refuses an override toward a tier where the service's pool has no
/// backend ([`PlanError::NoSuchTier`]), or where its policy allows none
/// ([`PlanError::TierNotAllowed`]): it could never take traffic. Health is not considered: an
/// override toward an unhealthy tier is legal and falls back until it heals.
pub fn check_override(cfg: &Config, service: &str, ov: Override) -> Result<(), PlanError> {
    let svc = cfg
        .service(service)
        .ok_or_else(|| PlanError::UnknownService(service.to_owned()))?;
    let by_name = by_name(cfg);
    let mut tiers: Vec<u8> = svc
        .backends
        .iter()
        .filter_map(|b| by_name.get(b.as_str()).map(|b| b.tier))
        .collect();
    tiers.sort_unstable();
    tiers.dedup();
    let split = policy::split(svc, &by_name);
    let mut allowed_tiers: Vec<u8> = split.allowed.iter().map(|b| b.tier).collect();
    allowed_tiers.sort_unstable();
    allowed_tiers.dedup();
    if !tiers.contains(&ov.to_tier) {
        // Not the policy's doing: the tier has no backend at all.
        Err(PlanError::NoSuchTier {
            service: service.to_owned(),
            tier: ov.to_tier,
            tiers,
        })
    } else if allowed_tiers.contains(&ov.to_tier) {
        Ok(())
    } else {
        Err(PlanError::TierNotAllowed {
            service: service.to_owned(),
            tier: ov.to_tier,
            policy: policy::describe(&svc.policy),
            allowed_tiers,
        })
    }
}

/// Plans every service of `cfg`.
#[must_use]
pub fn plan(cfg: &Config, health: &HealthView, ids: &BackendIds, overrides: &Overrides) -> Plan {
    let by_name = by_name(cfg);
    Plan {
        services: cfg
            .services
            .iter()
            .map(|s| plan_with(s, &by_name, health, ids, overrides.get(&s.name).copied()))
            .collect(),
    }
}

/// Plans one service (e.g. after a health change of one of its backends).
#[must_use]
pub fn plan_service(
    cfg: &Config,
    service: &Service,
    health: &HealthView,
    ids: &BackendIds,
    overrides: &Overrides,
) -> ServicePlan {
    plan_with(
        service,
        &by_name(cfg),
        health,
        ids,
        overrides.get(&service.name).copied(),
    )
}

fn by_name(cfg: &Config) -> BTreeMap<&str, &Backend> {
    cfg.backends.iter().map(|b| (b.name.as_str(), b)).collect()
}

/// An allowed backend with an id, its health and load factor.
struct Candidate<'a> {
    backend: &'a Backend,
    id: u32,
    health: BackendHealth,
    load: f64,
}

impl Candidate<'_> {
    fn configured(&self) -> f64 {
        f64::from(self.backend.weight)
    }
    /// Weight by health alone: what a tier offers.
    fn effective(&self) -> f64 {
        self.configured() * self.health.factor()
    }
    /// Weight by health and load: its part of its tier's new flows.
    fn loaded(&self) -> f64 {
        self.effective() * self.load
    }
}

fn plan_with(
    svc: &Service,
    by_name: &BTreeMap<&str, &Backend>,
    health: &HealthView,
    ids: &BackendIds,
    ov: Option<Override>,
) -> ServicePlan {
    if svc.vip6.is_none() {
        return plan_family(svc, by_name, health, ids, ov, None);
    }
    // A dual-stack service: each VIP's clients reach only the backends of
    // its family, so each family is placed on its own backends, with its
    // own tiers, spill, panic and fail-closed. Planned over the whole
    // pool, IPv4's healthy tier 0 kept the tier in use while IPv6's was
    // down, and IPv6 clients failed closed with IPv6 backends healthy in
    // tier 1. One plan and one decision hold both.
    let v4 = plan_family(svc, by_name, health, ids, ov, Some(false));
    let v6 = plan_family(svc, by_name, health, ids, ov, Some(true));
    dual(svc, v4, v6)
}

/// One plan of a dual-stack service's two, `vip`'s and `vip6`'s.
fn dual(svc: &Service, v4: ServicePlan, v6: ServicePlan) -> ServicePlan {
    let pool_order = |b: &BackendPlan| svc.backends.iter().position(|n| *n == b.name);
    let mut backends = v4.backends;
    backends.extend(v6.backends);
    backends.sort_by_key(pool_order);
    let mut active_tiers = v4.active_tiers;
    for t in v6.active_tiers {
        if !active_tiers.contains(&t) {
            active_tiers.push(t);
        }
    }
    active_tiers.sort_unstable();
    let mut tiers = v4.tiers;
    tiers.extend(v6.tiers);
    let sovereignty = if v4.sovereignty == v6.sovereignty {
        v4.sovereignty
    } else {
        format!("IPv4: {}; IPv6: {}", v4.sovereignty, v6.sovereignty)
    };
    ServicePlan {
        service: v4.service,
        mode: v4.mode,
        mode6: Some(v6.mode),
        active_tiers,
        tiers,
        backends,
        ring: v4.ring,
        ring6: Some(v6.ring),
        justification: format!("IPv4: {}; IPv6: {}", v4.justification, v6.justification),
        sovereignty,
        sovereignty_ok: v4.sovereignty_ok && v6.sovereignty_ok,
    }
}

/// The plan over the pool's backends of one family (`Some(true)`: IPv6),
/// or of all (`None`).
fn plan_family(
    svc: &Service,
    by_name: &BTreeMap<&str, &Backend>,
    health: &HealthView,
    ids: &BackendIds,
    ov: Option<Override>,
    ipv6: Option<bool>,
) -> ServicePlan {
    let p = &svc.policy;
    let split = policy::split(svc, by_name);
    let mut notes: Vec<String> = Vec::new();

    let mut candidates: Vec<Candidate> = Vec::with_capacity(split.allowed.len());
    let of_family = |b: &Backend| ipv6.is_none_or(|v6| b.address.is_ipv6() == v6);
    for b in split.allowed.iter().filter(|b| of_family(b)) {
        match ids.get(&b.name) {
            Some(&id) if id != NO_BACKEND => candidates.push(Candidate {
                backend: b,
                id,
                health: health.get(&b.name),
                load: health.load(&b.name),
            }),
            _ => notes.push(format!("{} has no data-plane id: left out", b.name)),
        }
    }

    // Tiers in preference order, each with its candidates' indices.
    let mut tier_members: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        tier_members.entry(c.backend.tier).or_default().push(i);
    }
    let weights: Vec<tiers::TierWeights> = tier_members
        .iter()
        .map(|(&tier, members)| tiers::TierWeights {
            tier,
            configured: members.iter().map(|&i| candidates[i].configured()).sum(),
            healthy: members.iter().map(|&i| candidates[i].effective()).sum(),
        })
        .collect();
    let f = tiers::sane_factor(p.overprovisioning);

    // Per-tier traffic, and shares within a tier by effective weight.
    let mut traffic = vec![0.0; weights.len()];
    let mut shares = vec![0.0; candidates.len()];
    let mut tier_lines: Vec<String> = Vec::new();
    let mode;

    let forced = ov.and_then(|o| {
        let at = weights.iter().position(|t| t.tier == o.to_tier);
        match at {
            Some(at) if weights[at].healthy > 0.0 => Some((o.to_tier, at)),
            _ => {
                notes.push(format!(
                    "override to tier {} ignored: no healthy allowed backend there",
                    o.to_tier
                ));
                None
            }
        }
    });

    if let Some((tier, at)) = forced {
        traffic[at] = 1.0;
        mode = Mode::Override { tier };
        tier_lines.push(format!("override: all traffic forced to tier {tier}"));
    } else if let Some(a) = tiers::allocate(&weights, p.overprovisioning, p.standby_share) {
        traffic.clone_from(&a.traffic);
        for (i, t) in weights.iter().enumerate() {
            let members = &tier_members[&t.tier];
            let up = members
                .iter()
                .filter(|&&m| candidates[m].effective() > 0.0)
                .count();
            let degraded = members
                .iter()
                .filter(|&&m| matches!(candidates[m].health, BackendHealth::Degraded { .. }))
                .filter(|&&m| candidates[m].effective() > 0.0)
                .count();
            let degraded = if degraded > 0 {
                format!(" ({degraded} degraded)")
            } else {
                String::new()
            };
            let mut line = format!(
                "tier {}: {up}/{} healthy{degraded}, health {}, x{f} = {}",
                t.tier,
                members.len(),
                pct(t.health()),
                pct(t.health() * f),
            );
            if a.traffic[i] > tiers::EPSILON || i <= a.primary {
                let _ = write!(line, " -> {}", pct(a.traffic[i]));
            }
            tier_lines.push(line);
        }
        // Same "home" as tiers::allocate: the first tier with allowed weight.
        let home = weights
            .iter()
            .find(|t| t.configured > 0.0)
            .map_or(weights[a.primary].tier, |t| t.tier);
        if a.spilled > tiers::EPSILON {
            let to: Vec<String> = weights
                .iter()
                .zip(&a.traffic)
                .filter(|(t, x)| t.tier != home && **x > tiers::EPSILON)
                .map(|(t, _)| t.tier.to_string())
                .collect();
            tier_lines.push(format!(
                "{} spills from tier {home} to tier {}",
                pct(a.spilled),
                to.join("+")
            ));
            mode = Mode::Spill {
                from_tier: home,
                spilled: a.spilled,
                normalised: a.normalised,
            };
        } else {
            mode = Mode::Normal;
        }
        if a.normalised {
            tier_lines.push("all tiers together offer < 100%: shares normalised".to_owned());
        }
        if let Some((next, moved)) = a.standby {
            tier_lines.push(format!(
                "standby floor {}: {} moved to tier {} to keep it warm",
                pct(tiers::sane_share(p.standby_share)),
                pct(moved),
                weights[next].tier
            ));
        }
    } else {
        mode = match p.panic {
            PanicMode::FailOpen => Mode::PanicFailOpen,
            PanicMode::FailClosed => Mode::FailClosed,
        };
    }

    // Shares per backend.
    if mode == Mode::PanicFailOpen {
        // Fail open stays inside the policy: allowed backends only, at
        // configured weight; draining is an operator's "no", still honoured.
        let open = |c: &Candidate| c.health != BackendHealth::Draining;
        let total: f64 = candidates
            .iter()
            .filter(|c| open(c))
            .map(Candidate::configured)
            .sum();
        if total > 0.0 {
            for (i, c) in candidates.iter().enumerate() {
                if open(c) {
                    shares[i] = c.configured() / total;
                }
            }
        }
    } else {
        for (t, members) in tier_members.values().enumerate() {
            let loaded: f64 = members.iter().map(|&i| candidates[i].loaded()).sum();
            if traffic[t] > 0.0 && loaded > 0.0 {
                for &i in members {
                    shares[i] = traffic[t] * candidates[i].loaded() / loaded;
                }
            }
        }
    }

    let members: Vec<maglev::Member> = candidates
        .iter()
        .zip(&shares)
        .filter(|(_, s)| **s > 0.0)
        .map(|(c, s)| maglev::Member {
            id: c.id,
            weight: to_weight(*s),
            key: maglev::key_hash(&c.backend.name),
        })
        .collect();
    let mut mode = mode;
    let ring_size = p.ring_size;
    let mut build = |members: &[maglev::Member]| {
        if ring_size as usize > RING_MAX {
            notes.push(format!(
                "ring_size {ring_size} exceeds the maximum {RING_MAX}: failing closed"
            ));
            mode = Mode::FailClosed;
            vec![NO_BACKEND; RING_MAX]
        } else {
            match maglev::build(members, ring_size) {
                Ok(ring) => ring,
                Err(e) => {
                    notes.push(format!("{e}: failing closed"));
                    mode = Mode::FailClosed;
                    vec![NO_BACKEND; ring_size as usize]
                }
            }
        }
    };
    let mut ring = build(&members);
    if mode == Mode::FailClosed {
        ring.fill(NO_BACKEND);
    }
    if members.is_empty() && mode == Mode::PanicFailOpen {
        notes.push(
            "every allowed backend is draining or has weight 0: nothing to open to".to_owned(),
        );
        mode = Mode::FailClosed;
    }

    // Last line of defence: whatever happened above, the ring may only
    // hold ids of allowed backends.
    let allowed_ids = {
        let mut v: Vec<u32> = candidates.iter().map(|c| c.id).collect();
        v.sort_unstable();
        v
    };
    let denied_ids = {
        let mut v: Vec<u32> = split
            .excluded
            .iter()
            .filter_map(|(n, _)| ids.get(n).copied())
            .collect();
        v.sort_unstable();
        v
    };
    let leaked = leaked_ids(&ring, &allowed_ids, &denied_ids);
    let sovereignty_ok = leaked.is_empty();
    if !sovereignty_ok {
        ring.fill(NO_BACKEND);
        mode = Mode::FailClosed;
    }
    let sovereignty = sovereignty_line(svc, &split, &leaked);

    let justification = justify(svc, &mode, &candidates, &tier_lines, &notes);
    let tiers_out = weights
        .iter()
        .zip(tier_members.values())
        .enumerate()
        .map(|(t, (w, members))| TierPlan {
            tier: w.tier,
            backends: members.len(),
            healthy: members
                .iter()
                .filter(|&&i| candidates[i].effective() > 0.0)
                .count(),
            health: w.health(),
            traffic: tier_traffic(&mode, &shares, members, traffic[t]),
        })
        .collect::<Vec<_>>();
    let active_tiers = tiers_out
        .iter()
        .filter(|t| t.traffic > tiers::EPSILON)
        .map(|t| t.tier)
        .collect();
    let closed = mode == Mode::FailClosed;
    let backends = candidates
        .iter()
        .zip(&shares)
        .map(|(c, &s)| BackendPlan {
            name: c.backend.name.clone(),
            id: c.id,
            ipv6: c.backend.address.is_ipv6(),
            tier: c.backend.tier,
            health: c.health,
            load: c.load,
            share: if closed { 0.0 } else { s },
            weight: if closed || s <= 0.0 { 0 } else { to_weight(s) },
            effective_weight: match &mode {
                _ if closed || s <= 0.0 => 0,
                Mode::PanicFailOpen => c.backend.weight,
                _ => c.health.loaded_weight(c.backend.weight, c.load),
            },
        })
        .collect();
    ServicePlan {
        service: svc.name.clone(),
        mode,
        mode6: None,
        active_tiers: if closed { Vec::new() } else { active_tiers },
        tiers: tiers_out,
        backends,
        ring,
        ring6: None,
        justification,
        sovereignty,
        sovereignty_ok,
    }
}

/// A tier's traffic as placed: from the backends' shares when panicking
/// (tiers are ignored there), from the allocation otherwise.
fn tier_traffic(mode: &Mode, shares: &[f64], members: &[usize], allocated: f64) -> f64 {
    match mode {
        Mode::FailClosed => 0.0,
        Mode::PanicFailOpen => members.iter().map(|&i| shares[i]).sum(),
        _ => allocated,
    }
}

/// A positive share never rounds to weight 0: it would vanish from the ring.
fn to_weight(share: f64) -> u32 {
    ((share * WEIGHT_SCALE).round() as u32).max(1)
}

/// Ids in the ring that are not allowed (or are also a denied backend's id:
/// a broken id map must not leak either).
fn leaked_ids(ring: &[u32], allowed: &[u32], denied: &[u32]) -> Vec<u32> {
    let mut leaked: Vec<u32> = Vec::new();
    let mut last_ok = NO_BACKEND;
    for &id in ring {
        // Rings repeat ids: skip the lookups for a repeat of the last one.
        if id == NO_BACKEND || id == last_ok {
            continue;
        }
        if allowed.binary_search(&id).is_ok() && denied.binary_search(&id).is_err() {
            last_ok = id;
        } else if !leaked.contains(&id) {
            leaked.push(id);
        }
    }
    leaked
}

fn sovereignty_line(svc: &Service, split: &policy::Split, leaked: &[u32]) -> String {
    let mut s = if leaked.is_empty() {
        format!(
            "sovereignty ok ({}): {}/{} pool backends allowed",
            policy::describe(&svc.policy),
            split.allowed.len(),
            split.allowed.len() + split.excluded.len()
        )
    } else {
        format!(
            "sovereignty VIOLATION caught ({}): ring held disallowed ids {leaked:?}; ring emptied",
            policy::describe(&svc.policy)
        )
    };
    if !split.excluded.is_empty() {
        let ex: Vec<String> = split
            .excluded
            .iter()
            .map(|(n, why)| format!("{n} ({why})"))
            .collect();
        let _ = write!(s, "; excluded: {}", ex.join(", "));
    }
    s
}

fn justify(
    svc: &Service,
    mode: &Mode,
    candidates: &[Candidate],
    tier_lines: &[String],
    notes: &[String],
) -> String {
    let mut parts: Vec<String> = Vec::new();
    let count = |h: BackendHealth| candidates.iter().filter(|c| c.health == h).count();
    let healthy = candidates.iter().filter(|c| c.effective() > 0.0).count();
    match mode {
        Mode::FailClosed if candidates.is_empty() => {
            parts.push("fail closed: the policy allows no backend of the pool".to_owned());
        }
        Mode::FailClosed if healthy == 0 => parts.push(format!(
            "fail closed: none of {} allowed backends healthy ({} down, {} draining)",
            candidates.len(),
            count(BackendHealth::Down),
            count(BackendHealth::Draining)
        )),
        Mode::FailClosed => parts.push("fail closed".to_owned()),
        Mode::PanicFailOpen => parts.push(format!(
            "panic, fail open: no allowed backend healthy; all {} allowed non-draining backends take traffic",
            candidates
                .iter()
                .filter(|c| c.health != BackendHealth::Draining && c.configured() > 0.0)
                .count()
        )),
        Mode::Normal | Mode::Spill { .. } | Mode::Override { .. } => {}
    }
    if !matches!(mode, Mode::FailClosed | Mode::PanicFailOpen) {
        parts.extend(tier_lines.iter().cloned());
    }
    parts.extend(notes.iter().cloned());
    if parts.is_empty() {
        parts.push(format!("{}: nothing to do", svc.name));
    }
    parts.join("; ")
}

/// 0.7 -> "70%", 0.125 -> "12.5%".
fn pct(x: f64) -> String {
    let p = (x * 1000.0).round() / 10.0;
    if p.fract() == 0.0 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}
