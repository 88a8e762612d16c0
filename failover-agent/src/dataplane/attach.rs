//! Attaching the program to interfaces through pinned bpf_links, so the
//! attachment outlives the agent process and an upgrade swaps programs in
//! place.

use std::{ffi::CString, fmt, path::PathBuf};

use aya::programs::{
    ProgramError, Xdp,
    links::{FdLink, LinkError, PinnedLink},
    xdp::XdpLink,
};

use super::{Dataplane, ErrorKind, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// Generic on a veth; elsewhere native, or generic (with a warning)
    /// where the driver refuses native XDP. See [`XdpMode::resolve`].
    #[default]
    Auto,
    /// In the driver: the fast path on a NIC.
    Native,
    /// Generic, in the stack: works on any interface.
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Skb => "skb",
        })
    }
}

impl From<XdpMode> for aya::programs::XdpMode {
    fn from(m: XdpMode) -> Self {
        match m {
            // attach_prog resolves Auto itself; the kernel's choice is the
            // nearest meaning.
            XdpMode::Auto => Self::Default,
            XdpMode::Native => Self::Driver,
            XdpMode::Skb => Self::Skb,
        }
    }
}

impl XdpMode {
    /// The mode to attach `iface` in. `Auto` becomes `Skb` on a veth: its
    /// frames come from a local stack as cloned skbs, which native XDP on a
    /// veth copies into a new buffer and rebuilds on the far side, while
    /// generic XDP works on the skb in place (measured in `cargo xtask
    /// bench http`, docs/benchmarks.md). Elsewhere `Auto` stays: attach
    /// tries native, then generic with a warning.
    #[must_use]
    pub fn resolve(self, iface: &str) -> Self {
        match self {
            Self::Auto if driver(iface).as_deref() == Some("veth") => Self::Skb,
            m => m,
        }
    }
}

/// The interface's driver name, as `ethtool -i` prints it (SIOCETHTOOL,
/// ETHTOOL_GDRVINFO), in the calling thread's network namespace. None when
/// the device answers no ethtool request.
pub fn driver(iface: &str) -> Option<String> {
    // linux/sockios.h and linux/ethtool.h; libc has neither.
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo`, up to its driver name and padded to size.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: ifreq is plain data, valid all zeros.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // SAFETY: an open socket; the name fits with its NUL, and ifru_data
    // points at `info`, which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            SIOCETHTOOL,
            &raw mut req,
        )
    };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| ErrorKind::NoInterface(iface.to_owned()))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(ErrorKind::NoInterface(iface.to_owned()).into()),
        i => Ok(i),
    }
}

/// How [`Dataplane::attach`] left an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// A pinned link from an earlier agent got the new program, in the
    /// mode it was made with.
    pub updated: bool,
    /// The mode: for a new link the one the kernel took (`Native` or
    /// `Skb`); for an updated link the configured one, resolved.
    pub mode: XdpMode,
}

impl Dataplane {
    fn link_path(&self, iface: &str) -> PathBuf {
        self.pin_dir.join("links").join(iface)
    }

    /// Attaches the NAT program to `iface` (and allows redirects to it).
    /// If a pinned link from an earlier agent exists, the program inside it
    /// is replaced atomically instead: traffic never sees a gap.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attached> {
        let idx = ifindex(iface)?;
        let attached = self.attach_prog(super::names::PROGRAM, iface, mode)?;
        self.add_egress(idx)?;
        Ok(attached)
    }

    /// Attaches the trivial XDP_PASS program: a veth only delivers frames
    /// that were sent with XDP_TX or redirected when its peer has a program.
    pub fn attach_pass(&mut self, iface: &str, mode: XdpMode) -> Result<Attached> {
        self.attach_prog(super::names::PASS_PROGRAM, iface, mode)
    }

    fn attach_prog(&mut self, prog: &'static str, iface: &str, mode: XdpMode) -> Result<Attached> {
        let mode = mode.resolve(iface);
        let path = self.link_path(iface);
        let attach_err = |source: ProgramError| ErrorKind::Attach {
            iface: iface.to_owned(),
            mode,
            hint: match mode {
                XdpMode::Native => format!(
                    " (the driver of {iface} may not support native XDP; try xdp_mode: skb)"
                ),
                XdpMode::Auto | XdpMode::Skb => String::new(),
            },
            source,
        };
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|source| ErrorKind::Link {
                path: path.clone(),
                source,
            })?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|source: LinkError| {
                ErrorKind::Link {
                    path: path.clone(),
                    source,
                }
            })?;
            let p: &mut Xdp = self.xdp_mut(prog);
            let id = p.attach_to_link(link).map_err(attach_err)?;
            // The pin keeps the link; our handle can go.
            let _ = p.take_link(id).map_err(ErrorKind::Program)?;
            return Ok(Attached {
                updated: true,
                mode,
            });
        }
        let idx = ifindex(iface)?;
        let p: &mut Xdp = self.xdp_mut(prog);
        let (id, mode) = match mode {
            // Native where the driver takes it, else generic, said loudly.
            XdpMode::Auto => match p.attach_to_if_index(idx, XdpMode::Native.into()) {
                Ok(id) => (id, XdpMode::Native),
                Err(e) => {
                    tracing::warn!(interface = iface, error = %e, "native XDP refused; attaching in generic (skb) mode");
                    let id = p
                        .attach_to_if_index(idx, XdpMode::Skb.into())
                        .map_err(attach_err)?;
                    (id, XdpMode::Skb)
                }
            },
            m => (p.attach_to_if_index(idx, m.into()).map_err(attach_err)?, m),
        };
        let link = p.take_link(id).map_err(ErrorKind::Program)?;
        let fd = FdLink::try_from(link).map_err(|source| ErrorKind::Link {
            path: path.clone(),
            source,
        })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ErrorKind::Io {
                what: "creating link pin directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        fd.pin(&path).map_err(|source| ErrorKind::Pin {
            path: path.clone(),
            source,
        })?;
        Ok(Attached {
            updated: false,
            mode,
        })
    }

    /// Detaches from `iface` by removing the pinned link.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        let path = self.link_path(iface);
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            let _ = pinned.unpin();
        }
        Ok(())
    }
}
