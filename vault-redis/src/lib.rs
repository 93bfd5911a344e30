//! vaultgate's Redis backend, for several replicas behind one load balancer
//! (docs/redis.md):
//!
//! - [`RedisLimiter`]: vault-core's [`SharedLimiter`](vault_core::policy::SharedLimiter)
//!   on Redis. One script admits a call against every rate limit and
//!   `max_parallel` of its key and the key's ancestors at once, all or
//!   nothing, so a limit holds exactly across replicas.
//! - [`RevocationBus`]: revoked key ids broadcast to every replica, with a
//!   `resync` after a reconnection (messages sent meanwhile are lost).
//! - `testing::TestRedis` (feature `testing`): a throwaway `redis-server`.
//!
//! The Redis URL may hold a password: [`RedisConfig`] keeps it secret, and
//! no `Debug`, `Display`, error or log line shows it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vault_core::clock::SystemClock;
//! use vault_core::policy::{DefaultEngine, LimiterFallback};
//! use vault_core::pricing::PriceTable;
//! use vault_core::store::MemoryStore;
//! use vault_redis::{RedisConfig, RedisLimiter, RevocationBus};
//!
//! # async fn run() -> Result<(), vault_redis::Error> {
//! let config = RedisConfig::new("redis://127.0.0.1:6379")?;
//! let limiter = RedisLimiter::new(&config)?;
//! limiter.ping().await?;
//! let engine = DefaultEngine::new(
//!     Arc::new(MemoryStore::new()),
//!     Arc::new(PriceTable::default()),
//!     Arc::new(SystemClock),
//! )
//! .with_shared_limiter(Arc::new(limiter), LimiterFallback::Refuse);
//!
//! let bus = RevocationBus::new(&config)?;
//! let _subscription = bus.subscribe(
//!     |ids| println!("revoked: {ids:?}"),  // drop them from the key cache
//!     || println!("resync"),               // drop the whole key cache
//! );
//! # drop(engine);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod bus;
mod config;
mod conn;
mod error;
mod limiter;
#[cfg(feature = "testing")]
pub mod testing;

pub use bus::{RevocationBus, Subscription};
pub use config::{DEFAULT_RETRY_INTERVAL, DEFAULT_SLOT_LEASE, DEFAULT_TIMEOUT, RedisConfig};
pub use error::Error;
pub use limiter::RedisLimiter;
