//! Policies (docs/policy.md) and the engine that enforces them.
//!
//! - [`split_proxy_path`]: the one path canonicaliser (docs/threat-model.md,
//!   E1–E2).
//! - [`parse_policy_yaml`] / [`load_policy_file`]: policy files.
//! - [`PlanSet`]: named presets (`free`, `pro`, `enterprise`, custom).
//! - [`check_child_policy`]: sub-agent keys are subsets of their parent.
//! - [`validate_policy`], [`validate_name`], [`validate_plan_name`]: the
//!   value rules every way of making a key shares.
//! - [`RateLimiter`] and [`InFlight`]: request, token and concurrency limits.
//! - [`SharedLimiter`]: the same limits shared between replicas (a backend
//!   such as `vault-redis`; docs/redis.md).
//! - [`DefaultEngine`]: the [`PolicyEngine`] that puts them together.

mod canonical;
mod default_engine;
mod engine;
mod limits_backend;
mod model;
mod owed;
mod plans;
mod ratelimit;
mod subset;
mod validate;
mod yaml;

pub use canonical::{PathError, split_proxy_path};
pub use default_engine::{DEFAULT_MIN_OUTPUT_TOKENS, DEFAULT_RESERVATION_TTL, DefaultEngine};
pub use engine::{
    BudgetStatus, CallOutcome, Charge, Grant, LimitHeaders, LimitStatus, LimitStatusError,
    PolicyEngine, RequestFacts, WindowKind, WindowStatus,
};
pub use limits_backend::{
    ChainLimit, HeldSlots, LimiterError, LimiterFallback, SharedAdmission, SharedLimiter,
    WindowBounds, WindowCounts,
};
pub use model::{Budget, BudgetPeriod, EndpointRule, ModelGlob, PatternError, Policy, RateLimit};
pub use plans::PlanSet;
pub use ratelimit::{Exceeded, InFlight, InFlightGuard, RateLimiter};
pub use subset::{SubsetError, check_child_policy};
pub use validate::{
    FieldError, MAX_NAME_BYTES, MAX_PLAN_NAME_BYTES, validate_name, validate_plan_name,
    validate_policy,
};
pub use yaml::{
    BadDuration, PolicyError, PolicyFile, load_policy_file, parse_policy_yaml, parse_ttl,
};
