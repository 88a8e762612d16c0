//! The object's benchmark programs, loaded and run through aya:
//!
//! - `failover_gen` (`GEN_PROGRAM`): writes the frame of its
//!   [`GenConfig`] into each frame with the UDP source port set to one of
//!   `flows` values (`base_port + prandom % flows`) and returns `XDP_TX`.
//!   Run by BPF_PROG_TEST_RUN in live-frames mode on a veth
//!   ([`BenchProgs::run_live`]), every frame leaves that veth for real: an
//!   in-kernel traffic generator.
//! - `failover_drop` (`DROP_PROGRAM`): `XDP_DROP`, for the receiving end of
//!   a benchmark (the veth still counts every frame in its rx counters).
//! - `failover_pass` (`PASS_PROGRAM`): `XDP_PASS`, which gives a veth the
//!   NAPI context it needs to receive frames sent with XDP_TX or
//!   redirected.
//!
//! They come from the agent's own object, so loading them creates its
//! maps too, pinned by name: in a scratch pin directory of their own, with
//! every map shrunk to one entry (these programs use only `GEN`).

use std::{
    io,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use failover_agent::dataplane::{Dataplane, OBJECT, bpffs};
use failover_common::{GenConfig, names};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Every map of the object, shrunk to one entry when the benchmark
/// programs load it (a name the object lacks is ignored).
const MAPS: [&str; 29] = [
    names::NODE,
    names::VIP_FILTER,
    names::SERVICES,
    names::BACKENDS,
    names::RINGS,
    names::FLOWS,
    names::REVERSE,
    names::DEVMAP,
    names::STATS,
    names::SVC_STATS,
    names::BE_STATS,
    names::NEXTHOPS,
    names::PENDING,
    names::PATH_MSS,
    names::ICMP_LIMIT,
    names::JUMPS,
    names::EVIDENCE,
    names::NODE6,
    names::SERVICES6,
    names::BACKEND_ADDR6,
    names::FLOWS6,
    names::REVERSE6,
    names::PENDING6,
    names::NEXTHOPS6,
    names::LAST_HOPS,
    names::LAST_HOPS6,
    names::GEN,
    names::SCRATCH,
    names::TOOBIG_MTU,
];

/// The pin directory, removed on drop.
struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Dataplane::remove_pins(&self.0);
    }
}

/// Benchmark programs of the object, loaded into the kernel; attachments
/// end and the programs unload on drop.
pub struct BenchProgs {
    // Field order is drop order: detach and unload, then unpin.
    ebpf: Ebpf,
    _pins: PinDir,
}

impl BenchProgs {
    /// Loads the object and, of its programs, `programs`.
    pub fn load(programs: &[&str]) -> Result<Self> {
        let pins = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/failover-test-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        bpffs::ensure_mounted(&pins.0)?;
        std::fs::create_dir_all(&pins.0).with_context(|| format!("create {}", pins.0.display()))?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&pins.0);
        for m in MAPS {
            loader.map_max_entries(m, 1);
        }
        let ebpf = loader
            .load(OBJECT)
            .context("load the XDP object for its benchmark programs")?;
        let mut progs = Self { ebpf, _pins: pins };
        for &name in programs {
            progs
                .xdp(name)?
                .load()
                .with_context(|| format!("load {name}"))?;
        }
        Ok(progs)
    }

    /// How many instructions the verifier walked to load `name`.
    pub fn verified_instructions(&mut self, name: &str) -> Result<u32> {
        self.xdp(name)?
            .info()?
            .verified_instruction_count()
            .ok_or_else(|| anyhow!("{name}: the kernel reports no verified instruction count"))
    }

    fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name} in the object"))?
            .try_into()?)
    }

    /// Attaches `name` in driver mode to `dev` in the calling thread's
    /// namespace, until this value drops.
    pub fn attach(&mut self, name: &str, dev: &str) -> Result<()> {
        self.xdp(name)?
            .attach(dev, XdpMode::Driver)
            .with_context(|| format!("attach {name} to {dev}"))?;
        Ok(())
    }

    /// Sets the frame `failover_gen` writes.
    pub fn set_gen(&mut self, cfg: GenConfig) -> Result<()> {
        let mut map: Array<_, GenConfig> = Array::try_from(
            self.ebpf
                .map_mut(names::GEN)
                .ok_or_else(|| anyhow!("no map {} in the object", names::GEN))?,
        )?;
        map.set(0, cfg, 0).context("write GEN")?;
        Ok(())
    }

    /// One ordinary BPF_PROG_TEST_RUN of `name` on `frame` (the loopback
    /// as ingress): its action and output frame.
    pub fn run(&mut self, name: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        crate::lab::run_on(self.xdp(name)?, 1, frame)
    }

    /// Runs `name` `repeat` times on copies of `frame` in live-frames
    /// mode, as if received on `ifindex` (in the calling thread's
    /// namespace), `batch` frames at a time. The error of the run itself is
    /// the bare errno, so callers can tell a refusal
    /// (`generator::live_frames_refusal`) from a failure.
    pub fn run_live(
        &mut self,
        name: &str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        batch: u32,
    ) -> Result<io::Result<()>> {
        let ctx = crate::lab::xdp_md(frame.len() as u32, ifindex);
        let run = self.xdp(name)?.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(batch),
            ..TestRunOptions::new()
        });
        Ok(match run {
            Ok(_) => Ok(()),
            Err(ProgramError::SyscallError(e)) => Err(e.io_error),
            Err(e) => return Err(anyhow!(e).context(format!("live-frames run of {name}"))),
        })
    }
}
