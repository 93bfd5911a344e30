//! Versioned schema migrations, kept in `migrations/` and applied in order.
//!
//! `schema_version` holds one row per applied migration. [`migrate`] applies
//! the missing ones in one transaction under an advisory lock, so replicas
//! migrating at once apply each exactly once (the second waits, then finds
//! nothing to do). Append migrations; never edit a released one.

use crate::PostgresError;

/// `(version, SQL)`, in order: migration `v` brings the schema to version `v`.
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_audit.sql")),
    (3, include_str!("../migrations/0003_lease_holders.sql")),
    (4, include_str!("../migrations/0004_key_pages.sql")),
    (5, include_str!("../migrations/0005_ui_sessions.sql")),
];

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 5;

/// The versions of this build's migrations, in the order they apply.
pub fn migration_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|(v, _)| *v).collect()
}

const _: () = assert!(MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION);

/// The advisory lock key migrations hold ("vaultgat" in ASCII).
const MIGRATION_LOCK: i64 = 0x7661_756c_7467_6174;

const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

fn backend(what: &str, e: &tokio_postgres::Error) -> PostgresError {
    PostgresError::Backend(format!("{what}: {e}"))
}

/// The schema version of the database `client` is connected to: 0 when it
/// has no vaultgate schema.
pub(crate) async fn version_of<C: tokio_postgres::GenericClient>(
    client: &C,
) -> Result<i32, PostgresError> {
    let exists = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await
        .map_err(|e| backend("reading the schema version", &e))?;
    if !exists
        .try_get::<_, bool>(0)
        .map_err(|e| backend("reading the schema version", &e))?
    {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await
        .map_err(|e| backend("reading the schema version", &e))?;
    row.try_get(0)
        .map_err(|e| backend("reading the schema version", &e))
}

/// Fails unless the schema is exactly this build's.
pub(crate) fn check(found: i32) -> Result<(), PostgresError> {
    match found.cmp(&SCHEMA_VERSION) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(PostgresError::SchemaOutdated {
            found,
            expected: SCHEMA_VERSION,
        }),
        std::cmp::Ordering::Greater => Err(PostgresError::SchemaTooNew {
            found,
            expected: SCHEMA_VERSION,
        }),
    }
}

/// Applies the missing migrations in one transaction; returns the versions
/// applied (empty when the schema was current).
pub(crate) async fn migrate(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<i32>, PostgresError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| backend("starting the migration", &e))?;
    // Held until the transaction ends: a second migrator waits here.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| backend("taking the migration lock", &e))?;
    tx.batch_execute(CREATE_VERSION_TABLE)
        .await
        .map_err(|e| backend("creating schema_version", &e))?;
    let found = version_of(&tx).await?;
    if found > SCHEMA_VERSION {
        return Err(PostgresError::SchemaTooNew {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| backend(&format!("applying migration {version}"), &e))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(|e| backend(&format!("recording migration {version}"), &e))?;
        applied.push(*version);
    }
    tx.commit()
        .await
        .map_err(|e| backend("committing the migration", &e))?;
    Ok(applied)
}
