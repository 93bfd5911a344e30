//! [`LeaseHolders`] on PostgreSQL: the replicas holding budget leases, so
//! that a replica that dies without a word has its leases closed by the
//! others within seconds (docs/replicas.md#when-a-replica-dies).
//!
//! `lease_holders` has one row per live holder, its heartbeat in the
//! database's own milliseconds (`vg_now_ms()`); a lease is a reservation
//! tagged with its holder, its `cover` and what partial settlements have
//! `charged` of it (migration 0003). Locks: a heartbeat updates its
//! holder's row before the covers of its leases; closing deletes the
//! stale holders' rows (PostgreSQL re-checks the staleness on the newest
//! row version after waiting for a heartbeat in flight, so a holder that
//! just beat is never closed), then settles their leases with the same
//! statements as any settlement (each exactly once, whoever closes).

use std::time::Duration;

use async_trait::async_trait;
use vault_core::clock::UnixMillis;
use vault_core::money::Micros;
use vault_core::record::{BudgetLine, Reservation, ReservationId};
use vault_core::store::{LeaseHolders, StoreError};

use crate::PostgresStore;
use crate::rows::{money, read_money};
use crate::store::{Fail, MAX_ATTEMPTS, backoff, exec, get, in_transaction, opt, rows, settle_one};

/// A dead holder's leases: each lease's id and what it is settled at.
const DEAD_LEASES: &str = "SELECT id,
        LEAST(amount, GREATEST(COALESCE(cover, amount) - charged, 0))
   FROM reservations r
  WHERE holder IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM lease_holders h WHERE h.id = r.holder)
  ORDER BY key_id, id";

fn ids(covers: &[(ReservationId, Micros)]) -> (Vec<i64>, Vec<i64>) {
    covers
        .iter()
        .filter_map(|(id, c)| Some((i64::try_from(id.0).ok()?, money(*c))))
        .unzip()
}

#[async_trait]
impl LeaseHolders for PostgresStore {
    async fn register(&self, holder: &str) -> Result<(), StoreError> {
        async {
            let conn = self.conn().await?;
            exec(
                &conn,
                "INSERT INTO lease_holders (id, started_at, heartbeat_at)
                 VALUES ($1, vg_now_ms(), vg_now_ms())
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
                &[&holder],
            )
            .await
        }
        .await
        .map_err(Fail::into_store)?;
        Ok(())
    }

    async fn record(
        &self,
        holder: &str,
        covers: &[(ReservationId, Micros)],
    ) -> Result<bool, StoreError> {
        let (lease_ids, amounts) = ids(covers);
        // One statement: the heartbeat, then the covers of the leases the
        // holder still has (none if it was closed meanwhile).
        let row = async {
            let conn = self.conn().await?;
            opt(
                &conn,
                "WITH beat AS (
                     UPDATE lease_holders SET heartbeat_at = vg_now_ms()
                      WHERE id = $1 RETURNING id
                 ), covers AS (
                     UPDATE reservations r SET cover = u.cover
                       FROM UNNEST($2::BIGINT[], $3::BIGINT[]) AS u (id, cover), beat
                      WHERE r.id = u.id AND r.holder = beat.id
                     RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM beat), (SELECT count(*) FROM covers)",
                &[&holder, &lease_ids, &amounts],
            )
            .await
        }
        .await
        .map_err(Fail::into_store)?;
        let alive = match row {
            Some(r) => get::<i64>(&r, 0).map_err(Fail::into_store)? > 0,
            None => false,
        };
        Ok(alive)
    }

    async fn reserve_lease(
        &self,
        holder: &str,
        cover: Micros,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        _now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        self.reserve_tagged(line, want, at_least, expires_at, Some((holder, cover)))
            .await
    }

    async fn close_dead(&self, stale_after: Duration) -> Result<usize, StoreError> {
        let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
        in_transaction!(self, |tx| {
            let dead = rows(
                &tx,
                "DELETE FROM lease_holders WHERE heartbeat_at < vg_now_ms() - $1 RETURNING id",
                &[&stale_ms],
            )
            .await?;
            for row in &dead {
                let id: String = get(row, 0)?;
                tracing::warn!(holder = %id, "a replica stopped its heartbeat; closing its leases");
            }
            let leases = rows(&tx, DEAD_LEASES, &[]).await?;
            let mut closed = 0;
            for row in &leases {
                let id: i64 = get(row, 0)?;
                let owed = read_money(get(row, 1)?, "a lease's cover")?;
                if settle_one(&tx, id, Some(owed)).await? {
                    closed += 1;
                }
            }
            closed
        })
    }

    async fn deregister(&self, holder: &str) -> Result<(), StoreError> {
        async {
            let conn = self.conn().await?;
            exec(&conn, "DELETE FROM lease_holders WHERE id = $1", &[&holder]).await
        }
        .await
        .map_err(Fail::into_store)?;
        Ok(())
    }
}
