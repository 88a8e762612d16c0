//! ICMPv6 errors (RFC 4443): the IPv6 counterparts of `icmp`. Which ones
//! the data plane translates through the NAT, and the checks a translated
//! one must pass. Pure, so the host tests it; the XDP side is
//! failover-ebpf/src/icmp6.rs and toobig.rs.

pub const PROTO: u8 = 58;
pub const DEST_UNREACH: u8 = 1;
/// Packet too big: the MTU in the header's last four bytes (RFC 4443 3.2).
pub const PACKET_TOO_BIG: u8 = 2;
pub const TIME_EXCEEDED: u8 = 3;
/// Type, code, checksum, and four bytes of rest (the MTU of a packet too
/// big).
pub const HEADER: usize = 8;
/// The least a quote must hold to name a flow: an IPv6 header with no
/// extension header and the first 8 bytes of its L4 header (the ports).
pub const QUOTE_MIN: usize = 40 + 8;
/// An ICMPv6 error fits the IPv6 minimum MTU (RFC 4443 2.4 (c)): at most
/// this many bytes of ICMPv6. Routers quote up to there, so a packet too
/// big about a full-size packet is this long.
pub const MESSAGE_MAX: usize = 1280 - 40;
/// The IPv6 minimum link MTU: no path has less (RFC 8200 5), and a node
/// never lowers its path MTU below it (RFC 8201 4).
pub const MTU_FLOOR: u32 = 1280;

/// Errors about a packet: the kinds translated through the NAT. Parameter
/// problem (4) is not among them: it points into a header the edge
/// rewrote, and passes to the kernel like the informational types.
#[must_use]
pub const fn is_error(ty: u8) -> bool {
    ty == DEST_UNREACH || ty == PACKET_TOO_BIG || ty == TIME_EXCEEDED
}

/// A packet too big's MTU is one a real path has, and smaller than the
/// packet it refused (`quoted_len`: the quoted header's payload length
/// plus its 40 bytes). Anything else is forged or broken.
#[must_use]
pub const fn mtu_plausible(mtu: u32, quoted_len: u32) -> bool {
    mtu >= MTU_FLOOR && mtu < quoted_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_path_mtus_below_the_packet_are_plausible() {
        assert!(mtu_plausible(1280, 1500));
        assert!(mtu_plausible(1499, 1500));
        assert!(!mtu_plausible(1279, 1500), "below the IPv6 minimum");
        assert!(!mtu_plausible(0, 1500));
        assert!(!mtu_plausible(1500, 1500), "not smaller than the packet");
        assert!(!mtu_plausible(u32::MAX, 1500));
    }

    #[test]
    fn errors_are_unreachable_too_big_and_time_exceeded() {
        assert!(is_error(1) && is_error(2) && is_error(3));
        // Parameter problem, echo, and neighbour discovery are not.
        for ty in [0, 4, 128, 129, 133, 134, 135, 136, 137, 255] {
            assert!(!is_error(ty), "{ty}");
        }
    }
}
