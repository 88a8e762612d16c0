//! Append-only, hash-chained JSON-lines log of every planner decision.
//!
//! Each line is one compact JSON object. It carries `prev`, the hex SHA-256
//! of the previous line's exact bytes (64 zeros for the first line), and
//! `hash`, the SHA-256 of its own canonical content (the same object
//! without `hash`). Editing, deleting, inserting or reordering lines
//! breaks the chain at the first affected line, which `verify` names.
//! Cutting lines off the end cannot be seen from the file alone: keep
//! `VerifyReport::head` elsewhere (a metric, a remote log) to anchor it.
//!
//! Appends are blocking (write, then fsync); call them from
//! `spawn_blocking` or a dedicated thread in async code.

use std::{
    fmt,
    fs::{File, OpenOptions, TryLockError},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One decision, as the planner states it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// RFC 3339 in UTC (`2026-01-02T03:04:05.123456Z`); see [`now`].
    pub time: String,
    pub service: String,
    /// Ring generation this decision produced.
    pub generation: u64,
    /// Backends that took traffic before.
    pub from: Vec<String>,
    /// Backends that take traffic after.
    pub to: Vec<String>,
    /// Backends in both lists whose effective weight changed (a degraded
    /// backend's, scaled by its probe's `degraded_weight`): a switch that
    /// only reweights shows here, `from` and `to` being the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<WeightChange>,
    pub reason: String,
    /// Result of the sovereignty check, e.g.
    /// `ok: 2 of 4 backends allowed by jurisdictions [EU]` or `fail_closed`.
    pub policy_check: String,
    /// Decision to data-plane flip, when the change was applied.
    pub apply_latency_us: Option<f64>,
}

/// One backend's effective weight before and after a decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightChange {
    pub backend: String,
    pub from: u32,
    pub to: u32,
    /// The model-server load behind a change of its load factor; absent
    /// for other changes (and from records written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadNote>,
}

/// The numbers of a load-factor change: the figures scraped (none when
/// the metrics went missing and the backend fell back to probe-only
/// health), and the factor before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadNote {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<f64>,
    pub factor_from: f64,
    pub factor_to: f64,
}

impl DecisionRecord {
    /// A record stamped now, with empty backend lists to fill in.
    pub fn new(service: impl Into<String>, generation: u64) -> Self {
        Self {
            time: now(),
            service: service.into(),
            generation,
            from: Vec::new(),
            to: Vec::new(),
            weights: Vec::new(),
            reason: String::new(),
            policy_check: String::new(),
            apply_latency_us: None,
        }
    }
}

/// The current time as RFC 3339 UTC with microseconds.
pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// A line on disk: the record's fields, then the chain fields. Field order
/// here is the canonical order.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    time: String,
    service: String,
    generation: u64,
    from: Vec<String>,
    to: Vec<String>,
    // Absent from records without weight changes (and from logs written
    // before it existed), so their bytes and hashes are unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    weights: Vec<WeightChange>,
    reason: String,
    policy_check: String,
    apply_latency_us: Option<f64>,
    prev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
}

impl Line {
    fn new(record: DecisionRecord, prev: String) -> Self {
        let DecisionRecord {
            time,
            service,
            generation,
            from,
            to,
            weights,
            reason,
            policy_check,
            apply_latency_us,
        } = record;
        Self {
            time,
            service,
            generation,
            from,
            to,
            weights,
            reason,
            policy_check,
            apply_latency_us,
            prev,
            hash: None,
        }
    }

    /// The line's bytes: the record without `hash`, then `hash` (the
    /// SHA-256 of those bytes) spliced in as the last field.
    fn seal(mut self) -> Vec<u8> {
        self.hash = None;
        let mut bytes = to_json(&self);
        let hash = sha256_hex(&bytes);
        bytes.pop(); // the closing brace
        bytes.extend_from_slice(HASH_KEY);
        bytes.extend_from_slice(hash.as_bytes());
        bytes.extend_from_slice(b"\"}");
        bytes
    }
}

const HASH_KEY: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = HASH_KEY.len() + 64 + 2;

