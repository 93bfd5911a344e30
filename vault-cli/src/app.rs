//! Opening a data directory: configuration, master key, store, audit log
//! and plans — what the direct-mode commands use through a
//! [`Manager`] — and, for `serve` only, the policy engine and the proxy's
//! shared context on top.

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
use vault_core::store::{KeyStore, LeasedStore, SqliteStore, recover_lease_journals};
use vault_tower::admin::Admin;
use vault_tower::{RequestLimits, Timeouts, Upstream, Upstreams, VaultContext};

use crate::config::BinaryConfig;

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
    pub(crate) clock: SharedClock,
    pub(crate) plans: Arc<PlanSet>,
    pub(crate) data_dir: PathBuf,
    /// Whether the data directory was created just now.
    pub(crate) fresh: bool,
}

impl Opened {
    /// The management operations on this data directory, for direct mode
    /// (no proxy runs in this process, so there is no cache to tell).
    pub(crate) fn manager(&self) -> Manager {
        Manager::builder(self.store.clone(), self.encryptor.clone())
            .audit(self.audit.clone())
            .plans(self.plans.clone())
            .clock(self.clock.clone())
            .build()
    }
}

/// What `serve` runs: the proxy's context and the management router's state
/// (a [`Manager`] that drops the context's cached keys when it revokes).
pub(crate) struct Serving {
    pub(crate) ctx: Arc<VaultContext>,
    pub(crate) admin: Admin,
}

/// Loads the configuration: `--config`, `VAULTGATE_CONFIG`, or
/// `./vaultgate.toml` if present; defaults otherwise.
pub(crate) fn load_config(explicit: Option<&Path>) -> Result<BinaryConfig> {
    let load = |p: &Path| BinaryConfig::load(p).map_err(|e| UsageError(e.to_string()).into());
    match explicit {
        Some(p) => load(p),
        None if Path::new("vaultgate.toml").exists() => load(Path::new("vaultgate.toml")),
        None => Ok(BinaryConfig::default()),
    }
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
pub(crate) async fn open(config: Config, data_dir: PathBuf) -> Result<Opened> {
    open_with(config, data_dir, false).await
}

/// [`open`] for `serve`: budgets are reserved in memory against leases held
/// in the store ([`LeasedStore`]), so a call's reservation is not a SQLite
/// write. One-shot commands keep the bare store: they must not hold leases.
pub(crate) async fn open_serving(config: Config, data_dir: PathBuf) -> Result<Opened> {
    open_with(config, data_dir, true).await
}

async fn open_with(config: Config, data_dir: PathBuf, leased: bool) -> Result<Opened> {
    let fresh = !data_dir.join(vault_core::store::DB_FILE_NAME).exists();
    // Only its owner may enter it: it holds the database (key hashes,
    // sealed provider keys) and, unless given in the environment, the
    // master key.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let env_key = std::env::var("VAULTGATE_MASTER_KEY").ok();
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
    let sqlite = SqliteStore::open_in_dir(&data_dir)
        .map_err(|e| anyhow::anyhow!("cannot open the store in {}: {e}", data_dir.display()))?;
    // Leases of a server that died are settled now, at what their calls
    // spent and hold (vault-core's `store/journal.rs`); a live server's
    // journal is locked and left alone. A leased store gives its own leases
    // back in `KeyStore::drain`, which `Maintenance::shutdown` calls.
    let journals = data_dir.join(LEASE_JOURNAL_DIR);
    let store: Arc<dyn KeyStore> = if leased {
        let leases = LeasedStore::new(sqlite)
            .with_journal(&journals)
            .map_err(|e| anyhow::anyhow!("cannot open the lease journal: {e}"))?;
        leases
            .recover()
            .await
            .map_err(|e| anyhow::anyhow!("cannot settle a dead server's leases: {e}"))?;
        Arc::new(leases)
    } else {
        recover_lease_journals(&sqlite, &journals)
            .await
            .map_err(|e| anyhow::anyhow!("cannot settle a dead server's leases: {e}"))?;
        Arc::new(sqlite)
    };
    verify_master_keys(store.as_ref(), encryptor.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let audit = open_audit(&data_dir)?;

    let mut plans = PlanSet::seeded();
    for (name, policy) in &config.plans {
        plans = plans.with_custom(name, policy.clone());
    }
    Ok(Opened {
        config,
        store,
        encryptor,
        audit,
        clock: Arc::new(SystemClock),
        plans: Arc::new(plans),
        data_dir,
        fresh,
    })
}

/// The data directory's audit file, where `audit.jsonl` lives.
pub(crate) fn audit_file(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.jsonl")
}

/// The audit trail mutations and denials are written to: the data
/// directory's file. The one place a PostgreSQL-backed install plugs in
/// `vault_postgres::PostgresAudit` (docs/replicas.md#the-audit-chain).
fn open_audit(data_dir: &Path) -> Result<Arc<dyn AuditTrail>> {
    let log = AuditLog::open(&audit_file(data_dir))
        .map_err(|e| anyhow::anyhow!("cannot open the audit log: {e}"))?;
    Ok(Arc::new(log))
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
    let engine = Arc::new(DefaultEngine::new(
        opened.store.clone(),
        Arc::new(prices),
        opened.clock.clone(),
    ));

    let mut upstreams = Upstreams::none();
    for provider in vault_core::provider::Provider::ALL {
        if let Some(url) = config.base_url(provider) {
            let up = Upstream::new(url, timeouts(config.timeouts(provider)))
                .map_err(|e| UsageError(format!("providers.{provider}.base_url: {e}")))?;
            upstreams.set(provider, up);
        }
    }
    let ctx = VaultContext::builder(opened.store.clone(), opened.encryptor.clone(), engine)
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
    Ok(Serving { ctx, admin })
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
