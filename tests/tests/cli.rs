//! The `failover-agent` CLI binary: its operator commands against a
//! running agent (tables, JSON, refusals, not root, colour on a terminal,
//! no agent on the socket), and its completions and help.
//!
//! Needs root (but for completions and help): run through `cargo xtask
//! test`. The agent runs in this process, on a Lab (a namespace and a pin
//! directory, removed on drop); the CLI is the built binary.

use std::path::Path;

use failover_agent::api::Client;
use failover_tests::{
    agentcli::{BACKENDS_HEADER, aligned_table, cli, cli_as, op},
    configs,
    lab::{CLIENT, Lab, VIP, backend_addr},
    netns::require_root,
    packet::Frame,
    scratch::TempDir,
    webagent::{at, config, listeners, start, wait_status},
};
use serde_json::json;

fn backend_json<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v.as_array()
        .expect("a list of backends")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v:#}"))
}

#[tokio::test]
async fn the_cli_binary_against_a_running_agent() {
    require_root();
    let lab = Lab::new().unwrap();
    let dir = TempDir::new();
    let (l1, l2, l3) = listeners().await;
    // Backends the program can forward to (static neighbours on va0), so
    // flows land in the table; the probes reach the loopback listeners
    // through a DNAT of the namespace's own output. Passive ejection is
    // off: the program's SYNs get no answer.
    lab.ns
        .exec(&format!(
            "nft add table ip cli && \
             nft add chain ip cli out '{{ type nat hook output priority -100; }}' && \
             nft add rule ip cli out ip daddr {{ {}, {}, {} }} dnat to 127.0.0.1",
            backend_addr(1),
            backend_addr(2),
            backend_addr(3)
        ))
        .unwrap();
    let backends = vec![
        at("b1", backend_addr(1), &l1, 0),
        at("b2", backend_addr(2), &l2, 0),
        at("b3", backend_addr(3), &l3, 1),
    ];
    let probe = configs::fast_tcp_probe_with(json!({"passive": false}));
    let agent = start(&dir, &config(&lab, &dir, backends, probe), false).await;
    let sock = dir.0.join("agent.sock");
    let c = Client::new(&sock);
    let s = wait_status(&c, "all healthy", |s| {
        s.services[0].healthy == 3 && s.services[0].serving == ["b1", "b2"]
    })
    .await;
    let generation = s.services[0].generation;

    // Flows on both tier-0 backends (BPF_PROG_TEST_RUN through the program).
    let mut port = 30_000u16;
    let flows_of = |bs: &[failover_agent::api::BackendInfo], n: &str| {
        bs.iter().find(|b| b.name == n).map_or(0, |b| b.flows)
    };
    let (f1, f2) = loop {
        for _ in 0..4 {
            port += 1;
            let _ = lab
                .run(lab.vc0, &Frame::tcp(CLIENT, port, VIP, 80).build())
                .unwrap();
        }
        let bs = c.backends().await.unwrap();
        let (f1, f2) = (flows_of(&bs, "b1"), flows_of(&bs, "b2"));
        if f1 > 0 && f2 > 0 {
            break (f1, f2);
        }
        assert!(port < 30_200, "no flows on b1 and b2: {bs:?}");
    };
    let sock = sock.as_path();
    status_output(sock, &dir.0.join("failover.yaml"), generation).await;
    backends_output(sock, [l1.port, l2.port, l3.port], f1, f2).await;
    flows_output(sock, f1, f2).await;
    drain_output(sock, f1).await;
    failover_output(sock, &c).await;
    not_root(sock).await;
    colour_on_a_terminal(sock).await;

    agent.stop().await;
    drop((l1, l2, l3));
    no_agent_on(sock).await;
}

