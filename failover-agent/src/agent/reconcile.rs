//! What to write: pure functions from (what is decided, what the data
//! plane holds) to the ordered list of data-plane [`Write`]s. Nothing here
//! touches a map; [`super::execute`] performs the writes and
//! [`super::apply`] records each one that succeeded in [`Current`].
//!
//! The order, chosen so a packet never meets a worse state than the one
//! decided (the module doc of [`super::apply`] says why):
//! 1. [`take_out`]: backends decided down for good get `DOWN`, one write
//!    each, before any planning. This alone is the failover.
//! 2. [`reconcile`]: plans the affected services, then lists
//!    - `UP`/`DRAINING` for the backends that take traffic now,
//!    - each changed ring into its inactive slot, then the `SERVICES`
//!      write that flips to it,
//!    - the VIP filter, when the set of VIPs changed,
//!    - `DOWN` for the other backends leaving service;
//!
//!    then, once its flips are recorded, [`release`]: `UNUSED` for ids no
//!    ring refers to any more.
//! 3. The nudges of the clients of the backends taken out in 1, a little
//!    later (the run loop's `NUDGE_DELAY`).
//!
//! Keep-last-good: while a start-up hold runs, held services are not
//! planned and a backend without a verdict keeps the state it was found
//! in.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use failover_common::{
    Addr6, Backend as MapBackend, NO_BACKEND, Node, Node6, SVC_F_RESET, Service as MapService,
};

use super::{
    apply::Decision,
    grace::Graces,
    ids::{self, BackendEndpoint, Ids, VipKey},
    operator_state::OperatorState,
    states::DataplaneState,
};
use crate::{
    audit::WeightChange,
    config::{self, Config, OnBackendDown},
    health::HealthState,
    load,
    planner::{self, BackendHealth, HealthView, Mode, ServicePlan},
};

/// One data-plane write.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// `NODE`: SNAT address, ports and hash seed.
    Node(Node),
    /// `NODE6`: the IPv6 SNAT address (all zero: none).
    Node6(Node6),
    /// A new or moved IPv6 backend's address (`BACKEND_ADDR6`), written
    /// before its `BACKENDS` entry: its state never points at a stale
    /// address.
    BackendAddr6 { id: u32, addr: Addr6 },
    /// A new or moved backend's whole `BACKENDS` entry.
    Backend { id: u32, entry: MapBackend },
    /// A backend's state change: its entry as written before, with the
    /// new state (one write, no read).
    State { id: u32, entry: MapBackend },
    /// A service's next ring, into the slot packets do not read.
    Ring {
        service_id: u32,
        slot: u32,
        ring: Vec<u32>,
    },
    /// One `SERVICES` write that switches `service` to the ring written
    /// before (packets see the old ring or the new one, never a mix).
    Flip {
        service: String,
        next: Box<Programmed>,
    },
    /// A service no longer in the config, or at a new endpoint.
    RemoveService { id: u32, key: VipKey },
    /// The VIP pre-filter, replaced whole (both families share it).
    VipFilter(Vec<IpAddr>),
    /// A released backend id: `UNUSED`.
    Unused { id: u32, entry: MapBackend },
    /// Prompts the TCP clients of backends gone down (best effort).
    Nudge { backend_ids: Vec<u32> },
    /// `PATH_MSS`: the MSS clamped into handshakes toward a backend (its
    /// `path_mtu` less 40; 0: none). Written before the backend's entry,
    /// so its first SYN is clamped.
    PathMss { id: u32, mss: u32 },
}

impl Write {
    /// The state this write gives a backend, if it writes one.
    pub fn backend_state(&self) -> Option<(u32, DataplaneState)> {
        match self {
            Self::Backend { id, entry }
            | Self::State { id, entry }
            | Self::Unused { id, entry } => Some((*id, DataplaneState::from_raw(entry.state))),
            _ => None,
        }
    }
}

