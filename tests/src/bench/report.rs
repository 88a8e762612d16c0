//! The results page written by `failover-bench all --report DIR`: every
//! figure, table and chart comes from the JSON lines the benchmarks printed
//! in the same run. Nothing is typed by hand.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

/// One benchmark's outcome in an `all` run.
#[derive(Debug)]
pub enum Outcome {
    /// The JSON lines it printed.
    Ran(Vec<Value>),
    /// Not run, and why.
    Skipped(String),
}

/// The machine and the run, for the page's header.
#[derive(Debug, Default)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub date: String,
    pub commit: String,
    pub load: String,
}

impl Machine {
    pub fn probe() -> Self {
        let sh = |c: &str| {
            std::process::Command::new("sh")
                .args(["-c", c])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu: sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
            kernel: sh("uname -r"),
            date: sh("date -u '+%Y-%m-%d %H:%M UTC'"),
            commit: sh("c=$(git rev-parse --short HEAD 2>/dev/null) && \
                 { git diff --quiet HEAD 2>/dev/null && echo $c || echo \"$c (with uncommitted changes)\"; }"),
            load: sh("cut -d' ' -f1-3 /proc/loadavg"),
        }
    }
}

/// Column order for the benchmarks this page knows; others get every key.
fn columns(bench: &str, rows: &[Value]) -> Vec<String> {
    let known: &[&str] = match bench {
        "datapath" => &["case", "raw_ns", "own_ns", "x_empty", "return_code"],
        "forward" => &[
            "system",
            "generator",
            "mpps",
            "cpu_pct",
            "softirq_pct",
            "flows",
            "sent",
            "received",
        ],
        "http" => &super::http::COLUMNS,
        "rest" => &super::rest::COLUMNS,
        "attack" => &super::attack::COLUMNS,
        "flood" => &super::flood::COLUMNS,
        "load" => &super::load::COLUMNS,
        _ => &[],
    };
    if !known.is_empty() {
        return known.iter().map(|s| s.to_string()).collect();
    }
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    cols
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "–".into(),
        Some(Value::String(s)) => format!("`{s}`"),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                if f.abs() >= 100.0 {
                    format!("{f:.0}")
                } else if f.abs() >= 1.0 {
                    format!("{f:.2}")
                } else {
                    format!("{f:.3}")
                }
            }
            _ => n.to_string(),
        },
        Some(v) => v.to_string(),
    }
}

fn table(bench: &str, rows: &[Value]) -> String {
    let cols = columns(bench, rows);
    let mut t = format!("| {} |\n|", cols.join(" | "));
    for c in &cols {
        let numeric = rows.iter().any(|r| r.get(c).is_some_and(|v| v.is_number()));
        t.push_str(if numeric { "---:|" } else { "---|" });
    }
    t.push('\n');
    for r in rows {
        let cells: Vec<String> = cols.iter().map(|c| cell(r.get(c))).collect();
        let _ = writeln!(t, "| {} |", cells.join(" | "));
    }
    t
}

fn num(r: &Value, k: &str) -> f64 {
    r.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn text(r: &Value, k: &str) -> String {
    r.get(k).and_then(Value::as_str).unwrap_or("").to_owned()
}

/// A bar chart: one group per category, one bar per series in each group.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let n = categories.len().max(1) as i32;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.2;
    let root = SVGBackend::new(path, (720, 360)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..ymax)?;
        let label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => categories.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(y_desc)
            .x_label_formatter(&label)
            .draw()?;
        let (w, _) = chart.plotting_area().dim_in_pixel();
        let seg = f64::from(w) / f64::from(n);
        let m = series.len().max(1) as f64;
        let slot = seg * 0.8 / m;
        for (j, (name, vals)) in series.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            let left = seg * 0.1 + j as f64 * slot;
            let right = (seg - left - slot).max(0.0);
            chart
                .draw_series(vals.iter().enumerate().map(|(i, v)| {
                    let mut r = Rectangle::new(
                        [
                            (SegmentValue::Exact(i as i32), 0.0),
                            (SegmentValue::Exact(i as i32 + 1), *v),
                        ],
                        color.filled(),
                    );
                    r.set_margin(0, 0, left as u32, right as u32);
                    r
                }))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("chart {}: {e}", path.display()))
}

