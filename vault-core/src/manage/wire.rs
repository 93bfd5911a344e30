//! Requests and responses of every management operation, exactly as
//! docs/api.md writes them on the wire. The HTTP routes parse requests into
//! these and serialise responses from them; the CLI's remote client sends and
//! reads the same types; its direct mode hands them to the
//! [`Manager`](super::Manager) without any JSON in between.
//!
//! Requests refuse unknown fields by name (`deny_unknown_fields`,
//! docs/threat-model.md A8). Responses accept unknown fields, so an older
//! client can read a newer server.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::UnixMillis;
use crate::crypto::{ProviderKeyHint, ProviderSecret};
use crate::key::{KeyEnv, KeyId, KeyPrefix, ProviderKeyId, VirtualKey};
use crate::money::Micros;
use crate::policy::{
    BadDuration, Budget, BudgetPeriod, EndpointRule, LimitStatus, ModelGlob, Policy, RateLimit,
    WindowStatus, parse_ttl,
};
use crate::provider::Provider;
use crate::record::{KeyRecord, KeyStatus, ProviderKeyRecord, SettledBy, UsageRecord};
use crate::scope::Scopes;

/// A duration written `90s`, `5m`, `1h`, `7d` (docs/api.md#post-v1keys:
/// `ttl`, and `grace` of a rotation): a whole number above zero and one
/// unit, at most `3660d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(Duration);

impl Ttl {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Ttl {
    type Err = BadDuration;

    fn from_str(s: &str) -> Result<Ttl, BadDuration> {
        parse_ttl(s).map(Ttl)
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ttl, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `POST /v1/keys` (docs/api.md#post-v1keys): every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// Human name: at most 200 bytes of UTF-8, no control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Scopes to grant (`scopes` is another name for it); `chat:write`
    /// when absent.
    #[serde(default, alias = "scopes", skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
    /// The project; the caller's (`default` for the operator) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// `live` or `test`; the parent's, else `live`, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<KeyEnv>,
    /// A plan to resolve the policy from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Time to live; no expiry when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
    /// The parent, for a sub-agent key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<KeyId>,
    /// Provider keys the key may use; any of its project when absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_keys: Option<Vec<ProviderKeyId>>,
    /// Policy: providers allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<Provider>>,
    /// Policy: endpoint rules allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointRule>>,
    /// Policy: model globs allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelGlob>>,
    /// Policy: a dollar budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Policy: request and token rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Policy: most characters a request body may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_chars: Option<u64>,
    /// Policy: most requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// Policy: shadow mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
}

impl CreateKeyRequest {
    /// The policy fields of the request, as a [`Policy`].
    pub fn policy(&self) -> Policy {
        Policy {
            providers: self.providers.clone(),
            endpoints: self.endpoints.clone(),
            models: self.models.clone(),
            budget: self.budget,
            rate_limit: self.rate_limit,
            max_request_chars: self.max_request_chars,
            max_parallel: self.max_parallel,
            shadow: self.shadow.unwrap_or(false),
        }
    }

    /// The request with every policy field taken from `policy` (`shadow`
    /// is left out when off).
    pub fn with_policy(mut self, policy: Policy) -> CreateKeyRequest {
        self.providers = policy.providers;
        self.endpoints = policy.endpoints;
        self.models = policy.models;
        self.budget = policy.budget;
        self.rate_limit = policy.rate_limit;
        self.max_request_chars = policy.max_request_chars;
        self.max_parallel = policy.max_parallel;
        self.shadow = policy.shadow.then_some(true);
        self
    }
}

/// `POST /v1/keys/{id}/rotate` (docs/api.md#post-v1keyssidrotate): the
/// grace period of the old secret, in one form or the other, or none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyRequest {
    /// How long the old secret keeps working, e.g. `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<Ttl>,
    /// The same in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u64>,
}

/// `POST /v1/provider-keys` (docs/api.md#post-v1provider-keys). `Debug`
/// shows the key's hint only.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddProviderKeyRequest {
    /// The provider.
    pub provider: Provider,
    /// The provider's key: serialised only to send it to a server.
    #[serde(with = "provider_secret")]
    pub api_key: ProviderSecret,
    /// Human name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The project; the caller's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// The one place a provider key is written out: the request that stores it.
mod provider_secret {
    use super::*;

