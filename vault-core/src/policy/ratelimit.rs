//! In-memory rate limits per key: requests per minute, day and month, tokens
//! per minute, and requests in flight.
//!
//! # Semantics
//! **Fixed windows aligned to UTC**: the minute window is
//! `[floor(now / 60 s) · 60 s, +60 s)`, the day window the UTC calendar day,
//! the month window the UTC calendar month. A key with a limit of *N* per
//! window is admitted at most *N* times within one window; across a window
//! boundary up to *N* more are admitted at once (so any 60 s span can see up
//! to 2·*N* requests that straddle a minute boundary). Each key holds O(1)
//! state: one counter and one window start per window.
//!
//! A request is counted against its key **and every ancestor** in the chain;
//! each key's own limits bind on those summed counts. It is admitted only if
//! every window of every key in the chain has room, and then counted in all
//! of them at once (under one lock: no partial counting). Denied requests
//! are not counted.
//!
//! Tokens per minute are known only after a call, so they are added at
//! settlement and checked at admission: a key whose current minute already
//! holds its token limit is refused until the minute ends.
//!
//! `Retry-After` is the time until the last exhausted window ends, rounded
//! up to whole seconds: at exactly that many seconds later (and not one
//! millisecond earlier, when the request came at a whole second) the same
//! request is admitted, unless other requests took the room first.
//!
//! # Memory
//! Only keys with limits have entries. An entry whose windows have all ended
//! holds no information and is evicted by a sweep that runs when the map
//! has doubled since the last one (amortised O(1)). Beyond `max_keys` live
//! entries, the least recently used are evicted (their counts are lost, so
//! at that size limits are best effort; the default is one million keys).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::UnixMillis;
use crate::key::KeyId;

use super::engine::LimitHeaders;
use super::limits_backend::{WindowBounds as Bounds, WindowCounts, has_rate_limits as has_limits};
use super::model::RateLimit;

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    start: i64,
    count: u64,
}

impl Window {
    /// The count in the window starting at `start` (zero if this one is older).
    fn count_at(&self, start: i64) -> u64 {
        if self.start == start { self.count } else { 0 }
    }

    fn add(&mut self, start: i64, n: u64) {
        if self.start != start {
            *self = Window { start, count: 0 };
        }
        self.count = self.count.saturating_add(n);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    minute: Window,
    day: Window,
    month: Window,
    tokens: Window,
    last_seen: i64,
}

impl Counters {
    /// Whether any window still holds a count at `b`.
    fn is_live(&self, b: &Bounds) -> bool {
        self.minute.count_at(b.minute.0) > 0
            || self.day.count_at(b.day.0) > 0
            || self.month.count_at(b.month.0) > 0
            || self.tokens.count_at(b.minute.0) > 0
    }
}

/// A request limit that is exhausted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The limit, e.g. `60 requests per minute` or `200000 tokens per minute`.
    pub what: String,
    /// Whole seconds until the next admission.
    pub retry_after_secs: u64,
    /// Header values for the refusal (remaining 0, retry-after set).
    pub headers: LimitHeaders,
}

/// One request window of one key, as evaluated.
#[derive(Debug, Clone, Copy)]
struct Seen {
    limit: u64,
    /// What is left after the requests being evaluated.
    left: u64,
    end: i64,
}

/// Request and token rate limits per key, in memory. Cheap to share behind
/// an `Arc`; one short lock per admission, never held across an await.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<State>,
    max_keys: usize,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<KeyId, Counters>,
    sweep_at: usize,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new()
    }
}

const FIRST_SWEEP: usize = 1024;

impl RateLimiter {
    /// A limiter that tracks up to one million keys.
    pub fn new() -> Self {
        RateLimiter::with_max_keys(1_000_000)
    }

