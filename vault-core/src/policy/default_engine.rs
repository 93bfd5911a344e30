//! [`DefaultEngine`]: the built-in [`PolicyEngine`].
//!
//! `check` evaluates, in this order, and stops at the first refusal:
//! 1. the status of every key in the chain (a revoked or expired ancestor
//!    disables its descendants) → `key_revoked` / `key_expired`;
//! 2. the `chat:write` scope of every key in the chain;
//! 3. provider, 4. endpoint (method + canonical path), 5. model allowlists
//!    of every key in the chain (so a child inherits its parent's
//!    restrictions even where its own policy is silent); a request without a
//!    model under a model allowlist is `invalid_request`;
//! 6. `max_request_chars` of every key against the body's characters;
//! 7. `max_parallel` of every key (descendants' calls count for ancestors);
//!    the slot is held by the grant and released when it drops;
//! 8. rate limits of every key (see [`RateLimiter`]; with
//!    [`DefaultEngine::with_shared_limiter`], steps 7 and 8 are one call to
//!    a [`SharedLimiter`] shared between replicas, docs/redis.md);
//! 9. the budget of the nearest key in the chain that has one (normally the
//!    key itself: children of budgeted parents carry their own carve-out):
//!    the call's most possible cost is reserved in the store (see below).
//!
//! Steps 1–2 are always enforced. In shadow mode (`shadow: true` on the
//! key) steps 3–9 are evaluated but not enforced: the first would-be refusal
//! is returned in [`Grant::shadow_denial`] and the call goes ahead (a budget
//! that cannot cover it then holds no reservation). A store failure while
//! reserving refuses the call even in shadow mode (fail closed).
//!
//! # Reservations
//! The reservation is an upper bound of what the call can cost:
//! - input: the body's UTF-8 bytes plus each image's ceiling
//!   ([`RequestFacts::input_tokens_bound`]; a token covers at least one
//!   byte), at most the model's context window, or the whole context window
//!   when the body refers to input it does not carry
//!   ([`RequestFacts::input_unbounded`]), at the dearest input token class
//!   ([`ModelPrice::input_ceiling_per_million`]);
//! - output: the output limit (the client's, else the model's maximum
//!   output) times the output multiplier (`n`, `best_of`, `candidateCount`,
//!   `num_generations`; 0 for embeddings), at the dearest output class.
//!
//! When the client left the output limit open, the store grants as much as
//! fits but at least the input bound plus a small minimum output (16 tokens
//! by default); when it grants less than everything, the grant carries
//! [`Grant::clamp_output_tokens`], the output per candidate the reservation
//! affords, for the proxy to set in the request. A limit the client set is
//! never lowered unless the budget opts in
//! ([`Budget::clamp_explicit_limits`](super::model::Budget)): the call is
//! refused `budget_exceeded` instead. A model without a price (and no
//! fallback) is refused for budgeted keys; budgeted keys must name a model
//! on anything but `GET`/`HEAD` (which are not billed), and cannot make
//! multipart uploads (which cannot be priced in advance).
//!
//! # Settlement (docs/budgets.md#settlement)
//! `Metered` calls cost their tokens at the model's price, each token class
//! at its own (rounded up); `NotSent` and `ErrorReleased` calls cost nothing
//! and release the reservation; `Unmetered` calls cost the whole
//! reservation (a key without a budget: the most the call could cost).
//! Tokens feed the tokens-per-minute limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::{SharedClock, UnixMillis};
use crate::denial::Denial;
use crate::key::KeyId;
use crate::meter::Usage;
use crate::money::Micros;
use crate::pricing::{ModelPrice, PriceTable};
use crate::provider::Provider;
use crate::record::{KeyRecord, KeyStatus, Settlement};
use crate::scope::Permission;
use crate::store::{KeyStore, StoreError};

use super::engine::{
    BudgetStatus, CallOutcome, Charge, Grant, LimitHeaders, LimitStatus, LimitStatusError,
    PolicyEngine, RequestFacts, WindowKind, WindowStatus,
};
use super::limits_backend::{
    ChainLimit, HeldSlots, LimiterError, LimiterFallback, SharedLimiter, WindowBounds, WindowCounts,
};
use super::model::BudgetPeriod;
use super::ratelimit::{Exceeded, InFlight, InFlightGuard, RateLimiter, evaluate_counts};

/// The default reservation lifetime: a call still unsettled after it is
/// charged in full by the store's sweep.
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(15 * 60);

/// The least output a partial reservation must afford.
pub const DEFAULT_MIN_OUTPUT_TOKENS: u64 = 16;

/// The built-in policy engine: allowlists, sizes, concurrency and rate
/// limits in memory, budgets through the [`KeyStore`].
pub struct DefaultEngine {
    store: Arc<dyn KeyStore>,
    prices: Arc<PriceTable>,
    clock: SharedClock,
    limiter: Arc<RateLimiter>,
    in_flight: InFlight,
    /// Limits shared between replicas; `None`: the in-memory ones above.
    shared: Option<Shared>,
    reservation_ttl_ms: i64,
    min_output_tokens: u64,
    clamp_output: bool,
    /// Settlements the store could not take while it was unavailable.
    owed: super::owed::Owed,
}

impl std::fmt::Debug for DefaultEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultEngine")
            .field("reservation_ttl_ms", &self.reservation_ttl_ms)
            .field("min_output_tokens", &self.min_output_tokens)
            .field("clamp_output", &self.clamp_output)
            .field("shared_limiter", &self.shared.as_ref().map(|s| &s.backend))
            .finish_non_exhaustive()
    }
}

/// A shared limiter and what the engine does when it fails.
struct Shared {
    backend: Arc<dyn SharedLimiter>,
    on_error: LimiterFallback,
    /// Calls limited locally because the backend failed.
    fallbacks: AtomicU64,
    /// Calls refused because the backend failed.
    unavailable: AtomicU64,
    /// When the last failure was logged (unix ms), so a backend that is
    /// down logs once per interval, not once per call.
    last_warned: AtomicI64,
}

/// At most one warning per this interval while a shared limiter fails.
const FAILURE_LOG_INTERVAL_MS: i64 = 10_000;

/// A `max_parallel` slot held for a call: released on drop. The fields are
/// held for their `Drop`, never read.
#[allow(dead_code)]
enum Slot {
    Local(InFlightGuard),
    Shared(HeldSlots),
}

/// Steps 7 and 8 of a check, whichever limiter took them.
struct LimitStep {
    slot: Option<Slot>,
    /// A full `max_parallel` (its maximum) and the headers to refuse with.
    parallel_full: Option<(u32, LimitHeaders)>,
    /// The rate limits' verdict (`Ok` with default headers when a full
    /// `max_parallel` refused the call first).
    rate: Result<LimitHeaders, Exceeded>,
}

/// The keys of `chain` a limiter tracks, with their limits.
fn chain_limits(chain: &[Arc<KeyRecord>]) -> Vec<ChainLimit<'_>> {
    chain
        .iter()
        .map(|k| ChainLimit {
            id: &k.id,
            rate: k.policy.rate_limit.unwrap_or_default(),
            max_parallel: k.policy.max_parallel,
        })
        .filter(ChainLimit::is_limited)
        .collect()
}

/// The limits `c` sets, with the counts `n` read at the windows `b`.
fn window_statuses(c: &ChainLimit<'_>, n: WindowCounts, b: &WindowBounds) -> Vec<WindowStatus> {
    let r = &c.rate;
    let windows = [
        (
            WindowKind::RequestsPerMinute,
            r.requests_per_minute,
            n.minute,
            Some(b.minute.1),
        ),
        (
            WindowKind::RequestsPerDay,
            r.requests_per_day,
            n.day,
            Some(b.day.1),
        ),
        (
            WindowKind::RequestsPerMonth,
            r.requests_per_month,
            n.month,
            Some(b.month.1),
        ),
        (
            WindowKind::TokensPerMinute,
            r.tokens_per_minute,
            n.tokens,
            Some(b.minute.1),
        ),
        (
            WindowKind::MaxParallel,
            c.max_parallel.map(u64::from),
            n.in_flight,
            None,
        ),
    ];
    windows
        .into_iter()
        .filter_map(|(kind, limit, used, end)| {
            Some(WindowStatus {
                key: c.id.clone(),
                kind,
                limit: limit?,
                used,
                resets_at: end.map(UnixMillis),
            })
        })
        .collect()
}

