//! One page of a project's keys: the query the dashboard's key list and
//! `GET /v1/keys?limit=…` run, answered by the store without loading every
//! key (docs/dashboard.md#api-keys).
//!
//! [`KeyPageQuery::matches`] and [`page_of`] are the reference semantics:
//! the default [`KeyStore::list_keys_page`](super::KeyStore::list_keys_page)
//! applies them to [`list_keys`](super::KeyStore::list_keys), and the SQL
//! stores compute the same answer in SQL (checked by the conformance suite).

use crate::clock::UnixMillis;
use crate::policy::BudgetPeriod;
use crate::record::{KeyRecord, KeyStatus};

/// The largest page a store is asked for.
pub const MAX_PAGE_LIMIT: u64 = 1000;

/// A key's status as the key list shows it, at the query's `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatusFilter {
    /// Usable at `now` (not revoked, not expired) and not budget exhausted.
    Active,
    /// Revoked.
    Revoked,
    /// Not revoked, past its expiry.
    Expired,
    /// Usable at `now` but its `total` budget is spent ([`budget_exhausted`]).
    BudgetExhausted,
}

impl KeyStatusFilter {
    /// Parses `active`, `revoked`, `expired` or `exhausted`.
    pub fn parse(s: &str) -> Option<KeyStatusFilter> {
        match s {
            "active" => Some(KeyStatusFilter::Active),
            "revoked" => Some(KeyStatusFilter::Revoked),
            "expired" => Some(KeyStatusFilter::Expired),
            "exhausted" => Some(KeyStatusFilter::BudgetExhausted),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatusFilter::Active => "active",
            KeyStatusFilter::Revoked => "revoked",
            KeyStatusFilter::Expired => "expired",
            KeyStatusFilter::BudgetExhausted => "exhausted",
        }
    }
}

/// Which keys, and which slice of them, newest first (`created_at`, then
/// `id`, both descending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPageQuery {
    /// One project's keys, or every project's.
    pub project: Option<String>,
    /// Keys whose name contains it (ASCII letters compared case-
    /// insensitively) or whose prefix starts with it (exactly); blank
    /// means no search.
    pub search: Option<String>,
    /// Only keys with this status at `now`.
    pub status: Option<KeyStatusFilter>,
    /// The time statuses are computed at.
    pub now: UnixMillis,
    /// Matching keys skipped before the page.
    pub offset: u64,
    /// The most keys returned.
    pub limit: u64,
}

/// One page of matching keys and how many match in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// The page, newest first.
    pub keys: Vec<KeyRecord>,
    /// Keys matching the query, over every page.
    pub total: u64,
}

impl KeyPageQuery {
    /// The search text, trimmed; `None` when blank.
    pub fn search_text(&self) -> Option<&str> {
        self.search
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Whether `k` belongs to the query's result (any page).
    pub fn matches(&self, k: &KeyRecord) -> bool {
        let in_project = self.project.as_deref().is_none_or(|p| k.project == p);
        let by_text = self.search_text().is_none_or(|t| {
            k.name
                .to_ascii_lowercase()
                .contains(&t.to_ascii_lowercase())
                || k.prefix.as_str().starts_with(t)
        });
        let by_status = self.status.is_none_or(|s| status_is(k, s, self.now));
        in_project && by_text && by_status
    }
}

fn status_is(k: &KeyRecord, s: KeyStatusFilter, now: UnixMillis) -> bool {
    let at = k.status_at(now);
    match s {
        KeyStatusFilter::Active => at == KeyStatus::Active && !budget_exhausted(k),
        KeyStatusFilter::Revoked => at == KeyStatus::Revoked,
        KeyStatusFilter::Expired => at == KeyStatus::Expired,
        KeyStatusFilter::BudgetExhausted => at == KeyStatus::Active && budget_exhausted(k),
    }
}

/// Whether the key's lifetime (`total`) budget, a non-zero one, is spent:
/// settled spend at or above the limit (docs/dashboard.md#api-keys).
pub fn budget_exhausted(k: &KeyRecord) -> bool {
    k.policy
        .budget
        .as_ref()
        .is_some_and(|b| b.period == BudgetPeriod::Total && b.limit.0 > 0 && k.spend >= b.limit)
}

/// The page `query` selects from `keys` (any order, any projects).
pub fn page_of(keys: Vec<KeyRecord>, query: &KeyPageQuery) -> KeyPage {
    let mut found: Vec<KeyRecord> = keys.into_iter().filter(|k| query.matches(k)).collect();
    found.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.id.as_str().cmp(a.id.as_str()))
    });
    let total = found.len() as u64;
    let skip = usize::try_from(query.offset).unwrap_or(usize::MAX);
    let take = usize::try_from(query.limit).unwrap_or(usize::MAX);
    KeyPage {
        keys: found.into_iter().skip(skip).take(take).collect(),
        total,
    }
}
