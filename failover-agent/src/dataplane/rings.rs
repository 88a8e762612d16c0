//! The atomic switch: a new ring goes into the slot packets are not
//! reading, then one write of the service entry flips `active_slot`. A
//! packet sees the old ring or the new one, never a mix.

use std::time::{Duration, Instant};

use failover_common::{RING_MAX, Ring, ServiceKey, names};

use super::{Dataplane, ErrorKind, Result, map_err};

/// How long the two steps of a flip took.
#[derive(Clone, Copy, Debug)]
pub struct FlipTiming {
    pub write: Duration,
    pub flip: Duration,
    pub generation: u64,
}

impl Dataplane {
    /// Writes `ring` (its first `svc.ring_size` entries are used) into the
    /// inactive slot of the service at `key`, then flips to it.
    pub fn flip_ring(&mut self, key: &ServiceKey, ring: &Ring) -> Result<FlipTiming> {
        let t0 = Instant::now();
        let mut svc = self
            .service(key)?
            .ok_or_else(|| ErrorKind::NoService(format!("{key:?}")))?;
        if svc.ring_size == 0 || svc.ring_size as usize > RING_MAX {
            return Err(ErrorKind::RingSize {
                service: svc.id,
                size: svc.ring_size,
                max: RING_MAX,
            }
            .into());
        }
        let next = svc.active_slot ^ 1;
        self.write_ring(svc.id, next, ring)?;
        let t1 = Instant::now();
        svc.active_slot = next;
        svc.generation += 1;
        self.put_service(*key, svc)?;
        let t2 = Instant::now();
        Ok(FlipTiming {
            write: t1 - t0,
            flip: t2 - t1,
            generation: svc.generation,
        })
    }

    /// Writes one ring slot; one syscall for the whole table.
    pub fn write_ring(&mut self, service_id: u32, slot: u32, ring: &Ring) -> Result<()> {
        let idx = failover_common::Service::ring_index(service_id, slot);
        self.rings.set(idx, ring, 0).map_err(map_err(names::RINGS))
    }

    /// Reads one ring slot straight into the heap. aya's `Array::get`
    /// returns the 256 KiB value by value, which overflows small thread
    /// stacks (tokio workers, test threads) in debug builds.
    pub fn ring(&self, service_id: u32, slot: u32) -> Result<Box<Ring>> {
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};

        /// `union bpf_attr` for BPF_MAP_LOOKUP_ELEM.
        #[repr(C)]
        struct LookupAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

        let key = failover_common::Service::ring_index(service_id, slot);
        let buf = vec![failover_common::NO_BACKEND; RING_MAX].into_boxed_slice();
        // SAFETY: Ring is repr(C) holding exactly [u32; RING_MAX], so a
        // boxed slice of RING_MAX u32s has its size and alignment.
        let mut ring: Box<Ring> = unsafe { Box::from_raw(Box::into_raw(buf).cast::<Ring>()) };
        let fd = self.rings.map().fd().as_fd().as_raw_fd();
        let attr = LookupAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &mut *ring as *mut Ring as u64,
            flags: 0,
        };
        // SAFETY: attr points at a live key and a value buffer of the map's
        // value size; the kernel writes only within them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const LookupAttr,
                std::mem::size_of::<LookupAttr>(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(map_err(names::RINGS)(aya::maps::MapError::from(e)));
        }
        Ok(ring)
    }
}
