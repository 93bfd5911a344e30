//! Opening a data directory: configuration, master key, store (embedded
//! SQLite, or PostgreSQL shared by replicas), audit log and plans — what
//! the direct-mode commands use through a [`Manager`] — and, for `serve`
//! only, the policy engine and the proxy's shared context on top.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use vault_core::audit::{AuditLog, AuditTrail};
use vault_core::clock::{SharedClock, SystemClock};
use vault_core::config::Config;
use vault_core::crypto::{
    AesGcmEncryptor, Encryptor, MasterKey, MasterKeySource, load_or_create_master_key,
    verify_master_keys,
};
use vault_core::manage::Manager;
use vault_core::policy::{DefaultEngine, PlanSet};
use vault_core::pricing::{ModelPrice, PriceTable};
use vault_core::store::{KeyStore, LeasedStore, SessionStore, SqliteStore, recover_lease_journals};
use vault_postgres::PostgresAudit;
use vault_redis::Subscription;
use vault_tower::admin::Admin;
use vault_tower::{RequestLimits, Timeouts, Upstream, Upstreams, VaultContext};

use crate::config::{BinaryConfig, DATABASE_URL_ENV, PostgresSettings, REDIS_URL_ENV};
use crate::replicas::{self, Publisher, Redis};

/// Where `serve` journals its budget leases, inside the data directory.
pub(crate) const LEASE_JOURNAL_DIR: &str = "leases";

/// A usage error: exit code 2 with one clear line.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Everything a command needs from an opened data directory.
pub(crate) struct Opened {
    pub(crate) config: Config,
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) encryptor: Arc<dyn Encryptor>,
    pub(crate) audit: Arc<dyn AuditTrail>,
    /// Dashboard sessions, in the same database as the keys (shared by
    /// every replica on PostgreSQL).
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) clock: SharedClock,
    pub(crate) plans: Arc<PlanSet>,
    pub(crate) data_dir: PathBuf,
    /// What holds the keys, for messages: the data directory, or the
    /// PostgreSQL database (user, host, database; never the password).
    pub(crate) location: String,
    /// Whether a first start should create an admin key: a data directory
    /// created just now. Never on PostgreSQL, whose replicas start at once:
    /// there `vaultgate init` creates it.
    pub(crate) fresh: bool,
    /// Redis, when configured (replica mode).
    pub(crate) redis: Option<Redis>,
    /// Publishes what this process's direct-mode manager revokes.
    publisher: Option<Arc<Publisher>>,
}

impl Opened {
    /// The management operations on this data directory, for direct mode
    /// (no proxy runs in this process, so there is no cache to tell; with
    /// Redis, revocations are broadcast to the replicas).
    pub(crate) fn manager(&self) -> Manager {
        let mut builder = Manager::builder(self.store.clone(), self.encryptor.clone())
            .audit(self.audit.clone())
            .plans(self.plans.clone())
            .clock(self.clock.clone());
        if let Some(p) = &self.publisher {
            builder = builder.hook(p.clone());
        }
        builder.build()
    }

    /// Before a direct-mode command exits: publishes what it revoked.
    pub(crate) async fn finish(&self) {
        if let Some(p) = &self.publisher {
            p.finish().await;
        }
    }
}

/// What `serve` runs: the proxy's context and the management router's state
/// (a [`Manager`] that drops the context's cached keys when it revokes and,
/// with Redis, broadcasts the revocation), and the subscription to other
/// replicas' revocations.
pub(crate) struct Serving {
    pub(crate) ctx: Arc<VaultContext>,
    pub(crate) admin: Admin,
    /// Held for the server's life; dropping it unsubscribes.
    pub(crate) _revocations: Option<Subscription>,
}

/// Loads the configuration: `--config`, `VAULTGATE_CONFIG`, or
/// `./vaultgate.toml` if present; defaults otherwise. Then the environment's
/// `VAULTGATE_DATABASE_URL` and `VAULTGATE_REDIS_URL`, which win.
pub(crate) fn load_config(explicit: Option<&Path>) -> Result<BinaryConfig> {
    let file = match explicit {
        Some(p) => BinaryConfig::load(p),
        None if Path::new("vaultgate.toml").exists() => {
            BinaryConfig::load(Path::new("vaultgate.toml"))
        }
        None => Ok(BinaryConfig::default()),
    };
    file.and_then(|f| f.with_env(|name| std::env::var(name).ok()))
        .map_err(|e| UsageError(e.to_string()).into())
}

fn timeouts(s: vault_core::config::UpstreamSettings) -> Timeouts {
    Timeouts {
        connect: s.connect_timeout,
        response: s.response_timeout,
        idle: s.idle_timeout,
    }
}

