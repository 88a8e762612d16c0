//! Benchmark traffic, never loaded by the agent: `failover_gen` is an
//! in-kernel traffic generator for BPF_PROG_TEST_RUN in live-frames mode,
//! where every frame a program TXes really leaves the interface given as
//! ingress. It writes the frame of `GEN[0]` ([`GenConfig`]) with a UDP
//! source port drawn from its range, and TXes it.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_get_prandom_u32, programs::XdpContext};
use failover_common::{GEN_HEADER_LEN, GenConfig};

use crate::{maps::GEN, parse::ptr_at};

/// Offset of the UDP source port in the header.
const SPORT: usize = 14 + 20;

#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    let Some(cfg) = GEN.get(0) else {
        return xdp_action::XDP_DROP;
    };
    let Some(frame) = ptr_at::<[u8; GEN_HEADER_LEN]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let GenConfig {
        header,
        flows,
        base_port,
    } = *cfg;
    if flows == 0 {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: a helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() } % u32::from(flows);
    let port = base_port.wrapping_add(r as u16).to_be_bytes();
    // SAFETY: `ptr_at` checked the header lies inside the frame. Written
    // whole on every run: live-frames mode recycles its pages as the path
    // left them (NAT, TTL), not as they were.
    unsafe {
        *frame = header;
        (*frame)[SPORT] = port[0];
        (*frame)[SPORT + 1] = port[1];
    }
    xdp_action::XDP_TX
}
