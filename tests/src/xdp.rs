//! The XDP actions a program returns (`enum xdp_action` in
//! `linux/bpf.h`), as BPF_PROG_TEST_RUN reports them. The values are
//! those of [`Verdict::action`], the one table the XDP program returns
//! from; `XDP_ABORTED` is no verdict of ours, so it is spelled here.

use failover_common::Verdict;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = Verdict::Drop.action();
pub const XDP_PASS: u32 = Verdict::Pass.action();
pub const XDP_TX: u32 = Verdict::Tx.action();
pub const XDP_REDIRECT: u32 = Verdict::Redirect.action();
