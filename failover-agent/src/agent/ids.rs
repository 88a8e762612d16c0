//! Stable data-plane ids for services and backends.
//!
//! A flow in `FLOWS` remembers its backend by id, so an id must keep
//! meaning the same address across config reloads and agent restarts, or
//! established flows would silently move to another backend. Ids are tied
//! to what the data plane sees (a backend's address and port, a service's
//! VIP, port and protocol), not only to names:
//! - on reload, an entry keeps its id when its name and endpoint are
//!   unchanged, or when only its name changed (a rename keeps its flows);
//! - on restart, the agent knows no names: ids are recovered from the
//!   pinned `SERVICES` and `BACKENDS` maps by endpoint;
//! - an entry whose endpoint changed gets a fresh id, so flows pinned to
//!   the old address are reset or moved rather than sent elsewhere.
//!
//! Fresh ids come from a rotating cursor and avoid ids released just now:
//! a released backend id keeps its old flows until they hit its UNUSED
//! state, and must not hand them to a newcomer meanwhile.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use failover_common::{Addr6, MAX_BACKENDS, MAX_SERVICES, ServiceKey, state};

use crate::config::{Config, Protocol};
use crate::planner::BackendIds;

/// An IPv6 address as the maps hold it ([`Addr6`]): its network-order
/// bytes in four native words.
pub fn addr6(a: Ipv6Addr) -> Addr6 {
    let o = a.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The IPv6 address a map's [`Addr6`] holds.
pub fn ipv6_of(a: Addr6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// An IPv4 address as the maps hold it (network order).
pub fn addr4(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// The IPv4 address of a map's network-order word.
pub fn ipv4_of(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(a))
}

/// Where a backend id sends traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendEndpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl BackendEndpoint {
    pub fn of(b: &crate::config::Backend) -> Self {
        Self {
            addr: b.address,
            port: b.port,
        }
    }

    /// The endpoint of a `BACKENDS` entry: an IPv6 backend's (`addr_be`
    /// 0) address is `BACKEND_ADDR6[id]`, `addr6`.
    pub fn from_map(b: &failover_common::Backend, addr6: Option<Addr6>) -> Self {
        let addr = match addr6 {
            Some(a) if b.addr_be == 0 => IpAddr::V6(ipv6_of(a)),
            _ => IpAddr::V4(ipv4_of(b.addr_be)),
        };
        Self {
            addr,
            port: u16::from_be(b.port_be),
        }
    }

    /// The `BACKENDS` entry for this endpoint in `st` (`addr_be` 0 for an
    /// IPv6 backend, whose address is in `BACKEND_ADDR6`).
    pub fn to_map(self, st: u8) -> failover_common::Backend {
        failover_common::Backend {
            addr_be: match self.addr {
                IpAddr::V4(a) => addr4(a),
                IpAddr::V6(_) => 0,
            },
            port_be: self.port.to_be(),
            state: st,
            _pad: 0,
        }
    }

    /// The `BACKEND_ADDR6` entry of an IPv6 backend.
    pub fn addr6(self) -> Option<Addr6> {
        match self.addr {
            IpAddr::V4(_) => None,
            IpAddr::V6(a) => Some(addr6(a)),
        }
    }
}

/// A `SERVICES` or `SERVICES6` key: the map is that of the VIP's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VipKey {
    V4(ServiceKey),
    V6(ServiceKey<Addr6>),
}

/// The data-plane name of a dual-stack service's IPv6 VIP: its own
/// service id, ring and `SERVICES6` entry, planned with the service
/// (`web` and `web/v6`; a config name has no `/`).
pub fn v6_key(name: &str) -> String {
    format!("{name}{V6_SUFFIX}")
}

const V6_SUFFIX: &str = "/v6";

/// The config service a data-plane name belongs to (`web/v6` -> `web`).
pub fn base_name(key: &str) -> &str {
    key.strip_suffix(V6_SUFFIX).unwrap_or(key)
}

/// What clients address a service by: its `SERVICES` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceEndpoint {
    pub vip: IpAddr,
    pub port: u16,
    /// IP protocol number (6 or 17).
    pub proto: u8,
}

impl ServiceEndpoint {
    /// The endpoint of `s`'s `vip`.
    pub fn of(s: &crate::config::Service) -> Self {
        Self::at(s, s.vip)
    }

