//! TCP rules of the data plane, pure so the host tests them: which flag
//! sets are valid, which segments may create state, and which SYNs count
//! as passive-health evidence.
//!
//! Passive health ejects a backend whose SYNs go unanswered or refused. A
//! client shapes every byte of a SYN, so only a SYN that any live backend
//! is obliged to answer counts (docs/datapath.md, "What a client can
//! send"): a bare SYN (ECN's ECE and CWR allowed), no data, a valid
//! checksum, and only the options every stack answers without condition.
//! A Linux backend silently drops a SYN with a wrong checksum, SYN+FIN,
//! SYN+RST, or an MD5 or TCP-AO option it has no key for, and answers an
//! MPTCP join for an unknown token with an RST.

use crate::{ACKED_BACKEND, ACKED_BOTH, ACKED_CLIENT, FIN_BACKEND, FIN_CLIENT, checksum};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// Longest TCP header (data offset 15).
pub const MAX_HEADER: usize = 60;
/// Shortest TCP header (data offset 5).
pub const MIN_HEADER: usize = 20;

/// False for flag sets no connection carries: SYN with FIN or RST, and a
/// segment with none of SYN, ACK and RST (every segment after the first
/// SYN carries an ACK, RFC 9293 3.10.7). Such a segment is dropped.
#[inline(always)]
#[must_use]
pub const fn flags_valid(flags: u8) -> bool {
    if flags & SYN != 0 && flags & (FIN | RST) != 0 {
        return false;
    }
    flags & (SYN | ACK | RST) != 0
}

/// A bare SYN: the client opens a connection.
#[inline(always)]
#[must_use]
pub const fn opening(flags: u8) -> bool {
    flags & (SYN | ACK | FIN | RST) == SYN
}

/// Whether a segment with no flow may create one: a bare SYN opens it, and
/// a segment with ACK but neither SYN nor RST picks up a flow whose state
/// was lost (an agent restart with new maps, an evicted entry). An RST or
/// a SYN-ACK never creates state.
#[inline(always)]
#[must_use]
pub const fn may_create(flags: u8) -> bool {
    opening(flags) || flags & (SYN | ACK | RST) == ACK
}

/// What a forwarded SYN is worth to passive health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynWorth {
    /// Any live backend answers it: it counts.
    Evidence,
    /// Forwarded, but a live backend may leave it unanswered or refuse it
    /// (data, PSH/URG, options beyond the vanilla set): it does not count.
    Ignored,
    /// The checksum is wrong: the backend drops it, and so does the edge.
    BadChecksum,
}

/// Judges a bare SYN without data. `header` holds the TCP header's first
/// `hlen` bytes (`MIN_HEADER..=MAX_HEADER`, the whole segment); `src_be`
/// and `dst_be` are the IPv4 addresses as they sit in the packet.
#[inline(always)]
#[must_use]
pub fn judge_syn(addr_sum: u32, header: &[u8; MAX_HEADER], hlen: usize) -> SynWorth {
    if !(MIN_HEADER..=MAX_HEADER).contains(&hlen) {
        return SynWorth::BadChecksum;
    }
    if !checksum_ok(addr_sum, header, hlen) {
        return SynWorth::BadChecksum;
    }
    if header[13] & !(ECE | CWR) != SYN || !vanilla_options(header, hlen) {
        return SynWorth::Ignored;
    }
    SynWorth::Evidence
}

