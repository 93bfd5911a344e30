//! `VaultContext`: what the layer and the management API share — the store,
//! policy engine, encryptor, caches, usage worker and metrics.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use vault_core::audit::AuditTrail;
use vault_core::clock::{SharedClock, SystemClock};
use vault_core::crypto::Encryptor;
use vault_core::denial::Denial;
use vault_core::key::{KeyFormat, KeyHash, KeyId};
use vault_core::policy::PolicyEngine;
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, MAX_CHAIN_DEPTH, ProviderKeyRecord};
use vault_core::store::{KeyStore, StoreError};

use crate::credentials::{Presented, presented_key};
use crate::forward::Upstreams;
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::replicas::{ProbeOutcome, ReadinessProbe, RevocationNotifier, StoreProbe, run_probes};
use crate::vault::sink::UsageSink;

/// How long a cached key record is trusted. A revocation made by another
/// process sharing the store is seen within this bound, under the second
/// docs/api.md#authentication promises; one made through this process's
/// management API invalidates the cache at once.
pub const KEY_CACHE_TTL: Duration = Duration::from_millis(900);

/// Limits on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest request body read, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Longest wait for the whole request body (408 after).
    pub body_timeout: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_body_bytes: 10 << 20,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// State shared by [`Vault`](crate::Vault) services and the management API.
/// Build one per process (inside a tokio runtime: it starts the usage worker).
pub struct VaultContext {
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) engine: Arc<dyn PolicyEngine>,
    pub(crate) encryptor: Arc<dyn Encryptor>,
    pub(crate) format: KeyFormat,
    pub(crate) clock: SharedClock,
    pub(crate) upstreams: Upstreams,
    pub(crate) limits: RequestLimits,
    pub(crate) test_keys_use_mock: bool,
    pub(crate) audit: Option<Arc<dyn AuditTrail>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sink: UsageSink,
    sweep_interval: std::time::Duration,
    heartbeat_interval: std::time::Duration,
    /// Whether the last heartbeat failed (logged once per outage).
    heartbeat_failing: std::sync::atomic::AtomicBool,
    by_hash: Cache<KeyHash, Arc<KeyRecord>>,
    /// Bumped by every [`invalidate_keys`](VaultContext::invalidate_keys):
    /// a lookup that read the store before a revocation must not put what
    /// it read back in the caches after it.
    key_generation: std::sync::atomic::AtomicU64,
    by_id: Cache<KeyId, Arc<KeyRecord>>,
    provider_keys: Cache<String, Arc<Vec<Arc<ProviderKeyRecord>>>>,
    /// Told about keys other replicas must drop (docs/replicas.md).
    notifier: Option<Arc<dyn RevocationNotifier>>,
    /// What `GET /readyz` checks: the store, then any added.
    probes: Vec<Arc<dyn ReadinessProbe>>,
}

impl std::fmt::Debug for VaultContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultContext")
            .field("format", &self.format)
            .field("upstreams", &self.upstreams)
            .field("limits", &self.limits)
            .field("test_keys_use_mock", &self.test_keys_use_mock)
            .finish_non_exhaustive()
    }
}

/// Builds a [`VaultContext`].
pub struct VaultContextBuilder {
    store: Arc<dyn KeyStore>,
    engine: Arc<dyn PolicyEngine>,
    encryptor: Arc<dyn Encryptor>,
    format: KeyFormat,
    clock: SharedClock,
    upstreams: Upstreams,
    limits: RequestLimits,
    test_keys_use_mock: bool,
    audit: Option<Arc<dyn AuditTrail>>,
    cache_capacity: u64,
    sweep_interval: std::time::Duration,
    notifier: Option<Arc<dyn RevocationNotifier>>,
    probes: Vec<Arc<dyn ReadinessProbe>>,
    heartbeat_interval: std::time::Duration,
    usage_buffer: usize,
}