    /// The endpoint of `s` at one of its VIPs.
    pub fn at(s: &crate::config::Service, vip: IpAddr) -> Self {
        Self {
            vip,
            port: s.port,
            proto: match s.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            },
        }
    }

    pub fn from_key(k: &VipKey) -> Self {
        match k {
            VipKey::V4(k) => Self {
                vip: IpAddr::V4(ipv4_of(k.vip_be)),
                port: u16::from_be(k.port_be),
                proto: k.proto,
            },
            VipKey::V6(k) => Self {
                vip: IpAddr::V6(ipv6_of(k.vip_be)),
                port: u16::from_be(k.port_be),
                proto: k.proto,
            },
        }
    }

    pub fn key(self) -> VipKey {
        let (port_be, proto) = (self.port.to_be(), self.proto);
        match self.vip {
            IpAddr::V4(a) => VipKey::V4(ServiceKey {
                vip_be: addr4(a),
                port_be,
                proto,
                _pad: 0,
            }),
            IpAddr::V6(a) => VipKey::V6(ServiceKey {
                vip_be: addr6(a),
                port_be,
                proto,
                _pad: 0,
            }),
        }
    }
}

/// An id and the endpoint it was given for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assigned<E> {
    pub id: u32,
    pub endpoint: E,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Validation bounds the counts, so this means a config that skipped it.
    #[error("no free {what} id: the data plane holds at most {cap}")]
    Exhausted { what: &'static str, cap: u32 },
}

/// Name -> id for every service and backend of one config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    services: BTreeMap<String, Assigned<ServiceEndpoint>>,
    backends: BTreeMap<String, Assigned<BackendEndpoint>>,
    next_service: u32,
    next_backend: u32,
}

/// An id held before this assignment (name unknown when recovered from maps).
struct Previous<'a, E> {
    name: Option<&'a str>,
    id: u32,
    endpoint: E,
}

impl Ids {
    /// First assignment of a fresh agent: ids recovered from the pinned
    /// maps by endpoint, fresh ones for the rest. `pinned_backends` lists
    /// the `BACKENDS` slots in use (state other than UNUSED), `addr6` the
    /// `BACKEND_ADDR6` entries of the IPv6 ones.
    pub fn recover(
        cfg: &Config,
        pinned_services: &[(VipKey, failover_common::Service)],
        pinned_backends: &[(u32, failover_common::Backend)],
        addr6: &BTreeMap<u32, Addr6>,
    ) -> Result<Self, IdError> {
        let prev_s: Vec<Previous<ServiceEndpoint>> = pinned_services
            .iter()
            .filter(|(_, s)| s.id < MAX_SERVICES)
            .map(|(k, s)| Previous {
                name: None,
                id: s.id,
                endpoint: ServiceEndpoint::from_key(k),
            })
            .collect();
        let prev_b: Vec<Previous<BackendEndpoint>> = pinned_backends
            .iter()
            .filter(|(id, b)| *id < MAX_BACKENDS && b.state != state::UNUSED)
            .map(|(id, b)| Previous {
                name: None,
                id: *id,
                endpoint: BackendEndpoint::from_map(b, addr6.get(id).copied()),
            })
            .collect();
        // Continue after the highest id in use, as the previous agent would.
        let after =
            |ids: &mut dyn Iterator<Item = u32>, cap: u32| ids.max().map_or(0, |m| (m + 1) % cap);
        let mut ids = Self {
            next_service: after(&mut prev_s.iter().map(|p| p.id), MAX_SERVICES),
            next_backend: after(&mut prev_b.iter().map(|p| p.id), MAX_BACKENDS),
            ..Self::default()
        };
        ids.fill(cfg, &prev_s, &prev_b)?;
        Ok(ids)
    }

    /// The assignment for a reloaded config, keeping every id it can.
    pub fn update(&self, cfg: &Config) -> Result<Self, IdError> {
        let prev_s: Vec<Previous<ServiceEndpoint>> = self
            .services
            .iter()
            .map(|(n, a)| Previous {
                name: Some(n.as_str()),
                id: a.id,
                endpoint: a.endpoint,
            })
            .collect();
        let prev_b: Vec<Previous<BackendEndpoint>> = self
            .backends
            .iter()
            .map(|(n, a)| Previous {
                name: Some(n.as_str()),
                id: a.id,
                endpoint: a.endpoint,
            })
            .collect();
        let mut ids = Self {
            next_service: self.next_service,
            next_backend: self.next_backend,
            ..Self::default()
        };
        ids.fill(cfg, &prev_s, &prev_b)?;
        Ok(ids)
    }

