//! [`PostgresError`]: why connecting or migrating failed. Messages never
//! contain the connection URL or its password.

use vault_core::store::StoreError;

/// Why [`PostgresStore::connect`](crate::PostgresStore::connect) or
/// [`PostgresStore::migrate`](crate::PostgresStore::migrate) failed.
///
/// Messages name hosts and databases at most, never the connection URL or
/// its password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The connection URL could not be parsed (the message does not repeat it).
    #[error("invalid PostgreSQL connection URL: {0}")]
    Url(String),
    /// The TLS configuration could not be built (e.g. an unreadable CA file).
    #[error("PostgreSQL TLS configuration: {0}")]
    Tls(String),
    /// The server could not be reached, refused the login, or failed a query.
    #[error("PostgreSQL: {0}")]
    Backend(String),
    /// The database has no vaultgate schema, or an older one than this build.
    #[error(
        "the database's vaultgate schema is at version {found}, this build needs {expected}: \
         run `vaultgate migrate` first"
    )]
    SchemaOutdated {
        /// The version found (0: no vaultgate schema).
        found: i32,
        /// The version this build uses.
        expected: i32,
    },
    /// A copy into the database was refused: it already holds different
    /// data under the same ids (nothing was written).
    #[error("refusing to copy: {0}")]
    Conflict(String),
    /// The database was migrated by a newer vaultgate than this build.
    #[error(
        "the database's vaultgate schema is at version {found}, newer than this build \
         understands ({expected}): upgrade vaultgate"
    )]
    SchemaTooNew {
        /// The version found.
        found: i32,
        /// The newest version this build knows.
        expected: i32,
    },
}

impl From<PostgresError> for StoreError {
    fn from(e: PostgresError) -> Self {
        StoreError::Backend(e.to_string())
    }
}