impl VaultContextBuilder {
    /// Tells `notifier` about every key revoked or rotated through this
    /// context's management hook, so other replicas drop them from their
    /// caches at once (they call [`VaultContext::forget_keys`]).
    pub fn revocation_notifier(mut self, notifier: Arc<dyn RevocationNotifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// Adds a dependency `GET /readyz` checks besides the store (e.g. Redis).
    pub fn readiness_probe(mut self, probe: Arc<dyn ReadinessProbe>) -> Self {
        self.probes.push(probe);
        self
    }

    /// The virtual-key format (default `vpx_live_`/`vpx_test_` + 24 base62).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// The clock (tests pass a `ManualClock`).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Where each provider lives (default: the public base URLs).
    pub fn upstreams(mut self, upstreams: Upstreams) -> Self {
        self.upstreams = upstreams;
        self
    }

    /// Request body limits.
    pub fn request_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether `test` keys are answered by the mock provider (default true).
    pub fn test_keys_use_mock(mut self, yes: bool) -> Self {
        self.test_keys_use_mock = yes;
        self
    }

    /// The audit trail denied requests are written to (the data
    /// directory's file, or a table shared by replicas).
    pub fn audit(mut self, audit: Arc<dyn AuditTrail>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// How often [`Maintenance`] sweeps the store (default 30 s).
    pub fn sweep_interval(mut self, every: std::time::Duration) -> Self {
        self.sweep_interval = every.max(std::time::Duration::from_millis(1));
        self
    }

    /// How often [`Maintenance`] sends the store's heartbeat (default 1 s;
    /// keep it well inside half of the leases' `stale_after`, see
    /// docs/replicas.md).
    pub fn heartbeat_interval(mut self, every: std::time::Duration) -> Self {
        self.heartbeat_interval = every.max(std::time::Duration::from_millis(1));
        self
    }

    /// How many usage records and settlements may wait for the store
    /// (while it is unavailable) before new calls are refused with 503
    /// `store_unavailable` (default 65,536; docs/replicas.md).
    pub fn usage_buffer(mut self, jobs: usize) -> Self {
        self.usage_buffer = jobs.max(1);
        self
    }

    /// Most key records cached (default 100,000).
    pub fn cache_capacity(mut self, n: u64) -> Self {
        self.cache_capacity = n;
        self
    }

    /// Builds the context and starts its usage worker on the current runtime.
    pub fn build(self) -> Arc<VaultContext> {
        let metrics = Arc::new(Metrics::default());
        let sink = UsageSink::start(
            self.store.clone(),
            self.engine.clone(),
            self.audit.clone(),
            metrics.clone(),
            self.usage_buffer,
        );
        Arc::new(VaultContext {
            engine: self.engine,
            encryptor: self.encryptor,
            format: self.format,
            clock: self.clock,
            upstreams: self.upstreams,
            limits: self.limits,
            test_keys_use_mock: self.test_keys_use_mock,
            audit: self.audit,
            metrics,
            sink,
            sweep_interval: self.sweep_interval,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_failing: std::sync::atomic::AtomicBool::new(false),
            by_hash: Cache::builder()
                .max_capacity(self.cache_capacity)
                .time_to_live(KEY_CACHE_TTL)
                // `forget_keys` drops entries by the record's id.
                .support_invalidation_closures()
                .build(),
            key_generation: std::sync::atomic::AtomicU64::new(0),
            by_id: Cache::builder()
                .max_capacity(self.cache_capacity)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
            provider_keys: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
            probes: std::iter::once(Arc::new(StoreProbe(self.store.clone())) as _)
                .chain(self.probes)
                .collect(),
            store: self.store,
            notifier: self.notifier,
        })
    }
}

impl VaultContext {
    /// Starts a builder from the three things every deployment chooses.
    pub fn builder(
        store: Arc<dyn KeyStore>,
        encryptor: Arc<dyn Encryptor>,
        engine: Arc<dyn PolicyEngine>,
    ) -> VaultContextBuilder {
        VaultContextBuilder {
            store,
            engine,
            encryptor,
            format: KeyFormat::default(),
            clock: Arc::new(SystemClock),
            upstreams: Upstreams::defaults(),
            limits: RequestLimits::default(),
            test_keys_use_mock: true,
            audit: None,
            cache_capacity: 100_000,
            sweep_interval: crate::maintenance::DEFAULT_SWEEP_INTERVAL,
            notifier: None,
            probes: Vec::new(),
            heartbeat_interval: crate::maintenance::DEFAULT_HEARTBEAT_INTERVAL,
            usage_buffer: crate::vault::sink::DEFAULT_USAGE_BUFFER,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The encryptor.
    pub fn encryptor(&self) -> &Arc<dyn Encryptor> {
        &self.encryptor
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The key format.
    pub fn key_format(&self) -> &KeyFormat {
        &self.format
    }

    /// The audit log, if one is configured.
    pub fn audit(&self) -> Option<&Arc<dyn AuditTrail>> {
        self.audit.as_ref()
    }

    /// The metrics `/metrics` renders.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Forgets every cached key: call after revoking or rotating a key so the
    /// next request on this node sees it at once.
    pub fn invalidate_keys(&self) {
        self.key_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.by_hash.invalidate_all();
        self.by_id.invalidate_all();
    }

    /// Forgets the cached records of `ids` (and any lookup of them already
    /// under way): what a replica does when another announces that it
    /// revoked or rotated them. Other keys stay cached.
    pub fn forget_keys(&self, ids: &[KeyId]) {
        if ids.is_empty() {
            return;
        }
        self.key_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let gone: std::collections::HashSet<KeyId> = ids.iter().cloned().collect();
        for id in &gone {
            self.by_id.invalidate(id);
        }
        if self
            .by_hash
            .invalidate_entries_if(move |_, record| gone.contains(&record.id))
            .is_err()
        {
            // Only when closures are not supported, which `build` enables.
            self.by_hash.invalidate_all();
        }
    }

    /// Tells the [`RevocationNotifier`], if any, that `ids` changed.
    pub(crate) fn announce(&self, ids: &[KeyId]) {
        if let Some(n) = &self.notifier {
            n.revoked(ids);
        }
    }

    /// Runs every readiness probe (the store's and those added with
    /// [`VaultContextBuilder::readiness_probe`]) at once, each within
    /// [`READINESS_TIMEOUT`](crate::READINESS_TIMEOUT).
    pub async fn readiness(&self) -> Vec<ProbeOutcome> {
        run_probes(&self.probes).await
    }

    /// Forgets cached provider-key lists: call after adding or removing one.
    pub fn invalidate_provider_keys(&self) {
        self.provider_keys.invalidate_all();
    }

    /// Starts the background maintenance this vault needs — the store's
    /// sweep every [`sweep_interval`](VaultContextBuilder::sweep_interval) —
    /// and returns its handle; call [`Maintenance::shutdown`] after the
    /// server drained to write what is queued and give back the store's
    /// holds. Every embedding must run it (or sweep itself): without it,
    /// reservations of calls that never settled stay held.
    pub fn start_maintenance(self: &Arc<Self>) -> Maintenance {
        Maintenance::start(self.clone())
    }

    /// One sweep of the store now (what [`Maintenance`] runs periodically).
    pub async fn sweep(&self) {
        if let Err(e) = self.store.sweep(self.clock.now()).await {
            tracing::warn!(error = %e, "store sweep failed");
        }
    }

    /// One heartbeat of the store now (what [`Maintenance`] sends every
    /// [`heartbeat_interval`](VaultContextBuilder::heartbeat_interval)).
    /// A failure is logged once per outage.
    pub async fn heartbeat(&self) {
        use std::sync::atomic::Ordering;
        match self.store.heartbeat().await {
            Ok(closed) => {
                if self.heartbeat_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the store's heartbeat succeeds again");
                }
                if closed > 0 {
                    self.metrics
                        .dead_replica_leases_closed
                        .fetch_add(u64::try_from(closed).unwrap_or(u64::MAX), Ordering::Relaxed);
                    tracing::warn!(
                        leases = closed,
                        "closed the budget leases of replicas that died"
                    );
                }
            }
            Err(e) => {
                if !self.heartbeat_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "the store's heartbeat failed; budget leases stop admitting calls until it succeeds");
                }
            }
        }
    }

    /// The pause between two heartbeats of [`Maintenance`].
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        self.heartbeat_interval
    }

    /// The pause between two sweeps of [`Maintenance`].
    pub fn sweep_interval(&self) -> std::time::Duration {
        self.sweep_interval
    }

    /// Waits until every usage record and settlement queued so far is written.
    pub async fn flush(&self) {
        self.sink.flush().await;
    }

    /// The key a request presents: exactly one credential (in the places of
    /// docs/api.md#authentication), strictly parsed before any lookup, found
    /// by its full hash, and — for a rotated-out secret — still inside its
    /// grace period. Status is left to the caller. Shared by the proxy and the management API.
    ///
    /// Public only for `benches/auth_scale.rs`, which measures it on large
    /// stores; not part of the supported API.
    #[doc(hidden)]
    pub async fn presented_record(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Arc<KeyRecord>, Denial> {
        let hash = match presented_key(headers, query) {
            Presented::Missing => return Err(Denial::MissingApiKey),
            Presented::Invalid => return Err(Denial::InvalidApiKey),
            Presented::One(s) => self
                .format
                .parse(&s)
                .map_err(|_| Denial::InvalidApiKey)?
                .hash(),
        };
        let record = match self.key_by_hash(&hash).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Denial::InvalidApiKey),
            Err(e) => {
                tracing::error!(error = %e, "key lookup failed");
                return Err(Denial::for_store_error(&e));
            }
        };
        let now = self.clock.now();
        if record.hash != hash && record.previous_valid_until.is_none_or(|until| now >= until) {
            // A rotated-out secret whose grace period is over.
            return Err(Denial::InvalidApiKey);
        }
        Ok(record)
    }