/// One line per write, for logs and tests: `state 3 down`, `ring 0 slot
/// 1`, `flip web slot 1 gen 2`.
impl fmt::Display for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = |e: &MapBackend| DataplaneState::from_raw(e.state);
        match self {
            Self::Node(_) => write!(f, "node"),
            Self::Node6(n) => write!(f, "node6 {}", ids::ipv6_of(n.snat)),
            Self::BackendAddr6 { id, addr } => write!(f, "addr6 {id} {}", ids::ipv6_of(*addr)),
            Self::Backend { id, entry } if entry.addr_be == 0 => {
                // An IPv6 backend: the address is the `addr6` write's.
                let port = u16::from_be(entry.port_be);
                write!(f, "backend {id} [addr6 {id}]:{port} {}", st(entry))
            }
            Self::Backend { id, entry } => {
                let ep = BackendEndpoint::from_map(entry, None);
                write!(f, "backend {id} {}:{} {}", ep.addr, ep.port, st(entry))
            }
            Self::State { id, entry } => write!(f, "state {id} {}", st(entry)),
            Self::Ring {
                service_id, slot, ..
            } => write!(f, "ring {service_id} slot {slot}"),
            Self::Flip { service, next } => write!(
                f,
                "flip {service} slot {} gen {}",
                next.entry.active_slot, next.entry.generation
            ),
            Self::RemoveService { id, .. } => write!(f, "remove service {id}"),
            Self::VipFilter(vips) => {
                let v: Vec<String> = vips.iter().map(ToString::to_string).collect();
                write!(f, "vips {}", v.join(","))
            }
            Self::Unused { id, .. } => write!(f, "unused {id}"),
            Self::Nudge { backend_ids } => {
                let v: Vec<String> = backend_ids.iter().map(ToString::to_string).collect();
                write!(f, "nudge {}", v.join(","))
            }
            Self::PathMss { id, mss } => write!(f, "mss {id} {mss}"),
        }
    }
}

/// A service as it is in the data plane.
#[derive(Clone, Debug, PartialEq)]
pub struct Programmed {
    pub key: VipKey,
    pub entry: MapService,
    /// The active ring, `entry.ring_size` entries.
    pub ring: Vec<u32>,
    /// Backends taking new flows.
    pub to: Vec<String>,
    /// Backend ids in the ring because the service fails open: they must
    /// be `UP` in `BACKENDS` though their health is down.
    pub open: Vec<u32>,
    /// Effective weight of each backend in `to` (the plan's
    /// [`planner::BackendPlan::effective_weight`]); empty for a ring
    /// recovered from the pins, until it is planned.
    pub weights: BTreeMap<String, u32>,
}

/// What the data plane holds, as this agent wrote it (or found it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Current {
    pub services: BTreeMap<String, Programmed>,
    /// `BACKENDS` entries in use, as written: a state change is then one
    /// write, no read.
    pub backends: BTreeMap<u32, MapBackend>,
    /// `BACKEND_ADDR6` entries of the IPv6 backends in `backends`.
    pub addr6: BTreeMap<u32, Addr6>,
    /// The VIP filter, once this agent wrote it.
    pub vips: Option<Vec<IpAddr>>,
    /// `PATH_MSS` entries this agent wrote.
    pub path_mss: BTreeMap<u32, u32>,
}

impl Current {
    /// Records a write that succeeded.
    pub fn record(&mut self, w: Write) {
        match w {
            Write::Backend { id, entry } | Write::State { id, entry } => {
                self.backends.insert(id, entry);
            }
            Write::Unused { id, .. } => {
                self.backends.remove(&id);
                self.addr6.remove(&id);
            }
            Write::BackendAddr6 { id, addr } => {
                self.addr6.insert(id, addr);
            }
            Write::Flip { service, next } => {
                self.services.insert(service, *next);
            }
            Write::RemoveService { id, key } => {
                self.services
                    .retain(|_, p| !(p.key == key && p.entry.id == id));
            }
            Write::VipFilter(vips) => self.vips = Some(vips),
            Write::PathMss { id, mss: 0 } => {
                self.path_mss.remove(&id);
            }
            Write::PathMss { id, mss } => {
                self.path_mss.insert(id, mss);
            }
            Write::Node(_) | Write::Node6(_) | Write::Ring { .. } | Write::Nudge { .. } => {}
        }
    }

    /// A backend's state in `BACKENDS`; `None` when its id is not in use.
    pub fn state(&self, id: u32) -> Option<DataplaneState> {
        self.backends
            .get(&id)
            .map(|b| DataplaneState::from_raw(b.state))
    }

