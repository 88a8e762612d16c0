//! Network namespaces owned by guard values: created by the test, deleted
//! by `Drop` even when the test fails or panics.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Privileged tests must fail loudly, never skip, when they cannot run.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, XDP and network namespaces); run it through `cargo xtask test`"
    );
}

/// Runs a command, failing with its stderr when it does not succeed.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("spawn {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `fo-<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        require_root();
        let name = format!(
            "fo-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&format!("ip netns add {name}"))?;
        let ns = Self { name };
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', r"'\''")
        ))
    }

    /// The MAC address of device `dev` in the namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let s = self.exec(&format!("cat /sys/class/net/{dev}/address"))?;
        let bytes: Vec<u8> = s
            .trim()
            .split(':')
            .map(|p| u8::from_str_radix(p, 16))
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("MAC of {dev}: {s:?}"))?;
        bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("MAC of {dev}: {s:?}"))
    }

    /// Moves the calling thread into the namespace until the guard drops.
    /// BPF_PROG_TEST_RUN's FIB lookups and ifindex lookups then see this
    /// namespace's devices and routes.
    pub fn enter(&self) -> Result<Entered> {
        enter(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// Moves the calling thread into the named namespace until the guard drops.
pub fn enter(name: &str) -> Result<Entered> {
    let back = File::open("/proc/thread-self/ns/net").context("open own netns")?;
    let target = File::open(format!("/run/netns/{name}")).context("open netns")?;
    // SAFETY: valid fd; CLONE_NEWNET affects only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(Entered { back })
}

/// Returns the thread to its previous namespace on drop.
pub struct Entered {
    back: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: valid fd.
        unsafe { libc::setns(self.back.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// True when no namespace created by this process is left.
pub fn none_left() -> bool {
    let prefix = format!("-{}-", std::process::id());
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .all(|e| !e.file_name().to_string_lossy().contains(&prefix))
        })
        .unwrap_or(true)
}
