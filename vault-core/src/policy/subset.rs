//! Sub-agent keys: a child's grants must be a subset of its parent's.
//!
//! Rules, per field (the error names it):
//! - `ttl`: a child expiring after its parent is refused. A child with no
//!   expiry under an expiring parent is accepted: the engine disables every
//!   descendant of an expired key, so it inherits the parent's expiry.
//! - `scopes`: every permission the child's scopes allow, the parent's allow.
//! - `providers`, `endpoints`, `models`: each child entry must lie within
//!   one parent entry. An absent child allowlist under a restricted parent
//!   is accepted and still binds: the engine checks the allowlists of every
//!   key in the chain on each call (docs/policy.md#sub-agent-keys), so
//!   nothing is copied into the child's record, which shows what was set
//!   for the child itself.
//! - `budget`: a child of a budgeted parent must have a `total` budget no
//!   larger than the parent's limit (the carve-out of the parent's
//!   *remaining* budget is checked atomically by the store).
//! - `rate_limit`, `max_request_chars`, `max_parallel`: a child value may
//!   not exceed the parent's; absent values inherit (ancestors' limits bind
//!   their descendants' requests in the engine).
//! - `shadow`: a shadow-mode child of an enforcing parent is refused.

use crate::clock::UnixMillis;
use crate::record::KeyRecord;
use crate::scope::Scopes;

use super::model::{BudgetPeriod, Policy};

/// A child policy wider than its parent's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SubsetError {
    /// The field that is wider: `ttl`, `scopes`, `providers`, `endpoints`,
    /// `models`, `budget`, `rate_limit`, `max_request_chars`,
    /// `max_parallel` or `shadow`.
    pub field: &'static str,
    /// Why, in a sentence.
    pub message: String,
}

fn wider(field: &'static str, message: impl Into<String>) -> SubsetError {
    SubsetError {
        field,
        message: message.into(),
    }
}

