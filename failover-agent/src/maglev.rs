//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Every backend walks its own permutation of the `m` slots, derived only
//! from its stable key (a hash of its name), and takes turns claiming the
//! next free slot of that permutation. Weights set how often a backend gets
//! a turn (the "weighted Maglev" of Katran's v2 builder): backend `i` takes
//! its `k`-th turn at virtual time `k / w_i`, and turns are served in time
//! order, so after `m` turns each backend owns `m * w_i / sum(w)` slots
//! (within one or two).
//!
//! Nothing depends on a backend's position in the input: permutations come
//! from the key and ties between equal virtual times are broken by key, then
//! id. Two edge nodes with the same backend set build the same table, and
//! removing a backend leaves the relative order of everyone else's turns
//! unchanged, which is what keeps disruption minimal.

use failover_common::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Data-plane backend id written into the table.
    pub id: u32,
    /// Relative share of slots; 0 keeps the backend out of the table.
    pub weight: u32,
    /// Stable key hash (see [`key_hash`]); alone decides the permutation.
    pub key: u64,
}

impl From<(u32, u32, u64)> for Member {
    fn from((id, weight, key): (u32, u32, u64)) -> Self {
        Self { id, weight, key }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "Maglev ring size {0} is not prime (every backend's permutation must cover the ring; try 65537)"
    )]
    NotPrime(u64),
    #[error("backend id {0:#x} is reserved: it marks an empty slot (NO_BACKEND)")]
    ReservedId(u32),
}

