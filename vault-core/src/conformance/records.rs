//! Record builders: keys, provider keys, usage records and budget lines
//! with every field set, for the cases here and for store tests elsewhere.

use crate::clock::UnixMillis;
use crate::crypto::{ProviderKeyHint, Sealed};
use crate::key::{KeyEnv, KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::policy::{Budget, BudgetPeriod, EndpointRule, ModelGlob, Policy, RateLimit};
use crate::provider::Provider;
use crate::record::{BudgetLine, KeyRecord, KeyStatus, ProviderKeyRecord, UsageRecord};
use crate::scope::Scopes;

/// A fresh random hash (as if of a freshly generated key).
pub fn fresh_hash() -> KeyHash {
    KeyHash::of(KeyId::generate().unwrap().as_str())
}

/// A root key of `project` created at `created_at`, with a rich policy so
/// that round trips exercise every field.
pub fn key_at(project: &str, created_at: i64) -> KeyRecord {
    let id = KeyId::generate().unwrap();
    KeyRecord {
        hash: fresh_hash(),
        prefix: KeyPrefix::new(format!("vpx_live_{}", &id.as_str()[4..8])),
        previous_hash: None,
        previous_valid_until: None,
        name: format!("name of {id}"),
        project: project.to_owned(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write", "usage:*"]).unwrap(),
        plan: Some("pro".to_owned()),
        policy: Policy {
            providers: Some(vec![Provider::OpenAi, Provider::Anthropic]),
            endpoints: Some(vec![
                EndpointRule::parse("POST /v1/chat/completions").unwrap(),
            ]),
            models: Some(vec![ModelGlob::parse("claude-3-5-haiku-*").unwrap()]),
            budget: Some(Budget {
                limit: Micros(5_000_000),
                period: BudgetPeriod::Daily,
                clamp_explicit_limits: false,
            }),
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(60),
                ..RateLimit::default()
            }),
            max_request_chars: Some(3000),
            max_parallel: None,
            shadow: false,
        },
        parent: None,
        provider_keys: vec![ProviderKeyId::generate().unwrap()],
        created_at: UnixMillis(created_at),
        expires_at: Some(UnixMillis(created_at + 3_600_000)),
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    }
}

/// A root key of the default project.
pub fn key() -> KeyRecord {
    key_at("default", 1_000)
}

/// A child of `parent` with no expiry.
pub fn child_of(parent: &KeyRecord) -> KeyRecord {
    let mut k = key_at(&parent.project, parent.created_at.0 + 1);
    k.parent = Some(parent.id.clone());
    k.expires_at = None;
    k
}

/// A provider key of `project`.
pub fn provider_key_at(project: &str, created_at: i64) -> ProviderKeyRecord {
    let id = ProviderKeyId::generate().unwrap();
    ProviderKeyRecord {
        sealed: Sealed::from_bytes(format!("sealed bytes of {id}").into_bytes()),
        id,
        project: project.to_owned(),
        provider: Provider::Anthropic,
        name: "Anthropic production".to_owned(),
        hint: ProviderKeyHint::of("sk-ant-0123456789abcdefx7fQ"),
        created_at: UnixMillis(created_at),
    }
}

/// A usage record of `key` at `at`.
pub fn usage_of(key: &KeyRecord, at: i64) -> UsageRecord {
    UsageRecord {
        at: UnixMillis(at),
        key_id: key.id.clone(),
        project: key.project.clone(),
        provider: Some(Provider::OpenAi),
        endpoint: "POST /v1/chat/completions".to_owned(),
        model: Some("gpt-4o-mini".to_owned()),
        tokens_in: 12,
        tokens_out: 34,
        cost: Micros(56),
        latency_ms: 78,
        status: 200,
        denial: None,
        shadow: false,
        cached_tokens: 5,
        cache_write_tokens: 4,
        reasoning_tokens: 3,
        audio_tokens: 2,
        settlement: Some(crate::record::SettledBy::CutReserved),
    }
}

/// `key`'s budget line of `limit` in the period starting at `period_start`.
pub fn line(key: &KeyRecord, limit: u64, period_start: i64) -> BudgetLine {
    BudgetLine {
        key: key.id.clone(),
        limit: Micros(limit),
        period_start: UnixMillis(period_start),
    }
}
