//! Checked access to packet memory and the Ethernet layer.
//!
//! Every read of the packet goes through `ptr_at`, which proves to the
//! verifier that `[data + off, data + off + size_of::<T>())` lies inside the
//! frame. Pointers must be taken again after any head/tail adjustment.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use network_types::eth::EthHdr;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The layer-3 protocol and where its header starts (after one optional
/// 802.1Q/802.1ad tag).
pub struct L2 {
    pub ether_type: u16,
    pub l3_off: usize,
}

#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<L2> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        // The inner EtherType sits in the tag's last two bytes.
        let inner: *mut u16 = ptr_at(ctx, EthHdr::LEN + 2)?;
        return Some(L2 {
            ether_type: u16::from_be(unsafe { *inner }),
            l3_off: EthHdr::LEN + 4,
        });
    }
    Some(L2 {
        ether_type,
        l3_off: EthHdr::LEN,
    })
}
