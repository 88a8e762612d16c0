//! The project's commands: `cargo xtask setup | build | test | demo | bench`.
//!
//! Every machine starts bare, so `setup` installs everything the others
//! need, idempotently, and `test`, `demo` and `bench` call it first.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "failover's build, test, demo and bench commands"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchain pieces and system packages (idempotent).
    Setup,
    /// Build the agent (and the XDP object it embeds) in release mode.
    Build,
    /// Format and lint checks, then every test, including the privileged
    /// kernel tests (needs root).
    Test,
    /// Run the product end to end on this machine.
    Demo {
        /// Leave the demo running for exploration.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks; arguments go to the benchmark (e.g. `datapath --json`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages: LLVM 22 to build bpf-linker against (it must match the
/// nightly's LLVM), iproute2 for namespaces, and the comparison peers.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "ethtool",
    "nftables",
    "haproxy",
    "wrk",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    let args = Args::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.cmd {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            run(Command::new("cargo").args(["build", "--release", "-p", "failover-agent"]))
        }
        Cmd::Test => test(),
        Cmd::Demo { keep } => demo(keep),
        Cmd::Bench { args } => bench(&args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let status = cmd.status().with_context(|| format!("spawn {shown}"))?;
    ensure!(status.success(), "{shown} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn require_root(what: &str) -> Result<()> {
    let uid = output(Command::new("id").arg("-u"));
    if uid.trim() != "0" {
        bail!("{what} needs root (BPF, XDP and network namespaces); run it as root");
    }
    Ok(())
}

fn setup() -> Result<()> {
    require_root("setup")?;
    // System packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let s = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]));
            !s.contains("install ok installed")
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // The nightly's standard library sources (the eBPF crate builds core).
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker, built against Debian's LLVM 22 (no prebuilt download).
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--locked"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    // Offline Kubernetes schema validation and a YAML linter for deploy/.
    for (tool, package) in [
        ("kubernetes-validate", "kubernetes-validate"),
        ("yamllint", "yamllint"),
    ] {
        if !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            run(Command::new("python3").args(["-m", "pip", "install", "-q", package]))?;
        }
    }
    // bpffs for pinned maps and links.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    eprintln!("setup: ready");
    Ok(())
}

fn test() -> Result<()> {
    require_root("the test suite")?;
    setup()?;
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    // The end-to-end tests run the agent binary from beside the test
    // executables.
    run(Command::new("cargo").args(["build", "-p", "failover-agent"]))?;
    run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate only builds for the BPF target, with nightly.
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "failover-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    deploy_checks()?;
    remove_stale();
    let before = test_objects();
    let (passed, failed) = cargo_test()?;
    leftovers(&before)?;
    // The plain closing line CI reads, summed over every test binary.
    println!("{passed} passed, {failed} failed");
    ensure!(
        failed == 0 && passed > 0,
        "{failed} failed, {passed} passed"
    );
    Ok(())
}

/// Every Kubernetes manifest against the schemas of a current release
/// (offline), and a YAML lint of deploy/.
fn deploy_checks() -> Result<()> {
    // Not core resources: kustomize's own file and Prometheus-operator CRDs.
    const NOT_CORE: &[&str] = &[
        "kustomization.yaml",
        "podmonitor.yaml",
        "prometheusrule.yaml",
    ];
    let mut manifests: Vec<String> = std::fs::read_dir("deploy/kubernetes")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !NOT_CORE.iter().any(|n| p.ends_with(n)))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    manifests.sort();
    ensure!(
        !manifests.is_empty(),
        "no manifests under deploy/kubernetes"
    );
    run(Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&manifests))?;
    run(Command::new("yamllint").args([
        "--strict",
        "-d",
        "{extends: relaxed, rules: {line-length: {max: 140}}}",
        "deploy",
    ]))
}

/// Runs `cargo test`, echoing its output, and sums the per-binary results.
fn cargo_test() -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ cargo test --no-fail-fast");
    let mut child = Command::new("cargo")
        .args(["test", "--no-fail-fast"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match label {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "cargo test failed: {status}");
    Ok((passed, failed))
}

/// Namespaces and pins that tests create: `fo-<tag>-<pid>-<n>` and
/// `failover-test-[e2e-]<pid>-<n>`, with the pid of the test process.
fn test_objects() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for (dir, prefix) in [("/run/netns", "fo-"), ("/sys/fs/bpf", "failover-test-")] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(prefix) {
                continue;
            }
            // The pid is the second-to-last dash-separated field.
            let pid = name
                .rsplit('-')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            out.push((format!("{dir}/{name}"), pid));
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what test processes that no longer exist left behind (a run
/// killed mid-way cannot run its guards), so one bad run cannot fail the
/// next one's leftover check.
fn remove_stale() {
    for (path, pid) in test_objects() {
        if pid == 0 || alive(pid) {
            continue;
        }
        eprintln!("removing stale {path} (process {pid} is gone)");
        if let Some(ns) = path.strip_prefix("/run/netns/") {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        } else {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Tests own their namespaces and pins through guards; check that none
/// of this run's survived, failing test or not. (Objects of test processes
/// still running belong to someone else's run on a shared machine.)
fn leftovers(before: &[(String, u32)]) -> Result<()> {
    let left: Vec<String> = test_objects()
        .into_iter()
        .filter(|(path, pid)| !alive(*pid) && !before.iter().any(|(p, _)| p == path))
        .map(|(path, _)| path)
        .collect();
    ensure!(left.is_empty(), "tests left these behind: {left:?}");
    eprintln!("test: no namespace or pinned object left behind");
    Ok(())
}

fn demo(keep: bool) -> Result<()> {
    require_root("the demo")?;
    setup()?;
    // The demo starts the agent and the test backend from beside itself.
    run(Command::new("cargo").args(["build", "--quiet", "--release", "-p", "failover-agent"]))?;
    run(Command::new("cargo")
        .args(["build", "--quiet", "--release", "-p", "failover-tests"])
        .args(["--bin", "failover-testbackend", "--bin", "failover-demo"]))?;
    let mut cmd = Command::new("cargo");
    cmd.args(["run", "--quiet", "--release", "-p", "failover-tests"])
        .args(["--bin", "failover-demo", "--"]);
    if keep {
        cmd.arg("--keep");
    }
    run(&mut cmd)
}

fn bench(args: &[String]) -> Result<()> {
    require_root("benchmarks")?;
    setup()?;
    let Some(which) = args.first() else {
        bail!(
            "usage: cargo xtask bench datapath|apply|rest|forward|http|failover|attack|flood|load [--json] ... | all --report DIR"
        );
    };
    match which.as_str() {
        "datapath" | "apply" | "rest" | "forward" | "http" | "all" | "failover" | "attack"
        | "flood" | "load" => {
            // forward, http, failover, attack, flood, load and all start the
            // test backend (and failover, attack, flood and load the agent)
            // from beside the bench binary.
            run(Command::new("cargo").args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "failover-agent",
            ]))?;
            run(Command::new("cargo")
                .args(["build", "--quiet", "--release", "-p", "failover-tests"])
                .args(["--bin", "failover-testbackend", "--bin", "failover-bench"]))?;
            run(Command::new("cargo")
                .args(["run", "--quiet", "--release", "-p", "failover-tests"])
                .args(["--bin", "failover-bench", "--"])
                .args(args))
        }
        other => {
            bail!(
                "unknown benchmark {other:?}; available: datapath, apply, rest, forward, http, failover, attack, flood, load, all"
            )
        }
    }
}
