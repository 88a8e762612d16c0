//! A reference model of the XDP program's verdict, written from the
//! verdict table (docs/datapath.md) rather than from the program, for the
//! differential fuzz test (tests/tests/hostile.rs): every frame the model
//! calls malformed or foreign must get exactly that reason, untouched, and
//! no frame may be sent on unless the model says it is valid and ours.
//!
//! What happens to a valid frame of ours depends on flow state and on the
//! backends (forwarded, reset, or dropped for a state reason); the model
//! says which reasons are possible then, not which one.

use crate::{
    Addr, Reason, VipFilter, checksum, icmp,
    tcp::{self, SynWorth},
};

/// What the data plane is configured with.
pub struct Config<'a> {
    pub snat: [u8; 4],
    pub vips: &'a VipFilter,
    /// `(vip, port, protocol)` of every service.
    pub services: &'a [([u8; 4], u16, u8)],
}

/// The model's verdict for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Exactly this reason, and the frame is left as it was.
    Exactly(Reason),
    /// A valid segment toward a service: the outcome depends on state.
    Forward,
    /// A valid segment toward the SNAT address: the outcome depends on
    /// whether it belongs to a flow.
    Reverse,
    /// A well-formed ICMP error to a VIP or the SNAT address: translated
    /// if it quotes a flow, else passed.
    Icmp,
}

