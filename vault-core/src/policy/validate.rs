//! The one set of value rules for key names, plan names and policies,
//! shared by policy files, the configuration's `[plans.NAME]` and the
//! management API (docs/policy.md#fields): what one of them refuses, all
//! of them refuse.

use super::model::{Policy, RateLimit};

/// Longest key or provider-key name, in bytes of UTF-8
/// (docs/policy.md#key-level-fields, docs/api.md#post-v1keys).
pub const MAX_NAME_BYTES: usize = 200;

/// Longest plan name, in bytes (docs/policy.md#key-level-fields).
pub const MAX_PLAN_NAME_BYTES: usize = 64;

/// A value outside what docs/policy.md#fields allows, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's dotted path, e.g. `rate_limit.requests_per_minute`.
    pub field: &'static str,
    /// What is wrong, in a sentence.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> Result<(), FieldError> {
    Err(FieldError {
        field,
        message: message.into(),
    })
}

/// A key or provider-key name: at most [`MAX_NAME_BYTES`] bytes of UTF-8,
/// no control characters; empty is allowed (the default).
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return bad(
            "name",
            format!("must be at most {MAX_NAME_BYTES} bytes of UTF-8 with no control characters"),
        );
    }
    Ok(())
}

/// A plan name: 1 to [`MAX_PLAN_NAME_BYTES`] of `a-z`, `0-9`, `-` and `_`.
/// Plans are looked up exactly, so lowercase is the only spelling.
pub fn validate_plan_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PLAN_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return bad(
            "plan",
            format!(
                "invalid plan name {:?}: 1 to {MAX_PLAN_NAME_BYTES} of a-z, 0-9, - and _",
                name.chars().take(64).collect::<String>()
            ),
        );
    }
    Ok(())
}

const EMPTY_LIST: &str =
    "an empty list would allow nothing; list at least one entry, or omit the field to allow all";
const ZERO_LIMIT: &str = "must be at least 1 (omit the field for no limit)";

/// The policy rules a type cannot hold: no empty allowlist, no zero limit,
/// no `rate_limit` that sets nothing. The first problem is reported.
pub fn validate_policy(p: &Policy) -> Result<(), FieldError> {
    if p.providers.as_ref().is_some_and(Vec::is_empty) {
        return bad("providers", EMPTY_LIST);
    }
    if p.endpoints.as_ref().is_some_and(Vec::is_empty) {
        return bad("endpoints", EMPTY_LIST);
    }
    if p.models.as_ref().is_some_and(Vec::is_empty) {
        return bad("models", EMPTY_LIST);
    }
    if let Some(r) = p.rate_limit {
        for (field, v) in [
            ("rate_limit.requests_per_minute", r.requests_per_minute),
            ("rate_limit.requests_per_day", r.requests_per_day),
            ("rate_limit.requests_per_month", r.requests_per_month),
            ("rate_limit.tokens_per_minute", r.tokens_per_minute),
        ] {
            if v == Some(0) {
                return bad(field, ZERO_LIMIT);
            }
        }
        if r == RateLimit::default() {
            return bad(
                "rate_limit",
                "sets no limit; give at least one of requests_per_minute, requests_per_day, requests_per_month, tokens_per_minute, or omit it",
            );
        }
    }
    if p.max_request_chars == Some(0) {
        return bad("max_request_chars", ZERO_LIMIT);
    }
    if p.max_parallel == Some(0) {
        return bad(
            "max_parallel",
            format!("must be from 1 to {}, got 0", u32::MAX),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ModelGlob;

    #[test]
    fn boundary_names() {
        assert!(validate_name("").is_ok());
        assert!(validate_name(&"a".repeat(MAX_NAME_BYTES)).is_ok());
        assert_eq!(
            validate_name(&"a".repeat(MAX_NAME_BYTES + 1))
                .unwrap_err()
                .field,
            "name"
        );
        // 67 three-byte characters are 201 bytes.
        assert!(validate_name(&"€".repeat(67)).is_err());
        assert!(validate_name("a\r\nb").is_err());
    }

    #[test]
    fn boundary_plan_names_are_lowercase() {
        for ok in ["free", "team-2", "a_b"] {
            assert!(validate_plan_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Pro", "PRO", "pro plan", &"a".repeat(65)] {
            assert_eq!(validate_plan_name(bad).unwrap_err().field, "plan", "{bad}");
        }
    }

    #[test]
    fn corruption_empty_lists_and_zero_limits() {
        let cases: [(Policy, &str); 6] = [
            (
                Policy {
                    models: Some(vec![]),
                    ..Policy::default()
                },
                "models",
            ),
            (
                Policy {
                    providers: Some(vec![]),
                    ..Policy::default()
                },
                "providers",
            ),
            (
                Policy {
                    rate_limit: Some(RateLimit::default()),
                    ..Policy::default()
                },
                "rate_limit",
            ),
            (
                Policy {
                    rate_limit: Some(RateLimit {
                        requests_per_day: Some(0),
                        requests_per_minute: Some(1),
                        ..RateLimit::default()
                    }),
                    ..Policy::default()
                },
                "rate_limit.requests_per_day",
            ),
            (
                Policy {
                    max_request_chars: Some(0),
                    ..Policy::default()
                },
                "max_request_chars",
            ),
            (
                Policy {
                    max_parallel: Some(0),
                    ..Policy::default()
                },
                "max_parallel",
            ),
        ];
        for (p, field) in cases {
            assert_eq!(validate_policy(&p).unwrap_err().field, field);
        }
        let ok = Policy {
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            max_parallel: Some(1),
            ..Policy::default()
        };
        assert!(validate_policy(&ok).is_ok());
    }
}