    pub(super) fn serialize<S: Serializer>(k: &ProviderSecret, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.expose_secret())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ProviderSecret, D::Error> {
        String::deserialize(d).map(ProviderSecret::new)
    }
}

/// `GET /v1/usage` query parameters (docs/api.md#get-v1usage).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Only this key's records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
    /// Only this project's records: any project an organisation-wide
    /// caller names, else the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Only records at or after this time, in Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Only records before this time, in Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// At most this many (default 1000, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `GET /v1/audit` query parameters (docs/api.md#get-v1audit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Only entries about this project: any project an organisation-wide
    /// caller names, else the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// `GET /v1/keys` paging parameters (docs/api.md#get-v1keys): with any of
/// them the answer is one page ([`KeyPageView`]), newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyListQuery {
    /// At most this many (default 50, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Matching keys skipped before the page (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Part of a name (ASCII letters in any case) or the start of a prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<String>,
    /// `active`, `revoked`, `expired` or `exhausted` (budget exhausted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Only this project's keys: any project an organisation-wide caller
    /// names, else the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl KeyListQuery {
    /// Whether any parameter is given (otherwise `GET /v1/keys` answers
    /// every key, as before paging existed).
    pub fn is_empty(&self) -> bool {
        self == &KeyListQuery::default()
    }
}

/// One page of keys and how many match (docs/api.md#get-v1keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPageView {
    /// `"list"`.
    pub object: String,
    /// The page, newest first.
    pub data: Vec<KeyView>,
    /// Keys matching the query over every page.
    pub total: u64,
    /// Keys skipped before this page.
    pub offset: u64,
    /// The page size asked for.
    pub limit: u64,
}

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    /// `"list"`.
    pub object: String,
    /// The items.
    pub data: Vec<T>,
}

impl<T> List<T> {
    /// A list of `data`.
    pub fn of(data: Vec<T>) -> List<T> {
        List {
            object: "list".to_owned(),
            data,
        }
    }
}

/// A key record (docs/api.md#keys): never the key, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    /// `key_…`, stable across rotation.
    pub id: KeyId,
    /// `"key"`.
    pub object: String,
    /// Human name.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// `vpx_live_` or `vpx_test_` and the first 4 characters of the secret.
    pub prefix: KeyPrefix,
    /// `live` or `test`.
    pub env: KeyEnv,
    /// Granted scopes.
    pub scopes: Scopes,
    /// The same list, for clients of the services vaultgate replaces.
    pub permissions: Scopes,
    /// `active`, `revoked` or `expired`, now.
    pub status: KeyStatus,
    /// RFC 3339 UTC, milliseconds.
    pub created_at: String,
    /// When the key expires.
    pub expires_at: Option<String>,
    /// The last call through the proxy.
    pub last_used_at: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<String>,
    /// Calls through the proxy so far.
    pub request_count: u64,
    /// Settled spend, six decimals.
    pub spend_usd: String,
    /// The parent's id, for a sub-agent key.
    pub parent: Option<KeyId>,
    /// The plan the policy was resolved from.
    pub plan: Option<String>,
    /// The effective policy.
    pub policy: Policy,
    /// Provider keys the key may use; empty: any of its project.
    pub provider_keys: Vec<ProviderKeyId>,
    /// Until when the previous secret still works.
    pub rotation_grace_until: Option<String>,
}