    /// The key whose current (or grace-period) secret hashes to `hash`.
    pub(crate) async fn key_by_hash(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if let Some(hit) = self.by_hash.get(hash) {
            return Ok(Some(hit));
        }
        let generation = self.generation();
        let Some(found) = self.store.find_by_hash(hash).await? else {
            return Ok(None);
        };
        let found = Arc::new(found);
        // Not into `by_id` too: only parent lookups read it, and a second
        // entry per presented key costs ~230 bytes for nothing.
        self.by_hash.insert(*hash, found.clone());
        if self.generation() != generation {
            // A revocation or rotation raced this lookup: what was read may
            // predate it. Inserted first and removed after, so that an
            // invalidation between the two checks still clears it.
            self.by_hash.invalidate(hash);
        }
        Ok(Some(found))
    }

    fn generation(&self) -> u64 {
        self.key_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The key followed by its ancestors, nearest first.
    pub(crate) async fn chain(
        &self,
        key: Arc<KeyRecord>,
    ) -> Result<Vec<Arc<KeyRecord>>, StoreError> {
        let mut chain = vec![key];
        while let Some(parent) = chain.last().and_then(|k| k.parent.clone()) {
            if chain.len() > MAX_CHAIN_DEPTH {
                return Err(StoreError::Corrupt("sub-agent chain too deep".to_owned()));
            }
            let rec = match self.by_id.get(&parent) {
                Some(r) => r,
                None => {
                    let generation = self.generation();
                    let r = Arc::new(
                        self.store
                            .get_key(&parent)
                            .await?
                            .ok_or(StoreError::NotFound)?,
                    );
                    self.by_id.insert(parent.clone(), r.clone());
                    if self.generation() != generation {
                        self.by_id.invalidate(&parent);
                    }
                    r
                }
            };
            chain.push(rec);
        }
        Ok(chain)
    }

    /// The provider key a virtual key uses for `provider`: the oldest of its
    /// project's keys for that provider that the key's allowlist admits.
    pub(crate) async fn provider_key_for(
        &self,
        key: &KeyRecord,
        provider: Provider,
    ) -> Result<Option<Arc<ProviderKeyRecord>>, StoreError> {
        let list = match self.provider_keys.get(&key.project) {
            Some(l) => l,
            None => {
                let keys = self.store.list_provider_keys(Some(&key.project)).await?;
                let l = Arc::new(keys.into_iter().map(Arc::new).collect::<Vec<_>>());
                self.provider_keys.insert(key.project.clone(), l.clone());
                l
            }
        };
        Ok(list
            .iter()
            .find(|pk| {
                pk.provider == provider
                    && (key.provider_keys.is_empty() || key.provider_keys.contains(&pk.id))
            })
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vault_core::crypto::{AesGcmEncryptor, MasterKey};
    use vault_core::manage::wire::CreateKeyRequest;
    use vault_core::manage::{Actor, Manager};
    use vault_core::policy::DefaultEngine;
    use vault_core::pricing::PriceTable;
    use vault_core::record::KeyStatus;
    use vault_core::store::MemoryStore;

    use super::*;

    /// Another replica's revocation drops exactly the ids it names: the
    /// other cached keys stay cached (a store change made behind the
    /// cache's back is not seen for them until their entry expires).
    #[tokio::test]
    async fn lifecycle_forget_keys_drops_only_the_named_keys() {
        let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
        let engine = Arc::new(DefaultEngine::new(
            store.clone(),
            Arc::new(PriceTable::builtin()),
            Arc::new(SystemClock),
        ));
        let ctx = VaultContext::builder(store.clone(), encryptor.clone(), engine).build();
        let manager = Manager::builder(store.clone(), encryptor).build();
        let mut keys = Vec::new();
        for name in ["gone", "kept"] {
            let issued = manager
                .create_key(
                    &Actor::Operator,
                    CreateKeyRequest {
                        name: Some(name.to_owned()),
                        ..CreateKeyRequest::default()
                    },
                )
                .await
                .unwrap();
            let hash = ctx.format.parse(issued.key.expose_secret()).unwrap().hash();
            let cached = ctx.key_by_hash(&hash).await.unwrap().unwrap();
            assert_eq!(cached.status, KeyStatus::Active);
            // Revoked behind the cache's back, as on another replica.
            store
                .revoke_key(&issued.record.id, ctx.clock.now())
                .await
                .unwrap();
            keys.push((issued.record.id, hash));
        }
        ctx.forget_keys(std::slice::from_ref(&keys[0].0));
        let gone = ctx.key_by_hash(&keys[0].1).await.unwrap().unwrap();
        assert_eq!(gone.status, KeyStatus::Revoked, "re-read from the store");
        let kept = ctx.key_by_hash(&keys[1].1).await.unwrap().unwrap();
        assert_eq!(kept.status, KeyStatus::Active, "still cached");
    }
}
