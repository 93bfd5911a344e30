//! JSON views of records, shared by the HTTP API and the CLI. Never a key,
//! never a key hash, never a provider secret: prefixes and hints only.

use serde_json::{Value, json};
use vault_core::clock::UnixMillis;
use vault_core::record::{KeyRecord, ProviderKeyRecord, UsageRecord};

/// A virtual key as lists and `show` present it.
pub fn key(k: &KeyRecord, now: UnixMillis) -> Value {
    json!({
        "id": k.id,
        "object": "key",
        "name": k.name,
        "project": k.project,
        "prefix": k.prefix.as_str(),
        "env": k.env.as_str(),
        "scopes": k.scopes,
        "permissions": k.scopes,
        "status": k.status_at(now).as_str(),
        "created_at": k.created_at.to_rfc3339(),
        "expires_at": k.expires_at.map(UnixMillis::to_rfc3339),
        "last_used_at": k.last_used_at.map(UnixMillis::to_rfc3339),
        "revoked_at": k.revoked_at.map(UnixMillis::to_rfc3339),
        "request_count": k.request_count,
        "spend_usd": k.spend.to_usd_string(),
        "parent": k.parent,
        "plan": k.plan,
        "policy": k.policy,
        "provider_keys": k.provider_keys,
        "rotation_grace_until": k.previous_valid_until.map(UnixMillis::to_rfc3339),
    })
}

/// A provider key: its hint, never the key.
pub fn provider_key(p: &ProviderKeyRecord) -> Value {
    json!({
        "id": p.id,
        "object": "provider_key",
        "provider": p.provider.as_str(),
        "name": p.name,
        "project": p.project,
        "hint": p.hint.as_str(),
        "created_at": p.created_at.to_rfc3339(),
    })
}

/// Usage records with totals.
pub fn usage(records: &[UsageRecord]) -> Value {
    let mut cost = vault_core::money::Micros::ZERO;
    let (mut tin, mut tout) = (0u64, 0u64);
    let data: Vec<Value> = records
        .iter()
        .map(|r| {
            cost = cost.saturating_add(r.cost);
            tin = tin.saturating_add(r.tokens_in);
            tout = tout.saturating_add(r.tokens_out);
            json!({
                "at": r.at.to_rfc3339(),
                "key_id": r.key_id,
                "project": r.project,
                "provider": r.provider.map(|p| p.as_str()),
                "endpoint": r.endpoint,
                "model": r.model,
                "tokens_in": r.tokens_in,
                "tokens_out": r.tokens_out,
                "cached_tokens": r.cached_tokens,
                "cache_write_tokens": r.cache_write_tokens,
                "reasoning_tokens": r.reasoning_tokens,
                "audio_tokens": r.audio_tokens,
                "cost_usd": r.cost.to_usd_string(),
                "settlement": r.settlement.map(|s| s.as_str()),
                "latency_ms": r.latency_ms,
                "status": r.status,
                "denial": r.denial,
                "shadow": r.shadow,
            })
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "totals": {
            "requests": records.len(),
            "tokens_in": tin,
            "tokens_out": tout,
            "cost_usd": cost.to_usd_string(),
        }
    })
}
