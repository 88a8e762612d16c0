//! Backend selection: the service's active Maglev ring, indexed by the flow
//! hash. The ring only holds backends the planner made eligible; between a
//! backend going down and the planner's next flip, probing the next slots
//! skips it so new flows never land on a dead backend.

use failover_common::{NO_BACKEND, RESELECT_TRIES, RING_MAX, Service, state};

use crate::{
    family::Family,
    maps::{BACKENDS, RINGS},
};

/// The backend a new flow goes to.
pub struct Chosen<A> {
    pub id: u32,
    pub addr_be: A,
    pub port_be: u16,
}

#[inline(always)]
pub fn select<F: Family>(svc: &Service, flow_hash: u32) -> Option<Chosen<F::A>> {
    let id = ring_lookup(svc.id, svc.active_slot, svc.ring_size, flow_hash);
    if id == NO_BACKEND {
        return None;
    }
    let backend = BACKENDS.get(id)?;
    Some(Chosen {
        id,
        addr_be: F::backend_addr(id, backend)?,
        port_be: backend.port_be,
    })
}

/// The backend for `flow_hash` in a service's active ring, or
/// `NO_BACKEND`. A BPF subprogram, not inlined: the verifier walks its
/// probes once, and its callers see one scalar instead of every way out of
/// the loop (the new-flow path has loops of its own).
#[inline(never)]
fn ring_lookup(service_id: u32, active_slot: u32, size: u32, flow_hash: u32) -> u32 {
    let Some(ring) = RINGS.get(Service::ring_index(service_id, active_slot)) else {
        return NO_BACKEND;
    };
    if size == 0 || size as usize > RING_MAX {
        return NO_BACKEND;
    }
    // Linear probing from the hashed slot: Maglev spreads each backend's
    // slots evenly, so the next slots belong to random other backends and
    // a dead backend's share spreads over the live ones.
    let start = flow_hash % size;
    let mut i = 0;
    while i < RESELECT_TRIES {
        let idx = ((start + i) % size) as usize;
        // The compiler knows idx < size <= RING_MAX and would drop the
        // check; the verifier does not, so hide the value from the former.
        let idx = unsafe { core::ptr::read_volatile(&idx) };
        if idx < RING_MAX {
            let id = ring.backends[idx];
            if id == NO_BACKEND {
                // An empty ring: the service fails closed.
                return NO_BACKEND;
            }
            if let Some(be) = BACKENDS.get(id)
                && be.state == state::UP
            {
                return id;
            }
        }
        i += 1;
    }
    NO_BACKEND
}
