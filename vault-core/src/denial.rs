//! Why a request was refused: one enum, one-to-one with the error codes of
//! docs/api.md#errors.

use std::fmt;

/// A refusal. Maps one-to-one to an HTTP status and error code
/// (docs/api.md#errors); the message says what was refused and why, and never
/// holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    /// No credential was presented.
    MissingApiKey,
    /// The credential is malformed, unknown or ambiguous.
    InvalidApiKey,
    /// The key is revoked.
    KeyRevoked,
    /// The key has expired.
    KeyExpired,
    /// The key lacks the scope.
    PermissionDenied(String),
    /// The method + path is outside the endpoint allowlist.
    EndpointNotAllowed(String),
    /// The model is outside the model allowlist.
    ModelNotAllowed(String),
    /// The provider is outside the provider allowlist.
    ProviderNotAllowed(String),
    /// The key belongs to another project.
    ProjectMismatch,
    /// The budget cannot cover the call.
    BudgetExceeded(String),
    /// A rate limit is exhausted; retry after this many seconds.
    RateLimited {
        /// What was exceeded.
        message: String,
        /// Seconds until the next admission.
        retry_after_secs: u64,
    },
    /// The request is malformed where the policy must read it.
    InvalidRequest(String),
    /// The request body is too large.
    RequestTooLarge(String),
    /// The method is not allowed through the proxy (CONNECT, TRACE, upgrades).
    MethodNotAllowed(String),
    /// The request body did not arrive in time.
    RequestTimeout,
    /// The upstream could not be reached or failed.
    UpstreamUnavailable(String),
    /// The upstream did not answer in time.
    UpstreamTimeout(String),
    /// Something failed inside vaultgate; details are logged, not returned.
    Internal,
    /// The shared rate limiter (Redis) cannot be reached, and the call needs
    /// it (docs/redis.md#failure); retry shortly.
    RateLimiterUnavailable,
    /// The store (PostgreSQL) cannot be reached, or what it has not yet
    /// been able to write fills the buffer kept for it
    /// (docs/replicas.md#when-postgresql-stops); retry shortly.
    StoreUnavailable,
}

impl Denial {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Denial::MissingApiKey
            | Denial::InvalidApiKey
            | Denial::KeyRevoked
            | Denial::KeyExpired => 401,
            Denial::PermissionDenied(_)
            | Denial::EndpointNotAllowed(_)
            | Denial::ModelNotAllowed(_)
            | Denial::ProviderNotAllowed(_)
            | Denial::ProjectMismatch => 403,
            Denial::BudgetExceeded(_) => 402,
            Denial::RateLimited { .. } => 429,
            Denial::InvalidRequest(_) => 400,
            Denial::RequestTooLarge(_) => 413,
            Denial::MethodNotAllowed(_) => 405,
            Denial::RequestTimeout => 408,
            Denial::UpstreamUnavailable(_) => 502,
            Denial::UpstreamTimeout(_) => 504,
            Denial::Internal => 500,
            Denial::RateLimiterUnavailable | Denial::StoreUnavailable => 503,
        }
    }

    /// The error code (docs/api.md#errors).
    pub fn code(&self) -> &'static str {
        match self {
            Denial::MissingApiKey => "missing_api_key",
            Denial::InvalidApiKey => "invalid_api_key",
            Denial::KeyRevoked => "key_revoked",
            Denial::KeyExpired => "key_expired",
            Denial::PermissionDenied(_) => "permission_denied",
            Denial::EndpointNotAllowed(_) => "endpoint_not_allowed",
            Denial::ModelNotAllowed(_) => "model_not_allowed",
            Denial::ProviderNotAllowed(_) => "provider_not_allowed",
            Denial::ProjectMismatch => "project_mismatch",
            Denial::BudgetExceeded(_) => "budget_exceeded",
            Denial::RateLimited { .. } => "rate_limited",
            Denial::InvalidRequest(_) => "invalid_request",
            Denial::RequestTooLarge(_) => "request_too_large",
            Denial::MethodNotAllowed(_) => "method_not_allowed",
            Denial::RequestTimeout => "request_timeout",
            Denial::UpstreamUnavailable(_) => "upstream_unavailable",
            Denial::UpstreamTimeout(_) => "upstream_timeout",
            Denial::Internal => "internal_error",
            Denial::RateLimiterUnavailable => "rate_limiter_unavailable",
            Denial::StoreUnavailable => "store_unavailable",
        }
    }

    /// The error `type`: the family SDKs switch on.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            402 => "insufficient_quota",
            429 => "rate_limit_error",
            400 | 405 | 408 => "invalid_request_error",
            413 => "request_too_large",
            502 | 504 => "upstream_error",
            _ => "api_error",
        }
    }

    /// The human message.
    pub fn message(&self) -> String {
        match self {
            Denial::MissingApiKey | Denial::InvalidApiKey => {
                "Invalid or missing API key".to_owned()
            }
            Denial::KeyRevoked => "API key has been revoked".to_owned(),
            Denial::KeyExpired => "API key has expired".to_owned(),
            Denial::ProjectMismatch => {
                "API key does not have permission to access this project".to_owned()
            }
            Denial::RequestTimeout => "the request body did not arrive in time".to_owned(),
            Denial::Internal => "internal error".to_owned(),
            Denial::RateLimiterUnavailable => {
                "the rate limiter is unavailable; retry shortly".to_owned()
            }
            Denial::StoreUnavailable => "the store is unavailable; retry shortly".to_owned(),
            Denial::PermissionDenied(m)
            | Denial::EndpointNotAllowed(m)
            | Denial::ModelNotAllowed(m)
            | Denial::ProviderNotAllowed(m)
            | Denial::BudgetExceeded(m)
            | Denial::InvalidRequest(m)
            | Denial::RequestTooLarge(m)
            | Denial::MethodNotAllowed(m)
            | Denial::UpstreamUnavailable(m)
            | Denial::UpstreamTimeout(m)
            | Denial::RateLimited { message: m, .. } => m.clone(),
        }
    }

    /// The refusal for a store failure on a call's path: 503
    /// `store_unavailable` when the store cannot be reached (fail closed,
    /// retry shortly), else 500 `internal_error`.
    pub fn for_store_error(e: &crate::store::StoreError) -> Denial {
        match e {
            crate::store::StoreError::Unavailable(_) => Denial::StoreUnavailable,
            _ => Denial::Internal,
        }
    }

    /// The JSON error body (docs/api.md#errors):
    /// `{"detail": m, "error": {"type": t, "code": c, "message": m}}`.
    pub fn to_json(&self) -> String {
        let m = self.message();
        serde_json::json!({
            "detail": m,
            "error": {"type": self.error_type(), "code": self.code(), "message": m}
        })
        .to_string()
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape_matches_spec() {
        let v: serde_json::Value = serde_json::from_str(&Denial::MissingApiKey.to_json()).unwrap();
        assert_eq!(v["detail"], "Invalid or missing API key");
        assert_eq!(v["error"]["code"], "missing_api_key");
        assert_eq!(v["error"]["message"], "Invalid or missing API key");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(Denial::ProjectMismatch.status(), 403);
        assert_eq!(Denial::BudgetExceeded(String::new()).status(), 402);
        let v: serde_json::Value =
            serde_json::from_str(&Denial::RateLimiterUnavailable.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "rate_limiter_unavailable");
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(Denial::RateLimiterUnavailable.status(), 503);
    }
}