/// Splits a line into the bytes its hash covers and the stored hash. The
/// hash covers the exact bytes, so any edit (even of spacing or of a
/// float's digits) shows, and nothing is re-serialized to check it.
fn unseal(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    let body_len = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (body, suffix) = line.split_at(body_len);
    let hash = suffix.strip_prefix(HASH_KEY)?.strip_suffix(b"\"}")?;
    let hash = std::str::from_utf8(hash).ok()?;
    if !hash
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut content = body.to_vec();
    content.push(b'}');
    Some((content, hash))
}

fn to_json(line: &Line) -> Vec<u8> {
    // Only strings, integers, finite floats and lists: cannot fail.
    serde_json::to_vec(line).expect("audit line serializes")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Why a line breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainProblem {
    /// Not a JSON audit record (bad JSON, unknown or missing field).
    Malformed(String),
    EmptyLine,
    /// The file does not end with a newline: a write was cut short.
    Incomplete,
    /// The record's content does not match its `hash`: it was edited.
    HashMismatch {
        stored: String,
        computed: String,
    },
    /// `prev` is not the hash of the line before: a line was deleted,
    /// inserted or moved, or the line before was edited.
    PrevMismatch {
        expected: String,
        found: String,
    },
    /// `time` is not RFC 3339 UTC.
    BadTime(String),
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "not an audit record: {why}"),
            Self::EmptyLine => f.write_str("empty line"),
            Self::Incomplete => f.write_str("incomplete last line (no newline; write cut short?)"),
            Self::HashMismatch { stored, computed } => write!(
                f,
                "record was modified: hash {stored} but content hashes to {computed}"
            ),
            Self::PrevMismatch { expected, found } => write!(
                f,
                "chain broken: prev {found} but the line before hashes to {expected} \
                 (a line was deleted, inserted, moved or edited)"
            ),
            Self::BadTime(time) => write!(f, "time {time:?} is not RFC 3339 UTC"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `line` is 1-based: the first line whose record or link is bad.
    #[error("{}:{line}: {problem}", path.display())]
    Broken {
        path: PathBuf,
        line: usize,
        problem: ChainProblem,
    },
    #[error("{}: another process holds the audit log open for writing", path.display())]
    Locked { path: PathBuf },
    #[error("invalid audit record: {0}")]
    InvalidRecord(String),
    /// An earlier append failed part-way; the file may end in a partial
    /// line, so appending more would hide it.
    #[error("{}: an earlier write failed; reopen the log to check it", path.display())]
    Poisoned { path: PathBuf },
}

/// Result of a successful verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: usize,
    /// SHA-256 of the last line (what the next record's `prev` will be);
    /// [`GENESIS`] for an empty log.
    pub head: String,
}

/// Checks the whole chain in `path`.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let bytes = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_chain(&bytes).map_err(|(line, problem)| AuditError::Broken {
        path: path.to_owned(),
        line,
        problem,
    })
}

fn check_chain(bytes: &[u8]) -> Result<VerifyReport, (usize, ChainProblem)> {
    let mut head = GENESIS.to_owned();
    if bytes.is_empty() {
        return Ok(VerifyReport { records: 0, head });
    }
    let Some(body) = bytes.strip_suffix(b"\n") else {
        let line = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
        return Err((line, ChainProblem::Incomplete));
    };
    let mut records = 0;
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        check_line(line, &head).map_err(|problem| (i + 1, problem))?;
        head = sha256_hex(line);
        records += 1;
    }
    Ok(VerifyReport { records, head })
}

fn check_line(bytes: &[u8], prev: &str) -> Result<(), ChainProblem> {
    if bytes.is_empty() {
        return Err(ChainProblem::EmptyLine);
    }
    let Some((content, stored)) = unseal(bytes) else {
        return Err(ChainProblem::Malformed(
            "does not end with a \"hash\" field of 64 hex digits".into(),
        ));
    };
    let computed = sha256_hex(&content);
    if stored != computed {
        return Err(ChainProblem::HashMismatch {
            stored: stored.to_owned(),
            computed,
        });
    }
    let line: Line =
        serde_json::from_slice(bytes).map_err(|e| ChainProblem::Malformed(e.to_string()))?;
    if line.prev != prev {
        return Err(ChainProblem::PrevMismatch {
            expected: prev.to_owned(),
            found: line.prev,
        });
    }
    if humantime::parse_rfc3339(&line.time).is_err() {
        return Err(ChainProblem::BadTime(line.time));
    }
    Ok(())
}

