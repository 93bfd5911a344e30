//! Replica mode (docs/replicas.md): several `vaultgate serve` processes on
//! one PostgreSQL (`[store] url`) and one Redis (`[redis] url`).
//!
//! - [`connect_postgres`]: the shared store, refused with one line when
//!   its schema needs `vaultgate migrate`;
//! - [`Redis`]: the shared limiter given to the engine, the revocation
//!   bus (a [`Publisher`] out, a subscription in) and `/readyz`'s probe.
//!
//! Every revocation a `Manager` applies (the admin routes through
//! `VaultContext`'s hook, the CLI's direct mode through [`Publisher`]'s
//! own) is published with the key's descendants and rotated keys; every
//! serve drops those ids from its key cache, and its whole key cache after
//! a reconnection (messages sent meanwhile are lost). A lost message costs
//! at most the key cache's lifetime (`KEY_CACHE_TTL`, 0.9 s).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow};
use async_trait::async_trait;
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use vault_core::clock::SharedClock;
use vault_core::key::KeyId;
use vault_core::manage::{Change, ManageHook};
use vault_core::policy::{DefaultEngine, LimiterFallback};
use vault_postgres::{PostgresError, PostgresOptions, PostgresStore};
use vault_redis::{RedisLimiter, RevocationBus, Subscription};
use vault_tower::{ReadinessProbe, RevocationNotifier, VaultContext};

use crate::app::UsageError;
use crate::config::{DATABASE_URL_ENV, PostgresSettings, REDIS_URL_ENV, RedisSettings};

/// How long the CLI's direct mode waits, before it exits, for its
/// revocations to be published.
const PUBLISH_DRAIN: Duration = Duration::from_secs(2);

/// Connects to PostgreSQL and checks its schema. A URL the driver cannot
/// parse is a usage error (exit 2); an old schema says to run
/// `vaultgate migrate`. No message holds the URL or its password.
pub(crate) async fn connect_postgres(settings: &PostgresSettings) -> Result<PostgresStore> {
    let mut options = PostgresOptions::with_pool_size(settings.pool_size);
    if let Some(ca) = &settings.ca_file {
        options = options.ca_file(ca);
    }
    PostgresStore::connect_with(settings.url.expose_secret(), &options)
        .await
        .map_err(|e| match e {
            PostgresError::Url(_) => {
                UsageError(format!("[store] url or {DATABASE_URL_ENV}: {e}")).into()
            }
            PostgresError::SchemaOutdated { .. } | PostgresError::SchemaTooNew { .. } => {
                anyhow!("{e}")
            }
            other => anyhow!("cannot connect to the store: {other}"),
        })
}

/// Redis for a replica: the shared limiter and the revocation bus.
pub(crate) struct Redis {
    limiter: Arc<RedisLimiter>,
    bus: RevocationBus,
    on_error: LimiterFallback,
}

impl Redis {
    /// Clients for `settings` (nothing connects yet: a replica starts while
    /// Redis is down and `/readyz` says so). Needs a Tokio runtime.
    pub(crate) fn new(settings: &RedisSettings, clock: SharedClock) -> Result<Redis> {
        let limiter = RedisLimiter::with_clock(&settings.config, clock)
            .map_err(|e| UsageError(format!("[redis] url or {REDIS_URL_ENV}: {e}")))?;
        let bus = RevocationBus::new(&settings.config)
            .map_err(|e| UsageError(format!("[redis] url or {REDIS_URL_ENV}: {e}")))?;
        Ok(Redis {
            limiter: Arc::new(limiter),
            bus,
            on_error: settings.on_error,
        })
    }

    /// `engine` with its rate limits and `max_parallel` in Redis, failing
    /// as `[redis] on_error` says.
    pub(crate) fn shared_limits(&self, engine: DefaultEngine) -> DefaultEngine {
        engine.with_shared_limiter(self.limiter.clone(), self.on_error)
    }

