//! [`PostgresAudit`]: the audit chain in PostgreSQL, appended to by any
//! number of replicas (docs/replicas.md#the-audit-chain).
//!
//! Each row of `audit_entries` holds an entry's exact bytes as the file
//! format writes them ([`encode_entry`]), with its seq, prev and hash
//! repeated in columns. An append is one transaction that locks the chain
//! head (`audit_head`, one row) `FOR UPDATE`, so appends from every replica
//! are serialised: each continues the chain from the head the previous one
//! committed. Verify reads the chain and the head in one snapshot, so it
//! can run while replicas append.

use std::fmt;

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::GenericClient;
use vault_core::audit::{
    AuditEntry, AuditError, AuditEvent, AuditFilter, AuditTrail, ChainVerifier, Problem,
    VerifyError, VerifyReport, encode_entry,
};
use vault_core::clock::{SharedClock, SystemClock};

use crate::{PostgresError, PostgresStore};

/// Rows read per round trip while verifying.
const VERIFY_PAGE: i64 = 1_000;

/// The audit chain in the database of a [`PostgresStore`], sharing its
/// connection pool. `Debug` names the database, never a password.
#[derive(Clone)]
pub struct PostgresAudit {
    store: PostgresStore,
    clock: SharedClock,
}

impl fmt::Debug for PostgresAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresAudit")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn backend(what: &str, e: &tokio_postgres::Error) -> String {
    format!("{what}: {}", crate::connect::describe(e))
}

impl PostgresAudit {
    /// The chain in `store`'s database, timestamped by the system clock.
    pub fn new(store: &PostgresStore) -> Self {
        PostgresAudit::with_clock(store, std::sync::Arc::new(SystemClock))
    }

    /// [`new`](Self::new) with a given clock.
    pub fn with_clock(store: &PostgresStore, clock: SharedClock) -> Self {
        PostgresAudit {
            store: store.clone(),
            clock,
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        self.store.client().await.map_err(|e| e.to_string())
    }

    async fn append_once(&self, event: &AuditEvent) -> Result<AuditEntry, String> {
        let mut conn = self.client().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| backend("starting an append", &e))?;
        // Held until commit: the next append, from any replica, waits here.
        let head = tx
            .query_one("SELECT seq, hash FROM audit_head FOR UPDATE", &[])
            .await
            .map_err(|e| backend("locking the chain head", &e))?;
        let (seq, prev): (i64, String) = columns(&head)?;
        let seq = u64::try_from(seq).unwrap_or(0).saturating_add(1);
        let at = self.clock.now().to_rfc3339();
        let (line, hash) = encode_entry(seq, &at, event, &prev).map_err(|e| e.to_string())?;
        let db_seq = i64::try_from(seq).map_err(|_| "the chain is full".to_owned())?;
        tx.execute(
            "INSERT INTO audit_entries (seq, project, prev, hash, entry) VALUES ($1, $2, $3, $4, $5)",
            &[&db_seq, &event.project, &prev, &hash, &line],
        )
        .await
        .map_err(|e| backend("writing the entry", &e))?;
        tx.execute(
            "UPDATE audit_head SET seq = $1, hash = $2",
            &[&db_seq, &hash],
        )
        .await
        .map_err(|e| backend("moving the chain head", &e))?;
        tx.commit()
            .await
            .map_err(|e| backend("committing the entry", &e))?;
        Ok(AuditEntry {
            seq,
            at,
            event: event.clone(),
            prev,
            hash,
        })
    }

