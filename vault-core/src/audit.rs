//! The audit trail: hash-chained JSON lines (docs/api.md#audit;
//! docs/threat-model.md, L1, L2).
//!
//! Every line is one entry:
//!
//! ```text
//! {"seq":1,"at":"2026-11-26T08:00:00.000Z","kind":"key.created","actor":"key_…","target":"key_…","project":"default","detail":{…},"prev":"000…000","hash":"<64 hex>"}
//! ```
//!
//! - `seq` counts from 1 without gaps.
//! - `prev` is the previous entry's `hash` (64 zeros for the first entry).
//! - `hash` is the hex SHA-256 of the line's own bytes up to, not
//!   including, `,"hash":…`, with the closing `}` appended: the exact bytes
//!   written, so no re-serialisation is needed to check them.
//!
//! [`verify`] walks the file and names the first entry that is edited
//! (hash mismatch), removed or reordered (seq gap, prev mismatch), inserted
//! (prev mismatch), or truncated (invalid JSON). A hash chain without a
//! secret cannot detect an attacker who rewrites every entry after the
//! point of change, nor a cut-off tail: record [`VerifyReport::last_hash`]
//! elsewhere to anchor the head.
//!
//! **Never put secrets in an [`AuditEvent`]**: no provider key, no virtual
//! key, no key hash, no request body. Ids, names, projects and denial codes
//! only.
//!
//! [`AuditLog::append`] blocks on a write and an `fsync`; call it from async
//! code through `tokio::task::spawn_blocking`, or through [`AuditTrail`],
//! the trait every audit backend implements (this file, or a PostgreSQL
//! table shared by several replicas: docs/replicas.md#the-audit-chain).

mod trail;

pub use trail::{AuditTrail, ChainLink, ChainVerifier};

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{SharedClock, SystemClock};

/// The `prev` of the first entry.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AuditKind {
    /// A virtual key was created (a child key too; its parent is in `detail`).
    #[serde(rename = "key.created")]
    KeyCreated,
    /// A virtual key was rotated.
    #[serde(rename = "key.rotated")]
    KeyRotated,
    /// A virtual key (and its descendants) was revoked.
    #[serde(rename = "key.revoked")]
    KeyRevoked,
    /// A provider key was added.
    #[serde(rename = "provider_key.added")]
    ProviderKeyAdded,
    /// A provider key was removed.
    #[serde(rename = "provider_key.removed")]
    ProviderKeyRemoved,
    /// A request was denied.
    #[serde(rename = "request.denied")]
    RequestDenied,
    /// The master key was rotated (all data keys re-wrapped).
    #[serde(rename = "master_key.rotated")]
    MasterKeyRotated,
}

impl AuditKind {
    /// The dotted name, e.g. `key.created`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::KeyCreated => "key.created",
            AuditKind::KeyRotated => "key.rotated",
            AuditKind::KeyRevoked => "key.revoked",
            AuditKind::ProviderKeyAdded => "provider_key.added",
            AuditKind::ProviderKeyRemoved => "provider_key.removed",
            AuditKind::RequestDenied => "request.denied",
            AuditKind::MasterKeyRotated => "master_key.rotated",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event to record. Callers must never put secrets in any field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What happened.
    pub kind: AuditKind,
    /// Who did it: the acting key's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// What it was done to: a key or provider-key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The project concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Anything else worth keeping (a denial code, a key name, a parent id).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

impl AuditEvent {
    /// An event of `kind` with no other fields.
    pub fn new(kind: AuditKind) -> Self {
        AuditEvent {
            kind,
            actor: None,
            target: None,
            project: None,
            detail: Value::Null,
        }
    }
}

/// An entry as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When it was written, RFC 3339 UTC.
    pub at: String,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous entry's hash.
    pub prev: String,
    /// This entry's hash.
    pub hash: String,
}

