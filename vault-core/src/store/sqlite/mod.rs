//! [`SqliteStore`]: the embedded default, one SQLite file in WAL mode that
//! several processes may share.
//!
//! One writer connection behind a `std::sync::Mutex` runs every write in a
//! `BEGIN IMMEDIATE` transaction, so budget checks and the writes they guard
//! are atomic across tasks and across processes (the `busy_timeout` makes a
//! second process wait for the file's write lock instead of failing). Reads
//! use a small pool of reader connections, which WAL lets run alongside the
//! writer. All SQLite work runs on tokio's blocking pool, never on an async
//! worker thread.
//!
//! Keys, provider keys, revocations and metadata commit with
//! `synchronous=FULL` (durable, even against power loss, when the call
//! returns); reservations, settlements and usage with `NORMAL` (durable
//! against a process crash, and at the next checkpoint against power loss).

mod bulk;
mod export;
mod page;
mod rows;
mod schema;
mod sessions;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Params, Transaction, TransactionBehavior, params};

use self::rows::{
    KEY_COLUMNS, PROVIDER_KEY_COLUMNS, USAGE_COLUMNS, count, key_from_row, money,
    provider_key_from_row, read_money, to_json, usage_from_row,
};
use super::budget::{check_carve_out, close_carve_out, pass_through, reservable};
use super::{KeyPage, KeyPageQuery, KeyStore, StoreError};
use crate::clock::UnixMillis;
use crate::crypto::Sealed;
use crate::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::record::{
    BudgetLine, BudgetUsage, KeyRecord, ProviderKeyRecord, Reservation, ReservationId, SettledBy,
    Settlement, UsageFilter, UsageRecord,
};

/// How long a connection waits for another's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Reader connections, each open for the store's lifetime once made. Reads
/// beyond this many wait their turn (before taking a blocking thread)
/// instead of opening a connection for one query: opening costs more than
/// the query (the schema is parsed again), and every connection grows its
/// own page cache.
const MAX_READERS: usize = 4;
/// Each reader's page cache, in KiB (SQLite's default is 2,000). Readers
/// serve key-cache misses and listings: the pages they share stay in the
/// OS's file cache, one `pread` away, instead of once per connection in
/// this process.
const READER_CACHE_KIB: i64 = 512;

/// Children whose carve-out is open and whose key has expired (?1: now).
/// Driven from `carve_outs` (open carve-outs only) with a primary-key probe
/// into `keys` per row: as a plain join SQLite scans every key (150 ms with
/// 1M keys, holding the write lock that budget reservations wait for).
const EXPIRED_CARVE_OUTS: &str = "SELECT c.child_id FROM carve_outs c
     WHERE NOT EXISTS (SELECT 1 FROM closed_carve_outs x WHERE x.child_id = c.child_id)
     AND EXISTS (
     SELECT 1 FROM keys k
     WHERE k.id = c.child_id AND k.expires_at IS NOT NULL AND k.expires_at <= ?1)";

/// The database file's name inside a data directory.
pub const DB_FILE_NAME: &str = "vaultgate.db";

/// The SQLite store.
///
/// ```
/// use vault_core::store::{KeyStore, SqliteStore};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteStore::open_in_dir(&dir.path().join("data")).unwrap();
/// store.set_meta("hello", "world").await.unwrap();
/// assert_eq!(store.get_meta("hello").await.unwrap().as_deref(), Some("world"));
/// # });
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Writer>,
    /// Idle reader connections; at most [`MAX_READERS`] exist.
    readers: Mutex<Vec<Connection>>,
    /// One permit per reader connection.
    read_slots: Arc<tokio::sync::Semaphore>,
}

struct Writer {
    conn: Connection,
    durability: Durability,
}

/// How hard a write transaction's commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// `synchronous=FULL`: on disk when the commit returns.
    Full,
    /// `synchronous=NORMAL`: survives a process crash; reaches the disk at
    /// the next checkpoint.
    Normal,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// A rusqlite failure as a store error. Constraint violations (a duplicate
