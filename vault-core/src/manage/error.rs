//! Why a management operation was refused or failed.

use crate::store::StoreError;

/// Why a management operation was refused or failed. Each variant is one
/// status and error code of docs/api.md#errors; the message names the field
/// where there is one and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManageError {
    /// 400 `invalid_request`: the request is malformed; names the field.
    #[error("{0}")]
    Invalid(String),
    /// 413 `request_too_large`: the request body is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 403 `permission_denied`: the caller lacks the scope, or a child is
    /// wider than its parent; names the field.
    #[error("{0}")]
    Forbidden(String),
    /// 403 `project_mismatch`: the object or `project` is another project's.
    #[error("API key does not have permission to access this project")]
    ProjectMismatch,
    /// 404 `not_found`: no such object visible to the caller.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 402 `budget_exceeded`: a child's budget does not fit in what its
    /// parent has left.
    #[error("{0}")]
    Budget(String),
    /// 409 `conflict`: an object with that id already exists.
    #[error("{0}")]
    Conflict(String),
    /// 500 `audit_unavailable`: the audit log could not be written, so
    /// nothing was changed.
    #[error("the audit log could not be written; nothing was changed")]
    AuditUnavailable,
    /// 500 `internal_error`: the store or the random source failed; the
    /// details are logged, never returned.
    #[error("internal error")]
    Internal,
    /// 503 `store_unavailable`: the store (PostgreSQL) cannot be reached;
    /// nothing was changed. Retry shortly.
    #[error("the store is unavailable; nothing was changed, retry shortly")]
    StoreUnavailable,
    /// 503 `rate_limiter_unavailable`: the shared rate limiter (Redis)
    /// cannot be read. Retry shortly.
    #[error("the rate limiter is unavailable; retry shortly")]
    LimiterUnavailable,
}

impl ManageError {
    /// The HTTP status docs/api.md#errors gives it.
    pub fn status(&self) -> u16 {
        match self {
            ManageError::Invalid(_) => 400,
            ManageError::TooLarge(_) => 413,
            ManageError::Forbidden(_) | ManageError::ProjectMismatch => 403,
            ManageError::NotFound(_) => 404,
            ManageError::Budget(_) => 402,
            ManageError::Conflict(_) => 409,
            ManageError::AuditUnavailable | ManageError::Internal => 500,
            ManageError::StoreUnavailable | ManageError::LimiterUnavailable => 503,
        }
    }

    /// The error code (docs/api.md#errors).
    pub fn code(&self) -> &'static str {
        match self {
            ManageError::Invalid(_) => "invalid_request",
            ManageError::TooLarge(_) => "request_too_large",
            ManageError::Forbidden(_) => "permission_denied",
            ManageError::ProjectMismatch => "project_mismatch",
            ManageError::NotFound(_) => "not_found",
            ManageError::Budget(_) => "budget_exceeded",
            ManageError::Conflict(_) => "conflict",
            ManageError::AuditUnavailable => "audit_unavailable",
            ManageError::Internal => "internal_error",
            ManageError::StoreUnavailable => "store_unavailable",
            ManageError::LimiterUnavailable => "rate_limiter_unavailable",
        }
    }

    /// The error family SDKs switch on (`error.type`, docs/api.md#errors).
    pub fn kind(&self) -> &'static str {
        match self {
            ManageError::Invalid(_) => "invalid_request_error",
            ManageError::TooLarge(_) => "request_too_large",
            ManageError::Forbidden(_) | ManageError::ProjectMismatch => "permission_error",
            ManageError::NotFound(_) => "not_found_error",
            ManageError::Budget(_) => "insufficient_quota",
            ManageError::Conflict(_) => "conflict_error",
            ManageError::AuditUnavailable
            | ManageError::Internal
            | ManageError::StoreUnavailable
            | ManageError::LimiterUnavailable => "api_error",
        }
    }

    /// Whether the caller is at fault (a 4xx).
    pub fn is_client_error(&self) -> bool {
        (400..500).contains(&self.status())
    }
}

impl From<StoreError> for ManageError {
    fn from(e: StoreError) -> ManageError {
        match e {
            StoreError::NotFound => ManageError::NotFound("key"),
            StoreError::Conflict => {
                ManageError::Conflict("an object with that id already exists".to_owned())
            }
            StoreError::BudgetExceeded { remaining } => ManageError::Budget(format!(
                "budget: the parent has only ${} left to carve out",
                remaining.to_usd_string()
            )),
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "the store is unavailable to a management operation");
                ManageError::StoreUnavailable
            }
            other => {
                tracing::error!(error = %other, "store failure in a management operation");
                ManageError::Internal
            }
        }
    }
}

impl From<crate::policy::LimitStatusError> for ManageError {
    fn from(e: crate::policy::LimitStatusError) -> ManageError {
        match e {
            crate::policy::LimitStatusError::Store(e) => e.into(),
            crate::policy::LimitStatusError::Limiter(e) => {
                tracing::warn!(error = %e, "the rate limiter is unavailable to a management read");
                ManageError::LimiterUnavailable
            }
        }
    }
}

impl From<crate::policy::FieldError> for ManageError {
    fn from(e: crate::policy::FieldError) -> ManageError {
        ManageError::Invalid(e.to_string())
    }
}
