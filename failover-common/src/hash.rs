//! Flow hashing shared by the XDP program (selection, SNAT port choice) and
//! the agent (`flows` output, tests). Two edge nodes with the same seed and
//! the same ring send a client tuple to the same backend, so the hash must be
//! a pure function of the tuple and the seed.

/// murmur3's 32-bit finaliser: cheap, and every input bit affects every
/// output bit, which Maglev's modulo needs.
#[inline(always)]
#[must_use]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a client 5-tuple. Addresses and ports are taken as they sit in
/// the packet (network order read natively); only equality matters.
#[inline(always)]
#[must_use]
pub const fn flow_hash(
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    seed: u32,
) -> u32 {
    let mut h = seed ^ 0x9e37_79b9;
    h = mix32(h ^ src_be);
    h = mix32(h ^ dst_be);
    h = mix32(h ^ ((sport_be as u32) << 16 | dport_be as u32));
    mix32(h ^ proto as u32)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = flow_hash(1, 2, 3, 4, 6, 0);
        assert_eq!(a, flow_hash(1, 2, 3, 4, 6, 0));
        assert_ne!(a, flow_hash(1, 2, 3, 4, 6, 1));
        assert_ne!(a, flow_hash(1, 2, 4, 3, 6, 0));
        assert_ne!(a, flow_hash(1, 2, 3, 4, 17, 0));
    }

    #[test]
    fn spreads_sequential_ports_over_a_prime_ring() {
        // 65537 slots, 100k sequential source ports: every bucket of 16
        // must be used roughly evenly (within 20%).
        const M: u32 = 65_537;
        let mut buckets = [0u32; 16];
        for port in 0..100_000u32 {
            let h = flow_hash(0x0a00_0001, 0x0a00_0002, port as u16, 80, 6, port >> 16);
            buckets[((h % M) * 16 / M) as usize] += 1;
        }
        let mean = 100_000 / 16;
        for b in buckets {
            assert!(b > mean * 8 / 10 && b < mean * 12 / 10, "{buckets:?}");
        }
    }
}