impl KeyView {
    /// The record as the API shows it at `now`.
    pub fn of(k: &KeyRecord, now: UnixMillis) -> KeyView {
        KeyView {
            id: k.id.clone(),
            object: "key".to_owned(),
            name: k.name.clone(),
            project: k.project.clone(),
            prefix: k.prefix.clone(),
            env: k.env,
            scopes: k.scopes.clone(),
            permissions: k.scopes.clone(),
            status: k.status_at(now),
            created_at: k.created_at.to_rfc3339(),
            expires_at: k.expires_at.map(UnixMillis::to_rfc3339),
            last_used_at: k.last_used_at.map(UnixMillis::to_rfc3339),
            revoked_at: k.revoked_at.map(UnixMillis::to_rfc3339),
            request_count: k.request_count,
            spend_usd: k.spend.to_usd_string(),
            parent: k.parent.clone(),
            plan: k.plan.clone(),
            policy: k.policy.clone(),
            provider_keys: k.provider_keys.clone(),
            rotation_grace_until: k.previous_valid_until.map(UnixMillis::to_rfc3339),
        }
    }
}

/// A secret shown once, in the answer to create and rotate. `Debug` shows
/// nothing of it; serialising it is the one way to read it besides
/// [`expose_secret`](Self::expose_secret).
pub struct IssuedSecret(SecretString);

impl IssuedSecret {
    /// The full key, to show it to its owner.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<VirtualKey> for IssuedSecret {
    fn from(k: VirtualKey) -> IssuedSecret {
        IssuedSecret(SecretString::from(k.expose_secret().to_owned()))
    }
}

impl fmt::Debug for IssuedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuedSecret(…)")
    }
}

impl Serialize for IssuedSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.expose_secret())
    }
}

impl<'de> Deserialize<'de> for IssuedSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IssuedSecret, D::Error> {
        String::deserialize(d).map(|s| IssuedSecret(SecretString::from(s)))
    }
}

/// The answer to create and rotate: the key record and, once, the key.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedKey {
    /// The record.
    #[serde(flatten)]
    pub record: KeyView,
    /// The key itself.
    pub key: IssuedSecret,
}

/// The answer to `DELETE /v1/keys/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedKey {
    /// The key asked for.
    pub id: KeyId,
    /// `revoked`.
    pub status: KeyStatus,
    /// Every id revoked by this call (the key and its descendants); empty
    /// when the key was already revoked.
    pub revoked: Vec<KeyId>,
}

/// A provider key record (docs/api.md#provider-keys): a hint, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderKeyView {
    /// `pk_…`.
    pub id: ProviderKeyId,
    /// `"provider_key"`.
    pub object: String,
    /// The provider.
    pub provider: Provider,
    /// Human name.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// First 3 and last 4 characters.
    pub hint: ProviderKeyHint,
    /// RFC 3339 UTC.
    pub created_at: String,
}

impl ProviderKeyView {
    /// The record as the API shows it.
    pub fn of(p: &ProviderKeyRecord) -> ProviderKeyView {
        ProviderKeyView {
            id: p.id.clone(),
            object: "provider_key".to_owned(),
            provider: p.provider,
            name: p.name.clone(),
            project: p.project.clone(),
            hint: p.hint.clone(),
            created_at: p.created_at.to_rfc3339(),
        }
    }
}

/// The answer to `DELETE /v1/provider-keys/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedProviderKey {
    /// The provider key removed.
    pub id: ProviderKeyId,
    /// `true`.
    pub deleted: bool,
}

/// One usage record (docs/api.md#get-v1usage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageView {
    /// When the call started, RFC 3339 UTC.
    pub at: String,
    /// The virtual key.
    pub key_id: KeyId,
    /// Its project.
    pub project: String,
    /// The provider, when the path was read.
    pub provider: Option<Provider>,
    /// `METHOD /path`.
    pub endpoint: String,
    /// The model, when known.
    pub model: Option<String>,
    /// Input tokens, all classes.
    pub tokens_in: u64,
    /// Output tokens, all classes.
    pub tokens_out: u64,
    /// Of `tokens_in`: read from the prompt cache.
    pub cached_tokens: u64,
    /// Of `tokens_in`: written to the prompt cache.
    pub cache_write_tokens: u64,
    /// Of `tokens_out`: reasoning tokens.
    pub reasoning_tokens: u64,
    /// Audio tokens.
    pub audio_tokens: u64,
    /// What was charged, six decimals.
    pub cost_usd: String,
    /// The settlement rule, for admitted calls.
    pub settlement: Option<SettledBy>,
    /// From request to the end of the response body.
    pub latency_ms: u64,
    /// The HTTP status returned.
    pub status: u16,
    /// The error code of a refusal.
    pub denial: Option<String>,
    /// The denial was only recorded.
    pub shadow: bool,
}

