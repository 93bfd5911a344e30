//! [`AuditTrail`]: where the hash chain is kept, behind one trait — the
//! JSON-lines file of one data directory ([`AuditLog`], the default) or a
//! table shared by several replicas (vault-postgres's `PostgresAudit`,
//! docs/replicas.md#the-audit-chain).
//!
//! Every backend stores each entry as the exact bytes [`encode_entry`]
//! produced, so a chain copied from one backend to another verifies
//! identically, and [`ChainVerifier`] checks a chain read from anywhere
//! with the rules of the file's [`verify`].

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use serde_json::Value;

use super::{
    AuditEntry, AuditError, AuditEvent, AuditFilter, AuditLog, GENESIS_PREV, Problem, VerifyError,
    VerifyReport, check_line, read_entries, verify,
};

/// Where audit entries are appended, verified and read. Appends are
/// durable when they return: a caller applies the mutation it audits only
/// after `append` succeeded (docs/threat-model.md, L2).
#[async_trait]
pub trait AuditTrail: Send + Sync + fmt::Debug {
    /// Appends one entry (seq and `prev` continuing the chain, whoever else
    /// appends at the same time) and makes it durable.
    async fn append(&self, event: AuditEvent) -> Result<AuditEntry, AuditError>;

    /// Verifies the whole chain, naming the first bad entry.
    async fn verify(&self) -> Result<VerifyReport, VerifyError>;

    /// Entries matching `filter`, newest first (for `GET /v1/audit`).
    async fn read(&self, filter: &AuditFilter) -> Result<Vec<Value>, AuditError>;

    /// The last `n` entries, oldest first.
    async fn tail(&self, n: usize) -> Result<Vec<Value>, AuditError> {
        let filter = AuditFilter {
            limit: n,
            ..AuditFilter::default()
        };
        let mut entries = self.read(&filter).await?;
        entries.reverse();
        Ok(entries)
    }
}

/// Runs blocking file work off the async runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

fn lost(path: &Path) -> AuditError {
    AuditError::Io {
        path: path.to_owned(),
        source: std::io::Error::other("the audit task was cancelled"),
    }
}

#[async_trait]
impl AuditTrail for AuditLog {
    /// [`AuditLog::append`] on the blocking pool, after checking that the
    /// path still names the file opened: a log moved, removed or replaced
    /// (by a directory, say) would otherwise take appends nobody can read
    /// any more (docs/threat-model.md, L2).
    async fn append(&self, event: AuditEvent) -> Result<AuditEntry, AuditError> {
        let log = self.handle();
        let path = self.path().to_owned();
        blocking(move || {
            if !log.still_at_path() {
                tracing::error!(path = %log.path().display(), "the audit log was moved, removed or replaced");
                return Err(AuditError::Moved(log.path().to_owned()));
            }
            log.append(event)
        })
        .await
        .unwrap_or_else(|_| Err(lost(&path)))
    }

    async fn verify(&self) -> Result<VerifyReport, VerifyError> {
        let path = self.path().to_owned();
        let at = path.clone();
        blocking(move || verify(&path)).await.unwrap_or_else(|_| {
            Err(VerifyError::Io {
                path: at,
                source: std::io::Error::other("the audit task was cancelled"),
            })
        })
    }

    async fn read(&self, filter: &AuditFilter) -> Result<Vec<Value>, AuditError> {
        let (path, filter) = (self.path().to_owned(), filter.clone());
        let at = path.clone();
        blocking(move || read_entries(&path, &filter))
            .await
            .unwrap_or_else(|_| Err(lost(&at)))
    }
}

/// Checks a chain entry by entry, in `seq` order, with the rules of the
/// file's [`verify`]: each entry's hash matches its bytes, seqs count from
/// 1 without gaps, and each `prev` is the previous entry's hash.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    entries: u64,
    expected_prev: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            entries: 0,
            expected_prev: GENESIS_PREV.to_owned(),
        }
    }
}

/// One entry's fields, as [`ChainVerifier::next`] read them from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// The entry's seq.
    pub seq: u64,
    /// The previous entry's hash, as the entry records it.
    pub prev: String,
    /// The entry's own hash.
    pub hash: String,
}

impl ChainVerifier {
    /// A verifier expecting the first entry.
    pub fn new() -> Self {
        ChainVerifier::default()
    }

    /// Checks the next entry, given as its exact bytes (one line of the
    /// file, without the newline). On error, what is wrong and the entry's
    /// seq when readable.
    pub fn next(&mut self, line: &[u8]) -> Result<ChainLink, (Problem, Option<u64>)> {
        let checked = check_line(line).map_err(|p| (p, seq_hint(line)))?;
        let expected = self.entries + 1;
        if checked.seq != expected {
            return Err((
                Problem::SeqGap {
                    expected,
                    found: checked.seq,
                },
                Some(checked.seq),
            ));
        }
        if checked.prev != self.expected_prev {
            return Err((Problem::PrevMismatch, Some(checked.seq)));
        }
        self.entries = expected;
        self.expected_prev.clone_from(&checked.hash);
        Ok(ChainLink {
            seq: checked.seq,
            prev: checked.prev,
            hash: checked.hash,
        })
    }

    /// Entries checked so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The report of a chain that ended here.
    pub fn finish(self) -> VerifyReport {
        VerifyReport {
            entries: self.entries,
            last_hash: self.expected_prev,
        }
    }
}

/// The `seq` of an entry that failed a check, when its JSON still has one.
pub(super) fn seq_hint(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("seq").and_then(Value::as_u64))
}
