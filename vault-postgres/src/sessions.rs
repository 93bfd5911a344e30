//! [`SessionStore`] on PostgreSQL (migration 0005): dashboard sessions
//! and failed sign-ins shared by every replica (docs/dashboard.md#sessions).

use async_trait::async_trait;
use vault_core::clock::UnixMillis;
use vault_core::key::KeyHash;
use vault_core::store::sessions::SessionId;
use vault_core::store::{SessionPurge, SessionRecord, SessionStore, StoreError};

use crate::PostgresStore;
use crate::store::{Fail, MAX_ATTEMPTS, backoff, exec, get, in_transaction, opt};

impl PostgresStore {
    /// One statement on a pooled connection.
    async fn session_exec(
        &self,
        sql: &str,
        p: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), StoreError> {
        async {
            let conn = self.conn().await?;
            exec(&conn, sql, p).await
        }
        .await
        .map(drop)
        .map_err(Fail::into_store)
    }
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn open_session(
        &self,
        id: &SessionId,
        session: &SessionRecord,
        purge: SessionPurge,
    ) -> Result<(), StoreError> {
        let id = hex::encode(id);
        let hash = session.key_hash.to_hex();
        let older = i64::try_from(purge.kept_beside_new()).unwrap_or(i64::MAX);
        in_transaction!(self, |tx| {
            exec(
                &tx,
                "DELETE FROM ui_sessions WHERE last_seen < $1 OR created < $2",
                &[&purge.idle_before.0, &purge.created_before.0],
            )
            .await?;
            exec(
                &tx,
                "DELETE FROM ui_sessions WHERE id IN (SELECT id FROM ui_sessions \
                 ORDER BY last_seen DESC OFFSET $1)",
                &[&older],
            )
            .await?;
            exec(
                &tx,
                "INSERT INTO ui_sessions (id, key_hash, csrf, project, created, last_seen) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &hash,
                    &session.csrf,
                    &session.project,
                    &session.created.0,
                    &session.last_seen.0,
                ],
            )
            .await?
        })
        .map(drop)
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let id = hex::encode(id);
        async {
            let conn = self.conn().await?;
            let Some(row) = opt(
                &conn,
                "SELECT key_hash, csrf, project, created, last_seen FROM ui_sessions WHERE id = $1",
                &[&id],
            )
            .await?
            else {
                return Ok(None);
            };
            let hash: String = get(&row, 0)?;
            Ok(Some(SessionRecord {
                key_hash: KeyHash::from_hex(&hash).ok_or_else(|| {
                    Fail::Store(StoreError::Corrupt(
                        "ui_sessions.key_hash: not a 32-byte hex hash".to_owned(),
                    ))
                })?,
                csrf: get(&row, 1)?,
                project: get(&row, 2)?,
                created: UnixMillis(get(&row, 3)?),
                last_seen: UnixMillis(get(&row, 4)?),
            }))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn touch_session(&self, id: &SessionId, now: UnixMillis) -> Result<(), StoreError> {
        self.session_exec(
            "UPDATE ui_sessions SET last_seen = GREATEST(last_seen, $2) WHERE id = $1",
            &[&hex::encode(id), &now.0],
        )
        .await
    }

    async fn set_session_project(
        &self,
        id: &SessionId,
        project: Option<&str>,
    ) -> Result<(), StoreError> {
        self.session_exec(
            "UPDATE ui_sessions SET project = $2 WHERE id = $1",
            &[&hex::encode(id), &project],
        )
        .await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), StoreError> {
        self.session_exec("DELETE FROM ui_sessions WHERE id = $1", &[&hex::encode(id)])
            .await
    }

    async fn sign_in_failures(&self, client: &str, window: UnixMillis) -> Result<u32, StoreError> {
        async {
            let conn = self.conn().await?;
            let row = opt(
                &conn,
                "SELECT failures FROM ui_sign_in_failures WHERE client = $1 AND window_start = $2",
                &[&client, &window.0],
            )
            .await?;
            let n: i32 = match row {
                Some(r) => get(&r, 0)?,
                None => 0,
            };
            Ok(u32::try_from(n).unwrap_or(0))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn count_sign_in_failure(
        &self,
        client: &str,
        window: UnixMillis,
    ) -> Result<(), StoreError> {
        self.session_exec(
            "DELETE FROM ui_sign_in_failures WHERE window_start < $1",
            &[&window.0],
        )
        .await?;
        self.session_exec(
            "INSERT INTO ui_sign_in_failures AS f (client, window_start, failures) \
             VALUES ($1, $2, 1) \
             ON CONFLICT (client) DO UPDATE SET \
             failures = CASE WHEN f.window_start = EXCLUDED.window_start \
                             THEN f.failures + 1 ELSE 1 END, \
             window_start = EXCLUDED.window_start",
            &[&client, &window.0],
        )
        .await
    }
}