    /// The endpoint backend `id` has in the data plane, if in use.
    pub fn endpoint(&self, id: u32) -> Option<BackendEndpoint> {
        let b = self.backends.get(&id)?;
        Some(BackendEndpoint::from_map(b, self.addr6.get(&id).copied()))
    }

    /// Whether backend `id` takes flows (`UP` or `DRAINING`).
    pub fn serving(&self, id: u32) -> bool {
        self.state(id).is_some_and(DataplaneState::is_serving)
    }

    /// The write giving backend `id` state `to`, unless it has it (or its
    /// id is not in use).
    pub fn set_state(&self, id: u32, to: DataplaneState) -> Option<Write> {
        let b = self.backends.get(&id)?;
        (b.state != to.raw()).then(|| Write::State {
            id,
            entry: MapBackend {
                state: to.raw(),
                ..*b
            },
        })
    }

    /// Names of the backends in `ring` (`#id` for an id without a name).
    pub fn names_in(ids: &Ids, ring: &[u32]) -> Vec<String> {
        let set: BTreeSet<u32> = ring.iter().copied().filter(|&i| i != NO_BACKEND).collect();
        let mut names: Vec<String> = set
            .iter()
            .map(|&id| {
                ids.backend_name(id)
                    .map_or_else(|| format!("#{id}"), str::to_owned)
            })
            .collect();
        names.sort();
        names
    }
}

/// What the agent knows and the operator decided, as the reconciler reads it.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub cfg: &'a Config,
    pub ids: &'a Ids,
    /// Last verdict per backend; absent: no verdict yet.
    pub health: &'a BTreeMap<String, HealthState>,
    /// Load factors applied (`crate::load`).
    pub load: &'a load::Tracker,
    pub operator: &'a OperatorState,
    /// Backends down as sick, `DRAINING` until their grace ends.
    pub graces: &'a Graces,
    /// Recovered services kept as found (start-up hold).
    pub held: &'a BTreeSet<String>,
    /// A start-up hold runs: a backend without a verdict keeps its state.
    pub holding: bool,
}

/// The planner's view of every backend: drained, or its verdict; and the
/// load factor of each with a load facet.
pub fn health_view(
    cfg: &Config,
    operator: &OperatorState,
    health: &BTreeMap<String, HealthState>,
    load: &load::Tracker,
) -> HealthView {
    let mut v = HealthView::new();
    for (b, factor) in load.factors() {
        v.set_load(b, factor);
    }
    for b in &cfg.backends {
        if operator.is_drained(&b.name) {
            v.set(b.name.clone(), BackendHealth::Draining);
            continue;
        }
        match health.get(&b.name) {
            Some(HealthState::Up) => v.set(b.name.clone(), BackendHealth::Up),
            Some(HealthState::Degraded) => v.set(
                b.name.clone(),
                BackendHealth::Degraded {
                    weight_factor: cfg.probe_of(&b.name).map_or(
                        config::Probe::DEFAULT_DEGRADED_WEIGHT,
                        config::Probe::degraded_weight,
                    ),
                },
            ),
            Some(HealthState::Down) => v.set(b.name.clone(), BackendHealth::Down),
            Some(HealthState::Unknown) | None => {}
        }
    }
    v
}

/// Step 1, the microsecond failover: of `backends`, those down for good
/// (dead, or their slow grace over; a drain does not keep a dead
/// backend's flows waiting) and still serving get `DOWN`, one write each.
pub fn take_out(inp: &Inputs<'_>, cur: &Current, backends: &[String]) -> Vec<Write> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for name in backends {
        let down = inp.health.get(name) == Some(&HealthState::Down) && !inp.graces.contains(name);
        let Some(id) = inp.ids.backend(name).map(|a| a.id) else {
            continue;
        };
        if down && seen.insert(id) && cur.serving(id) {
            out.extend(cur.set_state(id, DataplaneState::Down));
        }
    }
    out
}

