//! Where keys, provider keys, usage and budgets live.
//!
//! [`KeyStore`] is the one trait every backend implements;
//! [`MemoryStore`] (tests, embedding) and [`SqliteStore`] (the embedded
//! default) both pass the same conformance suite (`vault_core::conformance`,
//! behind the `conformance` feature; run by `tests/store_conformance.rs`).

pub mod budget;
pub mod copy;
mod holders;
mod journal;
mod leased;
mod memory;
mod page;
pub mod sessions;
mod sqlite;

pub use holders::{DEFAULT_STALE_AFTER, LeaseHolders};
pub use journal::recover_lease_journals;
pub use leased::{
    DEFAULT_LEASE_FACTOR, DEFAULT_LEASE_WINDOW, FAST_COVER_MS, FAST_LEASE_MS,
    JOURNAL_COMPACT_BYTES, LeasedStore, MAX_LEASE_GROWTH,
};
pub use memory::MemoryStore;
pub use page::{KeyPage, KeyPageQuery, KeyStatusFilter, MAX_PAGE_LIMIT, budget_exhausted, page_of};
pub use sessions::{MemorySessions, SessionPurge, SessionRecord, SessionStore};
pub use sqlite::{DB_FILE_NAME, SqliteStore};

use async_trait::async_trait;

use crate::clock::UnixMillis;
use crate::crypto::Sealed;
use crate::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::record::{
    BudgetLine, BudgetUsage, KeyRecord, ProviderKeyRecord, Reservation, Settlement, UsageFilter,
    UsageRecord,
};

/// A store failure. Messages never contain a secret; backend messages may
/// contain SQL and are for logs only, never for clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record does not exist.
    #[error("not found")]
    NotFound,
    /// A record with the same id or hash exists.
    #[error("already exists")]
    Conflict,
    /// The budget line cannot cover the amount.
    #[error("budget exceeded: {remaining} remaining")]
    BudgetExceeded {
        /// What was left.
        remaining: Micros,
    },
    /// A stored row could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, locking, SQL).
    #[error("store backend error: {0}")]
    Backend(String),
    /// The backend cannot be reached (a database server stopped, refusing
    /// connections or closing them): the operation was not applied, or —
    /// when a commit's answer was lost — may have been. Retry later; the
    /// proxy answers 503 `store_unavailable` meanwhile.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The storage every part of vaultgate shares.