/// The audit log could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A file operation failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The last entry cannot be read, so the chain cannot be continued.
    #[error("audit log {path} ends with a damaged entry ({why}); run `vaultgate audit verify`")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An event could not be encoded.
    #[error("audit event could not be encoded: {0}")]
    Encode(String),
    /// An earlier write failed halfway and could not be undone; the log
    /// refuses further appends (fail closed).
    #[error("audit log {0} is unwritable after a failed write")]
    Broken(PathBuf),
    /// The path no longer names the file the log opened (moved, removed or
    /// replaced); appends are refused so none goes where nobody reads.
    #[error("audit log {0} was moved, removed or replaced")]
    Moved(PathBuf),
    /// The backend holding the chain (a database) failed; the message
    /// names no password.
    #[error("audit chain: {0}")]
    Backend(String),
}

/// The hash-chained audit log, safe to share between threads.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    clock: SharedClock,
    /// Shared with the handles [`AuditTrail`] moves to the blocking pool.
    state: Arc<Mutex<ChainState>>,
    /// The file the path named when it was opened.
    identity: Option<FileIdentity>,
}

/// Which file a path names: device and inode on Unix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
}

#[cfg(unix)]
fn file_identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.is_file().then(|| FileIdentity {
        dev: m.dev(),
        ino: m.ino(),
    })
}

#[cfg(not(unix))]
fn file_identity(_path: &Path) -> Option<FileIdentity> {
    None
}

#[derive(Debug)]
struct ChainState {
    file: File,
    /// The file's length after this handle's last read or write: when it
    /// differs, another process appended and the chain head is re-read.
    len: u64,
    /// The last written entry's seq (0 when empty).
    seq: u64,
    /// The last written entry's hash.
    prev: String,
    broken: bool,
}

impl AuditLog {
    /// Opens (creating with mode 0600) the log at `path` and continues its
    /// chain, timestamping with the system clock.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        AuditLog::open_with_clock(path, std::sync::Arc::new(SystemClock))
    }

    /// [`open`](Self::open) with a given clock.
    pub fn open_with_clock(path: &Path, clock: SharedClock) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        let (seq, prev) = chain_head(&mut file, path)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(AuditLog {
            path: path.to_owned(),
            clock,
            state: Arc::new(Mutex::new(ChainState {
                file,
                len,
                seq,
                prev,
                broken: false,
            })),
            identity: file_identity(path),
        })
    }

    /// A second handle on the same open file and chain.
    fn handle(&self) -> AuditLog {
        AuditLog {
            path: self.path.clone(),
            clock: self.clock.clone(),
            state: self.state.clone(),
            identity: self.identity,
        }
    }

    /// Whether the path still names the file opened (always true where
    /// files have no identity to compare).
    fn still_at_path(&self) -> bool {
        self.identity.is_none() || file_identity(&self.path) == self.identity
    }

    /// The file this log writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and `fsync`s it before returning. Blocking: use
    /// `spawn_blocking` from async code. On error nothing is acknowledged,
    /// and the caller must not apply the mutation it audits (L2).
    pub fn append(&self, event: AuditEvent) -> Result<AuditEntry, AuditError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.broken {
            return Err(AuditError::Broken(self.path.clone()));
        }
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        // Several processes may append (the server and the CLI on one data
        // directory): an exclusive advisory lock serialises them, and the
        // chain head is re-read when another process wrote since.
        state.file.lock().map_err(io)?;
        let result = self.append_locked(&mut state, event);
        let unlocked = state.file.unlock();
        let entry = result?;
        unlocked.map_err(io)?;
        Ok(entry)
    }

    fn append_locked(
        &self,
        state: &mut ChainState,
        event: AuditEvent,
    ) -> Result<AuditEntry, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let len = state.file.metadata().map_err(io)?.len();
        if len != state.len {
            let (seq, prev) = chain_head(&mut state.file, &self.path)?;
            state.seq = seq;
            state.prev = prev;
            state.len = len;
        }
        let seq = state.seq.saturating_add(1);
        let at = self.clock.now().to_rfc3339();
        let (line, hash) = encode_line(seq, &at, &event, &state.prev)?;

        let before = state.len;
        let written = state
            .file
            .write_all(&line)
            .and_then(|()| state.file.sync_data());
        if let Err(source) = written {
            // Undo a partial line so the file stays a valid chain.
            let undone = state
                .file
                .set_len(before)
                .and_then(|()| state.file.sync_data());
            if undone.is_err() {
                state.broken = true;
            }
            return Err(io(source));
        }
        let prev = std::mem::replace(&mut state.prev, hash.clone());
        state.seq = seq;
        state.len = before + line.len() as u64;
        Ok(AuditEntry {
            seq,
            at,
            event,
            prev,
            hash,
        })
    }
}

