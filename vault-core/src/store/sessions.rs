//! Where dashboard sessions and failed sign-ins are kept
//! (docs/dashboard.md#sessions): in the store every replica shares, so a
//! browser may land on any replica behind a load balancer, **Sign out** on
//! one is seen by all, and ten failed sign-ins a minute are ten across
//! them, not ten each.
//!
//! A session is stored under the SHA-256 of its cookie's value, never the
//! value, and holds the hash of the key it was opened with, never the key.
//! The rules (idle and absolute expiry, how many are kept) belong to the
//! caller; a [`SessionStore`] only keeps what it is told.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::StoreError;
use crate::clock::UnixMillis;
use crate::key::KeyHash;

/// The SHA-256 of a session cookie's value: what a session is stored under.
pub type SessionId = [u8; 32];

/// One dashboard session as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The hash of the key it was opened with.
    pub key_hash: KeyHash,
    /// The per-session token every form carries (64 hex characters).
    pub csrf: String,
    /// The project an organisation-wide key switched to; `None` for every
    /// project.
    pub project: Option<String>,
    /// Sign-in time.
    pub created: UnixMillis,
    /// The last request, as last recorded (see
    /// [`SessionStore::touch_session`]).
    pub last_seen: UnixMillis,
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecord")
            .field("project", &self.project)
            .field("created", &self.created)
            .field("last_seen", &self.last_seen)
            .finish_non_exhaustive()
    }
}

/// Which sessions [`SessionStore::open_session`] removes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPurge {
    /// Sessions last seen before this are gone (idle expiry).
    pub idle_before: UnixMillis,
    /// Sessions created before this are gone (absolute expiry).
    pub created_before: UnixMillis,
    /// Most sessions kept; beyond it the least recently seen go.
    pub keep: usize,
}

impl SessionPurge {
    /// How many stored sessions stay beside the one being opened (the most
    /// recently seen): `keep - 1`, at least none.
    pub fn kept_beside_new(&self) -> usize {
        self.keep.max(1) - 1
    }
}

/// Dashboard sessions and failed sign-ins, shared by every process that
/// serves one dashboard.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Removes what `purge` names, then stores `session` under `id`.
    async fn open_session(
        &self,
        id: &SessionId,
        session: &SessionRecord,
        purge: SessionPurge,
    ) -> Result<(), StoreError>;

    /// The session stored under `id`.
    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError>;

    /// Records a request of the session at `now`.
    async fn touch_session(&self, id: &SessionId, now: UnixMillis) -> Result<(), StoreError>;

    /// Sets the project the session is looking at.
    async fn set_session_project(
        &self,
        id: &SessionId,
        project: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Removes the session (sign-out, or found expired).
    async fn close_session(&self, id: &SessionId) -> Result<(), StoreError>;

    /// Failed sign-ins from `client` counted in the window starting at
    /// `window`.
    async fn sign_in_failures(&self, client: &str, window: UnixMillis) -> Result<u32, StoreError>;

    /// Counts one more failed sign-in from `client` in the window starting
    /// at `window`, forgetting earlier windows' counts.
    async fn count_sign_in_failure(
        &self,
        client: &str,
        window: UnixMillis,
    ) -> Result<(), StoreError>;
}

/// Sessions in this process's memory: for a dashboard on a store that keeps
/// none (a [`MemoryStore`](super::MemoryStore), an embedding), where a
/// restart signs everyone out.
#[derive(Debug, Default)]
pub struct MemorySessions {
    open: Mutex<HashMap<SessionId, SessionRecord>>,
    failures: Mutex<HashMap<String, (UnixMillis, u32)>>,
}

/// Most clients whose failures are remembered before old windows are
/// dropped.
const MAX_FAILING_CLIENTS: usize = 100_000;

fn poisoned() -> StoreError {
    StoreError::Backend("session table lock poisoned".to_owned())
}

#[async_trait]
impl SessionStore for MemorySessions {
    async fn open_session(
        &self,
        id: &SessionId,
        session: &SessionRecord,
        purge: SessionPurge,
    ) -> Result<(), StoreError> {
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        open.retain(|_, s| s.last_seen >= purge.idle_before && s.created >= purge.created_before);
        while open.len() > purge.kept_beside_new() {
            let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| *k)
            else {
                break;
            };
            open.remove(&oldest);
        }
        open.insert(*id, session.clone());
        Ok(())
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.open.lock().map_err(|_| poisoned())?.get(id).cloned())
    }

    async fn touch_session(&self, id: &SessionId, now: UnixMillis) -> Result<(), StoreError> {
        if let Some(s) = self.open.lock().map_err(|_| poisoned())?.get_mut(id) {
            s.last_seen = s.last_seen.max(now);
        }
        Ok(())
    }

    async fn set_session_project(
        &self,
        id: &SessionId,
        project: Option<&str>,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.open.lock().map_err(|_| poisoned())?.get_mut(id) {
            s.project = project.map(str::to_owned);
        }
        Ok(())
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), StoreError> {
        self.open.lock().map_err(|_| poisoned())?.remove(id);
        Ok(())
    }

    async fn sign_in_failures(&self, client: &str, window: UnixMillis) -> Result<u32, StoreError> {
        let failures = self.failures.lock().map_err(|_| poisoned())?;
        Ok(failures
            .get(client)
            .filter(|(w, _)| *w == window)
            .map_or(0, |(_, n)| *n))
    }

    async fn count_sign_in_failure(
        &self,
        client: &str,
        window: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut failures = self.failures.lock().map_err(|_| poisoned())?;
        if failures.len() >= MAX_FAILING_CLIENTS {
            failures.retain(|_, (w, _)| *w >= window);
        }
        let entry = failures.entry(client.to_owned()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        Ok(())
    }
}