/// The segment's checksum over the pseudo-header, whose addresses sum to
/// `addr_sum` (`Addr::sum` of source and destination; the IPv4 and IPv6
/// pseudo-headers differ only in them for a segment this short): words
/// read in native order, as the one's-complement sum does not depend on it.
#[inline(always)]
fn checksum_ok(addr_sum: u32, header: &[u8; MAX_HEADER], hlen: usize) -> bool {
    let mut sum = addr_sum;
    sum += u32::from(u16::from_ne_bytes([0, 6]));
    sum += u32::from(u16::from_ne_bytes((hlen as u16).to_be_bytes()));
    let mut i = 0;
    while i + 1 < hlen && i + 1 < MAX_HEADER {
        sum += u32::from(u16::from_ne_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    checksum::fold(sum) == 0xffff
}

/// True when every option is one every stack answers a SYN with: EOL, NOP,
/// MSS (4 bytes), window scale (3), SACK permitted (2), timestamps (10).
#[inline(always)]
/// Where a SYN's MSS option value sits among the first 8 bytes of its
/// options, and the value
/// options (`opts`, of which the header holds `avail`): first, or after up
/// to three NOPs, where every TCP stack we know puts it. The clamp looks
/// only there: a fixed window costs the verifier no options walk, and a
/// client that hides its MSS further in only risks its own connection. A
/// SYN without one lets the peer send 536-byte segments (RFC 9293 3.7.1),
/// below any path MTU the clamp allows.
/// The window is one big-endian integer (`opts` bytes 0..8, zero past
/// `avail`): the XDP program then keeps it in a register, and never
/// indexes a stack array by a variable, which compiles to pointer
/// arithmetic the verifier refuses.
#[must_use]
pub const fn early_mss(x: u64, avail: usize) -> Option<(usize, u16)> {
    let mut j = 0;
    while j < 3 && j < avail && byte(x, j) == 1 {
        j += 1;
    }
    if j + 4 <= avail && byte(x, j) == 2 && byte(x, j + 1) == 4 {
        Some((j + 2, (byte(x, j + 2) as u16) << 8 | byte(x, j + 3) as u16))
    } else {
        None
    }
}

const fn byte(x: u64, i: usize) -> u8 {
    (x >> (56 - 8 * i)) as u8
}

fn vanilla_options(header: &[u8; MAX_HEADER], hlen: usize) -> bool {
    let mut i = MIN_HEADER;
    while i < hlen && i < MAX_HEADER {
        let kind = header[i];
        if kind == 0 {
            // End of options: the rest is padding.
            return true;
        }
        if kind == 1 {
            i += 1;
            continue;
        }
        if i + 1 >= hlen || i + 1 >= MAX_HEADER {
            return false;
        }
        let want = match kind {
            2 => 4,
            3 => 3,
            4 => 2,
            8 => 10,
            _ => return false,
        };
        if header[i + 1] as usize != want || i + want > hlen {
            return false;
        }
        i += want;
    }
    true
}

/// The numbers of a TCP segment the closing rule reads.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Data length.
    pub payload: u16,
}

/// What a TCP segment does to its flow's NAT entries, in either direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// Nothing: the flow goes on.
    Keep,
    /// Note `bits` (`FIN_*`, `ACKED_*`) on both entries; `fin_ack`: the
    /// segment is a FIN, which the other side ACKs with this number (kept
    /// in the entry the other side's segments read).
    Note { bits: u8, fin_ack: Option<u32> },
    /// An RST, or the segment that ACKs the second FIN: free both.
    Free,
}

/// Which side sent the segment: its `FIN_*` bit, and the other side's
/// `FIN_*` and `ACKED_*` bits.
#[derive(Clone, Copy, Debug)]
pub struct Side {
    pub fin: u8,
    pub peer_fin: u8,
    pub peer_acked: u8,
}