/// Encodes an entry as every backend stores it: the line's bytes (without
/// a newline) and its hash. A chain stored elsewhere (a database) keeps
/// exactly these bytes, so it verifies as the file does.
pub fn encode_entry(
    seq: u64,
    at: &str,
    event: &AuditEvent,
    prev: &str,
) -> Result<(String, String), AuditError> {
    let (mut line, hash) = encode_line(seq, at, event, prev)?;
    line.pop(); // the newline
    let line = String::from_utf8(line).map_err(|e| AuditError::Encode(e.to_string()))?;
    Ok((line, hash))
}

/// Encodes an entry: the canonical bytes, their hash, then the full line
/// with its newline.
fn encode_line(
    seq: u64,
    at: &str,
    event: &AuditEvent,
    prev: &str,
) -> Result<(Vec<u8>, String), AuditError> {
    #[derive(Serialize)]
    struct Canonical<'a> {
        seq: u64,
        at: &'a str,
        #[serde(flatten)]
        event: &'a AuditEvent,
        prev: &'a str,
    }
    let mut bytes = serde_json::to_vec(&Canonical {
        seq,
        at,
        event,
        prev,
    })
    .map_err(|e| AuditError::Encode(e.to_string()))?;
    if bytes.contains(&b'\n') {
        // serde_json escapes newlines in strings; this cannot happen.
        return Err(AuditError::Encode("newline in entry".to_owned()));
    }
    let hash = sha256_hex(&bytes);
    bytes.pop(); // the closing `}`
    bytes.extend_from_slice(b",\"hash\":\"");
    bytes.extend_from_slice(hash.as_bytes());
    bytes.extend_from_slice(b"\"}\n");
    Ok((bytes, hash))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// The last line of the file with its newline, read backwards in blocks.
/// A file that does not end with a newline ends with a torn line, returned
/// without one so that the caller reports it.
/// The last entry's seq and hash (0 and the genesis hash for an empty
/// file); a damaged last line is an error, so appends fail closed.
fn chain_head(file: &mut File, path: &Path) -> Result<(u64, String), AuditError> {
    let line = last_line(file).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let Some(line) = line else {
        return Ok((0, GENESIS_PREV.to_owned()));
    };
    let corrupt = |why: String| AuditError::Corrupt {
        path: path.to_owned(),
        why,
    };
    let line = line
        .strip_suffix(b"\n")
        .ok_or_else(|| corrupt(Problem::Truncated.to_string()))?;
    let entry = check_line(line).map_err(|p| corrupt(p.to_string()))?;
    Ok((entry.seq, entry.hash))
}

fn last_line(file: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    const BLOCK: u64 = 8192;
    loop {
        let start = pos.saturating_sub(BLOCK);
        let mut block = vec![0; usize::try_from(pos - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&tail);
        tail = block;
        pos = start;
        // Skip the file's final newline when looking for the line start.
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if let Some(i) = body.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(tail[i + 1..].to_vec()));
        }
        if pos == 0 {
            return Ok(Some(tail));
        }
    }
}