impl Expected {
    /// Whether the program may end a frame with `r`.
    #[must_use]
    pub fn allows(self, r: Reason) -> bool {
        use Reason::*;
        match self {
            Expected::Exactly(want) => r == want,
            Expected::Forward => matches!(
                r,
                ForwardTx
                    | ForwardRedirect
                    | ResetSent
                    | NoNeighbour
                    | NoBackend
                    | FlowTableFull
                    | SnatExhausted
                    | NoRoute
                    | RedirectFailed
                    | MtuExceeded
                    | FragNeededSent
                    | FragNeededLimited
                    | NotOpening
                    | JumpFailed
            ),
            Expected::Reverse => matches!(
                r,
                ReverseTx
                    | ReverseRedirect
                    | NotVip
                    | NoNeighbour
                    | NoRoute
                    | RedirectFailed
                    | MtuExceeded
                    | FragNeededSent
                    | FragNeededLimited
            ),
            Expected::Icmp => matches!(
                r,
                IcmpTx
                    | IcmpRedirect
                    | IcmpNoFlow
                    | NoNeighbour
                    | NoRoute
                    | RedirectFailed
                    | MtuExceeded
            ),
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The verdict the documented rules give `frame`.
#[must_use]
pub fn expect(frame: &[u8], cfg: &Config) -> Expected {
    match classify(frame, cfg) {
        Ok(e) => e,
        Err(r) => Expected::Exactly(r),
    }
}

fn classify(f: &[u8], cfg: &Config) -> Result<Expected, Reason> {
    // Ethernet, one optional 802.1Q/802.1ad tag.
    if f.len() < 14 {
        return Err(Reason::TruncatedEth);
    }
    let (ether_type, l3) = match be16(f, 12) {
        0x8100 | 0x88a8 => {
            if f.len() < 18 {
                return Err(Reason::TruncatedEth);
            }
            (be16(f, 16), 18)
        }
        t => (t, 14),
    };
    if ether_type == 0x86dd {
        // The IPv6 program; the model is of a node without IPv6 (`NODE6`
        // zero), which leaves IPv6 to the kernel before parsing it.
        return Err(Reason::NotConfigured);
    }
    if ether_type != 0x0800 {
        return Err(Reason::NotIpv4);
    }
    if f.len() < l3 + 20 {
        return Err(Reason::MalformedIpv4);
    }
    let ip = &f[l3..];
    if cfg.snat == [0; 4] {
        return Err(Reason::NotConfigured);
    }
    let dst: [u8; 4] = ip[16..20].try_into().unwrap_or_default();
    let reverse = dst == cfg.snat;
    if !reverse && !cfg.vips.may_contain(u32::from_ne_bytes(dst)) {
        return Err(Reason::NotVip);
    }
    // The IPv4 header.
    if ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
        return Err(Reason::MalformedIpv4);
    }
    if ip[0] & 0x0f > 5 {
        return Err(Reason::IpOptions);
    }
    let tot_len = be16(ip, 2) as usize;
    if tot_len < 20 || tot_len > ip.len() {
        return Err(Reason::MalformedIpv4);
    }
    if crate::checksum::ipv4_header(&ip[..20]) != 0 {
        return Err(Reason::BadIpv4Checksum);
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(Reason::Fragment);
    }
    if ip[8] <= 1 {
        return Err(Reason::TtlExpired);
    }
    let proto = ip[9];
    if proto == icmp::PROTO {
        return classify_icmp(&ip[20..tot_len], dst);
    }
    if proto != 6 && proto != 17 {
        return Err(Reason::NotTcpUdp);
    }
    // L4, bounded by the IP total length.
    let seg = &ip[20..tot_len];
    let dport;
    if proto == 6 {
        if seg.len() < 20 {
            return Err(Reason::TruncatedL4);
        }
        let hlen = (seg[12] >> 4) as usize * 4;
        if hlen < 20 || hlen > seg.len() {
            return Err(Reason::TruncatedL4);
        }
        let flags = seg[13];
        if !tcp::flags_valid(flags) {
            return Err(Reason::BadTcpFlags);
        }
        dport = be16(seg, 2);
        if !reverse && tcp::opening(flags) && seg.len() == hlen {
            let mut h = [0u8; tcp::MAX_HEADER];
            h[..hlen].copy_from_slice(&seg[..hlen]);
            let src = u32::from_ne_bytes(ip[12..16].try_into().unwrap_or_default());
            if tcp::judge_syn(src.sum() + u32::from_ne_bytes(dst).sum(), &h, hlen)
                == SynWorth::BadChecksum
            {
                return Err(Reason::BadL4Checksum);
            }
        }
    } else {
        if seg.len() < 8 {
            return Err(Reason::TruncatedL4);
        }
        let len = be16(seg, 4) as usize;
        if len < 8 || len > seg.len() {
            return Err(Reason::TruncatedL4);
        }
        dport = be16(seg, 2);
    }
    if reverse {
        return Ok(Expected::Reverse);
    }
    if !cfg
        .services
        .iter()
        .any(|&(vip, port, p)| vip == dst && port == dport && p == proto)
    {
        // A VIP filter false positive, or a port no service uses.
        return Err(Reason::NotVip);
    }
    Ok(Expected::Forward)
}

/// An ICMP message `m` to `dst` (a VIP or the SNAT address).
fn classify_icmp(m: &[u8], dst: [u8; 4]) -> Result<Expected, Reason> {
    if m.len() < icmp::HEADER {
        return Err(Reason::IcmpMalformed);
    }
    if !icmp::is_error(m[0]) {
        return Err(Reason::NotTcpUdp);
    }
    if m.len() < icmp::HEADER + icmp::QUOTE_MIN || m.len() > icmp::MESSAGE_MAX {
        return Err(Reason::IcmpMalformed);
    }
    if checksum::fold(checksum::sum_bytes(m, 0)) != 0xffff {
        return Err(Reason::IcmpMalformed);
    }
    let q = &m[icmp::HEADER..];
    if q[0] >> 4 != 4 || q[0] & 0x0f < 5 {
        return Err(Reason::IcmpMalformed);
    }
    if q[0] & 0x0f != 5 || (q[9] != 6 && q[9] != 17) || q[12..16] != dst {
        return Err(Reason::IcmpNoFlow);
    }
    if m[0] == icmp::DEST_UNREACH
        && m[1] == icmp::FRAG_NEEDED
        && !icmp::mtu_plausible(be16(m, 6), be16(q, 2))
    {
        return Err(Reason::IcmpMalformed);
    }
    Ok(Expected::Icmp)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::checksum;

    const SNAT: [u8; 4] = [198, 51, 100, 1];
    const VIP: [u8; 4] = [203, 0, 113, 10];
    const CLIENT: [u8; 4] = [192, 0, 2, 100];
    const SERVICES: [([u8; 4], u16, u8); 2] = [(VIP, 80, 6), (VIP, 53, 17)];

    fn filter() -> VipFilter {
        let mut f = VipFilter::empty();
        f.insert(u32::from_ne_bytes(VIP));
        f
    }

    /// Ethernet + IPv4 + `l4` (checksums computed), protocol `proto`.
    fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, mut l4: Vec<u8>) -> Vec<u8> {
        let at = if proto == 6 { 16 } else { 6 };
        let c = checksum::ipv4_l4(src, dst, proto, &l4);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        let mut f = Vec::from([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0]);
        let tot = (20 + l4.len()) as u16;
        let mut ip = Vec::from([0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]);
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = checksum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }

    fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::from([0u8; 20]);
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t.extend_from_slice(payload);
        t
    }

    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::from([0u8; 8]);
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        u
    }

    fn check(f: &[u8]) -> Expected {
        let vips = filter();
        expect(
            f,
            &Config {
                snat: SNAT,
                vips: &vips,
                services: &SERVICES,
            },
        )
    }

    fn fix_ip(f: &mut [u8]) {
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::ipv4_header(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn valid_frames_are_ours() {
        assert_eq!(
            check(&frame(CLIENT, VIP, 6, tcp(5000, 80, tcp::SYN, &[]))),
            Expected::Forward
        );
        assert_eq!(
            check(&frame(CLIENT, VIP, 17, udp(5000, 53, b"q"))),
            Expected::Forward
        );
        let back = frame(
            [198, 51, 100, 11],
            SNAT,
            6,
            tcp(8000, 40_000, tcp::ACK, b"x"),
        );
        assert_eq!(check(&back), Expected::Reverse);
        assert!(Expected::Forward.allows(Reason::ForwardRedirect));
        assert!(!Expected::Forward.allows(Reason::ReverseTx));
        assert!(Expected::Reverse.allows(Reason::NotVip));
    }

    #[test]
    fn each_rule_gives_its_reason() {
        use Reason::*;
        let syn = frame(CLIENT, VIP, 6, tcp(5000, 80, tcp::SYN, &[]));
        let e = |r| Expected::Exactly(r);
        assert_eq!(check(&syn[..13]), e(TruncatedEth));
        assert_eq!(check(&syn[..30]), e(MalformedIpv4));
        let mut arp = syn.clone();
        arp[13] = 6;
        assert_eq!(check(&arp), e(NotIpv4));
        let mut v6 = arp.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(check(&v6), e(NotConfigured));
        assert_eq!(
            check(&frame(CLIENT, [203, 0, 113, 99], 6, tcp(1, 80, 2, &[]))),
            e(NotVip)
        );
        assert_eq!(
            check(&frame(CLIENT, VIP, 6, tcp(1, 81, tcp::SYN, &[]))),
            e(NotVip)
        );
        let mut sum = syn.clone();
        sum[24] ^= 1;
        assert_eq!(check(&sum), e(BadIpv4Checksum));
        let mut long = syn.clone();
        long[16..18].copy_from_slice(&100u16.to_be_bytes());
        fix_ip(&mut long);
        assert_eq!(check(&long), e(MalformedIpv4));
        // tot_len shorter than the TCP header in the frame.
        let mut short = syn.clone();
        short[16..18].copy_from_slice(&36u16.to_be_bytes());
        fix_ip(&mut short);
        assert_eq!(check(&short), e(TruncatedL4));
        for doff in [4u8, 6, 15] {
            let mut d = syn.clone();
            d[14 + 20 + 12] = doff << 4;
            assert_eq!(check(&d), e(TruncatedL4), "doff {doff}");
        }
        for len in [4u16, 200] {
            let mut u = frame(CLIENT, VIP, 17, udp(5000, 53, b"hello world"));
            u[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&len.to_be_bytes());
            assert_eq!(check(&u), e(TruncatedL4), "udp len {len}");
        }
        for flags in [tcp::SYN | tcp::FIN, tcp::SYN | tcp::RST, 0, tcp::FIN] {
            assert_eq!(
                check(&frame(CLIENT, VIP, 6, tcp(1, 80, flags, &[]))),
                e(BadTcpFlags)
            );
        }
        let mut bad = syn.clone();
        bad[14 + 20 + 16] ^= 0x10;
        assert_eq!(check(&bad), e(BadL4Checksum));
        // A data segment with a wrong checksum is not checked (per packet).
        let mut data = frame(CLIENT, VIP, 6, tcp(1, 80, tcp::ACK, b"x"));
        data[14 + 20 + 16] ^= 0x10;
        assert_eq!(check(&data), Expected::Forward);
    }

    /// An ICMP error (`ty`, `code`, `rest`) from `src` to `dst` quoting
    /// `quote`, checksums computed.
    fn icmp_error(dst: [u8; 4], ty: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
        let mut m = Vec::from([ty, code, 0, 0]);
        m.extend_from_slice(&rest);
        m.extend_from_slice(quote);
        let c = !checksum::fold(checksum::sum_bytes(&m, 0));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = frame([198, 51, 100, 254], dst, 1, Vec::from([0u8; 8]));
        f.truncate(34);
        f.extend_from_slice(&m);
        let tot = (20 + m.len()) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        fix_ip(&mut f);
        f
    }

    #[test]
    fn icmp_errors_are_judged_before_any_flow_lookup() {
        use Reason::*;
        let e = |r| Expected::Exactly(r);
        // The packet the edge sent a backend, as a router quotes it.
        let sent = frame(
            SNAT,
            [198, 51, 100, 11],
            6,
            tcp(40_000, 8000, tcp::ACK, &[7; 1400]),
        );
        let quote = &sent[14..14 + 28];
        let mtu = |m: u16| {
            let b = m.to_be_bytes();
            [0, 0, b[0], b[1]]
        };
        assert_eq!(
            check(&icmp_error(SNAT, 3, 4, mtu(1400), quote)),
            Expected::Icmp
        );
        assert_eq!(
            check(&icmp_error(SNAT, 11, 0, [0; 4], quote)),
            Expected::Icmp
        );
        // A longer quote, as Linux sends.
        assert_eq!(
            check(&icmp_error(SNAT, 3, 3, [0; 4], &sent[14..14 + 200])),
            Expected::Icmp
        );
        // Echo requests and the like stay the kernel's.
        assert_eq!(check(&icmp_error(SNAT, 8, 0, [0; 4], quote)), e(NotTcpUdp));
        // Truncated, too long, a bad checksum, a bad quoted header.
        assert_eq!(
            check(&icmp_error(SNAT, 3, 4, mtu(1400), &quote[..27])),
            e(IcmpMalformed)
        );
        let long = Vec::from([0u8; 600]);
        assert_eq!(
            check(&icmp_error(SNAT, 3, 1, [0; 4], &long)),
            e(IcmpMalformed)
        );
        let mut bad = icmp_error(SNAT, 3, 4, mtu(1400), quote);
        bad[40] ^= 1;
        fix_ip(&mut bad);
        assert_eq!(check(&bad), e(IcmpMalformed));
        let mut q = Vec::from(quote);
        q[0] = 0x44;
        assert_eq!(check(&icmp_error(SNAT, 3, 1, [0; 4], &q)), e(IcmpMalformed));
        // Implausible MTUs.
        for m in [0, 500, 1500, 9000] {
            assert_eq!(
                check(&icmp_error(SNAT, 3, 4, mtu(m), quote)),
                e(IcmpMalformed),
                "{m}"
            );
        }
        // Not about a packet from the address it came to, or not TCP/UDP.
        assert_eq!(check(&icmp_error(VIP, 3, 1, [0; 4], quote)), e(IcmpNoFlow));
        let mut q = Vec::from(quote);
        q[9] = 1;
        assert_eq!(check(&icmp_error(SNAT, 3, 1, [0; 4], &q)), e(IcmpNoFlow));
        assert!(Expected::Icmp.allows(IcmpTx) && !Expected::Icmp.allows(ForwardTx));
    }
}
