//! ICMPv4 errors: which ones the data plane translates through the NAT,
//! the checks a translated one must pass, and the frag-needed the edge
//! sends itself. Pure, so the host tests it; the XDP side is
//! failover-ebpf/src/icmp.rs and toobig.rs.

pub const PROTO: u8 = 1;
pub const DEST_UNREACH: u8 = 3;
pub const TIME_EXCEEDED: u8 = 11;
/// Destination unreachable, fragmentation needed and DF set (RFC 1191).
pub const FRAG_NEEDED: u8 = 4;
/// The ICMP header: type, code, checksum, 4 bytes of rest (the next-hop
/// MTU in the last two for frag-needed).
pub const HEADER: usize = 8;
/// The least a quote must hold to name a flow: an IPv4 header without
/// options and the first 8 bytes of its L4 header (RFC 792), which carry
/// the ports.
pub const QUOTE_MIN: usize = 28;
/// Routers keep an ICMP error within 576 bytes of IP (RFC 1812 4.3.2.3):
/// at most this many bytes of ICMP. A longer one is not checked (its
/// checksum would cost a longer loop) and is never translated.
pub const MESSAGE_MAX: usize = 576 - 20;
/// The smallest next-hop MTU a frag-needed may carry: Linux's `min_pmtu`.
/// A host ignores lower ones anyway, and a forger sends them.
pub const MTU_FLOOR: u16 = 552;
/// The frag-needed the edge sends: its header and a 28-byte quote.
pub const FRAG_NEEDED_LEN: usize = HEADER + QUOTE_MIN;

/// Errors about a packet: the kinds translated through the NAT.
#[must_use]
pub const fn is_error(ty: u8) -> bool {
    ty == DEST_UNREACH || ty == TIME_EXCEEDED
}

/// A frag-needed's MTU is one a real path has, and smaller than the packet
/// it refused (`quoted_len`, the quoted header's total length). Anything
/// else is forged or broken.
#[must_use]
pub const fn mtu_plausible(mtu: u16, quoted_len: u16) -> bool {
    mtu >= MTU_FLOOR && mtu < quoted_len
}

/// A frag-needed's ICMP header for `mtu`, checksum left zero.
#[must_use]
pub const fn frag_needed_header(mtu: u16) -> [u8; HEADER] {
    let m = mtu.to_be_bytes();
    [DEST_UNREACH, FRAG_NEEDED, 0, 0, 0, 0, m[0], m[1]]
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn frag_needed_header_carries_the_mtu() {
        assert_eq!(frag_needed_header(1400), [3, 4, 0, 0, 0, 0, 0x05, 0x78]);
    }

    #[test]
    fn only_real_path_mtus_below_the_packet_are_plausible() {
        assert!(mtu_plausible(1400, 1500));
        assert!(mtu_plausible(552, 553));
        assert!(!mtu_plausible(551, 1500), "below min_pmtu");
        assert!(!mtu_plausible(0, 1500), "RFC 1191's old-router zero");
        assert!(!mtu_plausible(1500, 1500), "not smaller than the packet");
        assert!(!mtu_plausible(9000, 1500));
    }

    #[test]
    fn errors_are_unreachable_and_time_exceeded() {
        assert!(is_error(3) && is_error(11));
        for ty in [0, 4, 5, 8, 12, 13, 255] {
            assert!(!is_error(ty), "{ty}");
        }
    }
}
