#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! A key lookup in flight while the key is revoked must not put the
//! pre-revocation record back in the key cache (docs/threat-model.md, A5):
//! the next request is refused, not admitted for the cache's lifetime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use tokio::sync::Notify;
use vault_core::clock::UnixMillis;
use vault_core::crypto::{AesGcmEncryptor, MasterKey, Sealed};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use vault_core::manage::CreateKeyRequest;
use vault_core::money::Micros;
use vault_core::policy::{DefaultEngine, PlanSet};
use vault_core::pricing::PriceTable;
use vault_core::record::{
    BudgetLine, BudgetUsage, KeyRecord, KeyStatus, ProviderKeyRecord, Reservation, Settlement,
    UsageFilter, UsageRecord,
};
use vault_core::store::{KeyStore, MemoryStore, StoreError};
use vault_tower::VaultContext;
use vault_tower::admin::{Actor, Admin};

/// A store whose next `find_by_hash`, once armed, reads the inner store and
/// then waits for a release before answering: a lookup in flight.
struct SlowLookup {
    inner: MemoryStore,
    armed: AtomicBool,
    read: Notify,
    release: Notify,
}

#[async_trait]
impl KeyStore for SlowLookup {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        self.inner.insert_key(key, carve).await
    }
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let found = self.inner.find_by_hash(hash).await;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.read.notify_one();
            self.release.notified().await;
        }
        found
    }
    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get_key(id).await
    }
    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list_keys(project).await
    }
    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
        self.inner.revoke_key(id, at).await
    }
    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError> {
        self.inner
            .rotate_key(id, new_hash, new_prefix, grace_until)
            .await
    }
    async fn insert_provider_key(&self, key: &ProviderKeyRecord) -> Result<(), StoreError> {
        self.inner.insert_provider_key(key).await
    }
    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        self.inner.get_provider_key(id).await
    }
    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        self.inner.list_provider_keys(project).await
    }
    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError> {
        self.inner.remove_provider_key(id).await
    }
    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError> {
        self.inner.replace_sealed(id, expected, new).await
    }
    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        self.inner
            .reserve_reporting(line, want, at_least, now, expires_at)
            .await
    }
    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        self.inner.settle(settlements).await
    }
    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        self.inner.add_spend(charges).await
    }
    async fn budget_usage(
        &self,
        line: &BudgetLine,
        now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError> {
        self.inner.budget_usage(line, now).await
    }
    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError> {
        self.inner.sweep(now).await
    }
    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        self.inner.append_usage(records).await
    }
    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        self.inner.list_usage(filter).await
    }
    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_meta(name).await
    }
    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.inner.set_meta(name, value).await
    }
}

fn bearer(key: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    h
}

#[tokio::test]
async fn concurrency_a_lookup_in_flight_cannot_undo_a_revocation() {
    let store = Arc::new(SlowLookup {
        inner: MemoryStore::new(),
        armed: AtomicBool::new(false),
        read: Notify::new(),
        release: Notify::new(),
    });
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        Arc::new(vault_core::clock::SystemClock),
    ));
    let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let ctx = VaultContext::builder(store.clone(), encryptor, engine).build();
    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    for round in 0..20 {
        let issued = admin
            .manager()
            .create_key(
                &Actor::Operator,
                CreateKeyRequest {
                    name: Some(format!("raced {round}")),
                    permissions: Some(vec!["chat:write".into()]),
                    env: Some(KeyEnv::Live),
                    ..CreateKeyRequest::default()
                },
            )
            .await
            .unwrap();
        let secret = issued.key.expose_secret().to_owned();

        // A lookup reads the active record, then stalls.
        store.armed.store(true, Ordering::SeqCst);
        let lookup = {
            let ctx = ctx.clone();
            let headers = bearer(&secret);
            tokio::spawn(async move { ctx.presented_record(&headers, None).await })
        };
        store.read.notified().await;
        // The key is revoked while the lookup is in flight.
        admin
            .manager()
            .revoke_key(&Actor::Operator, &issued.record.id)
            .await
            .unwrap();
        store.release.notify_one();
        let stale = lookup.await.unwrap().unwrap();
        assert_eq!(
            stale.revoked_at, None,
            "the in-flight lookup read it active"
        );

        // The next request sees the revocation at once.
        let now = vault_core::clock::Clock::now(&vault_core::clock::SystemClock);
        let next = ctx.presented_record(&bearer(&secret), None).await.unwrap();
        assert_eq!(
            next.status_at(now),
            KeyStatus::Revoked,
            "round {round}: a stale record came back from the cache"
        );
    }
}
