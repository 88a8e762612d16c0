//! Three tiny XDP programs written as raw BPF instructions, and the two
//! bpf(2) commands the benchmarks need beyond aya: attaching through a
//! bpf_link held by a file descriptor, and BPF_PROG_TEST_RUN in live-frames
//! mode (the kernel really transmits what the program TXes).
//!
//! - [`generator`]: writes a fixed Ethernet/IPv4/UDP header into each
//!   frame with the UDP source port set to one of `flows` values
//!   (`base + prandom % flows`) and returns `XDP_TX`. Run in
//!   live-frames mode on a veth, every frame leaves that veth for real: an
//!   in-kernel traffic generator.
//! - [`drop`]: `XDP_DROP`, for the receiving end of a benchmark (the veth
//!   still counts every frame in its rx counters).
//! - [`pass`]: `XDP_PASS`, which gives a veth the NAPI context it needs to
//!   receive frames sent with XDP_TX or redirected.

use std::{
    ffi::c_void,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, bail};

use crate::xdp::{XDP_DROP, XDP_PASS, XDP_TX};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// One BPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes used below.
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const MOD32_K: u8 = 0x94;
const TO_BE: u8 = 0xdc;
const LDX_W: u8 = 0x61;
const STX_H: u8 = 0x6b;
const ST_W: u8 = 0x62;
const ST_H: u8 = 0x6a;
const JGT_X: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const GET_PRANDOM_U32: i32 = 7;
/// Offset of the UDP source port in an untagged IPv4 frame without options.
const SPORT_OFF: i16 = 14 + 20;

/// Length of the headers [`generator`] writes: Ethernet, IPv4 without
/// options, UDP.
pub const GEN_HEADER_LEN: usize = 14 + 20 + 8;

/// `XDP_TX` of `header` (Ethernet + IPv4 + UDP, written in full into every
/// frame) with the UDP source port set to `base + prandom % flows`.
///
/// The whole header is written on every run because live-frames mode
/// recycles its pages without restoring their contents: a frame that was
/// rewritten on its way (NAT, TTL) would otherwise come back rewritten.
/// The UDP checksum in `header` should be 0 (none), since the port changes.
pub fn generator(header: &[u8; GEN_HEADER_LEN], flows: u16, base: u16) -> Vec<Insn> {
    let mut p = vec![
        insn(MOV64_X, 6, 1, 0, 0),                     // r6 = ctx
        insn(CALL, 0, 0, 0, GET_PRANDOM_U32),          // r0 = prandom
        insn(MOV64_X, 7, 0, 0, 0),                     // r7 = r0
        insn(MOD32_K, 7, 0, 0, i32::from(flows)),      // r7 %= flows
        insn(ADD64_K, 7, 0, 0, i32::from(base)),       // r7 += base
        insn(TO_BE, 7, 0, 0, 16),                      // r7 = htons(r7)
        insn(LDX_W, 2, 6, 0, 0),                       // r2 = ctx->data
        insn(LDX_W, 3, 6, 4, 0),                       // r3 = ctx->data_end
        insn(MOV64_X, 4, 2, 0, 0),                     // r4 = r2
        insn(ADD64_K, 4, 0, 0, GEN_HEADER_LEN as i32), // r4 += header length
    ];
    let jump_at = p.len();
    p.push(insn(JGT_X, 4, 3, 0, 0)); // if r4 > r3 goto drop (offset below)
    for (i, w) in header[..40].chunks_exact(4).enumerate() {
        let imm = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        p.push(insn(ST_W, 2, 0, (i * 4) as i16, imm));
    }
    let tail = i32::from(u16::from_le_bytes([header[40], header[41]]));
    p.push(insn(ST_H, 2, 0, 40, tail));
    p.push(insn(STX_H, 2, 7, SPORT_OFF, 0)); // *(u16 *)(r2 + 34) = r7
    p.push(insn(MOV64_K, 0, 0, 0, XDP_TX as i32)); // r0 = XDP_TX
    p.push(insn(EXIT, 0, 0, 0, 0));
    p[jump_at].off = (p.len() - jump_at - 1) as i16;
    p.push(insn(MOV64_K, 0, 0, 0, XDP_DROP as i32)); // drop
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// `XDP_DROP`.
pub fn drop() -> Vec<Insn> {
    vec![
        insn(MOV64_K, 0, 0, 0, XDP_DROP as i32),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `XDP_PASS`.
pub fn pass() -> Vec<Insn> {
    vec![
        insn(MOV64_K, 0, 0, 0, XDP_PASS as i32),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is a live, fully initialised repr(C) bpf_attr prefix
    // of the given size; the kernel zero-extends it.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut c_void,
            std::mem::size_of::<T>() as u32,
        )
    }
}

#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// A loaded program; unloaded when the last fd (this, or a link) closes.
pub struct Prog {
    fd: OwnedFd,
}

/// An XDP attachment; detached on drop.
pub struct Link {
    _fd: OwnedFd,
}

impl Prog {
    pub fn load_xdp(name: &str, insns: &[Insn]) -> Result<Self> {
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = LoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        for (d, s) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "load {name}: {err}: {}",
                String::from_utf8_lossy(&log[..end])
            );
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Attaches in driver mode to `ifindex` in the calling thread's
    /// namespace, through a bpf_link that lives as long as the returned
    /// value.
    pub fn attach(&self, ifindex: u32) -> Result<Link> {
        let mut attr = LinkAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr);
        if fd < 0 {
            bail!(
                "attach XDP to ifindex {ifindex}: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as above.
        Ok(Link {
            _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Runs the program `repeat` times on copies of `frame` in live-frames
    /// mode, as if received on `ifindex` (in the calling thread's
    /// namespace), `batch` frames at a time. Returns the kernel's duration.
    /// The error is the bare errno, so callers can tell a refusal
    /// (`generator::live_frames_refusal`) from a failure.
    pub fn run_live(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        batch: u32,
    ) -> std::io::Result<u32> {
        let ctx = crate::lab::xdp_md(frame.len() as u32, ifindex);
        let mut attr = TestAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: batch,
            ..Default::default()
        };
        if bpf(BPF_PROG_TEST_RUN, &mut attr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(attr.duration)
    }
}
