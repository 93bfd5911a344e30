//! Records to SQL values and rows back to records. A row that does not
//! decode is [`StoreError::Corrupt`], never a panic; messages name the
//! record and column, never a secret.

use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use vault_core::clock::UnixMillis;
use vault_core::crypto::{ProviderKeyHint, Sealed};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use vault_core::money::Micros;
use vault_core::policy::Policy;
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, KeyStatus, ProviderKeyRecord, SettledBy, UsageRecord};
use vault_core::scope::Scopes;
use vault_core::store::StoreError;

/// The columns [`key_from_row`] reads, in order.
pub(crate) const KEY_COLUMNS: &str = "id, hash, prefix, previous_hash, previous_valid_until, \
     name, project, env, scopes, plan, policy, parent, provider_keys, created_at, expires_at, \
     last_used_at, request_count, status, revoked_at, spend";

/// The columns [`provider_key_from_row`] reads, in order.
pub(crate) const PROVIDER_KEY_COLUMNS: &str =
    "id, project, provider, name, sealed, hint, created_at";

/// The columns [`usage_from_row`] reads, in order.
pub(crate) const USAGE_COLUMNS: &str = "at, key_id, project, provider, endpoint, model, \
     tokens_in, tokens_out, cost, latency_ms, status, denial, shadow, \
     cached_tokens, cache_write_tokens, reasoning_tokens, audio_tokens, settlement";

/// Money as stored: BIGINT is signed, so amounts saturate at `i64::MAX`.
pub(crate) fn money(m: Micros) -> i64 {
    i64::try_from(m.0).unwrap_or(i64::MAX)
}

/// A count as stored, saturating at `i64::MAX`.
pub(crate) fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored amount back into money; negative values are corruption.
pub(crate) fn read_money(v: i64, what: &str) -> Result<Micros, StoreError> {
    u64::try_from(v)
        .map(Micros)
        .map_err(|_| StoreError::Corrupt(format!("{what} is negative")))
}

/// Reads column `i`; a value of the wrong type is corruption of `what`.
pub(crate) fn col<'a, T: FromSql<'a>>(
    row: &'a Row,
    i: usize,
    what: &dyn Fn() -> String,
) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|_| StoreError::Corrupt(format!("{}: column {i} has the wrong type", what())))
}

fn corrupt(what: &dyn Fn() -> String, field: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{}: {field}: {why}", what()))
}

fn unsigned(v: i64, what: &dyn Fn() -> String, field: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt(what, field, "negative"))
}

fn hash(s: &str, what: &dyn Fn() -> String, field: &str) -> Result<KeyHash, StoreError> {
    KeyHash::from_hex(s).ok_or_else(|| corrupt(what, field, "not a 32-byte hex hash"))
}

fn json<T: serde::de::DeserializeOwned>(
    s: &str,
    what: &dyn Fn() -> String,
    field: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, field, e))
}

/// The JSON text a value is stored as.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("encoding JSON: {e}")))
}

