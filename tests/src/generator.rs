//! Traffic generators for the packet-rate benchmarks: frames sent out of a
//! veth inside a namespace, as fast as the machine takes them. Two kinds:
//!
//! - `live` ([`Live`]): the object's `failover_gen` ([`crate::benchprog`])
//!   run through aya by BPF_PROG_TEST_RUN in live-frames mode with the veth
//!   as ingress; every frame the program TXes really leaves the veth. No
//!   skb and no syscall per frame, so it is the cheaper one, but some
//!   kernels refuse the mode outright (EPERM for any program and
//!   interface).
//! - `socket` ([`Socket`]): an AF_PACKET SOCK_RAW socket bound to the veth,
//!   with PACKET_QDISC_BYPASS, sending prebuilt frames in `sendmmsg`
//!   batches. It works wherever raw sockets do, but every frame reaches
//!   the edge as an skb built by the sender, whatever the system under
//!   test: figures compare only with figures of the same generator.
//!
//! [`Choice::resolve`] picks one; `auto` takes `live` when
//! [`live_frames_refusal`] finds the kernel allows it, else `socket`.

use std::{
    io, mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    str::FromStr,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use failover_agent::dataplane::ifindex;
use failover_common::{GEN_HEADER_LEN, GenConfig, names};

use crate::{
    benchprog::BenchProgs,
    netns::{self, Netns},
};

/// Offset of the UDP source port in an untagged IPv4 frame without options.
const SPORT: usize = 14 + 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
pub enum Kind {
    Live,
    Socket,
}

impl Kind {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// What a benchmark was asked to use (`--generator live|socket|auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "lowercase")]
pub enum Choice {
    #[default]
    Auto,
    Live,
    Socket,
}

impl FromStr for Choice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        <Choice as strum::IntoEnumIterator>::iter()
            .find(|c| <&str>::from(c) == s)
            .ok_or_else(|| anyhow!("unknown generator {s:?}: live, socket or auto"))
    }
}

impl Choice {
    /// The generator to use. `auto` says on stderr which one and why; an
    /// explicit `live` the kernel refuses is an error, never a switch.
    pub fn resolve(self) -> Result<Kind> {
        if self == Choice::Socket {
            return Ok(Kind::Socket);
        }
        match (self, live_frames_refusal()?) {
            (Choice::Auto, None) => {
                eprintln!("generator: live (the kernel allows XDP live-frames test runs)");
                Ok(Kind::Live)
            }
            (_, None) => Ok(Kind::Live),
            (Choice::Auto, Some(e)) => {
                eprintln!("generator: socket (the kernel refuses XDP live-frames test runs: {e})");
                Ok(Kind::Socket)
            }
            (_, Some(e)) => bail!(
                "generator live: the kernel refuses XDP live-frames test runs ({e}); \
                 use the socket generator (or auto)"
            ),
        }
    }
}

/// `None` when the kernel runs XDP programs in live-frames mode, else the
/// errno it refused with (EPERM, EOPNOTSUPP or EINVAL). Any other failure
/// is an error. One dropped frame on the loopback of a scratch namespace.
pub fn live_frames_refusal() -> Result<Option<io::Error>> {
    let mut progs = BenchProgs::load(&[names::DROP_PROGRAM])?;
    let ns = Netns::new("probe")?;
    let _in = ns.enter()?;
    // The loopback's ifindex is 1 in every namespace.
    match progs.run_live(names::DROP_PROGRAM, &[0u8; 60], 1, 1, 1)? {
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL)
            ) =>
        {
            Ok(Some(e))
        }
        Err(e) => Err(anyhow!(e).context("live-frames probe")),
    }
}

/// The live-frames generator: `failover_gen` on a veth.
pub struct Live {
    progs: BenchProgs,
    ns: String,
    ifindex: u32,
    frame: Vec<u8>,
    batch: u32,
}

impl Live {
    /// Runs the program on `count` frames, each of which it transmits.
    pub fn send(&mut self, count: u32) -> Result<u64> {
        // BPF_PROG_TEST_RUN looks the ifindex up in the caller's namespace.
        let _in = netns::enter(&self.ns)?;
        self.progs
            .run_live(
                names::GEN_PROGRAM,
                &self.frame,
                self.ifindex,
                count,
                self.batch,
            )?
            .context("live-frames test run")?;
        Ok(count.into())
    }
}

/// An AF_PACKET socket that sends prebuilt Ethernet frames out of one
/// device, bypassing the qdisc, `batch` frames per `sendmmsg`.
pub struct Socket {
    fd: OwnedFd,
    batch: usize,
    /// Where the next `send_frames` resumes in its list.
    next: usize,
}