/// What is wrong with an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The line is not a complete JSON object (edited or truncated).
    InvalidJson,
    /// The line does not end with a well-formed `hash` field.
    MissingHash,
    /// A required field is absent or has the wrong type.
    MissingField(&'static str),
    /// The hash does not match the entry's bytes (edited).
    HashMismatch,
    /// The sequence number is not the next one (removed, reordered).
    SeqGap {
        /// The number expected.
        expected: u64,
        /// The number found.
        found: u64,
    },
    /// `prev` is not the previous entry's hash (removed, reordered, inserted).
    PrevMismatch,
    /// An empty line inside the log.
    EmptyLine,
    /// The last line has no newline: a write was cut short.
    Truncated,
    /// A database row's `seq`, `prev` or `hash` column differs from its
    /// entry's own (a column edited alone).
    RowMismatch,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::InvalidJson => f.write_str("not a valid JSON entry (edited or truncated)"),
            Problem::MissingHash => f.write_str("no well-formed hash field at the end"),
            Problem::MissingField(name) => write!(f, "field {name} is missing or invalid"),
            Problem::HashMismatch => f.write_str("hash does not match the entry (edited)"),
            Problem::SeqGap { expected, found } => {
                write!(f, "sequence {found} where {expected} was expected (entry removed, inserted or reordered)")
            }
            Problem::PrevMismatch => {
                f.write_str("prev does not match the previous entry's hash (entry removed, inserted or reordered)")
            }
            Problem::EmptyLine => f.write_str("empty line"),
            Problem::Truncated => f.write_str("the last line is incomplete (truncated)"),
            Problem::RowMismatch => {
                f.write_str("the row's seq, prev or hash column does not match its entry (edited)")
            }
        }
    }
}

/// Verification failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The file could not be read (a missing file is an error: deleting the
    /// log must not pass as an empty one).
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The first bad entry.
    #[error("audit log broken at line {line}{}: {problem}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    BadEntry {
        /// 1-based line number.
        line: u64,
        /// The entry's sequence number, when readable.
        seq: Option<u64>,
        /// What is wrong.
        problem: Problem,
    },
    /// The first bad entry of a chain kept in a database table.
    #[error("audit chain broken at row {row}{}: {problem}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    BadRow {
        /// 1-based position in `seq` order.
        row: u64,
        /// The entry's sequence number.
        seq: Option<u64>,
        /// What is wrong.
        problem: Problem,
    },
    /// The table's head row does not match its last entry: entries at the
    /// end were removed (or added without moving the head).
    #[error(
        "audit chain: the head names seq {head_seq} but the last entry is seq {last_seq} (entries at the end removed or added)"
    )]
    HeadMismatch {
        /// The seq the head row records.
        head_seq: u64,
        /// The seq of the last entry found.
        last_seq: u64,
    },
    /// The backend holding the chain could not be read; the message names
    /// no password.
    #[error("audit chain: {0}")]
    Backend(String),
}

/// A verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// The last entry's hash (the genesis value for an empty log); record it
    /// elsewhere to detect a cut-off tail later.
    pub last_hash: String,
}

/// The fields a line must have, checked against its own bytes.
struct CheckedLine {
    seq: u64,
    prev: String,
    hash: String,
}

/// Checks one line on its own: valid JSON, required fields, and a hash that
/// matches its bytes. On error, also the seq when readable.
fn check_line(line: &[u8]) -> Result<CheckedLine, Problem> {
    let value: Value = serde_json::from_slice(line).map_err(|_| Problem::InvalidJson)?;
    let object = value.as_object().ok_or(Problem::InvalidJson)?;
    let seq = object
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or(Problem::MissingField("seq"))?;
    let prev = object
        .get("prev")
        .and_then(Value::as_str)
        .ok_or(Problem::MissingField("prev"))?;
    let hash = object
        .get("hash")
        .and_then(Value::as_str)
        .ok_or(Problem::MissingHash)?;
    let split = line
        .len()
        .checked_sub(HASH_SUFFIX_LEN)
        .ok_or(Problem::MissingHash)?;
    let suffix = &line[split..];
    let well_formed = suffix.starts_with(b",\"hash\":\"")
        && suffix.ends_with(b"\"}")
        && &suffix[9..9 + 64] == hash.as_bytes()
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed {
        return Err(Problem::MissingHash);
    }
    let mut canonical = line[..split].to_vec();
    canonical.push(b'}');
    if sha256_hex(&canonical) != hash {
        return Err(Problem::HashMismatch);
    }
    Ok(CheckedLine {
        seq,
        prev: prev.to_owned(),
        hash: hash.to_owned(),
    })
}