/// When a budget period holding `now` ends; `None` for `total`.
fn period_end(period: BudgetPeriod, now: UnixMillis) -> Option<UnixMillis> {
    match period {
        BudgetPeriod::Total => None,
        BudgetPeriod::Daily => Some(now.start_of_utc_day().plus_millis(86_400_000)),
        BudgetPeriod::Monthly => Some(now.start_of_next_utc_month()),
    }
}

/// What the engine remembers about a granted call until it is settled; held
/// in [`Grant::slot`], whose drop releases the `max_parallel` slot.
struct Ticket {
    provider: Provider,
    price: Option<ModelPrice>,
    /// What the call can cost at most (0 when unpriced): charged when a call
    /// that was sent meters nothing and holds no reservation, so an upstream
    /// that omits usage never makes an unbudgeted call free.
    worst_case: Micros,
    token_keys: Vec<KeyId>,
    _in_flight: Option<Slot>,
}

/// The cost bounds of one call at one price (see the module docs).
struct Estimate {
    prompt_cost: Micros,
    /// The output limit per candidate.
    output_tokens: u64,
    /// The price of one more token of every candidate: the output ceiling
    /// times the multiplier.
    output_price: Micros,
    want: Micros,
    at_least: Micros,
}

impl Estimate {
    /// With `clamp`, a partial reservation may lower the output limit.
    fn new(price: &ModelPrice, facts: &RequestFacts<'_>, min_output: u64, clamp: bool) -> Self {
        let prompt_tokens = if facts.input_unbounded {
            price.context_window
        } else {
            facts.input_tokens_bound.min(price.context_window)
        };
        let prompt_cost = Micros::for_tokens(
            prompt_tokens,
            price.input_ceiling_per_million(facts.provider),
        );
        let output_tokens = facts.max_output_tokens.unwrap_or(price.max_output_tokens);
        let output_price = Micros(
            price
                .output_ceiling_per_million()
                .0
                .saturating_mul(facts.output_multiplier),
        );
        let want = prompt_cost.saturating_add(Micros::for_tokens(output_tokens, output_price));
        let clamp = clamp && facts.output_multiplier > 0;
        let at_least = if clamp {
            prompt_cost.saturating_add(Micros::for_tokens(
                min_output.min(output_tokens),
                output_price,
            ))
        } else {
            want
        };
        Estimate {
            prompt_cost,
            output_tokens,
            output_price,
            want,
            at_least,
        }
    }

    /// The output tokens per candidate `granted` affords after the input.
    fn affordable_output(&self, granted: Micros) -> Option<u64> {
        granted
            .saturating_sub(self.prompt_cost)
            .tokens_affordable(self.output_price)
            .map(|t| t.min(self.output_tokens))
    }
}

fn period_name(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Total => "total",
        BudgetPeriod::Daily => "daily",
        BudgetPeriod::Monthly => "monthly",
    }
}

fn whose(i: usize) -> &'static str {
    if i == 0 {
        "this key"
    } else {
        "a parent of this key"
    }
}

fn join<T>(items: &[T], f: impl Fn(&T) -> &str) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

/// The first refusal of the allowlists and the size limit, across the chain.
fn allowlist_denial(chain: &[Arc<KeyRecord>], facts: &RequestFacts<'_>) -> Option<Denial> {
    for (i, k) in chain.iter().enumerate() {
        if let Some(list) = &k.policy.providers
            && !list.contains(&facts.provider)
        {
            return Some(Denial::ProviderNotAllowed(format!(
                "provider {} is not allowed for {}; allowed: {}",
                facts.provider,
                whose(i),
                join(list, |p| p.as_str())
            )));
        }
    }
    for (i, k) in chain.iter().enumerate() {
        if let Some(list) = &k.policy.endpoints
            && !list.iter().any(|r| r.matches(facts.method, facts.path))
        {
            return Some(Denial::EndpointNotAllowed(format!(
                "endpoint {} {} is not allowed for {}; allowed: {}",
                facts.method,
                shown(facts.path),
                whose(i),
                join(list, |r| r.as_str())
            )));
        }
    }
    for (i, k) in chain.iter().enumerate() {
        if let Some(list) = &k.policy.models {
            match facts.model {
                None => {
                    return Some(Denial::InvalidRequest(format!(
                        "the request names no model, and {} allows only: {}",
                        whose(i),
                        join(list, |g| g.as_str())
                    )));
                }
                Some(m) if !list.iter().any(|g| g.matches(m)) => {
                    return Some(Denial::ModelNotAllowed(format!(
                        "model {} is not allowed for {}; allowed: {}",
                        shown(m),
                        whose(i),
                        join(list, |g| g.as_str())
                    )));
                }
                Some(_) => {}
            }
        }
    }
    for (i, k) in chain.iter().enumerate() {
        if let Some(max) = k.policy.max_request_chars
            && facts.body_chars > max
        {
            return Some(Denial::RequestTooLarge(format!(
                "the request body has {} characters; {} allows at most {max}",
                facts.body_chars,
                whose(i)
            )));
        }
    }
    None
}

/// Client-supplied text in a message, bounded.
fn shown(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

impl DefaultEngine {
    /// An engine over `store` (budgets), `prices` and `clock`, with a fresh
    /// in-memory rate limiter. Cheap: no I/O, no background task.
    pub fn new(store: Arc<dyn KeyStore>, prices: Arc<PriceTable>, clock: SharedClock) -> Self {
        DefaultEngine {
            store,
            prices,
            clock,
            limiter: Arc::new(RateLimiter::new()),
            in_flight: InFlight::new(),
            shared: None,
            reservation_ttl_ms: i64::try_from(DEFAULT_RESERVATION_TTL.as_millis())
                .unwrap_or(i64::MAX),
            min_output_tokens: DEFAULT_MIN_OUTPUT_TOKENS,
            clamp_output: true,
            owed: super::owed::Owed::default(),
        }
    }

    /// How long a reservation is held before the store's sweep charges it
    /// in full (default 15 minutes; should exceed the longest call).
    pub fn with_reservation_ttl(mut self, ttl: Duration) -> Self {
        self.reservation_ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// The least output a partial reservation must afford (default 16).
    pub fn with_min_output_tokens(mut self, tokens: u64) -> Self {
        self.min_output_tokens = tokens;
        self
    }

    /// Whether a partial reservation may be granted with a clamped output
    /// limit (default on). Off: the whole reservation fits or the call is
    /// refused.
    pub fn with_output_clamping(mut self, on: bool) -> Self {
        self.clamp_output = on;
        self
    }

    /// Shares a rate limiter (e.g. between engines of one process).
    pub fn with_rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// Takes rate limits and `max_parallel` from `limiter`, shared between
    /// replicas (docs/redis.md), instead of this process's memory: one
    /// `admit` per call of a limited key, none for a key without limits.
    /// When it fails, `on_error` decides: refuse the call (503
    /// `rate_limiter_unavailable`) or limit it in memory, per replica.
    pub fn with_shared_limiter(
        mut self,
        limiter: Arc<dyn SharedLimiter>,
        on_error: LimiterFallback,
    ) -> Self {
        self.shared = Some(Shared {
            backend: limiter,
            on_error,
            fallbacks: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            last_warned: AtomicI64::new(i64::MIN),
        });
        self
    }

    /// The in-memory rate limiter (with a shared limiter: the fallback).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// How many calls were limited in memory because the shared limiter
    /// failed ([`LimiterFallback::Local`]); 0 without a shared limiter.
    pub fn limiter_fallbacks(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.fallbacks.load(Ordering::Relaxed))
    }

    /// How many calls were refused 503 `rate_limiter_unavailable` because
    /// the shared limiter failed; 0 without a shared limiter.
    pub fn limiter_unavailable(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.unavailable.load(Ordering::Relaxed))
    }

    /// The in-flight tracker for `max_parallel`.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }
}