impl Socket {
    /// A socket on `dev` in `ns`; it stays in that namespace for life.
    pub fn open(ns: &Netns, dev: &str, batch: usize) -> Result<Self> {
        ensure!(batch >= 1, "batch must be at least 1");
        let _in = ns.enter()?;
        let ifindex = ifindex(dev)?;
        // Protocol 0: the socket sends and receives nothing.
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        ensure!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &1i32)?;
        // A send blocked on a full socket buffer gives up after 100 ms and
        // counts as dropped, so a stalled path cannot hang a benchmark.
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)?;
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(rc == 0, "bind to {dev}: {}", io::Error::last_os_error());
        Ok(Self { fd, batch, next: 0 })
    }

    /// Offers `count` frames, cycling over `frames` (resuming where the
    /// last call stopped), and returns how many the kernel accepted. A
    /// frame refused with ENOBUFS (a full veth ring) or EAGAIN (the send
    /// timeout) is dropped, not retried.
    pub fn send_frames(&mut self, frames: &[Vec<u8>], count: u64) -> Result<u64> {
        ensure!(!frames.is_empty(), "no frames to send");
        self.next %= frames.len();
        let mut iov: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: all-zero is a valid mmsghdr (no name, no control).
                let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let (mut offered, mut accepted) = (0u64, 0u64);
        while offered < count {
            let n = (count - offered)
                .min(self.batch as u64)
                .min((msgs.len() - self.next) as u64);
            // SAFETY: `n` headers from `next` are within `msgs`, each
            // pointing at one iovec over a live frame.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[self.next..].as_mut_ptr(),
                    n as u32,
                    0,
                )
            };
            let done = if rc >= 0 {
                accepted += rc as u64;
                rc as usize
            } else {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS | libc::EAGAIN) => 1,
                    Some(libc::EINTR) => 0,
                    _ => return Err(anyhow!(e).context("sendmmsg")),
                }
            };
            offered += done as u64;
            self.next = (self.next + done) % msgs.len();
        }
        Ok(accepted)
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> Result<()> {
    // SAFETY: `value` is a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            mem::size_of::<T>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt({level}, {name}): {}",
        io::Error::last_os_error()
    );
    Ok(())
}

/// UDP traffic over many flows from one template, with either generator.
pub enum Generator {
    Live(Live),
    Socket {
        socket: Socket,
        frames: Vec<Vec<u8>>,
    },
}

impl Generator {
    /// Frames like `frame` (Ethernet, IPv4 without options, UDP with
    /// checksum 0) whose UDP source port varies over `flows` values from
    /// `base`, sent out of `dev` in `ns`, `batch` frames per kernel call.
    /// `live` picks the port at random per frame, `socket` cycles through
    /// them: the same flows either way.
    pub fn udp_flows(
        kind: Kind,
        ns: &Netns,
        dev: &str,
        frame: &[u8],
        flows: u16,
        base: u16,
        batch: u32,
    ) -> Result<Self> {
        ensure!(flows >= 1, "flows must be at least 1");
        ensure!(
            frame.len() >= GEN_HEADER_LEN,
            "frame shorter than its headers"
        );
        Ok(match kind {
            Kind::Live => {
                let mut progs = BenchProgs::load(&[names::GEN_PROGRAM])?;
                progs.set_gen(GenConfig {
                    header: frame[..GEN_HEADER_LEN].try_into()?,
                    flows,
                    base_port: base,
                })?;
                let ifindex = {
                    let _in = ns.enter()?;
                    ifindex(dev)?
                };
                Generator::Live(Live {
                    progs,
                    ns: ns.name.clone(),
                    ifindex,
                    frame: frame.to_vec(),
                    batch,
                })
            }
            Kind::Socket => Generator::Socket {
                socket: Socket::open(ns, dev, batch as usize)?,
                frames: (0..flows)
                    .map(|i| {
                        let mut f = frame.to_vec();
                        f[SPORT..SPORT + 2].copy_from_slice(&base.wrapping_add(i).to_be_bytes());
                        f
                    })
                    .collect(),
            },
        })
    }

    /// Sends `count` frames; returns how many left the device.
    pub fn send(&mut self, count: u32) -> Result<u64> {
        match self {
            Generator::Live(live) => live.send(count),
            Generator::Socket { socket, frames } => socket.send_frames(frames, count.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_names_parse_and_print_as_before() {
        assert_eq!((Kind::Live.name(), Kind::Socket.name()), ("live", "socket"));
        for (word, c) in [
            ("auto", Choice::Auto),
            ("live", Choice::Live),
            ("socket", Choice::Socket),
        ] {
            assert_eq!(word.parse::<Choice>().unwrap(), c);
        }
        let e = "fast".parse::<Choice>().unwrap_err().to_string();
        assert_eq!(e, "unknown generator \"fast\": live, socket or auto");
    }
}
