//! The atomic switch: a new ring goes into the slot packets are not
//! reading, then one write of the service entry flips `active_slot`. A
//! packet sees the old ring or the new one, never a mix.

use std::time::{Duration, Instant};

use failover_common::{RING_MAX, Ring, ServiceKey, names};

use super::{Dataplane, ErrorKind, Result, map_err};

/// How long the two steps of a flip took.
#[derive(Clone, Copy, Debug)]
pub struct FlipTiming {
    pub write: Duration,
    pub flip: Duration,
    pub generation: u64,
}

impl Dataplane {
    /// Writes `ring` (its first `svc.ring_size` entries are used) into the
    /// inactive slot of the service at `key`, then flips to it.
    pub fn flip_ring(&mut self, key: &ServiceKey, ring: &Ring) -> Result<FlipTiming> {
        let t0 = Instant::now();
        let mut svc = self
            .service(key)?
            .ok_or_else(|| ErrorKind::NoService(format!("{key:?}")))?;
        if svc.ring_size == 0 || svc.ring_size as usize > RING_MAX {
            return Err(ErrorKind::RingSize {
                service: svc.id,
                size: svc.ring_size,
                max: RING_MAX,
            }
            .into());
        }
        let next = svc.active_slot ^ 1;
        self.write_ring(svc.id, next, ring)?;
        let t1 = Instant::now();
        svc.active_slot = next;
        svc.generation += 1;
        self.put_service(*key, svc)?;
        let t2 = Instant::now();
        Ok(FlipTiming {
            write: t1 - t0,
            flip: t2 - t1,
            generation: svc.generation,
        })
    }

    /// Writes one ring slot; one syscall for the whole table.
    pub fn write_ring(&mut self, service_id: u32, slot: u32, ring: &Ring) -> Result<()> {
        let idx = failover_common::Service::ring_index(service_id, slot);
        self.rings.set(idx, ring, 0).map_err(map_err(names::RINGS))
    }

    pub fn ring(&self, service_id: u32, slot: u32) -> Result<Box<Ring>> {
        let idx = failover_common::Service::ring_index(service_id, slot);
        self.rings
            .get(&idx, 0)
            .map(Box::new)
            .map_err(map_err(names::RINGS))
    }
}
