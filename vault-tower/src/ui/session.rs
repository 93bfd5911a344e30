//! Dashboard sessions and the failed-sign-in limiter, both in this
//! process's memory (docs/dashboard.md#sessions): a restart signs everyone
//! out, and with several replicas a browser must come back to the one it
//! signed in on (or sign in again).
//!
//! A session id is 256 random bits, sent to the browser once in its cookie
//! and kept here only as its SHA-256, so a dump of this table opens no
//! session. A session holds the *hash* of the key it was opened with, never
//! the key, and is re-checked against that key's record on every request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use vault_core::clock::UnixMillis;
use vault_core::key::KeyHash;

/// A session ends after this long without a request.
pub const IDLE_TIMEOUT_MS: i64 = 60 * 60 * 1000;
/// A session ends this long after sign-in, however busy.
pub const ABSOLUTE_TIMEOUT_MS: i64 = 12 * 60 * 60 * 1000;
/// Failed sign-ins allowed per client address per window.
pub const SIGN_IN_FAILURES_ALLOWED: u32 = 10;
/// The failed-sign-in window.
const SIGN_IN_WINDOW_MS: i64 = 60 * 1000;
/// Most sessions held at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
#[derive(Clone)]
pub(crate) struct Session {
    /// The hash of the key it was opened with.
    pub(crate) key_hash: KeyHash,
    /// The per-session CSRF token every form carries.
    pub(crate) csrf: String,
    /// The project an organisation-wide key chose with the project
    /// switcher; `None` shows every project (docs/dashboard.md#projects).
    pub(crate) project: Option<String>,
    /// Sign-in time.
    created: UnixMillis,
    /// The last request.
    last_seen: UnixMillis,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Whether the form's token is this session's, in constant time.
    pub(crate) fn csrf_matches(&self, token: &str) -> bool {
        self.csrf.as_bytes().ct_eq(token.as_bytes()).into()
    }
}

/// 32 random bytes, hex.
fn random_token(rng: &SystemRandom) -> Option<String> {
    let mut b = [0u8; 32];
    rng.fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// What the table is keyed by: the SHA-256 of the cookie's value.
fn id_hash(id: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, id.as_bytes()).as_ref());
    out
}

/// The open sessions.
pub(crate) struct Sessions {
    rng: SystemRandom,
    open: Mutex<HashMap<[u8; 32], Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            rng: SystemRandom::new(),
            open: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

impl Sessions {
    /// Opens a session for the key hashing to `key_hash`; returns the
    /// cookie value (the only copy of the id) and the session.
    pub(crate) fn open(&self, key_hash: KeyHash, now: UnixMillis) -> Option<(String, Session)> {
        let id = random_token(&self.rng)?;
        let session = Session {
            key_hash,
            csrf: random_token(&self.rng)?,
            project: None,
            created: now,
            last_seen: now,
        };
        let mut open = self.open.lock().ok()?;
        open.retain(|_, s| live(s, now));
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.last_seen.0)
                .map(|(k, _)| *k)
        {
            open.remove(&oldest);
        }
        open.insert(id_hash(&id), session.clone());
        Some((id, session))
    }

    /// The live session with this cookie value, its idle clock restarted;
    /// an expired one is removed.
    pub(crate) fn touch(&self, id: &str, now: UnixMillis) -> Option<Session> {
        let mut open = self.open.lock().ok()?;
        let h = id_hash(id);
        let s = open.get_mut(&h)?;
        if !live(s, now) {
            open.remove(&h);
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    /// Sets the project the session with this cookie value is looking at.
    pub(crate) fn choose_project(&self, id: &str, project: Option<String>) {
        if let Ok(mut open) = self.open.lock()
            && let Some(s) = open.get_mut(&id_hash(id))
        {
            s.project = project;
        }
    }

    /// Ends the session with this cookie value.
    pub(crate) fn close(&self, id: &str) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id_hash(id));
        }
    }
}

/// Not idle for an hour, and under twelve hours old.
fn live(s: &Session, now: UnixMillis) -> bool {
    now.0 - s.last_seen.0 < IDLE_TIMEOUT_MS && now.0 - s.created.0 < ABSOLUTE_TIMEOUT_MS
}

/// Failed sign-ins per client address in fixed one-minute windows.
#[derive(Debug, Default)]
pub(crate) struct SignInLimiter {
    failures: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl SignInLimiter {
    /// Whether `ip` has used up its failures in the current window.
    pub(crate) fn blocked(&self, ip: IpAddr, now: UnixMillis) -> bool {
        let Ok(map) = self.failures.lock() else {
            return true;
        };
        map.get(&ip).is_some_and(|(start, n)| {
            now.0 - start < SIGN_IN_WINDOW_MS && *n >= SIGN_IN_FAILURES_ALLOWED
        })
    }

    /// Counts a failure of `ip`.
    pub(crate) fn failed(&self, ip: IpAddr, now: UnixMillis) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if map.len() > 100_000 {
            map.retain(|_, (start, _)| now.0 - *start < SIGN_IN_WINDOW_MS);
        }
        let entry = map.entry(ip).or_insert((now.0, 0));
        if now.0 - entry.0 >= SIGN_IN_WINDOW_MS {
            *entry = (now.0, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_sessions_expire_when_idle_and_at_twelve_hours() {
        let s = Sessions::default();
        let h = KeyHash::of("vpx_test_abc");
        let (id, _) = s.open(h, UnixMillis(0)).unwrap();
        assert_eq!(id.len(), 64);
        assert!(s.touch(&id, UnixMillis(IDLE_TIMEOUT_MS - 1)).is_some());
        // Kept busy, it still ends at twelve hours.
        let mut t = IDLE_TIMEOUT_MS - 1;
        while t + IDLE_TIMEOUT_MS / 2 < ABSOLUTE_TIMEOUT_MS {
            t += IDLE_TIMEOUT_MS / 2;
            assert!(s.touch(&id, UnixMillis(t)).is_some());
        }
        assert!(s.touch(&id, UnixMillis(ABSOLUTE_TIMEOUT_MS)).is_none());
        let (id2, _) = s.open(h, UnixMillis(0)).unwrap();
        assert!(s.touch(&id2, UnixMillis(IDLE_TIMEOUT_MS)).is_none());
        let (id3, sess) = s.open(h, UnixMillis(0)).unwrap();
        assert!(sess.csrf_matches(&sess.csrf.clone()));
        assert!(!sess.csrf_matches(""));
        s.close(&id3);
        assert!(s.touch(&id3, UnixMillis(1)).is_none());
        // The table holds hashes, not ids.
        assert!(!s.open.lock().unwrap().keys().any(|k| hex::encode(k) == id));
    }

    #[test]
    fn boundary_eleventh_failure_in_a_minute_is_blocked() {
        let l = SignInLimiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..SIGN_IN_FAILURES_ALLOWED {
            assert!(!l.blocked(ip, UnixMillis(1000)));
            l.failed(ip, UnixMillis(1000));
        }
        assert!(l.blocked(ip, UnixMillis(1000)));
        assert!(!l.blocked("127.0.0.2".parse().unwrap(), UnixMillis(1000)));
        assert!(!l.blocked(ip, UnixMillis(1000 + SIGN_IN_WINDOW_MS)));
    }
}
