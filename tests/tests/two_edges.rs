//! Two edge nodes with the same config send the same client tuple to the
//! same backend (issue 4): real packets through the real XDP program on
//! two edges (`twoedge.rs`), each programmed by its own agent process.
//!
//! The agents are started at different times, and the second one's config
//! lists services, backends and pools in reverse order, so a fresh agent
//! hands out different data-plane ids on each edge: the test checks that
//! the ids differ, that the rings still name the same backend in every
//! slot, and that for each of many client tuples, sent once through each
//! edge, the same backend answered, as the ring and the flow hash predict.
//!
//! Needs root: run through `cargo xtask test` (which builds the agent
//! binary first). One test in this binary, so that no other test of this
//! process owns namespaces while the last check looks for leftovers.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use failover_agent::dataplane::Dataplane;
use failover_common::{MAX_BACKENDS, NO_BACKEND, hash::flow_hash, state};
use failover_tests::{
    agentproc::{AgentProc, Scratch},
    client, configs,
    netns::{self, require_root},
    twoedge::{BACKENDS, CLIENT, SERVICES, TwoEdges, VIP, config},
};

const SEED: u32 = 0x5eed;
const PATH: &str = "/v1/models";
/// Client source ports: this many distinct tuples per service, from here.
const TUPLES: [(u16, u16); 2] = [(40_000, 200), (41_000, 100)];

/// Backend name by data-plane id, from edge `dp`'s `BACKENDS` map.
fn names_by_id(dp: &Dataplane) -> BTreeMap<u32, &'static str> {
    let mut out = BTreeMap::new();
    for id in 0..MAX_BACKENDS {
        let b = dp.backend(id).unwrap();
        if b.state == state::UNUSED {
            continue;
        }
        let addr = Ipv4Addr::from(u32::from_be(b.addr_be));
        let (name, ..) = BACKENDS
            .iter()
            .find(|x| x.3 == addr)
            .unwrap_or_else(|| panic!("unknown backend {addr} at id {id}"));
        out.insert(id, *name);
    }
    out
}

/// Service id, active ring (as backend names) and generation of the
/// service on `port`, from edge `dp`'s maps.
fn ring_of(
    dp: &Dataplane,
    port: u16,
    names: &BTreeMap<u32, &'static str>,
) -> (u32, Vec<&'static str>, u64) {
    let (_, svc) = dp
        .services()
        .unwrap()
        .into_iter()
        .find(|(k, _)| u16::from_be(k.port_be) == port && k.proto == 6)
        .unwrap_or_else(|| panic!("no service on port {port}"));
    let ring = dp.ring(svc.id, svc.active_slot).unwrap();
    let slots = ring.backends[..svc.ring_size as usize]
        .iter()
        .map(|id| {
            assert_ne!(*id, NO_BACKEND, "empty slot in the ring of port {port}");
            names[id]
        })
        .collect();
    (svc.id, slots, svc.generation)
}

