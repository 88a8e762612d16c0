//! The XDP actions a program returns (`enum xdp_action` in
//! `linux/bpf.h`), as BPF_PROG_TEST_RUN reports them.

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