#[async_trait]
impl PolicyEngine for DefaultEngine {
    async fn check(
        &self,
        chain: &[Arc<KeyRecord>],
        facts: &RequestFacts<'_>,
    ) -> Result<Grant, (Denial, LimitHeaders)> {
        let now = self.clock.now();
        let Some(key) = chain.first() else {
            tracing::error!("policy check called with an empty key chain");
            return Err((Denial::Internal, LimitHeaders::default()));
        };
        for k in chain {
            match k.status_at(now) {
                KeyStatus::Active => {}
                KeyStatus::Revoked => {
                    return Err((Denial::KeyRevoked, self.peek(chain, now).await));
                }
                KeyStatus::Expired => {
                    return Err((Denial::KeyExpired, self.peek(chain, now).await));
                }
            }
        }
        if let Some(i) = chain
            .iter()
            .position(|k| !k.scopes.allows(Permission::ChatWrite))
        {
            let d = Denial::PermissionDenied(format!(
                "{} lacks the chat:write scope that proxied calls need",
                whose(i)
            ));
            return Err((d, self.peek(chain, now).await));
        }

        let shadow = key.policy.shadow;
        let mut shadow_denial: Option<Denial> = None;
        // Refuses with `headers`, or in shadow mode records the first refusal.
        macro_rules! refuse {
            ($denial:expr, $headers:expr) => {{
                let denial = $denial;
                if !shadow {
                    return Err((denial, $headers));
                }
                shadow_denial.get_or_insert(denial);
            }};
        }

        if let Some(d) = allowlist_denial(chain, facts) {
            refuse!(d, self.peek(chain, now).await);
        }

        let step = match &self.shared {
            None => self.local_limits(chain, now, shadow),
            Some(shared) => self.shared_limits(shared, chain, now, shadow).await?,
        };
        let in_flight = step.slot;
        if let Some((max, headers)) = step.parallel_full {
            refuse!(
                Denial::RateLimited {
                    message: format!(
                        "at most {max} requests may be in flight at once for this key"
                    ),
                    retry_after_secs: 1,
                },
                headers
            );
        }

        let mut headers = match step.rate {
            Ok(h) => h,
            Err(e) => {
                let message = format!(
                    "rate limit of {} exceeded; retry in {} s",
                    e.what, e.retry_after_secs
                );
                refuse!(
                    Denial::RateLimited {
                        message,
                        retry_after_secs: e.retry_after_secs,
                    },
                    e.headers
                );
                LimitHeaders {
                    retry_after_secs: None,
                    ..e.headers
                }
            }
        };

        let price = facts
            .model
            .and_then(|m| self.prices.price_for(facts.provider, m))
            .copied();
        let mut reservation = None;
        let mut clamp_output_tokens = None;
        let budgeted = chain
            .iter()
            .find_map(|k| k.policy.budget.map(|b| (&k.id, b)));
        if let Some((budget_key, budget)) = budgeted {
            match (facts.model, price) {
                _ if facts.multipart => refuse!(
                    Denial::InvalidRequest(
                        "multipart uploads (audio, files) cannot be priced in advance, so keys with a budget cannot make them; use a key without a budget"
                            .to_owned()
                    ),
                    headers
                ),
                (None, _) if matches!(facts.method, "GET" | "HEAD") => {}
                (None, _) => refuse!(
                    Denial::InvalidRequest(
                        "this key has a budget, so the request must name a model that can be priced"
                            .to_owned()
                    ),
                    headers
                ),
                (Some(m), None) => refuse!(
                    Denial::ModelNotAllowed(format!(
                        "model {} has no price, and this key has a budget; the operator must add it to vaultgate.toml as [prices.\"{}/{}\"] with input, output and max_output_tokens (USD per million tokens)",
                        shown(m),
                        facts.provider,
                        shown(m)
                    )),
                    headers
                ),
                (Some(_), Some(p)) => {
                    let line = budget.line(budget_key.clone(), now);
                    // Only a limit the client left open is lowered, unless
                    // the budget opts in to lowering explicit ones too.
                    let clamp = self.clamp_output
                        && (facts.max_output_tokens.is_none() || budget.clamp_explicit_limits);
                    let est = Estimate::new(&p, facts, self.min_output_tokens, clamp);
                    let expires = now.plus_millis(self.reservation_ttl_ms);
                    // One store call: the reservation and what the line has
                    // left once it is held.
                    match self
                        .store
                        .reserve_reporting(&line, est.want, est.at_least, now, expires)
                        .await
                    {
                        Ok((r, remaining)) => {
                            if r.amount < est.want {
                                clamp_output_tokens = est.affordable_output(r.amount);
                            }
                            headers.budget_remaining = remaining;
                            reservation = Some(r);
                        }
                        Err(StoreError::BudgetExceeded { remaining }) => {
                            headers.budget_remaining = Some(remaining);
                            let hint = match (facts.max_output_tokens, est.at_least == est.want) {
                                (Some(n), true) => format!(
                                    " (with its output limit of {n} tokens{}; lower the limit to fit)",
                                    if facts.output_multiplier > 1 {
                                        format!(" × {} outputs", facts.output_multiplier)
                                    } else {
                                        String::new()
                                    }
                                ),
                                _ => String::new(),
                            };
                            refuse!(
                                Denial::BudgetExceeded(format!(
                                    "budget exceeded: {remaining} of the {} {} budget remains, and this call needs at least {}{hint}",
                                    budget.limit,
                                    period_name(budget.period),
                                    est.at_least
                                )),
                                headers
                            );
                        }
                        Err(e) => {
                            tracing::error!(error = %e, key = %budget_key, "budget reservation failed; refusing the call");
                            return Err((Denial::for_store_error(&e), headers));
                        }
                    }
                }
            }
        }

        let token_keys: Vec<KeyId> = chain
            .iter()
            .filter(|k| {
                k.policy
                    .rate_limit
                    .is_some_and(|r| r.tokens_per_minute.is_some())
            })
            .map(|k| k.id.clone())
            .collect();
        let worst_case = price.map_or(Micros::ZERO, |p| {
            Estimate::new(&p, facts, self.min_output_tokens, false).want
        });
        let ticket = Ticket {
            provider: facts.provider,
            price,
            worst_case,
            token_keys,
            _in_flight: in_flight,
        };
        Ok(Grant {
            key: key.id.clone(),
            project: key.project.clone(),
            reservation,
            clamp_output_tokens,
            shadow_denial,
            headers,
            admitted_at: now,
            slot: Some(Box::new(ticket)),
        })
    }

    async fn limit_status(
        &self,
        chain: &[Arc<KeyRecord>],
    ) -> Result<LimitStatus, LimitStatusError> {
        let now = self.clock.now();
        let limited = chain_limits(chain);
        let counts = self.peek_counts(&limited, now).await?;
        let b = WindowBounds::at(now);
        let windows = limited
            .iter()
            .zip(counts)
            .flat_map(|(c, n)| window_statuses(c, n, &b))
            .collect();
        let budget = match chain
            .iter()
            .find_map(|k| k.policy.budget.map(|b| (&k.id, b)))
        {
            None => None,
            Some((key, budget)) => {
                let line = budget.line(key.clone(), now);
                let usage = self.store.budget_usage(&line, now).await?;
                Some(BudgetStatus {
                    key: key.clone(),
                    limit: budget.limit,
                    period: budget.period,
                    settled: usage.settled,
                    reserved: usage.reserved,
                    remaining: usage.remaining(budget.limit),
                    resets_at: period_end(budget.period, now),
                })
            }
        };
        Ok(LimitStatus { windows, budget })
    }

    async fn settle(&self, grant: Grant, outcome: CallOutcome, model: Option<&str>) -> Charge {
        let (charge, spend) = self.charge(grant, outcome, model, self.clock.now());
        self.record_spend(vec![spend]).await;
        charge
    }

    async fn settle_many(&self, calls: Vec<(Grant, CallOutcome, Option<&str>)>) -> Vec<Charge> {
        let now = self.clock.now();
        let mut charges = Vec::with_capacity(calls.len());
        let mut spends = Vec::with_capacity(calls.len());
        for (grant, outcome, model) in calls {
            let (charge, spend) = self.charge(grant, outcome, model, now);
            charges.push(charge);
            spends.push(spend);
        }
        // One store transaction for the batch's reservations.
        self.record_spend(spends).await;
        charges
    }

