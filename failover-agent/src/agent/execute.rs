//! Writes into the data plane: the [`Executor`] that performs the
//! [`Write`]s the reconciler ([`super::reconcile`]) lists, in order.
//!
//! [`Maps`] is the real one, over the pinned maps of a [`Dataplane`];
//! [`Recorder`] keeps the writes in memory instead, so the applier, its
//! write order and its keep-last-good rule can be tested without a
//! kernel (plain `cargo test`, no root).

use std::{collections::BTreeMap, net::IpAddr};

use failover_common::{Addr6, Backend as MapBackend, NO_BACKEND, Ring, Service as MapService};

use super::{
    ids::VipKey,
    reconcile::{Current, Write},
};
use crate::dataplane::{Attached, Dataplane, DataplaneError, XdpMode};

/// What is pinned when an agent starts: read once, before the first plan.
#[derive(Clone, Debug, Default)]
pub struct Pinned {
    /// `SERVICES` and `SERVICES6` entries.
    pub services: Vec<(VipKey, MapService)>,
    /// `BACKENDS` entries in use (state other than `UNUSED`).
    pub backends: Vec<(u32, MapBackend)>,
    /// `BACKEND_ADDR6` of the IPv6 ones among them (`addr_be` 0).
    pub addr6: BTreeMap<u32, Addr6>,
    /// Non-zero `PATH_MSS` entries: clamps an earlier config set.
    pub path_mss: Vec<(u32, u32)>,
}

/// Performs data-plane writes, and the few reads an applier needs to take
/// over a data plane an earlier agent left.
pub trait Executor {
    /// Performs one write. Returns how many entries it touched: 1 for a
    /// map write, the clients prompted for a [`Write::Nudge`].
    fn write(&mut self, w: &Write) -> Result<usize, DataplaneError>;

    /// The services and backends pinned by an earlier agent.
    fn pinned(&self) -> Result<Pinned, DataplaneError>;

    /// The first `len` entries of service `id`'s ring in `slot`.
    fn ring(&self, id: u32, slot: u32, len: u32) -> Result<Vec<u32>, DataplaneError>;

    /// Attaches the NAT program to `iface` (swapping it into a pinned link).
    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attached, DataplaneError>;

    /// Detaches it from `iface`.
    fn detach(&mut self, iface: &str) -> Result<(), DataplaneError>;
}

/// The real executor: the pinned maps.
pub struct Maps {
    dp: Dataplane,
    /// This agent's program is attached somewhere: no older program reads
    /// the maps any more.
    attached: bool,
    /// 256 KiB: a ring is built here on the heap, never on a (2 MiB,
    /// task) stack.
    scratch: Box<Ring>,
}

impl Maps {
    pub fn new(dp: Dataplane) -> Self {
        // SAFETY: `Ring` is a plain array of u32, valid when zeroed.
        let mut scratch: Box<Ring> = unsafe { Box::<Ring>::new_zeroed().assume_init() };
        scratch.backends.fill(NO_BACKEND);
        Self {
            dp,
            attached: false,
            scratch,
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }
}

impl Executor for Maps {
    fn write(&mut self, w: &Write) -> Result<usize, DataplaneError> {
        match w {
            Write::Node(node) => self.dp.set_node(*node)?,
            Write::Node6(node) => self.dp.set_node6(*node)?,
            Write::BackendAddr6 { id, addr } => self.dp.set_backend_addr6(*id, *addr)?,
            Write::Backend { id, entry }
            | Write::State { id, entry }
            | Write::Unused { id, entry } => {
                self.dp.set_backend(*id, *entry)?;
            }
            Write::Ring {
                service_id,
                slot,
                ring,
            } => {
                self.scratch.backends[..ring.len()].copy_from_slice(ring);
                self.dp.write_ring(*service_id, *slot, &self.scratch)?;
            }
            Write::Flip { next, .. } => match next.key {
                VipKey::V4(key) => self.dp.put_service(key, next.entry)?,
                VipKey::V6(key) => self.dp.put_service6(key, next.entry)?,
            },
            Write::RemoveService { key, .. } => match key {
                VipKey::V4(key) => self.dp.remove_service(key)?,
                VipKey::V6(key) => self.dp.remove_service6(key)?,
            },
            // Before this agent's program is attached, an older one may
            // still read the filter (`Dataplane::add_vips`);
            // `Applier::attach` writes it exactly once attached.
            Write::VipFilter(vips) if !self.attached => self.dp.add_vips(vips.iter().copied())?,
            Write::VipFilter(vips) => self.dp.set_vips(vips.iter().copied())?,
            Write::Nudge { backend_ids } => return self.dp.nudge_clients(backend_ids),
            Write::PathMss { id, mss } => self.dp.set_path_mss(*id, *mss)?,
        }
        Ok(1)
    }