/// The most output tokens assumed for a configured model whose entry gives
/// none and that the built-in table does not know.
const CONFIGURED_MAX_OUTPUT: u64 = 16_384;

/// A configured price: input and output as given. For a model the built-in
/// table knows, everything else comes from its entry — maximum output
/// (unless given), context window, token-class prices and long-context
/// prices — so an override never makes a reservation smaller than the
/// model can bill (docs/configuration.md). Otherwise every token class is
/// at its fallback (docs/budgets.md#token-classes).
fn price(p: vault_core::config::PriceSetting, builtin: Option<&ModelPrice>) -> ModelPrice {
    let mut price = match builtin {
        Some(b) => *b,
        None => ModelPrice::new(p.input, p.output, CONFIGURED_MAX_OUTPUT),
    };
    price.input_per_million = p.input;
    price.output_per_million = p.output;
    if let Some(max) = p.max_output_tokens {
        price.max_output_tokens = max.max(1);
    }
    price
}

/// Opens (creating if needed) the data directory and assembles the gateway.
pub(crate) async fn open(file: BinaryConfig, data_dir: PathBuf) -> Result<Opened> {
    open_with(file, data_dir, false).await
}

/// [`open`] for `serve`: budgets are reserved in memory against leases held
/// in the store ([`LeasedStore`]), so a call's reservation is not a store
/// write. One-shot commands keep the bare store: they must not hold leases.
pub(crate) async fn open_serving(file: BinaryConfig, data_dir: PathBuf) -> Result<Opened> {
    open_with(file, data_dir, true).await
}

/// PostgreSQL without Redis is refused: rate limits, `max_parallel` and
/// revocations would then hold per replica only.
fn check_replica_config(file: &BinaryConfig) -> Result<()> {
    if file.postgres.is_some() && file.redis.is_none() {
        return Err(UsageError(format!(
            "[redis] url (or {REDIS_URL_ENV}) is required with a PostgreSQL store ([store] url or {DATABASE_URL_ENV}): replicas share rate limits and revocations through Redis"
        ))
        .into());
    }
    Ok(())
}

async fn open_with(file: BinaryConfig, data_dir: PathBuf, leased: bool) -> Result<Opened> {
    check_replica_config(&file)?;
    let postgres = file.postgres.clone();
    let fresh = postgres.is_none() && !data_dir.join(vault_core::store::DB_FILE_NAME).exists();
    // Only its owner may enter it: it holds the database (key hashes,
    // sealed provider keys) and, unless given in the environment, the
    // master key.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let env_key = std::env::var("VAULTGATE_MASTER_KEY").ok();
    if postgres.is_some()
        && env_key.is_none()
        && !data_dir.join(vault_core::crypto::MASTER_KEY_FILE).exists()
    {
        // A replica must not make up a master key of its own.
        return Err(UsageError(format!(
            "with a PostgreSQL store every replica needs the same master key: set VAULTGATE_MASTER_KEY (standard base64 of 32 bytes) or put it in {}",
            data_dir.join(vault_core::crypto::MASTER_KEY_FILE).display()
        ))
        .into());
    }
    let (master, source) = load_or_create_master_key(&data_dir, env_key.as_deref())
        .map_err(|e| UsageError(e.to_string()))?;
    if let MasterKeySource::Created(path) = &source {
        tracing::info!(path = %path.display(), "created a new master key (mode 0600); back it up");
    }
    let previous = match std::env::var("VAULTGATE_PREVIOUS_MASTER_KEY") {
        Ok(v) => vec![
            MasterKey::from_base64(&v)
                .map_err(|e| UsageError(format!("VAULTGATE_PREVIOUS_MASTER_KEY: {e}")))?,
        ],
        Err(_) => Vec::new(),
    };
    let encryptor = Arc::new(
        AesGcmEncryptor::with_previous(master, previous)
            .map_err(|e| anyhow::anyhow!("the master key cannot be used: {e}"))?,
    );
    let StoreParts {
        store,
        audit,
        sessions,
        location,
    } = open_store(postgres.as_ref(), &data_dir, leased).await?;
    verify_master_keys(store.as_ref(), encryptor.as_ref())
        .await
        .map_err(|e| match e {
            vault_core::crypto::MasterKeyError::WrongMasterKey if postgres.is_some() => anyhow::anyhow!(
                "the master key does not match the one {location} was set up with: every replica needs the same VAULTGATE_MASTER_KEY"
            ),
            e => anyhow::anyhow!("{e}"),
        })?;
    let clock: SharedClock = Arc::new(SystemClock);
    let redis = match &file.redis {
        Some(settings) => Some(Redis::new(settings, clock.clone())?),
        None => None,
    };
    // `serve` publishes through its context's hook; direct mode here.
    let publisher = match (&redis, leased) {
        (Some(r), false) => Some(r.publisher()),
        _ => None,
    };
    let config = file.core;

    let mut plans = PlanSet::seeded();
    for (name, policy) in &config.plans {
        plans = plans.with_custom(name, policy.clone());
    }
    Ok(Opened {
        config,
        store,
        encryptor,
        audit,
        sessions,
        clock,
        plans: Arc::new(plans),
        data_dir,
        location,
        fresh,
        redis,
        publisher,
    })
}