    /// Says, once at start, whether Redis answers (a warning if not: the
    /// replica serves anyway, as `on_error` says, and reconnects alone).
    pub(crate) async fn check(&self) {
        if let Err(e) = self.limiter.ping().await {
            tracing::warn!(error = %e, "Redis does not answer yet; calls that need it fail as [redis] on_error says until it does");
        }
    }

    /// A publisher of this process's revocations.
    pub(crate) fn publisher(&self) -> Arc<Publisher> {
        Publisher::start(self.bus.clone())
    }

    /// Subscribes `ctx` to other replicas' revocations: their ids are
    /// dropped from its key cache, and the whole key cache after a
    /// reconnection. `received` counts the ids dropped.
    pub(crate) fn subscribe(
        &self,
        ctx: Arc<VaultContext>,
        received: Arc<AtomicU64>,
    ) -> Subscription {
        let resync = ctx.clone();
        self.bus.subscribe(
            move |ids| {
                ctx.forget_keys(ids);
                received.fetch_add(ids.len() as u64, Ordering::Relaxed);
            },
            move || resync.invalidate_keys(),
        )
    }

    /// `/readyz`'s check of Redis: a `PING`.
    pub(crate) fn probe(&self) -> Arc<dyn ReadinessProbe> {
        Arc::new(RedisProbe(self.limiter.clone()))
    }
}

struct RedisProbe(Arc<RedisLimiter>);

#[async_trait]
impl ReadinessProbe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

/// Publishes revoked (and rotated) key ids on the revocation bus, off the
/// caller's path: [`ManageHook`] and [`RevocationNotifier`] are
/// synchronous, so ids are queued and a task sends them. A failed publish
/// is logged and counted, not retried: the revocation is in the store, and
/// other replicas' caches expire within `KEY_CACHE_TTL` regardless.
pub(crate) struct Publisher {
    queue: std::sync::Mutex<Option<mpsc::UnboundedSender<Vec<KeyId>>>>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    failures: Arc<AtomicU64>,
}

impl Publisher {
    fn start(bus: RevocationBus) -> Arc<Publisher> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<KeyId>>();
        let failures = Arc::new(AtomicU64::new(0));
        let failed = failures.clone();
        let task = tokio::spawn(async move {
            while let Some(ids) = rx.recv().await {
                if let Err(e) = bus.publish(&ids).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, keys = ids.len(), "cannot broadcast a revocation; other replicas see it when their key cache expires (under 1 s)");
                }
            }
        });
        Arc::new(Publisher {
            queue: std::sync::Mutex::new(Some(tx)),
            task: tokio::sync::Mutex::new(Some(task)),
            failures,
        })
    }

    /// Publishes that failed.
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn send(&self, ids: &[KeyId]) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = queue.as_ref()
            && !ids.is_empty()
        {
            let _ = tx.send(ids.to_vec());
        }
    }

    /// Stops taking ids and waits (at most two seconds) until those queued
    /// are published: the CLI's direct mode calls it before exiting.
    pub(crate) async fn finish(&self) {
        drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
        let task = self.task.lock().await.take();
        if let Some(task) = task
            && tokio::time::timeout(PUBLISH_DRAIN, task).await.is_err()
        {
            tracing::warn!(
                "a revocation could not be broadcast in time; other replicas see it when their key cache expires (under 1 s)"
            );
        }
    }
}

impl RevocationNotifier for Publisher {
    fn revoked(&self, ids: &[KeyId]) {
        self.send(ids);
    }
}

/// The CLI's direct mode: a `Manager` without a proxy context publishes
/// what it revokes or rotates itself.
impl ManageHook for Publisher {
    fn changed(&self, change: Change<'_>) {
        match change {
            Change::KeysRevoked(ids) => self.send(ids),
            Change::KeyRotated(id) => self.send(std::slice::from_ref(id)),
            _ => {}
        }
    }
}