    /// Copies a chain given as its entries' exact bytes (the lines of a
    /// verified `audit.jsonl`, without newlines) into an empty table, or
    /// continues a table holding a prefix of it; entries already there
    /// must be byte-for-byte the same, else nothing is written
    /// ([`PostgresError::Conflict`]). A table whose chain went on after an
    /// earlier copy (replicas appended) is left alone. Returns how many
    /// entries were copied and how many were already present.
    pub async fn copy_chain(&self, lines: &[String]) -> Result<(usize, usize), PostgresError> {
        let fail = |what: &str, e: &tokio_postgres::Error| PostgresError::Backend(backend(what, e));
        let mut conn = self.store.client().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| fail("starting the chain copy", &e))?;
        let head = tx
            .query_one("SELECT seq, hash FROM audit_head FOR UPDATE", &[])
            .await
            .map_err(|e| fail("locking the chain head", &e))?;
        let (head_seq, _) = columns(&head).map_err(PostgresError::Backend)?;
        let have = usize::try_from(head_seq).unwrap_or(0);
        let rows = tx
            .query(
                "SELECT entry FROM audit_entries WHERE seq <= $1 ORDER BY seq",
                &[&i64::try_from(lines.len()).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(|e| fail("reading the chain", &e))?;
        let common = have.min(lines.len());
        for (i, line) in lines.iter().take(common).enumerate() {
            let same = rows
                .get(i)
                .and_then(|r| r.try_get::<_, &str>(0).ok())
                .is_some_and(|entry| entry == line);
            if !same {
                return Err(PostgresError::Conflict(format!(
                    "the target's audit chain differs from the file at seq {}",
                    i + 1
                )));
            }
        }
        for (i, line) in lines.iter().enumerate().skip(common) {
            insert_line(&tx, i + 1, line).await?;
        }
        if let Some(last) = lines.last().filter(|_| lines.len() > have) {
            let (seq, hash) = (
                i64::try_from(lines.len()).unwrap_or(i64::MAX),
                field(last, "hash")?,
            );
            tx.execute("UPDATE audit_head SET seq = $1, hash = $2", &[&seq, &hash])
                .await
                .map_err(|e| fail("moving the chain head", &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| fail("committing the chain copy", &e))?;
        Ok((lines.len() - common, common))
    }

    async fn verify_inner(&self) -> Result<VerifyReport, VerifyError> {
        let fail = |what: &str, e: &tokio_postgres::Error| VerifyError::Backend(backend(what, e));
        let mut conn = self.client().await.map_err(VerifyError::Backend)?;
        let tx = conn
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| fail("starting verify", &e))?;
        let head = tx
            .query_one("SELECT seq, hash FROM audit_head", &[])
            .await
            .map_err(|e| fail("reading the chain head", &e))?;
        let (head_seq, head_hash): (i64, String) = columns(&head).map_err(VerifyError::Backend)?;
        let mut verifier = ChainVerifier::new();
        let mut after = 0i64;
        loop {
            let rows = tx
                .query(
                    "SELECT seq, prev, hash, entry, project FROM audit_entries WHERE seq > $1
                     ORDER BY seq LIMIT $2",
                    &[&after, &VERIFY_PAGE],
                )
                .await
                .map_err(|e| fail("reading the chain", &e))?;
            for row in &rows {
                check_row(&mut verifier, row)?;
            }
            match rows.last() {
                Some(last) => after = last.try_get(0).map_err(|_| wrong_type())?,
                None => break,
            }
        }
        let report = verifier.finish();
        let last_seq = report.entries;
        if u64::try_from(head_seq).ok() != Some(last_seq) || head_hash != report.last_hash {
            return Err(VerifyError::HeadMismatch {
                head_seq: u64::try_from(head_seq).unwrap_or(0),
                last_seq,
            });
        }
        Ok(report)
    }
}

/// A string field of an entry's JSON (`hash`, `prev`; `project` may be
/// absent).
fn field(line: &str, name: &str) -> Result<String, PostgresError> {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get(name).and_then(Value::as_str).map(str::to_owned))
        .ok_or_else(|| PostgresError::Conflict(format!("an audit entry has no {name}")))
}

/// Inserts one copied entry at `seq`.
async fn insert_line(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: usize,
    line: &str,
) -> Result<(), PostgresError> {
    let project = field(line, "project").ok();
    let (prev, hash) = (field(line, "prev")?, field(line, "hash")?);
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO audit_entries (seq, project, prev, hash, entry) VALUES ($1, $2, $3, $4, $5)",
        &[&seq, &project, &prev, &hash, &line],
    )
    .await
    .map_err(|e| PostgresError::Backend(backend("copying an audit entry", &e)))?;
    Ok(())
}

/// A head row's seq and hash.
fn columns(row: &tokio_postgres::Row) -> Result<(i64, String), String> {
    let read = || -> Result<(i64, String), tokio_postgres::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?))
    };
    read().map_err(|_| "the chain head has columns of the wrong type".to_owned())
}

fn wrong_type() -> VerifyError {
    VerifyError::Backend("audit_entries has columns of the wrong type".to_owned())
}

/// Checks one row: its entry against the chain, then its columns against
/// its entry (a column edited alone is named too, `project` included: reads
/// filter on it).
fn check_row(verifier: &mut ChainVerifier, row: &tokio_postgres::Row) -> Result<(), VerifyError> {
    let position = verifier.entries() + 1;
    type Columns = (i64, String, String, String, Option<String>);
    let read = || -> Result<Columns, tokio_postgres::Error> {
        Ok((
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
        ))
    };
    let (seq, prev, hash, entry, project) = read().map_err(|_| wrong_type())?;
    let bad = |problem, seq| VerifyError::BadRow {
        row: position,
        seq,
        problem,
    };
    let link = verifier
        .next(entry.as_bytes())
        .map_err(|(problem, s)| bad(problem, s.or(u64::try_from(seq).ok())))?;
    let entry_project = field(&entry, "project").ok();
    if u64::try_from(seq).ok() != Some(link.seq)
        || prev != link.prev
        || hash != link.hash
        || project != entry_project
    {
        return Err(bad(Problem::RowMismatch, Some(link.seq)));
    }
    Ok(())
}

#[async_trait]
impl AuditTrail for PostgresAudit {
    async fn append(&self, event: AuditEvent) -> Result<AuditEntry, AuditError> {
        self.append_once(&event).await.map_err(AuditError::Backend)
    }

    async fn verify(&self) -> Result<VerifyReport, VerifyError> {
        self.verify_inner().await
    }

    async fn read(&self, filter: &AuditFilter) -> Result<Vec<Value>, AuditError> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        let conn = self.client().await.map_err(AuditError::Backend)?;
        let before = filter
            .before_seq
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let rows = conn
            .client()
            .query(
                "SELECT entry FROM audit_entries
                 WHERE ($1::TEXT IS NULL OR project = $1) AND ($2::BIGINT IS NULL OR seq < $2)
                 ORDER BY seq DESC LIMIT $3",
                &[&filter.project, &before, &limit],
            )
            .await
            .map_err(|e| AuditError::Backend(backend("reading entries", &e)))?;
        // As the file's read: an entry that does not parse is skipped here;
        // verify is the place that reports it. The project is checked on the
        // entry itself too, so an edited column never shows another
        // project's entry.
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r.try_get::<_, &str>(0).ok()?).ok())
            .filter(|e| {
                filter
                    .project
                    .as_deref()
                    .is_none_or(|p| e.get("project").and_then(Value::as_str) == Some(p))
            })
            .collect())
    }
}
