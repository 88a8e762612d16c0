//! Reading the per-CPU counters: summed over CPUs here, so callers see one
//! number per reason, service and backend.

use failover_common::{BackendStats, Reason, ServiceStats, names};

use super::{Dataplane, Result, map_err};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonCount {
    pub reason: Reason,
    pub count: u64,
}

impl Dataplane {
    /// One count per verdict reason, in `Reason::ALL` order.
    pub fn reason_counts(&self) -> Result<Vec<ReasonCount>> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                Ok(ReasonCount {
                    reason,
                    count: self.reason_count(reason)?,
                })
            })
            .collect()
    }

    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        let v = self
            .stats
            .get(&(reason as u32), 0)
            .map_err(map_err(names::STATS))?;
        Ok(v.iter().sum())
    }

    pub fn service_stats(&self, id: u32) -> Result<ServiceStats> {
        let v = self
            .svc_stats
            .get(&id, 0)
            .map_err(map_err(names::SVC_STATS))?;
        Ok(v.iter().fold(ServiceStats::default(), ServiceStats::merge))
    }

    /// Summed counters; the RTT fields come from the CPU that saw the most
    /// recent SYN-ACK.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let v = self
            .be_stats
            .get(&id, 0)
            .map_err(map_err(names::BE_STATS))?;
        Ok(v.iter().fold(BackendStats::default(), BackendStats::merge))
    }

    /// [`backend_stats`](Self::backend_stats) of backends `0..n`, in one
    /// `BPF_MAP_LOOKUP_BATCH` call instead of `n`: the passive sweep reads
    /// every backend ten times a second.
    pub fn backend_stats_batch(&self, n: u32) -> Result<Vec<BackendStats>> {
        use aya::maps::IterableMap as _;

        let n = n.min(failover_common::MAX_BACKENDS) as usize;
        if n == 0 {
            return Ok(Vec::new());
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| map_err(names::BE_STATS)(aya::maps::MapError::from(e)))?;
        const _: () = assert!(std::mem::size_of::<BackendStats>().is_multiple_of(8));
        let values = super::batch::per_cpu::<BackendStats>(self.be_stats.map(), n, cpus)
            .map_err(|e| map_err(names::BE_STATS)(aya::maps::MapError::from(e)))?;
        Ok(values
            .chunks(cpus)
            .map(|c| c.iter().fold(BackendStats::default(), BackendStats::merge))
            .collect())
    }
}
