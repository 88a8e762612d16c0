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
    /// In the driver: the fast path.
    #[default]
    Native,
    /// Generic, in the stack: works on any interface, slower.
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Skb => "skb",
        })
    }
}

impl From<XdpMode> for aya::programs::XdpMode {
    fn from(m: XdpMode) -> Self {
        match m {
            XdpMode::Native => Self::Driver,
            XdpMode::Skb => Self::Skb,
        }
    }
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| ErrorKind::NoInterface(iface.to_owned()))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(ErrorKind::NoInterface(iface.to_owned()).into()),
        i => Ok(i),
    }
}

impl Dataplane {
    fn link_path(&self, iface: &str) -> PathBuf {
        self.pin_dir.join("links").join(iface)
    }

    /// Attaches the NAT program to `iface` (and allows redirects to it).
    /// If a pinned link from an earlier agent exists, the program inside it
    /// is replaced atomically instead: traffic never sees a gap.
    /// Returns true when an existing link was updated.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<bool> {
        let idx = ifindex(iface)?;
        let updated = self.attach_prog(super::names::PROGRAM, iface, mode)?;
        self.add_egress(idx)?;
        Ok(updated)
    }

    /// Attaches the trivial XDP_PASS program: a veth only delivers frames
    /// that were sent with XDP_TX or redirected when its peer has a program.
    pub fn attach_pass(&mut self, iface: &str, mode: XdpMode) -> Result<bool> {
        self.attach_prog(super::names::PASS_PROGRAM, iface, mode)
    }

    fn attach_prog(&mut self, prog: &'static str, iface: &str, mode: XdpMode) -> Result<bool> {
        let path = self.link_path(iface);
        let attach_err = |source: ProgramError| ErrorKind::Attach {
            iface: iface.to_owned(),
            mode,
            hint: match mode {
                XdpMode::Native => format!(
                    " (the driver of {iface} may not support native XDP; try xdp_mode: skb)"
                ),
                XdpMode::Skb => String::new(),
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
            return Ok(true);
        }
        let idx = ifindex(iface)?;
        let p: &mut Xdp = self.xdp_mut(prog);
        let id = p.attach_to_if_index(idx, mode.into()).map_err(attach_err)?;
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
        Ok(false)
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