    fn fill(
        &mut self,
        cfg: &Config,
        prev_s: &[Previous<ServiceEndpoint>],
        prev_b: &[Previous<BackendEndpoint>],
    ) -> Result<(), IdError> {
        // A dual-stack service's IPv6 VIP is a data-plane service of its
        // own ([`v6_key`]).
        let dual: Vec<(String, ServiceEndpoint)> = cfg
            .services
            .iter()
            .filter_map(|s| {
                let v6 = s.vip6?;
                Some((v6_key(&s.name), ServiceEndpoint::at(s, IpAddr::V6(v6))))
            })
            .collect();
        let want_s: Vec<(&str, ServiceEndpoint)> = cfg
            .services
            .iter()
            .map(|s| (s.name.as_str(), ServiceEndpoint::of(s)))
            .chain(dual.iter().map(|(n, e)| (n.as_str(), *e)))
            .collect();
        let want_b: Vec<(&str, BackendEndpoint)> = cfg
            .backends
            .iter()
            .map(|b| (b.name.as_str(), BackendEndpoint::of(b)))
            .collect();
        self.services = assign(
            &want_s,
            prev_s,
            MAX_SERVICES,
            &mut self.next_service,
            "service",
        )?;
        self.backends = assign(
            &want_b,
            prev_b,
            MAX_BACKENDS,
            &mut self.next_backend,
            "backend",
        )?;
        Ok(())
    }

    /// The data-plane service `name` (a config service's name, for its
    /// `vip`; [`v6_key`] for a dual-stack service's `vip6`).
    pub fn service(&self, name: &str) -> Option<Assigned<ServiceEndpoint>> {
        self.services.get(name).copied()
    }

    /// Every data-plane service of config service `name`: its `vip`'s,
    /// then its `vip6`'s.
    pub fn service_vips(&self, name: &str) -> impl Iterator<Item = Assigned<ServiceEndpoint>> {
        self.service(name)
            .into_iter()
            .chain(self.service(&v6_key(name)))
    }

    /// The config service whose VIP has data-plane id `id`.
    pub fn service_of_id(&self, id: u32) -> Option<&str> {
        self.services
            .iter()
            .find(|(_, a)| a.id == id)
            .map(|(n, _)| base_name(n))
    }

    pub fn backend(&self, name: &str) -> Option<Assigned<BackendEndpoint>> {
        self.backends.get(name).copied()
    }

    pub fn services(&self) -> impl Iterator<Item = (&str, Assigned<ServiceEndpoint>)> {
        self.services.iter().map(|(n, a)| (n.as_str(), *a))
    }

    pub fn backends(&self) -> impl Iterator<Item = (&str, Assigned<BackendEndpoint>)> {
        self.backends.iter().map(|(n, a)| (n.as_str(), *a))
    }

    /// The planner's view: backend name -> id.
    pub fn backend_ids(&self) -> BackendIds {
        self.backends
            .iter()
            .map(|(n, a)| (n.clone(), a.id))
            .collect()
    }

    /// Name of the backend holding `id`.
    pub fn backend_name(&self, id: u32) -> Option<&str> {
        self.backends
            .iter()
            .find(|(_, a)| a.id == id)
            .map(|(n, _)| n.as_str())
    }
}

