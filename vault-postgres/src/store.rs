//! The [`KeyStore`] implementation: one transaction (or one statement) per
//! operation, retried whole when PostgreSQL aborts it for a deadlock or a
//! serialization failure.
//!
//! Locks, and the order they are taken in (so that most concurrent
//! transactions queue instead of deadlocking; those that do deadlock are
//! retried):
//! - a budget line's row in `budget_lines` guards what is held and settled
//!   on it: every change of `reserved` or `settled` is an `UPDATE` of that
//!   row, so it holds the row's lock until it commits;
//! - a key's row in `keys` guards closing its carve-out against settling
//!   its calls: a settlement updates the key's `spend` (taking the lock)
//!   before it looks for a closed carve-out to pass through, and closing
//!   one (revocation, expiry) locks the key before it reads what the key's
//!   calls hold. Either the settlement sees the carve-out closed, or the
//!   closing sees the call settled;
//! - a key's row before its line's, and a child's before its parent's.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Object, Transaction};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use vault_core::clock::UnixMillis;
use vault_core::crypto::Sealed;
use vault_core::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use vault_core::money::Micros;
use vault_core::record::{
    BudgetLine, BudgetUsage, KeyRecord, ProviderKeyRecord, Reservation, ReservationId, SettledBy,
    Settlement, UsageFilter, UsageRecord,
};
use vault_core::store::{KeyPage, KeyPageQuery, KeyStore, StoreError};

use crate::PostgresStore;
use crate::rows::{
    KEY_COLUMNS, PROVIDER_KEY_COLUMNS, USAGE_COLUMNS, count, key_from_row, money,
    provider_key_from_row, read_money, to_json, usage_from_row,
};
use vault_core::store::budget::{close_carve_out, floor, pass_through, reservable};

/// Attempts of a transaction PostgreSQL aborted for a deadlock or a
/// serialization failure.
pub(crate) const MAX_ATTEMPTS: u32 = 8;
/// Attempts of a reservation whose line changed between its `UPDATE` and
/// the look at why it did not fit.
const MAX_RESERVE_ATTEMPTS: u32 = 10;
/// A key's ancestors are fewer than this.
const MAX_DEPTH: usize = 1_000;

/// A failure inside an operation: a store verdict, or a driver error that
/// may be worth retrying.
pub(crate) enum Fail {
    Store(StoreError),
    Pg(tokio_postgres::Error),
    Pool(String),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl Fail {
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Fail::Pg(e) => matches!(
                e.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
            ),
            _ => false,
        }
    }

    /// The store error: a unique violation (a duplicate id or hash that
    /// slipped past a check) is a conflict. Driver messages carry SQL at
    /// most, never the connection URL.
    pub(crate) fn into_store(self) -> StoreError {
        match self {
            Fail::Store(e) => e,
            Fail::Pg(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => StoreError::Conflict,
            Fail::Pg(e) if unreachable(&e) => {
                StoreError::Unavailable(format!("postgres: {}", crate::connect::describe(&e)))
            }
            Fail::Pg(e) => {
                StoreError::Backend(format!("postgres: {}", crate::connect::describe(&e)))
            }
            Fail::Pool(e) => StoreError::Unavailable(e),
        }
    }
}

/// Whether `e` says the server cannot be reached rather than that the
/// statement failed: the connection closed or broke (I/O), or the server
/// is shutting down, starting up or refusing connections (SQLSTATE class
/// 08, 57P01–57P03).
fn unreachable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let code = code.code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A pause before retrying, growing with `attempt` and jittered so that two
/// transactions that deadlocked do not meet again in lockstep.
pub(crate) async fn backoff(attempt: u32) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos() % 1_000));
    let base = 500u64.saturating_mul(u64::from(attempt));
    tokio::time::sleep(Duration::from_micros(base + jitter * u64::from(attempt))).await;
}

/// Runs `$body` (an expression using the transaction `$tx`) in a fresh
/// transaction, committing on success and retrying it whole on a deadlock
/// or serialization failure.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let result: Result<_, Fail> = async {
                let mut conn = $store.conn().await?;
                let $tx = conn.transaction().await?;
                let out = $body;
                $tx.commit().await?;
                Ok(out)
            }
            .await;
            match result {
                Err(f) if f.retryable() && attempt < MAX_ATTEMPTS => backoff(attempt).await,
                other => break other.map_err(Fail::into_store),
            }
        }
    }};
}
pub(crate) use in_transaction;

impl PostgresStore {
    /// The keys matching `condition`, oldest first (insertion order breaks
    /// ties, as `MemoryStore` does).
    async fn keys_where(
        &self,
        condition: &str,
        p: &Params<'_>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        async {
            let conn = self.conn().await?;
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE {condition} ORDER BY created_at, seq"
            );
            Ok(rows(&conn, &sql, p)
                .await?
                .iter()
                .map(key_from_row)
                .collect::<Result<Vec<_>, _>>()?)
        }
        .await
        .map_err(Fail::into_store)
    }

    pub(crate) async fn conn(&self) -> Result<Object, Fail> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| Fail::Pool(format!("no connection to {}: {e}", self.inner.target)))
    }
}

// ------------------------------------------------------------- statements

type Params<'a> = [&'a (dyn ToSql + Sync)];

