//! Dashboard sessions and the failed-sign-in limiter, kept in a
//! [`SessionStore`] (docs/dashboard.md#sessions): `vaultgate serve` passes
//! its store (the data directory's database, or PostgreSQL shared by every
//! replica), so a restart signs nobody out and a browser may land on any
//! replica; an embedding without one keeps them in memory.
//!
//! A session id is 256 random bits, sent to the browser once in its cookie
//! and stored only as its SHA-256, so a dump of the table opens no session.
//! A session holds the *hash* of the key it was opened with, never the
//! key, and is re-checked against that key's record on every request.

use std::net::IpAddr;
use std::sync::Arc;

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use vault_core::clock::UnixMillis;
use vault_core::key::KeyHash;
use vault_core::store::sessions::SessionId;
use vault_core::store::{SessionPurge, SessionRecord, SessionStore, StoreError};

/// A session ends after this long without a request.
pub const IDLE_TIMEOUT_MS: i64 = 60 * 60 * 1000;
/// A session ends this long after sign-in, however busy.
pub const ABSOLUTE_TIMEOUT_MS: i64 = 12 * 60 * 60 * 1000;
/// Failed sign-ins allowed per client address per window.
pub const SIGN_IN_FAILURES_ALLOWED: u32 = 10;
/// The failed-sign-in window.
const SIGN_IN_WINDOW_MS: i64 = 60 * 1000;
/// Most sessions held at once; the least recently seen go first beyond it.
const MAX_SESSIONS: usize = 10_000;
/// A request moves the stored `last_seen` only when it is at least this old,
/// so a busy session writes once a minute, not once a request.
const TOUCH_EVERY_MS: i64 = 60 * 1000;

/// One signed-in browser, as stored.
pub(crate) type Session = SessionRecord;

/// Whether the form's token is the session's, in constant time.
pub(crate) fn csrf_matches(session: &Session, token: &str) -> bool {
    session.csrf.as_bytes().ct_eq(token.as_bytes()).into()
}

/// 32 random bytes, hex.
fn random_token(rng: &SystemRandom) -> Option<String> {
    let mut b = [0u8; 32];
    rng.fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// What a session is stored under: the SHA-256 of the cookie's value.
fn id_hash(id: &str) -> SessionId {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, id.as_bytes()).as_ref());
    out
}

/// Not idle for an hour, and under twelve hours old.
fn live(s: &Session, now: UnixMillis) -> bool {
    now.0 - s.last_seen.0 < IDLE_TIMEOUT_MS && now.0 - s.created.0 < ABSOLUTE_TIMEOUT_MS
}

/// The dashboard's sessions, over a [`SessionStore`].
pub(crate) struct Sessions {
    rng: SystemRandom,
    store: Arc<dyn SessionStore>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

impl Sessions {
    /// Sessions kept in `store`.
    pub(crate) fn new(store: Arc<dyn SessionStore>) -> Sessions {
        Sessions {
            rng: SystemRandom::new(),
            store,
        }
    }

    /// Opens a session for the key hashing to `key_hash`; returns the
    /// cookie value (the only copy of the id). Expired sessions, and beyond
    /// [`MAX_SESSIONS`] the least recently seen, are removed first.
    pub(crate) async fn open(
        &self,
        key_hash: KeyHash,
        now: UnixMillis,
    ) -> Result<String, StoreError> {
        let no_randomness = || StoreError::Backend("no randomness for a session id".to_owned());
        let id = random_token(&self.rng).ok_or_else(no_randomness)?;
        let session = Session {
            key_hash,
            csrf: random_token(&self.rng).ok_or_else(no_randomness)?,
            project: None,
            created: now,
            last_seen: now,
        };
        let purge = SessionPurge {
            idle_before: UnixMillis(now.0 - IDLE_TIMEOUT_MS),
            created_before: UnixMillis(now.0 - ABSOLUTE_TIMEOUT_MS),
            keep: MAX_SESSIONS,
        };
        self.store
            .open_session(&id_hash(&id), &session, purge)
            .await?;
        Ok(id)
    }

    /// The live session with this cookie value, its idle clock restarted
    /// (stored at most once a minute); an expired one is removed.
    pub(crate) async fn touch(
        &self,
        id: &str,
        now: UnixMillis,
    ) -> Result<Option<Session>, StoreError> {
        let h = id_hash(id);
        let Some(mut s) = self.store.session(&h).await? else {
            return Ok(None);
        };
        if !live(&s, now) {
            self.store.close_session(&h).await?;
            return Ok(None);
        }
        if now.0 - s.last_seen.0 >= TOUCH_EVERY_MS {
            self.store.touch_session(&h, now).await?;
            s.last_seen = now;
        }
        Ok(Some(s))
    }

    /// Sets the project the session with this cookie value is looking at.
    pub(crate) async fn choose_project(
        &self,
        id: &str,
        project: Option<&str>,
    ) -> Result<(), StoreError> {
        self.store.set_session_project(&id_hash(id), project).await
    }