impl UsageView {
    /// The record as the API shows it.
    pub fn of(r: &UsageRecord) -> UsageView {
        UsageView {
            at: r.at.to_rfc3339(),
            key_id: r.key_id.clone(),
            project: r.project.clone(),
            provider: r.provider,
            endpoint: r.endpoint.clone(),
            model: r.model.clone(),
            tokens_in: r.tokens_in,
            tokens_out: r.tokens_out,
            cached_tokens: r.cached_tokens,
            cache_write_tokens: r.cache_write_tokens,
            reasoning_tokens: r.reasoning_tokens,
            audio_tokens: r.audio_tokens,
            cost_usd: r.cost.to_usd_string(),
            settlement: r.settlement,
            latency_ms: r.latency_ms,
            status: r.status,
            denial: r.denial.clone(),
            shadow: r.shadow,
        }
    }
}

/// Sums of the records returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// How many records.
    pub requests: u64,
    /// Input tokens.
    pub tokens_in: u64,
    /// Output tokens.
    pub tokens_out: u64,
    /// Cost, six decimals.
    pub cost_usd: String,
}

/// The answer to `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageList {
    /// `"list"`.
    pub object: String,
    /// The records, newest first.
    pub data: Vec<UsageView>,
    /// Their sums.
    pub totals: UsageTotals,
}

impl UsageList {
    /// The records and their totals.
    pub fn of(records: &[UsageRecord]) -> UsageList {
        let mut cost = Micros::ZERO;
        let (mut tin, mut tout) = (0u64, 0u64);
        for r in records {
            cost = cost.saturating_add(r.cost);
            tin = tin.saturating_add(r.tokens_in);
            tout = tout.saturating_add(r.tokens_out);
        }
        UsageList {
            object: "list".to_owned(),
            data: records.iter().map(UsageView::of).collect(),
            totals: UsageTotals {
                requests: u64::try_from(records.len()).unwrap_or(u64::MAX),
                tokens_in: tin,
                tokens_out: tout,
                cost_usd: cost.to_usd_string(),
            },
        }
    }
}

/// One limit of a key or of an ancestor whose limits its calls count
/// against (docs/api.md#get-v1keysidlimits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitWindowView {
    /// The policy field: `requests_per_minute`, `requests_per_day`,
    /// `requests_per_month`, `tokens_per_minute` or `max_parallel`.
    pub name: String,
    /// The key whose policy sets it.
    pub key_id: KeyId,
    /// Set by an ancestor, not by the key itself.
    pub inherited: bool,
    /// The limit.
    pub limit: u64,
    /// What the current window holds (for `max_parallel`: calls in flight).
    pub used: u64,
    /// What is left of the limit.
    pub remaining: u64,
    /// When the window ends, RFC 3339 UTC; `null` for `max_parallel`.
    pub resets_at: Option<String>,
}

impl LimitWindowView {
    /// The window as the API shows it, for the key `of`.
    pub fn of(w: &WindowStatus, of: &KeyId) -> LimitWindowView {
        LimitWindowView {
            name: w.kind.as_str().to_owned(),
            key_id: w.key.clone(),
            inherited: &w.key != of,
            limit: w.limit,
            used: w.used,
            remaining: w.limit.saturating_sub(w.used),
            resets_at: w.resets_at.map(UnixMillis::to_rfc3339),
        }
    }
}