/// The closing rule, for both directions. `fins`: the entry's bits so far;
/// `peer_fin_ack`: the number that ACKs the other side's FIN, once it sent
/// one. Sequence numbers, not just flags, decide what a FIN's ACK is: when
/// both sides close at once each ACKs the other's FIN, and an ACK of data
/// sent before a FIN is not its ACK.
#[inline(always)]
#[must_use]
pub fn closing(seg: &Segment, fins: u8, peer_fin_ack: u32, side: Side) -> Closing {
    if seg.flags & RST != 0 {
        return Closing::Free;
    }
    if seg.flags & FIN == 0 && fins == 0 {
        return Closing::Keep;
    }
    let mut bits = 0;
    let mut fin_ack = None;
    if seg.flags & FIN != 0 {
        bits |= side.fin;
        // The FIN takes the sequence number after the segment's data.
        fin_ack = Some(seg.seq.wrapping_add(seg.payload as u32).wrapping_add(1));
    }
    if seg.flags & ACK != 0
        && fins & side.peer_fin != 0
        && seg.ack.wrapping_sub(peer_fin_ack) as i32 >= 0
    {
        bits |= side.peer_acked;
    }
    if (fins | bits) & ACKED_BOTH == ACKED_BOTH {
        Closing::Free
    } else if bits & !fins != 0 || fin_ack.is_some() {
        Closing::Note { bits, fin_ack }
    } else {
        Closing::Keep
    }
}

/// Carries out a `Closing::Note` on the entry at hand (`fins`) and, when it
/// is found, on the other side's entry (its bits and its `fin_ack`: the
/// other side ACKs this FIN, and its segments read that entry). Both
/// entries end with the same bits, so either side's last ACK frees them.
#[inline(always)]
pub fn note(fins: &mut u8, other: Option<(&mut u8, &mut u32)>, bits: u8, fin_ack: Option<u32>) {
    *fins |= bits;
    if let Some((other_fins, other_fin_ack)) = other {
        *other_fins |= bits;
        if let Some(n) = fin_ack {
            *other_fin_ack = n;
        }
        *fins |= *other_fins;
    }
}