    /// Ends the session with this cookie value.
    pub(crate) async fn close(&self, id: &str) -> Result<(), StoreError> {
        self.store.close_session(&id_hash(id)).await
    }

    /// Whether `ip` has used up its failed sign-ins in the current window.
    pub(crate) async fn sign_ins_blocked(
        &self,
        ip: IpAddr,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let n = self
            .store
            .sign_in_failures(&ip.to_string(), window(now))
            .await?;
        Ok(n >= SIGN_IN_FAILURES_ALLOWED)
    }

    /// Counts a failed sign-in of `ip`.
    pub(crate) async fn sign_in_failed(
        &self,
        ip: IpAddr,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.store
            .count_sign_in_failure(&ip.to_string(), window(now))
            .await
    }
}

/// The start of the fixed one-minute window holding `now`.
fn window(now: UnixMillis) -> UnixMillis {
    UnixMillis(now.0 - now.0.rem_euclid(SIGN_IN_WINDOW_MS))
}

#[cfg(test)]
mod tests {
    use vault_core::store::MemorySessions;

    use super::*;

    fn sessions() -> (Sessions, Arc<MemorySessions>) {
        let store = Arc::new(MemorySessions::default());
        (Sessions::new(store.clone()), store)
    }

    #[tokio::test]
    async fn lifecycle_sessions_expire_when_idle_and_at_twelve_hours() {
        let (s, store) = sessions();
        let h = KeyHash::of("vpx_test_abc");
        let id = s.open(h, UnixMillis(0)).await.unwrap();
        assert_eq!(id.len(), 64);
        assert!(
            s.touch(&id, UnixMillis(IDLE_TIMEOUT_MS - 1))
                .await
                .unwrap()
                .is_some()
        );
        // Kept busy, it still ends at twelve hours.
        let mut t = IDLE_TIMEOUT_MS - 1;
        while t + IDLE_TIMEOUT_MS / 2 < ABSOLUTE_TIMEOUT_MS {
            t += IDLE_TIMEOUT_MS / 2;
            assert!(s.touch(&id, UnixMillis(t)).await.unwrap().is_some());
        }
        assert!(
            s.touch(&id, UnixMillis(ABSOLUTE_TIMEOUT_MS))
                .await
                .unwrap()
                .is_none()
        );
        let id2 = s.open(h, UnixMillis(0)).await.unwrap();
        assert!(
            s.touch(&id2, UnixMillis(IDLE_TIMEOUT_MS))
                .await
                .unwrap()
                .is_none()
        );
        let id3 = s.open(h, UnixMillis(0)).await.unwrap();
        let sess = s.touch(&id3, UnixMillis(1)).await.unwrap().unwrap();
        assert!(csrf_matches(&sess, &sess.csrf.clone()));
        assert!(!csrf_matches(&sess, ""));
        s.close(&id3).await.unwrap();
        assert!(s.touch(&id3, UnixMillis(1)).await.unwrap().is_none());
        // The store holds hashes, not ids.
        assert!(store.session(&id_hash(&id3)).await.unwrap().is_none());
        let id4 = s.open(h, UnixMillis(0)).await.unwrap();
        let mut raw = [0u8; 32];
        hex::decode_to_slice(&id4, &mut raw).unwrap();
        assert!(store.session(&raw).await.unwrap().is_none());
        assert!(store.session(&id_hash(&id4)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn lifecycle_a_busy_session_writes_last_seen_once_a_minute() {
        let (s, store) = sessions();
        let id = s
            .open(KeyHash::of("vpx_test_abc"), UnixMillis(0))
            .await
            .unwrap();
        s.touch(&id, UnixMillis(TOUCH_EVERY_MS - 1)).await.unwrap();
        let stored = |store: Arc<MemorySessions>, id: String| async move {
            store
                .session(&id_hash(&id))
                .await
                .unwrap()
                .unwrap()
                .last_seen
        };
        assert_eq!(stored(store.clone(), id.clone()).await, UnixMillis(0));
        s.touch(&id, UnixMillis(TOUCH_EVERY_MS)).await.unwrap();
        assert_eq!(stored(store, id).await, UnixMillis(TOUCH_EVERY_MS));
    }

    #[tokio::test]
    async fn boundary_eleventh_failure_in_a_minute_is_blocked() {
        let (s, _) = sessions();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let at = UnixMillis(61_000);
        for _ in 0..SIGN_IN_FAILURES_ALLOWED {
            assert!(!s.sign_ins_blocked(ip, at).await.unwrap());
            s.sign_in_failed(ip, at).await.unwrap();
        }
        assert!(s.sign_ins_blocked(ip, at).await.unwrap());
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(!s.sign_ins_blocked(other, at).await.unwrap());
        let next = UnixMillis(at.0 + SIGN_IN_WINDOW_MS);
        assert!(!s.sign_ins_blocked(ip, next).await.unwrap());
    }
}
