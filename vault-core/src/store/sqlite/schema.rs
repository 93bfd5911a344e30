//! The schema, as an ordered list of migrations versioned by
//! `PRAGMA user_version`. Append new migrations; never edit a released one.
//!
//! The SQL stays portable (a later `PostgresStore` reuses it): hashes are
//! lowercase hex text, policies, scopes and id lists JSON text, money
//! `INTEGER` micro-dollars, times `INTEGER` unix milliseconds.

use rusqlite::{Connection, TransactionBehavior};

use super::backend;
use crate::store::StoreError;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: keys, provider keys, budgets, usage, metadata.
    "CREATE TABLE keys (
        id                   TEXT PRIMARY KEY,
        hash                 TEXT NOT NULL UNIQUE,
        prefix               TEXT NOT NULL,
        previous_hash        TEXT UNIQUE,
        previous_valid_until INTEGER,
        name                 TEXT NOT NULL,
        project              TEXT NOT NULL,
        env                  TEXT NOT NULL,
        scopes               TEXT NOT NULL,
        plan                 TEXT,
        policy               TEXT NOT NULL,
        parent               TEXT REFERENCES keys (id),
        provider_keys        TEXT NOT NULL,
        created_at           INTEGER NOT NULL,
        expires_at           INTEGER,
        last_used_at         INTEGER,
        request_count        INTEGER NOT NULL DEFAULT 0,
        status               TEXT NOT NULL,
        revoked_at           INTEGER,
        spend                INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX keys_by_project ON keys (project, created_at);
    CREATE INDEX keys_by_parent ON keys (parent);

    CREATE TABLE provider_keys (
        id         TEXT PRIMARY KEY,
        project    TEXT NOT NULL,
        provider   TEXT NOT NULL,
        name       TEXT NOT NULL,
        sealed     BLOB NOT NULL,
        hint       TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX provider_keys_by_project ON provider_keys (project, created_at);

    CREATE TABLE budget_settled (
        key_id       TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        settled      INTEGER NOT NULL,
        PRIMARY KEY (key_id, period_start)
    );

    CREATE TABLE reservations (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id       TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        amount       INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL
    );
    CREATE INDEX reservations_by_line ON reservations (key_id, period_start);
    CREATE INDEX reservations_by_expiry ON reservations (expires_at);

    CREATE TABLE carve_outs (
        child_id     TEXT PRIMARY KEY REFERENCES keys (id),
        parent_id    TEXT NOT NULL REFERENCES keys (id),
        period_start INTEGER NOT NULL,
        amount       INTEGER NOT NULL
    );
    CREATE INDEX carve_outs_by_line ON carve_outs (parent_id, period_start);

    CREATE TABLE usage (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         INTEGER NOT NULL,
        key_id     TEXT NOT NULL,
        project    TEXT NOT NULL,
        provider   TEXT,
        endpoint   TEXT NOT NULL,
        model      TEXT,
        tokens_in  INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        cost       INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        status     INTEGER NOT NULL,
        denial     TEXT,
        shadow     INTEGER NOT NULL
    );
    CREATE INDEX usage_by_time ON usage (at);
    CREATE INDEX usage_by_key ON usage (key_id, at);
    CREATE INDEX usage_by_project ON usage (project, at);

    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // 2: a line's held amounts summed from the index alone (each reservation
    // and carve-out is one index entry read, no table row), replacing the
    // indexes these extend. Idempotent, so a database whose version was set
    // back re-runs it harmlessly.
    "CREATE INDEX IF NOT EXISTS reservations_by_line_amount
        ON reservations (key_id, period_start, amount);
    DROP INDEX IF EXISTS reservations_by_line;
    CREATE INDEX IF NOT EXISTS carve_outs_by_line_amount
        ON carve_outs (parent_id, period_start, amount);
    DROP INDEX IF EXISTS carve_outs_by_line;",
    // 3: usage records say which token classes a call used and which
    // settlement rule charged it.
    "ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN audio_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN settlement TEXT;",
    // 4: a closed carve-out (child revoked or expired) stays in `carve_outs`
    // holding what the child's open calls hold, with what they may still
    // charge the parent here (docs/threat-model.md: spend never passes the
    // cap). A carve-out without a row here is open. Idempotent.
    "CREATE TABLE IF NOT EXISTS closed_carve_outs (
        child_id   TEXT PRIMARY KEY REFERENCES carve_outs (child_id),
        chargeable INTEGER NOT NULL
    );",
    // 5: the key list's pages, newest first with the id breaking ties, per
    // project and across projects (docs/dashboard.md#api-keys); the first
    // extends `keys_by_project`. Idempotent.
    "CREATE INDEX IF NOT EXISTS keys_by_project_newest ON keys (project, created_at, id);
    DROP INDEX IF EXISTS keys_by_project;
    CREATE INDEX IF NOT EXISTS keys_by_created ON keys (created_at, id);",
    // 6: dashboard sessions, under the SHA-256 of the cookie's value, and
    // failed sign-ins per client address (docs/dashboard.md#sessions).
    "CREATE TABLE IF NOT EXISTS ui_sessions (
        id        TEXT PRIMARY KEY,
        key_hash  TEXT NOT NULL,
        csrf      TEXT NOT NULL,
        project   TEXT,
        created   INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS ui_sessions_by_last_seen ON ui_sessions (last_seen);
    CREATE TABLE IF NOT EXISTS ui_sign_in_failures (
        client       TEXT PRIMARY KEY,
        window_start INTEGER NOT NULL,
        failures     INTEGER NOT NULL
    );",
];