///
/// Durability: key, provider-key and revocation writes are durable when they
/// return. Budget operations are atomic: concurrent `reserve` calls on one
/// line never together exceed its limit.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Inserts a key. With `carve`, atomically holds `carve.1` on the parent's
    /// budget line `carve.0` for the child's life, failing with
    /// [`StoreError::BudgetExceeded`] (and inserting nothing) if it does not fit.
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError>;

    /// Finds a key by the hash of its current secret or, during a rotation's
    /// grace period, its previous one (the caller checks the grace deadline).
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError>;

    /// Gets a key by id.
    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// Lists keys, of one project or all, oldest first.
    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;

    /// One page of keys, newest first, and how many match in all
    /// ([`KeyPageQuery`]). The default filters [`list_keys`](Self::list_keys)
    /// in memory ([`page_of`]); `SqliteStore` and `PostgresStore` answer in
    /// SQL without reading the other pages' rows.
    async fn list_keys_page(&self, query: &KeyPageQuery) -> Result<KeyPage, StoreError> {
        let keys = self.list_keys(query.project.as_deref()).await?;
        Ok(page_of(keys, query))
    }

    /// The keys, of one project or all, limited to named provider keys (a
    /// non-empty `provider_keys`), oldest first. The default filters
    /// [`list_keys`](Self::list_keys); `SqliteStore` and `PostgresStore`
    /// decode only those rows.
    async fn list_keys_with_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let mut keys = self.list_keys(project).await?;
        keys.retain(|k| !k.provider_keys.is_empty());
        Ok(keys)
    }

    /// The keys whose parent is `parent`, oldest first. The default filters
    /// [`list_keys`](Self::list_keys); `SqliteStore` and `PostgresStore`
    /// read the parent index.
    async fn list_children(&self, parent: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let mut keys = self.list_keys(None).await?;
        keys.retain(|k| k.parent.as_ref() == Some(parent));
        Ok(keys)
    }

    /// Every project with a key or a provider key, sorted, each once. The
    /// default reads every record; `SqliteStore` and `PostgresStore` read
    /// the project indexes only.
    async fn list_projects(&self) -> Result<Vec<String>, StoreError> {
        let mut projects: Vec<String> = self
            .list_keys(None)
            .await?
            .into_iter()
            .map(|k| k.project)
            .chain(
                self.list_provider_keys(None)
                    .await?
                    .into_iter()
                    .map(|p| p.project),
            )
            .collect();
        projects.sort_unstable();
        projects.dedup();
        Ok(projects)
    }

    /// Revokes a key and all its descendants in one transaction, settling the
    /// carve-outs they hold on their parents at their actual spend. Returns
    /// the ids newly revoked (empty if it was already revoked).
    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError>;

    /// Gives a key a new secret; the previous one keeps working until
    /// `grace_until` (if given).
    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError>;

    /// Inserts a provider key.
    async fn insert_provider_key(&self, key: &ProviderKeyRecord) -> Result<(), StoreError>;

    /// Gets a provider key by id.
    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError>;

    /// Lists provider keys, of one project or all, oldest first.
    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError>;

    /// Removes a provider key; `false` if it did not exist.
    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError>;

    /// Replaces a provider key's sealed value if it still equals `expected`
    /// (compare-and-swap, for master-key rotation); `false` if it changed.
    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError>;

    /// Atomically reserves between `at_least` and `want` (as much as fits) on
    /// `line`, held until settled or until `expires_at`, and returns what the
    /// line has left once it is held (for `X-Budget-Remaining-USD`; `None`
    /// when unknown), computed in the reserving transaction. Fails with
    /// [`StoreError::BudgetExceeded`] when not even `at_least` fits.
    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError>;

    /// [`reserve_reporting`](Self::reserve_reporting) without the remaining
    /// figure.
    async fn reserve(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<Reservation, StoreError> {
        self.reserve_reporting(line, want, at_least, now, expires_at)
            .await
            .map(|(r, _)| r)
    }

    /// Settles reservations at their real cost, adding it to the line's period
    /// and the key's lifetime spend. Settling one already settled or swept is
    /// a no-op.
    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError>;

    /// Settles part of a held reservation and keeps the rest held under the
    /// same id: charges `settlement.actual` to its line and key (as
    /// [`settle`](Self::settle) does) and lowers what it holds to `keep`
    /// (never raises it), in one transaction. Returns `false`, changing
    /// nothing, when the reservation is no longer held (settled or swept).
    /// [`LeasedStore`] needs it to give back the unused part of a lease
    /// while calls are still in flight on it. The default refuses with
    /// [`StoreError::Backend`]; `MemoryStore` and `SqliteStore` implement it.
    async fn settle_part(&self, settlement: &Settlement, keep: Micros) -> Result<bool, StoreError> {
        let _ = (settlement, keep);
        Err(StoreError::Backend(
            "this store cannot settle part of a reservation".to_owned(),
        ))
    }

    /// Adds to keys' lifetime spend costs that no reservation carried (calls
    /// of keys without a budget). Unknown keys are skipped.
    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError>;

    /// Settled and held amounts of a line at `now`.
    async fn budget_usage(
        &self,
        line: &BudgetLine,
        now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError>;

    /// Housekeeping at `now`: reservations past their expiry are charged in
    /// full (the call may have reached the provider); carve-outs of children
    /// that have expired are settled at the child's spend. Returns how many
    /// were swept.
    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError>;

    /// Gives back what this handle holds in the store on behalf of the
    /// process (a [`LeasedStore`]'s leases), on graceful shutdown, once
    /// every call has settled. The default holds nothing and does nothing.
    async fn drain(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Frequent, cheap housekeeping for stores shared by replicas on
    /// several hosts, run every second or so by the maintenance task (never
    /// on a call's path): a [`LeasedStore`] over a store with
    /// [`lease_holders`](Self::lease_holders) records that it is alive and
    /// what its leases may have admitted, and closes the leases of replicas
    /// that stopped doing so (docs/replicas.md#when-a-replica-dies).
    /// Returns how many dead replicas' leases were closed. The default does
    /// nothing.
    async fn heartbeat(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// The store's registry of lease holders, when replicas on several
    /// hosts share it ([`LeaseHolders`]); `None` (the default) for stores
    /// one host owns.
    fn lease_holders(&self) -> Option<&dyn LeaseHolders> {
        None
    }

    /// Appends usage records and updates each key's `last_used_at` and
    /// `request_count` (denied calls count too).
    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError>;

    /// Usage records, newest first.
    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError>;

    /// Reads a metadata value (e.g. master-key rotation progress).
    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Writes a metadata value durably.
    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError>;
}
