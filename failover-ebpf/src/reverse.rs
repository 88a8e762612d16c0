//! Backend -> SNAT address: restore VIP:port -> client for an established
//! flow; a TCP segment without one may answer a half-open flow
//! (pending.rs), where the handshake is read for the passive signals.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use failover_common::{Addr, DATA_ANSWERED, FlowKey, Reason, Reverse, ReverseKey, SEEN_SHIFT};

use crate::{
    egress::{self, Route},
    family::{Family, Ip},
    l4::{self, Closing, L4, Nat},
    pending, stats,
};

/// `snat`: the node's source address of this family, which the packet was
/// sent to.
#[inline(always)]
pub fn handle<F: Family>(ctx: &XdpContext, snat: F::A, ip: &Ip<F>, l4: &L4) -> (u32, Reason) {
    let src = F::src(ip);
    let rkey = ReverseKey::new(src, snat, l4.sport_be, l4.dport_be, ip.proto);
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(rev) = F::reverse().get_ptr_mut(&rkey) else {
        if l4.tcp {
            return pending::reverse(ctx, ip, l4, &rkey, now);
        }
        // Traffic to the node's own sockets on the SNAT address (the
        // agent's probes, for one) is the kernel's.
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    let rev = unsafe { &mut *rev };
    let out = answer(ctx, ip, l4, rev, now);
    if !l4.tcp {
        return out;
    }
    match l4::closing(l4, rev.fins, rev.fin_ack, l4::BACKEND) {
        Closing::Free => {
            let _ = F::flows().remove(&flow_key(rev, ip.proto));
            let _ = F::reverse().remove(&rkey);
        }
        Closing::Note { bits, fin_ack } => {
            let flow = F::flows()
                .get_ptr_mut(&flow_key(rev, ip.proto))
                .map(|f| unsafe { &mut *f });
            l4::note(
                &mut rev.fins,
                flow.map(|f| (&mut f.fins, &mut f.fin_ack)),
                bits,
                fin_ack,
            );
        }
        Closing::Keep => {}
    }
    out
}

/// An established flow's reply (backend -> SNAT address, rewritten to
/// VIP -> client) sent from `failover_xdp` itself for IPv6, when it closes
/// nothing: as `forward::established_only`, the tail call to
/// `failover_rev6` is saved. `None`, with nothing changed, for anything
/// else: `failover_rev6` then walks it from the start.
#[inline(always)]
pub fn established_only<F: Family>(
    ctx: &XdpContext,
    snat: F::A,
    ip: &Ip<F>,
    l4: &L4,
) -> Option<(u32, Reason)> {
    let rkey = ReverseKey::new(F::src(ip), snat, l4.sport_be, l4.dport_be, ip.proto);
    let rev = unsafe { &mut *F::reverse().get_ptr_mut(&rkey)? };
    if l4.tcp
        && !matches!(
            l4::closing(l4, rev.fins, rev.fin_ack, l4::BACKEND),
            Closing::Keep
        )
    {
        return None;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    Some(answer(ctx, ip, l4, rev, now))
}

/// Counts the reply, rewrites it toward the client and sends it.
#[inline(always)]
fn answer<F: Family>(
    ctx: &XdpContext,
    ip: &Ip<F>,
    l4: &L4,
    rev: &mut Reverse<F::A>,
    now: u64,
) -> (u32, Reason) {
    rev.seen = (now >> SEEN_SHIFT) as u32;

    if let Some(s) = stats::backend(rev.backend_id) {
        s.traffic.rev_packets += 1;
        s.traffic.rev_bytes += ip.tot_len as u64;
        // The wedge signal: the backend answers (a hung engine accepts
        // and ACKs requests but sends no byte back).
        if l4.payload != 0 {
            s.reply_data += 1;
            if rev.data & DATA_ANSWERED == 0 {
                rev.data |= DATA_ANSWERED;
                s.answered += 1;
            }
        }
    }
    if let Some(s) = stats::service(rev.service_id) {
        s.rev_packets += 1;
        s.rev_bytes += ip.tot_len as u64;
    }

    let route = Route {
        proto: ip.proto,
        src_be: rev.vip_be,
        dst_be: rev.client_be,
        tot_len: ip.tot_len,
        tx: Reason::ReverseTx,
        redirect: Reason::ReverseRedirect,
        now,
    };
    match egress::resolve::<F>(ctx, &mut rev.nh, &route) {
        Ok(()) => {}
        // Too long for the client's path: the backend hears it from the
        // SNAT address, quoting its own packet.
        Err((Reason::MtuExceeded, mtu)) => return F::too_big(ctx, ip, mtu, now),
        Err((e, _)) => return (xdp_action::XDP_DROP, e),
    }
    if l4.tcp && l4.flags & l4::TCP_SYN != 0 {
        // A retransmitted SYN-ACK, after the handshake completed.
        l4::clamp_mss(ctx, l4, rev.backend_id);
    }
    let to = Nat {
        src: &rev.vip_be,
        dst: &rev.client_be,
        sport_be: rev.vport_be,
        dport_be: rev.cport_be,
    };
    if let Err(e) = l4::nat(ctx, ip, l4, &to) {
        return (xdp_action::XDP_DROP, e);
    }
    egress::out(ctx, &rev.nh, &route)
}

/// The client's tuple of the flow `r` belongs to: its `FLOWS` key.
#[inline(always)]
fn flow_key<A: Addr>(r: &Reverse<A>, proto: u8) -> FlowKey<A> {
    FlowKey::new(r.client_be, r.vip_be, r.cport_be, r.vport_be, proto)
}
