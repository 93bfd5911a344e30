//! Named plans: policy presets a key's explicit policy is overlaid on.
//!
//! Seeds (docs/policy.md#plans): `free` 10 requests/minute and 500/day; `pro`
//! 120/minute and 50,000/day; `enterprise` 1,000/minute, 1,000,000/day and
//! 5,000,000 tokens/minute (generous enough not to bind a single team's
//! traffic, low enough that a leaked key cannot run unbounded). None of them
//! sets a budget or allowlist. Config may define more (`[plans.team]`) or
//! replace a seed with [`PlanSet::with_custom`].

use std::collections::BTreeMap;

use super::model::{Policy, RateLimit};
use super::yaml::PolicyError;

/// The plans a deployment knows, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSet {
    plans: BTreeMap<String, Policy>,
}

impl Default for PlanSet {
    fn default() -> Self {
        PlanSet::seeded()
    }
}

fn rates(per_minute: u64, per_day: u64, tokens_per_minute: Option<u64>) -> Policy {
    Policy {
        rate_limit: Some(RateLimit {
            requests_per_minute: Some(per_minute),
            requests_per_day: Some(per_day),
            requests_per_month: None,
            tokens_per_minute,
        }),
        ..Policy::default()
    }
}

impl PlanSet {
    /// The seed plans `free`, `pro` and `enterprise`.
    pub fn seeded() -> PlanSet {
        let mut plans = BTreeMap::new();
        plans.insert("free".to_owned(), rates(10, 500, None));
        plans.insert("pro".to_owned(), rates(120, 50_000, None));
        plans.insert(
            "enterprise".to_owned(),
            rates(1_000, 1_000_000, Some(5_000_000)),
        );
        PlanSet { plans }
    }

    /// The same set with `name` defined as `policy` (replacing a seed of the
    /// same name).
    pub fn with_custom(mut self, name: &str, policy: Policy) -> PlanSet {
        self.plans.insert(name.to_owned(), policy);
        self
    }

    /// The preset of `name`, if defined.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.plans.get(name)
    }

    /// The defined names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plans.keys().map(String::as_str)
    }

    /// The effective policy: the plan's preset (none when `plan` is `None`)
    /// overlaid by every field `explicit` sets. Rate limits overlay field by
    /// field (an explicit `requests_per_minute` keeps the plan's
    /// `requests_per_day`); `shadow` is on if either turns it on.
    pub fn resolve(&self, plan: Option<&str>, explicit: &Policy) -> Result<Policy, PolicyError> {
        let Some(name) = plan else {
            return Ok(explicit.clone());
        };
        let base = self
            .plans
            .get(name)
            .ok_or_else(|| PolicyError::UnknownPlan {
                name: name.chars().take(64).collect(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })?;
        let rate_limit = match (base.rate_limit, explicit.rate_limit) {
            (Some(b), Some(e)) => Some(RateLimit {
                requests_per_minute: e.requests_per_minute.or(b.requests_per_minute),
                requests_per_day: e.requests_per_day.or(b.requests_per_day),
                requests_per_month: e.requests_per_month.or(b.requests_per_month),
                tokens_per_minute: e.tokens_per_minute.or(b.tokens_per_minute),
            }),
            (b, e) => e.or(b),
        };
        Ok(Policy {
            providers: explicit
                .providers
                .clone()
                .or_else(|| base.providers.clone()),
            endpoints: explicit
                .endpoints
                .clone()
                .or_else(|| base.endpoints.clone()),
            models: explicit.models.clone().or_else(|| base.models.clone()),
            budget: explicit.budget.or(base.budget),
            rate_limit,
            max_request_chars: explicit.max_request_chars.or(base.max_request_chars),
            max_parallel: explicit.max_parallel.or(base.max_parallel),
            shadow: explicit.shadow || base.shadow,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Micros;
    use crate::policy::{Budget, BudgetPeriod, ModelGlob};

    #[test]
    fn seeds_match_the_spec() {
        let plans = PlanSet::seeded();
        let free = plans.resolve(Some("free"), &Policy::default()).unwrap();
        let r = free.rate_limit.unwrap();
        assert_eq!(
            (r.requests_per_minute, r.requests_per_day),
            (Some(10), Some(500))
        );
        let pro = plans.get("pro").unwrap().rate_limit.unwrap();
        assert_eq!(
            (pro.requests_per_minute, pro.requests_per_day),
            (Some(120), Some(50_000))
        );
        assert!(plans.get("enterprise").is_some());
        assert_eq!(
            plans.names().collect::<Vec<_>>(),
            ["enterprise", "free", "pro"]
        );
    }

    #[test]
    fn explicit_fields_overlay_the_plan() {
        let explicit = Policy {
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(5),
                ..RateLimit::default()
            }),
            budget: Some(Budget {
                limit: Micros(1),
                period: BudgetPeriod::Daily,
                clamp_explicit_limits: false,
            }),
            ..Policy::default()
        };
        let p = PlanSet::default().resolve(Some("pro"), &explicit).unwrap();
        let r = p.rate_limit.unwrap();
        assert_eq!(r.requests_per_minute, Some(5));
        assert_eq!(r.requests_per_day, Some(50_000));
        assert_eq!(p.models, explicit.models);
        assert_eq!(p.budget, explicit.budget);
        assert_eq!(
            PlanSet::default().resolve(None, &explicit).unwrap(),
            explicit
        );
    }

    #[test]
    fn custom_plans_and_unknown_names() {
        let team = Policy {
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(300),
                ..RateLimit::default()
            }),
            ..Policy::default()
        };
        let plans = PlanSet::seeded().with_custom("team", team.clone());
        assert_eq!(
            plans.resolve(Some("team"), &Policy::default()).unwrap(),
            team
        );
        let e = plans.resolve(Some("gold"), &Policy::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"gold\"") && msg.contains("team") && msg.contains("free"),
            "{msg}"
        );
    }
}
