//! Rate limits shared between replicas: the [`SharedLimiter`] trait that a
//! backend (e.g. `vault-redis`) implements, and what the engine exchanges
//! with it (docs/redis.md).
//!
//! # Division of labour
//! The backend does the one thing that must be atomic across replicas: for
//! a chain of keys, read every window's count, decide, and count the
//! request in all of them or in none ([`SharedLimiter::admit`]). It returns
//! the counts it read ([`WindowCounts`]); the engine turns them into
//! `X-RateLimit-*` values and `Retry-After` with the same code as the
//! in-memory [`RateLimiter`](super::RateLimiter), so both give the same
//! answers for the same counts. The rule a backend must apply is the one of
//! the in-memory limiter (see its module docs):
//!
//! - windows are fixed and aligned to UTC ([`WindowBounds::at`]), computed
//!   from the `now` the engine passes (the replica's clock: replicas need
//!   roughly synchronised clocks, docs/redis.md#clocks);
//! - a request fits when, for every key of the chain and every window that
//!   key limits, `count + 1 <= limit`, and every token limit has
//!   `tokens < limit`;
//! - `max_parallel`: a key is full when it holds `max` live slots; the first
//!   full key in chain order is reported ([`SharedAdmission::parallel_full`]);
//! - a request that does not fit, or that a full key refuses (outside shadow
//!   mode), is counted nowhere and takes no slot.
//!
//! # Failure
//! A backend error is a [`LimiterError`]; the engine then refuses the call
//! with 503 `rate_limiter_unavailable` or, with [`LimiterFallback::Local`],
//! admits it against its in-memory limiter (per-replica limits).

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::key::KeyId;

use super::model::RateLimit;

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// The fixed UTC windows that contain one instant: each as
/// `(start, end)` in unix milliseconds, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowBounds {
    /// `[floor(now / 60 s) · 60 s, +60 s)`: requests and tokens per minute.
    pub minute: (i64, i64),
    /// The UTC calendar day.
    pub day: (i64, i64),
    /// The UTC calendar month.
    pub month: (i64, i64),
}

impl WindowBounds {
    /// The windows containing `now`.
    pub fn at(now: UnixMillis) -> WindowBounds {
        let m = now.0 - now.0.rem_euclid(MINUTE_MS);
        let d = now.start_of_utc_day().0;
        WindowBounds {
            minute: (m, m.saturating_add(MINUTE_MS)),
            day: (d, d.saturating_add(DAY_MS)),
            month: (now.start_of_utc_month().0, now.start_of_next_utc_month().0),
        }
    }
}

/// One key of a call's chain, as a limiter sees it: the key first, then its
/// ancestors, only those with a rate limit or a `max_parallel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLimit<'a> {
    /// The key.
    pub id: &'a KeyId,
    /// Its rate limits (each absent field is unlimited).
    pub rate: RateLimit,
    /// Its `max_parallel`, if any.
    pub max_parallel: Option<u32>,
}

impl ChainLimit<'_> {
    /// Whether the key limits anything a limiter tracks.
    pub fn is_limited(&self) -> bool {
        self.max_parallel.is_some() || has_rate_limits(&self.rate)
    }
}

pub(crate) fn has_rate_limits(r: &RateLimit) -> bool {
    r.requests_per_minute.is_some()
        || r.requests_per_day.is_some()
        || r.requests_per_month.is_some()
        || r.tokens_per_minute.is_some()
}

/// One key's counts in the windows containing `now`, as read before the
/// request being admitted. A window the key does not limit may read 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Requests in the current minute.
    pub minute: u64,
    /// Requests in the current UTC day.
    pub day: u64,
    /// Requests in the current UTC month.
    pub month: u64,
    /// Tokens settled in the current minute.
    pub tokens: u64,
    /// Live `max_parallel` slots (0 when the key has no `max_parallel`).
    pub in_flight: u64,
}

/// Slots a shared limiter holds for one call on every key of its chain
/// with a `max_parallel`. Dropping the value releases them (a backend may
/// do that asynchronously; a slot it cannot release expires on its own).
pub type HeldSlots = Box<dyn std::any::Any + Send + Sync>;