pub(crate) async fn rows<C: GenericClient>(
    c: &C,
    sql: &str,
    p: &Params<'_>,
) -> Result<Vec<Row>, Fail> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, p).await?)
}

pub(crate) async fn opt<C: GenericClient>(
    c: &C,
    sql: &str,
    p: &Params<'_>,
) -> Result<Option<Row>, Fail> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, p).await?)
}

pub(crate) async fn exec<C: GenericClient>(c: &C, sql: &str, p: &Params<'_>) -> Result<u64, Fail> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, p).await?)
}

pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
) -> Result<T, Fail> {
    row.try_get(i).map_err(|_| {
        Fail::Store(StoreError::Corrupt(format!(
            "column {i} has the wrong type"
        )))
    })
}

async fn key_exists<C: GenericClient>(c: &C, id: &str) -> Result<bool, Fail> {
    Ok(opt(c, "SELECT 1 FROM keys WHERE id = $1", &[&id])
        .await?
        .is_some())
}

/// Whether `hash` is any key's current or previous hash, other than `except`'s.
async fn hash_in_use<C: GenericClient>(c: &C, hash: &KeyHash, except: &str) -> Result<bool, Fail> {
    let hex = hash.to_hex();
    Ok(opt(
        c,
        "SELECT 1 FROM keys WHERE (hash = $1 OR previous_hash = $1) AND id <> $2 LIMIT 1",
        &[&hex, &except],
    )
    .await?
    .is_some())
}

/// Serializes every transaction that checks or claims `hash` (as a current
/// or previous hash: no single unique index spans both columns).
async fn lock_hash(tx: &Transaction<'_>, hash: &KeyHash) -> Result<(), Fail> {
    let hex = hash.to_hex();
    exec(
        tx,
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&hex],
    )
    .await?;
    Ok(())
}

/// A line's settled and held amounts (zero for a line never used).
async fn line_usage<C: GenericClient>(c: &C, key: &str, period: i64) -> Result<BudgetUsage, Fail> {
    let row = opt(
        c,
        "SELECT settled, reserved FROM budget_lines WHERE key_id = $1 AND period_start = $2",
        &[&key, &period],
    )
    .await?;
    Ok(match row {
        Some(r) => BudgetUsage {
            settled: read_money(get(&r, 0)?, "settled spend")?,
            reserved: read_money(get(&r, 1)?, "a held amount")?,
        },
        None => BudgetUsage {
            settled: Micros::ZERO,
            reserved: Micros::ZERO,
        },
    })
}

/// Creates a line's row if it does not exist yet.
async fn ensure_line<C: GenericClient>(c: &C, key: &str, period: i64) -> Result<(), Fail> {
    exec(
        c,
        "INSERT INTO budget_lines (key_id, period_start) VALUES ($1, $2)
         ON CONFLICT (key_id, period_start) DO NOTHING",
        &[&key, &period],
    )
    .await?;
    Ok(())
}

/// Charges `amount` to `key`'s lifetime spend (locking the key's row) and
/// to its line's settled spend, and releases `release` of what the line
/// holds.
async fn charge(
    tx: &Transaction<'_>,
    key: &str,
    period: i64,
    amount: Micros,
    release: Micros,
) -> Result<(), Fail> {
    let (amount, release) = (money(amount), money(release));
    exec(
        tx,
        "UPDATE keys SET spend = vg_sat_add(spend, $2) WHERE id = $1",
        &[&key, &amount],
    )
    .await?;
    exec(
        tx,
        "INSERT INTO budget_lines (key_id, period_start, settled) VALUES ($1, $2, $3)
         ON CONFLICT (key_id, period_start) DO UPDATE
         SET settled = vg_sat_add(budget_lines.settled, $3),
             reserved = GREATEST(budget_lines.reserved - $4, 0)",
        &[&key, &period, &amount, &release],
    )
    .await?;
    Ok(())
}

/// Sets a closed carve-out to hold `residual` with `chargeable` left
/// (deleting it once it holds nothing) and releases the difference from
/// the parent's line.
async fn update_closed(
    tx: &Transaction<'_>,
    child: &str,
    (parent, period): (&str, i64),
    old: Micros,
    residual: Micros,
    chargeable: Micros,
) -> Result<(), Fail> {
    if residual == Micros::ZERO {
        exec(tx, "DELETE FROM carve_outs WHERE child_id = $1", &[&child]).await?;
    } else {
        exec(
            tx,
            "UPDATE carve_outs SET amount = $2, chargeable = $3 WHERE child_id = $1",
            &[&child, &money(residual), &money(chargeable)],
        )
        .await?;
    }
    let release = money(old.saturating_sub(residual));
    if release > 0 {
        exec(
            tx,
            "UPDATE budget_lines SET reserved = GREATEST(reserved - $3, 0)
             WHERE key_id = $1 AND period_start = $2",
            &[&parent, &period, &release],
        )
        .await?;
    }
    Ok(())
}