/// The budget line a key's calls are reserved against
/// (docs/api.md#get-v1keysidlimits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLineView {
    /// The key whose budget it is.
    pub key_id: KeyId,
    /// Set by an ancestor, not by the key itself.
    pub inherited: bool,
    /// The cap, six decimals.
    pub limit_usd: String,
    /// `total`, `daily` or `monthly`.
    pub period: BudgetPeriod,
    /// Settled in the current period.
    pub settled_usd: String,
    /// Held by calls in flight and sub-agent carve-outs.
    pub reserved_usd: String,
    /// What is left.
    pub remaining_usd: String,
    /// When the period ends, RFC 3339 UTC; `null` for `total`.
    pub resets_at: Option<String>,
}

/// The answer to `GET /v1/keys/{id}/limits`: the live state of a key's
/// limits, read without counting anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimits {
    /// `"key_limits"`.
    pub object: String,
    /// The key.
    pub key_id: KeyId,
    /// When they were read, RFC 3339 UTC.
    pub at: String,
    /// Its limits, then its ancestors'; empty when nothing limits it.
    pub windows: Vec<LimitWindowView>,
    /// The budget line, when the key or an ancestor has a budget.
    pub budget: Option<BudgetLineView>,
}

impl KeyLimits {
    /// `status` of the key `id`, read at `now`.
    pub fn of(id: &KeyId, status: &LimitStatus, now: UnixMillis) -> KeyLimits {
        KeyLimits {
            object: "key_limits".to_owned(),
            key_id: id.clone(),
            at: now.to_rfc3339(),
            windows: status
                .windows
                .iter()
                .map(|w| LimitWindowView::of(w, id))
                .collect(),
            budget: status.budget.as_ref().map(|b| BudgetLineView {
                key_id: b.key.clone(),
                inherited: &b.key != id,
                limit_usd: b.limit.to_usd_string(),
                period: b.period,
                settled_usd: b.settled.to_usd_string(),
                reserved_usd: b.reserved.to_usd_string(),
                remaining_usd: b.remaining.to_usd_string(),
                resets_at: b.resets_at.map(UnixMillis::to_rfc3339),
            }),
        }
    }
}

/// The answer to `GET /v1/audit`: each entry is the line as written.
pub type AuditList = List<serde_json::Value>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smuggling_unknown_fields_are_refused_by_name() {
        for (body, field) in [
            (r#"{"spend": 0}"#, "spend"),
            (r#"{"id": "key_x"}"#, "id"),
            (r#"{"key": "vpx_live_x"}"#, "key"),
        ] {
            let e = serde_json::from_str::<CreateKeyRequest>(body)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{body}: {e}");
        }
        let e = serde_json::from_str::<RotateKeyRequest>(r#"{"grace": "soon"}"#).unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
    }

    #[test]
    fn requests_round_trip() {
        let req: CreateKeyRequest = serde_json::from_str(
            r#"{"name": "n", "scopes": ["chat:write"], "ttl": "1h", "models": ["gpt-4o-mini"],
                "budget": {"limit_usd": 5.0}, "parent": "key_abc"}"#,
        )
        .unwrap();
        assert_eq!(req.ttl.map(Ttl::get), Some(Duration::from_secs(3600)));
        let again: CreateKeyRequest =
            serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        assert_eq!(again, req);
        assert!(serde_json::from_str::<CreateKeyRequest>(r#"{"parent": "nope"}"#).is_err());
    }

    #[test]
    fn leak_secrets_are_not_in_debug() {
        let req: AddProviderKeyRequest = serde_json::from_str(
            r#"{"provider": "openai", "api_key": "sk-proj-SECRETSECRET1234"}"#,
        )
        .unwrap();
        assert!(!format!("{req:?}").contains("SECRETSECRET"));
        let s = IssuedSecret(SecretString::from("vpx_live_SECRET".to_owned()));
        assert!(!format!("{s:?}").contains("SECRET"));
    }
}