/// The writer. One per file: `open` takes an exclusive lock, so two agents
/// cannot fork the chain.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    head: String,
    records: usize,
    poisoned: bool,
}

impl AuditLog {
    /// Opens or creates the log. An existing file is verified first and the
    /// chain resumes from its last line; a broken chain is refused (with the
    /// line), since extending it would make the break look legitimate.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref().to_owned();
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(AuditError::Locked { path }),
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        let report = verify(&path)?;
        Ok(Self {
            path,
            file,
            head: report.head,
            records: report.records,
            poisoned: false,
        })
    }

    /// Appends one record, then flushes it to disk before returning.
    pub fn append(&mut self, record: DecisionRecord) -> Result<(), AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
            });
        }
        if humantime::parse_rfc3339(&record.time).is_err() {
            return Err(AuditError::InvalidRecord(format!(
                "time {:?} is not RFC 3339 UTC",
                record.time
            )));
        }
        if record.apply_latency_us.is_some_and(|us| !us.is_finite()) {
            // JSON has no NaN or infinity: it would be written as null and
            // the record would no longer match its hash.
            return Err(AuditError::InvalidRecord(
                "apply_latency_us must be finite".into(),
            ));
        }
        let line = Line::new(record, self.head.clone()).seal();
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(&line);
        bytes.push(b'\n');
        // One write call: with O_APPEND the line lands whole at the end.
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            self.poisoned = true;
            return Err(AuditError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.head = sha256_hex(&line);
        self.records += 1;
        Ok(())
    }

    /// Hash of the last line written; [`GENESIS`] for an empty log.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Records in the file, including those there before `open`.
    pub fn records(&self) -> usize {
        self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "failover-audit-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("audit.jsonl")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(i: u64) -> DecisionRecord {
        DecisionRecord {
            from: vec!["a1".into(), "a2".into()],
            to: vec!["a2".into(), format!("b{i}")],
            reason: format!("a1 down (fall 2 of 2), step {i}"),
            policy_check: "ok: 2 of 4 backends allowed by jurisdictions [EU]".into(),
            apply_latency_us: Some(3.25 + i as f64),
            ..DecisionRecord::new("chat", i)
        }
    }

    /// A log of `n` records; returns its lines.
    fn write_log(path: &Path, n: u64) -> Vec<String> {
        let mut log = AuditLog::open(path).unwrap();
        for i in 1..=n {
            log.append(record(i)).unwrap();
        }
        read_lines(path)
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    /// The line and problem `verify` reports.
    fn broken_at(path: &Path) -> (usize, ChainProblem) {
        match verify(path) {
            Err(AuditError::Broken { line, problem, .. }) => (line, problem),
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn valid_chain_verifies_and_links_each_line() {
        let dir = TempDir::new();
        let lines = write_log(&dir.file(), 5);
        assert_eq!(lines.len(), 5);

        let report = verify(&dir.file()).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.head, sha256_hex(lines[4].as_bytes()));

        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["service"], "chat");
        assert_eq!(first["generation"], 1);
        assert_eq!(first["from"], serde_json::json!(["a1", "a2"]));
        assert_eq!(first["to"], serde_json::json!(["a2", "b1"]));
        assert_eq!(first["apply_latency_us"], 4.25);
        assert!(first["time"].as_str().unwrap().ends_with('Z'));
        for pair in lines.windows(2) {
            let next: serde_json::Value = serde_json::from_str(&pair[1]).unwrap();
            assert_eq!(next["prev"], sha256_hex(pair[0].as_bytes()));
        }
        assert_eq!(
            first["hash"].as_str().unwrap().len(),
            64,
            "hash is hex SHA-256"
        );
    }

    #[test]
    fn reopen_resumes_the_chain() {
        let dir = TempDir::new();
        let lines = write_log(&dir.file(), 3);
        let mut log = AuditLog::open(dir.file()).unwrap();
        assert_eq!(log.records(), 3);
        assert_eq!(log.head(), sha256_hex(lines[2].as_bytes()));
        log.append(DecisionRecord {
            apply_latency_us: None,
            reason: "fail closed: no EU backend healthy".into(),
            policy_check: "fail_closed".into(),
            ..DecisionRecord::new("fraud", 9)
        })
        .unwrap();
        drop(log);

        let report = verify(&dir.file()).unwrap();
        assert_eq!(report.records, 4);
        let last: serde_json::Value = serde_json::from_str(&read_lines(&dir.file())[3]).unwrap();
        assert_eq!(last["prev"], sha256_hex(lines[2].as_bytes()));
        assert_eq!(last["apply_latency_us"], serde_json::Value::Null);
    }

    #[test]
    fn empty_log_verifies() {
        let dir = TempDir::new();
        let log = AuditLog::open(dir.file()).unwrap();
        assert_eq!(log.head(), GENESIS);
        assert_eq!(
            verify(&dir.file()).unwrap(),
            VerifyReport {
                records: 0,
                head: GENESIS.into()
            }
        );
    }

    #[test]
    fn edited_middle_line_is_found() {
        let dir = TempDir::new();
        let mut lines = write_log(&dir.file(), 5);
        lines[2] = lines[2].replace("\"generation\":3", "\"generation\":4");
        write_lines(&dir.file(), &lines);
        let (line, problem) = broken_at(&dir.file());
        assert_eq!(line, 3);
        assert!(
            matches!(problem, ChainProblem::HashMismatch { .. }),
            "{problem}"
        );
    }

    #[test]
    fn edited_line_with_recomputed_hash_breaks_the_next_link() {
        let dir = TempDir::new();
        let mut lines = write_log(&dir.file(), 5);
        let mut forged: Line = serde_json::from_str(&lines[1]).unwrap();
        forged.to = vec!["us-fraud-1".into()];
        lines[1] = String::from_utf8(forged.seal()).unwrap();
        // The forged line is consistent in itself; only the link shows it.
        assert_eq!(
            check_line(lines[1].as_bytes(), &sha256_hex(lines[0].as_bytes())),
            Ok(())
        );
        write_lines(&dir.file(), &lines);
        let (line, problem) = broken_at(&dir.file());
        assert_eq!(line, 3);
        assert!(
            matches!(problem, ChainProblem::PrevMismatch { .. }),
            "{problem}"
        );
    }

    #[test]
    fn deleted_line_is_found() {
        let dir = TempDir::new();
        let mut lines = write_log(&dir.file(), 5);
        lines.remove(2);
        write_lines(&dir.file(), &lines);
        let (line, problem) = broken_at(&dir.file());
        // The record that followed the deleted one is now line 3.
        assert_eq!(line, 3);
        assert!(
            matches!(problem, ChainProblem::PrevMismatch { .. }),
            "{problem}"
        );

        std::fs::remove_file(dir.file()).unwrap();
        let mut lines = write_log(&dir.file(), 5);
        lines.remove(0);
        write_lines(&dir.file(), &lines);
        assert_eq!(broken_at(&dir.file()).0, 1, "deleting the first line");
    }

    #[test]
    fn reordered_lines_are_found() {
        let dir = TempDir::new();
        let mut lines = write_log(&dir.file(), 5);
        lines.swap(3, 4);
        write_lines(&dir.file(), &lines);
        let (line, problem) = broken_at(&dir.file());
        assert_eq!(line, 4);
        assert!(
            matches!(problem, ChainProblem::PrevMismatch { .. }),
            "{problem}"
        );
    }

    #[test]
    fn byte_level_edits_of_the_last_line_are_found() {
        let dir = TempDir::new();
        let lines = write_log(&dir.file(), 3);
        let modified = ChainProblem::HashMismatch {
            stored: String::new(),
            computed: String::new(),
        };
        let malformed = ChainProblem::Malformed(String::new());
        let unhashed = lines[2][..lines[2].len() - 1].to_owned();
        let cases = [
            (lines[2].replacen(",\"", ", \"", 1), modified.clone()),
            (lines[2].replacen('{', "{\"extra\":1,", 1), modified.clone()),
            (lines[2].replacen("6.25", "6.250", 1), modified),
            (
                lines[2].replacen("\"hash\"", "\"hasx\"", 1),
                malformed.clone(),
            ),
            (unhashed, malformed),
            (String::new(), ChainProblem::EmptyLine),
        ];
        for (edited, expected) in cases {
            let mut tampered = lines.clone();
            tampered[2] = edited;
            write_lines(&dir.file(), &tampered);
            let (line, problem) = broken_at(&dir.file());
            assert_eq!(line, 3);
            assert_eq!(
                std::mem::discriminant(&problem),
                std::mem::discriminant(&expected),
                "{problem}"
            );
        }
    }

    #[test]
    fn open_refuses_a_broken_chain_or_a_cut_write() {
        let dir = TempDir::new();
        let mut lines = write_log(&dir.file(), 3);
        lines.swap(0, 1);
        write_lines(&dir.file(), &lines);
        let error = AuditLog::open(dir.file()).unwrap_err();
        assert!(
            matches!(error, AuditError::Broken { line: 1, .. }),
            "{error}"
        );

        std::fs::remove_file(dir.file()).unwrap();
        let lines = write_log(&dir.file(), 2);
        let cut = format!("{}\n{}", lines[0], &lines[1][..20]);
        std::fs::write(dir.file(), cut).unwrap();
        let error = AuditLog::open(dir.file()).unwrap_err();
        assert!(
            matches!(
                error,
                AuditError::Broken {
                    line: 2,
                    problem: ChainProblem::Incomplete,
                    ..
                }
            ),
            "{error}"
        );
        let shown = error.to_string();
        assert!(
            shown.contains("audit.jsonl:2: incomplete last line"),
            "{shown}"
        );
    }

    #[test]
    fn append_rejects_records_the_chain_cannot_hold() {
        let dir = TempDir::new();
        let mut log = AuditLog::open(dir.file()).unwrap();
        let bad_time = DecisionRecord {
            time: "2026-01-02 03:04:05".into(),
            ..record(1)
        };
        assert!(matches!(
            log.append(bad_time),
            Err(AuditError::InvalidRecord(_))
        ));
        let nan = DecisionRecord {
            apply_latency_us: Some(f64::NAN),
            ..record(1)
        };
        assert!(matches!(log.append(nan), Err(AuditError::InvalidRecord(_))));
        assert_eq!(log.records(), 0);
        log.append(record(1)).unwrap();
        assert_eq!(verify(&dir.file()).unwrap().records, 1);
    }

    #[test]
    fn one_writer_at_a_time() {
        let dir = TempDir::new();
        let _first = AuditLog::open(dir.file()).unwrap();
        let second = AuditLog::open(dir.file()).unwrap_err();
        assert!(matches!(second, AuditError::Locked { .. }), "{second}");
    }

    #[test]
    fn weight_changes_are_kept_and_absent_when_none() {
        let dir = TempDir::new();
        let mut log = AuditLog::open(dir.file()).unwrap();
        log.append(record(1)).unwrap();
        log.append(DecisionRecord {
            from: vec!["a1".into(), "a2".into()],
            to: vec!["a1".into(), "a2".into()],
            weights: vec![
                WeightChange {
                    backend: "a1".into(),
                    from: 100,
                    to: 50,
                    load: None,
                },
                WeightChange {
                    backend: "a2".into(),
                    from: 100,
                    to: 60,
                    load: Some(LoadNote {
                        waiting: Some(3.0),
                        running: Some(8.0),
                        kv: None,
                        factor_from: 1.0,
                        factor_to: 0.6,
                    }),
                },
            ],
            ..record(2)
        })
        .unwrap();
        drop(log);
        assert_eq!(verify(&dir.file()).unwrap().records, 2);
        let lines = read_lines(&dir.file());
        // A record without weight changes is as it always was.
        assert!(!lines[0].contains("weights"), "{}", lines[0]);
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(
            second["weights"],
            serde_json::json!([
                {"backend": "a1", "from": 100, "to": 50},
                {"backend": "a2", "from": 100, "to": 60, "load": {
                    "waiting": 3.0, "running": 8.0, "factor_from": 1.0, "factor_to": 0.6
                }}
            ])
        );
        let back: DecisionRecord = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(back.weights[0].to, 50);
        assert_eq!(back.weights[1].load.as_ref().unwrap().factor_to, 0.6);
    }

    #[test]
    fn text_survives_escaping() {
        let dir = TempDir::new();
        let mut log = AuditLog::open(dir.file()).unwrap();
        log.append(DecisionRecord {
            reason: "quote \" backslash \\ newline \n unicode é ✓".into(),
            ..record(1)
        })
        .unwrap();
        drop(log);
        assert_eq!(verify(&dir.file()).unwrap().records, 1);
        assert_eq!(read_lines(&dir.file()).len(), 1);
    }
}