    async fn write_owed(&self) -> Result<(), StoreError> {
        self.owed
            .write(self.store.as_ref(), Vec::new(), Vec::new())
            .await
    }
}

impl DefaultEngine {
    /// What a granted call costs, and the settlement of its reservation
    /// (if it holds one) for the store. Feeds the token rate limits.
    fn charge(
        &self,
        mut grant: Grant,
        outcome: CallOutcome,
        model: Option<&str>,
        now: UnixMillis,
    ) -> (Charge, Spend) {
        let ticket = grant
            .slot
            .take()
            .and_then(|slot| slot.downcast::<Ticket>().ok());
        let held = grant
            .reservation
            .as_ref()
            .map_or(Micros::ZERO, |r| r.amount);
        let (usage, cost) = match outcome {
            CallOutcome::NotSent | CallOutcome::ErrorReleased => (Usage::default(), Micros::ZERO),
            CallOutcome::Unmetered if grant.reservation.is_some() => (Usage::default(), held),
            CallOutcome::Unmetered => (
                Usage::default(),
                ticket.as_ref().map_or(Micros::ZERO, |t| t.worst_case),
            ),
            CallOutcome::Metered(usage) => {
                let price = ticket.as_ref().and_then(|t| {
                    model
                        .and_then(|m| self.prices.lookup(t.provider, m).copied())
                        .or(t.price)
                });
                let cost = match price {
                    Some(p) => p.cost_of(&usage),
                    None => held,
                };
                (usage, cost)
            }
        };
        let spend = match grant.reservation.take() {
            Some(reservation) => Spend::Reserved(Settlement {
                reservation,
                actual: cost,
            }),
            None if cost > Micros::ZERO => Spend::Unreserved(grant.key.clone(), cost),
            None => Spend::Nothing,
        };
        if let Some(t) = &ticket
            && !t.token_keys.is_empty()
        {
            let tokens = usage.tokens_in.saturating_add(usage.tokens_out);
            match &self.shared {
                None => self.limiter.record_tokens(t.token_keys.iter(), tokens, now),
                Some(shared) => {
                    shared.backend.record_tokens(&t.token_keys, tokens, now);
                    // The fallback then knows this minute's tokens too.
                    if shared.on_error == LimiterFallback::Local {
                        self.limiter.record_tokens(t.token_keys.iter(), tokens, now);
                    }
                }
            }
        }
        let charge = Charge { cost, usage };
        (charge, spend)
    }

    /// Steps 7 and 8 in this process's memory: a `max_parallel` slot, then
    /// the rate limits (docs/policy.md#the-order-of-the-checks).
    fn local_limits(&self, chain: &[Arc<KeyRecord>], now: UnixMillis, shadow: bool) -> LimitStep {
        let limits = || {
            chain
                .iter()
                .filter_map(|k| k.policy.rate_limit.as_ref().map(|r| (&k.id, r)))
        };
        let (slot, parallel_full) = match self
            .in_flight
            .acquire(chain.iter().map(|k| (&k.id, k.policy.max_parallel)))
        {
            Ok(guard) => (guard.map(Slot::Local), None),
            Err(max) => {
                let mut headers = self.limiter.peek(limits(), now);
                headers.retry_after_secs = Some(1);
                (None, Some((max, headers)))
            }
        };
        if parallel_full.is_some() && !shadow {
            // Refused before the rate limits: nothing is counted.
            return LimitStep {
                slot,
                parallel_full,
                rate: Ok(LimitHeaders::default()),
            };
        }
        let rate = self.limiter.admit(limits(), now);
        LimitStep {
            slot,
            parallel_full,
            rate,
        }
    }

    /// Steps 7 and 8 in one call to the shared limiter (none for a chain
    /// without limits); on its failure, `on_error` decides.
    async fn shared_limits(
        &self,
        shared: &Shared,
        chain: &[Arc<KeyRecord>],
        now: UnixMillis,
        shadow: bool,
    ) -> Result<LimitStep, (Denial, LimitHeaders)> {
        let limited = chain_limits(chain);
        if limited.is_empty() {
            return Ok(LimitStep {
                slot: None,
                parallel_full: None,
                rate: Ok(LimitHeaders::default()),
            });
        }
        let admission = match shared.backend.admit(&limited, now, shadow).await {
            Ok(a) if a.counts.len() == limited.len() => a,
            Ok(a) => {
                let e = LimiterError::Backend(format!(
                    "{} counts for a chain of {}",
                    a.counts.len(),
                    limited.len()
                ));
                return self.limiter_failed(shared, chain, now, shadow, &e);
            }
            Err(e) => return self.limiter_failed(shared, chain, now, shadow, &e),
        };
        let b = WindowBounds::at(now);
        let entries = || {
            limited
                .iter()
                .map(|c| &c.rate)
                .zip(admission.counts.iter().copied())
        };
        let parallel_full = admission.parallel_full.map(|max| {
            let mut headers = evaluate_counts(entries(), &b, 0).headers();
            headers.retry_after_secs = Some(1);
            (max, headers)
        });
        if parallel_full.is_some() && !shadow {
            return Ok(LimitStep {
                slot: None,
                parallel_full,
                rate: Ok(LimitHeaders::default()),
            });
        }
        let eval = evaluate_counts(entries(), &b, 1);
        let rate = match (admission.counted, eval.exceeded(now)) {
            (true, None) => Ok(eval.headers()),
            (false, Some(exceeded)) => Err(exceeded),
            (counted, _) => {
                // The backend and the engine disagree on the same counts:
                // a backend bug. Trust neither; refuse.
                tracing::error!(
                    counted,
                    "the shared rate limiter's verdict contradicts its counts"
                );
                return Err((Denial::Internal, eval.headers()));
            }
        };
        Ok(LimitStep {
            slot: admission.slots.map(Slot::Shared),
            parallel_full,
            rate,
        })
    }