    fn pinned(&self) -> Result<Pinned, DataplaneError> {
        let mut services: Vec<(VipKey, MapService)> = self
            .dp
            .services()?
            .into_iter()
            .map(|(k, s)| (VipKey::V4(k), s))
            .collect();
        services.extend(
            self.dp
                .services6()?
                .into_iter()
                .map(|(k, s)| (VipKey::V6(k), s)),
        );
        let mut backends = Vec::new();
        let mut addr6 = BTreeMap::new();
        let mut path_mss = Vec::new();
        for id in 0..failover_common::MAX_BACKENDS {
            let b = self.dp.backend(id)?;
            if b.state != failover_common::state::UNUSED {
                backends.push((id, b));
                if b.addr_be == 0 {
                    addr6.insert(id, self.dp.backend_addr6(id)?);
                }
            }
            let mss = self.dp.path_mss(id)?;
            if mss != 0 {
                path_mss.push((id, mss));
            }
        }
        Ok(Pinned {
            services,
            backends,
            addr6,
            path_mss,
        })
    }

    fn ring(&self, id: u32, slot: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        let len = (len as usize).min(failover_common::RING_MAX);
        Ok(self.dp.ring(id, slot)?.backends[..len].to_vec())
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attached, DataplaneError> {
        let a = self.dp.attach(iface, mode)?;
        self.attached = true;
        Ok(a)
    }

    fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.dp.detach(iface)
    }
}

/// An executor that records what it is asked to do, for tests. It starts
/// from `pinned` (an earlier agent's state) and serves its rings back.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    /// Every write, in order.
    pub writes: Vec<Write>,
    /// What an earlier agent left.
    pub pinned: Pinned,
    /// Rings of the pinned services: (service id, slot) -> entries.
    pub rings: Vec<((u32, u32), Vec<u32>)>,
    /// Interfaces attached, in order; detached ones are removed.
    pub attached: Vec<String>,
}

impl Recorder {
    /// A recorder over what an earlier agent left: `current` pinned.
    pub fn pinned_from(current: &Current) -> Self {
        Self {
            pinned: Pinned {
                services: current
                    .services
                    .values()
                    .map(|p| (p.key, p.entry))
                    .collect(),
                backends: current.backends.iter().map(|(&id, &b)| (id, b)).collect(),
                addr6: current.addr6.clone(),
                path_mss: current.path_mss.iter().map(|(&id, &m)| (id, m)).collect(),
            },
            rings: current
                .services
                .values()
                .map(|p| ((p.entry.id, p.entry.active_slot), p.ring.clone()))
                .collect(),
            ..Self::default()
        }
    }

    /// Every write as one line ([`Write`]'s `Display`), in order.
    pub fn log(&self) -> Vec<String> {
        self.writes.iter().map(ToString::to_string).collect()
    }

    /// Forgets the writes recorded so far.
    pub fn clear(&mut self) {
        self.writes.clear();
    }

    /// The VIPs of the last VIP filter written.
    pub fn vips(&self) -> Option<&[IpAddr]> {
        self.writes.iter().rev().find_map(|w| match w {
            Write::VipFilter(v) => Some(v.as_slice()),
            _ => None,
        })
    }
}

impl Executor for Recorder {
    fn write(&mut self, w: &Write) -> Result<usize, DataplaneError> {
        self.writes.push(w.clone());
        Ok(match w {
            Write::Nudge { backend_ids } => backend_ids.len(),
            _ => 1,
        })
    }

    fn pinned(&self) -> Result<Pinned, DataplaneError> {
        Ok(self.pinned.clone())
    }

    fn ring(&self, id: u32, slot: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        let mut ring = self
            .rings
            .iter()
            .find(|(k, _)| *k == (id, slot))
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        ring.resize(len as usize, NO_BACKEND);
        Ok(ring)
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attached, DataplaneError> {
        self.attached.push(iface.to_owned());
        Ok(Attached {
            updated: false,
            mode,
        })
    }

    fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attached.retain(|i| i != iface);
        Ok(())
    }
}
