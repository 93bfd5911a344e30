//! What stores hold: key records, provider-key records, usage records and
//! budget reservations.

use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::crypto::{ProviderKeyHint, Sealed};
use crate::key::{KeyEnv, KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::policy::Policy;
use crate::provider::Provider;
use crate::scope::Scopes;

/// The project every key belongs to unless told otherwise.
pub const DEFAULT_PROJECT: &str = "default";

/// The project of an organisation-wide key (docs/api.md#projects): it
/// manages and reads every project, as the operator does. Only the
/// operator or another organisation-wide key may create one; no provider
/// key belongs to it.
pub const ALL_PROJECTS: &str = "*";

/// Most ancestors a sub-agent key may have (docs/policy.md#sub-agent-keys):
/// creating a key deeper than this is refused, and a chain longer than this
/// is treated as corrupt wherever it is followed.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// A key's stored status. `expired` is derived from `expires_at`, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Usable.
    Active,
    /// Revoked (directly or through an ancestor).
    Revoked,
    /// Past `expires_at`.
    Expired,
}

impl KeyStatus {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

/// A virtual key as stored: everything of the key record (docs/api.md#keys) but
/// the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id, stable across rotation.
    pub id: KeyId,
    /// SHA-256 of the current secret.
    pub hash: KeyHash,
    /// Public prefix of the current secret.
    pub prefix: KeyPrefix,
    /// SHA-256 of the previous secret while a rotation's grace period runs.
    pub previous_hash: Option<KeyHash>,
    /// When the previous secret stops working.
    pub previous_valid_until: Option<UnixMillis>,
    /// Human name.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// `live` or `test`.
    pub env: KeyEnv,
    /// Granted scopes.
    pub scopes: Scopes,
    /// The plan the policy was resolved from, if any.
    pub plan: Option<String>,
    /// The effective policy.
    pub policy: Policy,
    /// The parent, for sub-agent keys.
    pub parent: Option<KeyId>,
    /// Provider keys this key may use; empty means any of its project.
    pub provider_keys: Vec<ProviderKeyId>,
    /// Creation time.
    pub created_at: UnixMillis,
    /// Expiry, if any.
    pub expires_at: Option<UnixMillis>,
    /// Last proxied call.
    pub last_used_at: Option<UnixMillis>,
    /// Proxied calls so far.
    pub request_count: u64,
    /// Stored status (`active` or `revoked`).
    pub status: KeyStatus,
    /// When it was revoked.
    pub revoked_at: Option<UnixMillis>,
    /// Settled spend over the key's life.
    pub spend: Micros,
}

impl KeyRecord {
    /// The status as of `now`: revoked wins, then expiry.
    pub fn status_at(&self, now: UnixMillis) -> KeyStatus {
        match self.status {
            KeyStatus::Revoked => KeyStatus::Revoked,
            _ if self.expires_at.is_some_and(|e| now >= e) => KeyStatus::Expired,
            s => s,
        }
    }
}

/// A stored provider key: sealed secret plus public metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderKeyRecord {
    /// Public id, `pk_…`.
    pub id: ProviderKeyId,
    /// Owning project.
    pub project: String,
    /// The provider it authenticates to.
    pub provider: Provider,
    /// Human name.
    pub name: String,
    /// The envelope-encrypted secret.
    pub sealed: Sealed,
    /// `sk-...x7fQ`.
    pub hint: ProviderKeyHint,
    /// Creation time.
    pub created_at: UnixMillis,
}