/// Verifies the whole chain at `path`, naming the first bad entry.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let io = |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut expected_prev = GENESIS_PREV.to_owned();
    let mut entries = 0u64;
    let mut line_no = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
            return Ok(VerifyReport {
                entries,
                last_hash: expected_prev,
            });
        }
        line_no += 1;
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        let seq_hint = || {
            serde_json::from_slice::<Value>(&line)
                .ok()
                .and_then(|v| v.get("seq").and_then(Value::as_u64))
        };
        let bad = |problem, seq| VerifyError::BadEntry {
            line: line_no,
            seq,
            problem,
        };
        if line.is_empty() {
            return Err(bad(Problem::EmptyLine, None));
        }
        let checked = match check_line(&line) {
            Ok(checked) => checked,
            Err(Problem::InvalidJson) if !complete => return Err(bad(Problem::Truncated, None)),
            Err(problem) => return Err(bad(problem, seq_hint())),
        };
        if !complete {
            return Err(bad(Problem::Truncated, Some(checked.seq)));
        }
        let expected_seq = entries + 1;
        if checked.seq != expected_seq {
            return Err(bad(
                Problem::SeqGap {
                    expected: expected_seq,
                    found: checked.seq,
                },
                Some(checked.seq),
            ));
        }
        if checked.prev != expected_prev {
            return Err(bad(Problem::PrevMismatch, Some(checked.seq)));
        }
        entries += 1;
        expected_prev = checked.hash;
    }
}

/// The last `n` entries, oldest first. A missing file has none.
pub fn tail(path: &Path, n: usize) -> Result<Vec<Value>, AuditError> {
    let filter = AuditFilter {
        limit: n,
        ..AuditFilter::default()
    };
    let mut entries = read_entries(path, &filter)?;
    entries.reverse();
    Ok(entries)
}

/// Which entries [`read_entries`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this project's entries.
    pub project: Option<String>,
    /// Only entries with a smaller `seq` (paging backwards).
    pub before_seq: Option<u64>,
    /// At most this many entries.
    pub limit: usize,
}

impl Default for AuditFilter {
    fn default() -> Self {
        AuditFilter {
            project: None,
            before_seq: None,
            limit: 100,
        }
    }
}

/// Entries matching `filter`, newest first (for `GET /v1/audit`). Lines
/// that do not parse are skipped here; [`verify`] is the place that reports
/// them. A missing file has no entries.
pub fn read_entries(path: &Path, filter: &AuditFilter) -> Result<Vec<Value>, AuditError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut kept: VecDeque<Value> = VecDeque::with_capacity(filter.limit.min(1024));
    if filter.limit == 0 {
        return Ok(Vec::new());
    }
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| AuditError::Io {
                path: path.to_owned(),
                source,
            })?;
        if read == 0 {
            break;
        }
        let Ok(entry) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        let other_project = filter
            .project
            .as_ref()
            .is_some_and(|p| entry.get("project").and_then(Value::as_str) != Some(p.as_str()));
        let too_new = filter.before_seq.is_some_and(|before| {
            entry
                .get("seq")
                .and_then(Value::as_u64)
                .is_none_or(|seq| seq >= before)
        });
        if other_project || too_new {
            continue;
        }
        if kept.len() == filter.limit {
            kept.pop_front();
        }
        kept.push_back(entry);
    }
    Ok(kept.into_iter().rev().collect())
}
