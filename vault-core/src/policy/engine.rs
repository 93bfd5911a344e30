//! The `PolicyEngine` trait: `check` before a call, `settle` after it.

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::UnixMillis;
use crate::denial::Denial;
use crate::key::KeyId;
use crate::meter::Usage;
use crate::money::Micros;
use crate::provider::Provider;
use crate::record::{KeyRecord, Reservation};
use crate::store::StoreError;

use super::limits_backend::LimiterError;
use super::model::BudgetPeriod;

/// What the proxy knows about a request before forwarding it.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    /// The HTTP method, uppercase.
    pub method: &'a str,
    /// The provider named by the path.
    pub provider: Provider,
    /// The canonical upstream path, exactly as it will be forwarded.
    pub path: &'a str,
    /// The model (from the body, or the path for Google), when present.
    pub model: Option<&'a str>,
    /// The output limit the client set (`max_tokens` and kin), when present.
    pub max_output_tokens: Option<u64>,
    /// Characters (not bytes) in the request body (for `max_request_chars`).
    pub body_chars: u64,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The most input tokens the body can cost (its bytes plus image
    /// ceilings); see `vault_core::meter::RequestInspection`.
    pub input_tokens_bound: u64,
    /// The input cannot be bounded from the body (file ids, audio, earlier
    /// responses…): only the model's context window bounds it.
    pub input_unbounded: bool,
    /// How many outputs of up to the output limit the call may bill (`n`
    /// and kin); 0 when the endpoint has no output (embeddings).
    pub output_multiplier: u64,
    /// The body is a `multipart/form-data` upload, which is forwarded
    /// unread and cannot be priced in advance.
    pub multipart: bool,
}

/// Values for `X-RateLimit-*`, `Retry-After` and `X-Budget-Remaining-USD`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitHeaders {
    /// The binding request limit of the current window (`X-RateLimit-Limit`).
    pub limit: u64,
    /// Requests left in that window after this one.
    pub remaining: u64,
    /// When that window resets (unix seconds).
    pub reset_unix_secs: i64,
    /// Seconds until the next admission, when rate limited.
    pub retry_after_secs: Option<u64>,
    /// What the key's budget has left, for budgeted keys.
    pub budget_remaining: Option<Micros>,
}

/// Permission to forward one call, holding whatever must be released or
/// settled afterwards. Dropping a grant without settling releases its
/// parallel slot but not its reservation (the store's sweep charges it).
#[derive(Debug)]
pub struct Grant {
    /// The key the call is made with.
    pub key: KeyId,
    /// The key's project.
    pub project: String,
    /// The budget reservation, for budgeted keys.
    pub reservation: Option<Reservation>,
    /// When set, the output limit to forward instead of the client's
    /// (in-flight budget enforcement); announce it in a response header.
    pub clamp_output_tokens: Option<u64>,
    /// A denial evaluated but not enforced (shadow mode).
    pub shadow_denial: Option<Denial>,
    /// Rate-limit and budget header values.
    pub headers: LimitHeaders,
    /// The time the call was admitted.
    pub admitted_at: UnixMillis,
    /// Released on drop: the slot counted against `max_parallel`.
    pub slot: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// How a call ended, as far as cost is concerned (docs/budgets.md#settlement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The request never reached the provider: release the reservation.
    NotSent,
    /// The provider's final count: a complete answer's usage, or the last
    /// count of a stream cut after its terminal event. Never a running
    /// count from inside a stream.
    Metered(Usage),
    /// A complete error answer (status 4xx/5xx) without usage: the
    /// provider bills nothing for it, so the reservation is released.
    ErrorReleased,
    /// Sent, but no final count was metered (a complete success without
    /// usage, or a call cut short): charge the reservation.
    Unmetered,
}

/// What a settlement charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The cost recorded against the key.
    pub cost: Micros,
    /// The tokens counted, by class (zero when nothing was metered).
    pub usage: Usage,
}

/// Which limit a [`WindowStatus`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// `requests_per_minute`: the current UTC minute.
    RequestsPerMinute,
    /// `requests_per_day`: the current UTC day.
    RequestsPerDay,
    /// `requests_per_month`: the current UTC calendar month.
    RequestsPerMonth,
    /// `tokens_per_minute`: tokens settled in the current UTC minute.
    TokensPerMinute,
    /// `max_parallel`: requests in flight now (no window, no reset).
    MaxParallel,
}

