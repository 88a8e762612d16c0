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
        use std::os::fd::{AsFd as _, AsRawFd as _};

        /// `union bpf_attr` for the BPF_MAP_*_BATCH commands.
        #[repr(C)]
        #[derive(Default)]
        struct BatchAttr {
            in_batch: u64,
            out_batch: u64,
            keys: u64,
            values: u64,
            count: u32,
            map_fd: u32,
            elem_flags: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

        let n = n.min(failover_common::MAX_BACKENDS);
        if n == 0 {
            return Ok(Vec::new());
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| map_err(names::BE_STATS)(aya::maps::MapError::from(e)))?;
        // Per-CPU values come back as `cpus` copies per key, each rounded up
        // to 8 bytes; BackendStats is all u64s, so no padding.
        const _: () = assert!(std::mem::size_of::<BackendStats>().is_multiple_of(8));
        let mut keys = vec![0u32; n as usize];
        let mut values = vec![BackendStats::default(); n as usize * cpus];
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: n,
            map_fd: self.be_stats.map().fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at key and value buffers sized for `count`
        // entries of this map; the kernel writes only within them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        // ENOENT: the map ended before `count` (not with n <= MAX_BACKENDS,
        // but `count` says how many are filled either way).
        if rc != 0 && err.raw_os_error() != Some(libc::ENOENT) {
            return Err(map_err(names::BE_STATS)(aya::maps::MapError::from(err)));
        }
        let got = attr.count.min(n) as usize;
        Ok(values[..got * cpus]
            .chunks(cpus)
            .map(|c| c.iter().fold(BackendStats::default(), BackendStats::merge))
            .collect())
    }
}
