//! Per-CPU scratch space (`SCRATCH`) for the few values too large to sit
//! on the 512-byte stack beside what the paths that build them hold: a new
//! flow's `Reverse` entry (112 bytes for IPv6) and the FIB lookup's
//! parameters (64). Only paths that run once per flow or per next-hop
//! refresh use it; the per-packet fast paths never do. Each use has its
//! own slot, and a program runs to completion on its CPU, so no two users
//! share a slot at once.

use crate::maps::SCRATCH;

/// Words in a slot: room for the largest value kept here.
pub const WORDS: usize = 16;
pub const SLOTS: u32 = 2;
/// A new flow's `Reverse` entry, built here and inserted from here.
pub const REVERSE: u32 = 0;
/// `bpf_fib_lookup` parameters.
pub const FIB: u32 = 1;
/// Slot `slot` as a `T`, zeroed.
#[inline(always)]
pub fn take<T: Copy>(slot: u32) -> Option<&'static mut T> {
    const { assert!(core::mem::size_of::<T>() <= WORDS * 8) };
    const { assert!(core::mem::align_of::<T>() <= 8) };
    let p = SCRATCH.get_ptr_mut(slot)?;
    unsafe {
        *p = [0; WORDS];
        Some(&mut *p.cast::<T>())
    }
}