impl WindowKind {
    /// The policy field's name, e.g. `requests_per_minute`.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::RequestsPerMinute => "requests_per_minute",
            WindowKind::RequestsPerDay => "requests_per_day",
            WindowKind::RequestsPerMonth => "requests_per_month",
            WindowKind::TokensPerMinute => "tokens_per_minute",
            WindowKind::MaxParallel => "max_parallel",
        }
    }
}

/// One limit of one key of a chain, as the engine counts it now. A key's
/// use includes its descendants' calls (limits are summed up the chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowStatus {
    /// The key whose policy sets the limit (the key or an ancestor).
    pub key: KeyId,
    /// Which limit.
    pub kind: WindowKind,
    /// The limit.
    pub limit: u64,
    /// What the current window holds (requests, tokens, or calls in flight).
    pub used: u64,
    /// When the current window ends; `None` for `max_parallel`.
    pub resets_at: Option<UnixMillis>,
}

/// The budget line a chain's calls are reserved against: that of the
/// nearest key with a budget (docs/budgets.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetStatus {
    /// The key whose budget it is (the key or an ancestor).
    pub key: KeyId,
    /// The cap.
    pub limit: Micros,
    /// How often it starts afresh.
    pub period: BudgetPeriod,
    /// Spend settled in the current period.
    pub settled: Micros,
    /// Held by open reservations and child carve-outs.
    pub reserved: Micros,
    /// What is left of the cap.
    pub remaining: Micros,
    /// When the period ends; `None` for a `total` budget.
    pub resets_at: Option<UnixMillis>,
}

/// A read-only view of a chain's limits ([`PolicyEngine::limit_status`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitStatus {
    /// Each limit of each key of the chain, the key's own first.
    pub windows: Vec<WindowStatus>,
    /// The budget line, when a key of the chain has a budget.
    pub budget: Option<BudgetStatus>,
}

/// Why [`PolicyEngine::limit_status`] could not read a chain's limits.
#[derive(Debug, thiserror::Error)]
pub enum LimitStatusError {
    /// The shared rate limiter failed.
    #[error(transparent)]
    Limiter(#[from] LimiterError),
    /// The store failed while reading the budget line.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Decides whether a call may go ahead and settles it afterwards.
#[async_trait]
pub trait PolicyEngine: Send + Sync + 'static {
    /// Checks `chain` (the key first, then its ancestors) against `facts` and
    /// reserves what the call may cost. Errors are denials; the headers are
    /// returned either way.
    async fn check(
        &self,
        chain: &[Arc<KeyRecord>],
        facts: &RequestFacts<'_>,
    ) -> Result<Grant, (Denial, LimitHeaders)>;

    /// Settles a granted call: turns its reservation into the real cost (the
    /// settlement rules of docs/budgets.md#settlement for
    /// `NotSent`/`Unmetered`) and feeds token rate limits. Never fails the
    /// caller: store errors are logged and the reservation is left for the
    /// sweep to charge.
    async fn settle(&self, grant: Grant, outcome: CallOutcome, model: Option<&str>) -> Charge;

    /// Writes what earlier settlements could not write because the store
    /// was unavailable ([`StoreError::Unavailable`]); `Ok` once nothing is
    /// owed. The usage worker calls it until it succeeds before it settles
    /// more calls (docs/replicas.md#when-postgresql-stops). The default
    /// owes nothing.
    async fn write_owed(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// What `chain`'s limits hold now (the key first, then its ancestors):
    /// each rate-limit window's use and reset, calls in flight against
    /// `max_parallel`, and the budget line. A peek: it counts nothing,
    /// takes no slot and reserves nothing. The default knows nothing and
    /// returns an empty status.
    async fn limit_status(
        &self,
        chain: &[Arc<KeyRecord>],
    ) -> Result<LimitStatus, LimitStatusError> {
        let _ = chain;
        Ok(LimitStatus::default())
    }

    /// Settles several calls at once, charges in the same order (the usage
    /// worker's batches). The default settles them one by one; engines
    /// backed by a store should settle the batch in one store call.
    async fn settle_many(&self, calls: Vec<(Grant, CallOutcome, Option<&str>)>) -> Vec<Charge> {
        let mut charges = Vec::with_capacity(calls.len());
        for (grant, outcome, model) in calls {
            charges.push(self.settle(grant, outcome, model).await);
        }
        charges
    }
}
