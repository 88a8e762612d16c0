//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All values are the 16-bit words exactly as they sit in the packet, read
//! with native endianness: the one's-complement sum is byte-order
//! independent, so no swapping is needed as long as old and new words are
//! read the same way.

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word.
#[inline(always)]
#[must_use]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// Incremental update for a 32-bit field (an address), as two 16-bit words.
#[inline(always)]
#[must_use]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32)
        + (!(old as u16) as u32)
        + (!((old >> 16) as u16) as u32)
        + ((new as u16) as u32)
        + ((new >> 16) as u16 as u32);
    !fold(sum)
}

/// What replacing `old` by `new` adds to a one's-complement sum (RFC 1624
/// eqn. 3's `~m + m'`), for one 16-bit word; sums of these, unfolded,
/// are applied at once by [`apply`].
#[inline(always)]
#[must_use]
pub const fn delta16(old: u16, new: u16) -> u32 {
    (!old as u32) + (new as u32)
}

/// The same for a 32-bit field, as two words.
#[inline(always)]
#[must_use]
pub const fn delta32(old: u32, new: u32) -> u32 {
    delta16(old as u16, new as u16) + delta16((old >> 16) as u16, (new >> 16) as u16)
}

/// Applies an unfolded sum of deltas: `HC' = ~(~HC + Σ(~m + m'))`. One
/// update for several fields equals one per field (the sum is associative):
/// a NAT folds both addresses into the IP and L4 checksums with one sum.
#[inline(always)]
#[must_use]
pub const fn apply(check: u16, delta: u32) -> u16 {
    !fold(fold(delta) as u32 + !check as u32)
}

/// Incremental update for two bytes at byte offset `off` from the start
/// of the checksummed data, which need not be even (a TCP option's value
/// can sit anywhere). Bytes `[x, y]` at an odd offset add to the sum as the
/// word `[y, x]` would at an even one.
#[inline(always)]
#[must_use]
pub const fn replace_pair_at(check: u16, off: usize, old: [u8; 2], new: [u8; 2]) -> u16 {
    if off & 1 == 0 {
        replace16(check, u16::from_ne_bytes(old), u16::from_ne_bytes(new))
    } else {
        replace16(
            check,
            u16::from_ne_bytes([old[1], old[0]]),
            u16::from_ne_bytes([new[1], new[0]]),
        )
    }
}

/// UDP's checksum field uses 0 for "no checksum" and so sends a computed 0 as
/// 0xffff (RFC 768). Keeps both rules after an incremental update.
#[inline(always)]
#[must_use]
pub const fn udp_adjust(result: u16) -> u16 {
    if result == 0 { 0xffff } else { result }
}

/// One's-complement sum of a byte slice (odd length padded with zero), not
/// yet folded or inverted. Used for full recomputation on the host and for
/// the small, fixed-size headers the XDP program builds itself.
#[must_use]
pub fn sum_bytes(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(u16::from_be_bytes([*last, 0]));
    }
    // Fold early so long inputs cannot overflow.
    (acc & 0xffff) + (acc >> 16)
}

/// Full IPv4 header checksum of `header` (checksum field included as-is;
/// zero it first to compute, or leave it to verify: a valid header sums to 0).
#[must_use]
pub fn ipv4_header(header: &[u8]) -> u16 {
    !fold(sum_bytes(header, 0))
}

/// Full TCP/UDP checksum over the IPv4 pseudo-header and `segment`
/// (header plus payload, checksum field included as-is).
#[must_use]
pub fn ipv4_l4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum_bytes(&src, 0);
    acc = sum_bytes(&dst, acc);
    acc += u32::from(proto);
    acc += segment.len() as u32;
    !fold(sum_bytes(segment, acc))
}

/// The checksum of a segment the data plane builds itself (an RST), with
/// every word read in native order: `addr_sum` is `Addr::sum` of its
/// source and destination (either family: the pseudo-headers differ only
/// in them for segments this short). Store it with `to_ne_bytes`.
#[inline(always)]
#[must_use]
pub fn l4_ne(addr_sum: u32, proto: u8, segment: &[u8; 20]) -> u16 {
    let mut sum = addr_sum
        + u32::from(u16::from_ne_bytes([0, proto]))
        + u32::from(u16::from_ne_bytes((segment.len() as u16).to_be_bytes()));
    let mut i = 0;
    while i < segment.len() {
        sum += u32::from(u16::from_ne_bytes([segment[i], segment[i + 1]]));
        i += 2;
    }
    !fold(sum)
}

