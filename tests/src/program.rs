//! Programming the data plane directly (no agent): one service over a set
//! of `UP` backends with a Maglev ring. Shared by the end-to-end tests and
//! the benchmarks.

use std::net::Ipv4Addr;

use anyhow::Result;
use failover_agent::{dataplane::Dataplane, maglev};
use failover_common::{
    Backend, NO_BACKEND, Node, RING_DEFAULT, RING_MAX, Ring, Service, ServiceKey, state,
};

use crate::topology::{BACKEND_PORT, SNAT, VIP};

/// One service and the node settings around it.
#[derive(Clone, Debug)]
pub struct ServiceSpec<'a> {
    pub vip: Ipv4Addr,
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// `SVC_F_*` flags.
    pub flags: u32,
    /// (backend id, address), all on `backend_port`.
    pub backends: &'a [(u32, Ipv4Addr)],
    pub backend_port: u16,
    pub snat: Ipv4Addr,
    /// SNAT port range. Keep it clear of the edge's ephemeral range when
    /// the edge has its own sockets on the SNAT address.
    pub port_min: u16,
    pub port_max: u16,
}

impl<'a> ServiceSpec<'a> {
    /// TCP VIP:80 over `backends` on `BACKEND_PORT`, SNAT ports 20000–29999
    /// (below the kernel's ephemeral range, so replies to the edge's own
    /// sockets on the SNAT address are never mistaken for NAT flows).
    pub fn tcp(backends: &'a [(u32, Ipv4Addr)], flags: u32) -> Self {
        Self {
            vip: VIP,
            port: 80,
            proto: 6,
            flags,
            backends,
            backend_port: BACKEND_PORT,
            snat: SNAT,
            port_min: 20_000,
            port_max: 29_999,
        }
    }
}

/// Programs the node, the backends, ring 0 of service 0, the service and
/// the VIP filter, in that order (the VIP goes live last).
pub fn program_service(dp: &mut Dataplane, spec: &ServiceSpec<'_>) -> Result<ServiceKey> {
    dp.set_node(Node {
        snat_be: u32::from(spec.snat).to_be(),
        port_min: spec.port_min,
        port_max: spec.port_max,
        seed: 1,
        flags: 0,
    })?;
    let mut members = Vec::new();
    for &(id, addr) in spec.backends {
        dp.set_backend(
            id,
            Backend {
                addr_be: u32::from(addr).to_be(),
                port_be: spec.backend_port.to_be(),
                state: state::UP,
                _pad: 0,
            },
        )?;
        members.push(maglev::Member {
            id,
            weight: 100,
            key: maglev::key_hash(&format!("b{id}")),
        });
    }
    let table = maglev::build(&members, RING_DEFAULT)?;
    let mut ring = Box::new(Ring {
        backends: [NO_BACKEND; RING_MAX],
    });
    ring.backends[..table.len()].copy_from_slice(&table);
    dp.write_ring(0, 0, &ring)?;
    let key = ServiceKey {
        vip_be: u32::from(spec.vip).to_be(),
        port_be: spec.port.to_be(),
        proto: spec.proto,
        _pad: 0,
    };
    dp.put_service(
        key,
        Service {
            id: 0,
            flags: spec.flags,
            active_slot: 0,
            ring_size: RING_DEFAULT,
            generation: 1,
            ..Service::default()
        },
    )?;
    dp.set_vips([spec.vip])?;
    Ok(key)
}

/// Programs one TCP service VIP:80 over `backends` (id, address); panics on
/// failure (for tests).
pub fn program(dp: &mut Dataplane, backends: &[(u32, Ipv4Addr)], flags: u32) -> ServiceKey {
    program_service(dp, &ServiceSpec::tcp(backends, flags)).expect("program the data plane")
}