/// Passes a hold of `held` closed at `actual` on `key`'s lines up the chain
/// of closed carve-outs above it (vault-core's store/budget.rs).
async fn pass_up(
    tx: &Transaction<'_>,
    key: &str,
    mut held: Micros,
    mut actual: Micros,
) -> Result<(), Fail> {
    let mut child = key.to_owned();
    for _ in 0..MAX_DEPTH {
        let Some(row) = opt(
            tx,
            "SELECT parent_id, period_start, amount, chargeable FROM carve_outs
             WHERE child_id = $1 AND chargeable IS NOT NULL FOR UPDATE",
            &[&child],
        )
        .await?
        else {
            return Ok(());
        };
        let parent: String = get(&row, 0)?;
        let period: i64 = get(&row, 1)?;
        let residual = read_money(get(&row, 2)?, "a carve-out")?;
        let chargeable = read_money(get(&row, 3)?, "a carve-out")?;
        let p = pass_through(residual, chargeable, held, actual);
        charge(tx, &parent, period, p.charge, Micros::ZERO).await?;
        update_closed(
            tx,
            &child,
            (&parent, period),
            residual,
            p.residual,
            p.chargeable,
        )
        .await?;
        (child, held, actual) = (parent, p.release, p.charge);
    }
    Ok(())
}

/// Closes a child's open carve-out (the caller holds the child's row lock):
/// charges its parent the child's spend, capped at the carved amount, and
/// keeps held only what the child's open calls hold. `false` if it had no
/// open carve-out.
async fn settle_carve_out(tx: &Transaction<'_>, child: &str) -> Result<bool, Fail> {
    let Some(row) = opt(
        tx,
        "SELECT parent_id, period_start, amount FROM carve_outs
         WHERE child_id = $1 AND chargeable IS NULL FOR UPDATE",
        &[&child],
    )
    .await?
    else {
        return Ok(false);
    };
    let parent: String = get(&row, 0)?;
    let period: i64 = get(&row, 1)?;
    let carved = read_money(get(&row, 2)?, "a carve-out")?;
    let spent = match opt(tx, "SELECT spend FROM keys WHERE id = $1", &[&child]).await? {
        Some(r) => read_money(get(&r, 0)?, "spend")?,
        None => Micros::ZERO,
    };
    let open = opt(
        tx,
        "SELECT LEAST(
             (SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE key_id = $1)
           + (SELECT COALESCE(SUM(amount), 0) FROM carve_outs WHERE parent_id = $1),
             9223372036854775807)::BIGINT",
        &[&child],
    )
    .await?
    .map_or(Ok(0), |r| get::<i64>(&r, 0))?;
    let closed = close_carve_out(carved, spent, read_money(open, "a held amount")?);
    charge(tx, &parent, period, closed.charge, Micros::ZERO).await?;
    update_closed(
        tx,
        child,
        (&parent, period),
        carved,
        closed.residual,
        closed.chargeable,
    )
    .await?;
    pass_up(
        tx,
        &parent,
        carved.saturating_sub(closed.residual),
        closed.charge,
    )
    .await?;
    Ok(true)
}

/// Settles reservation `id` at `actual` (at what it held when `None`: a
/// sweep). `false` when it was no longer held.
pub(crate) async fn settle_one(
    tx: &Transaction<'_>,
    id: i64,
    actual: Option<Micros>,
) -> Result<bool, Fail> {
    let Some(row) = opt(
        tx,
        "DELETE FROM reservations WHERE id = $1 RETURNING key_id, period_start, amount",
        &[&id],
    )
    .await?
    else {
        return Ok(false);
    };
    let key: String = get(&row, 0)?;
    let period: i64 = get(&row, 1)?;
    let held = read_money(get(&row, 2)?, "a reservation")?;
    let actual = actual.unwrap_or(held);
    charge(tx, &key, period, actual, held).await?;
    pass_up(tx, &key, held, actual).await?;
    Ok(true)
}

/// How deep a key sits under its root (roots are 0).
async fn depth(tx: &Transaction<'_>, id: &str) -> Result<i64, Fail> {
    let row = opt(
        tx,
        "WITH RECURSIVE up (id, depth) AS (
             SELECT parent, 1 FROM keys WHERE id = $1 AND parent IS NOT NULL
             UNION ALL
             SELECT k.parent, up.depth + 1 FROM keys k JOIN up ON k.id = up.id
             WHERE k.parent IS NOT NULL
         )
         SELECT COALESCE(MAX(depth), 0)::BIGINT FROM up",
        &[&id],
    )
    .await?;
    row.map_or(Ok(0), |r| get(&r, 0))
}

