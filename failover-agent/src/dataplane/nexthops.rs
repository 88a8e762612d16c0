//! The XDP program's next-hop caches (`NEXTHOPS`, `LAST_HOPS` and their
//! IPv6 twins): the program alone writes them; the agent keeps no handle.
//! These reads and writes let tests make a cache miss and age the shared
//! fallback without waiting out its TTL.

use aya::{
    Pod,
    maps::{Array, MapError, PerCpuArray, PerCpuValues},
};
use failover_common::{Addr6, NextHop, names};

use super::{Dataplane, ErrorKind, Result, map_err};

impl Dataplane {
    /// Empties every CPU's cached next hop toward backend `id`, both
    /// families: the next packet toward it asks the FIB.
    pub fn clear_next_hops(&mut self, id: u32) -> Result<()> {
        let cpus =
            aya::util::nr_cpus().map_err(|(_, e)| map_err(names::NEXTHOPS)(MapError::from(e)))?;
        self.clear_per_cpu::<NextHop>(names::NEXTHOPS, id, cpus)?;
        self.clear_per_cpu::<NextHop<Addr6>>(names::NEXTHOPS6, id, cpus)
    }

    fn clear_per_cpu<V: Pod + Default>(
        &mut self,
        name: &'static str,
        id: u32,
        cpus: usize,
    ) -> Result<()> {
        let map = self.ebpf.map_mut(name).ok_or(ErrorKind::MissingMap(name))?;
        let mut m: PerCpuArray<_, V> = PerCpuArray::try_from(map).map_err(map_err(name))?;
        let zero = PerCpuValues::try_from(vec![V::default(); cpus])
            .map_err(|e| map_err(name)(MapError::from(e)))?;
        m.set(id, zero, 0).map_err(map_err(name))
    }

    /// Backend `id`'s last known next hop (`LAST_HOPS`).
    pub fn last_hop(&self, id: u32) -> Result<NextHop> {
        self.read_last::<NextHop>(names::LAST_HOPS, id)
    }

    /// Backend `id`'s last known IPv6 next hop (`LAST_HOPS6`).
    pub fn last_hop6(&self, id: u32) -> Result<NextHop<Addr6>> {
        self.read_last::<NextHop<Addr6>>(names::LAST_HOPS6, id)
    }

    fn read_last<V: Pod>(&self, name: &'static str, id: u32) -> Result<V> {
        let map = self.ebpf.map(name).ok_or(ErrorKind::MissingMap(name))?;
        let m: Array<_, V> = Array::try_from(map).map_err(map_err(name))?;
        m.get(&id, 0).map_err(map_err(name))
    }

    /// Makes backend `id`'s last known next hops (both families) older
    /// than `LAST_HOP_TTL_NS`: the program no longer falls back on them.
    pub fn age_last_hops(&mut self, id: u32) -> Result<()> {
        let mut v4 = self.last_hop(id)?;
        v4.at_ns = 0;
        self.write_last(names::LAST_HOPS, id, v4)?;
        let mut v6 = self.last_hop6(id)?;
        v6.at_ns = 0;
        self.write_last(names::LAST_HOPS6, id, v6)
    }

    fn write_last<V: Pod>(&mut self, name: &'static str, id: u32, v: V) -> Result<()> {
        let map = self.ebpf.map_mut(name).ok_or(ErrorKind::MissingMap(name))?;
        let mut m: Array<_, V> = Array::try_from(map).map_err(map_err(name))?;
        m.set(id, v, 0).map_err(map_err(name))
    }
}
