//! The whole product end to end: the real agent process in the edge
//! namespace, probing real backend processes in two "clouds", programming
//! the XDP program it attached, with real client traffic through the VIP.
//! Each test asserts on what the clients and the backends saw.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first). The failover cases themselves are in `e2e_cases`,
//! shared with the IPv6 run (`e2e6.rs`); the tests take a lock so that
//! only one paced client runs at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use failover_agent::config::{self, Config};
use failover_tests::{
    agentproc::{self, ProbeTiming, World},
    configs,
    topology::Family,
    traffic::Sample,
    wait::wait_for,
};

mod e2e_cases;

use e2e_cases::{BASELINE, by_backend, drive, serial};

/// IPv4: the client, the VIP and the backends (`e2e6.rs` runs the same
/// cases over IPv6).
const V4: Family = Family::V4;

#[test]
fn steady_state_spreads_over_tier_0_and_every_request_succeeds() {
    e2e_cases::steady_state(V4);
}

#[test]
fn a_backend_crash_moves_new_flows_to_the_other_backend() {
    e2e_cases::backend_crash(V4);
}

#[test]
fn a_lost_cloud_fails_over_resets_its_streams_and_comes_back_without_flapping() {
    e2e_cases::lost_cloud(V4);
}

#[test]
fn an_eu_only_service_fails_closed_and_never_reaches_the_us() {
    e2e_cases::eu_only_fails_closed(V4);
}

#[test]
fn an_agent_restart_under_load_fails_no_request() {
    let _s = serial();
    let mut w = World::start(false, ProbeTiming::default()).unwrap();
    let d = drive(&w, V4, Duration::from_millis(1000), Duration::from_secs(30));
    d.wait_answered(BASELINE, Duration::from_secs(5));
    w.agent.stop().unwrap();
    // No agent for a while, under load: the sleep is the behaviour.
    std::thread::sleep(Duration::from_millis(700));
    let gen_before = w.dp.services().unwrap();
    w.agent.spawn().unwrap();
    // Ready again: its log says it started.
    wait_log(&mut w, "agent started", 2, Duration::from_secs(15));
    // The restarted agent runs under load for a while (its probes and
    // first plans): the sleep is the observation window.
    std::thread::sleep(Duration::from_millis(1500));
    w.agent.check_alive().unwrap();
    let samples = d.stop();
    let failed: Vec<&Sample> = samples.iter().filter(|s| !s.ok).collect();
    println!(
        "restart: {} requests, {} failed, served {:?}",
        samples.len(),
        failed.len(),
        by_backend(&samples)
    );
    assert!(samples.len() > 1000, "{} requests", samples.len());
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(samples.iter().all(|s| s.backend.starts_with('a')));
    // The restarted agent kept the rings it found.
    let gen_after = w.dp.services().unwrap();
    assert_eq!(
        gen_before
            .iter()
            .map(|s| s.1.generation)
            .collect::<Vec<_>>(),
        gen_after.iter().map(|s| s.1.generation).collect::<Vec<_>>(),
        "no ring flip across the restart"
    );
}

/// A config directory laid out as the kubelet lays out a ConfigMap volume:
/// the data in `..<timestamp>/config.yaml`, `..data -> ..<timestamp>`, and
/// the path the pod reads, `config.yaml -> ..data/config.yaml`.
struct ConfigMapVolume {
    dir: PathBuf,
    current: String,
}

impl ConfigMapVolume {
    fn create(dir: &Path, stamp: &str, yaml: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::symlink;
        let current = format!("..{stamp}");
        std::fs::create_dir_all(dir.join(&current))?;
        std::fs::write(dir.join(&current).join("config.yaml"), yaml)?;
        symlink(&current, dir.join("..data"))?;
        symlink("..data/config.yaml", dir.join("config.yaml"))?;
        Ok(Self {
            dir: dir.to_owned(),
            current,
        })
    }

    /// The path the agent is given.
    fn path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// The kubelet's atomic update: the new version in a new timestamped
    /// directory, `..data_tmp -> it` renamed over `..data` (one rename(2):
    /// a reader sees the old file or the new one, never neither), then the
    /// old directory removed.
    fn update(&mut self, stamp: &str, yaml: &str) -> std::io::Result<()> {
        let next = format!("..{stamp}");
        std::fs::create_dir(self.dir.join(&next))?;
        std::fs::write(self.dir.join(&next).join("config.yaml"), yaml)?;
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&next, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        std::fs::remove_dir_all(self.dir.join(&self.current))?;
        self.current = next;
        Ok(())
    }
}

/// Ring generation of every service in SERVICES, by port.
fn generations(w: &World) -> BTreeMap<u16, u64> {
    w.dp.services()
        .unwrap()
        .into_iter()
        .map(|(k, s)| (u16::from_be(k.port_be), s.generation))
        .collect()
}

/// Waits until `needle` occurs `n` times in the agent log; returns how
/// long that took.
fn wait_log(w: &mut World, needle: &str, n: usize, timeout: Duration) -> Duration {
    let what = format!("{needle:?} (x{n}) in the agent log");
    wait_for(&what, timeout, || {
        w.agent.check_alive().unwrap();
        w.agent.log_text().matches(needle).count() >= n
    })
}

/// Backends that answered requests started in `[from, to)`.
fn served_between(samples: &[Sample], from: Duration, to: Duration) -> BTreeSet<&str> {
    samples
        .iter()
        .filter(|s| s.ok && s.at >= from && s.at < to)
        .map(|s| s.backend.as_str())
        .collect()
}

