//! A standalone vaultgate proxy in one short file: vault-core's store,
//! encryptor and policy engine, vault-tower's layer and management API, and a
//! hyper-util server. `vaultgate serve` runs the same assembly, plus
//! configuration.
//!
//! ```sh
//! cargo run --example proxy        # then use the printed test key
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tower::ServiceBuilder;
use vault_core::clock::SystemClock;
use vault_core::crypto::{AesGcmEncryptor, load_or_create_master_key, verify_master_keys};
use vault_core::key::KeyEnv;
use vault_core::manage::CreateKeyRequest;
use vault_core::policy::{DefaultEngine, PlanSet};
use vault_core::pricing::PriceTable;
use vault_core::store::{KeyStore, SqliteStore};
use vault_tower::admin::{Actor, Admin, AdminOptions, admin_router};
use vault_tower::{Forwarder, VaultContext, VaultLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let data_dir = PathBuf::from(".vaultgate-example");

    // 1. The engine: an embedded store, the master key, envelope encryption,
    //    and the default policy engine with the built-in price table.
    let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::open_in_dir(&data_dir)?);
    let env_key = std::env::var("VAULTGATE_MASTER_KEY").ok();
    let (master, _source) = load_or_create_master_key(&data_dir, env_key.as_deref())?;
    let encryptor = Arc::new(AesGcmEncryptor::new(master)?);
    verify_master_keys(store.as_ref(), encryptor.as_ref()).await?;
    let clock = Arc::new(SystemClock);
    let prices = Arc::new(PriceTable::builtin());
    let engine = Arc::new(DefaultEngine::new(store.clone(), prices, clock.clone()));

    // 2. The layer and the management API share one context.
    let ctx = VaultContext::builder(store, encryptor, engine)
        .clock(clock)
        .build();
    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    if ctx.store().list_keys(None).await?.is_empty() {
        let test_key = CreateKeyRequest {
            name: Some("example".to_owned()),
            permissions: Some(vec!["chat:write".to_owned(), "usage:read".to_owned()]),
            env: Some(KeyEnv::Test),
            ..CreateKeyRequest::default()
        };
        let issued = admin
            .manager()
            .create_key(&Actor::Operator, test_key)
            .await?;
        println!("test key (shown once): {}", issued.key.expose_secret());
    }
    let proxy = ServiceBuilder::new()
        .layer(VaultLayer::new(ctx.clone()))
        .service(Forwarder::default());
    let app = admin_router(admin, AdminOptions::default()).fallback_service(proxy);

    // 3. A hyper-util server that drains in-flight requests on Ctrl-C.
    let listener = TcpListener::bind("127.0.0.1:8080").await?;
    println!("listening on http://127.0.0.1:8080");
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let maintenance = ctx.start_maintenance();
    vault_tower::server::serve(listener, app, ctrl_c, Duration::from_secs(30)).await?;
    maintenance.shutdown().await;
    Ok(())
}
