//! `BPF_MAP_LOOKUP_BATCH`: many entries per syscall. Reading a map entry
//! by entry costs two syscalls each (next key, then value); the flow table
//! holds up to 262,144 entries and is read when backends go down, so it is
//! read in batches instead. aya 0.13 has no batch API.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;

/// `union bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries per call: more than any hash bucket holds (a smaller buffer
/// than a bucket fails with ENOSPC).
const CHUNK: usize = 4096;

/// Reads up to `keys.len()` entries starting at the batch position `from`
/// (`None`: the start) into `keys` and `values` (`values` holds
/// `values_per_key` values per key: per-CPU maps). Returns how many were
/// read and the position to continue from (`None`: the map is done).
///
/// # Safety
/// `K` and `V` must be the map's key and value types (plain data), and
/// `values.len() == keys.len() * values_per_key`.
unsafe fn lookup<K, V>(
    map: &MapData,
    from: Option<u32>,
    keys: &mut [K],
    values: &mut [V],
) -> std::io::Result<(usize, Option<u32>)> {
    let in_batch = from.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: if from.is_some() {
            &in_batch as *const u32 as u64
        } else {
            0
        },
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: attr points at buffers sized for `count` entries of this map
    // (the caller's contract); the kernel writes only within them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let got = (attr.count as usize).min(keys.len());
    if rc == 0 {
        return Ok((got, Some(out_batch)));
    }
    let err = std::io::Error::last_os_error();
    // ENOENT: the map ended; `count` says how many were filled anyway.
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok((got, None));
    }
    Err(err)
}

/// Every entry of a hash map, a few syscalls in all.
pub fn entries<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
) -> std::io::Result<Vec<(K, V)>> {
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    let mut out = Vec::new();
    let mut from = None;
    loop {
        // SAFETY: the callers pass the map's own key and value types.
        let (got, next) = unsafe { lookup(map, from, &mut keys, &mut values)? };
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match next {
            Some(n) => from = Some(n),
            None => return Ok(out),
        }
    }
}

/// Entries `first..=last` of an array: a batch starts after the key it
/// is given, so from `first - 1`. Costs one element copy per slot, so a
/// caller that knows which slots can be in use reads only those.
pub fn array_range<V: Copy + Default>(
    map: &MapData,
    first: u32,
    last: u32,
) -> std::io::Result<Vec<(u32, V)>> {
    let total = last.saturating_sub(first) as usize + 1;
    let chunk = total.min(CHUNK);
    let mut keys = vec![0u32; chunk];
    let mut values = vec![V::default(); chunk];
    let mut out = Vec::with_capacity(total);
    let mut from = first.checked_sub(1);
    while out.len() < total {
        let want = (total - out.len()).min(chunk);
        // SAFETY: the callers pass the array's value type; keys are u32.
        let (got, next) = unsafe { lookup(map, from, &mut keys[..want], &mut values[..want])? };
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match next {
            Some(n) if got > 0 => from = Some(n),
            _ => break,
        }
    }
    Ok(out)
}

/// Keys `0..n` of a per-CPU array, each with its `cpus` values, in one
/// call (`n` must not exceed the map's size).
pub fn per_cpu<V: Copy + Default>(map: &MapData, n: usize, cpus: usize) -> std::io::Result<Vec<V>> {
    let mut keys = vec![0u32; n];
    let mut values = vec![V::default(); n * cpus];
    // SAFETY: the caller passes the map's value type; the per-CPU values
    // come back as `cpus` copies per key, each rounded up to 8 bytes, which
    // the callers' `V` (all u64 fields) already is.
    let (got, _) = unsafe { lookup(map, None, &mut keys, &mut values)? };
    values.truncate(got * cpus);
    Ok(values)
}
