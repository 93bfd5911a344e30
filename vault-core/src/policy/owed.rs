//! What settlements still owe the store: charges the store could not take
//! because it was unavailable ([`StoreError::Unavailable`]), kept in memory
//! and written first on the next try (docs/replicas.md#when-postgresql-stops).
//! The usage worker retries until nothing is owed before it settles more
//! calls, so at most one batch waits here.
//!
//! Settling is idempotent (a reservation settles once), so retrying a
//! batch the store may have applied before the answer was lost charges
//! nothing twice; spend without a reservation may then be counted twice —
//! more, never less.

use std::sync::{Mutex, MutexGuard};

use crate::key::KeyId;
use crate::money::Micros;
use crate::record::Settlement;
use crate::store::{KeyStore, StoreError};

/// Settlements and unreserved spend waiting for the store.
#[derive(Debug, Default)]
pub(super) struct Owed {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    settlements: Vec<Settlement>,
    spend: Vec<(KeyId, Micros)>,
}

impl Owed {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding it cannot leave it half-changed: each
        // change is one `Vec` operation.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes what is owed, then `settlements` and `spend`; keeps whatever
    /// the store could not take because it is unavailable (the error is
    /// returned). Other failures are logged and not retried: the sweep
    /// charges reservations left unsettled.
    pub(super) async fn write(
        &self,
        store: &dyn KeyStore,
        settlements: Vec<Settlement>,
        spend: Vec<(KeyId, Micros)>,
    ) -> Result<(), StoreError> {
        let (settlements, spend) = {
            let mut p = self.pending();
            let mut owed_settlements = std::mem::take(&mut p.settlements);
            owed_settlements.extend(settlements);
            let mut owed_spend = std::mem::take(&mut p.spend);
            owed_spend.extend(spend);
            (owed_settlements, owed_spend)
        };
        let mut unavailable = None;
        if !settlements.is_empty() {
            match store.settle(&settlements).await {
                Ok(()) => {}
                Err(e @ StoreError::Unavailable(_)) => {
                    self.pending().settlements.splice(0..0, settlements);
                    unavailable = Some(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, reservations = settlements.len(), "settling reservations failed; the sweep will charge them");
                }
            }
        }
        if !spend.is_empty() {
            match store.add_spend(&spend).await {
                Ok(()) => {}
                Err(e @ StoreError::Unavailable(_)) => {
                    self.pending().spend.splice(0..0, spend);
                    unavailable.get_or_insert(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, keys = spend.len(), "recording unbudgeted keys' spend failed");
                }
            }
        }
        unavailable.map_or(Ok(()), Err)
    }
}
