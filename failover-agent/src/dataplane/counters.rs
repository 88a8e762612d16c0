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
        Ok(v.iter().fold(ServiceStats::default(), |mut a, s| {
            a.fwd_packets += s.fwd_packets;
            a.fwd_bytes += s.fwd_bytes;
            a.rev_packets += s.rev_packets;
            a.rev_bytes += s.rev_bytes;
            a.new_flows += s.new_flows;
            a.resets += s.resets;
            a
        }))
    }

    /// Summed counters; the RTT fields come from the CPU that saw the most
    /// recent SYN-ACK.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let v = self
            .be_stats
            .get(&id, 0)
            .map_err(map_err(names::BE_STATS))?;
        Ok(v.iter().fold(BackendStats::default(), |mut a, s| {
            a.fwd_packets += s.fwd_packets;
            a.fwd_bytes += s.fwd_bytes;
            a.rev_packets += s.rev_packets;
            a.rev_bytes += s.rev_bytes;
            a.new_flows += s.new_flows;
            a.resets += s.resets;
            a.syns += s.syns;
            a.synacks += s.synacks;
            a.syn_rsts += s.syn_rsts;
            if s.rtt_at_ns > a.rtt_at_ns {
                a.rtt_at_ns = s.rtt_at_ns;
                a.rtt_last_ns = s.rtt_last_ns;
            }
            a
        }))
    }
}
