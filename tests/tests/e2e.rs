//! The whole product end to end: the real agent process in the edge
//! namespace, probing real backend processes in two "clouds", programming
//! the XDP program it attached, with real client traffic through the VIP.
//! Each test asserts on what the clients and the backends saw.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first). The tests take a lock so that only one paced client runs
//! at a time: timing is measured, and the machine may have two cores.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use failover_agent::config::{self, Config};
use failover_tests::{
    agentproc::{self, EU_PORT, ProbeTiming, World, backend_stats},
    client, configs,
    topology::VIP,
    traffic::{Driver, Sample, recovery},
    wait::wait_for,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PATH: &str = "/v1/models";

/// Requests answered before a fault: traffic flows.
const BASELINE: usize = 100;

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn by_backend(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples.iter().filter(|s| s.ok) {
        *m.entry(s.backend.clone()).or_insert(0) += 1;
    }
    m
}

/// Client requests (not probes) a backend has answered.
fn served(w: &World, name: &str) -> u64 {
    let (addr, ns) = World::backend(&w.topo, name);
    let s = backend_stats(ns, addr).unwrap();
    s.requests - s.health
}

#[test]
fn steady_state_spreads_over_tier_0_and_every_request_succeeds() {
    let _s = serial();
    let w = World::start(false, ProbeTiming::default()).unwrap();
    // The agent's xdp_mode is auto: generic mode on the edge's veths.
    for leg in ["ec", "ea", "eb"] {
        let link = w.topo.edge.exec(&format!("ip -d link show {leg}")).unwrap();
        assert!(link.contains("xdpgeneric"), "{leg}: {link}");
    }
    let mut seen = BTreeMap::new();
    {
        let _in = w.topo.client.enter().unwrap();
        for i in 0..200 {
            let a = client::get(vip(), PATH, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
            assert_eq!(a.status, 200);
            *seen.entry(a.backend).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["a1", "a2"],
        "tier 0 only, both backends: {seen:?}"
    );
    assert!(seen.values().all(|&n| n >= 40), "spread: {seen:?}");
    // The backends agree: cloud-b saw probes only.
    assert_eq!(served(&w, "b1") + served(&w, "b2"), 0);
    assert_eq!(served(&w, "a1") + served(&w, "a2"), 200);
}

#[test]
fn a_backend_crash_moves_new_flows_to_the_other_backend() {
    let _s = serial();
    let w = World::start(false, ProbeTiming::default()).unwrap();
    let d = Driver::start(
        &w.topo.client.name,
        vip(),
        PATH,
        Duration::from_millis(1),
        Duration::from_millis(500),
        Duration::from_secs(10),
    );
    d.wait_answered(BASELINE, Duration::from_secs(5));
    let fault = d.now();
    World::crash(&w.topo, "a1").unwrap();
    wait_for(
        "250 requests after recovery",
        Duration::from_secs(8),
        || {
            let samples = d.samples();
            recovery(&samples, fault, 20)
                .0
                .is_some_and(|rto| samples.iter().filter(|s| s.at >= fault + rto).count() > 250)
        },
    );
    let samples = d.stop();
    let (rto, failed) = recovery(&samples, fault, 20);
    let after: Vec<Sample> = samples.iter().filter(|s| s.at >= fault).cloned().collect();
    println!(
        "crash: failover time {rto:?}, {failed} failed of {} requests after the fault; served before {:?}, after {:?}",
        after.len(),
        by_backend(&samples[..samples.len() - after.len()]),
        by_backend(&after)
    );
    let rto = rto.expect("recovered");
    assert!(rto < Duration::from_secs(1), "failover took {rto:?}");
    // After recovery, every request went to a2 and succeeded.
    let tail: Vec<&Sample> = after.iter().filter(|s| s.at >= fault + rto).collect();
    assert!(tail.len() > 200, "{} requests after recovery", tail.len());
    assert!(tail.iter().all(|s| s.ok && s.backend == "a2"));
    // Before the fault every request succeeded.
    assert!(samples.iter().filter(|s| s.at < fault).all(|s| s.ok));
    let down = w
        .agent
        .decisions()
        .into_iter()
        .rfind(|d| d.service == "chat")
        .unwrap();
    assert_eq!(down.to, ["a2"], "{down:?}");
}

/// Opens a long SSE stream through the VIP and reads its first bytes.
fn open_stream(w: &World) -> TcpStream {
    let _in = w.topo.client.enter().unwrap();
    let mut s = TcpStream::connect_timeout(&vip(), Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = r#"{"model":"tiny-llm","stream":true,"max_tokens":10000,"messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: vip\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.contains(" 200 "), "stream started: {head}");
    assert!(head.contains("x-backend: a"), "stream from cloud-a: {head}");
    s
}

#[test]
fn a_lost_cloud_fails_over_resets_its_streams_and_comes_back_without_flapping() {
    let _s = serial();
    let mut w = World::start(false, ProbeTiming::default()).unwrap();
    let mut stream = open_stream(&w);
    let d = Driver::start(
        &w.topo.client.name,
        vip(),
        PATH,
        Duration::from_millis(1),
        Duration::from_millis(100),
        Duration::from_secs(30),
    );
    d.wait_answered(BASELINE, Duration::from_secs(5));

    // Cloud-a goes dark.
    let fault = d.now();
    let t0 = Instant::now();
    World::blackhole_a(&w.topo).unwrap();
    let mut buf = [0u8; 4096];
    let err = loop {
        match stream.read(&mut buf) {
            Ok(0) => panic!("stream closed cleanly instead of reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let reset_after = t0.elapsed();
    w.agent
        .wait_serving("chat", &["b1", "b2"], Duration::from_secs(5))
        .unwrap();
    let marked_after = t0.elapsed();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "the stream is reset, not left hanging: {err}"
    );
    println!(
        "blackhole: stream reset {reset_after:?} after the fault (agent decision seen by {marked_after:?})"
    );
    assert!(
        reset_after < Duration::from_secs(1),
        "reset after {reset_after:?}"
    );
    wait_for("200 answers from cloud-b", Duration::from_secs(5), || {
        d.answered(|s| s.at >= fault && s.backend.starts_with('b')) >= 200
    });

    // Cloud-a comes back.
    let restored = d.now();
    let decisions_before = w.agent.decisions().len();
    World::restore_a(&w.topo).unwrap();
    w.agent
        .wait_serving("chat", &["a1", "a2"], Duration::from_secs(5))
        .unwrap();
    // Watch for flapping: the sleep is the observation window.
    std::thread::sleep(Duration::from_millis(1500));
    let samples = d.stop();

    let before_restore: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at < restored)
        .cloned()
        .collect();
    let (rto, failed) = recovery(&before_restore, fault, 20);
    println!(
        "blackhole: failover time {rto:?}, {failed} failed; served after the fault {:?}",
        by_backend(&before_restore[before_restore.iter().position(|s| s.at >= fault).unwrap()..])
    );
    let rto = rto.expect("recovered onto cloud-b");
    assert!(rto < Duration::from_secs(2), "failover took {rto:?}");
    assert!(
        before_restore
            .iter()
            .filter(|s| s.at >= fault + rto)
            .all(|s| s.ok && s.backend.starts_with('b')),
        "after failover, cloud-b serves everything"
    );

    // Recovery: back to cloud-a only after the rise threshold (two probes
    // 100 ms apart), with no failed request and no flapping.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= restored).collect();
    let first_a = after
        .iter()
        .find(|s| s.backend.starts_with('a'))
        .expect("cloud-a serves again");
    println!(
        "recovery: first request on cloud-a {:?} after the link came back; {} failed: {:?}",
        first_a.at - restored,
        after.iter().filter(|s| !s.ok).count(),
        after
            .iter()
            .filter(|s| !s.ok)
            .map(|s| s.at - restored)
            .collect::<Vec<_>>()
    );
    let changes: Vec<_> = w.agent.decisions()[decisions_before..]
        .iter()
        .filter(|d| d.service == "chat")
        .cloned()
        .collect();
    // Cloud-a took traffic only through decisions made on the rise
    // threshold (two consecutive probe successes); a1 and a2 may rise in
    // one apply or two, and the ring never goes back to cloud-b.
    assert!(
        (1..=2).contains(&changes.len())
            && changes.iter().all(|d| {
                d.to.iter().all(|b| b.starts_with('a'))
                    && d.reason.contains("2 consecutive successes")
            }),
        "no flapping, rise threshold met: {changes:#?}"
    );
    let failed_back = after.iter().filter(|s| !s.ok).count();
    assert!(
        failed_back * 100 <= after.len(),
        "{failed_back} of {} failed on the way back",
        after.len()
    );
    // Once cloud-a is back (300 ms for both backends to rise), cloud-b
    // answers almost nothing. Not zero: on 2 loaded cores a passive
    // ejection ("SYNs unanswered past the 50 ms floor") can briefly move a
    // few new flows (1-2% seen here; an open issue); the ring decisions
    // above show the rings never flap back.
    let settled = first_a.at + Duration::from_millis(300);
    let late: Vec<&Sample> = after
        .iter()
        .copied()
        .filter(|s| s.at >= settled && s.ok)
        .collect();
    let on_b = late.iter().filter(|s| !s.backend.starts_with('a')).count();
    eprintln!(
        "after cloud-a's return: {on_b} of {} answers from cloud-b",
        late.len()
    );
    assert!(
        on_b * 100 <= late.len() * 5,
        "cloud-b served {on_b} of {} requests after cloud-a came back",
        late.len()
    );
}

#[test]
fn an_eu_only_service_fails_closed_and_never_reaches_the_us() {
    let _s = serial();
    let mut w = World::start(true, ProbeTiming::default()).unwrap();
    w.agent
        .wait_serving("eu-only", &["a1-eu"], Duration::from_secs(10))
        .unwrap();
    let eu = SocketAddr::from((VIP, EU_PORT));
    {
        let _in = w.topo.client.enter().unwrap();
        for _ in 0..20 {
            let a = client::get(eu, PATH, Duration::from_secs(2)).unwrap();
            assert_eq!((a.status, a.backend.as_str()), (200, "a1-eu"));
        }
    }
    assert_eq!(served(&w, "a1-eu"), 20);
    World::crash(&w.topo, "a1-eu").unwrap();
    let d = w
        .agent
        .wait_serving("eu-only", &[], Duration::from_secs(5))
        .unwrap();
    println!("eu-only decision: {d:?}");
    {
        let _in = w.topo.client.enter().unwrap();
        for i in 0..50 {
            let t = Instant::now();
            let r = client::get(eu, PATH, Duration::from_secs(2));
            let took = t.elapsed();
            assert!(r.is_err(), "request {i} answered: {r:?}");
            assert!(
                took < Duration::from_millis(500),
                "request {i} failed slowly ({took:?}): {r:?}"
            );
        }
    }
    // The US backend of the pool never saw a client request, though it is
    // healthy and listed.
    assert_eq!(served(&w, "b1-us"), 0);
}

#[test]
fn an_agent_restart_under_load_fails_no_request() {
    let _s = serial();
    let mut w = World::start(false, ProbeTiming::default()).unwrap();
    let d = Driver::start(
        &w.topo.client.name,
        vip(),
        PATH,
        Duration::from_millis(1),
        Duration::from_millis(1000),
        Duration::from_secs(30),
    );
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

    let d = Driver::start(
        &w.topo.client.name,
        vip(),
        PATH,
        Duration::from_millis(1),
        Duration::from_millis(1000),
        Duration::from_secs(30),
    );
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
