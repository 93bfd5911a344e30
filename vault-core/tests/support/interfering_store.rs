//! A `KeyStore` that forwards to another and interferes with
//! `replace_sealed`: the crash, race and progress cases of master-key
//! rotation tests (`rotation.rs`, `rotation_kill.rs`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use vault_core::clock::UnixMillis;
use vault_core::crypto::Sealed;
use vault_core::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use vault_core::money::Micros;
use vault_core::record::{
    BudgetLine, BudgetUsage, KeyRecord, ProviderKeyRecord, Reservation, Settlement, UsageFilter,
    UsageRecord,
};
use vault_core::store::{KeyPage, KeyPageQuery, KeyStore, StoreError};

/// The store being wrapped.
pub(crate) type Store = std::sync::Arc<dyn KeyStore>;

/// What the wrapper does on `replace_sealed`.
pub(crate) enum Interference {
    /// Forward this many calls, then fail every later one (a crash).
    FailAfter(AtomicUsize),
    /// Before the first call for an id, replace the record concurrently
    /// with this value.
    ChangeFirst(Mutex<HashMap<ProviderKeyId, Sealed>>),
    /// Before the first call, remove the record concurrently.
    RemoveFirst(AtomicUsize),
    /// After each successful re-wrap, report how many there have been.
    Report(Box<dyn Fn(usize) + Send + Sync>, AtomicUsize),
}

/// A store that forwards to another, interfering with `replace_sealed`.
pub(crate) struct Interfering {
    pub inner: Store,
    pub interference: Interference,
    pub calls: AtomicUsize,
}

impl Interfering {
    pub(crate) fn new(inner: Store, interference: Interference) -> Self {
        Interfering {
            inner,
            interference,
            calls: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl KeyStore for Interfering {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        self.inner.insert_key(key, carve).await
    }
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }
    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get_key(id).await
    }
    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list_keys(project).await
    }
    async fn list_keys_page(&self, query: &KeyPageQuery) -> Result<KeyPage, StoreError> {
        self.inner.list_keys_page(query).await
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
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.interference {
            Interference::FailAfter(left) => {
                if left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err()
                {
                    return Err(StoreError::Backend("injected crash".to_owned()));
                }
            }
            Interference::ChangeFirst(changes) => {
                let change = changes.lock().unwrap().remove(id);
                if let Some(value) = change {
                    assert!(self.inner.replace_sealed(id, expected, &value).await?);
                }
            }
            Interference::RemoveFirst(left) => {
                if left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    assert!(self.inner.remove_provider_key(id).await?);
                }
            }
            Interference::Report(..) => {}
        }
        let replaced = self.inner.replace_sealed(id, expected, new).await?;
        if let (Interference::Report(report, done), true) = (&self.interference, replaced) {
            report(done.fetch_add(1, Ordering::SeqCst) + 1);
        }
        Ok(replaced)
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
    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        self.inner.add_spend(charges).await
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
