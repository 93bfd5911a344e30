//! [`LeaseHolders`]: what a store shared by replicas on several hosts keeps
//! about who holds each budget lease, so that a replica that dies without
//! a word (`kill -9`, a lost host) has its leases closed by the others
//! within seconds (docs/replicas.md#when-a-replica-dies).
//!
//! Each [`LeasedStore`](super::LeasedStore) is a *holder*: it registers
//! under a unique id, tags every lease it takes with that id and a
//! **cover** — the most the lease's settled calls and calls in flight may
//! together reach until the holder records a higher one — and records,
//! from its maintenance (never per call), that it is alive and what each
//! lease's cover now is. It admits a call on a lease only while the call
//! fits under the lease's recorded cover and its last heartbeat is fresh.
//!
//! When a holder has not been heard from for `stale_after`, any other
//! holder's maintenance closes its leases: each is charged its cover (at
//! least what its calls spent and hold, at most one cover step more) and
//! the rest of the lease is released.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use crate::clock::UnixMillis;
use crate::money::Micros;
use crate::record::{BudgetLine, Reservation, ReservationId};

/// The default time after its last heartbeat when a holder is taken for
/// dead and its leases closed.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(5);

/// A store's registry of lease holders (docs/replicas.md). Implemented by
/// stores that replicas on several hosts share (`vault_postgres::PostgresStore`);
/// a store that returns it from [`KeyStore::lease_holders`](super::KeyStore::lease_holders)
/// makes every [`LeasedStore`](super::LeasedStore) over it a registered holder.
///
/// Times are the store's own clock, so hosts' clocks need not agree.
#[async_trait]
pub trait LeaseHolders: Send + Sync {
    /// Registers `holder` as alive now (or refreshes it).
    async fn register(&self, holder: &str) -> Result<(), StoreError>;

    /// Records `holder` alive now and sets each of its leases' cover, in
    /// one transaction. `false` (nothing changed) when `holder` is no
    /// longer registered: it was taken for dead and its leases closed.
    async fn record(
        &self,
        holder: &str,
        covers: &[(ReservationId, Micros)],
    ) -> Result<bool, StoreError>;

    /// [`KeyStore::reserve_reporting`](super::KeyStore::reserve_reporting)
    /// for a lease: the reservation is tagged with `holder` and its cover
    /// set to `cover` (at most what is granted), in the same statement.
    #[allow(clippy::too_many_arguments)]
    async fn reserve_lease(
        &self,
        holder: &str,
        cover: Micros,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError>;

    /// Closes the leases of every holder not heard from for `stale_after`
    /// (and of holders no longer registered): each lease is settled at its
    /// cover (never more than it holds), exactly once however many holders
    /// close at once. Returns how many leases were closed.
    async fn close_dead(&self, stale_after: Duration) -> Result<usize, StoreError>;

    /// Removes `holder` (graceful shutdown, after its leases were given
    /// back); any lease it still holds is closed by the next
    /// [`close_dead`](Self::close_dead).
    async fn deregister(&self, holder: &str) -> Result<(), StoreError>;
}