/// The data directory's audit file, where `audit.jsonl` lives.
pub(crate) fn audit_file(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.jsonl")
}

/// The data directory's audit file: the trail of an SQLite install.
fn open_audit(data_dir: &Path) -> Result<Arc<dyn AuditTrail>> {
    let log = AuditLog::open(&audit_file(data_dir))
        .map_err(|e| anyhow::anyhow!("cannot open the audit log: {e}"))?;
    Ok(Arc::new(log))
}

/// The store, its audit trail, the dashboard's sessions and a description
/// of it for messages:
/// embedded SQLite in the data directory (audit in `audit.jsonl`), or
/// PostgreSQL (audit in its `audit_entries`, shared by every replica:
/// docs/replicas.md#the-audit-chain). For `serve` (`leased`) it is wrapped in
/// a [`LeasedStore`] whose lease journal is in this replica's own data
/// directory. Leases of a server that died are settled now, at what their
/// calls spent and hold (vault-core's `store/journal.rs`); a live server's
/// journal is locked and left alone. A leased store gives its own leases
/// back in `KeyStore::drain`, which `Maintenance::shutdown` calls.
async fn open_store(
    postgres: Option<&PostgresSettings>,
    data_dir: &Path,
    leased: bool,
) -> Result<StoreParts> {
    let journals = data_dir.join(LEASE_JOURNAL_DIR);
    match postgres {
        None => {
            let sqlite = SqliteStore::open_in_dir(data_dir).map_err(|e| {
                anyhow::anyhow!("cannot open the store in {}: {e}", data_dir.display())
            })?;
            Ok(StoreParts {
                sessions: Arc::new(sqlite.clone()),
                store: with_leases(sqlite, &journals, leased).await?,
                audit: open_audit(data_dir)?,
                location: data_dir.display().to_string(),
            })
        }
        Some(settings) => {
            let pg = replicas::connect_postgres(settings).await?;
            Ok(StoreParts {
                location: pg.to_string(),
                audit: Arc::new(PostgresAudit::new(&pg)),
                sessions: Arc::new(pg.clone()),
                store: with_leases(pg, &journals, leased).await?,
            })
        }
    }
}

/// What [`open_store`] opens.
struct StoreParts {
    store: Arc<dyn KeyStore>,
    audit: Arc<dyn AuditTrail>,
    sessions: Arc<dyn SessionStore>,
    /// The data directory or the database, for messages.
    location: String,
}

/// `store` in a [`LeasedStore`] journaling in `journals` (`serve`), or bare
/// after settling dead servers' journals (one-shot commands).
async fn with_leases<S: KeyStore + 'static>(
    store: S,
    journals: &Path,
    leased: bool,
) -> Result<Arc<dyn KeyStore>> {
    if leased {
        let leases = LeasedStore::new(store)
            .with_journal(journals)
            .map_err(|e| anyhow::anyhow!("cannot open the lease journal: {e}"))?;
        leases
            .recover()
            .await
            .map_err(|e| anyhow::anyhow!("cannot settle a dead server's leases: {e}"))?;
        Ok(Arc::new(leases))
    } else {
        recover_lease_journals(&store, journals)
            .await
            .map_err(|e| anyhow::anyhow!("cannot settle a dead server's leases: {e}"))?;
        Ok(Arc::new(store))
    }
}