/// Gives each wanted (name, endpoint) an id: same name and endpoint first,
/// then same endpoint (renamed, or recovered from the maps), then fresh.
fn assign<E: Copy + Eq>(
    wanted: &[(&str, E)],
    previous: &[Previous<E>],
    cap: u32,
    next: &mut u32,
    what: &'static str,
) -> Result<BTreeMap<String, Assigned<E>>, IdError> {
    let mut out: BTreeMap<String, Assigned<E>> = BTreeMap::new();
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut used = vec![false; previous.len()];
    let claim = |out: &mut BTreeMap<String, Assigned<E>>,
                 taken: &mut BTreeSet<u32>,
                 name: &str,
                 endpoint: E,
                 id: u32| {
        taken.insert(id);
        out.insert(name.to_owned(), Assigned { id, endpoint });
    };
    for &(name, ep) in wanted {
        if let Some(i) = previous
            .iter()
            .enumerate()
            .position(|(i, p)| !used[i] && p.name == Some(name) && p.endpoint == ep)
        {
            used[i] = true;
            claim(&mut out, &mut taken, name, ep, previous[i].id);
        }
    }
    for &(name, ep) in wanted {
        if out.contains_key(name) {
            continue;
        }
        // The id stays with the address its flows go to, whatever the
        // entry is called now.
        if let Some(i) = previous
            .iter()
            .enumerate()
            .position(|(i, p)| !used[i] && p.endpoint == ep && !taken.contains(&p.id))
        {
            used[i] = true;
            claim(&mut out, &mut taken, name, ep, previous[i].id);
        }
    }
    let held: BTreeSet<u32> = previous.iter().map(|p| p.id).collect();
    for &(name, ep) in wanted {
        if out.contains_key(name) {
            continue;
        }
        let free = |avoid_held: bool| {
            (0..cap)
                .map(|k| (*next + k) % cap)
                .find(|id| !(taken.contains(id) || (avoid_held && held.contains(id))))
        };
        let id = free(true)
            .or_else(|| free(false))
            .ok_or(IdError::Exhausted { what, cap })?;
        *next = (id + 1) % cap;
        claim(&mut out, &mut taken, name, ep, id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(backends: &[(&str, &str, u16)], services: &[(&str, &str, u16)]) -> Config {
        let mut y = String::from(
            "node:\n  interfaces: [eth0]\n  snat_address: 198.51.100.1\n  snat_ports: {min: 1000, max: 2000}\nservices:\n",
        );
        let names: Vec<&str> = backends.iter().map(|b| b.0).collect();
        for (n, vip, port) in services {
            y.push_str(&format!(
                "  - name: {n}\n    vip: {vip}\n    port: {port}\n    protocol: tcp\n    backends: [{}]\n    probe: {{kind: tcp}}\n",
                names.join(", ")
            ));
        }
        y.push_str("backends:\n");
        for (n, a, p) in backends {
            y.push_str(&format!(
                "  - {{name: {n}, address: {a}, port: {p}, cloud: c, region: r, jurisdiction: EU}}\n"
            ));
        }
        config::parse(&y, "test").unwrap()
    }

    fn b(ids: &Ids, n: &str) -> u32 {
        ids.backend(n).unwrap().id
    }

    #[test]
    fn ipv6_addresses_hold_their_network_bytes_in_native_words() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let w = addr6(a);
        assert_eq!(w[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(ipv6_of(w), a);
        // As IPv4's `_be` words do.
        let v4 = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(addr4(v4).to_ne_bytes(), v4.octets());
        assert_eq!(ipv4_of(addr4(v4)), v4);
        // A service key per family, and back.
        let ep = ServiceEndpoint {
            vip: IpAddr::V6(a),
            port: 443,
            proto: 6,
        };
        assert!(matches!(ep.key(), VipKey::V6(k) if k.vip_be == w && k.port_be == 443u16.to_be()));
        assert_eq!(ServiceEndpoint::from_key(&ep.key()), ep);
        // A backend: addr_be 0, its address in BACKEND_ADDR6.
        let be = BackendEndpoint {
            addr: IpAddr::V6(a),
            port: 8000,
        };
        let entry = be.to_map(state::UP);
        assert_eq!(entry.addr_be, 0);
        assert_eq!(BackendEndpoint::from_map(&entry, be.addr6()), be);
    }

    #[test]
    fn fresh_assignment_is_dense_and_in_config_order() {
        let c = cfg(
            &[("a", "203.0.113.1", 80), ("b", "203.0.113.2", 80)],
            &[("s", "192.0.2.1", 80)],
        );
        let ids = Ids::recover(&c, &[], &[], &BTreeMap::new()).unwrap();
        assert_eq!((b(&ids, "a"), b(&ids, "b")), (0, 1));
        assert_eq!(ids.service("s").unwrap().id, 0);
        assert_eq!(ids.backend_name(1), Some("b"));
    }

    #[test]
    fn reload_keeps_ids_of_unchanged_and_renamed_entries() {
        let c1 = cfg(
            &[
                ("a", "203.0.113.1", 80),
                ("b", "203.0.113.2", 80),
                ("c", "203.0.113.3", 80),
            ],
            &[("s", "192.0.2.1", 80), ("t", "192.0.2.2", 80)],
        );
        let ids1 = Ids::recover(&c1, &[], &[], &BTreeMap::new()).unwrap();
        // Reorder, rename c -> c2, drop a, add d, change t's port.
        let c2 = cfg(
            &[
                ("d", "203.0.113.4", 80),
                ("c2", "203.0.113.3", 80),
                ("b", "203.0.113.2", 80),
            ],
            &[("t", "192.0.2.2", 81), ("s", "192.0.2.1", 80)],
        );
        let ids2 = ids1.update(&c2).unwrap();
        assert_eq!(b(&ids2, "b"), b(&ids1, "b"));
        assert_eq!(b(&ids2, "c2"), b(&ids1, "c"), "rename keeps the id");
        // d is new: not a's released id 0, while others are free.
        assert_eq!(b(&ids2, "d"), 3);
        assert_eq!(ids2.service("s"), ids1.service("s"));
        assert_ne!(
            ids2.service("t").unwrap().id,
            ids1.service("t").unwrap().id,
            "a new endpoint is a new id"
        );
        // Reloading the same config again changes nothing.
        assert_eq!(ids2.update(&c2).unwrap().backend_ids(), ids2.backend_ids());
    }

    #[test]
    fn address_change_gets_a_fresh_id() {
        let c1 = cfg(&[("a", "203.0.113.1", 80)], &[("s", "192.0.2.1", 80)]);
        let ids1 = Ids::recover(&c1, &[], &[], &BTreeMap::new()).unwrap();
        let c2 = cfg(&[("a", "203.0.113.9", 80)], &[("s", "192.0.2.1", 80)]);
        let ids2 = ids1.update(&c2).unwrap();
        assert_ne!(b(&ids2, "a"), b(&ids1, "a"));
    }

    #[test]
    fn swapped_endpoints_between_names_follow_the_endpoint_not_the_name() {
        // a and b trade addresses: the flows at each address keep their id.
        let c1 = cfg(
            &[("a", "203.0.113.1", 80), ("b", "203.0.113.2", 80)],
            &[("s", "192.0.2.1", 80)],
        );
        let ids1 = Ids::recover(&c1, &[], &[], &BTreeMap::new()).unwrap();
        let c2 = cfg(
            &[("a", "203.0.113.2", 80), ("b", "203.0.113.1", 80)],
            &[("s", "192.0.2.1", 80)],
        );
        let ids2 = ids1.update(&c2).unwrap();
        assert_eq!(b(&ids2, "a"), b(&ids1, "b"));
        assert_eq!(b(&ids2, "b"), b(&ids1, "a"));
    }

    #[test]
    fn restart_recovers_ids_from_pinned_maps() {
        let c = cfg(
            &[
                ("a", "203.0.113.1", 80),
                ("b", "203.0.113.2", 80),
                ("new", "203.0.113.7", 80),
            ],
            &[("s", "192.0.2.1", 80), ("t", "192.0.2.2", 80)],
        );
        let ep = |a: &str| BackendEndpoint {
            addr: a.parse().unwrap(),
            port: 80,
        };
        // A previous agent had b at 5, a at 9, and a since-removed
        // backend at 2; service s at 3.
        let pinned_b = [
            (5, ep("203.0.113.2").to_map(state::UP)),
            (9, ep("203.0.113.1").to_map(state::DOWN)),
            (2, ep("203.0.113.3").to_map(state::UP)),
        ];
        let s_ep = ServiceEndpoint {
            vip: "192.0.2.1".parse().unwrap(),
            port: 80,
            proto: 6,
        };
        let pinned_s = [(
            s_ep.key(),
            failover_common::Service {
                id: 3,
                ..Default::default()
            },
        )];
        let ids = Ids::recover(&c, &pinned_s, &pinned_b, &BTreeMap::new()).unwrap();
        assert_eq!((b(&ids, "a"), b(&ids, "b")), (9, 5));
        // Fresh ids continue after the highest pinned one.
        assert_eq!(b(&ids, "new"), 10);
        assert_eq!(ids.service("s").unwrap().id, 3);
        assert_eq!(ids.service("t").unwrap().id, 4);
        // Recovering twice from the same maps gives the same answer.
        assert_eq!(
            Ids::recover(&c, &pinned_s, &pinned_b, &BTreeMap::new()).unwrap(),
            ids
        );
    }

    #[test]
    fn unused_slots_are_not_recovered() {
        let c = cfg(&[("a", "203.0.113.1", 80)], &[("s", "192.0.2.1", 80)]);
        let slot = BackendEndpoint {
            addr: "203.0.113.1".parse().unwrap(),
            port: 80,
        }
        .to_map(state::UNUSED);
        let ids = Ids::recover(&c, &[], &[(7, slot)], &BTreeMap::new()).unwrap();
        assert_eq!(b(&ids, "a"), 0);
    }

    #[test]
    fn fresh_ids_wrap_and_fill_every_slot() {
        let wanted: Vec<(String, u16)> = (0..MAX_SERVICES as u16)
            .map(|i| (format!("s{i}"), i + 1))
            .collect();
        let w: Vec<(&str, u16)> = wanted.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let mut next = 60;
        let out = assign(&w, &[], MAX_SERVICES, &mut next, "service").unwrap();
        let ids: BTreeSet<u32> = out.values().map(|a| a.id).collect();
        assert_eq!(ids.len(), MAX_SERVICES as usize);
        let mut w2 = w.clone();
        w2.push(("one-too-many", 9999));
        assert_eq!(
            assign(&w2, &[], MAX_SERVICES, &mut next, "service").unwrap_err(),
            IdError::Exhausted {
                what: "service",
                cap: MAX_SERVICES
            }
        );
    }
}
