//! Policies (SPEC §3) and the engine that enforces them.

mod engine;
mod model;

pub use engine::{CallOutcome, Charge, Grant, LimitHeaders, PolicyEngine, RequestFacts};
pub use model::{Budget, BudgetPeriod, EndpointRule, ModelGlob, PatternError, Policy, RateLimit};