/// The proxy on an opened data directory: prices, the policy engine,
/// upstreams and the shared context, and the management router's state.
pub(crate) fn serving(opened: &Opened) -> Result<Serving> {
    let config = &opened.config;
    let mut prices = PriceTable::builtin();
    for ((provider, model), p) in &config.prices {
        let configured = price(*p, prices.lookup(*provider, model));
        prices = prices.with_override(*provider, model, configured);
    }
    prices = prices.with_fallback(config.fallback_price.map(|p| price(p, None)));
    let mut engine =
        DefaultEngine::new(opened.store.clone(), Arc::new(prices), opened.clock.clone());
    if let Some(redis) = &opened.redis {
        engine = redis.shared_limits(engine);
    }
    let engine = Arc::new(engine);

    let mut upstreams = Upstreams::none();
    for provider in vault_core::provider::Provider::ALL {
        if let Some(url) = config.base_url(provider) {
            let up = Upstream::new(url, timeouts(config.timeouts(provider)))
                .map_err(|e| UsageError(format!("providers.{provider}.base_url: {e}")))?;
            upstreams.set(provider, up);
        }
    }
    let mut builder = VaultContext::builder(
        opened.store.clone(),
        opened.encryptor.clone(),
        engine.clone(),
    );
    let publisher = opened.redis.as_ref().map(Redis::publisher);
    if let (Some(redis), Some(publisher)) = (&opened.redis, &publisher) {
        builder = builder
            .revocation_notifier(publisher.clone())
            .readiness_probe(redis.probe());
    }
    let ctx = builder
        .clock(opened.clock.clone())
        .upstreams(upstreams)
        .test_keys_use_mock(config.test_keys_use_mock)
        .request_limits(RequestLimits {
            max_body_bytes: config.max_body_bytes,
            ..RequestLimits::default()
        })
        .audit(opened.audit.clone())
        .build();
    let admin = Admin::new(ctx.clone(), opened.plans.clone());
    let revocations = match (&opened.redis, publisher) {
        (Some(redis), Some(publisher)) => Some(replica_metrics(&ctx, redis, &engine, &publisher)),
        _ => None,
    };
    Ok(Serving {
        ctx,
        admin,
        _revocations: revocations,
    })
}

/// Subscribes `ctx` to other replicas' revocations and exports replica
/// mode's counters in `/metrics` (docs/replicas.md#metrics).
fn replica_metrics(
    ctx: &Arc<VaultContext>,
    redis: &Redis,
    engine: &Arc<DefaultEngine>,
    publisher: &Arc<Publisher>,
) -> Subscription {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let subscription = redis.subscribe(ctx.clone(), received.clone());
    let metrics = ctx.metrics();
    let e = engine.clone();
    metrics.register_counter(
        "vaultgate_rate_limiter_fallbacks_total",
        "Calls admitted against this replica's own limits because Redis failed ([redis] on_error = \"local\").",
        move || e.limiter_fallbacks(),
    );
    let e = engine.clone();
    metrics.register_counter(
        "vaultgate_rate_limiter_unavailable_total",
        "Calls refused 503 rate_limiter_unavailable because Redis failed.",
        move || e.limiter_unavailable(),
    );
    metrics.register_counter(
        "vaultgate_revocations_received_total",
        "Key ids other replicas announced as revoked or rotated, dropped from this replica's key cache.",
        move || received.load(std::sync::atomic::Ordering::Relaxed),
    );
    let p = publisher.clone();
    metrics.register_counter(
        "vaultgate_revocation_publish_failures_total",
        "Revocations this replica could not broadcast on Redis.",
        move || p.failures(),
    );
    subscription
}

#[cfg(test)]
mod tests {
    use vault_core::config::PriceSetting;
    use vault_core::money::Micros;
    use vault_core::pricing::PriceTable;
    use vault_core::provider::Provider;

    use super::*;

    /// Overriding a known model's price must not shrink what a call
    /// without an output limit reserves (gpt-5 can produce 128,000 tokens).
    #[test]
    fn boundary_a_price_override_keeps_the_built_in_maximum_and_classes() {
        let table = PriceTable::builtin();
        let builtin = table.lookup(Provider::OpenAi, "gpt-5").copied();
        let setting = PriceSetting {
            input: Micros(1_000_000),
            output: Micros(8_000_000),
            max_output_tokens: None,
        };
        let p = price(setting, builtin.as_ref());
        let b = builtin.unwrap();
        assert_eq!(p.max_output_tokens, b.max_output_tokens);
        assert_eq!(p.context_window, b.context_window);
        assert_eq!(p.cached_input_per_million, b.cached_input_per_million);
        assert_eq!(p.input_per_million, Micros(1_000_000));
        assert_eq!(p.output_per_million, Micros(8_000_000));
        let unknown = price(setting, None);
        assert_eq!(unknown.max_output_tokens, CONFIGURED_MAX_OUTPUT);
        let explicit = price(
            PriceSetting {
                max_output_tokens: Some(500),
                ..setting
            },
            builtin.as_ref(),
        );
        assert_eq!(explicit.max_output_tokens, 500);
    }
}
