//! Dashboard sessions in the data directory's database (tables
//! `ui_sessions` and `ui_sign_in_failures`): a restart keeps everyone
//! signed in, and every process on the directory sees the same sessions.
//! Written with `synchronous=NORMAL`: a power cut may forget a sign-in or a
//! sign-out of the last moments, never corrupt the table.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{Durability, SqliteStore, backend};
use crate::clock::UnixMillis;
use crate::key::KeyHash;
use crate::store::StoreError;
use crate::store::sessions::{SessionId, SessionPurge, SessionRecord, SessionStore};

#[async_trait]
impl SessionStore for SqliteStore {
    async fn open_session(
        &self,
        id: &SessionId,
        session: &SessionRecord,
        purge: SessionPurge,
    ) -> Result<(), StoreError> {
        let id = hex::encode(id);
        let s = session.clone();
        self.write(Durability::Normal, move |tx| {
            tx.execute(
                "DELETE FROM ui_sessions WHERE last_seen < ?1 OR created < ?2",
                params![purge.idle_before.0, purge.created_before.0],
            )
            .map_err(backend)?;
            tx.execute(
                "DELETE FROM ui_sessions WHERE id IN (SELECT id FROM ui_sessions \
                 ORDER BY last_seen DESC LIMIT -1 OFFSET ?1)",
                params![i64::try_from(purge.kept_beside_new()).unwrap_or(i64::MAX)],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO ui_sessions (id, key_hash, csrf, project, created, last_seen) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    s.key_hash.to_hex(),
                    s.csrf,
                    s.project,
                    s.created.0,
                    s.last_seen.0
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let id = hex::encode(id);
        self.read(move |c| {
            let row = c
                .prepare_cached(
                    "SELECT key_hash, csrf, project, created, last_seen FROM ui_sessions \
                     WHERE id = ?1",
                )
                .map_err(backend)?
                .query_row([id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .optional()
                .map_err(backend)?;
            row.map(|(hash, csrf, project, created, last_seen)| {
                Ok(SessionRecord {
                    key_hash: KeyHash::from_hex(&hash).ok_or_else(|| {
                        StoreError::Corrupt("ui_sessions.key_hash: not a 32-byte hex hash".into())
                    })?,
                    csrf,
                    project,
                    created: UnixMillis(created),
                    last_seen: UnixMillis(last_seen),
                })
            })
            .transpose()
        })
        .await
    }

    async fn touch_session(&self, id: &SessionId, now: UnixMillis) -> Result<(), StoreError> {
        let id = hex::encode(id);
        self.write(Durability::Normal, move |tx| {
            tx.execute(
                "UPDATE ui_sessions SET last_seen = max(last_seen, ?2) WHERE id = ?1",
                params![id, now.0],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn set_session_project(
        &self,
        id: &SessionId,
        project: Option<&str>,
    ) -> Result<(), StoreError> {
        let id = hex::encode(id);
        let project = project.map(str::to_owned);
        self.write(Durability::Normal, move |tx| {
            tx.execute(
                "UPDATE ui_sessions SET project = ?2 WHERE id = ?1",
                params![id, project],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), StoreError> {
        let id = hex::encode(id);
        self.write(Durability::Normal, move |tx| {
            tx.execute("DELETE FROM ui_sessions WHERE id = ?1", [id])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn sign_in_failures(&self, client: &str, window: UnixMillis) -> Result<u32, StoreError> {
        let client = client.to_owned();
        self.read(move |c| {
            let n: Option<i64> = c
                .prepare_cached(
                    "SELECT failures FROM ui_sign_in_failures \
                     WHERE client = ?1 AND window_start = ?2",
                )
                .map_err(backend)?
                .query_row(params![client, window.0], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            Ok(n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
        })
        .await
    }

    async fn count_sign_in_failure(
        &self,
        client: &str,
        window: UnixMillis,
    ) -> Result<(), StoreError> {
        let client = client.to_owned();
        self.write(Durability::Normal, move |tx| {
            tx.execute(
                "DELETE FROM ui_sign_in_failures WHERE window_start < ?1",
                [window.0],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO ui_sign_in_failures (client, window_start, failures) \
                 VALUES (?1, ?2, 1) \
                 ON CONFLICT (client) DO UPDATE SET \
                 failures = CASE WHEN window_start = excluded.window_start \
                                 THEN failures + 1 ELSE 1 END, \
                 window_start = excluded.window_start",
                params![client, window.0],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
}