/// One proxied (or denied) call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// When the call started.
    pub at: UnixMillis,
    /// The virtual key.
    pub key_id: KeyId,
    /// Its project.
    pub project: String,
    /// The provider called.
    pub provider: Option<Provider>,
    /// `METHOD /path` as forwarded.
    pub endpoint: String,
    /// The model, when known.
    pub model: Option<String>,
    /// Input tokens.
    pub tokens_in: u64,
    /// Output tokens.
    pub tokens_out: u64,
    /// What was charged.
    pub cost: Micros,
    /// Milliseconds from request to end of response body.
    pub latency_ms: u64,
    /// HTTP status returned to the client.
    pub status: u16,
    /// The denial code, when the call was denied (or would have been, in shadow mode).
    pub denial: Option<String>,
    /// Whether the denial was only recorded (shadow mode).
    pub shadow: bool,
    /// Of `tokens_in`: read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Of `tokens_in`: written to the prompt cache (5-minute and 1-hour).
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// Of `tokens_out`: reasoning (thinking) tokens.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Of `tokens_in` and `tokens_out`: audio tokens.
    #[serde(default)]
    pub audio_tokens: u64,
    /// Which settlement rule charged the call (docs/budgets.md#settlement);
    /// `None` for calls refused before they were admitted.
    #[serde(default)]
    pub settlement: Option<SettledBy>,
}

/// How a call's cost was decided: one rule per way a call can end
/// (docs/budgets.md#settlement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SettledBy {
    /// A complete answer with usage: its metered cost.
    Metered,
    /// A complete success without usage: the reservation.
    NoUsage,
    /// A complete error answer without usage: nothing (the provider bills
    /// nothing for it); the reservation was released.
    ErrorReleased,
    /// Never reached the provider: nothing.
    NotSent,
    /// Cut short after the provider's final count: that count.
    CutAfterFinalCount,
    /// Cut short before a final count (client gone, reset, timeout, stream
    /// cut, call abandoned before the answer's headers): the reservation.
    CutReserved,
}

impl SettledBy {
    /// The name stored and shown, e.g. `cut_reserved`.
    pub fn as_str(self) -> &'static str {
        match self {
            SettledBy::Metered => "metered",
            SettledBy::NoUsage => "no_usage",
            SettledBy::ErrorReleased => "error_released",
            SettledBy::NotSent => "not_sent",
            SettledBy::CutAfterFinalCount => "cut_after_final_count",
            SettledBy::CutReserved => "cut_reserved",
        }
    }

    /// The rule named `name`, as [`as_str`](Self::as_str) writes it.
    pub fn parse(name: &str) -> Option<SettledBy> {
        [
            SettledBy::Metered,
            SettledBy::NoUsage,
            SettledBy::ErrorReleased,
            SettledBy::NotSent,
            SettledBy::CutAfterFinalCount,
            SettledBy::CutReserved,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// Which usage records to return.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// Only this project.
    pub project: Option<String>,
    /// Only this key.
    pub key_id: Option<KeyId>,
    /// Only records at or after this time.
    pub since: Option<UnixMillis>,
    /// Only records before this time.
    pub until: Option<UnixMillis>,
    /// At most this many, newest first.
    pub limit: Option<usize>,
}

/// One budget a reservation is held against: a key's cap in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BudgetLine {
    /// The key whose budget this is.
    pub key: KeyId,
    /// The cap.
    pub limit: Micros,
    /// Start of the period (0 for `total`).
    pub period_start: UnixMillis,
}

/// Settled and reserved amounts of one budget line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetUsage {
    /// Settled spend in the period.
    pub settled: Micros,
    /// Held by open reservations (until settled or swept) and child carve-outs.
    pub reserved: Micros,
}

impl BudgetUsage {
    /// What is left of `limit`.
    pub fn remaining(&self, limit: Micros) -> Micros {
        limit.saturating_sub(self.settled.saturating_add(self.reserved))
    }
}

/// Opaque id of a held reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u64);

/// A reservation held against one budget line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its id.
    pub id: ReservationId,
    /// The line it is held on (its period is the one it settles into).
    pub line: BudgetLine,
    /// The amount held.
    pub amount: Micros,
}

/// A reservation's final cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The reservation being settled.
    pub reservation: Reservation,
    /// The real cost; may exceed the amount held only through provider error.
    pub actual: Micros,
}
