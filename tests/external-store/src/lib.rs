//! A `KeyStore` defined outside the vaultgate workspace: a newtype that
//! delegates every method to `MemoryStore`. It exists to prove that a store
//! written elsewhere can run `vault_core::conformance` (docs/conformance.md).

use async_trait::async_trait;
use vault_core::clock::UnixMillis;
use vault_core::crypto::Sealed;
use vault_core::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use vault_core::money::Micros;
use vault_core::record::{
    BudgetLine, BudgetUsage, KeyRecord, ProviderKeyRecord, Reservation, Settlement, UsageFilter,
    UsageRecord,
};
use vault_core::store::{KeyStore, MemoryStore, StoreError};

/// A store of our own, backed by a `MemoryStore`.
#[derive(Debug, Default)]
pub struct WrappedStore(MemoryStore);

impl WrappedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl KeyStore for WrappedStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        self.0.insert_key(key, carve).await
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        self.0.find_by_hash(hash).await
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.0.get_key(id).await
    }

    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.0.list_keys(project).await
    }

    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
        self.0.revoke_key(id, at).await
    }

    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError> {
        self.0
            .rotate_key(id, new_hash, new_prefix, grace_until)
            .await
    }

    async fn insert_provider_key(&self, key: &ProviderKeyRecord) -> Result<(), StoreError> {
        self.0.insert_provider_key(key).await
    }

    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        self.0.get_provider_key(id).await
    }

    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        self.0.list_provider_keys(project).await
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError> {
        self.0.remove_provider_key(id).await
    }

    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError> {
        self.0.replace_sealed(id, expected, new).await
    }

    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        self.0
            .reserve_reporting(line, want, at_least, now, expires_at)
            .await
    }

    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        self.0.settle(settlements).await
    }

    async fn settle_part(&self, settlement: &Settlement, keep: Micros) -> Result<bool, StoreError> {
        self.0.settle_part(settlement, keep).await
    }

    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        self.0.add_spend(charges).await
    }

    async fn budget_usage(
        &self,
        line: &BudgetLine,
        now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError> {
        self.0.budget_usage(line, now).await
    }

    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError> {
        self.0.sweep(now).await
    }

    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        self.0.append_usage(records).await
    }

    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        self.0.list_usage(filter).await
    }

    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.0.get_meta(name).await
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.0.set_meta(name, value).await
    }
}
