//! Per-CPU counters: one per verdict reason, per service and per backend.
//! Counting replaces logging on the per-packet path.

use failover_common::{BackendStats, Reason, ServiceStats};

use crate::maps::{BE_STATS, STATS, SVC_STATS};

#[inline(always)]
pub fn reason(r: Reason) {
    if let Some(c) = STATS.get_ptr_mut(r as u32) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn service(id: u32) -> Option<&'static mut ServiceStats> {
    SVC_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn backend(id: u32) -> Option<&'static mut BackendStats> {
    BE_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}