    /// A limiter that tracks at most `max_keys` live keys (least recently
    /// used beyond that are forgotten).
    pub fn with_max_keys(max_keys: usize) -> Self {
        RateLimiter {
            state: Mutex::new(State {
                keys: HashMap::new(),
                sweep_at: FIRST_SWEEP.min(max_keys.max(1)),
            }),
            max_keys: max_keys.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many keys have an entry (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.lock().keys.len()
    }

    /// Admits one request for `chain` (the key, then its ancestors, each
    /// with its limits) at `now`, counting it against every key, or refuses
    /// it without counting. Returns the headers of the binding window: the
    /// one with the fewest requests left (ties: the one ending first).
    pub fn admit<'a, I>(&self, chain: I, now: UnixMillis) -> Result<LimitHeaders, Exceeded>
    where
        I: IntoIterator<Item = (&'a KeyId, &'a RateLimit)> + Clone,
    {
        let b = Bounds::at(now);
        let mut state = self.lock();
        let eval = evaluate(&state, chain.clone(), &b, 1);
        if let Some(exceeded) = eval.exceeded(now) {
            return Err(exceeded);
        }
        let mut inserted = false;
        for (id, limits) in chain {
            if !has_limits(limits) {
                continue;
            }
            let c = match state.keys.get_mut(id) {
                Some(c) => c,
                None => {
                    inserted = true;
                    state.keys.entry(id.clone()).or_default()
                }
            };
            // Only limited windows count, so an entry lives no longer than
            // its longest limited window needs.
            if limits.requests_per_minute.is_some() {
                c.minute.add(b.minute.0, 1);
            }
            if limits.requests_per_day.is_some() {
                c.day.add(b.day.0, 1);
            }
            if limits.requests_per_month.is_some() {
                c.month.add(b.month.0, 1);
            }
            c.last_seen = now.0;
        }
        if inserted {
            self.maybe_sweep(&mut state, &b);
        }
        Ok(eval.headers())
    }

    /// The headers `chain` would see now, counting nothing (for refusals
    /// made before the rate limits were reached).
    pub fn peek<'a, I>(&self, chain: I, now: UnixMillis) -> LimitHeaders
    where
        I: IntoIterator<Item = (&'a KeyId, &'a RateLimit)> + Clone,
    {
        let b = Bounds::at(now);
        let state = self.lock();
        evaluate(&state, chain, &b, 0).headers()
    }

    /// `id`'s own counts in the windows containing `now` (its descendants'
    /// requests included), counting nothing; `in_flight` reads 0 (see
    /// [`InFlight`]).
    pub fn counts(&self, id: &KeyId, now: UnixMillis) -> WindowCounts {
        let b = Bounds::at(now);
        let c = self.lock().keys.get(id).copied().unwrap_or_default();
        WindowCounts {
            minute: c.minute.count_at(b.minute.0),
            day: c.day.count_at(b.day.0),
            month: c.month.count_at(b.month.0),
            tokens: c.tokens.count_at(b.minute.0),
            in_flight: 0,
        }
    }

    /// Adds a call's tokens to the current minute of every key given (the
    /// keys with a token limit in the call's chain).
    pub fn record_tokens<'a, I>(&self, keys: I, tokens: u64, now: UnixMillis)
    where
        I: IntoIterator<Item = &'a KeyId>,
    {
        let b = Bounds::at(now);
        let mut state = self.lock();
        let mut inserted = false;
        for id in keys {
            let c = match state.keys.get_mut(id) {
                Some(c) => c,
                None => {
                    inserted = true;
                    state.keys.entry(id.clone()).or_default()
                }
            };
            c.tokens.add(b.minute.0, tokens);
            c.last_seen = now.0;
        }
        if inserted {
            self.maybe_sweep(&mut state, &b);
        }
    }

    fn maybe_sweep(&self, state: &mut State, b: &Bounds) {
        if state.keys.len() < state.sweep_at {
            return;
        }
        state.keys.retain(|_, c| c.is_live(b));
        if state.keys.len() > self.max_keys {
            // Forget the least recently seen, down to 90 % of the cap.
            let keep = self.max_keys - self.max_keys / 10;
            let mut by_age: Vec<(i64, KeyId)> = state
                .keys
                .iter()
                .map(|(k, c)| (c.last_seen, k.clone()))
                .collect();
            by_age.sort_unstable();
            let drop_count = by_age.len().saturating_sub(keep);
            for (_, k) in by_age.into_iter().take(drop_count) {
                state.keys.remove(&k);
            }
        }
        state.sweep_at = (state.keys.len().saturating_mul(2))
            .max(FIRST_SWEEP)
            .min(self.max_keys);
        if state.sweep_at <= state.keys.len() {
            state.sweep_at = state.keys.len() + 1;
        }
    }
}

/// The evaluation of a chain's windows for `adding` more requests.
pub(crate) struct Evaluation {
    /// The window with the fewest requests left after this one.
    binding: Option<Seen>,
    /// The exhausted request window that ends last.
    exhausted: Option<(Seen, &'static str)>,
    /// The end of the current minute when a token limit is exhausted.
    tokens_exhausted: Option<(u64, i64)>,
}

fn evaluate<'a, I>(state: &State, chain: I, b: &Bounds, adding: u64) -> Evaluation
where
    I: IntoIterator<Item = (&'a KeyId, &'a RateLimit)>,
{
    evaluate_counts(
        chain
            .into_iter()
            .filter(|(_, l)| has_limits(l))
            .map(|(id, limits)| {
                let c = state.keys.get(id).copied().unwrap_or_default();
                let counts = WindowCounts {
                    minute: c.minute.count_at(b.minute.0),
                    day: c.day.count_at(b.day.0),
                    month: c.month.count_at(b.month.0),
                    tokens: c.tokens.count_at(b.minute.0),
                    in_flight: 0,
                };
                (limits, counts)
            }),
        b,
        adding,
    )
}

/// Evaluates `adding` more requests against each key's limits and its
/// counts in the windows `b` (the in-memory limiter's counts, or those a
/// shared limiter read): one rule, whichever limiter counted.
pub(crate) fn evaluate_counts<'a, I>(entries: I, b: &Bounds, adding: u64) -> Evaluation
where
    I: IntoIterator<Item = (&'a RateLimit, WindowCounts)>,
{
    let mut e = Evaluation {
        binding: None,
        exhausted: None,
        tokens_exhausted: None,
    };
    for (limits, c) in entries {
        if !has_limits(limits) {
            continue;
        }
        let windows = [
            (limits.requests_per_minute, c.minute, b.minute.1, "minute"),
            (limits.requests_per_day, c.day, b.day.1, "day"),
            (limits.requests_per_month, c.month, b.month.1, "month"),
        ];
        for (limit, count, end, unit) in windows {
            let Some(limit) = limit else { continue };
            if count.saturating_add(adding) > limit {
                let seen = Seen {
                    limit,
                    left: 0,
                    end,
                };
                if e.exhausted.is_none_or(|(x, _)| end > x.end) {
                    e.exhausted = Some((seen, unit));
                }
                continue;
            }
            let left = limit - count - adding;
            if e.binding
                .is_none_or(|x| left < x.left || (left == x.left && end < x.end))
            {
                e.binding = Some(Seen { limit, left, end });
            }
        }
        if let Some(tpm) = limits.tokens_per_minute
            && c.tokens >= tpm
        {
            e.tokens_exhausted = Some((tpm, b.minute.1));
        }
    }
    e
}

impl Evaluation {
    /// The headers of the binding window (defaults when nothing binds).
    pub(crate) fn headers(&self) -> LimitHeaders {
        match self.binding {
            Some(s) => LimitHeaders {
                limit: s.limit,
                remaining: s.left,
                reset_unix_secs: UnixMillis(s.end).ceil_secs(),
                retry_after_secs: None,
                budget_remaining: None,
            },
            None => LimitHeaders::default(),
        }
    }

    /// The refusal, when a window is exhausted.
    pub(crate) fn exceeded(&self, now: UnixMillis) -> Option<Exceeded> {
        let request_end = self.exhausted.map(|(s, _)| s.end);
        let token_end = self.tokens_exhausted.map(|(_, end)| end);
        let end = request_end.max(token_end)?;
        let wait_ms = end.saturating_sub(now.0).max(1);
        let retry_after_secs =
            u64::try_from(wait_ms.div_euclid(1000) + i64::from(wait_ms % 1000 != 0))
                .unwrap_or(u64::MAX);
        let what = match (self.exhausted, self.tokens_exhausted) {
            (Some((s, unit)), t) if t.is_none_or(|(_, te)| s.end >= te) => {
                format!("{} requests per {unit}", s.limit)
            }
            (_, Some((tpm, _))) => format!("{tpm} tokens per minute"),
            _ => "rate limit".to_owned(),
        };
        let mut headers = match self.exhausted {
            Some((s, _)) => LimitHeaders {
                limit: s.limit,
                remaining: 0,
                reset_unix_secs: UnixMillis(s.end).ceil_secs(),
                ..LimitHeaders::default()
            },
            None => self.headers(),
        };
        headers.retry_after_secs = Some(retry_after_secs);
        Some(Exceeded {
            what,
            retry_after_secs,
            headers,
        })
    }
}

/// Requests in flight per key, for `max_parallel`. A slot is held by an
/// [`InFlightGuard`] and released when it drops; entries at zero are removed,
/// so memory is bounded by the requests in flight.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<KeyId, u32>>>,
}

/// A held slot on every limited key of a chain; released on drop.
#[derive(Debug)]
pub struct InFlightGuard {
    counts: Arc<Mutex<HashMap<KeyId, u32>>>,
    keys: Vec<KeyId>,
}

impl InFlight {
    /// An empty tracker.
    pub fn new() -> Self {
        InFlight::default()
    }

    fn lock(counts: &Mutex<HashMap<KeyId, u32>>) -> MutexGuard<'_, HashMap<KeyId, u32>> {
        counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot on every key of `chain` that has a `max_parallel`, or
    /// none if any of them is full (returning that key's maximum). `Ok(None)`
    /// when no key in the chain limits parallelism (nothing is allocated).
    pub fn acquire<'a, I>(&self, chain: I) -> Result<Option<InFlightGuard>, u32>
    where
        I: IntoIterator<Item = (&'a KeyId, Option<u32>)> + Clone,
    {
        if chain.clone().into_iter().all(|(_, m)| m.is_none()) {
            return Ok(None);
        }
        let mut counts = Self::lock(&self.counts);
        for (id, max) in chain.clone() {
            if let Some(max) = max
                && counts.get(id).copied().unwrap_or(0) >= max
            {
                return Err(max);
            }
        }
        let mut keys = Vec::new();
        for (id, max) in chain {
            if max.is_some() {
                *counts.entry(id.clone()).or_insert(0) += 1;
                keys.push(id.clone());
            }
        }
        Ok(Some(InFlightGuard {
            counts: Arc::clone(&self.counts),
            keys,
        }))
    }

    /// Requests in flight for `id`.
    pub fn in_flight(&self, id: &KeyId) -> u32 {
        Self::lock(&self.counts).get(id).copied().unwrap_or(0)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut counts = InFlight::lock(&self.counts);
        for id in &self.keys {
            if let Some(n) = counts.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> KeyId {
        KeyId::parse(s).unwrap()
    }

    fn rpm(n: u64) -> RateLimit {
        RateLimit {
            requests_per_minute: Some(n),
            ..RateLimit::default()
        }
    }

    // 2026-11-26T08:00:00Z
    const T0: i64 = 1_795_680_000_000;

    #[test]
    fn boundary_minute_window_counts_and_resets() {
        let l = RateLimiter::new();
        let k = id("key_a");
        let r = rpm(3);
        let now = UnixMillis(T0 + 30_000);
        let h = l.admit([(&k, &r)], now).unwrap();
        assert_eq!(
            (h.limit, h.remaining, h.reset_unix_secs),
            (3, 2, (T0 + 60_000) / 1000)
        );
        l.admit([(&k, &r)], now).unwrap();
        assert_eq!(l.admit([(&k, &r)], now).unwrap().remaining, 0);
        let e = l.admit([(&k, &r)], now).unwrap_err();
        assert_eq!(e.retry_after_secs, 30);
        assert_eq!(e.headers.retry_after_secs, Some(30));
        assert_eq!(e.headers.remaining, 0);
        assert!(e.what.contains("3 requests per minute"));
        assert!(l.admit([(&k, &r)], UnixMillis(T0 + 59_999)).is_err());
        assert_eq!(
            l.admit([(&k, &r)], UnixMillis(T0 + 60_000))
                .unwrap()
                .remaining,
            2
        );
    }

    #[test]
    fn ancestors_count_descendants_requests() {
        let l = RateLimiter::new();
        let (child, parent) = (id("key_child"), id("key_parent"));
        let (cr, pr) = (rpm(10), rpm(2));
        let now = UnixMillis(T0);
        l.admit([(&child, &cr), (&parent, &pr)], now).unwrap();
        let h = l.admit([(&parent, &pr)], now).unwrap();
        assert_eq!((h.limit, h.remaining), (2, 0));
        let e = l.admit([(&child, &cr), (&parent, &pr)], now).unwrap_err();
        assert_eq!(e.headers.limit, 2);
        // The refused request was not counted against the child.
        assert_eq!(l.peek([(&child, &cr)], now).remaining, 9);
    }

    #[test]
    fn binding_window_is_the_one_with_least_left() {
        let l = RateLimiter::new();
        let k = id("key_a");
        let r = RateLimit {
            requests_per_minute: Some(100),
            requests_per_day: Some(2),
            ..RateLimit::default()
        };
        let h = l.admit([(&k, &r)], UnixMillis(T0)).unwrap();
        assert_eq!((h.limit, h.remaining), (2, 1));
        l.admit([(&k, &r)], UnixMillis(T0)).unwrap();
        let e = l.admit([(&k, &r)], UnixMillis(T0 + 120_000)).unwrap_err();
        assert_eq!(e.retry_after_secs, 86_400 - 8 * 3600 - 120);
        assert_eq!(e.headers.limit, 2);
    }

    #[test]
    fn tokens_per_minute_refuse_until_the_minute_ends() {
        let l = RateLimiter::new();
        let k = id("key_a");
        let r = RateLimit {
            tokens_per_minute: Some(1000),
            ..RateLimit::default()
        };
        l.admit([(&k, &r)], UnixMillis(T0)).unwrap();
        l.record_tokens([&k], 999, UnixMillis(T0 + 1000));
        l.admit([(&k, &r)], UnixMillis(T0 + 2000)).unwrap();
        l.record_tokens([&k], 1, UnixMillis(T0 + 3000));
        let e = l.admit([(&k, &r)], UnixMillis(T0 + 10_000)).unwrap_err();
        assert_eq!(e.retry_after_secs, 50);
        assert!(e.what.contains("tokens per minute"));
        l.admit([(&k, &r)], UnixMillis(T0 + 60_000)).unwrap();
    }

    #[test]
    fn lifecycle_idle_entries_are_evicted() {
        let l = RateLimiter::with_max_keys(5000);
        let r = rpm(1);
        for i in 0..3000 {
            let k = id(&format!("key_{i}"));
            l.admit([(&k, &r)], UnixMillis(T0 + i64::from(i) * 100))
                .unwrap();
        }
        // Sweeps ran as the map grew: entries of ended minutes are gone.
        assert!(l.tracked_keys() < 2100, "{}", l.tracked_keys());
        let capped = RateLimiter::with_max_keys(100);
        for i in 0..1000 {
            let k = id(&format!("key_{i}"));
            capped.admit([(&k, &r)], UnixMillis(T0)).unwrap();
        }
        assert!(capped.tracked_keys() <= 101, "{}", capped.tracked_keys());
        // Keys without limits never get an entry.
        let k = id("key_free");
        l.admit([(&k, &RateLimit::default())], UnixMillis(T0))
            .unwrap();
        assert_eq!(
            l.peek([(&k, &RateLimit::default())], UnixMillis(T0)),
            LimitHeaders::default()
        );
    }

    #[test]
    fn in_flight_slots_release_on_drop() {
        let f = InFlight::new();
        let (a, b) = (id("key_a"), id("key_b"));
        assert!(f.acquire([(&a, None)]).unwrap().is_none());
        let g1 = f.acquire([(&a, Some(2)), (&b, Some(1))]).unwrap().unwrap();
        assert_eq!(f.acquire([(&a, Some(2)), (&b, Some(1))]).unwrap_err(), 1);
        let g2 = f.acquire([(&a, Some(2))]).unwrap().unwrap();
        assert_eq!(f.acquire([(&a, Some(2))]).unwrap_err(), 2);
        drop(g1);
        assert_eq!(f.in_flight(&a), 1);
        assert_eq!(f.in_flight(&b), 0);
        drop(g2);
        assert_eq!(f.in_flight(&a), 0);
        assert!(InFlight::lock(&f.counts).is_empty());
    }
}