/// `BACKENDS` entries for every config backend without a matching one
/// (a new id, or one whose endpoint moved): `DOWN` until a first verdict.
/// An IPv6 backend's address (`BACKEND_ADDR6`) goes first.
pub fn new_backends(ids: &Ids, cur: &Current) -> Vec<Write> {
    ids.backends()
        .filter(|(_, a)| {
            cur.backends.get(&a.id).is_none_or(|b| {
                cur.endpoint(a.id) != Some(a.endpoint)
                    || DataplaneState::from_raw(b.state) == DataplaneState::Unused
            })
        })
        .flat_map(|(_, a)| {
            let addr = a
                .endpoint
                .addr6()
                .filter(|addr| cur.addr6.get(&a.id) != Some(addr))
                .map(|addr| Write::BackendAddr6 { id: a.id, addr });
            addr.into_iter().chain([Write::Backend {
                id: a.id,
                entry: a.endpoint.to_map(DataplaneState::Down.raw()),
            }])
        })
        .collect()
}

/// `PATH_MSS` for every config backend whose clamp differs from the one
/// its id has (`path_mtu` less 40; 0, no clamp, without one). An id
/// never written holds 0; `cur` knows the others, from the pins after a
/// restart, so an id reused by another backend never keeps a stale clamp.
pub fn path_mss(cfg: &Config, ids: &Ids, cur: &Current) -> Vec<Write> {
    cfg.backends
        .iter()
        .filter_map(|b| {
            let id = ids.backend(&b.name)?.id;
            let mss = b.path_mss();
            let now = cur.path_mss.get(&id).copied().unwrap_or(0);
            (now != mss).then_some(Write::PathMss { id, mss })
        })
        .collect()
}

/// Services programmed but gone from `ids`, or at a new VIP/port (a new
/// id): they leave before anything is planned. Returns their names and
/// the writes.
pub fn gone_services(ids: &Ids, cur: &Current) -> Vec<(String, Write)> {
    cur.services
        .iter()
        .filter(|(name, p)| {
            ids.service(name)
                .is_none_or(|s| s.id != p.entry.id || s.endpoint.key() != p.key)
        })
        .map(|(name, p)| {
            (
                name.clone(),
                Write::RemoveService {
                    id: p.entry.id,
                    key: p.key,
                },
            )
        })
        .collect()
}

fn service_flags(s: &config::Service) -> u32 {
    match s.policy.on_backend_down {
        OnBackendDown::Reset => SVC_F_RESET,
        OnBackendDown::Reselect => 0,
    }
}

/// Effective weight of each backend a plan gives new flows to.
pub fn weights_of(plan: &ServicePlan) -> BTreeMap<String, u32> {
    plan.backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| (b.name.clone(), b.effective_weight))
        .collect()
}

/// Backends taking new flows before and after whose effective weight
/// changed (one only in `after` or `before` shows in `to` or `from`).
pub fn weight_changes(
    before: &BTreeMap<String, u32>,
    after: &BTreeMap<String, u32>,
) -> Vec<WeightChange> {
    after
        .iter()
        .filter_map(|(name, &to)| {
            let &from = before.get(name)?;
            (from != to).then(|| WeightChange {
                backend: name.clone(),
                from,
                to,
                load: None,
            })
        })
        .collect()
}

/// A ring switched, for the logs and the audit log.
#[derive(Clone, Debug, PartialEq)]
pub struct Switch {
    pub service: String,
    pub generation: u64,
    /// Backends taking new flows before and after.
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub weights: Vec<WeightChange>,
    pub mode: Mode,
    /// A dual-stack service's `vip6` mode.
    pub mode6: Option<Mode>,
    pub justification: String,
    pub sovereignty: String,
}

/// A service planned again whose ring stays as it is: what it knows now.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    pub service: String,
    pub open: Vec<u32>,
    pub weights: BTreeMap<String, u32>,
}

/// Step 2's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reconciled {
    /// In the order they must happen.
    pub writes: Vec<Write>,
    /// Rings switched by the `Flip`s in `writes`, in their order.
    pub switched: Vec<Switch>,
    /// Services planned whose ring stays.
    pub kept: Vec<Kept>,
}

/// A service's next state, before it is written.
struct Next {
    name: String,
    /// One per VIP: `vip`'s, then a dual-stack service's `vip6`'s.
    vips: Vec<NextVip>,
    plan: ServicePlan,
    to: Vec<String>,
    open: Vec<u32>,
    changed: bool,
}

/// One VIP's data-plane service, before it is written.
struct NextVip {
    /// Its name in [`Ids`] and [`Current`] ([`ids::v6_key`] for `vip6`).
    name: String,
    key: VipKey,
    entry: MapService,
    ring: Vec<u32>,
}