/// What [`SharedLimiter::admit`] decided, atomically for the whole chain.
pub struct SharedAdmission {
    /// The counts read before this request, one per entry of the chain
    /// passed in, in the same order.
    pub counts: Vec<WindowCounts>,
    /// Whether the request was counted in every window of every key (it
    /// fitted, and no full `max_parallel` refused it).
    pub counted: bool,
    /// The `max_parallel` of the first key in chain order that was full.
    pub parallel_full: Option<u32>,
    /// The slots taken, when a key of the chain has a `max_parallel`, none
    /// was full, and the request was counted (or, in shadow mode, was
    /// refused only by a rate limit).
    pub slots: Option<HeldSlots>,
}

impl fmt::Debug for SharedAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedAdmission")
            .field("counts", &self.counts)
            .field("counted", &self.counted)
            .field("parallel_full", &self.parallel_full)
            .field("slots", &self.slots.is_some())
            .finish()
    }
}

/// A failure of a shared limiter's backend. Messages never hold the
/// backend's address credentials (a backend must redact them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimiterError {
    /// The backend cannot be reached, or did not answer in time.
    #[error("rate limiter unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something unexpected.
    #[error("rate limiter backend error: {0}")]
    Backend(String),
}

/// What the engine does when its shared limiter fails (`[redis] on_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LimiterFallback {
    /// Refuse calls that need the limiter with 503
    /// `rate_limiter_unavailable` (fail closed; the default).
    #[default]
    Refuse,
    /// Admit them against this replica's in-memory limiter (per-replica
    /// limits), with a warning and a count in
    /// `DefaultEngine::limiter_fallbacks`.
    Local,
}

/// Rate limits and `max_parallel` slots shared between replicas.
///
/// Implementations must be cheap to call concurrently and must answer
/// within a bounded time (a timeout is an [`LimiterError::Unavailable`]):
/// the engine awaits them on every call of a limited key.
#[async_trait]
pub trait SharedLimiter: Send + Sync + fmt::Debug + 'static {
    /// Admits one request for `chain` at `now`, atomically: reads every
    /// window of every key, takes `max_parallel` slots and counts the
    /// request everywhere, or does neither (see the module docs for the
    /// rule). In `shadow` mode a full `max_parallel` does not stop the
    /// request from being counted (it takes no slot), and a request refused
    /// by a rate limit still takes its slots, as the in-memory limiter does.
    /// `chain` is never empty and holds only limited keys.
    async fn admit(
        &self,
        chain: &[ChainLimit<'_>],
        now: UnixMillis,
        shadow: bool,
    ) -> Result<SharedAdmission, LimiterError>;

    /// The counts of `chain`'s windows at `now`, counting nothing and
    /// taking no slot (for the headers of refusals made before the rate
    /// limits are reached, and for [`PolicyEngine::limit_status`]). One
    /// entry per key, in order; `in_flight` is the live slots of keys with
    /// a `max_parallel` (a backend that cannot tell reads 0).
    ///
    /// [`PolicyEngine::limit_status`]: super::PolicyEngine::limit_status
    async fn peek(
        &self,
        chain: &[ChainLimit<'_>],
        now: UnixMillis,
    ) -> Result<Vec<WindowCounts>, LimiterError>;

    /// Adds a settled call's tokens to the current minute of `keys` (the
    /// keys of its chain with a token limit). Must not block: a backend may
    /// send it in the background and lose it on failure (say so).
    fn record_tokens(&self, keys: &[KeyId], tokens: u64, now: UnixMillis);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_windows_are_aligned_to_utc() {
        // 2026-11-26T08:00:30.5Z
        let b = WindowBounds::at(UnixMillis(1_795_680_030_500));
        assert_eq!(b.minute, (1_795_680_000_000, 1_795_680_060_000));
        assert_eq!(b.day.1 - b.day.0, DAY_MS);
        assert_eq!(b.day.0, 1_795_680_000_000 - 8 * 3_600_000);
        // November has 30 days.
        assert_eq!(b.month.1 - b.month.0, 30 * DAY_MS);
        assert_eq!(
            "local",
            serde_json::to_value(LimiterFallback::Local).unwrap()
        );
    }
}