/// id or hash that slipped past a check) are conflicts.
fn backend(e: rusqlite::Error) -> StoreError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
        return StoreError::Conflict;
    }
    StoreError::Backend(e.to_string())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`: WAL mode, a 5 s
    /// busy timeout, foreign keys on, and the schema migrated to this
    /// build's version. A database written by a newer build is refused.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = open_connection(path)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(backend)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "{} could not be switched to WAL mode (journal mode is {mode})",
                path.display()
            )));
        }
        schema::migrate(&mut conn)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(Writer {
                    conn,
                    durability: Durability::Full,
                }),
                readers: Mutex::new(Vec::new()),
                read_slots: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
            }),
        })
    }

    /// Opens `data_dir/vaultgate.db`, creating the directory (mode 0700 on
    /// unix) if it does not exist.
    pub fn open_in_dir(data_dir: &Path) -> Result<Self, StoreError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(data_dir)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", data_dir.display())))?;
        Self::open(&data_dir.join(DB_FILE_NAME))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in one immediate write transaction on the blocking pool.
    async fn write<T, F>(&self, durability: Durability, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || {
            let mut guard = inner
                .writer
                .lock()
                .map_err(|_| StoreError::Backend("sqlite writer lock poisoned".to_owned()))?;
            let writer = &mut *guard;
            if writer.durability != durability {
                let level = match durability {
                    Durability::Full => "FULL",
                    Durability::Normal => "NORMAL",
                };
                writer
                    .conn
                    .pragma_update(None, "synchronous", level)
                    .map_err(backend)?;
                writer.durability = durability;
            }
            let tx = writer
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            // On error `tx` is dropped, which rolls back.
            let out = f(&tx)?;
            tx.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }

    /// Runs `f` on a reader connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let slot = inner
            .read_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Backend("sqlite reader slots closed".to_owned()))?;
        blocking(move || {
            // Held while the connection is in use, even if the caller stops
            // waiting for the result.
            let _slot = slot;
            let pooled = inner
                .readers
                .lock()
                .map_err(|_| StoreError::Backend("sqlite reader pool poisoned".to_owned()))?
                .pop();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let c = open_connection(&inner.path)?;
                    c.pragma_update(None, "query_only", true).map_err(backend)?;
                    c.pragma_update(None, "cache_size", READER_CACHE_KIB.wrapping_neg())
                        .map_err(backend)?;
                    c
                }
            };
            let out = f(&conn);
            if let Ok(mut pool) = inner.readers.lock() {
                pool.push(conn);
            }
            out
        })
        .await
    }
}

async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite task failed: {e}")))?
}

// ---------------------------------------------------------------- queries

fn query_keys<P: Params>(
    conn: &Connection,
    tail: &str,
    params: P,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM keys {tail}");
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let mut rows = stmt.query(params).map_err(backend)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        out.push(key_from_row(row)?);
    }
    Ok(out)
}

fn query_provider_keys<P: Params>(
    conn: &Connection,
    tail: &str,
    params: P,
) -> Result<Vec<ProviderKeyRecord>, StoreError> {
    let sql = format!("SELECT {PROVIDER_KEY_COLUMNS} FROM provider_keys {tail}");
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let mut rows = stmt.query(params).map_err(backend)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        out.push(provider_key_from_row(row)?);
    }
    Ok(out)
}

fn key_exists(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM keys WHERE id = ?1")
        .and_then(|mut s| s.exists([id]))
        .map_err(backend)
}

/// Whether `hash` is any key's current or previous hash, other than `except`'s.
fn hash_in_use(conn: &Connection, hash: &KeyHash, except: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM keys WHERE (hash = ?1 OR previous_hash = ?1) AND id <> ?2")
        .and_then(|mut s| s.exists(params![hash.to_hex(), except]))
        .map_err(backend)
}

/// Sums an `amount` column with saturation (SQL `SUM` would overflow).
fn sum_amounts(conn: &Connection, sql: &str, key: &str, period: i64) -> Result<Micros, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let mut rows = stmt.query(params![key, period]).map_err(backend)?;
    let mut total = Micros::ZERO;
    while let Some(row) = rows.next().map_err(backend)? {
        let v: i64 = row.get(0).map_err(backend)?;
        total = total.saturating_add(read_money(v, "a held amount")?);
    }
    Ok(total)
}

fn settled_of(conn: &Connection, key: &str, period: i64) -> Result<Micros, StoreError> {
    let v: Option<i64> = conn
        .prepare_cached(
            "SELECT settled FROM budget_settled WHERE key_id = ?1 AND period_start = ?2",
        )
        .and_then(|mut s| s.query_row(params![key, period], |r| r.get(0)).optional())
        .map_err(backend)?;
    v.map_or(Ok(Micros::ZERO), |v| read_money(v, "settled spend"))
}

fn line_usage(conn: &Connection, key: &str, period: i64) -> Result<BudgetUsage, StoreError> {
    let held = sum_amounts(
        conn,
        "SELECT amount FROM reservations WHERE key_id = ?1 AND period_start = ?2",
        key,
        period,
    )?;
    let carved = sum_amounts(
        conn,
        "SELECT amount FROM carve_outs WHERE parent_id = ?1 AND period_start = ?2",
        key,
        period,
    )?;
    Ok(BudgetUsage {
        settled: settled_of(conn, key, period)?,
        reserved: held.saturating_add(carved),
    })
}

/// Adds `amount` to the period's settled spend and the key's lifetime spend.
fn charge(conn: &Connection, key: &str, period: i64, amount: Micros) -> Result<(), StoreError> {
    let settled = settled_of(conn, key, period)?.saturating_add(amount);
    conn.prepare_cached(
        "INSERT INTO budget_settled (key_id, period_start, settled) VALUES (?1, ?2, ?3)
         ON CONFLICT (key_id, period_start) DO UPDATE SET settled = excluded.settled",
    )
    .and_then(|mut s| s.execute(params![key, period, money(settled)]))
    .map_err(backend)?;
    let spend: Option<i64> = conn
        .prepare_cached("SELECT spend FROM keys WHERE id = ?1")
        .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
        .map_err(backend)?;
    if let Some(spend) = spend {
        let spend = read_money(spend, "spend")?.saturating_add(amount);
        conn.prepare_cached("UPDATE keys SET spend = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![key, money(spend)]))
            .map_err(backend)?;
    }
    Ok(())
}

/// What `key`'s lines hold in every period: its open reservations and its
/// children's carve-outs.
fn open_on(conn: &Connection, key: &str) -> Result<Micros, StoreError> {
    let mut total = Micros::ZERO;
    for sql in [
        "SELECT amount FROM reservations WHERE key_id = ?1",
        "SELECT amount FROM carve_outs WHERE parent_id = ?1",
    ] {
        let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
        let mut rows = stmt.query([key]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let v: i64 = row.get(0).map_err(backend)?;
            total = total.saturating_add(read_money(v, "a held amount")?);
        }
    }
    Ok(total)
}

/// Sets a closed carve-out's residual and chargeable amounts, deleting it
/// once it holds nothing.
fn update_closed(
    conn: &Connection,
    child: &str,
    residual: Micros,
    chargeable: Micros,
) -> Result<(), StoreError> {
    let sql: &[&str] = if residual == Micros::ZERO {
        &[
            "DELETE FROM closed_carve_outs WHERE child_id = ?1",
            "DELETE FROM carve_outs WHERE child_id = ?1",
        ]
    } else {
        &[
            "UPDATE carve_outs SET amount = ?2 WHERE child_id = ?1",
            "INSERT INTO closed_carve_outs (child_id, chargeable) VALUES (?1, ?3)
             ON CONFLICT (child_id) DO UPDATE SET chargeable = excluded.chargeable",
        ]
    };
    for q in sql {
        let mut stmt = conn.prepare_cached(q).map_err(backend)?;
        let n = stmt.parameter_count();
        let all = params![child, money(residual), money(chargeable)];
        stmt.execute(&all[..n]).map_err(backend)?;
    }
    Ok(())
}

/// Passes a hold of `held` closed at `actual` on `key`'s lines up the chain
/// of closed carve-outs above it (docs in `budget.rs`).
fn pass_up(
    conn: &Connection,
    key: &str,
    mut held: Micros,
    mut actual: Micros,
) -> Result<(), StoreError> {
    let mut child = key.to_owned();
    // Bounded: a key's ancestors are fewer than this.
    for _ in 0..1_000 {
        let closed: Option<(String, i64, i64, i64)> = conn
            .prepare_cached(
                "SELECT c.parent_id, c.period_start, c.amount, x.chargeable
                 FROM closed_carve_outs x JOIN carve_outs c ON c.child_id = x.child_id
                 WHERE x.child_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([child.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(backend)?;
        let Some((parent, period, residual, chargeable)) = closed else {
            return Ok(());
        };
        let p = pass_through(
            read_money(residual, "a carve-out")?,
            read_money(chargeable, "a carve-out")?,
            held,
            actual,
        );
        update_closed(conn, &child, p.residual, p.chargeable)?;
        charge(conn, &parent, period, p.charge)?;
        (child, held, actual) = (parent, p.release, p.charge);
    }
    Ok(())
}

/// Closes a child's carve-out: charges its parent the child's spend (capped
/// at the carved amount) and keeps held only what the child's open calls
/// hold (docs in `budget.rs`). `false` if there was no open carve-out.
fn settle_carve_out(conn: &Connection, child: &str) -> Result<bool, StoreError> {
    let carve: Option<(String, i64, i64)> = conn
        .prepare_cached(
            "SELECT parent_id, period_start, amount FROM carve_outs c WHERE child_id = ?1
             AND NOT EXISTS (SELECT 1 FROM closed_carve_outs x WHERE x.child_id = c.child_id)",
        )
        .and_then(|mut s| {
            s.query_row([child], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(backend)?;
    let Some((parent, period, amount)) = carve else {
        return Ok(false);
    };
    let spent: i64 = conn
        .prepare_cached("SELECT spend FROM keys WHERE id = ?1")
        .and_then(|mut s| s.query_row([child], |r| r.get(0)).optional())
        .map_err(backend)?
        .unwrap_or(0);
    let carved = read_money(amount, "a carve-out")?;
    let closed = close_carve_out(carved, read_money(spent, "spend")?, open_on(conn, child)?);
    update_closed(conn, child, closed.residual, closed.chargeable)?;
    charge(conn, &parent, period, closed.charge)?;
    pass_up(
        conn,
        &parent,
        carved.saturating_sub(closed.residual),
        closed.charge,
    )?;
    Ok(true)
}

/// How deep a key sits under its root (roots are 0).
fn depth(conn: &Connection, id: &str) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "WITH RECURSIVE up (id, depth) AS (
             SELECT parent, 1 FROM keys WHERE id = ?1 AND parent IS NOT NULL
             UNION ALL
             SELECT k.parent, up.depth + 1 FROM keys k JOIN up ON k.id = up.id
             WHERE k.parent IS NOT NULL
         )
         SELECT COALESCE(MAX(depth), 0) FROM up",
    )
    .and_then(|mut s| s.query_row([id], |r| r.get(0)))
    .map_err(backend)
}

fn insert_key_row(conn: &Connection, k: &KeyRecord) -> Result<(), StoreError> {
    let provider_keys: Vec<&str> = k.provider_keys.iter().map(ProviderKeyId::as_str).collect();
    conn.prepare_cached(
        "INSERT INTO keys (id, hash, prefix, previous_hash, previous_valid_until, name, project,
             env, scopes, plan, policy, parent, provider_keys, created_at, expires_at,
             last_used_at, request_count, status, revoked_at, spend)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
             ?18, ?19, ?20)",
    )
    .and_then(|mut s| {
        s.execute(params![
            k.id.as_str(),
            k.hash.to_hex(),
            k.prefix.as_str(),
            k.previous_hash.map(|h| h.to_hex()),
            k.previous_valid_until.map(|t| t.0),
            k.name,
            k.project,
            k.env.as_str(),
            to_json(&k.scopes).map_err(to_sql_err)?,
            k.plan,
            to_json(&k.policy).map_err(to_sql_err)?,
            k.parent.as_ref().map(KeyId::as_str),
            to_json(&provider_keys).map_err(to_sql_err)?,
            k.created_at.0,
            k.expires_at.map(|t| t.0),
            k.last_used_at.map(|t| t.0),
            count(k.request_count),
            k.status.as_str(),
            k.revoked_at.map(|t| t.0),
            money(k.spend),
        ])
    })
    .map_err(backend)?;
    Ok(())
}

fn to_sql_err(e: StoreError) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        let carve = carve.map(|(l, m)| (l.clone(), m));
        self.write(Durability::Full, move |tx| {
            let id = key.id.as_str();
            let previous_taken = match key.previous_hash {
                Some(h) => h == key.hash || hash_in_use(tx, &h, "")?,
                None => false,
            };
            if previous_taken || key_exists(tx, id)? || hash_in_use(tx, &key.hash, "")? {
                return Err(StoreError::Conflict);
            }
            if let Some(parent) = &key.parent
                && !key_exists(tx, parent.as_str())?
            {
                return Err(StoreError::NotFound);
            }
            if let Some((line, amount)) = &carve {
                if !key_exists(tx, line.key.as_str())? {
                    return Err(StoreError::NotFound);
                }
                let usage = line_usage(tx, line.key.as_str(), line.period_start.0)?;
                check_carve_out(usage.remaining(line.limit), *amount)?;
            }
            insert_key_row(tx, &key)?;
            if let Some((line, amount)) = carve {
                tx.prepare_cached(
                    "INSERT INTO carve_outs (child_id, parent_id, period_start, amount)
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        line.key.as_str(),
                        line.period_start.0,
                        money(amount)
                    ])
                })
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let hex = hash.to_hex();
        self.read(move |c| {
            let found = query_keys(c, "WHERE hash = ?1 OR previous_hash = ?1 LIMIT 1", [hex])?;
            Ok(found.into_iter().next())
        })
        .await
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            Ok(query_keys(c, "WHERE id = ?1", [id.as_str()])?
                .into_iter()
                .next())
        })
        .await
    }

    async fn list_keys_with_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let project = project.map(str::to_owned);
        self.read(move |c| match project {
            Some(p) => query_keys(
                c,
                "WHERE project = ?1 AND provider_keys != '[]' ORDER BY created_at, rowid",
                [p],
            ),
            None => query_keys(
                c,
                "WHERE provider_keys != '[]' ORDER BY created_at, rowid",
                [],
            ),
        })
        .await
    }

    async fn list_children(&self, parent: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let parent = parent.as_str().to_owned();
        self.read(move |c| query_keys(c, "WHERE parent = ?1 ORDER BY created_at, rowid", [parent]))
            .await
    }

    async fn list_projects(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            // A walk of the `(project, …)` index, one step per project (a
            // plain `DISTINCT` would read every key's entry).
            let mut stmt = c
                .prepare_cached(
                    "WITH RECURSIVE p(project) AS (
                         SELECT MIN(project) FROM keys
                         UNION ALL
                         SELECT (SELECT MIN(project) FROM keys WHERE project > p.project)
                           FROM p WHERE p.project IS NOT NULL)
                     SELECT project FROM p WHERE project IS NOT NULL
                     UNION SELECT project FROM provider_keys ORDER BY 1",
                )
                .map_err(backend)?;
            stmt.query_map([], |r| r.get::<_, String>(0))
                .and_then(Iterator::collect)
                .map_err(backend)
        })
        .await
    }

    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let project = project.map(str::to_owned);
        // `rowid` (insertion order) breaks ties, as MemoryStore does.
        self.read(move |c| match project {
            Some(p) => query_keys(c, "WHERE project = ?1 ORDER BY created_at, rowid", [p]),
            None => query_keys(c, "ORDER BY created_at, rowid", []),
        })
        .await
    }

    async fn list_keys_page(&self, query: &KeyPageQuery) -> Result<KeyPage, StoreError> {
        let query = query.clone();
        self.read(move |c| page::key_page(c, &query)).await
    }

    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
        let id = id.clone();
        self.write(Durability::Full, move |tx| {
            if !key_exists(tx, id.as_str())? {
                return Err(StoreError::NotFound);
            }
            let mut stmt = tx
                .prepare_cached(
                    "WITH RECURSIVE tree (id, depth) AS (
                         SELECT id, 0 FROM keys WHERE id = ?1
                         UNION ALL
                         SELECT k.id, tree.depth + 1 FROM keys k JOIN tree ON k.parent = tree.id
                     )
                     SELECT tree.id FROM tree JOIN keys ON keys.id = tree.id
                     WHERE keys.status <> 'revoked'
                     ORDER BY tree.depth, keys.created_at",
                )
                .map_err(backend)?;
            let ids: Vec<String> = stmt
                .query_map([id.as_str()], |r| r.get(0))
                .and_then(Iterator::collect)
                .map_err(backend)?;
            drop(stmt);
            let mut revoked = Vec::with_capacity(ids.len());
            for k in &ids {
                tx.prepare_cached(
                    "UPDATE keys SET status = 'revoked', revoked_at = ?2 WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![k, at.0]))
                .map_err(backend)?;
                revoked
                    .push(KeyId::parse(k).ok_or_else(|| {
                        StoreError::Corrupt(format!("key id {k:?} is malformed"))
                    })?);
            }
            // Deepest first, so a grandchild's spend reaches its parent
            // before the parent's own carve-out is settled.
            for k in ids.iter().rev() {
                settle_carve_out(tx, k)?;
            }
            Ok(revoked)
        })
        .await
    }

    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError> {
        let (id, new_hash, new_prefix) = (id.clone(), *new_hash, new_prefix.clone());
        self.write(Durability::Full, move |tx| {
            let old: Option<String> = tx
                .prepare_cached("SELECT hash FROM keys WHERE id = ?1")
                .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
                .map_err(backend)?;
            let old = old.ok_or(StoreError::NotFound)?;
            if hash_in_use(tx, &new_hash, id.as_str())? {
                return Err(StoreError::Conflict);
            }
            let new_hex = new_hash.to_hex();
            let (previous, until) = match grace_until {
                Some(until) if old != new_hex => (Some(old), Some(until.0)),
                _ => (None, None),
            };
            tx.prepare_cached(
                "UPDATE keys SET hash = ?2, prefix = ?3, previous_hash = ?4,
                     previous_valid_until = ?5
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id.as_str(),
                    new_hex,
                    new_prefix.as_str(),
                    previous,
                    until
                ])
            })
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn insert_provider_key(&self, key: &ProviderKeyRecord) -> Result<(), StoreError> {
        let k = key.clone();
        self.write(Durability::Full, move |tx| {
            let exists = tx
                .prepare_cached("SELECT 1 FROM provider_keys WHERE id = ?1")
                .and_then(|mut s| s.exists([k.id.as_str()]))
                .map_err(backend)?;
            if exists {
                return Err(StoreError::Conflict);
            }
            tx.prepare_cached(
                "INSERT INTO provider_keys (id, project, provider, name, sealed, hint, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    k.id.as_str(),
                    k.project,
                    k.provider.as_str(),
                    k.name,
                    k.sealed.as_bytes(),
                    k.hint.as_str(),
                    k.created_at.0,
                ])
            })
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            Ok(query_provider_keys(c, "WHERE id = ?1", [id.as_str()])?
                .into_iter()
                .next())
        })
        .await
    }

    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        let project = project.map(str::to_owned);
        self.read(move |c| match project {
            Some(p) => query_provider_keys(c, "WHERE project = ?1 ORDER BY created_at, rowid", [p]),
            None => query_provider_keys(c, "ORDER BY created_at, rowid", []),
        })
        .await
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError> {
        let id = id.clone();
        self.write(Durability::Full, move |tx| {
            let n = tx
                .prepare_cached("DELETE FROM provider_keys WHERE id = ?1")
                .and_then(|mut s| s.execute([id.as_str()]))
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError> {
        let (id, expected, new) = (id.clone(), expected.clone(), new.clone());
        self.write(Durability::Full, move |tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE provider_keys SET sealed = ?3 WHERE id = ?1 AND sealed = ?2",
                )
                .and_then(|mut s| {
                    s.execute(params![id.as_str(), expected.as_bytes(), new.as_bytes()])
                })
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        _now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        let line = line.clone();
        self.write(Durability::Normal, move |tx| {
            let key = line.key.as_str();
            let usage = line_usage(tx, key, line.period_start.0)?;
            let remaining = usage.remaining(line.limit);
            let amount = reservable(remaining, want, at_least)?;
            let id: i64 = tx
                .prepare_cached(
                    "INSERT INTO reservations (key_id, period_start, amount, expires_at)
                     VALUES (?1, ?2, ?3, ?4) RETURNING id",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![key, line.period_start.0, money(amount), expires_at.0],
                        |r| r.get(0),
                    )
                })
                .map_err(backend)?;
            let id = u64::try_from(id)
                .map_err(|_| StoreError::Corrupt(format!("reservation id {id} is negative")))?;
            let reservation = Reservation {
                id: ReservationId(id),
                line,
                amount,
            };
            Ok((reservation, Some(remaining.saturating_sub(amount))))
        })
        .await
    }

    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        if settlements.is_empty() {
            return Ok(());
        }
        let settlements = settlements.to_vec();
        self.write(Durability::Normal, move |tx| {
            for st in &settlements {
                let Ok(id) = i64::try_from(st.reservation.id.0) else {
                    continue; // no stored reservation has such an id
                };
                let held: Option<(String, i64, i64)> = tx
                    .prepare_cached(
                        "SELECT key_id, period_start, amount FROM reservations WHERE id = ?1",
                    )
                    .and_then(|mut s| {
                        s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                            .optional()
                    })
                    .map_err(backend)?;
                if let Some((key, period, amount)) = held {
                    tx.prepare_cached("DELETE FROM reservations WHERE id = ?1")
                        .and_then(|mut s| s.execute([id]))
                        .map_err(backend)?;
                    charge(tx, &key, period, st.actual)?;
                    pass_up(tx, &key, read_money(amount, "a reservation")?, st.actual)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn settle_part(&self, settlement: &Settlement, keep: Micros) -> Result<bool, StoreError> {
        let Ok(id) = i64::try_from(settlement.reservation.id.0) else {
            return Ok(false); // no stored reservation has such an id
        };
        let actual = settlement.actual;
        self.write(Durability::Normal, move |tx| {
            let held: Option<(String, i64, i64)> = tx
                .prepare_cached(
                    "SELECT key_id, period_start, amount FROM reservations WHERE id = ?1",
                )
                .and_then(|mut s| {
                    s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(backend)?;
            let Some((key, period, amount)) = held else {
                return Ok(false);
            };
            tx.prepare_cached("UPDATE reservations SET amount = MIN(amount, ?2) WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, money(keep)]))
                .map_err(backend)?;
            charge(tx, &key, period, actual)?;
            let amount = read_money(amount, "a reservation")?;
            pass_up(tx, &key, amount.saturating_sub(amount.min(keep)), actual)?;
            Ok(true)
        })
        .await
    }

    async fn budget_usage(
        &self,
        line: &BudgetLine,
        _now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError> {
        let (key, period) = (line.key.clone(), line.period_start.0);
        self.read(move |c| {
            // One read transaction: a consistent snapshot of all three sums.
            let tx = c.unchecked_transaction().map_err(backend)?;
            let usage = line_usage(&tx, key.as_str(), period)?;
            tx.finish().map_err(backend)?;
            Ok(usage)
        })
        .await
    }

    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError> {
        self.write(Durability::Normal, move |tx| {
            let expired: Vec<(i64, String, i64, i64)> = tx
                .prepare_cached(
                    "SELECT id, key_id, period_start, amount FROM reservations
                     WHERE expires_at <= ?1 ORDER BY id",
                )
                .and_then(|mut s| {
                    s.query_map([now.0], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect()
                })
                .map_err(backend)?;
            let mut swept = 0;
            for (id, key, period, amount) in expired {
                tx.prepare_cached("DELETE FROM reservations WHERE id = ?1")
                    .and_then(|mut s| s.execute([id]))
                    .map_err(backend)?;
                let amount = read_money(amount, "a reservation")?;
                charge(tx, &key, period, amount)?;
                pass_up(tx, &key, amount, amount)?;
                swept += 1;
            }
            let children: Vec<String> = tx
                .prepare_cached(EXPIRED_CARVE_OUTS)
                .and_then(|mut s| s.query_map([now.0], |r| r.get(0))?.collect())
                .map_err(backend)?;
            let mut by_depth = Vec::with_capacity(children.len());
            for child in children {
                by_depth.push((depth(tx, &child)?, child));
            }
            // Deepest first, as in `revoke_key`.
            by_depth.sort_by(|a, b| b.cmp(a));
            for (_, child) in by_depth {
                if settle_carve_out(tx, &child)? {
                    swept += 1;
                }
            }
            Ok(swept)
        })
        .await
    }

    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        if charges.is_empty() {
            return Ok(());
        }
        let charges = charges.to_vec();
        self.write(Durability::Normal, move |tx| {
            for (key, amount) in &charges {
                let spend: Option<i64> = tx
                    .prepare_cached("SELECT spend FROM keys WHERE id = ?1")
                    .and_then(|mut s| s.query_row([key.as_str()], |r| r.get(0)).optional())
                    .map_err(backend)?;
                if let Some(spend) = spend {
                    let spend = read_money(spend, "spend")?.saturating_add(*amount);
                    tx.prepare_cached("UPDATE keys SET spend = ?2 WHERE id = ?1")
                        .and_then(|mut s| s.execute(params![key.as_str(), money(spend)]))
                        .map_err(backend)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let records = records.to_vec();
        self.write(Durability::Normal, move |tx| {
            let mut insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage ({USAGE_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
                             ?14, ?15, ?16, ?17, ?18)"
                ))
                .map_err(backend)?;
            // One key update per key in the batch: (calls, latest call).
            let mut per_key: std::collections::HashMap<&str, (i64, i64)> =
                std::collections::HashMap::new();
            for r in &records {
                insert
                    .execute(params![
                        r.at.0,
                        r.key_id.as_str(),
                        r.project,
                        r.provider.map(|p| p.as_str()),
                        r.endpoint,
                        r.model,
                        count(r.tokens_in),
                        count(r.tokens_out),
                        money(r.cost),
                        count(r.latency_ms),
                        r.status,
                        r.denial,
                        r.shadow,
                        count(r.cached_tokens),
                        count(r.cache_write_tokens),
                        count(r.reasoning_tokens),
                        count(r.audio_tokens),
                        r.settlement.map(SettledBy::as_str),
                    ])
                    .map_err(backend)?;
                let entry = per_key.entry(r.key_id.as_str()).or_insert((0, r.at.0));
                entry.0 += 1;
                entry.1 = entry.1.max(r.at.0);
            }
            let mut touch = tx
                .prepare_cached(
                    "UPDATE keys SET request_count = request_count + ?2,
                         last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < ?3
                                             THEN ?3 ELSE last_used_at END
                     WHERE id = ?1",
                )
                .map_err(backend)?;
            for (key, (calls, latest)) in per_key {
                touch
                    .execute(params![key, calls, latest])
                    .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        let filter = filter.clone();
        self.read(move |c| {
            let limit = filter
                .limit
                .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
            let key_id = filter.key_id.as_ref().map(KeyId::as_str);
            let since = filter.since.map(|t| t.0);
            let until = filter.until.map(|t| t.0);
            let mut values: Vec<&dyn rusqlite::ToSql> = Vec::new();
            if let Some(project) = &filter.project {
                values.push(project);
            }
            if let Some(key_id) = &key_id {
                values.push(key_id);
            }
            if let Some(since) = &since {
                values.push(since);
            }
            if let Some(until) = &until {
                values.push(until);
            }
            values.push(&limit);
            let sql = usage_listing_sql(
                filter.project.is_some(),
                key_id.is_some(),
                since.is_some(),
                until.is_some(),
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(values))
                .map_err(backend)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                out.push(usage_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT value FROM meta WHERE name = ?1")
                .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
                .map_err(backend)
        })
        .await
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.write(Durability::Full, move |tx| {
            tx.prepare_cached(
                "INSERT INTO meta (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute(params![name, value]))
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
}

/// The usage listing's query with only the filters given, bound in the order
/// project, key, since, until, then the limit. `?n IS NULL OR …` terms would hide
/// `usage_by_key` and `usage_by_project` from SQLite's planner and make every
/// filtered listing scan the table.
pub(super) fn usage_listing_sql(project: bool, key: bool, since: bool, until: bool) -> String {
    let conditions: Vec<&str> = [
        // A key belongs to one project: with both given, `+` keeps the
        // project term off the index so the narrower key index is walked.
        (project && key, "+project = ?"),
        (project && !key, "project = ?"),
        (key, "key_id = ?"),
        (since, "at >= ?"),
        (until, "at < ?"),
    ]
    .into_iter()
    .filter_map(|(given, condition)| given.then_some(condition))
    .collect();
    let filter = if conditions.is_empty() {
        "1".to_owned()
    } else {
        conditions.join(" AND ")
    };
    format!("SELECT {USAGE_COLUMNS} FROM usage WHERE {filter} ORDER BY at DESC, id DESC LIMIT ?")
}
