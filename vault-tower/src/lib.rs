//! # vault-tower
//!
//! vaultgate as a [tower] `Layer`: [`VaultLayer`] wraps any
//! `Service<http::Request<B>>` (an axum `Router`, a bare hyper service, the
//! bundled [`Forwarder`]) in a [`Vault`] that, per request:
//!
//! 1. takes the virtual key from `Authorization: Bearer`, `x-api-key`,
//!    `x-goog-api-key`, `api-key` or `?key=` (two different ones → 401),
//! 2. finds it through a cache keyed by the full SHA-256 (revocations are seen
//!    within [`KEY_CACHE_TTL`] across processes, at once on this one),
//! 3. checks its policy and reserves the most the call can cost,
//! 4. strips every client credential and hop-by-hop header, injects the
//!    provider key the provider's way, and rewrites the URI to the configured
//!    base URL (the client can never pick the host),
//! 5. streams the response back through a [`MeteredBody`] that reads usage
//!    as bytes pass and settles the call at end of body or on disconnect.
//!
//! `vpx_test_` keys are answered by the built-in [`MockProvider`], offline.
//!
//! ```
//! use std::sync::Arc;
//! use tower::ServiceBuilder;
//! use vault_core::clock::SystemClock;
//! use vault_core::crypto::{AesGcmEncryptor, MasterKey};
//! use vault_core::policy::DefaultEngine;
//! use vault_core::pricing::PriceTable;
//! use vault_core::store::MemoryStore;
//! use vault_tower::{Forwarder, VaultContext, VaultLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let store = Arc::new(MemoryStore::new());
//! let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate()?)?);
//! let prices = Arc::new(PriceTable::builtin());
//! let engine = Arc::new(DefaultEngine::new(store.clone(), prices, Arc::new(SystemClock)));
//! let ctx = VaultContext::builder(store, encryptor, engine).build();
//! let proxy = ServiceBuilder::new()
//!     .layer(VaultLayer::new(ctx))
//!     .service(Forwarder::default());
//! # let _ = proxy;
//! # Ok(()) })
//! # }
//! ```

pub mod admin;
mod context;
mod credentials;
mod forward;
mod maintenance;
mod metrics;
mod mock;
mod replicas;
mod response;
pub mod server;
pub mod ui;
mod vault;

pub use context::{KEY_CACHE_TTL, RequestLimits, VaultContext, VaultContextBuilder};
pub use forward::{
    BadBaseUrl, Exchange, ForwardBody, Forwarder, IdleTimeout, Timeouts, Upstream, UpstreamFailure,
    Upstreams,
};
pub use maintenance::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_SWEEP_INTERVAL, Maintenance};
pub use metrics::Metrics;
pub use mock::{MockBody, MockProvider, MockTarget};
pub use replicas::{ProbeOutcome, READINESS_TIMEOUT, ReadinessProbe, RevocationNotifier};
pub use response::{
    BUDGET_REMAINING, OUTPUT_TOKENS_CLAMPED, RATE_LIMIT_LIMIT, RATE_LIMIT_REMAINING,
    RATE_LIMIT_RESET, SHADOW_DENIAL, add_limit_headers, denial_response,
};
pub use vault::sink::DEFAULT_USAGE_BUFFER;
pub use vault::{BoxError, MeteredBody, ResponseFuture, Vault, VaultLayer};