async fn insert_key_row(tx: &Transaction<'_>, k: &KeyRecord) -> Result<(), Fail> {
    let provider_keys: Vec<&str> = k.provider_keys.iter().map(ProviderKeyId::as_str).collect();
    let scopes = to_json(&k.scopes)?;
    let policy = to_json(&k.policy)?;
    let provider_keys = to_json(&provider_keys)?;
    exec(
        tx,
        "INSERT INTO keys (id, hash, prefix, previous_hash, previous_valid_until, name, project,
             env, scopes, plan, policy, parent, provider_keys, created_at, expires_at,
             last_used_at, request_count, status, revoked_at, spend)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
             $18, $19, $20)",
        &[
            &k.id.as_str(),
            &k.hash.to_hex(),
            &k.prefix.as_str(),
            &k.previous_hash.map(|h| h.to_hex()),
            &k.previous_valid_until.map(|t| t.0),
            &k.name,
            &k.project,
            &k.env.as_str(),
            &scopes,
            &k.plan,
            &policy,
            &k.parent.as_ref().map(KeyId::as_str),
            &provider_keys,
            &k.created_at.0,
            &k.expires_at.map(|t| t.0),
            &k.last_used_at.map(|t| t.0),
            &count(k.request_count),
            &k.status.as_str(),
            &k.revoked_at.map(|t| t.0),
            &money(k.spend),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_key_tx(
    tx: &Transaction<'_>,
    key: &KeyRecord,
    carve: Option<(&BudgetLine, Micros)>,
) -> Result<(), Fail> {
    let id = key.id.as_str();
    let mut hashes = vec![key.hash];
    hashes.extend(key.previous_hash);
    hashes.sort_by_key(|h| h.to_hex());
    for h in &hashes {
        lock_hash(tx, h).await?;
    }
    let previous_taken = match key.previous_hash {
        Some(h) => h == key.hash || hash_in_use(tx, &h, "").await?,
        None => false,
    };
    if previous_taken || key_exists(tx, id).await? || hash_in_use(tx, &key.hash, "").await? {
        return Err(StoreError::Conflict.into());
    }
    if let Some(parent) = &key.parent
        && !key_exists(tx, parent.as_str()).await?
    {
        return Err(StoreError::NotFound.into());
    }
    if let Some((line, amount)) = carve {
        let parent = line.key.as_str();
        if !key_exists(tx, parent).await? {
            return Err(StoreError::NotFound.into());
        }
        let period = line.period_start.0;
        ensure_line(tx, parent, period).await?;
        // One UPDATE: it fits on the newest version of the line's row, or
        // nothing is held.
        let held = opt(
            tx,
            "UPDATE budget_lines SET reserved = reserved + $3
             WHERE key_id = $1 AND period_start = $2
               AND $4::BIGINT::NUMERIC - settled - reserved >= $3::BIGINT
             RETURNING 1",
            &[&parent, &period, &money(amount), &money(line.limit)],
        )
        .await?;
        if held.is_none() {
            let usage = line_usage(tx, parent, period).await?;
            return Err(StoreError::BudgetExceeded {
                remaining: usage.remaining(line.limit),
            }
            .into());
        }
    }
    insert_key_row(tx, key).await?;
    if let Some((line, amount)) = carve {
        exec(
            tx,
            "INSERT INTO carve_outs (child_id, parent_id, period_start, amount)
             VALUES ($1, $2, $3, $4)",
            &[
                &id,
                &line.key.as_str(),
                &line.period_start.0,
                &money(amount),
            ],
        )
        .await?;
    }
    Ok(())
}

async fn revoke_tx(tx: &Transaction<'_>, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, Fail> {
    // Locks the root first: two revocations of one key queue here.
    if opt(
        tx,
        "SELECT 1 FROM keys WHERE id = $1 FOR UPDATE",
        &[&id.as_str()],
    )
    .await?
    .is_none()
    {
        return Err(StoreError::NotFound.into());
    }
    let tree: Vec<String> = rows(
        tx,
        "WITH RECURSIVE tree (id, depth) AS (
             SELECT id, 0 FROM keys WHERE id = $1
             UNION ALL
             SELECT k.id, tree.depth + 1 FROM keys k JOIN tree ON k.parent = tree.id
         )
         SELECT tree.id FROM tree JOIN keys ON keys.id = tree.id
         WHERE keys.status <> 'revoked'
         ORDER BY tree.depth, keys.created_at, keys.seq",
        &[&id.as_str()],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<Result<_, _>>()?;
    // Re-checked on each row's newest version: a key another transaction
    // revoked meanwhile is not newly revoked here.
    let newly: HashSet<String> = rows(
        tx,
        "UPDATE keys SET status = 'revoked', revoked_at = $2
         WHERE id = ANY($1) AND status <> 'revoked' RETURNING id",
        &[&tree, &at.0],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<Result<_, _>>()?;
    let ids: Vec<&String> = tree.iter().filter(|k| newly.contains(*k)).collect();
    let mut revoked = Vec::with_capacity(ids.len());
    for k in &ids {
        revoked.push(
            KeyId::parse(k)
                .ok_or_else(|| StoreError::Corrupt(format!("key id {k:?} is malformed")))?,
        );
    }
    // Deepest first, so a grandchild's spend reaches its parent before the
    // parent's own carve-out is settled.
    for k in ids.iter().rev() {
        settle_carve_out(tx, k).await?;
    }
    Ok(revoked)
}

async fn rotate_tx(
    tx: &Transaction<'_>,
    id: &KeyId,
    new_hash: &KeyHash,
    new_prefix: &KeyPrefix,
    grace_until: Option<UnixMillis>,
) -> Result<(), Fail> {
    let old: String = match opt(
        tx,
        "SELECT hash FROM keys WHERE id = $1 FOR UPDATE",
        &[&id.as_str()],
    )
    .await?
    {
        Some(r) => get(&r, 0)?,
        None => return Err(StoreError::NotFound.into()),
    };
    lock_hash(tx, new_hash).await?;
    if hash_in_use(tx, new_hash, id.as_str()).await? {
        return Err(StoreError::Conflict.into());
    }
    let new_hex = new_hash.to_hex();
    let (previous, until) = match grace_until {
        Some(until) if old != new_hex => (Some(old), Some(until.0)),
        _ => (None, None),
    };
    exec(
        tx,
        "UPDATE keys SET hash = $2, prefix = $3, previous_hash = $4, previous_valid_until = $5
         WHERE id = $1",
        &[
            &id.as_str(),
            &new_hex,
            &new_prefix.as_str(),
            &previous,
            &until,
        ],
    )
    .await?;
    Ok(())
}

async fn settle_part_tx(
    tx: &Transaction<'_>,
    id: i64,
    actual: Micros,
    keep: Micros,
) -> Result<bool, Fail> {
    let Some(row) = opt(
        tx,
        "SELECT key_id, period_start, amount FROM reservations WHERE id = $1 FOR UPDATE",
        &[&id],
    )
    .await?
    else {
        return Ok(false);
    };
    let key: String = get(&row, 0)?;
    let period: i64 = get(&row, 1)?;
    let amount = read_money(get(&row, 2)?, "a reservation")?;
    let kept = amount.min(keep);
    // `charged` accumulates for a lease's cover (holders.rs).
    exec(
        tx,
        "UPDATE reservations SET amount = $2, charged = vg_sat_add(charged, $3) WHERE id = $1",
        &[&id, &money(kept), &money(actual)],
    )
    .await?;
    let released = amount.saturating_sub(kept);
    charge(tx, &key, period, actual, released).await?;
    pass_up(tx, &key, released, actual).await?;
    Ok(true)
}

async fn sweep_tx(tx: &Transaction<'_>, now: UnixMillis) -> Result<usize, Fail> {
    let expired: Vec<i64> = rows(
        tx,
        "SELECT id FROM reservations WHERE expires_at <= $1 ORDER BY key_id, id",
        &[&now.0],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<Result<_, _>>()?;
    let mut swept = 0;
    for id in expired {
        if settle_one(tx, id, None).await? {
            swept += 1;
        }
    }
    let children: Vec<String> = rows(
        tx,
        "SELECT c.child_id FROM carve_outs c JOIN keys k ON k.id = c.child_id
         WHERE c.chargeable IS NULL AND k.expires_at IS NOT NULL AND k.expires_at <= $1",
        &[&now.0],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<Result<_, _>>()?;
    let mut by_depth = Vec::with_capacity(children.len());
    for child in children {
        by_depth.push((depth(tx, &child).await?, child));
    }
    // Deepest first, as in `revoke_key`.
    by_depth.sort_by(|a, b| b.cmp(a));
    for (_, child) in by_depth {
        // The child's lock: its calls' settlements see the closed carve-out.
        opt(tx, "SELECT 1 FROM keys WHERE id = $1 FOR UPDATE", &[&child]).await?;
        if settle_carve_out(tx, &child).await? {
            swept += 1;
        }
    }
    Ok(swept)
}

async fn append_usage_tx(tx: &Transaction<'_>, records: &[UsageRecord]) -> Result<(), Fail> {
    let n = records.len();
    let mut at = Vec::with_capacity(n);
    let mut key_id = Vec::with_capacity(n);
    let mut project = Vec::with_capacity(n);
    let mut provider = Vec::with_capacity(n);
    let mut endpoint = Vec::with_capacity(n);
    let mut model = Vec::with_capacity(n);
    let mut tokens_in = Vec::with_capacity(n);
    let mut tokens_out = Vec::with_capacity(n);
    let mut cost = Vec::with_capacity(n);
    let mut latency = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut denial = Vec::with_capacity(n);
    let mut shadow = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut cache_write = Vec::with_capacity(n);
    let mut reasoning = Vec::with_capacity(n);
    let mut audio = Vec::with_capacity(n);
    let mut settlement = Vec::with_capacity(n);
    // One key update per key in the batch: (calls, latest call).
    let mut per_key: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for r in records {
        at.push(r.at.0);
        key_id.push(r.key_id.as_str());
        project.push(r.project.as_str());
        provider.push(r.provider.map(|p| p.as_str()));
        endpoint.push(r.endpoint.as_str());
        model.push(r.model.as_deref());
        tokens_in.push(count(r.tokens_in));
        tokens_out.push(count(r.tokens_out));
        cost.push(money(r.cost));
        latency.push(count(r.latency_ms));
        status.push(i32::from(r.status));
        denial.push(r.denial.as_deref());
        shadow.push(r.shadow);
        cached.push(count(r.cached_tokens));
        cache_write.push(count(r.cache_write_tokens));
        reasoning.push(count(r.reasoning_tokens));
        audio.push(count(r.audio_tokens));
        settlement.push(r.settlement.map(SettledBy::as_str));
        let entry = per_key.entry(r.key_id.as_str()).or_insert((0, r.at.0));
        entry.0 += 1;
        entry.1 = entry.1.max(r.at.0);
    }
    // One multi-row INSERT for the whole batch, rows in the batch's order.
    exec(
        tx,
        &format!(
            "INSERT INTO usage ({USAGE_COLUMNS})
             SELECT at, key_id, project, provider, endpoint, model, tokens_in, tokens_out, cost,
                    latency_ms, status, denial, shadow, cached_tokens, cache_write_tokens,
                    reasoning_tokens, audio_tokens, settlement
             FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                         $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[],
                         $11::INTEGER[], $12::TEXT[], $13::BOOLEAN[], $14::BIGINT[],
                         $15::BIGINT[], $16::BIGINT[], $17::BIGINT[], $18::TEXT[])
                  WITH ORDINALITY AS u (at, key_id, project, provider, endpoint, model,
                         tokens_in, tokens_out, cost, latency_ms, status, denial, shadow,
                         cached_tokens, cache_write_tokens, reasoning_tokens, audio_tokens,
                         settlement, ord)
             ORDER BY ord"
        ),
        &[
            &at,
            &key_id,
            &project,
            &provider,
            &endpoint,
            &model,
            &tokens_in,
            &tokens_out,
            &cost,
            &latency,
            &status,
            &denial,
            &shadow,
            &cached,
            &cache_write,
            &reasoning,
            &audio,
            &settlement,
        ],
    )
    .await?;
    let ids: Vec<&str> = per_key.keys().copied().collect();
    let calls: Vec<i64> = per_key.values().map(|v| v.0).collect();
    let latest: Vec<i64> = per_key.values().map(|v| v.1).collect();
    exec(
        tx,
        "UPDATE keys k SET request_count = vg_sat_add(k.request_count, u.calls),
                           last_used_at = GREATEST(k.last_used_at, u.latest)
         FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS u (id, calls, latest)
         WHERE k.id = u.id",
        &[&ids, &calls, &latest],
    )
    .await?;
    Ok(())
}

/// The usage listing's query with only the filters given, bound in the order
/// project, key, since, then the limit.
fn usage_listing_sql(project: bool, key: bool, since: bool, until: bool, limit: bool) -> String {
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    let mut conditions = Vec::new();
    if project {
        conditions.push(format!("project = ${}", next()));
    }
    if key {
        conditions.push(format!("key_id = ${}", next()));
    }
    if since {
        conditions.push(format!("at >= ${}", next()));
    }
    if until {
        conditions.push(format!("at < ${}", next()));
    }
    let filter = if conditions.is_empty() {
        "TRUE".to_owned()
    } else {
        conditions.join(" AND ")
    };
    let limit = if limit {
        format!(" LIMIT ${}", next())
    } else {
        String::new()
    };
    format!("SELECT {USAGE_COLUMNS} FROM usage WHERE {filter} ORDER BY at DESC, id DESC{limit}")
}

impl PostgresStore {
    /// A reservation, retried on deadlocks; `lease` tags it (holders.rs).
    pub(crate) async fn reserve_tagged(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        expires_at: UnixMillis,
        lease: Option<(&str, Micros)>,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .reserve_inner(line, want, at_least, expires_at, lease)
                .await
            {
                Err(f) if f.retryable() && attempt < MAX_ATTEMPTS => backoff(attempt).await,
                other => return other.map_err(Fail::into_store),
            }
        }
    }

    /// One reservation attempt loop (see [`KeyStore::reserve_reporting`]).
    /// `lease`: the holder and cover to tag a lease with (holders.rs).
    async fn reserve_inner(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        expires_at: UnixMillis,
        lease: Option<(&str, Micros)>,
    ) -> Result<(Reservation, Option<Micros>), Fail> {
        let holder = lease.map(|(h, _)| h);
        let cover = lease.map(|(_, c)| money(c));
        let conn = self.conn().await?;
        let key = line.key.as_str();
        let period = line.period_start.0;
        let (limit, want_db, floor_db) =
            (money(line.limit), money(want), money(floor(want, at_least)));
        for _ in 0..MAX_RESERVE_ATTEMPTS {
            // One statement, one implicit transaction: the UPDATE holds the
            // line's row lock and is re-evaluated on its newest version
            // after waiting for a concurrent writer, so what it grants
            // always fits; the reservation row is inserted with it.
            let granted = opt(
                &conn,
                "WITH line AS (
                     UPDATE budget_lines
                        SET reserved = reserved + LEAST($4::BIGINT::NUMERIC,
                                GREATEST($3::BIGINT::NUMERIC - settled - reserved, 0))::BIGINT,
                            last_grant = LEAST($4::BIGINT::NUMERIC,
                                GREATEST($3::BIGINT::NUMERIC - settled - reserved, 0))::BIGINT
                      WHERE key_id = $1 AND period_start = $2
                        AND ($4::BIGINT = 0
                             OR $3::BIGINT::NUMERIC - settled - reserved >= $5::BIGINT)
                  RETURNING settled, reserved, last_grant
                 ), held AS (
                     INSERT INTO reservations (key_id, period_start, amount, expires_at,
                                               holder, cover)
                     SELECT $1, $2, last_grant, $6, $7::TEXT,
                            CASE WHEN $7::TEXT IS NULL THEN NULL
                                 ELSE LEAST(last_grant, $8::BIGINT) END
                     FROM line
                     RETURNING id
                 )
                 SELECT held.id, line.settled, line.reserved, line.last_grant
                 FROM held CROSS JOIN line",
                &[
                    &key,
                    &period,
                    &limit,
                    &want_db,
                    &floor_db,
                    &expires_at.0,
                    &holder,
                    &cover,
                ],
            )
            .await?;
            if let Some(row) = granted {
                let id: i64 = get(&row, 0)?;
                let usage = BudgetUsage {
                    settled: read_money(get(&row, 1)?, "settled spend")?,
                    reserved: read_money(get(&row, 2)?, "a held amount")?,
                };
                let amount = read_money(get(&row, 3)?, "a reservation")?;
                let id = u64::try_from(id)
                    .map_err(|_| StoreError::Corrupt(format!("reservation id {id} is negative")))?;
                let reservation = Reservation {
                    id: ReservationId(id),
                    line: line.clone(),
                    amount,
                };
                return Ok((reservation, Some(usage.remaining(line.limit))));
            }
            // Not granted: the line has no row yet, or it did not fit.
            let exists = opt(
                &conn,
                "SELECT settled, reserved FROM budget_lines WHERE key_id = $1 AND period_start = $2",
                &[&key, &period],
            )
            .await?;
            match exists {
                None => ensure_line(&conn, key, period).await?,
                Some(row) => {
                    let usage = BudgetUsage {
                        settled: read_money(get(&row, 0)?, "settled spend")?,
                        reserved: read_money(get(&row, 1)?, "a held amount")?,
                    };
                    // Fails unless a settlement freed room meanwhile; then
                    // the UPDATE is tried again.
                    reservable(usage.remaining(line.limit), want, at_least)?;
                }
            }
        }
        Err(Fail::Store(StoreError::Backend(
            "the budget line kept changing; reservation not made".to_owned(),
        )))
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        in_transaction!(self, |tx| insert_key_tx(&tx, key, carve).await?)
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let hex = hash.to_hex();
        async {
            let conn = self.conn().await?;
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE hash = $1 OR previous_hash = $1 LIMIT 1"
            );
            match opt(&conn, &sql, &[&hex]).await? {
                Some(r) => Ok(Some(key_from_row(&r)?)),
                None => Ok(None),
            }
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        async {
            let conn = self.conn().await?;
            let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = $1");
            match opt(&conn, &sql, &[&id.as_str()]).await? {
                Some(r) => Ok(Some(key_from_row(&r)?)),
                None => Ok(None),
            }
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn list_keys_with_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        match project {
            Some(p) => {
                self.keys_where("project = $1 AND provider_keys <> '[]'", &[&p])
                    .await
            }
            None => self.keys_where("provider_keys <> '[]'", &[]).await,
        }
    }

    async fn list_children(&self, parent: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.keys_where("parent = $1", &[&parent.as_str()]).await
    }

    async fn list_projects(&self) -> Result<Vec<String>, StoreError> {
        async {
            let conn = self.conn().await?;
            // A walk of the `(project, …)` index, one step per project (a
            // plain `DISTINCT` would read every key's entry).
            let sql = "WITH RECURSIVE p(project) AS (
                           SELECT MIN(project) FROM keys
                           UNION ALL
                           SELECT (SELECT MIN(project) FROM keys WHERE project > p.project)
                             FROM p WHERE p.project IS NOT NULL)
                       SELECT project COLLATE \"C\" FROM p WHERE project IS NOT NULL
                       UNION SELECT project FROM provider_keys ORDER BY 1";
            let mut projects = Vec::new();
            for r in rows(&conn, sql, &[]).await? {
                projects.push(r.try_get::<_, String>(0)?);
            }
            Ok(projects)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        match project {
            Some(p) => self.keys_where("project = $1", &[&p]).await,
            None => self.keys_where("TRUE", &[]).await,
        }
    }

    async fn list_keys_page(&self, query: &KeyPageQuery) -> Result<KeyPage, StoreError> {
        self.key_page(query).await.map_err(Fail::into_store)
    }

    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
        in_transaction!(self, |tx| revoke_tx(&tx, id, at).await?)
    }

    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError> {
        in_transaction!(self, |tx| rotate_tx(
            &tx,
            id,
            new_hash,
            new_prefix,
            grace_until
        )
        .await?)
    }

    async fn insert_provider_key(&self, k: &ProviderKeyRecord) -> Result<(), StoreError> {
        async {
            let conn = self.conn().await?;
            let n = exec(
                &conn,
                "INSERT INTO provider_keys (id, project, provider, name, sealed, hint, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                &[
                    &k.id.as_str(),
                    &k.project,
                    &k.provider.as_str(),
                    &k.name,
                    &k.sealed.as_bytes(),
                    &k.hint.as_str(),
                    &k.created_at.0,
                ],
            )
            .await?;
            if n == 0 {
                return Err(Fail::Store(StoreError::Conflict));
            }
            Ok(())
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        async {
            let conn = self.conn().await?;
            let sql = format!("SELECT {PROVIDER_KEY_COLUMNS} FROM provider_keys WHERE id = $1");
            match opt(&conn, &sql, &[&id.as_str()]).await? {
                Some(r) => Ok(Some(provider_key_from_row(&r)?)),
                None => Ok(None),
            }
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        async {
            let conn = self.conn().await?;
            let found = match project {
                Some(p) => {
                    let sql = format!(
                        "SELECT {PROVIDER_KEY_COLUMNS} FROM provider_keys WHERE project = $1
                         ORDER BY created_at, seq"
                    );
                    rows(&conn, &sql, &[&p]).await?
                }
                None => {
                    let sql = format!(
                        "SELECT {PROVIDER_KEY_COLUMNS} FROM provider_keys ORDER BY created_at, seq"
                    );
                    rows(&conn, &sql, &[]).await?
                }
            };
            Ok(found
                .iter()
                .map(provider_key_from_row)
                .collect::<Result<Vec<_>, _>>()?)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError> {
        async {
            let conn = self.conn().await?;
            let n = exec(
                &conn,
                "DELETE FROM provider_keys WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
            Ok(n > 0)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError> {
        async {
            let conn = self.conn().await?;
            let n = exec(
                &conn,
                "UPDATE provider_keys SET sealed = $3 WHERE id = $1 AND sealed = $2",
                &[&id.as_str(), &expected.as_bytes(), &new.as_bytes()],
            )
            .await?;
            Ok(n == 1)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        _now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        self.reserve_tagged(line, want, at_least, expires_at, None)
            .await
    }

    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        if settlements.is_empty() {
            return Ok(());
        }
        // Key order: two batches touching the same lines lock them in the
        // same order instead of deadlocking.
        let mut order: Vec<&Settlement> = settlements.iter().collect();
        order.sort_by(|a, b| {
            (a.reservation.line.key.as_str(), a.reservation.id.0)
                .cmp(&(b.reservation.line.key.as_str(), b.reservation.id.0))
        });
        in_transaction!(self, |tx| {
            for st in &order {
                let Ok(id) = i64::try_from(st.reservation.id.0) else {
                    continue; // no stored reservation has such an id
                };
                settle_one(&tx, id, Some(st.actual)).await?;
            }
        })
    }

    async fn settle_part(&self, settlement: &Settlement, keep: Micros) -> Result<bool, StoreError> {
        let Ok(id) = i64::try_from(settlement.reservation.id.0) else {
            return Ok(false); // no stored reservation has such an id
        };
        in_transaction!(self, |tx| settle_part_tx(&tx, id, settlement.actual, keep)
            .await?)
    }

    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        if charges.is_empty() {
            return Ok(());
        }
        let mut per_key: BTreeMap<&str, Micros> = BTreeMap::new();
        for (key, amount) in charges {
            let total = per_key.entry(key.as_str()).or_insert(Micros::ZERO);
            *total = total.saturating_add(*amount);
        }
        let ids: Vec<&str> = per_key.keys().copied().collect();
        let amounts: Vec<i64> = per_key.values().map(|m| money(*m)).collect();
        in_transaction!(self, |tx| {
            exec(
                &tx,
                "UPDATE keys k SET spend = vg_sat_add(k.spend, u.amount)
                 FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS u (id, amount)
                 WHERE k.id = u.id",
                &[&ids, &amounts],
            )
            .await?;
        })
    }

    async fn budget_usage(
        &self,
        line: &BudgetLine,
        _now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError> {
        async {
            let conn = self.conn().await?;
            line_usage(&conn, line.key.as_str(), line.period_start.0).await
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError> {
        in_transaction!(self, |tx| sweep_tx(&tx, now).await?)
    }

    fn lease_holders(&self) -> Option<&dyn vault_core::store::LeaseHolders> {
        Some(self)
    }

    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        in_transaction!(self, |tx| append_usage_tx(&tx, records).await?)
    }

    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        async {
            let conn = self.conn().await?;
            let key_id = filter.key_id.as_ref().map(KeyId::as_str);
            let since = filter.since.map(|t| t.0);
            let until = filter.until.map(|t| t.0);
            let limit = filter.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
            let mut values: Vec<&(dyn ToSql + Sync)> = Vec::new();
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
            if let Some(limit) = &limit {
                values.push(limit);
            }
            let sql = usage_listing_sql(
                filter.project.is_some(),
                key_id.is_some(),
                since.is_some(),
                until.is_some(),
                limit.is_some(),
            );
            Ok(rows(&conn, &sql, &values)
                .await?
                .iter()
                .map(usage_from_row)
                .collect::<Result<Vec<_>, _>>()?)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        async {
            let conn = self.conn().await?;
            match opt(&conn, "SELECT value FROM meta WHERE name = $1", &[&name]).await? {
                Some(r) => Ok(Some(get(&r, 0)?)),
                None => Ok(None),
            }
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        async {
            let conn = self.conn().await?;
            exec(
                &conn,
                "INSERT INTO meta (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &value],
            )
            .await?;
            Ok(())
        }
        .await
        .map_err(Fail::into_store)
    }
}

#[cfg(test)]
mod tests {
    use super::usage_listing_sql;

    #[test]
    fn usage_listing_numbers_only_the_filters_given() {
        let sql = usage_listing_sql(true, false, true, false, true);
        assert!(sql.contains("project = $1 AND at >= $2"), "{sql}");
        assert!(sql.ends_with("LIMIT $3"), "{sql}");
        let sql = usage_listing_sql(false, true, true, true, true);
        assert!(
            sql.contains("key_id = $1 AND at >= $2 AND at < $3"),
            "{sql}"
        );
        assert!(sql.ends_with("LIMIT $4"), "{sql}");
        let sql = usage_listing_sql(false, false, false, false, false);
        assert!(
            sql.contains("WHERE TRUE ORDER BY at DESC, id DESC"),
            "{sql}"
        );
    }
}
