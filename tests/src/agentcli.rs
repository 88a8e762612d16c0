//! The real `failover-agent` binary's operator commands, run as a user
//! runs them (pipes, not a terminal), and the tables they print.

use std::{path::Path, time::Duration};

/// What a run of the CLI printed.
#[derive(Debug)]
pub struct CliOut {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOut {
    /// Asserts that it exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "{self:#?}");
        self
    }

    /// Its stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

/// The header of `failover-agent backends`.
pub const BACKENDS_HEADER: [&str; 14] = [
    "BACKEND",
    "ADDRESS",
    "HEALTH",
    "FLAPS",
    "HOLD",
    "STATE",
    "GRACE",
    "TIER",
    "WEIGHT",
    "PROBE",
    "SYN/ACK/RST",
    "RTT",
    "FLOWS",
    "SERVICES",
];

/// Runs the real `failover-agent` binary with `args`: stdout and stderr
/// are pipes (not a terminal), `NO_COLOR` is unset and `TERM` says colour
/// is possible, so only the terminal check can keep colour out. Async: the
/// agent under test runs on this test's runtime.
pub async fn cli_as(args: &[&str], uid: Option<u32>) -> std::io::Result<CliOut> {
    let bin = crate::topology::sibling_bin("failover-agent").unwrap();
    // Another user may not reach the build directory: run a copy from a
    // scratch directory anyone can enter.
    let scratch = crate::scratch::TempDir::new();
    let bin = if uid.is_some() {
        use std::os::unix::fs::PermissionsExt;
        let copy = scratch.0.join("failover-agent");
        std::fs::copy(&bin, &copy)?;
        for p in [&scratch.0, &copy] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        }
        copy
    } else {
        bin
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env("TERM", "xterm-256color")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(id) = uid {
        cmd.uid(id).gid(id);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("failover-agent {args:?} did not end"))?;
    Ok(CliOut {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    })
}

/// Runs the CLI with `args` as root; panics when it cannot run.
pub async fn cli(args: &[&str]) -> CliOut {
    cli_as(args, None)
        .await
        .unwrap_or_else(|e| panic!("running failover-agent {args:?}: {e}"))
}

/// An operator command against the agent on `sock`.
pub async fn op(sock: &Path, args: &[&str]) -> CliOut {
    let mut a = args.to_vec();
    a.extend(["--socket", sock.to_str().unwrap()]);
    cli(&a).await
}

/// Where each cell of a table line starts: cells are two or more spaces
/// apart (a cell may hold single spaces).
pub fn column_starts(line: &str) -> Vec<usize> {
    let b = line.as_bytes();
    (0..b.len())
        .filter(|&i| b[i] != b' ' && (i == 0 || (i >= 2 && &b[i - 2..i] == b"  ")))
        .collect()
}

/// Checks a table: no colour escapes, the header first, and every row's
/// cells starting where the header's columns do. Returns the rows' cells.
pub fn aligned_table(text: &str, header: &[&str]) -> Vec<Vec<String>> {
    assert!(!text.contains('\x1b'), "colour escapes on a pipe:\n{text}");
    let mut lines = text.lines();
    let head = lines.next().expect("header line");
    let starts = column_starts(head);
    let names: Vec<&str> = starts
        .iter()
        .zip(starts.iter().skip(1).map(Some).chain([None]))
        .map(|(&a, b)| head[a..b.map_or(head.len(), |&b| b)].trim_end())
        .collect();
    assert_eq!(names, header, "header of\n{text}");
    lines
        .map(|row| {
            assert_eq!(
                column_starts(row),
                starts,
                "row {row:?} not aligned with the header in\n{text}"
            );
            starts
                .iter()
                .zip(starts.iter().skip(1).map(Some).chain([None]))
                .map(|(&a, b)| row[a..b.map_or(row.len(), |&b| b)].trim_end().to_owned())
                .collect()
        })
        .collect()
}