/// Issue 7: a ConfigMap edit reaches the running agent (the kubelet swaps
/// `..data`; the agent's 1 s file check follows the symlinks) with no
/// restart and no failed request, and an invalid edit is refused with the
/// last good state kept.
#[test]
fn a_configmap_update_reloads_under_load_and_a_bad_one_is_refused() {
    let _s = serial();
    let timing = ProbeTiming::default();
    let mut volume = None;
    let mut w = World::start_with(false, timing, |dir, yaml| {
        let v = ConfigMapVolume::create(&dir.join("config"), "2026_11_26_00_00_00.1", yaml)?;
        let path = v.path();
        volume = Some(v);
        Ok(path)
    })
    .unwrap();
    let mut volume = volume.expect("config placed");
    assert_eq!(w.agent.config, volume.path());
    let pid = w.agent.pid().expect("running");
    let v1 = agentproc::config(&w.topo.pins.0, timing);
    fn backend<'c>(cfg: &'c mut Config, name: &str) -> &'c mut config::Backend {
        cfg.backends.iter_mut().find(|b| b.name == name).unwrap()
    }
    // v2: b1 (cloud-b) moves into tier 0, so `chat` spreads over a1, a2, b1.
    let mut v2 = v1.clone();
    backend(&mut v2, "b1").tier = 0;
    // v3: would move b1 back out, but a2's weight 0 is invalid.
    let mut v3 = v2.clone();
    backend(&mut v3, "b1").tier = 1;
    backend(&mut v3, "a2").weight = 0;
    assert_eq!(v3.backends[1].name, "a2", "the field the refusal names");
    let (v2, v3) = (configs::to_yaml(&v2), configs::to_yaml(&v3));
    let chat = 80;
    let gen_v1 = generations(&w);

    let d = drive(&w, V4, Duration::from_millis(1000), Duration::from_secs(30));
    d.wait_answered(BASELINE, Duration::from_secs(5));

    // The valid update.
    let swap_1 = d.now();
    volume.update("2026_11_26_00_05_00.2", &v2).unwrap();
    let reload_delay = wait_log(&mut w, "config reloaded", 1, Duration::from_secs(5));
    let reloaded = d.now();
    let dec = w
        .agent
        .wait_serving("chat", &["a1", "a2", "b1"], Duration::from_secs(2))
        .unwrap();
    assert!(dec.reason.contains("config reload"), "{dec:?}");
    let gen_v2 = generations(&w);
    let mut want = gen_v1.clone();
    *want.get_mut(&chat).unwrap() += 1;
    assert_eq!(gen_v2, want, "one ring flip, of chat only");
    assert_eq!(dec.generation, gen_v2[&chat]);
    wait_for(
        "a1, a2 and b1 each answering",
        Duration::from_secs(5),
        || {
            ["a1", "a2", "b1"]
                .iter()
                .all(|b| d.answered(|s| s.at >= reloaded && s.backend == *b) >= 50)
        },
    );

    // The invalid update: refused, nothing changes.
    let swap_2 = d.now();
    volume.update("2026_11_26_00_10_00.3", &v3).unwrap();
    let refuse_delay = wait_log(&mut w, "reload refused", 1, Duration::from_secs(5));
    let refused = d.now();
    // Nothing may change after the refusal: the sleep is the observation
    // window.
    std::thread::sleep(Duration::from_millis(1500));
    w.agent.check_alive().unwrap();
    let samples = d.stop();
    let end = samples.last().expect("samples").at + Duration::from_millis(1);

    let log = w.agent.log_text();
    let failed: Vec<&Sample> = samples.iter().filter(|s| !s.ok).collect();
    println!(
        "configmap: {} requests, {} failed, served {:?}; reload {} ms after the swap, \
         refusal {} ms after the bad swap; generations {gen_v1:?} -> {gen_v2:?}",
        samples.len(),
        failed.len(),
        by_backend(&samples),
        reload_delay.as_millis(),
        refuse_delay.as_millis(),
    );

    // The same process throughout.
    assert_eq!(w.agent.pid(), Some(pid), "never restarted");
    assert_eq!(log.matches("agent started").count(), 1, "{log}");
    // Noticed within the 1 s poll, plus slack for a loaded machine.
    assert!(reload_delay < Duration::from_secs(5), "{reload_delay:?}");
    assert!(refuse_delay < Duration::from_secs(5), "{refuse_delay:?}");
    // Not a request lost, across both swaps.
    assert!(samples.len() > 1000, "{} requests", samples.len());
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    // What the clients saw: tier 0 before, tier 0 plus b1 after, and
    // still that after the refused update.
    let set = |v: &[&'static str]| v.iter().copied().collect::<BTreeSet<&str>>();
    assert_eq!(
        served_between(&samples, Duration::ZERO, swap_1),
        set(&["a1", "a2"])
    );
    assert_eq!(
        served_between(&samples, reloaded, swap_2),
        set(&["a1", "a2", "b1"])
    );
    assert_eq!(
        served_between(&samples, refused, end),
        set(&["a1", "a2", "b1"])
    );
    assert!(!samples.iter().any(|s| s.backend == "b2"));
    // The refusal names the field, and the last good state stays.
    assert_eq!(log.matches("config reloaded").count(), 1, "{log}");
    assert_eq!(log.matches("reload refused").count(), 1, "{log}");
    assert!(log.contains("field=backends[1].weight"), "{log}");
    assert_eq!(generations(&w), gen_v2, "no flip on the refused config");
    let records: Vec<_> = w.agent.decisions().into_iter().rev().collect();
    assert!(
        records
            .iter()
            .any(|r| r.reason.starts_with("reload refused")
                && r.reason.contains("backends[1].weight")),
        "audited: {records:?}"
    );
    let chat_last = records.iter().find(|r| r.service == "chat").unwrap();
    assert_eq!(chat_last.generation, gen_v2[&chat]);
}