/// The backend the data plane must pick for the client tuple: the ring
/// slot at the flow hash (every backend is UP, so no probing past it).
fn predicted(ring: &[&'static str], sport: u16, dport: u16) -> &'static str {
    // As the XDP program reads them: network order, read natively.
    let h = flow_hash(
        u32::from_ne_bytes(CLIENT.octets()),
        u32::from_ne_bytes(VIP.octets()),
        u16::from_ne_bytes(sport.to_be_bytes()),
        u16::from_ne_bytes(dport.to_be_bytes()),
        6,
        SEED,
    );
    ring[(h % ring.len() as u32) as usize]
}

fn count<'a>(it: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, usize> {
    let mut m = BTreeMap::new();
    for n in it {
        *m.entry(n).or_insert(0) += 1;
    }
    m
}

/// What the run created, to check afterwards that none of it is left.
#[derive(Default)]
struct Created {
    pins: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    pids: Vec<u32>,
}

fn run(created: &mut Created) {
    let mut topo = TwoEdges::new().unwrap();
    created
        .pins
        .extend(topo.edges.iter().map(|e| e.pins.0.clone()));
    for (name, _, in_b, addr) in BACKENDS {
        topo.start_backend(name, in_b, addr).unwrap();
    }
    created
        .pids
        .extend(topo.backends.iter().map(|(_, p)| p.0.id()));
    let dps = [
        topo.attach_peer_pass(0).unwrap(),
        topo.attach_peer_pass(1).unwrap(),
    ];
    let mut scratch = Vec::new();
    let mut agents: Vec<AgentProc> = Vec::new();
    for i in 0..2 {
        let s = Scratch::new(&format!("twoedge{}", i + 1)).unwrap();
        created.dirs.push(s.0.clone());
        let yaml = configs::to_yaml(&config(
            i,
            &topo.edges[i].pins.0,
            &s.0.join("api.sock"),
            i == 1,
        ));
        let mut agent =
            AgentProc::start_with_config(&topo.edges[i].edge.name, &s.0, &yaml).unwrap();
        created.pids.extend(agent.pid());
        // The second agent starts only once the first one serves: a
        // different time, a different probe history.
        for (svc, _, pool) in SERVICES {
            agent
                .wait_serving(svc, pool, Duration::from_secs(20))
                .unwrap();
        }
        println!("edge {}: agent started, serving every backend", i + 1);
        scratch.push(s);
        agents.push(agent);
    }
    let decisions_before: Vec<usize> = agents.iter().map(|a| a.decisions().len()).collect();

    // The ids differ between the edges, the rings do not.
    let names = [names_by_id(&dps[0]), names_by_id(&dps[1])];
    println!("backend ids: edge 1 {:?}, edge 2 {:?}", names[0], names[1]);
    assert_eq!(
        names[0].values().collect::<std::collections::BTreeSet<_>>(),
        names[1].values().collect(),
        "both edges hold the same backends"
    );
    assert_ne!(
        names[0], names[1],
        "the reversed config gave the second edge different backend ids"
    );
    let mut rings = Vec::new();
    for (svc, port, pool) in SERVICES {
        let (id1, r1, g1) = ring_of(&dps[0], port, &names[0]);
        let (id2, r2, g2) = ring_of(&dps[1], port, &names[1]);
        let differ = r1.iter().zip(&r2).filter(|(a, b)| a != b).count();
        let shares = count(r1.iter().copied());
        println!(
            "{svc}: service id {id1} / {id2}, generation {g1} / {g2}, {} slots, {differ} differ; slots per backend {shares:?}",
            r1.len()
        );
        assert_eq!(r1.len(), r2.len());
        assert_eq!(differ, 0, "{svc}: the rings name different backends");
        assert_eq!(
            shares.keys().copied().collect::<Vec<_>>(),
            {
                let mut p = pool.to_vec();
                p.sort_unstable();
                p
            },
            "{svc}: every backend of the pool is in the ring"
        );
        rings.push(r1);
    }

    // The same client tuples through edge 1, then through edge 2.
    let mut seen: [BTreeMap<(u16, u16), String>; 2] = Default::default();
    for (i, e) in topo.edges.iter().enumerate() {
        let _in = e.client.enter().unwrap();
        for ((_, port, _), (first, n)) in SERVICES.iter().zip(TUPLES) {
            let vip = SocketAddr::from((VIP, *port));
            for sport in first..first + n {
                let src = SocketAddrV4::new(CLIENT, sport);
                let a = client::get_from(src, vip, PATH, Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("edge {}: {src} -> {vip}: {e:#}", i + 1));
                assert_eq!(a.status, 200, "edge {}: {src} -> {vip}", i + 1);
                seen[i].insert((*port, sport), a.backend);
            }
        }
    }
    for (i, a) in agents.iter_mut().enumerate() {
        a.check_alive().unwrap();
        assert_eq!(
            a.decisions().len(),
            decisions_before[i],
            "edge {}: a ring changed while the tuples were sent",
            i + 1
        );
    }

    let mut total = 0;
    for (((svc, port, pool), (_, n)), ring) in SERVICES.iter().zip(TUPLES).zip(&rings) {
        let mut same = 0;
        let mut mismatches = Vec::new();
        for ((p, sport), b1) in seen[0].iter().filter(|((p, _), _)| p == port) {
            let b2 = &seen[1][&(*p, *sport)];
            let want = predicted(ring, *sport, *port);
            if b1 == b2 && b1 == want {
                same += 1;
            } else {
                mismatches.push((*sport, b1.clone(), b2.clone(), want));
            }
        }
        let spread = count(
            seen[0]
                .iter()
                .filter(|((p, _), _)| p == port)
                .map(|(_, b)| b.as_str()),
        );
        println!(
            "{svc}: {same} of {n} client tuples answered by the same backend through both edges, as predicted; spread {spread:?}"
        );
        assert!(
            mismatches.is_empty(),
            "{svc}: (source port, edge 1, edge 2, predicted): {mismatches:?}"
        );
        assert_eq!(same, usize::from(n));
        // Spread over the pool, so that a test of "same backend" can fail.
        assert_eq!(spread.len(), pool.len(), "{svc}: spread {spread:?}");
        total += same;
    }
    println!("{total} client tuples, each through both edges: the same backend every time");
}

#[test]
fn two_edges_with_the_same_config_send_each_client_tuple_to_the_same_backend() {
    require_root();
    let mut created = Created::default();
    run(&mut created);
    // Everything the run made is gone: namespaces, pins, scratch
    // directories, agent and backend processes.
    assert!(netns::none_left(), "a namespace was left behind");
    for p in created.pins.iter().chain(&created.dirs) {
        assert!(!p.exists(), "{} was left behind", p.display());
    }
    assert_eq!(created.pids.len(), BACKENDS.len() + 2);
    for pid in &created.pids {
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "process {pid} was left running"
        );
    }
    println!(
        "nothing left behind: no namespace of this process, {} pin paths, {} scratch directories, {} processes checked",
        created.pins.len(),
        created.dirs.len(),
        created.pids.len()
    );
}