/// Stable 64-bit hash of a backend name: FNV-1a, then a 64-bit finaliser for
/// avalanche. It must never change between releases: every node of a fleet
/// derives the same permutations from it.
#[must_use]
pub fn key_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// splitmix64's finaliser.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Trial division: ring sizes are at most a few hundred thousand.
#[must_use]
pub fn is_prime(m: u64) -> bool {
    if m < 2 {
        return false;
    }
    if m.is_multiple_of(2) {
        return m == 2;
    }
    let mut d = 3;
    while d * d <= m {
        if m.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds a table of `m` slots (prime). All slots are `NO_BACKEND` when no
/// member has a positive weight.
pub fn build(members: &[Member], m: u32) -> Result<Vec<u32>, MaglevError> {
    // Validate before allocating 256 KiB.
    if !is_prime(u64::from(m)) {
        return Err(MaglevError::NotPrime(u64::from(m)));
    }
    let mut table = vec![NO_BACKEND; m as usize];
    fill(members, &mut table)?;
    Ok(table)
}

/// Like [`build`], into a caller's buffer (its length is the ring size), so
/// a rebuild can reuse memory.
pub fn fill(members: &[Member], table: &mut [u32]) -> Result<(), MaglevError> {
    let m = table.len() as u64;
    if !is_prime(m) || m > u64::from(u32::MAX) {
        return Err(MaglevError::NotPrime(m));
    }
    if let Some(b) = members.iter().find(|b| b.id == NO_BACKEND) {
        return Err(MaglevError::ReservedId(b.id));
    }
    table.fill(NO_BACKEND);
    place(members, table, table.len().isqrt() / 2);
    Ok(())
}

/// The claiming loop. `tail` is the number of free slots below which a
/// turn stops walking the permutation and instead solves for the first
/// free slot along it: the walk's expected cost per slot is `m / free`,
/// which makes the last few hundred slots most of the work. Both ways give
/// the same table.
fn place(members: &[Member], table: &mut [u32], tail: usize) {
    let m = table.len();
    let mut walkers: Vec<Walker> = members
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| {
            // Two independent hashes of the key: where the walk starts and
            // its stride. A stride in 1..m with m prime visits every slot.
            let offset = (mix64(b.key ^ 0x6a09_e667_f3bc_c908) % m as u64) as usize;
            let skip = (mix64(b.key ^ 0xbb67_ae85_84ca_a73b) % (m as u64 - 1).max(1) + 1) as usize;
            Walker {
                member: *b,
                step: (1u128 << 56) / u128::from(b.weight),
                offset,
                skip,
                pos: offset,
            }
        })
        .collect();
    if walkers.is_empty() {
        return;
    }
    // Rank by key, then id: the tie-break between equal due times, and
    // the reason the input order never matters.
    walkers.sort_unstable_by_key(|w| (w.member.key, w.member.id, w.member.weight));
    let mut turns = Turns::new(&walkers);

    // Occupancy as a bitset: 8 KiB for 65537 slots stays in L1, the table
    // itself (256 KiB) does not.
    let mut taken = vec![0u64; m.div_ceil(64)];
    let is_taken = |taken: &[u64], s: usize| (taken[s >> 6] >> (s & 63)) & 1 != 0;
    let mut filled = 0;
    while filled < m && m - filled > tail {
        let rank = turns.next();
        let w = &mut walkers[rank];
        // Terminates: a slot is free, and the walk covers all of them.
        let mut pos = w.pos;
        while is_taken(&taken, pos) {
            pos += w.skip;
            if pos >= m {
                pos -= m;
            }
        }
        w.pos = pos;
        table[pos] = w.member.id;
        taken[pos >> 6] |= 1 << (pos & 63);
        filled += 1;
        turns.advance(rank);
    }
    if filled == m {
        return;
    }

    // Tail: slot s sits at index (s - offset) * skip^-1 (mod m) of a
    // walker's permutation. A walker never passes a free slot, so the free
    // slot with the smallest index is exactly where its walk would stop.
    let mut free: Vec<usize> = (0..m).filter(|&s| !is_taken(&taken, s)).collect();
    let modulus = Modulus::new(m as u64);
    let mut inverse: Vec<Option<u64>> = vec![None; walkers.len()];
    while !free.is_empty() {
        let rank = turns.next();
        let w = &walkers[rank];
        // Fermat: m is prime and 0 < skip < m.
        let inv = *inverse[rank].get_or_insert_with(|| modulus.pow(w.skip as u64, m as u64 - 2));
        let (at, _) = free
            .iter()
            .enumerate()
            .map(|(at, &s)| {
                let mut d = s + m - w.offset;
                if d >= m {
                    d -= m;
                }
                (at, modulus.reduce(d as u64 * inv))
            })
            .min_by_key(|&(_, index)| index)
            .expect("free is not empty");
        table[free.swap_remove(at)] = w.member.id;
        turns.advance(rank);
    }
}

/// Whose turn is next, in virtual-time order.
///
/// Walkers with the same weight share a step, start in phase and so always
/// tie: they form a group that takes turns round-robin in rank order. The
/// groups (usually a handful: one per tier and health level) sit in a tree
/// of minima. A group's key is one integer: the due time of its next turn
/// (fixed point, 2^56 per unit) above the rank of the walker whose turn it
/// is (low 32 bits), so keys are unique and equal times go to the lower
/// rank. Time stays below (m + 1) * 2^56 < 2^89: no overflow. Moving a key
/// re-derives only its path to the root, carrying the minimum in a
/// register: no data-dependent branch, unlike a binary heap's sift.
struct Turns {
    /// `tree[1]` is the root; leaves start at `leaves`; padding is MAX.
    tree: Vec<u128>,
    leaves: usize,
    groups: Vec<Group>,
    /// Walker ranks ordered by group, then rank.
    order: Vec<u32>,
    /// Group of each rank.
    group_of: Vec<u32>,
}

struct Group {
    step: u128,
    /// Due time of the group's current round.
    time: u128,
    /// `order[start..end]` are the members; `order[next]` is due.
    start: usize,
    end: usize,
    next: usize,
}

impl Turns {
    const RANK_MASK: u128 = (1 << 32) - 1;

    fn new(walkers: &[Walker]) -> Self {
        // Ranks fit 32 bits: a slice of 16-byte members is shorter.
        let mut order: Vec<u32> = (0..walkers.len() as u32).collect();
        order.sort_unstable_by_key(|&r| (walkers[r as usize].step, r));
        let mut groups: Vec<Group> = Vec::new();
        let mut group_of = vec![0u32; walkers.len()];
        for (at, &r) in order.iter().enumerate() {
            let step = walkers[r as usize].step;
            if groups.last().is_none_or(|g| g.step != step) {
                groups.push(Group {
                    step,
                    time: step,
                    start: at,
                    end: at,
                    next: at,
                });
            }
            let g = groups.len() - 1;
            groups[g].end = at + 1;
            group_of[r as usize] = g as u32;
        }
        let leaves = groups.len().next_power_of_two();
        let mut turns = Self {
            tree: vec![u128::MAX; 2 * leaves],
            leaves,
            groups,
            order,
            group_of,
        };
        for g in 0..turns.groups.len() {
            turns.tree[leaves + g] = turns.key(g);
        }
        for node in (1..leaves).rev() {
            turns.tree[node] = turns.tree[2 * node].min(turns.tree[2 * node + 1]);
        }
        turns
    }

    fn key(&self, g: usize) -> u128 {
        let group = &self.groups[g];
        (group.time << 32) | u128::from(self.order[group.next])
    }

    /// Rank of the walker whose turn is due first.
    fn next(&self) -> usize {
        // With one group, the leaf is the root.
        (self.tree[1] & Self::RANK_MASK) as usize
    }

    /// `rank` took its turn: its group moves on to the next member, or to
    /// the next round.
    fn advance(&mut self, rank: usize) {
        let g = self.group_of[rank] as usize;
        let group = &mut self.groups[g];
        group.next += 1;
        if group.next == group.end {
            group.next = group.start;
            group.time += group.step;
        }
        let mut node = self.leaves + g;
        let mut min = self.key(g);
        self.tree[node] = min;
        while node > 1 {
            min = min.min(self.tree[node ^ 1]);
            node >>= 1;
            self.tree[node] = min;
        }
    }
}

/// Division-free `x mod m` (Barrett): the tail evaluates it for every free
/// slot on every turn, and a hardware divide per slot would dominate it.
struct Modulus {
    m: u64,
    /// floor((2^64 - 1) / m).
    magic: u64,
}

impl Modulus {
    fn new(m: u64) -> Self {
        Self {
            m,
            magic: u64::MAX / m,
        }
    }

    fn reduce(&self, x: u64) -> u64 {
        // The quotient estimate is low by at most one, so one correction.
        let q = ((u128::from(x) * u128::from(self.magic)) >> 64) as u64;
        let r = x - q * self.m;
        if r >= self.m { r - self.m } else { r }
    }

    /// `base^exp mod m`; m < 2^32, so products fit 64 bits.
    fn pow(&self, mut base: u64, mut exp: u64) -> u64 {
        let mut acc = self.reduce(1);
        base = self.reduce(base);
        while exp > 0 {
            if exp & 1 == 1 {
                acc = self.reduce(acc * base);
            }
            base = self.reduce(base * base);
            exp >>= 1;
        }
        acc
    }
}

/// A backend's position in its own permutation.
struct Walker {
    member: Member,
    /// Virtual time between two turns: 2^56 / weight.
    step: u128,
    offset: usize,
    pos: usize,
    skip: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65_537;

    fn members(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: i,
                weight: weight(i),
                key: key_hash(&format!("backend-{i}")),
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &id in table {
            c[id as usize] += 1;
        }
        c
    }

    /// Slots that changed owner although their old owner is still present.
    fn moved_among_survivors(before: &[u32], after: &[u32], removed: u32) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| **b != removed && b != a)
            .count()
    }

    #[test]
    fn every_slot_is_filled_with_a_member() {
        for (n, m) in [(1, 7), (3, 7), (20, 7), (100, M), (5, 251)] {
            let ms = members(n, |_| 1);
            let t = build(&ms, m).unwrap();
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|&id| id < n), "n={n} m={m}");
        }
    }

    #[test]
    fn more_backends_than_slots_gives_each_at_most_one() {
        let t = build(&members(20, |_| 1), 7).unwrap();
        let c = counts(&t, 20);
        assert!(c.iter().all(|&x| x <= 1));
        assert_eq!(c.iter().sum::<usize>(), 7);
    }

    #[test]
    fn empty_or_all_zero_weights_give_an_empty_ring() {
        assert!(build(&[], 251).unwrap().iter().all(|&x| x == NO_BACKEND));
        let zero = members(5, |_| 0);
        assert!(build(&zero, 251).unwrap().iter().all(|&x| x == NO_BACKEND));
    }

    #[test]
    fn zero_weight_member_gets_no_slot() {
        let ms = members(4, |i| u32::from(i != 2));
        let t = build(&ms, 251).unwrap();
        assert!(!t.contains(&2));
        assert!(t.iter().all(|&x| x != NO_BACKEND));
    }

    #[test]
    fn shares_follow_weights() {
        let cases: &[&[u32]] = &[
            &[1, 1, 1, 1],
            &[1, 2, 3, 4],
            &[100, 1],
            &[1_000_000, 333_333, 1],
            &[u32::MAX, u32::MAX / 3, 7],
        ];
        for weights in cases {
            let ms = members(weights.len() as u32, |i| weights[i as usize]);
            let t = build(&ms, M).unwrap();
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            for (i, c) in counts(&t, weights.len()).into_iter().enumerate() {
                let want = f64::from(M) * f64::from(weights[i]) / total;
                // Turn order is exact, so only rounding separates the two.
                assert!(
                    (c as f64 - want).abs() <= 2.0,
                    "weights {weights:?}: backend {i} has {c} slots, want {want:.1}"
                );
            }
        }
    }

    #[test]
    fn many_weighted_backends_share_within_a_percent() {
        let ms = members(100, |i| 1 + i % 7);
        let t = build(&ms, M).unwrap();
        let total: u32 = ms.iter().map(|b| b.weight).sum();
        for (i, c) in counts(&t, 100).into_iter().enumerate() {
            let want = f64::from(M) * f64::from(ms[i].weight) / f64::from(total);
            assert!((c as f64 - want).abs() / want < 0.01, "{i}: {c} vs {want}");
        }
    }

    #[test]
    fn deterministic_and_independent_of_order() {
        let ms = members(100, |i| 1 + i % 5);
        let t = build(&ms, M).unwrap();
        assert_eq!(t, build(&ms, M).unwrap());
        let mut rev = ms.clone();
        rev.reverse();
        assert_eq!(t, build(&rev, M).unwrap());
        let mut rot = ms.clone();
        rot.rotate_left(37);
        assert_eq!(t, build(&rot, M).unwrap());
        // Equal keys (a hash collision) still resolve by id, not position.
        let twins = [(1, 1, 42).into(), (2, 1, 42).into()];
        let swapped = [twins[1], twins[0]];
        assert_eq!(build(&twins, 251).unwrap(), build(&swapped, 251).unwrap());
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        for (n, weight) in [(100, 1), (100, 0), (10, 0)] {
            // weight 0 here means "varied weights".
            let ms = members(n, |i| if weight == 1 { 1 } else { 1 + i % 4 });
            let before = build(&ms, M).unwrap();
            let mut worst = 0.0f64;
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<Member> = ms.iter().copied().filter(|b| b.id != removed).collect();
                let after = build(&rest, M).unwrap();
                assert!(!after.contains(&removed));
                let survivors = before.iter().filter(|&&b| b != removed).count();
                let moved = moved_among_survivors(&before, &after, removed);
                worst = worst.max(moved as f64 / survivors as f64);
            }
            assert!(
                worst < 0.01,
                "n={n}: {:.3}% of survivors' slots moved",
                worst * 100.0
            );
        }
    }

    #[test]
    fn adding_a_backend_takes_mostly_its_own_share() {
        let ms = members(50, |_| 1);
        let before = build(&ms[..49], M).unwrap();
        let after = build(&ms, M).unwrap();
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let taken = after.iter().filter(|&&a| a == 49).count();
        assert!(
            changed - taken < (M as usize) / 100,
            "changed {changed}, new owns {taken}"
        );
    }

    #[test]
    fn tail_shortcut_matches_plain_walking() {
        for (n, m) in [(100, M), (7, 251), (3, 7), (30, 13)] {
            let ms = members(n, |i| 1 + i % 3);
            let mut walked = vec![NO_BACKEND; m as usize];
            place(&ms, &mut walked, 0);
            // A full-table tail is quadratic: only for the small rings.
            let all = if m < 1000 { m as usize } else { 1024 };
            for tail in [1, 16, (m as usize).isqrt(), all] {
                let mut solved = vec![NO_BACKEND; m as usize];
                place(&ms, &mut solved, tail);
                assert_eq!(walked, solved, "n={n} m={m} tail={tail}");
            }
        }
    }

    #[test]
    fn key_hash_is_stable() {
        // Pinned: changing the hash reshuffles every fleet's rings.
        assert_eq!(key_hash(""), mix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(key_hash("eu-a1"), key_hash("eu-a1"));
        assert_ne!(key_hash("eu-a1"), key_hash("eu-a2"));
    }

    #[test]
    fn rejects_non_prime_sizes_and_reserved_ids() {
        for m in [0, 1, 4, 65_536, 65_535] {
            assert_eq!(build(&[], m), Err(MaglevError::NotPrime(u64::from(m))));
        }
        assert!(build(&[], 2).is_ok());
        let bad = [Member {
            id: NO_BACKEND,
            weight: 1,
            key: 1,
        }];
        assert_eq!(build(&bad, 7), Err(MaglevError::ReservedId(NO_BACKEND)));
        let mut buf = [0u32; 10];
        assert_eq!(fill(&[], &mut buf), Err(MaglevError::NotPrime(10)));
    }

    #[test]
    fn barrett_reduction_matches_remainder() {
        for m in [2u64, 3, 7, 251, 65_537, 4_294_967_291] {
            let md = Modulus::new(m);
            let probes = [
                0,
                1,
                m - 1,
                m,
                m + 1,
                2 * m - 1,
                (m - 1) * (m - 1),
                u64::MAX / 3,
            ];
            for x in probes
                .into_iter()
                .chain((0..1000).map(|i| mix64(i) % (m * m)))
            {
                assert_eq!(md.reduce(x), x % m, "{x} mod {m}");
            }
            assert_eq!(md.pow(m - 1, m - 1), 1, "Fermat for {m}");
        }
    }

    #[test]
    fn is_prime_matches_known_values() {
        let primes: Vec<u64> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            primes,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59
            ]
        );
        assert!(is_prime(65_537) && is_prime(251) && !is_prime(65_539 * 3));
    }
}