/// `status`, as JSON and as a table.
async fn status_output(sock: &Path, config_path: &Path, generation: u64) {
    // status --json
    let v = op(sock, &["status", "--json"]).await.ok().json();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(v["node"], host.trim(), "{v:#}");
    assert_eq!(v["program_attached"], true, "{v:#}");
    assert_eq!(v["config_generation"], 1, "{v:#}");
    assert_eq!(v["config_path"], config_path.display().to_string());
    assert_eq!(v["interfaces"], serde_json::json!(["vc0", "va0"]));
    let svcs = v["services"].as_array().unwrap();
    assert_eq!(svcs.len(), 1, "{v:#}");
    let web = &svcs[0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["endpoint"], format!("{VIP}:80/tcp"));
    assert_eq!(web["active_tier"], 0);
    assert_eq!(
        (web["healthy"].as_u64(), web["backends"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(web["serving"], serde_json::json!(["b1", "b2"]));
    assert_eq!(web["generation"], generation);
    assert!(web["override"].is_null(), "{web:#}");

    // status: a line about the node, a blank line, an aligned table.
    let out = op(sock, &["status"]).await.ok();
    assert_eq!(out.stderr, "");
    let (first, table) = out.stdout.split_once("\n\n").expect("node line, table");
    assert_eq!(
        first,
        format!(
            "node {}  interfaces vc0,va0  program attached  config generation 1 ({})",
            host.trim(),
            config_path.display()
        )
    );
    let rows = aligned_table(
        table,
        &[
            "SERVICE", "ENDPOINT", "TIER", "HEALTHY", "GEN", "OVERRIDE", "SERVING",
        ],
    );
    assert_eq!(
        rows,
        [[
            "web".to_owned(),
            format!("{VIP}:80/tcp"),
            "0".into(),
            "3/3".into(),
            generation.to_string(),
            "-".into(),
            "b1,b2".into()
        ]]
    );
}

/// `backends`, as JSON and as an aligned table: the listeners at `ports`
/// hold `f1` and `f2` flows.
async fn backends_output(sock: &Path, ports: [u16; 3], f1: usize, f2: usize) {
    // backends --json
    let v = op(sock, &["backends", "--json"]).await.ok().json();
    assert_eq!(v.as_array().map(Vec::len), Some(3), "{v:#}");
    for (name, tier, flows, port) in [
        ("b1", 0, f1, ports[0]),
        ("b2", 0, f2, ports[1]),
        ("b3", 1, 0, ports[2]),
    ] {
        let i = name[1..].parse().unwrap();
        let b = backend_json(&v, name);
        assert_eq!(b["state"], "up", "{b:#}");
        assert_eq!(b["health"], "up", "{b:#}");
        assert_eq!(b["tier"], tier, "{b:#}");
        assert_eq!(b["weight"], 100, "{b:#}");
        assert_eq!(b["draining"], false, "{b:#}");
        assert_eq!(b["flows"], flows, "{b:#}");
        assert_eq!(b["address"], format!("{}:{port}", backend_addr(i)), "{b:#}");
        assert_eq!(b["services"], serde_json::json!(["web"]), "{b:#}");
    }

    // backends: aligned, no colour on a pipe.
    let out = op(sock, &["backends"]).await.ok();
    let rows = aligned_table(&out.stdout, &BACKENDS_HEADER);
    let col = |r: &Vec<String>, i: usize| r[i].clone();
    assert_eq!(
        rows.iter()
            .map(|r| (
                col(r, 0),
                col(r, 2),
                col(r, 5),
                col(r, 6),
                col(r, 7),
                col(r, 8),
                col(r, 12)
            ))
            .collect::<Vec<_>>(),
        [
            ("b1", "up", "up", "-", "0", "100", f1.to_string()),
            ("b2", "up", "up", "-", "0", "100", f2.to_string()),
            ("b3", "up", "up", "-", "1", "100", "0".to_owned()),
        ]
        .map(|(a, b, c, g, d, e, f)| {
            (
                a.into(),
                b.into(),
                c.into(),
                g.into(),
                d.into(),
                e.into(),
                f,
            )
        })
    );
}

/// `flows`: all of them, one backend's, a limit, an unknown service.
async fn flows_output(sock: &Path, f1: usize, f2: usize) {
    // flows --json, all of them and one backend's.
    let v = op(sock, &["flows", "--json", "--limit", "1000"])
        .await
        .ok()
        .json();
    assert_eq!(v["total"], f1 + f2, "{v:#}");
    let flows = v["flows"].as_array().unwrap();
    assert_eq!(flows.len(), f1 + f2);
    for f in flows {
        assert_eq!(f["service"], "web", "{f:#}");
        assert_eq!(f["vip"], format!("{VIP}:80"), "{f:#}");
        assert_eq!(f["protocol"], "tcp", "{f:#}");
        assert!(
            f["client"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{CLIENT}:")),
            "{f:#}"
        );
        assert!(f["backend"] == "b1" || f["backend"] == "b2", "{f:#}");
    }
    let v = op(sock, &["flows", "--backend", "b1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(v["total"], f1, "{v:#}");
    assert!(
        v["flows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["backend"] == "b1"),
        "{v:#}"
    );
    let out = op(sock, &["flows", "--limit", "1"]).await.ok();
    let (table, tail) = out.stdout.rsplit_once('\n').map_or(("", ""), |x| x);
    assert_eq!(tail, "", "ends with a newline");
    let (table, last) = table.rsplit_once('\n').unwrap();
    assert_eq!(last, format!("1 of {} flows", f1 + f2));
    let rows = aligned_table(
        table,
        &[
            "CLIENT", "VIP", "PROTO", "SERVICE", "BACKEND", "NAT PORT", "AGE",
        ],
    );
    assert_eq!(rows.len(), 1, "{}", out.stdout);
    let out = op(sock, &["flows", "--service", "nope"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stderr, "no service named \"nope\"\n");
}

/// `drain` and `undrain`, and a refused drain.
async fn drain_output(sock: &Path, f1: usize) {
    // drain, undrain: the flows still on the backend are printed.
    let out = op(sock, &["drain", "b1"]).await.ok();
    assert_eq!(
        out.stdout,
        format!("b1: draining; {f1} flows still on it\n")
    );
    let v = op(sock, &["backends", "--json"]).await.ok().json();
    let b1 = backend_json(&v, "b1");
    assert_eq!(
        (&b1["state"], &b1["draining"]),
        (&"draining".into(), &true.into())
    );
    let v = op(sock, &["status", "--json"]).await.ok().json();
    // b2 alone is short of the overprovisioned capacity: tier 1 spills in.
    assert_eq!(v["services"][0]["serving"], serde_json::json!(["b2", "b3"]));
    let out = op(sock, &["drain", "b1"]).await.ok();
    assert_eq!(
        out.stdout,
        format!("b1: draining (already); {f1} flows still on it\n")
    );
    let out = op(sock, &["undrain", "b1"]).await.ok();
    assert_eq!(
        out.stdout,
        format!("b1: taking new flows; {f1} flows still on it\n")
    );
    let v = op(sock, &["drain", "b3", "--json"]).await.ok().json();
    assert_eq!(
        v,
        serde_json::json!({"backend": "b3", "draining": true, "changed": true, "in_flight_flows": 0, "forced": false})
    );
    let out = op(sock, &["undrain", "b3"]).await.ok();
    assert_eq!(out.stdout, "b3: taking new flows; 0 flows still on it\n");
    let v = op(sock, &["status", "--json"]).await.ok().json();
    assert_eq!(v["services"][0]["serving"], serde_json::json!(["b1", "b2"]));

    // A refused drain: status 1, why on stderr, nothing on stdout.
    let out = op(sock, &["drain", "b9"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("", "no backend named \"b9\"\n")
    );
    let out = op(sock, &["drain", "b9", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.json(),
        serde_json::json!({"ok": false, "error": "no backend named \"b9\""})
    );
}

/// `failover`: a manual one that ends by itself, and refused ones.
async fn failover_output(sock: &Path, c: &Client) {
    // A manual failover, visible in status, ending by itself.
    let before = c.status().await.unwrap().services[0].generation;
    let out = op(
        sock,
        &[
            "failover",
            "--service",
            "web",
            "--to-tier",
            "1",
            "--for",
            "2s",
        ],
    )
    .await
    .ok();
    assert!(
        out.stdout
            .starts_with("web: forced to tier 1 for 2s (generation "),
        "{out:#?}"
    );
    assert!(out.stdout.ends_with(", serving b3)\n"), "{out:#?}");
    let v = op(sock, &["status", "--json"]).await.ok().json();
    let web = &v["services"][0];
    assert_eq!(web["override"]["tier"], 1, "{v:#}");
    let left = web["override"]["expires_in_s"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 2.0, "{left}");
    assert_eq!(web["serving"], serde_json::json!(["b3"]), "{v:#}");
    assert_eq!(web["active_tier"], 1, "{v:#}");
    let after = web["generation"].as_u64().unwrap();
    assert!(after > before, "{before} -> {after}");
    let out = op(sock, &["status"]).await.ok();
    let (_, table) = out.stdout.split_once("\n\n").unwrap();
    let rows = aligned_table(
        table,
        &[
            "SERVICE", "ENDPOINT", "TIER", "HEALTHY", "GEN", "OVERRIDE", "SERVING",
        ],
    );
    assert!(rows[0][5].starts_with("tier 1 ("), "{rows:?}");
    assert_eq!((rows[0][2].as_str(), rows[0][6].as_str()), ("1", "b3"));

    // Towards a tier with no backend: refused, with the reason.
    let out = op(
        sock,
        &[
            "failover",
            "--service",
            "web",
            "--to-tier",
            "5",
            "--for",
            "1m",
        ],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr, "service \"web\" has no backend in tier 5 (its pool's tiers: 0, 1)\n",
        "{out:#?}"
    );
    assert_eq!(c.status().await.unwrap().services[0].generation, after);
    let out = op(
        sock,
        &[
            "failover",
            "--service",
            "web",
            "--to-tier",
            "1",
            "--for",
            "25h",
        ],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("out of range"), "{out:#?}");
    wait_status(c, "override over", |s| {
        s.services[0].override_.is_none() && s.services[0].serving == ["b1", "b2"]
    })
    .await;
}

async fn not_root(sock: &Path) {
    // Not root: told so, not that no agent runs.
    let out = cli_as(
        &["status", "--socket", sock.to_str().unwrap()],
        Some(65_534),
    )
    .await
    .expect("run the CLI as uid 65534");
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr,
        format!(
            "permission denied on {}: the control socket is for root only (run this as root)\n",
            sock.display()
        )
    );
}

async fn colour_on_a_terminal(sock: &Path) {
    // On a terminal: state words coloured, columns still aligned.
    let out = tokio::process::Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} backends --socket {}",
            failover_tests::topology::sibling_bin("failover-agent")
                .unwrap()
                .display(),
            sock.display()
        ))
        .arg("/dev/null")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    // `script` (util-linux) is part of every Debian system: no skipping.
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8(out.stdout).unwrap().replace("\r\n", "\n");
            // Green (xterm colour 2), as comfy-table writes it.
            assert!(text.contains("\x1b[38;5;2mup"), "{text:?}");
            let plain = strip_colours(&text);
            let rows = aligned_table(&plain, &BACKENDS_HEADER);
            assert_eq!(rows.len(), 3, "{plain}");
        }
        other => panic!("`script` could not run the CLI on a terminal: {other:?}"),
    }
}

/// `text` without its SGR escape sequences (`ESC [ ... m`).
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\x1b[") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match rest.find('m') {
            Some(end) => rest = &rest[end + 1..],
            None => break,
        }
    }
    out.push_str(rest);
    out
}

async fn no_agent_on(sock: &Path) {
    // No agent on the socket: status 1 and a plain sentence, nothing else.
    let gone = format!(
        "no agent is listening on {} (is `failover-agent run` running?)",
        sock.display()
    );
    assert!(!sock.exists());
    let out = op(sock, &["status"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.clone()),
        ("", format!("{gone}\n"))
    );
    let out = op(sock, &["backends", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.json(), serde_json::json!({"ok": false, "error": gone}));
    // A socket file a dead agent left behind: the same.
    drop(std::os::unix::net::UnixListener::bind(sock).unwrap());
    assert!(sock.exists());
    let out = op(sock, &["drain", "b1"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stderr, format!("{gone}\n"));
}

/// Completions and help need no agent (and no root).
#[tokio::test]
async fn completions_and_help_of_the_cli_binary() {
    let dir = TempDir::new();
    let subcommands = [
        "run",
        "validate",
        "detach",
        "audit",
        "status",
        "backends",
        "flows",
        "drain",
        "undrain",
        "failover",
        "drill",
        "completions",
    ];
    let out = cli(&["completions", "bash"]).await.ok();
    assert!(
        out.stdout.contains("complete -F _failover__agent"),
        "{}",
        out.stdout
    );
    // The top level offers every subcommand.
    let top = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("opts=\"-h -V"))
        .expect("top-level options");
    for sub in subcommands {
        assert!(
            top.split(['"', ' ']).any(|w| w == sub),
            "{sub} not offered: {top}"
        );
    }
    // And bash completes a subcommand's options (a hyphen in the binary's
    // name used to break that).
    let script = dir.0.join("completions.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    for (words, want) in [
        ("drain --", "--socket"),
        ("failover --service web --t", "--to-tier"),
        ("audit verify --", "--json"),
    ] {
        let n = words.split(' ').count();
        let cur = words.rsplit(' ').next().unwrap();
        let prev = words
            .split(' ')
            .nth(n.wrapping_sub(2))
            .unwrap_or("failover-agent");
        let run = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(failover-agent {words}); COMP_CWORD={n}; \
                 _failover__agent failover-agent '{cur}' '{prev}'; echo \"${{COMPREPLY[*]}}\"",
                script.display()
            ))
            .output()
            .await
            .unwrap();
        let offered = String::from_utf8(run.stdout).unwrap();
        assert!(
            offered.split_whitespace().any(|w| w == want),
            "`failover-agent {words}<TAB>` offers {offered:?}, not {want} ({})",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    for sub in subcommands {
        let out = cli(&[sub, "--help"]).await.ok();
        assert!(
            out.stdout.contains(&format!("Usage: failover-agent {sub}")),
            "{out:#?}"
        );
    }
    let out = cli(&["audit", "verify", "--help"]).await.ok();
    assert!(
        out.stdout.contains("Usage: failover-agent audit verify"),
        "{out:#?}"
    );
}