/// Step 2: plans the services `d` touches (every one when `d.all`, and
/// any not programmed yet) and lists the writes that bring the data plane
/// there from `cur` (see the module doc for their order).
pub fn reconcile(inp: &Inputs<'_>, cur: &Current, d: &Decision) -> Reconciled {
    let mut out = Reconciled::default();
    let view = health_view(inp.cfg, inp.operator, inp.health, inp.load);
    let bids = inp.ids.backend_ids();
    let overrides = inp.operator.overrides();
    let mut next: Vec<Next> = Vec::new();
    for svc in &inp.cfg.services {
        if inp.held.contains(&svc.name) || inp.held.contains(&ids::v6_key(&svc.name)) {
            continue;
        }
        let known = cur.services.get(&svc.name);
        let touched =
            d.all || known.is_none() || svc.backends.iter().any(|b| d.backends.contains(b));
        if !touched {
            continue;
        }
        let Some(sid) = inp.ids.service(&svc.name) else {
            continue;
        };
        let plan = planner::plan_service(inp.cfg, svc, &view, &bids, &overrides);
        let flags = service_flags(svc);
        let ring_size = plan.ring.len() as u32;
        let half_open_ms =
            u32::try_from(svc.timeouts.tcp_half_open.as_millis()).unwrap_or(u32::MAX);
        let mut vips = vec![(svc.name.clone(), sid, plan.ring.clone())];
        if let (Some(ring6), Some(sid6)) =
            (plan.ring6.clone(), inp.ids.service(&ids::v6_key(&svc.name)))
        {
            vips.push((ids::v6_key(&svc.name), sid6, ring6));
        }
        // A dual-stack service's VIPs flip together: one plan, one switch.
        let mut changed = false;
        let vips: Vec<NextVip> = vips
            .into_iter()
            .map(|(name, sid, ring)| {
                let known = cur.services.get(&name);
                let key = sid.endpoint.key();
                changed |= known.is_none_or(|p| {
                    p.ring != ring
                        || p.key != key
                        || p.entry.id != sid.id
                        || p.entry.flags != flags
                        || p.entry.ring_size != ring_size
                });
                let (active_slot, generation) = match known {
                    Some(p) if p.key == key && p.entry.id == sid.id => {
                        (p.entry.active_slot, p.entry.generation)
                    }
                    _ => (1, 0), // flips to slot 0, generation 1
                };
                NextVip {
                    name,
                    key,
                    entry: MapService {
                        id: sid.id,
                        flags,
                        active_slot,
                        ring_size,
                        generation,
                        half_open_ms,
                        _pad: 0,
                    },
                    ring,
                }
            })
            .collect();
        let to: Vec<String> = plan
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| b.name.clone())
            .collect();
        // Each family of a dual-stack service panics on its own.
        let open = plan
            .backends
            .iter()
            .filter(|b| b.weight > 0 && *plan.mode_of(b.ipv6) == Mode::PanicFailOpen)
            .map(|b| b.id)
            .collect();
        next.push(Next {
            name: svc.name.clone(),
            vips,
            plan,
            to,
            open,
            changed,
        });
    }

    // Target states, from every service's fail-open set.
    let mut open: BTreeSet<u32> = BTreeSet::new();
    for (name, p) in &cur.services {
        if !next.iter().any(|n| n.vips.iter().any(|v| &v.name == name)) {
            open.extend(&p.open);
        }
    }
    for n in &next {
        open.extend(&n.open);
    }
    let mut raise = Vec::new();
    let mut lower = Vec::new();
    for (name, a) in inp.ids.backends() {
        let Some(cur_state) = cur.state(a.id) else {
            continue;
        };
        let grace = inp.graces.contains(name);
        let want = match inp.health.get(name) {
            // Dead, or its slow grace over: its flows go, drained or not.
            Some(HealthState::Down) if !grace && !open.contains(&a.id) => DataplaneState::Down,
            _ if inp.operator.is_drained(name) => DataplaneState::Draining,
            Some(HealthState::Up | HealthState::Degraded) => DataplaneState::Up,
            _ if open.contains(&a.id) => DataplaneState::Up,
            // Down as sick: its streams in progress finish first.
            Some(HealthState::Down) => DataplaneState::Draining,
            // No verdict yet: a restarted agent keeps what it found.
            Some(HealthState::Unknown) | None if inp.holding => cur_state,
            Some(HealthState::Unknown) | None => DataplaneState::Down,
        };
        let Some(w) = cur.set_state(a.id, want) else {
            continue;
        };
        if want == DataplaneState::Down {
            lower.push(w);
        } else {
            raise.push(w);
        }
    }
    out.writes.extend(raise);

    // The rings that changed: inactive slot, then the flip, per VIP.
    for n in next {
        if !n.changed {
            let weights = weights_of(&n.plan);
            for v in n.vips {
                out.kept.push(Kept {
                    weights: weights.clone(),
                    service: v.name,
                    open: n.open.clone(),
                });
            }
            continue;
        }
        let (from, from_weights) = cur
            .services
            .get(&n.name)
            .map(|p| (p.to.clone(), p.weights.clone()))
            .unwrap_or_default();
        let weights = weights_of(&n.plan);
        let mut generation = 0;
        let mut flips = Vec::new();
        for v in n.vips {
            let slot = v.entry.active_slot ^ 1;
            out.writes.push(Write::Ring {
                service_id: v.entry.id,
                slot,
                ring: v.ring.clone(),
            });
            let entry = MapService {
                active_slot: slot,
                generation: v.entry.generation + 1,
                ..v.entry
            };
            generation = generation.max(entry.generation);
            flips.push(Write::Flip {
                service: v.name,
                next: Box::new(Programmed {
                    key: v.key,
                    entry,
                    ring: v.ring,
                    to: n.to.clone(),
                    open: n.open.clone(),
                    weights: weights.clone(),
                }),
            });
        }
        out.switched.push(Switch {
            service: n.name.clone(),
            generation,
            from,
            to: n.to.clone(),
            weights: weight_changes(&from_weights, &weights),
            mode: n.plan.mode,
            mode6: n.plan.mode6,
            justification: n.plan.justification,
            sovereignty: n.plan.sovereignty,
        });
        // The `vip6` flip first: the service's own (`vip`) flip is last,
        // and with it the service counts as switched.
        out.writes.extend(flips.into_iter().rev());
    }

    // The VIP filter, once the services at new VIPs are in place.
    if d.all {
        let vips: Vec<IpAddr> = inp
            .cfg
            .services
            .iter()
            .flat_map(config::Service::vips)
            .collect();
        if cur.vips.as_ref() != Some(&vips) {
            out.writes.push(Write::VipFilter(vips));
        }
    }

    // Leave service ([`release`] frees ids once the flips are done).
    out.writes.extend(lower);
    out
}