/// Checks that a child key with these scopes, policy and expiry grants no
/// more than `parent` (see the module docs for each field's rule).
pub fn check_child_policy(
    parent: &KeyRecord,
    child_scopes: &Scopes,
    child: &Policy,
    child_expires_at: Option<UnixMillis>,
) -> Result<(), SubsetError> {
    let pp = &parent.policy;
    if let (Some(p), Some(c)) = (parent.expires_at, child_expires_at)
        && c > p
    {
        return Err(wider(
            "ttl",
            format!(
                "the child would expire at {}, after its parent ({})",
                c.to_rfc3339(),
                p.to_rfc3339()
            ),
        ));
    }
    if !child_scopes.is_subset_of(&parent.scopes) {
        return Err(wider(
            "scopes",
            "the child asks for a scope its parent does not hold",
        ));
    }
    if let (Some(parent_list), Some(child_list)) = (&pp.providers, &child.providers)
        && let Some(extra) = child_list.iter().find(|c| !parent_list.contains(c))
    {
        return Err(wider(
            "providers",
            format!("provider {extra} is not allowed for the parent"),
        ));
    }
    if let (Some(parent_list), Some(child_list)) = (&pp.endpoints, &child.endpoints)
        && let Some(extra) = child_list
            .iter()
            .find(|c| !parent_list.iter().any(|p| c.is_within(p)))
    {
        return Err(wider(
            "endpoints",
            format!(
                "endpoint {:?} is not within the parent's endpoints",
                extra.as_str()
            ),
        ));
    }
    if let (Some(parent_list), Some(child_list)) = (&pp.models, &child.models)
        && let Some(extra) = child_list
            .iter()
            .find(|c| !parent_list.iter().any(|p| c.is_within(p)))
    {
        return Err(wider(
            "models",
            format!(
                "model {:?} is not within the parent's models",
                extra.as_str()
            ),
        ));
    }
    if let Some(pb) = pp.budget {
        match child.budget {
            None => {
                return Err(wider(
                    "budget",
                    format!(
                        "the parent has a budget, so the child needs one (period total, at most {})",
                        pb.limit
                    ),
                ));
            }
            Some(cb) if cb.period != BudgetPeriod::Total => {
                return Err(wider(
                    "budget",
                    "a child's budget is a carve-out of its parent's, so its period must be total",
                ));
            }
            Some(cb) if cb.limit > pb.limit => {
                return Err(wider(
                    "budget",
                    format!(
                        "the child's budget {} exceeds the parent's {}",
                        cb.limit, pb.limit
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if let (Some(pr), Some(cr)) = (pp.rate_limit, child.rate_limit) {
        let pairs = [
            (
                "requests_per_minute",
                pr.requests_per_minute,
                cr.requests_per_minute,
            ),
            ("requests_per_day", pr.requests_per_day, cr.requests_per_day),
            (
                "requests_per_month",
                pr.requests_per_month,
                cr.requests_per_month,
            ),
            (
                "tokens_per_minute",
                pr.tokens_per_minute,
                cr.tokens_per_minute,
            ),
        ];
        for (name, p, c) in pairs {
            if let (Some(p), Some(c)) = (p, c)
                && c > p
            {
                return Err(wider(
                    "rate_limit",
                    format!("{name} {c} exceeds the parent's {p}"),
                ));
            }
        }
    }
    if let (Some(p), Some(c)) = (pp.max_request_chars, child.max_request_chars)
        && c > p
    {
        return Err(wider(
            "max_request_chars",
            format!("{c} exceeds the parent's {p}"),
        ));
    }
    if let (Some(p), Some(c)) = (pp.max_parallel, child.max_parallel)
        && c > p
    {
        return Err(wider(
            "max_parallel",
            format!("{c} exceeds the parent's {p}"),
        ));
    }
    if child.shadow && !pp.shadow {
        return Err(wider(
            "shadow",
            "a child of an enforcing parent cannot run in shadow mode",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
    use crate::money::Micros;
    use crate::policy::{Budget, EndpointRule, ModelGlob, RateLimit};
    use crate::provider::Provider;
    use crate::record::KeyStatus;

    pub(crate) fn record(policy: Policy, scopes: &[&str], expires_at: Option<i64>) -> KeyRecord {
        KeyRecord {
            id: KeyId::parse("key_parent").unwrap(),
            hash: KeyHash::of("x"),
            prefix: KeyPrefix::new("vpx_live_abcd"),
            previous_hash: None,
            previous_valid_until: None,
            name: "parent".into(),
            project: "default".into(),
            env: KeyEnv::Live,
            scopes: Scopes::parse(scopes).unwrap(),
            plan: None,
            policy,
            parent: None,
            provider_keys: vec![],
            created_at: UnixMillis(0),
            expires_at: expires_at.map(UnixMillis),
            last_used_at: None,
            request_count: 0,
            status: KeyStatus::Active,
            revoked_at: None,
            spend: Micros::ZERO,
        }
    }

    fn restricted() -> Policy {
        Policy {
            providers: Some(vec![Provider::OpenAi]),
            endpoints: Some(vec![EndpointRule::parse("POST /v1/**").unwrap()]),
            models: Some(vec![ModelGlob::parse("gpt-4o*").unwrap()]),
            budget: Some(Budget {
                limit: Micros(5_000_000),
                period: BudgetPeriod::Monthly,
                clamp_explicit_limits: false,
            }),
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(60),
                ..RateLimit::default()
            }),
            max_request_chars: Some(1000),
            max_parallel: Some(4),
            shadow: false,
        }
    }

    fn child_ok() -> Policy {
        Policy {
            providers: Some(vec![Provider::OpenAi]),
            endpoints: Some(vec![
                EndpointRule::parse("POST /v1/chat/completions").unwrap(),
            ]),
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            budget: Some(Budget {
                limit: Micros(3_000_000),
                period: BudgetPeriod::Total,
                clamp_explicit_limits: false,
            }),
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(10),
                ..RateLimit::default()
            }),
            max_request_chars: Some(500),
            max_parallel: Some(2),
            shadow: false,
        }
    }

    #[test]
    fn a_narrower_child_passes() {
        let parent = record(restricted(), &["chat:write", "usage:read"], Some(10_000));
        let scopes = Scopes::parse(&["chat:write"]).unwrap();
        check_child_policy(&parent, &scopes, &child_ok(), Some(UnixMillis(10_000))).unwrap();
        check_child_policy(&parent, &scopes, &child_ok(), None).unwrap();
    }

    #[test]
    fn every_wider_field_is_named() {
        let parent = record(restricted(), &["chat:write"], Some(10_000));
        let scopes = Scopes::parse(&["chat:write"]).unwrap();
        let case = |field: &str, f: &dyn Fn(&mut Policy)| {
            let mut c = child_ok();
            f(&mut c);
            let e = check_child_policy(&parent, &scopes, &c, None).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        };
        case("providers", &|c| {
            c.providers = Some(vec![Provider::OpenAi, Provider::Anthropic])
        });
        case("endpoints", &|c| {
            c.endpoints = Some(vec![EndpointRule::parse("GET /v1/files").unwrap()])
        });
        case("models", &|c| {
            c.models = Some(vec![ModelGlob::parse("*").unwrap()])
        });
        case("budget", &|c| c.budget = None);
        case("budget", &|c| {
            c.budget = Some(Budget {
                limit: Micros(6_000_000),
                period: BudgetPeriod::Total,
                clamp_explicit_limits: false,
            })
        });
        case("budget", &|c| {
            c.budget = Some(Budget {
                limit: Micros(1),
                period: BudgetPeriod::Daily,
                clamp_explicit_limits: false,
            })
        });
        case("rate_limit", &|c| {
            c.rate_limit = Some(RateLimit {
                requests_per_minute: Some(61),
                ..RateLimit::default()
            })
        });
        case("max_request_chars", &|c| c.max_request_chars = Some(1001));
        case("max_parallel", &|c| c.max_parallel = Some(5));
        case("shadow", &|c| c.shadow = true);
        let e = check_child_policy(&parent, &scopes, &child_ok(), Some(UnixMillis(10_001)))
            .unwrap_err();
        assert_eq!(e.field, "ttl");
        let e = check_child_policy(&parent, &Scopes::parse(&["*"]).unwrap(), &child_ok(), None)
            .unwrap_err();
        assert_eq!(e.field, "scopes");
    }
}