/// A key record from a row of [`KEY_COLUMNS`].
pub(crate) fn key_from_row(row: &Row) -> Result<KeyRecord, StoreError> {
    let raw_id: String = col(row, 0, &|| "key row".to_owned())?;
    let what = || format!("key {raw_id}");
    let what: &dyn Fn() -> String = &what;
    let id = KeyId::parse(&raw_id).ok_or_else(|| corrupt(what, "id", "malformed"))?;
    let previous_hash: Option<String> = col(row, 3, what)?;
    let env: String = col(row, 7, what)?;
    let env = match env.as_str() {
        "live" => KeyEnv::Live,
        "test" => KeyEnv::Test,
        _ => return Err(corrupt(what, "env", "neither live nor test")),
    };
    let parent: Option<String> = col(row, 11, what)?;
    let parent = match parent {
        Some(p) => Some(KeyId::parse(&p).ok_or_else(|| corrupt(what, "parent", "malformed id"))?),
        None => None,
    };
    let provider_keys: Vec<String> = json(&col::<String>(row, 12, what)?, what, "provider_keys")?;
    let provider_keys = provider_keys
        .iter()
        .map(|s| {
            ProviderKeyId::parse(s).ok_or_else(|| corrupt(what, "provider_keys", "malformed id"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let status: String = col(row, 17, what)?;
    let status = match status.as_str() {
        "active" => KeyStatus::Active,
        "revoked" => KeyStatus::Revoked,
        "expired" => KeyStatus::Expired,
        _ => return Err(corrupt(what, "status", "unknown status")),
    };
    Ok(KeyRecord {
        hash: hash(&col::<String>(row, 1, what)?, what, "hash")?,
        prefix: KeyPrefix::new(col::<String>(row, 2, what)?),
        previous_hash: previous_hash
            .map(|h| hash(&h, what, "previous_hash"))
            .transpose()?,
        previous_valid_until: col::<Option<i64>>(row, 4, what)?.map(UnixMillis),
        name: col(row, 5, what)?,
        project: col(row, 6, what)?,
        env,
        scopes: json::<Scopes>(&col::<String>(row, 8, what)?, what, "scopes")?,
        plan: col(row, 9, what)?,
        policy: json::<Policy>(&col::<String>(row, 10, what)?, what, "policy")?,
        parent,
        provider_keys,
        created_at: UnixMillis(col(row, 13, what)?),
        expires_at: col::<Option<i64>>(row, 14, what)?.map(UnixMillis),
        last_used_at: col::<Option<i64>>(row, 15, what)?.map(UnixMillis),
        request_count: unsigned(col(row, 16, what)?, what, "request_count")?,
        status,
        revoked_at: col::<Option<i64>>(row, 18, what)?.map(UnixMillis),
        spend: Micros(unsigned(col(row, 19, what)?, what, "spend")?),
        id,
    })
}

/// A provider-key record from a row of [`PROVIDER_KEY_COLUMNS`].
pub(crate) fn provider_key_from_row(row: &Row) -> Result<ProviderKeyRecord, StoreError> {
    let raw_id: String = col(row, 0, &|| "provider key row".to_owned())?;
    let what = || format!("provider key {raw_id}");
    let what: &dyn Fn() -> String = &what;
    let id = ProviderKeyId::parse(&raw_id).ok_or_else(|| corrupt(what, "id", "malformed"))?;
    let provider: String = col(row, 2, what)?;
    Ok(ProviderKeyRecord {
        id,
        project: col(row, 1, what)?,
        provider: provider
            .parse::<Provider>()
            .map_err(|_| corrupt(what, "provider", "unknown provider"))?,
        name: col(row, 3, what)?,
        sealed: Sealed::from_bytes(col(row, 4, what)?),
        hint: ProviderKeyHint::from_stored(col(row, 5, what)?),
        created_at: UnixMillis(col(row, 6, what)?),
    })
}

/// A usage record from a row of [`USAGE_COLUMNS`].
pub(crate) fn usage_from_row(row: &Row) -> Result<UsageRecord, StoreError> {
    let what: &dyn Fn() -> String = &|| "usage record".to_owned();
    let key_id: String = col(row, 1, what)?;
    let provider: Option<String> = col(row, 3, what)?;
    let status: i32 = col(row, 10, what)?;
    let settlement: Option<String> = col(row, 17, what)?;
    Ok(UsageRecord {
        at: UnixMillis(col(row, 0, what)?),
        key_id: KeyId::parse(&key_id).ok_or_else(|| corrupt(what, "key_id", "malformed id"))?,
        project: col(row, 2, what)?,
        provider: provider
            .map(|p| p.parse::<Provider>())
            .transpose()
            .map_err(|_| corrupt(what, "provider", "unknown provider"))?,
        endpoint: col(row, 4, what)?,
        model: col(row, 5, what)?,
        tokens_in: unsigned(col(row, 6, what)?, what, "tokens_in")?,
        tokens_out: unsigned(col(row, 7, what)?, what, "tokens_out")?,
        cost: Micros(unsigned(col(row, 8, what)?, what, "cost")?),
        latency_ms: unsigned(col(row, 9, what)?, what, "latency_ms")?,
        status: u16::try_from(status).map_err(|_| corrupt(what, "status", "out of range"))?,
        denial: col(row, 11, what)?,
        shadow: col(row, 12, what)?,
        cached_tokens: unsigned(col(row, 13, what)?, what, "cached_tokens")?,
        cache_write_tokens: unsigned(col(row, 14, what)?, what, "cache_write_tokens")?,
        reasoning_tokens: unsigned(col(row, 15, what)?, what, "reasoning_tokens")?,
        audio_tokens: unsigned(col(row, 16, what)?, what, "audio_tokens")?,
        settlement: settlement
            .map(|s| {
                SettledBy::parse(&s).ok_or_else(|| corrupt(what, "settlement", "unknown rule"))
            })
            .transpose()?,
    })
}