/// Step 2's last writes, once its flips are recorded in `cur`: `UNUSED`
/// for the ids no longer in the config that no ring refers to any more.
/// A held (recovered) ring may still name a removed backend: its id is
/// freed only once no ring does, so it is never handed on early. Apart
/// from [`reconcile`] so that reading every ring never delays a flip.
pub fn release(ids: &Ids, cur: &Current) -> Vec<Write> {
    let Some(&max) = cur.backends.keys().next_back() else {
        return Vec::new();
    };
    let mut live = vec![false; max as usize + 1];
    let mut mark = |id: u32| {
        if let Some(l) = live.get_mut(id as usize) {
            *l = true;
        }
    };
    for (_, a) in ids.backends() {
        mark(a.id);
    }
    for p in cur.services.values() {
        for &id in &p.ring {
            mark(id);
        }
    }
    cur.backends
        .iter()
        .filter(|&(&id, _)| !live[id as usize])
        .map(|(&id, b)| Write::Unused {
            id,
            entry: MapBackend {
                state: DataplaneState::Unused.raw(),
                ..*b
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reweight_is_a_weight_change_and_new_or_gone_backends_are_not() {
        let w = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect()
        };
        assert_eq!(
            weight_changes(
                &w(&[("a1", 100), ("a2", 100), ("b1", 50)]),
                &w(&[("a1", 50), ("a2", 100), ("c1", 10)])
            ),
            [WeightChange {
                backend: "a1".into(),
                from: 100,
                to: 50,
                load: None
            }]
        );
        assert!(weight_changes(&BTreeMap::new(), &w(&[("a1", 100)])).is_empty());
    }
}