/// Full TCP/UDP/ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200
/// 8.1) and `segment`.
#[must_use]
pub fn ipv6_l4(src: [u8; 16], dst: [u8; 16], proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum_bytes(&src, 0);
    acc = sum_bytes(&dst, acc);
    acc += u32::from(proto);
    acc = sum_bytes(&(segment.len() as u32).to_be_bytes(), acc);
    !fold(sum_bytes(segment, acc))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// NAT66 rewrites an L4 checksum by folding in the address change
    /// (`Addr::replace_in`): the result must equal a full recomputation.
    #[test]
    fn ipv6_address_replacement_matches_recomputation() {
        use crate::{Addr, Addr6};
        let mut rng = Lcg(7);
        for _ in 0..500 {
            let mut seg = [0u8; 28];
            for b in &mut seg {
                *b = rng.next() as u8;
            }
            seg[16] = 0;
            seg[17] = 0;
            let mut addrs = [[0u8; 16]; 4];
            for a in &mut addrs {
                for b in a.iter_mut() {
                    *b = rng.next() as u8;
                }
            }
            let c = ipv6_l4(addrs[0], addrs[1], 6, &seg);
            let words = |a: [u8; 16]| -> Addr6 {
                core::array::from_fn(|i| {
                    u32::from_ne_bytes(a[i * 4..i * 4 + 4].try_into().unwrap())
                })
            };
            // The program holds the field as the packet does, in a native
            // word.
            let stored = u16::from_ne_bytes(c.to_be_bytes());
            let mut inc = Addr6::replace_in(stored, words(addrs[0]), words(addrs[2]));
            inc = Addr6::replace_in(inc, words(addrs[1]), words(addrs[3]));
            let full = ipv6_l4(addrs[2], addrs[3], 6, &seg);
            assert_eq!(u16::from_be_bytes(inc.to_ne_bytes()), full);
        }
    }

    /// A small deterministic generator, so the property tests need no crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 32) as u32
        }
    }

    fn header(rng: &mut Lcg) -> [u8; 20] {
        let mut h = [0u8; 20];
        for b in &mut h {
            *b = rng.next() as u8;
        }
        h[10] = 0;
        h[11] = 0;
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// The in-program checksum of a built segment equals the full one.
    #[test]
    fn native_order_segment_checksum_matches_full() {
        use crate::{Addr, Addr6};
        let mut rng = Lcg(11);
        for _ in 0..1000 {
            let mut seg = [0u8; 20];
            seg.iter_mut().for_each(|b| *b = rng.next() as u8);
            seg[16] = 0;
            seg[17] = 0;
            let (s4, d4) = (rng.next().to_ne_bytes(), rng.next().to_ne_bytes());
            let sum4 = u32::from_ne_bytes(s4).sum() + u32::from_ne_bytes(d4).sum();
            assert_eq!(
                l4_ne(sum4, 6, &seg).to_ne_bytes(),
                ipv4_l4(s4, d4, 6, &seg).to_be_bytes()
            );
            let mut s6 = [0u8; 16];
            let mut d6 = [0u8; 16];
            s6.iter_mut()
                .chain(d6.iter_mut())
                .for_each(|b| *b = rng.next() as u8);
            let w = |a: [u8; 16]| -> Addr6 {
                core::array::from_fn(|i| {
                    u32::from_ne_bytes(a[i * 4..i * 4 + 4].try_into().unwrap())
                })
            };
            let sum6 = w(s6).sum() + w(d6).sum();
            assert_eq!(
                l4_ne(sum6, 6, &seg).to_ne_bytes(),
                ipv6_l4(s6, d6, 6, &seg).to_be_bytes()
            );
        }
    }

    /// One update with the summed deltas equals the chain of updates.
    #[test]
    fn applied_deltas_match_chained_replacements() {
        let mut rng = Lcg(3);
        for _ in 0..10_000 {
            let (c, a, b, x, y) = (
                rng.next() as u16,
                rng.next(),
                rng.next(),
                rng.next(),
                rng.next(),
            );
            let chained = replace32(replace32(c, a, b), x, y);
            let once = apply(c, delta32(a, b) + delta32(x, y));
            assert_eq!(
                fold(u32::from(!chained)) % 0xffff,
                fold(u32::from(!once)) % 0xffff
            );
        }
    }

    #[test]
    fn valid_header_verifies_to_zero() {
        let mut rng = Lcg(1);
        for _ in 0..1000 {
            let h = header(&mut rng);
            assert_eq!(ipv4_header(&h), 0);
        }
    }

    #[test]
    fn replace32_matches_full_recompute() {
        let mut rng = Lcg(7);
        for _ in 0..10_000 {
            let mut h = header(&mut rng);
            let old = u32::from_ne_bytes(h[12..16].try_into().unwrap());
            let new = rng.next();
            let check = u16::from_ne_bytes([h[10], h[11]]);
            h[12..16].copy_from_slice(&new.to_ne_bytes());
            let inc = replace32(check, old, new);
            h[10..12].copy_from_slice(&inc.to_ne_bytes());
            assert_eq!(ipv4_header(&h), 0, "header {h:?}");
        }
    }

    #[test]
    fn replace16_matches_full_recompute() {
        let mut rng = Lcg(11);
        for _ in 0..10_000 {
            let mut h = header(&mut rng);
            // TTL and protocol share a word, as in the TTL decrement.
            let old = u16::from_ne_bytes([h[8], h[9]]);
            h[8] = h[8].wrapping_sub(1);
            let new = u16::from_ne_bytes([h[8], h[9]]);
            let check = u16::from_ne_bytes([h[10], h[11]]);
            h[10..12].copy_from_slice(&replace16(check, old, new).to_ne_bytes());
            assert_eq!(ipv4_header(&h), 0);
        }
    }

    #[test]
    fn a_wrong_checksum_stays_wrong_by_the_same_amount() {
        let mut rng = Lcg(3);
        let mut h = header(&mut rng);
        // Corrupt the checksum, then rewrite an address incrementally.
        h[10] ^= 0x5a;
        let before = ipv4_header(&h);
        let old = u32::from_ne_bytes(h[12..16].try_into().unwrap());
        let check = u16::from_ne_bytes([h[10], h[11]]);
        h[12..16].copy_from_slice(&0x0102_0304u32.to_ne_bytes());
        h[10..12].copy_from_slice(&replace32(check, old, 0x0102_0304).to_ne_bytes());
        assert_ne!(ipv4_header(&h), 0);
        assert_eq!(ipv4_header(&h), before);
    }

    #[test]
    fn replace_pair_at_any_offset_matches_full_recompute() {
        let mut rng = Lcg(13);
        for _ in 0..10_000 {
            let mut seg = [0u8; 40];
            for b in &mut seg {
                *b = rng.next() as u8;
            }
            seg[16] = 0;
            seg[17] = 0;
            let c = ipv4_l4([192, 0, 2, 1], [192, 0, 2, 2], 6, &seg);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            // Anywhere in the options, odd or even.
            let off = 20 + (rng.next() as usize % 19);
            let old = [seg[off], seg[off + 1]];
            let new = (rng.next() as u16).to_be_bytes();
            seg[off..off + 2].copy_from_slice(&new);
            let check = u16::from_ne_bytes([seg[16], seg[17]]);
            let inc = replace_pair_at(check, off, old, new);
            seg[16..18].copy_from_slice(&inc.to_ne_bytes());
            assert_eq!(
                ipv4_l4([192, 0, 2, 1], [192, 0, 2, 2], 6, &seg),
                0,
                "offset {off}"
            );
        }
    }

    #[test]
    fn udp_zero_rule() {
        assert_eq!(udp_adjust(0), 0xffff);
        assert_eq!(udp_adjust(0x1234), 0x1234);
    }

    #[test]
    fn l4_checksum_of_known_segment() {
        // A UDP datagram 192.0.2.1:1000 -> 192.0.2.2:2000 "hi", checksum
        // worked out by hand: pseudo 0xc000+0x0201+0xc000+0x0202+17+10,
        // header 1000+2000+10, data 0x6869.
        let seg = [0x03, 0xe8, 0x07, 0xd0, 0x00, 0x0a, 0x00, 0x00, b'h', b'i'];
        let c = ipv4_l4([192, 0, 2, 1], [192, 0, 2, 2], 17, &seg);
        let manual: u32 = 0xc000 + 0x0201 + 0xc000 + 0x0202 + 17 + 10 + 1000 + 2000 + 10 + 0x6869;
        assert_eq!(c, !fold(manual));
    }
}
