//! [`PostgresStore`]: vaultgate's [`KeyStore`] on PostgreSQL, so that
//! several `vaultgate` replicas share one set of keys, budgets and usage.
//!
//! Every budget operation is exact across replicas: a reservation is one
//! `UPDATE` of its budget line's row whose `WHERE` clause checks that it
//! fits (PostgreSQL re-checks it on the newest row version after waiting
//! for a concurrent writer, so racing reservations from any number of
//! connections never pass the limit); settlement deletes the reservation
//! it settles (`DELETE … RETURNING`: exactly once); revocation, rotation,
//! carve-outs and sweeps each run in one transaction. `docs/replicas.md`
//! says what each operation guarantees and why.
//!
//! The schema is versioned ([`SCHEMA_VERSION`], `migrations/`):
//! [`PostgresStore::migrate`] creates or upgrades it (what `vaultgate
//! migrate` runs), and [`PostgresStore::connect`] refuses a database whose
//! schema is older or newer than this build's.
//!
//! ```no_run
//! use vault_core::store::KeyStore;
//! use vault_postgres::PostgresStore;
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "postgres://vaultgate:secret@db.internal:5432/vaultgate?sslmode=require";
//! PostgresStore::migrate(url).await?; // once per upgrade, from one place
//! let store = PostgresStore::connect(url, 16).await?;
//! store.set_meta("hello", "world").await?;
//! assert_eq!(store.get_meta("hello").await?.as_deref(), Some("world"));
//! # Ok(()) }
//! ```
//!
//! Connection URLs and their passwords never appear in errors, in `Debug`
//! or `Display` output, or in logs.

#![forbid(unsafe_code)]

mod audit;
mod connect;
mod error;
mod holders;
mod import;
mod page;
mod rows;
mod schema;
mod sessions;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;
use std::sync::Arc;

use deadpool_postgres::Pool;

pub use audit::PostgresAudit;
pub use connect::PostgresOptions;
pub use error::PostgresError;
pub use import::TableImport;
pub use schema::{SCHEMA_VERSION, migration_versions};
pub use vault_core::store::KeyStore;

use connect::Target;

/// Where `url` points, for messages: user, hosts, ports and database,
/// never the password. An unparsable URL is an error that does not repeat
/// it.
pub fn redacted(url: &str) -> Result<String, PostgresError> {
    Ok(connect::parse(url)?.1.to_string())
}

/// A [`KeyStore`] on PostgreSQL, shared by any number of processes.
///
/// Cheap to clone (the clones share one connection pool). `Debug` and
/// `Display` show the user, hosts and database, never the password.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    target: Target,
    pool_size: usize,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.inner.target)
            .field("pool_size", &self.inner.pool_size)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL at {}", self.inner.target)
    }
}

impl PostgresStore {
    /// Creates or upgrades the vaultgate schema of the database at `url`
    /// (what `vaultgate migrate` runs) and returns the versions it applied
    /// (empty when the schema was already current). Safe to run from
    /// several replicas at once: migrations take an advisory lock and apply
    /// in one transaction. Refuses a schema newer than this build's.
    pub async fn migrate(url: &str) -> Result<Vec<i32>, PostgresError> {
        Self::migrate_with(url, &PostgresOptions::default()).await
    }

    /// [`migrate`](Self::migrate) with TLS options (a CA file).
    pub async fn migrate_with(
        url: &str,
        options: &PostgresOptions,
    ) -> Result<Vec<i32>, PostgresError> {
        let (config, target) = connect::parse(url)?;
        let mut client = connect::single(&config, options, &target).await?;
        let applied = schema::migrate(&mut client).await?;
        if !applied.is_empty() {
            tracing::info!(%target, ?applied, "migrated the vaultgate schema");
        }
        Ok(applied)
    }

    /// Connects to the database at `url` with a pool of at most `pool_size`
    /// connections, after checking that its schema is exactly this build's
    /// ([`PostgresError::SchemaOutdated`] names `vaultgate migrate`).
    ///
    /// `url` is `postgres://user:password@host:port/database` (or libpq's
    /// `key=value` form); `sslmode=require` makes TLS mandatory (rustls,
    /// server certificates checked against the Mozilla roots, see
    /// [`PostgresOptions::ca_file`] for a private CA).
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, PostgresError> {
        Self::connect_with(url, &PostgresOptions::with_pool_size(pool_size)).await
    }

    /// [`connect`](Self::connect) with options.
    pub async fn connect_with(url: &str, options: &PostgresOptions) -> Result<Self, PostgresError> {
        let store = Self::connect_lazy(url, options)?;
        schema::check(store.schema_version().await?)?;
        Ok(store)
    }

    /// A store whose connections open on first use, without checking the
    /// schema (the test harness checks it once for many stores).
    pub(crate) fn connect_lazy(
        url: &str,
        options: &PostgresOptions,
    ) -> Result<Self, PostgresError> {
        let (config, target) = connect::parse(url)?;
        let pool = connect::pool(config, options)?;
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                target,
                pool_size: options.pool_size.max(1),
            }),
        })
    }

    /// A pooled connection; errors name the database, never a password.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, PostgresError> {
        self.inner.pool.get().await.map_err(|e| {
            PostgresError::Backend(format!(
                "connecting to {}: {}",
                self.inner.target,
                connect::describe(&e)
            ))
        })
    }

    /// The schema version of the database (0: no vaultgate schema).
    pub async fn schema_version(&self) -> Result<i32, PostgresError> {
        let conn = self.inner.pool.get().await.map_err(|e| {
            PostgresError::Backend(format!(
                "connecting to {}: {}",
                self.inner.target,
                connect::describe(&e)
            ))
        })?;
        let client: &tokio_postgres::Client = &conn;
        schema::version_of(client).await
    }
}
