//! An existing axum app that puts its LLM calls behind vaultgate.
//!
//! `GET /hello` stays open. Everything under `/llm/` goes through the
//! [`VaultLayer`]: `/llm/openai/v1/chat/completions` is authenticated with a
//! virtual key, checked against its policy, given the real provider key and
//! forwarded to OpenAI's `/v1/chat/completions`, metered on the way back.
//!
//! ```sh
//! cargo run --example axum_app
//! curl localhost:3000/hello
//! curl localhost:3000/llm/openai/v1/chat/completions \
//!   -H "Authorization: Bearer $PRINTED_TEST_KEY" -H "Content-Type: application/json" \
//!   -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
//! ```
//!
//! The printed `vpx_test_` key is answered by the built-in mock provider, so
//! this works offline. With `OPENAI_API_KEY` set, a `vpx_live_` key that
//! reaches OpenAI is printed too. Everything lives in memory.

use std::error::Error;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use tower::ServiceBuilder;
use vault_core::clock::SystemClock;
use vault_core::crypto::{AesGcmEncryptor, MasterKey, ProviderSecret};
use vault_core::key::KeyEnv;
use vault_core::manage::{AddProviderKeyRequest, CreateKeyRequest};
use vault_core::policy::{DefaultEngine, PlanSet};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::store::MemoryStore;
use vault_tower::admin::{Actor, Admin};
use vault_tower::{Forwarder, VaultContext, VaultLayer};

/// The app: its own routes, plus the vault in front of `/llm`. Adding
/// vaultgate is the `llm` service and one `nest_service` line.
pub fn app(ctx: Arc<VaultContext>) -> Router {
    let llm = ServiceBuilder::new()
        .layer(VaultLayer::new(ctx))
        .service(Forwarder::default());
    Router::new()
        .route("/hello", get(|| async { "hello from an ordinary route\n" }))
        // The prefix is stripped: the vault sees `/openai/v1/...`.
        .nest_service("/llm", llm)
}

/// What the demo prints: the keys to call `/llm` with.
pub struct DemoKeys {
    /// A `vpx_test_` key, answered offline by the mock provider.
    pub test_key: String,
    /// A `vpx_live_` key, when a real OpenAI key was given.
    pub live_key: Option<String>,
}

/// An in-memory vault with a fresh master key and one test key; with
/// `openai_key`, also that provider key and a live key that may use it.
pub async fn demo_vault(
    openai_key: Option<String>,
) -> Result<(Arc<VaultContext>, DemoKeys), Box<dyn Error>> {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(SystemClock);
    let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate()?)?);
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        clock.clone(),
    ));
    let ctx = VaultContext::builder(store, encryptor, engine)
        .clock(clock)
        .build();

    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    let key = |env: KeyEnv| CreateKeyRequest {
        name: Some(format!("axum demo ({})", env.as_str())),
        env: Some(env),
        plan: Some("free".to_owned()),
        ..CreateKeyRequest::default()
    };
    let test_key = admin
        .manager()
        .create_key(&Actor::Operator, key(KeyEnv::Test))
        .await?;
    let mut live_key = None;
    if let Some(secret) = openai_key {
        let secret = ProviderSecret::new(secret);
        admin
            .manager()
            .add_provider_key(
                &Actor::Operator,
                AddProviderKeyRequest {
                    provider: Provider::OpenAi,
                    api_key: secret,
                    name: Some("demo".to_owned()),
                    project: None,
                },
            )
            .await?;
        let live = admin
            .manager()
            .create_key(&Actor::Operator, key(KeyEnv::Live))
            .await?;
        live_key = Some(live.key.expose_secret().to_owned());
    }
    let keys = DemoKeys {
        test_key: test_key.key.expose_secret().to_owned(),
        live_key,
    };
    Ok((ctx, keys))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let (ctx, keys) = demo_vault(std::env::var("OPENAI_API_KEY").ok()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000 (GET /hello, ANY /llm/{{provider}}/...)");
    println!("test key (mock provider, offline): {}", keys.test_key);
    if let Some(live) = &keys.live_key {
        println!("live key (reaches OpenAI):        {live}");
    }
    // The vault's background work (sweeping stuck reservations), drained
    // after the server stops: queued usage written, holds given back.
    let maintenance = ctx.start_maintenance();
    axum::serve(listener, app(ctx))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    maintenance.shutdown().await;
    Ok(())
}