    /// The shared limiter failed: refuse (503), or limit in memory.
    fn limiter_failed(
        &self,
        shared: &Shared,
        chain: &[Arc<KeyRecord>],
        now: UnixMillis,
        shadow: bool,
        error: &LimiterError,
    ) -> Result<LimitStep, (Denial, LimitHeaders)> {
        let last = shared.last_warned.load(Ordering::Relaxed);
        let log = now.0.saturating_sub(last) >= FAILURE_LOG_INTERVAL_MS
            && shared
                .last_warned
                .compare_exchange(last, now.0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        match shared.on_error {
            LimiterFallback::Local => {
                shared.fallbacks.fetch_add(1, Ordering::Relaxed);
                if log {
                    tracing::warn!(%error, fallbacks = shared.fallbacks.load(Ordering::Relaxed), "the shared rate limiter failed; limiting calls per replica until it recovers (on_error = \"local\")");
                }
                Ok(self.local_limits(chain, now, shadow))
            }
            _ => {
                shared.unavailable.fetch_add(1, Ordering::Relaxed);
                if log {
                    tracing::warn!(%error, refused = shared.unavailable.load(Ordering::Relaxed), "the shared rate limiter failed; refusing calls of limited keys until it recovers (on_error = \"closed\")");
                }
                let headers = LimitHeaders {
                    retry_after_secs: Some(1),
                    ..LimitHeaders::default()
                };
                Err((Denial::RateLimiterUnavailable, headers))
            }
        }
    }

    /// The headers of a refusal made before the rate limits: what the
    /// chain's windows hold now, counting nothing. With a shared limiter
    /// that is one read (none for a chain without rate limits); when it
    /// fails, the in-memory limiter's view.
    async fn peek(&self, chain: &[Arc<KeyRecord>], now: UnixMillis) -> LimitHeaders {
        let limits = || {
            chain
                .iter()
                .filter_map(|k| k.policy.rate_limit.as_ref().map(|r| (&k.id, r)))
        };
        let Some(shared) = &self.shared else {
            return self.limiter.peek(limits(), now);
        };
        let limited: Vec<ChainLimit<'_>> = chain_limits(chain)
            .into_iter()
            .filter(|c| super::limits_backend::has_rate_limits(&c.rate))
            .collect();
        if limited.is_empty() {
            return LimitHeaders::default();
        }
        match shared.backend.peek(&limited, now).await {
            Ok(counts) if counts.len() == limited.len() => evaluate_counts(
                limited.iter().map(|c| &c.rate).zip(counts),
                &WindowBounds::at(now),
                0,
            )
            .headers(),
            // The call is refused anyway; its headers are best effort.
            _ => self.limiter.peek(limits(), now),
        }
    }

    /// The counts of `limited` at `now`, one per entry, counting nothing:
    /// one read of the shared limiter (none for an empty chain), else this
    /// process's limiter and in-flight slots.
    async fn peek_counts(
        &self,
        limited: &[ChainLimit<'_>],
        now: UnixMillis,
    ) -> Result<Vec<WindowCounts>, LimiterError> {
        match &self.shared {
            _ if limited.is_empty() => Ok(Vec::new()),
            Some(shared) => {
                let counts = shared.backend.peek(limited, now).await?;
                if counts.len() != limited.len() {
                    return Err(LimiterError::Backend(format!(
                        "{} counts for a chain of {}",
                        counts.len(),
                        limited.len()
                    )));
                }
                Ok(counts)
            }
            None => Ok(limited
                .iter()
                .map(|c| WindowCounts {
                    in_flight: u64::from(self.in_flight.in_flight(c.id)),
                    ..self.limiter.counts(c.id, now)
                })
                .collect()),
        }
    }

    /// Writes a batch's spend: reservations settled in one store call, and
    /// unbudgeted keys' costs added to their spend in another.
    async fn record_spend(&self, spends: Vec<Spend>) {
        let mut settlements = Vec::new();
        let mut unreserved = Vec::new();
        for s in spends {
            match s {
                Spend::Reserved(settlement) => settlements.push(settlement),
                Spend::Unreserved(key, cost) => unreserved.push((key, cost)),
                Spend::Nothing => {}
            }
        }
        // An unavailable store's share is kept and written by `write_owed`.
        let _ = self
            .owed
            .write(self.store.as_ref(), settlements, unreserved)
            .await;
    }
}

/// Where a settled call's cost goes.
enum Spend {
    /// Into its reservation.
    Reserved(Settlement),
    /// Straight onto the key's spend (no budget, so no reservation).
    Unreserved(KeyId, Micros),
    /// Nowhere: it cost nothing.
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::key::{KeyEnv, KeyHash, KeyPrefix};
    use crate::policy::{Budget, EndpointRule, ModelGlob, Policy, RateLimit};
    use crate::record::{BudgetLine, BudgetUsage};
    use crate::scope::Scopes;
    use crate::store::MemoryStore;

    // 2026-11-26T08:00:00Z
    const T0: i64 = 1_795_680_000_000;

    fn record(id: &str, policy: Policy) -> KeyRecord {
        KeyRecord {
            id: KeyId::parse(id).unwrap(),
            hash: KeyHash::of(id),
            prefix: KeyPrefix::new("vpx_live_abcd"),
            previous_hash: None,
            previous_valid_until: None,
            name: id.into(),
            project: "default".into(),
            env: KeyEnv::Live,
            scopes: Scopes::parse(&["chat:write"]).unwrap(),
            plan: None,
            policy,
            parent: None,
            provider_keys: vec![],
            created_at: UnixMillis(T0 - 1000),
            expires_at: None,
            last_used_at: None,
            request_count: 0,
            status: KeyStatus::Active,
            revoked_at: None,
            spend: Micros::ZERO,
        }
    }

    fn used(tokens_in: u64, tokens_out: u64) -> CallOutcome {
        CallOutcome::Metered(Usage {
            tokens_in,
            tokens_out,
            ..Usage::default()
        })
    }

    /// $10 per million output tokens, $1 per million input, 1000 max output;
    /// cache writes at the input price, so the input ceiling is $1/M too.
    fn test_price() -> ModelPrice {
        let mut p = ModelPrice::from_usd_per_million(1.0, 10.0, 1000).unwrap();
        p.cache_write_per_million = Some(p.input_per_million);
        p.cache_write_1h_per_million = Some(p.input_per_million);
        p
    }

    struct Fixture {
        engine: DefaultEngine,
        store: Arc<MemoryStore>,
        clock: ManualClock,
    }

    fn fixture() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let clock = ManualClock::new(UnixMillis(T0));
        let prices = PriceTable::default().with_override(Provider::OpenAi, "m", test_price());
        let engine = DefaultEngine::new(store.clone(), Arc::new(prices), Arc::new(clock.clone()));
        Fixture {
            engine,
            store,
            clock,
        }
    }

    fn facts<'a>(model: Option<&'a str>, max_out: Option<u64>, chars: u64) -> RequestFacts<'a> {
        RequestFacts {
            method: "POST",
            provider: Provider::OpenAi,
            path: "/v1/chat/completions",
            model,
            max_output_tokens: max_out,
            body_chars: chars,
            stream: false,
            input_tokens_bound: chars,
            input_unbounded: false,
            output_multiplier: 1,
            multipart: false,
        }
    }

    fn chain(keys: &[KeyRecord]) -> Vec<Arc<KeyRecord>> {
        keys.iter().cloned().map(Arc::new).collect()
    }

    fn budget(usd_micros: u64) -> Option<Budget> {
        Some(Budget {
            limit: Micros(usd_micros),
            period: BudgetPeriod::Total,
            clamp_explicit_limits: false,
        })
    }

    async fn denial(f: &Fixture, c: &[Arc<KeyRecord>], facts: &RequestFacts<'_>) -> Denial {
        f.engine.check(c, facts).await.unwrap_err().0
    }

    #[tokio::test]
    async fn lifecycle_revoked_or_expired_keys_and_ancestors_are_refused() {
        let f = fixture();
        let mut revoked = record("key_r", Policy::default());
        revoked.status = KeyStatus::Revoked;
        let mut expiring = record("key_e", Policy::default());
        expiring.expires_at = Some(UnixMillis(T0));
        let ok = record("key_ok", Policy::default());
        let q = facts(Some("m"), None, 0);
        assert_eq!(
            denial(&f, &chain(&[revoked.clone()]), &q).await,
            Denial::KeyRevoked
        );
        assert_eq!(
            denial(&f, &chain(&[expiring.clone()]), &q).await,
            Denial::KeyExpired
        );
        assert_eq!(
            denial(&f, &chain(&[ok.clone(), revoked]), &q).await,
            Denial::KeyRevoked
        );
        assert_eq!(
            denial(&f, &chain(&[ok.clone(), expiring.clone()]), &q).await,
            Denial::KeyExpired
        );
        f.clock.set(UnixMillis(T0 - 1));
        assert!(f.engine.check(&chain(&[ok, expiring]), &q).await.is_ok());
    }

    #[tokio::test]
    async fn scopes_and_allowlists_name_what_was_refused() {
        let f = fixture();
        let mut no_chat = record("key_s", Policy::default());
        no_chat.scopes = Scopes::parse(&["usage:read"]).unwrap();
        let q = facts(Some("m"), None, 10);
        assert!(
            matches!(denial(&f, &chain(&[no_chat]), &q).await, Denial::PermissionDenied(m) if m.contains("chat:write"))
        );

        let policy = Policy {
            providers: Some(vec![Provider::OpenAi]),
            endpoints: Some(vec![
                EndpointRule::parse("POST /v1/chat/completions").unwrap(),
            ]),
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            max_request_chars: Some(100),
            ..Policy::default()
        };
        let k = chain(&[record("key_a", policy)]);
        let mut q = facts(Some("gpt-4o-mini"), None, 100);
        assert!(f.engine.check(&k, &q).await.is_ok());

        q.provider = Provider::Anthropic;
        assert!(
            matches!(denial(&f, &k, &q).await, Denial::ProviderNotAllowed(m) if m.contains("anthropic") && m.contains("allowed: openai"))
        );
        q.provider = Provider::OpenAi;
        q.path = "/v1/files";
        assert!(
            matches!(denial(&f, &k, &q).await, Denial::EndpointNotAllowed(m) if m.contains("POST /v1/files"))
        );
        q.method = "GET";
        q.path = "/v1/chat/completions";
        assert!(
            matches!(denial(&f, &k, &q).await, Denial::EndpointNotAllowed(m) if m.contains("GET /v1/chat/completions"))
        );
        q.method = "POST";
        q.model = Some("gpt-4o");
        assert_eq!(
            denial(&f, &k, &q).await,
            Denial::ModelNotAllowed(
                "model gpt-4o is not allowed for this key; allowed: gpt-4o-mini".into()
            )
        );
        q.model = None;
        assert!(
            matches!(denial(&f, &k, &q).await, Denial::InvalidRequest(m) if m.contains("gpt-4o-mini"))
        );
        q.model = Some("gpt-4o-mini");
        q.body_chars = 101;
        assert!(
            matches!(denial(&f, &k, &q).await, Denial::RequestTooLarge(m) if m.contains("101") && m.contains("100"))
        );
    }

    #[tokio::test]
    async fn a_parents_allowlist_binds_its_child() {
        let f = fixture();
        let parent = record(
            "key_p",
            Policy {
                models: Some(vec![ModelGlob::parse("m").unwrap()]),
                ..Policy::default()
            },
        );
        let child = record("key_c", Policy::default());
        let c = chain(&[child, parent]);
        assert!(f.engine.check(&c, &facts(Some("m"), None, 0)).await.is_ok());
        assert!(matches!(
            denial(&f, &c, &facts(Some("other"), None, 0)).await,
            Denial::ModelNotAllowed(m) if m.contains("a parent of this key")
        ));
    }

    #[tokio::test]
    async fn max_parallel_slots_release_when_grants_drop() {
        let f = fixture();
        let k = chain(&[record(
            "key_a",
            Policy {
                max_parallel: Some(2),
                ..Policy::default()
            },
        )]);
        let q = facts(Some("m"), None, 0);
        let g1 = f.engine.check(&k, &q).await.unwrap();
        let g2 = f.engine.check(&k, &q).await.unwrap();
        let (d, h) = f.engine.check(&k, &q).await.unwrap_err();
        assert!(matches!(
            d,
            Denial::RateLimited {
                retry_after_secs: 1,
                ..
            }
        ));
        assert_eq!(h.retry_after_secs, Some(1));
        drop(g1);
        let g3 = f.engine.check(&k, &q).await.unwrap();
        f.engine.settle(g2, CallOutcome::NotSent, None).await;
        f.engine.settle(g3, CallOutcome::NotSent, None).await;
        assert_eq!(f.engine.in_flight().in_flight(&k[0].id), 0);
    }

    #[tokio::test]
    async fn rate_limits_carry_headers_and_retry_after() {
        let f = fixture();
        let k = chain(&[record(
            "key_a",
            Policy {
                rate_limit: Some(RateLimit {
                    requests_per_minute: Some(2),
                    ..RateLimit::default()
                }),
                ..Policy::default()
            },
        )]);
        let q = facts(Some("m"), None, 0);
        let g = f.engine.check(&k, &q).await.unwrap();
        assert_eq!((g.headers.limit, g.headers.remaining), (2, 1));
        assert_eq!(g.headers.reset_unix_secs, (T0 + 60_000) / 1000);
        f.engine.check(&k, &q).await.unwrap();
        let (d, h) = f.engine.check(&k, &q).await.unwrap_err();
        assert_eq!(d.code(), "rate_limited");
        assert!(
            d.message().contains("2 requests per minute"),
            "{}",
            d.message()
        );
        assert_eq!((h.remaining, h.retry_after_secs), (0, Some(60)));
        // Denials before the limiter still report the window.
        let mut revoked = (*k[0]).clone();
        revoked.status = KeyStatus::Revoked;
        let (_, h) = f.engine.check(&chain(&[revoked]), &q).await.unwrap_err();
        assert_eq!((h.limit, h.remaining), (2, 0));
    }

    #[tokio::test]
    async fn limit_status_peeks_every_window_of_the_chain_without_counting() {
        let f = fixture();
        let parent = record(
            "key_parent",
            Policy {
                rate_limit: Some(RateLimit {
                    requests_per_minute: Some(5),
                    requests_per_day: Some(100),
                    ..RateLimit::default()
                }),
                max_parallel: Some(3),
                budget: Some(Budget {
                    period: BudgetPeriod::Monthly,
                    ..budget(1_000_000).unwrap()
                }),
                ..Policy::default()
            },
        );
        let child = record(
            "key_child",
            Policy {
                rate_limit: Some(RateLimit {
                    requests_per_minute: Some(10),
                    tokens_per_minute: Some(1000),
                    ..RateLimit::default()
                }),
                ..Policy::default()
            },
        );
        let k = chain(&[child, parent]);
        let q = facts(Some("m"), Some(10), 10);
        f.clock.set(UnixMillis(T0 + 30_000));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(f.engine.check(&k, &q).await.unwrap());
        }
        f.engine
            .settle(held.remove(0), used(100, 10), Some("m"))
            .await;
        let s = f.engine.limit_status(&k).await.unwrap();
        // Peeking twice sees the same: a peek counts nothing.
        assert_eq!(s, f.engine.limit_status(&k).await.unwrap());
        let shown: Vec<_> = s
            .windows
            .iter()
            .map(|w| {
                (
                    w.key.as_str(),
                    w.kind.as_str(),
                    w.used,
                    w.limit,
                    w.resets_at,
                )
            })
            .collect();
        let (minute_end, day_end) = (UnixMillis(T0 + 60_000), UnixMillis(T0 + 16 * 3_600_000));
        assert_eq!(
            shown,
            [
                ("key_child", "requests_per_minute", 3, 10, Some(minute_end)),
                (
                    "key_child",
                    "tokens_per_minute",
                    110,
                    1000,
                    Some(minute_end)
                ),
                ("key_parent", "requests_per_minute", 3, 5, Some(minute_end)),
                ("key_parent", "requests_per_day", 3, 100, Some(day_end)),
                ("key_parent", "max_parallel", 2, 3, None),
            ]
        );
        let b = s.budget.unwrap();
        assert_eq!(b.key.as_str(), "key_parent");
        assert!(
            b.settled > Micros::ZERO && b.reserved > Micros::ZERO,
            "{b:?}"
        );
        assert_eq!(
            b.settled
                .saturating_add(b.reserved)
                .saturating_add(b.remaining),
            Micros(1_000_000)
        );
        assert_eq!(b.resets_at, Some(UnixMillis(T0).start_of_next_utc_month()));
        // The next admission sees the same counts the peek showed.
        drop(held);
        let g = f.engine.check(&k, &q).await.unwrap();
        assert_eq!((g.headers.limit, g.headers.remaining), (5, 1));
        // A chain without limits has nothing to show.
        let free = chain(&[record("key_free", Policy::default())]);
        assert_eq!(
            f.engine.limit_status(&free).await.unwrap(),
            LimitStatus::default()
        );
    }

    #[tokio::test]
    async fn tokens_per_minute_are_fed_at_settlement() {
        let f = fixture();
        let k = chain(&[record(
            "key_a",
            Policy {
                rate_limit: Some(RateLimit {
                    tokens_per_minute: Some(100),
                    ..RateLimit::default()
                }),
                ..Policy::default()
            },
        )]);
        let q = facts(Some("m"), None, 0);
        let g = f.engine.check(&k, &q).await.unwrap();
        let charge = f.engine.settle(g, used(60, 40), Some("m")).await;
        assert_eq!((charge.usage.tokens_in, charge.usage.tokens_out), (60, 40));
        let (d, h) = f.engine.check(&k, &q).await.unwrap_err();
        assert!(
            d.message().contains("100 tokens per minute"),
            "{}",
            d.message()
        );
        assert_eq!(h.retry_after_secs, Some(60));
    }

    #[tokio::test]
    async fn settle_many_charges_each_call_like_settle_in_one_store_call() {
        let f = fixture();
        let key = record(
            "key_m",
            Policy {
                budget: budget(1_000_000),
                ..Policy::default()
            },
        );
        let k = chain(std::slice::from_ref(&key));
        let line = BudgetLine {
            key: key.id.clone(),
            limit: Micros(1_000_000),
            period_start: UnixMillis(0),
        };
        let q = facts(Some("m"), Some(500), 100);
        let metered = f.engine.check(&k, &q).await.unwrap();
        let unmetered = f.engine.check(&k, &q).await.unwrap();
        let not_sent = f.engine.check(&k, &q).await.unwrap();
        let charges = f
            .engine
            .settle_many(vec![
                (metered, used(90, 101), Some("m")),
                (unmetered, CallOutcome::Unmetered, Some("m")),
                (not_sent, CallOutcome::NotSent, Some("m")),
            ])
            .await;
        let costs: Vec<Micros> = charges.iter().map(|c| c.cost).collect();
        assert_eq!(costs, [Micros(1100), Micros(5100), Micros::ZERO]);
        let usage = f.store.budget_usage(&line, UnixMillis(T0)).await.unwrap();
        assert_eq!(
            usage,
            BudgetUsage {
                settled: Micros(1100 + 5100),
                reserved: Micros::ZERO
            }
        );
    }

    #[tokio::test]
    async fn budgets_reserve_the_most_a_call_can_cost_and_settle_the_real_cost() {
        let f = fixture();
        let key = record(
            "key_b",
            Policy {
                budget: budget(1_000_000),
                ..Policy::default()
            },
        );
        let k = chain(std::slice::from_ref(&key));
        let line = BudgetLine {
            key: key.id.clone(),
            limit: Micros(1_000_000),
            period_start: UnixMillis(0),
        };
        // 100 bytes → at most 100 prompt tokens at $1/M = 100 µ$; 500 output at $10/M = 5000 µ$.
        let g = f
            .engine
            .check(&k, &facts(Some("m"), Some(500), 100))
            .await
            .unwrap();
        assert_eq!(g.reservation.as_ref().unwrap().amount, Micros(5_100));
        assert_eq!(g.headers.budget_remaining, Some(Micros(994_900)));
        assert_eq!(g.clamp_output_tokens, None);
        let charge = f.engine.settle(g, used(90, 101), Some("m")).await;
        assert_eq!(charge.cost, Micros(90 + 1010));
        let usage = f.store.budget_usage(&line, UnixMillis(T0)).await.unwrap();
        assert_eq!(
            usage,
            BudgetUsage {
                settled: Micros(1100),
                reserved: Micros::ZERO
            }
        );

        // No output limit: the model's maximum output (1000 tokens) is reserved.
        let g = f
            .engine
            .check(&k, &facts(Some("m"), None, 0))
            .await
            .unwrap();
        assert_eq!(g.reservation.as_ref().unwrap().amount, Micros(10_000));
        // Not sent: released, nothing charged.
        assert_eq!(
            f.engine.settle(g, CallOutcome::NotSent, None).await.cost,
            Micros::ZERO
        );
        // Sent but unmetered: the whole reservation is charged.
        let g = f
            .engine
            .check(&k, &facts(Some("m"), None, 0))
            .await
            .unwrap();
        assert_eq!(
            f.engine.settle(g, CallOutcome::Unmetered, None).await.cost,
            Micros(10_000)
        );
        let usage = f.store.budget_usage(&line, UnixMillis(T0)).await.unwrap();
        assert_eq!(usage.settled, Micros(11_100));
    }

    #[tokio::test]
    async fn boundary_unmetered_calls_of_unbudgeted_keys_are_never_free() {
        let f = fixture();
        let key = record("key_u", Policy::default());
        let k = chain(std::slice::from_ref(&key));
        // No budget, so nothing is reserved; the upstream then reports no usage.
        let g = f
            .engine
            .check(&k, &facts(Some("m"), Some(500), 100))
            .await
            .unwrap();
        assert!(g.reservation.is_none());
        let charge = f.engine.settle(g, CallOutcome::Unmetered, Some("m")).await;
        // The most the call could cost: 100 prompt tokens + 500 output tokens.
        assert_eq!(charge.cost, Micros(5_100));
        // Not sent stays free; an unpriced model has no worst case to charge.
        let g = f
            .engine
            .check(&k, &facts(Some("m"), Some(500), 100))
            .await
            .unwrap();
        assert_eq!(
            f.engine.settle(g, CallOutcome::NotSent, None).await.cost,
            Micros::ZERO
        );
        let g = f
            .engine
            .check(&k, &facts(Some("unpriced"), Some(500), 100))
            .await
            .unwrap();
        assert_eq!(
            f.engine.settle(g, CallOutcome::Unmetered, None).await.cost,
            Micros::ZERO
        );
    }

    #[tokio::test]
    async fn boundary_a_partial_reservation_clamps_the_output() {
        let f = fixture();
        let k = chain(&[record(
            "key_b",
            Policy {
                budget: budget(3_000),
                ..Policy::default()
            },
        )]);
        // Wants 100 + 10_000; only 3_000 fits: (3000 - 100) / 10 = 290 tokens.
        let g = f
            .engine
            .check(&k, &facts(Some("m"), None, 100))
            .await
            .unwrap();
        assert_eq!(g.reservation.as_ref().unwrap().amount, Micros(3_000));
        assert_eq!(g.clamp_output_tokens, Some(290));
        assert_eq!(g.headers.budget_remaining, Some(Micros::ZERO));
        // Nothing left: refused, naming what remains.
        let (d, h) = f
            .engine
            .check(&k, &facts(Some("m"), None, 100))
            .await
            .unwrap_err();
        assert_eq!(d.code(), "budget_exceeded");
        assert!(
            d.message()
                .contains("$0.000000 of the $0.003000 total budget"),
            "{}",
            d.message()
        );
        assert_eq!(h.budget_remaining, Some(Micros::ZERO));
        drop(g);

        let strict = fixture();
        let engine = strict.engine.with_output_clamping(false);
        let k = chain(&[record(
            "key_c",
            Policy {
                budget: budget(3_000),
                ..Policy::default()
            },
        )]);
        assert_eq!(
            engine
                .check(&k, &facts(Some("m"), None, 100))
                .await
                .unwrap_err()
                .0
                .code(),
            "budget_exceeded"
        );
    }

    #[tokio::test]
    async fn unpriced_models_are_refused_for_budgeted_keys_only() {
        let f = fixture();
        let budgeted = chain(&[record(
            "key_b",
            Policy {
                budget: budget(1_000_000),
                ..Policy::default()
            },
        )]);
        let free = chain(&[record("key_f", Policy::default())]);
        let q = facts(Some("unknown-model"), Some(10), 0);
        assert!(
            matches!(denial(&f, &budgeted, &q).await, Denial::ModelNotAllowed(m) if m.contains("has no price") && m.contains("[prices.\"openai/"))
        );
        assert!(f.engine.check(&free, &q).await.is_ok());
        // No model at all: priced calls must name one; GETs are free.
        assert_eq!(
            denial(&f, &budgeted, &facts(None, None, 0)).await.code(),
            "invalid_request"
        );
        let mut get = facts(None, None, 0);
        get.method = "GET";
        get.path = "/v1/models";
        let g = f.engine.check(&budgeted, &get).await.unwrap();
        assert!(g.reservation.is_none());
        // A fallback price makes unknown models priceable.
        let prices = PriceTable::default().with_fallback(Some(test_price()));
        let engine =
            DefaultEngine::new(f.store.clone(), Arc::new(prices), Arc::new(f.clock.clone()));
        assert!(
            engine
                .check(&budgeted, &q)
                .await
                .unwrap()
                .reservation
                .is_some()
        );
    }

    #[tokio::test]
    async fn shadow_mode_records_but_does_not_refuse() {
        let f = fixture();
        let k = chain(&[record(
            "key_s",
            Policy {
                models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
                budget: budget(1),
                shadow: true,
                ..Policy::default()
            },
        )]);
        let g = f
            .engine
            .check(&k, &facts(Some("m"), Some(1000), 0))
            .await
            .unwrap();
        assert_eq!(
            g.shadow_denial.as_ref().map(Denial::code),
            Some("model_not_allowed")
        );
        assert!(g.reservation.is_none());
        // Status is never shadowed.
        let mut revoked = (*k[0]).clone();
        revoked.status = KeyStatus::Revoked;
        assert_eq!(
            denial(&f, &chain(&[revoked]), &facts(Some("m"), None, 0)).await,
            Denial::KeyRevoked
        );
    }

    /// A shared limiter whose backend is down.
    #[derive(Debug, Default)]
    struct DownLimiter {
        calls: std::sync::atomic::AtomicU64,
    }

    #[async_trait]
    impl SharedLimiter for DownLimiter {
        async fn admit(
            &self,
            chain: &[ChainLimit<'_>],
            _: UnixMillis,
            _: bool,
        ) -> Result<crate::policy::SharedAdmission, LimiterError> {
            assert!(!chain.is_empty() && chain.iter().all(ChainLimit::is_limited));
            self.calls.fetch_add(1, Ordering::SeqCst);
            Err(LimiterError::Unavailable("connection refused".into()))
        }
        async fn peek(
            &self,
            _: &[ChainLimit<'_>],
            _: UnixMillis,
        ) -> Result<Vec<crate::policy::WindowCounts>, LimiterError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Err(LimiterError::Unavailable("connection refused".into()))
        }
        fn record_tokens(&self, _: &[KeyId], _: u64, _: UnixMillis) {}
    }

    #[tokio::test]
    async fn corruption_a_failing_shared_limiter_refuses_503_or_falls_back_locally() {
        let limited = chain(&[record(
            "key_l",
            Policy {
                rate_limit: Some(RateLimit {
                    requests_per_minute: Some(2),
                    ..RateLimit::default()
                }),
                ..Policy::default()
            },
        )]);
        let free = chain(&[record("key_f", Policy::default())]);
        let q = facts(Some("m"), None, 0);

        let down = Arc::new(DownLimiter::default());
        let f = fixture();
        let engine = f
            .engine
            .with_shared_limiter(down.clone(), LimiterFallback::default());
        let (d, h) = engine.check(&limited, &q).await.unwrap_err();
        assert_eq!((d.status(), d.code()), (503, "rate_limiter_unavailable"));
        assert_eq!(h.retry_after_secs, Some(1));
        assert_eq!(engine.limiter_unavailable(), 1);
        // A key without limits never asks the limiter.
        let calls = down.calls.load(Ordering::SeqCst);
        engine.check(&free, &q).await.unwrap();
        assert_eq!(down.calls.load(Ordering::SeqCst), calls);
        assert_eq!(engine.limiter_fallbacks(), 0);

        let down = Arc::new(DownLimiter::default());
        let f = fixture();
        let engine = f
            .engine
            .with_shared_limiter(down.clone(), LimiterFallback::Local);
        let g = engine.check(&limited, &q).await.unwrap();
        assert_eq!((g.headers.limit, g.headers.remaining), (2, 1));
        engine.check(&limited, &q).await.unwrap();
        let (d, _) = engine.check(&limited, &q).await.unwrap_err();
        assert_eq!(d.code(), "rate_limited");
        assert_eq!(engine.limiter_fallbacks(), 3);
        assert_eq!(engine.limiter_unavailable(), 0);
    }

    #[tokio::test]
    async fn the_in_memory_path_counts_no_fallbacks() {
        let f = fixture();
        let k = chain(&[record(
            "key_a",
            Policy {
                rate_limit: Some(RateLimit {
                    requests_per_minute: Some(1),
                    ..RateLimit::default()
                }),
                ..Policy::default()
            },
        )]);
        let q = facts(Some("m"), None, 0);
        f.engine.check(&k, &q).await.unwrap();
        assert_eq!(
            f.engine.check(&k, &q).await.unwrap_err().0.code(),
            "rate_limited"
        );
        assert_eq!(
            (f.engine.limiter_fallbacks(), f.engine.limiter_unavailable()),
            (0, 0)
        );
    }

    /// A store whose budget operations fail, as a locked or read-only
    /// database would.
    struct BrokenBudgets(MemoryStore);

    #[async_trait]
    impl KeyStore for BrokenBudgets {
        async fn insert_key(
            &self,
            k: &KeyRecord,
            c: Option<(&BudgetLine, Micros)>,
        ) -> Result<(), StoreError> {
            self.0.insert_key(k, c).await
        }
        async fn find_by_hash(&self, h: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
            self.0.find_by_hash(h).await
        }
        async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
            self.0.get_key(id).await
        }
        async fn list_keys(&self, p: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
            self.0.list_keys(p).await
        }
        async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
            self.0.revoke_key(id, at).await
        }
        async fn rotate_key(
            &self,
            id: &KeyId,
            h: &KeyHash,
            p: &KeyPrefix,
            g: Option<UnixMillis>,
        ) -> Result<(), StoreError> {
            self.0.rotate_key(id, h, p, g).await
        }
        async fn insert_provider_key(
            &self,
            k: &crate::record::ProviderKeyRecord,
        ) -> Result<(), StoreError> {
            self.0.insert_provider_key(k).await
        }
        async fn get_provider_key(
            &self,
            id: &crate::key::ProviderKeyId,
        ) -> Result<Option<crate::record::ProviderKeyRecord>, StoreError> {
            self.0.get_provider_key(id).await
        }
        async fn list_provider_keys(
            &self,
            p: Option<&str>,
        ) -> Result<Vec<crate::record::ProviderKeyRecord>, StoreError> {
            self.0.list_provider_keys(p).await
        }
        async fn remove_provider_key(
            &self,
            id: &crate::key::ProviderKeyId,
        ) -> Result<bool, StoreError> {
            self.0.remove_provider_key(id).await
        }
        async fn replace_sealed(
            &self,
            id: &crate::key::ProviderKeyId,
            e: &crate::crypto::Sealed,
            n: &crate::crypto::Sealed,
        ) -> Result<bool, StoreError> {
            self.0.replace_sealed(id, e, n).await
        }
        async fn reserve_reporting(
            &self,
            _: &BudgetLine,
            _: Micros,
            _: Micros,
            _: UnixMillis,
            _: UnixMillis,
        ) -> Result<(crate::record::Reservation, Option<Micros>), StoreError> {
            Err(StoreError::Backend(
                "database is locked (SELECT secret FROM t)".into(),
            ))
        }
        async fn settle(&self, s: &[Settlement]) -> Result<(), StoreError> {
            self.0.settle(s).await
        }
        async fn add_spend(&self, c: &[(KeyId, Micros)]) -> Result<(), StoreError> {
            self.0.add_spend(c).await
        }
        async fn budget_usage(
            &self,
            l: &BudgetLine,
            n: UnixMillis,
        ) -> Result<BudgetUsage, StoreError> {
            self.0.budget_usage(l, n).await
        }
        async fn sweep(&self, n: UnixMillis) -> Result<usize, StoreError> {
            self.0.sweep(n).await
        }
        async fn append_usage(&self, r: &[crate::record::UsageRecord]) -> Result<(), StoreError> {
            self.0.append_usage(r).await
        }
        async fn list_usage(
            &self,
            f: &crate::record::UsageFilter,
        ) -> Result<Vec<crate::record::UsageRecord>, StoreError> {
            self.0.list_usage(f).await
        }
        async fn get_meta(&self, n: &str) -> Result<Option<String>, StoreError> {
            self.0.get_meta(n).await
        }
        async fn set_meta(&self, n: &str, v: &str) -> Result<(), StoreError> {
            self.0.set_meta(n, v).await
        }
    }

    #[tokio::test]
    async fn corruption_store_failures_fail_closed() {
        let prices = PriceTable::default().with_override(Provider::OpenAi, "m", test_price());
        let clock = ManualClock::new(UnixMillis(T0));
        let engine = DefaultEngine::new(
            Arc::new(BrokenBudgets(MemoryStore::new())),
            Arc::new(prices),
            Arc::new(clock),
        );
        let budgeted = Policy {
            budget: budget(1_000_000),
            ..Policy::default()
        };
        let (d, _) = engine
            .check(
                &chain(&[record("key_b", budgeted.clone())]),
                &facts(Some("m"), None, 0),
            )
            .await
            .unwrap_err();
        assert_eq!(d, Denial::Internal);
        assert!(!d.to_json().contains("SELECT"));
        // Even in shadow mode.
        let shadow = Policy {
            shadow: true,
            ..budgeted
        };
        let (d, _) = engine
            .check(
                &chain(&[record("key_s", shadow)]),
                &facts(Some("m"), None, 0),
            )
            .await
            .unwrap_err();
        assert_eq!(d, Denial::Internal);
        // Unbudgeted keys never touch the budget store.
        assert!(
            engine
                .check(
                    &chain(&[record("key_f", Policy::default())]),
                    &facts(Some("m"), None, 0)
                )
                .await
                .is_ok()
        );
    }
}