pub const CLIENT: Side = Side {
    fin: FIN_CLIENT,
    peer_fin: FIN_BACKEND,
    peer_acked: ACKED_BACKEND,
};
pub const BACKEND: Side = Side {
    fin: FIN_BACKEND,
    peer_fin: FIN_CLIENT,
    peer_acked: ACKED_CLIENT,
};

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::Addr;

    const SRC: [u8; 4] = [192, 0, 2, 100];
    const DST: [u8; 4] = [203, 0, 113, 10];

    /// A SYN header with `opts` (padded to a word) and a correct checksum.
    fn syn(flags: u8, opts: &[u8]) -> ([u8; MAX_HEADER], usize) {
        let mut h = Vec::from([0u8; 20]);
        h[0..2].copy_from_slice(&51_000u16.to_be_bytes());
        h[2..4].copy_from_slice(&80u16.to_be_bytes());
        h[4..8].copy_from_slice(&1000u32.to_be_bytes());
        h.extend_from_slice(opts);
        while h.len() % 4 != 0 {
            h.push(0);
        }
        h[12] = ((h.len() / 4) as u8) << 4;
        h[13] = flags;
        h[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        let c = checksum::ipv4_l4(SRC, DST, 6, &h);
        h[16..18].copy_from_slice(&c.to_be_bytes());
        let mut out = [0u8; MAX_HEADER];
        out[..h.len()].copy_from_slice(&h);
        (out, h.len())
    }

    fn judge(h: &([u8; MAX_HEADER], usize)) -> SynWorth {
        judge_syn(
            u32::from_ne_bytes(SRC).sum() + u32::from_ne_bytes(DST).sum(),
            &h.0,
            h.1,
        )
    }

    /// Linux's own SYN: MSS, SACK permitted, timestamps, NOP, window scale.
    const LINUX_OPTS: [u8; 20] = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];

    #[test]
    fn flag_sets() {
        assert!(flags_valid(SYN));
        assert!(flags_valid(SYN | ECE | CWR));
        assert!(flags_valid(SYN | ACK));
        assert!(flags_valid(ACK | FIN | PSH));
        assert!(flags_valid(RST));
        assert!(flags_valid(RST | ACK));
        for bad in [
            SYN | FIN,
            SYN | RST,
            SYN | FIN | RST | ACK,
            0,
            FIN,
            FIN | PSH | URG,
            PSH,
        ] {
            assert!(!flags_valid(bad), "{bad:#x}");
        }
        assert!(opening(SYN) && opening(SYN | ECE | CWR) && opening(SYN | PSH));
        assert!(!opening(SYN | ACK));
        assert!(may_create(SYN) && may_create(ACK) && may_create(ACK | FIN | PSH));
        for no in [RST, RST | ACK, SYN | ACK] {
            assert!(!may_create(no), "{no:#x}");
        }
    }

    #[test]
    fn vanilla_syns_count() {
        assert_eq!(judge(&syn(SYN, &[])), SynWorth::Evidence);
        assert_eq!(judge(&syn(SYN, &LINUX_OPTS)), SynWorth::Evidence);
        assert_eq!(
            judge(&syn(SYN | ECE | CWR, &LINUX_OPTS)),
            SynWorth::Evidence
        );
        // NOP padding and an early end of options.
        assert_eq!(
            judge(&syn(SYN, &[1, 1, 2, 4, 5, 0xb4, 0])),
            SynWorth::Evidence
        );
    }

    #[test]
    fn a_wrong_checksum_is_caught_anywhere_in_the_header() {
        let good = syn(SYN, &LINUX_OPTS);
        for byte in 0..good.1 {
            let mut bad = good;
            bad.0[byte] ^= 0x01;
            // Flipping a flag bit may also make it a non-SYN; the checksum
            // is judged first.
            assert_eq!(judge(&bad), SynWorth::BadChecksum, "byte {byte}");
        }
        assert_eq!(judge(&(good.0, 19)), SynWorth::BadChecksum);
        assert_eq!(judge(&(good.0, 61)), SynWorth::BadChecksum);
    }

    #[test]
    fn syns_a_backend_may_ignore_do_not_count() {
        for flags in [SYN | PSH, SYN | URG] {
            assert_eq!(judge(&syn(flags, &[])), SynWorth::Ignored, "{flags:#x}");
        }
        let md5 = {
            let mut o = Vec::from([19u8, 18]);
            o.extend_from_slice(&[0xaa; 16]);
            o
        };
        let cases: [&[u8]; 7] = [
            &md5,                                       // TCP MD5 signature
            &[29, 4, 1, 1],                             // TCP-AO
            &[30, 12, 0x10, 0, 0, 0, 0, 1, 0, 0, 0, 2], // MPTCP join
            &[2, 5, 5, 0xb4, 0],                        // MSS of the wrong length
            &[1, 1, 1, 1, 1, 1, 8, 10, 0, 0, 0, 1],     // timestamps cut by the header's end
            &[2, 4, 5, 0xb4, 4],                        // SACK permitted without its length
            &[1, 1, 1, 2],                              // MSS without a length byte
        ];
        for opts in cases {
            assert_eq!(judge(&syn(SYN, opts)), SynWorth::Ignored, "{opts:?}");
        }
    }

    #[test]
    fn the_mss_is_found_first_or_behind_nops() {
        let w = |o: &[u8]| {
            let mut a = [0u8; 8];
            a[..o.len()].copy_from_slice(o);
            u64::from_be_bytes(a)
        };
        assert_eq!(
            early_mss(w(&[2, 4, 5, 0xb4, 4, 2, 8, 10]), 8),
            Some((2, 1460))
        );
        assert_eq!(early_mss(w(&[2, 4, 5, 0xb4]), 4), Some((2, 1460)));
        assert_eq!(
            early_mss(w(&[1, 2, 4, 5, 0x78, 1, 1, 1]), 8),
            Some((3, 1400))
        );
        assert_eq!(
            early_mss(w(&[1, 1, 1, 2, 4, 0x23, 0x28, 0]), 8),
            Some((5, 9000))
        );
    }

    #[test]
    fn no_mss_outside_the_window_or_cut_short() {
        let w = |o: &[u8]| {
            let mut a = [0u8; 8];
            a[..o.len()].copy_from_slice(o);
            u64::from_be_bytes(a)
        };
        let cases: &[(&[u8], usize)] = &[
            (&[], 0),
            (&[1, 1, 1, 1, 2, 4, 5, 0xb4], 8),
            (&[4, 2, 2, 4, 5, 0xb4, 0, 0], 8),
            (&[2, 3, 5, 0xb4], 4),
            (&[2, 4, 5, 0xb4], 3),
            (&[1, 2, 4, 5, 0xb4], 4),
            (&[0, 2, 4, 5, 0xb4], 8),
        ];
        for (opts, avail) in cases {
            assert_eq!(early_mss(w(opts), *avail), None, "{opts:?} {avail}");
        }
    }

    fn seg(flags: u8, seq: u32, ack: u32, payload: u16) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            payload,
        }
    }

    /// Runs segments `(from_client, segment)` through the rule on a
    /// pair of entries, as the program does, and says when they are freed.
    fn close(steps: &[(bool, Segment)]) -> Option<usize> {
        let (mut flow, mut rev) = ((0u8, 0u32), (0u8, 0u32));
        for (i, (from_client, s)) in steps.iter().enumerate() {
            let (side, mine, other) = if *from_client {
                (CLIENT, &mut flow, &mut rev)
            } else {
                (BACKEND, &mut rev, &mut flow)
            };
            match closing(s, mine.0, mine.1, side) {
                Closing::Free => return Some(i),
                Closing::Note { bits, fin_ack } => note(
                    &mut mine.0,
                    Some((&mut other.0, &mut other.1)),
                    bits,
                    fin_ack,
                ),
                Closing::Keep => {}
            }
        }
        None
    }

    #[test]
    fn a_normal_close_frees_on_the_last_ack() {
        // Client FIN (seq 100), backend ACKs it and sends its own FIN (seq
        // 500), client ACKs that.
        let steps = [
            (true, seg(FIN | ACK, 100, 400, 0)),
            (false, seg(ACK, 400, 101, 0)),
            (false, seg(FIN | ACK, 500, 101, 0)),
            (true, seg(ACK, 101, 501, 0)),
        ];
        assert_eq!(close(&steps), Some(3));
    }

    #[test]
    fn simultaneous_close_frees_when_both_fins_are_acked() {
        let steps = [
            (true, seg(FIN | ACK, 100, 400, 0)),
            (false, seg(FIN | ACK, 400, 100, 0)),
            (true, seg(ACK, 101, 401, 0)),
            (false, seg(ACK, 401, 101, 0)),
        ];
        assert_eq!(close(&steps), Some(3));
    }

    #[test]
    fn an_ack_of_data_before_the_fin_is_not_its_ack() {
        // The client's FIN comes after 10 bytes of data: an ACK of 110
        // covers the data, not the FIN (which needs 111).
        let steps = [
            (true, seg(FIN | ACK, 100, 400, 10)),
            (false, seg(ACK, 400, 110, 0)),
            (false, seg(FIN | ACK, 400, 110, 0)),
            (true, seg(ACK, 111, 401, 0)),
        ];
        assert_eq!(close(&steps), None, "the backend never ACKed the FIN");
        let mut done = steps.to_vec();
        done.push((false, seg(ACK, 401, 111, 0)));
        assert_eq!(close(&done), Some(4));
    }

    #[test]
    fn an_rst_frees_at_once_and_plain_data_keeps() {
        assert_eq!(closing(&seg(RST, 1, 0, 0), 0, 0, CLIENT), Closing::Free);
        assert_eq!(
            closing(&seg(RST | ACK, 1, 2, 0), FIN_CLIENT, 0, BACKEND),
            Closing::Free
        );
        assert_eq!(closing(&seg(ACK, 1, 2, 100), 0, 0, CLIENT), Closing::Keep);
        // A repeated FIN notes the same again, and nothing more.
        assert_eq!(
            closing(&seg(FIN | ACK, 100, 400, 0), FIN_CLIENT, 0, CLIENT),
            Closing::Note {
                bits: FIN_CLIENT,
                fin_ack: Some(101)
            }
        );
    }
}