/// Groups `rows` by `group` (categories, in first-seen order) and `series`
/// (in first-seen order), taking `value`.
fn grouped(
    rows: &[Value],
    group: &str,
    series: &str,
    value: &str,
) -> (Vec<String>, Vec<(String, Vec<f64>)>) {
    let mut cats: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut vals: BTreeMap<(String, String), f64> = BTreeMap::new();
    for r in rows {
        let c = text(r, group);
        let s = if series.is_empty() {
            value.to_owned()
        } else {
            text(r, series)
        };
        if !cats.contains(&c) {
            cats.push(c.clone());
        }
        if !names.contains(&s) {
            names.push(s.clone());
        }
        vals.insert((c, s), num(r, value));
    }
    let out = names
        .iter()
        .map(|s| {
            (
                s.clone(),
                cats.iter()
                    .map(|c| vals.get(&(c.clone(), s.clone())).copied().unwrap_or(0.0))
                    .collect(),
            )
        })
        .collect();
    (cats, out)
}

fn find<'a>(rows: &'a [Value], pairs: &[(&str, &str)]) -> Option<&'a Value> {
    rows.iter()
        .find(|r| pairs.iter().all(|(k, v)| text(r, k) == *v))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

/// Writes `dir/README.md`, `dir/results.jsonl` and the charts.
pub fn write(dir: &Path, machine: &Machine, results: &[(String, Outcome)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut jsonl = String::new();
    let mut md = String::new();
    md.push_str(
        "# Benchmark results\n\n\
         Generated by `cargo xtask bench all --report docs/benchmarks` from the JSON the \
         benchmarks printed in one run; every figure, table and chart below comes from \
         [`results.jsonl`](results.jsonl). Do not edit by hand: run the command again. The \
         method of each benchmark is in [../benchmarks.md](../benchmarks.md).\n\n",
    );
    let _ = write!(
        md,
        "| machine | |\n|---|---|\n| CPUs (nproc) | {} |\n| CPU | {} |\n| kernel | `{}` |\n\
         | date | {} |\n| commit | {} |\n| load average at start | {} |\n\n\
         All systems of a benchmark run one after the other in the same run, on the same \
         topology layout. On a shared machine other work adds noise: compare ratios within \
         this page, not absolute figures across machines.\n\n",
        machine.nproc,
        if machine.cpu.is_empty() {
            "–"
        } else {
            &machine.cpu
        },
        machine.kernel,
        machine.date,
        if machine.commit.is_empty() {
            "–"
        } else {
            &machine.commit
        },
        machine.load,
    );

    let mut targets = String::new();
    for (bench, outcome) in results {
        let _ = writeln!(md, "## `{bench}`\n");
        let rows = match outcome {
            Outcome::Skipped(why) => {
                let _ = writeln!(md, "Not run: {why}.\n");
                continue;
            }
            Outcome::Ran(rows) => rows,
        };
        for r in rows {
            let mut o = r.clone();
            if let Some(m) = o.as_object_mut() {
                m.insert("bench".into(), Value::String(bench.clone()));
            }
            jsonl.push_str(&o.to_string());
            jsonl.push('\n');
        }
        md.push_str(&table(bench, rows));
        md.push('\n');
        match bench.as_str() {
            "datapath" => {
                let (cats, series) = grouped(rows, "case", "", "own_ns");
                bar_chart(
                    &dir.join("datapath.svg"),
                    "datapath: own cost per packet (ns, lower is better)",
                    "ns per packet",
                    &cats,
                    &series,
                )?;
                md.push_str("![datapath](datapath.svg)\n\n");
                // Issue 16: each case's own cost against the empty
                // program's raw time in the same run.
                for (case, bound) in super::datapath::TARGETS {
                    if let Some(x) = find(rows, &[("case", case)])
                        .and_then(|r| r.get("x_empty"))
                        .and_then(Value::as_f64)
                    {
                        let _ = writeln!(
                            targets,
                            "| datapath {case} | own cost ÷ empty program's raw time | ≤ {bound} | {x:.2} | {} |",
                            verdict(x <= bound)
                        );
                    }
                }
            }
            "forward" => {
                let (cats, series) = grouped(rows, "system", "", "mpps");
                bar_chart(
                    &dir.join("forward.svg"),
                    "forward: packets forwarded through the edge (Mpps, higher is better)",
                    "Mpps",
                    &cats,
                    &series,
                )?;
                md.push_str("![forward](forward.svg)\n\n");
                if let (Some(x), Some(n)) = (
                    find(rows, &[("system", "xdp")]),
                    find(rows, &[("system", "nftables")]),
                ) {
                    let ratio = num(x, "mpps") / num(n, "mpps").max(1e-12);
                    // The generator moves the ratio (socket's per-frame skb
                    // cost is paid by every system), so the row names it.
                    let _ = writeln!(
                        targets,
                        "| forward ({}) | xdp ÷ nftables, Mpps | ≥ 3 | {ratio:.2} | {} |",
                        text(x, "generator"),
                        verdict(ratio >= 3.0)
                    );
                }
            }
            "http" => {
                for (value, file, title, y) in [
                    (
                        "rps",
                        "http-rps.svg",
                        "http: requests per second (higher is better)",
                        "requests/s",
                    ),
                    (
                        "p99_ms",
                        "http-p99.svg",
                        "http: p99 latency (ms, lower is better)",
                        "ms",
                    ),
                ] {
                    let (cats, series) = grouped(rows, "system", "mode", value);
                    bar_chart(&dir.join(file), title, y, &cats, &series)?;
                    let _ = writeln!(md, "![http {value}]({file})\n");
                }
                let get = |s: &str, m: &str| find(rows, &[("system", s), ("mode", m)]);
                // Each XDP attach mode measured is held to every target.
                for xdp in super::http::XDP_SYSTEMS {
                    if let (Some(x), Some(d), Some(h)) = (
                        get(xdp, "newconn"),
                        get("direct", "newconn"),
                        get("haproxy", "newconn"),
                    ) {
                        let rd = num(x, "rps") / num(d, "rps").max(1e-12);
                        let rh = num(x, "rps") / num(h, "rps").max(1e-12);
                        let _ = writeln!(
                            targets,
                            "| http newconn | {xdp} ÷ direct, rps | ≥ 0.95 | {rd:.2} | {} |",
                            verdict(rd >= 0.95)
                        );
                        let _ = writeln!(
                            targets,
                            "| http newconn | {xdp} ÷ haproxy, rps | ≥ 1.5 | {rh:.2} | {} |",
                            verdict(rh >= 1.5)
                        );
                    }
                    for mode in ["keepalive", "newconn"] {
                        if let (Some(x), Some(n)) = (get(xdp, mode), get("nftables", mode)) {
                            let (px, pn) = (num(x, "p99_ms"), num(n, "p99_ms"));
                            let _ = writeln!(
                                targets,
                                "| http {mode} | p99 {xdp} vs nftables (ms) | ≤ nftables | {px:.2} vs {pn:.2} | {} |",
                                verdict(px <= pn)
                            );
                        }
                    }
                }
            }
            "apply" => {
                for (case, bound, what) in [
                    ("backend_state", 10.0, "one backend state change, p99 µs"),
                    (
                        "full_rebuild",
                        5000.0,
                        "full ring rebuild (M = 65537), p99 µs",
                    ),
                ] {
                    if let Some(r) = find(rows, &[("case", case)]) {
                        let p99 = num(r, "p99_us");
                        let _ = writeln!(
                            targets,
                            "| apply | {what} | ≤ {bound} | {p99:.1} | {} |",
                            verdict(p99 <= bound)
                        );
                    }
                }
            }
            "failover" => {
                for (scenario, bound) in [("crash", 100.0), ("blackhole", 300.0)] {
                    let get = |system| find(rows, &[("system", system), ("scenario", scenario)]);
                    let Some(f) = get("failover") else {
                        continue;
                    };
                    let p99 = num(f, "rto_ms_p99");
                    let _ = writeln!(
                        targets,
                        "| failover {scenario} | failover time p99, ms | ≤ {bound} | {p99:.1} | {} |",
                        verdict(p99 <= bound)
                    );
                    if let Some(h) = get("haproxy-tuned") {
                        let ratio = num(h, "rto_ms_p99") / p99.max(1e-12);
                        let _ = writeln!(
                            targets,
                            "| failover {scenario} | haproxy-tuned ÷ failover, p99 | ≥ 5 | {ratio:.1} | {} |",
                            verdict(ratio >= 5.0)
                        );
                    }
                }
            }
            "rest" => {
                for r in rows {
                    let (cpu, rss) = (num(r, "cpu_pct"), num(r, "rss_peak_mib"));
                    // The kernel's share alone, where measured (see `rest`).
                    let floor = match r.get("floor_cpu_pct").and_then(Value::as_f64) {
                        Some(f) => format!(" (floor {f:.1})"),
                        None => String::new(),
                    };
                    let _ = writeln!(
                        targets,
                        "| rest ({}) | agent CPU, % of a core / peak RSS, MiB | ≤ 2 / ≤ 32 | {cpu:.1}{floor} / {rss:.1} | {} |",
                        text(r, "kind"),
                        verdict(cpu <= 2.0 && rss <= 32.0)
                    );
                }
            }
            "attack" => {
                // Issue 15: no flood moves traffic. The worst attack row
                // against the no-attack row.
                let attacks: Vec<&Value> = rows
                    .iter()
                    .filter(|r| text(r, "attack") != "none")
                    .collect();
                if let (Some(base), false) = (find(rows, &[("attack", "none")]), attacks.is_empty())
                {
                    let ratio = attacks
                        .iter()
                        .map(|r| num(r, "ok_ratio"))
                        .fold(f64::INFINITY, f64::min)
                        / num(base, "ok_ratio").max(1e-12);
                    let sum = |k| attacks.iter().map(|r| num(r, k)).sum::<f64>();
                    let (switches, ejections) = (sum("ring_switches"), sum("ejections"));
                    let _ = writeln!(
                        targets,
                        "| attack | under every flood: ok_ratio ÷ no attack / ring switches / ejections | ≥ 0.999 / 0 / 0 | {ratio:.4} / {switches} / {ejections} | {} |",
                        verdict(ratio >= 0.999 && switches == 0.0 && ejections == 0.0)
                    );
                }
            }
            "flood" if !rows.is_empty() => {
                // Issue 16: a SYN flood must not lock the edge. Every rate:
                // the pre-established flows all survive, real connections
                // succeed.
                let survived = rows
                    .iter()
                    .map(|r| num(r, "survived") / num(r, "established").max(1e-12))
                    .fold(f64::INFINITY, f64::min);
                let ok = rows
                    .iter()
                    .map(|r| num(r, "ok_ratio"))
                    .fold(f64::INFINITY, f64::min);
                let top = rows.iter().map(|r| num(r, "pps")).fold(0.0, f64::max);
                let _ = writeln!(
                    targets,
                    "| flood ({}, up to {top:.0} SYNs/s) | at every rate: established flows surviving / real connections ok | 100 % / ≥ 99 % | {:.2} % / {:.2} % | {} |",
                    text(&rows[0], "generator"),
                    survived * 100.0,
                    ok * 100.0,
                    verdict(survived >= 1.0 && ok >= 0.99)
                );
            }
            "load" => {
                // Issue 20: load-aware weights against static ones and
                // HAProxy leastconn; the wedged backend out within 1 s.
                let p99 = |mode| {
                    find(rows, &[("mode", mode)])
                        .and_then(|r| r.get("ttft_p99_ms"))
                        .and_then(Value::as_f64)
                };
                if let Some(l) = p99("load_aware") {
                    for (other, bound) in [("static", 0.5), ("haproxy_leastconn", 1.0)] {
                        if let Some(o) = p99(other) {
                            let ratio = l / o.max(1e-12);
                            let _ = writeln!(
                                targets,
                                "| load | load_aware ÷ {other}, TTFT p99 | ≤ {bound} | {ratio:.2} | {} |",
                                verdict(ratio <= bound)
                            );
                        }
                    }
                }
                if let Some(w) = find(rows, &[("mode", "wedge")]) {
                    let s = w.get("seconds_to_no_new_flows").and_then(Value::as_f64);
                    let _ = writeln!(
                        targets,
                        "| load wedge | seconds until the wedged backend gets no new flows | ≤ 1 | {} | {} |",
                        s.map_or("never".into(), |s| format!("{s:.3}")),
                        verdict(s.is_some_and(|s| s <= 1.0))
                    );
                }
            }
            _ => {}
        }
    }
    if !targets.is_empty() {
        md.push_str(
            "## Targets (issues 3, 4, 6, 15, 16 and 20)\n\nComputed from the tables above.\n\n\
             | benchmark | measure | target | measured | |\n|---|---|---|---|---|\n",
        );
        md.push_str(&targets);
        md.push('\n');
    }
    std::fs::write(dir.join("results.jsonl"), jsonl)?;
    std::fs::write(dir.join("README.md"), md)?;
    Ok(())
}

/// The benchmarks `all` runs, in order, when this binary has them.
pub const ALL: [&str; 9] = [
    "datapath", "apply", "rest", "failover", "forward", "http", "attack", "flood", "load",
];

/// Runs every benchmark in [`ALL`] that this binary offers (each as a
/// child process with `--json`, so one benchmark's state never leaks into
/// the next), skips the others with a note, and writes the page.
pub fn all(dir: &Path) -> Result<()> {
    let exe = std::env::current_exe()?;
    let help = std::process::Command::new(&exe).arg("--help").output()?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    // Subcommand names: the first word of each line between "Commands:"
    // and the next section.
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let offered = |name: &str| commands.contains(&name);
    let machine = Machine::probe();
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for name in ALL {
        if !offered(name) {
            eprintln!("all: skipping `{name}`: this failover-bench has no such benchmark yet");
            results.push((
                name.to_owned(),
                Outcome::Skipped(format!("`failover-bench` has no `{name}` benchmark yet")),
            ));
            continue;
        }
        eprintln!("all: running `{name}`");
        let out = std::process::Command::new(&exe)
            .args([name, "--json"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("run {name}"))?;
        if !out.status.success() {
            eprintln!("all: `{name}` failed: {}", out.status);
            failed.push(name);
            results.push((
                name.to_owned(),
                Outcome::Skipped(format!("it failed in this run ({})", out.status)),
            ));
            continue;
        }
        let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with('{'))
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("{name} printed a line that is not JSON"))?;
        for r in &rows {
            println!("{}", serde_json::json!({ "bench": name, "result": r }));
        }
        results.push((name.to_owned(), Outcome::Ran(rows)));
    }
    write(dir, &machine, &results)?;
    eprintln!("all: wrote {}", dir.join("README.md").display());
    anyhow::ensure!(failed.is_empty(), "these benchmarks failed: {failed:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn targets_of_issues_3_4_6_and_15_are_computed_from_the_rows() {
        let dir = std::env::temp_dir().join(format!("failover-report-{}", std::process::id()));
        let machine = Machine {
            nproc: 2,
            cpu: "test".into(),
            kernel: "k".into(),
            date: "d".into(),
            commit: "c".into(),
            load: "0".into(),
        };
        let fo = |system: &str, scenario: &str, p99: f64| {
            json!({"system": system, "scenario": scenario, "rto_ms_p50": p99 / 2.0,
                   "rto_ms_p99": p99, "failed_requests": 1, "trials": 20})
        };
        let http = |system: &str, mode: &str, rps: f64, p99: f64| {
            json!({"system": system, "mode": mode, "rps": rps, "p50_ms": p99 / 2.0,
                   "p99_ms": p99, "requests": 1, "errors": 0})
        };
        let attack = |attack: &str, pps: u32, ok_ratio: f64, switches: u32| {
            json!({"attack": attack, "pps": pps, "ok_ratio": ok_ratio, "p99_ms": 2.5,
                   "ring_switches": switches, "ejections": 0})
        };
        let results = vec![
            (
                "rest".to_owned(),
                Outcome::Ran(vec![
                    json!({"kind": "tcp", "cpu_pct": 7.9, "rss_peak_mib": 24.7, "floor_cpu_pct": 5.2}),
                    json!({"kind": "grpc", "cpu_pct": 1.5, "rss_peak_mib": 24.7, "floor_cpu_pct": null}),
                ]),
            ),
            (
                "http".to_owned(),
                Outcome::Ran(vec![
                    http("direct", "newconn", 10_000.0, 1.5),
                    http("xdp", "newconn", 9_000.0, 1.9),
                    http("xdp-native", "newconn", 9_600.0, 1.6),
                    http("nftables", "newconn", 8_000.0, 1.8),
                    http("haproxy", "newconn", 6_000.0, 3.0),
                ]),
            ),
            (
                "apply".to_owned(),
                Outcome::Ran(vec![
                    json!({"case": "backend_state", "p50_us": 2.0, "p99_us": 4.5, "max_us": 9.0, "trials": 10}),
                    json!({"case": "full_rebuild", "p50_us": 3000.0, "p99_us": 5200.0, "max_us": 6000.0, "trials": 10}),
                ]),
            ),
            (
                "attack".to_owned(),
                Outcome::Ran(vec![
                    attack("none", 0, 1.0, 0),
                    attack("one-source", 1000, 1.0, 0),
                    attack("many-sources", 10_000, 0.9995, 1),
                ]),
            ),
            (
                "failover".to_owned(),
                Outcome::Ran(vec![
                    fo("failover", "crash", 20.0),
                    fo("failover", "blackhole", 80.0),
                    fo("haproxy-tuned", "crash", 200.0),
                    fo("haproxy-tuned", "blackhole", 380.0),
                ]),
            ),
        ];
        write(&dir, &machine, &results).unwrap();
        let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for row in [
            "| apply | one backend state change, p99 µs | ≤ 10 | 4.5 | met |",
            "| apply | full ring rebuild (M = 65537), p99 µs | ≤ 5000 | 5200.0 | **not met** |",
            "| failover crash | failover time p99, ms | ≤ 100 | 20.0 | met |",
            "| failover crash | haproxy-tuned ÷ failover, p99 | ≥ 5 | 10.0 | met |",
            "| failover blackhole | failover time p99, ms | ≤ 300 | 80.0 | met |",
            "| failover blackhole | haproxy-tuned ÷ failover, p99 | ≥ 5 | 4.8 | **not met** |",
            "| rest (tcp) | agent CPU, % of a core / peak RSS, MiB | ≤ 2 / ≤ 32 | 7.9 (floor 5.2) / 24.7 | **not met** |",
            "| rest (grpc) | agent CPU, % of a core / peak RSS, MiB | ≤ 2 / ≤ 32 | 1.5 / 24.7 | met |",
            "| http newconn | xdp ÷ direct, rps | ≥ 0.95 | 0.90 | **not met** |",
            "| http newconn | xdp ÷ haproxy, rps | ≥ 1.5 | 1.50 | met |",
            "| http newconn | p99 xdp vs nftables (ms) | ≤ nftables | 1.90 vs 1.80 | **not met** |",
            "| http newconn | xdp-native ÷ direct, rps | ≥ 0.95 | 0.96 | met |",
            "| http newconn | xdp-native ÷ haproxy, rps | ≥ 1.5 | 1.60 | met |",
            "| http newconn | p99 xdp-native vs nftables (ms) | ≤ nftables | 1.60 vs 1.80 | met |",
            "| attack | under every flood: ok_ratio ÷ no attack / ring switches / ejections | ≥ 0.999 / 0 / 0 | 0.9995 / 1 / 0 | **not met** |",
        ] {
            assert!(md.contains(row), "missing {row:?} in:\n{md}");
        }
    }

    #[test]
    fn targets_of_issue_16_are_computed_from_the_rows() {
        let dir = std::env::temp_dir().join(format!("failover-report16-{}", std::process::id()));
        let case = |case: &str, x: f64| json!({"case": case, "raw_ns": 40.0 * (1.0 + x), "own_ns": 40.0 * x, "x_empty": x, "return_code": 4});
        let flood = |rate: &str, pps: u64, survived: u64, ok: f64| {
            json!({"rate": rate, "pps": pps, "generator": "socket", "survived": survived,
                   "established": 10_000, "ok_ratio": ok, "p99_connect_ms": 0.5})
        };
        let results = vec![
            (
                "datapath".to_owned(),
                Outcome::Ran(vec![
                    case("empty", 0.0),
                    case("established", 1.2),
                    case("new_flow", 12.0),
                    case("reverse", 1.5),
                    case("passthrough", 0.2),
                    case("new_flow_loaded", 9.0),
                ]),
            ),
            (
                "flood".to_owned(),
                Outcome::Ran(vec![
                    flood("1000", 1000, 10_000, 1.0),
                    flood("max", 250_000, 10_000, 0.985),
                ]),
            ),
        ];
        write(&dir, &Machine::default(), &results).unwrap();
        let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for row in [
            "| datapath new_flow | own cost ÷ empty program's raw time | ≤ 10 | 12.00 | **not met** |",
            "| datapath new_flow_loaded | own cost ÷ empty program's raw time | ≤ 10 | 9.00 | met |",
            "| datapath established | own cost ÷ empty program's raw time | ≤ 1.5 | 1.20 | met |",
            "| datapath reverse | own cost ÷ empty program's raw time | ≤ 1.5 | 1.50 | met |",
            "| datapath passthrough | own cost ÷ empty program's raw time | ≤ 0.25 | 0.20 | met |",
            "| flood (socket, up to 250000 SYNs/s) | at every rate: established flows surviving / real connections ok | 100 % / ≥ 99 % | 100.00 % / 98.50 % | **not met** |",
        ] {
            assert!(md.contains(row), "missing {row:?} in:\n{md}");
        }
    }

    #[test]
    fn targets_of_issue_20_are_computed_from_the_rows() {
        let dir = std::env::temp_dir().join(format!("failover-report20-{}", std::process::id()));
        let mode = |mode: &str, p99: f64| json!({"mode": mode, "ttft_p50_ms": 90.0, "ttft_p99_ms": p99, "failed": 0, "requests": 1500});
        let results = vec![(
            "load".to_owned(),
            Outcome::Ran(vec![
                mode("static", 2400.0),
                mode("load_aware", 240.0),
                mode("haproxy_leastconn", 200.0),
                json!({"mode": "wedge", "seconds_to_no_new_flows": 0.4, "stuck_requests": 30, "requests": 400}),
            ]),
        )];
        write(&dir, &Machine::default(), &results).unwrap();
        let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for row in [
            "| load | load_aware ÷ static, TTFT p99 | ≤ 0.5 | 0.10 | met |",
            "| load | load_aware ÷ haproxy_leastconn, TTFT p99 | ≤ 1 | 1.20 | **not met** |",
            "| load wedge | seconds until the wedged backend gets no new flows | ≤ 1 | 0.400 | met |",
        ] {
            assert!(md.contains(row), "missing {row:?} in:\n{md}");
        }
    }
}