/// The schema version this build writes.
pub(super) const CURRENT_VERSION: usize = MIGRATIONS.len();

/// Brings the database up to [`CURRENT_VERSION`] in one immediate
/// transaction (so concurrent openers apply each migration once), refusing a
/// database written by a newer build.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    let version = usize::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("negative schema version {version}")))?;
    if version > CURRENT_VERSION {
        return Err(StoreError::Backend(format!(
            "the database has schema version {version}, newer than this build of vaultgate \
             understands ({CURRENT_VERSION}); upgrade vaultgate to open it"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql).map_err(backend)?;
        let next = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.pragma_update(None, "user_version", next)
            .map_err(backend)?;
    }
    tx.commit().map_err(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What SQLite plans for a query, one detail per line.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn budget_sums_read_covering_indexes_only() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        for sql in [
            "SELECT amount FROM reservations WHERE key_id = 'k' AND period_start = 1",
            "SELECT amount FROM carve_outs WHERE parent_id = 'k' AND period_start = 1",
        ] {
            let plan = plan(&conn, sql);
            assert!(plan.contains("USING COVERING INDEX"), "{sql}: {plan}");
        }
    }

    #[test]
    fn usage_listings_walk_the_index_of_their_filter() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let cases = [
            ((true, true, false, false), "usage_by_key"),
            ((false, true, true, false), "usage_by_key"),
            ((false, true, true, true), "usage_by_key"),
            ((true, false, true, false), "usage_by_project"),
            ((true, false, true, true), "usage_by_project"),
            ((true, false, false, false), "usage_by_project"),
            ((false, false, false, false), "usage_by_time"),
            ((false, false, true, true), "usage_by_time"),
        ];
        for ((project, key, since, until), index) in cases {
            let sql = super::super::usage_listing_sql(project, key, since, until).replace('?', "1");
            let plan = plan(&conn, &sql);
            assert!(plan.contains(index), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql} sorts: {plan}");
        }
    }

    #[test]
    fn sweep_reads_open_carve_outs_not_every_key() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let plan = plan(&conn, &super::super::EXPIRED_CARVE_OUTS.replace("?1", "0"));
        assert!(plan.contains("SCAN c"), "{plan}");
        assert!(!plan.contains("SCAN k"), "{plan}");
    }

    #[test]
    fn lifecycle_version_one_database_migrates_keeping_open_reservations() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO reservations (key_id, period_start, amount, expires_at)
             VALUES ('k', 1, 5, 9), ('k', 1, 7, 9), ('k', 2, 100, 9)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(usize::try_from(version).unwrap(), CURRENT_VERSION);
        let held: i64 = conn
            .query_row(
                "SELECT SUM(amount) FROM reservations WHERE key_id = 'k' AND period_start = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(held, 12);
        // Migrating again is a no-op.
        migrate(&mut conn).unwrap();
    }
}
