//! bpffs is not mounted on a fresh node; production agents (and tests
//! pinning their own maps) mount it themselves rather than fail.

use std::{ffi::CString, path::Path};

use super::{ErrorKind, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn ensure_mounted(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) || is_bpffs(root) {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).expect("static string");
    let (src, target, fstype) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ErrorKind::Io {
            what: "mounting bpffs at",
            path: root.to_path_buf(),
            source: std::io::Error::last_os_error(),
        }
        .into());
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}
