//! [`Maintenance`]: the background work every vault needs, owned by the
//! library so that an embedding app gets it with one call.
//!
//! While it runs, one task sends the store's
//! [heartbeat](vault_core::store::KeyStore::heartbeat) every
//! [`heartbeat_interval`](crate::VaultContextBuilder::heartbeat_interval)
//! (1 s): over PostgreSQL, a replica records that it is alive and what its
//! budget leases may have admitted, and closes the leases of replicas that
//! died (docs/replicas.md#when-a-replica-dies). Another sweeps the store every
//! [`sweep_interval`](crate::VaultContextBuilder::sweep_interval): calls
//! whose reservation outlived its expiry (a process that never settled
//! them) are charged, children that expired give their unspent carve-out
//! back, and — for a [`LeasedStore`](vault_core::store::LeasedStore) —
//! leases left by dead processes are recovered (docs/budgets.md#settlement).
//! [`Maintenance::shutdown`] stops it, then writes every queued settlement
//! and usage record and gives back what the store still holds for this
//! process ([`KeyStore::drain`](vault_core::store::KeyStore::drain)).
//!
//! ```no_run
//! # async fn demo(ctx: std::sync::Arc<vault_tower::VaultContext>) {
//! let maintenance = ctx.start_maintenance();
//! // … serve requests with `VaultLayer::new(ctx.clone())` …
//! maintenance.shutdown().await;
//! # }
//! ```

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::context::VaultContext;

/// The default pause between two sweeps.
pub const DEFAULT_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The default pause between two heartbeats: well inside half of
/// [`DEFAULT_STALE_AFTER`](vault_core::store::DEFAULT_STALE_AFTER).
pub const DEFAULT_HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The running maintenance of one [`VaultContext`]; see the module
/// documentation in `vault-tower/src/maintenance.rs`. Dropping it stops the
/// sweeps without draining.
#[derive(Debug)]
pub struct Maintenance {
    ctx: Arc<VaultContext>,
    sweeper: JoinHandle<()>,
    heart: JoinHandle<()>,
}

impl Maintenance {
    /// Starts sweeping `ctx`'s store on the current tokio runtime.
    pub(crate) fn start(ctx: Arc<VaultContext>) -> Maintenance {
        let sweeping = ctx.clone();
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweeping.sweep_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sweeping.sweep().await;
            }
        });
        let beating = ctx.clone();
        let heart = tokio::spawn(async move {
            let mut tick = tokio::time::interval(beating.heartbeat_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                beating.heartbeat().await;
            }
        });
        Maintenance {
            ctx,
            sweeper,
            heart,
        }
    }

    /// Stops sweeping, then waits until every settlement and usage record
    /// queued so far is written and the store has given back what it holds
    /// for this process. Call once every request has finished (after the
    /// server's graceful shutdown).
    pub async fn shutdown(self) {
        self.sweeper.abort();
        self.heart.abort();
        self.ctx.flush().await;
        if let Err(e) = self.ctx.store().drain().await {
            tracing::warn!(error = %e, "giving back the store's holds on shutdown failed; the sweep will settle them");
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.sweeper.abort();
        self.heart.abort();
    }
}
