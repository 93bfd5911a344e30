//! Policy files (docs/policy.md): YAML read with `serde-saphyr`, strictly.
//!
//! Every error names the file, the line (and column when known) and the
//! field, e.g. `agent.policy.yaml:7:1: unknown field "budjet"; expected one
//! of: name, ttl, …`. Unknown fields, duplicate keys, bad durations,
//! negative or non-finite dollars, unknown scopes or providers, bad patterns,
//! empty allowlists and zero limits are all errors.
//!
//! ```
//! use vault_core::policy::parse_policy_yaml;
//! let file = parse_policy_yaml("name: ci\nttl: 1h\nmodels: [gpt-4o-mini]\n", "ci.yaml").unwrap();
//! assert_eq!(file.ttl.unwrap().as_secs(), 3600);
//! let err = parse_policy_yaml("name: ci\nbudjet: 5\n", "ci.yaml").unwrap_err();
//! assert!(err.to_string().starts_with("ci.yaml:2:1: unknown field \"budjet\""));
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::money::Micros;
use crate::provider::Provider;
use crate::scope::{Scope, Scopes};

use super::model::{Budget, BudgetPeriod, EndpointRule, ModelGlob, Policy, RateLimit};
use super::validate::{FieldError, validate_name, validate_plan_name, validate_policy};

/// The largest policy file read, in bytes.
const MAX_FILE_BYTES: usize = 256 * 1024;
/// The longest TTL a policy may give a key: ten years.
const MAX_TTL_SECS: u64 = 10 * 366 * 86_400;

/// A policy that could not be read or resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: cannot read the policy file: {reason}")]
    Read {
        /// The path as given.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// A field is missing, unknown or has a bad value.
    #[error("{origin}{}: {message}", location_suffix(*.line, *.column))]
    Invalid {
        /// The file name (or another origin, e.g. `--policy`).
        origin: String,
        /// 1-based line, when known.
        line: Option<u64>,
        /// 1-based column, when known.
        column: Option<u64>,
        /// The field's dotted path, e.g. `budget.limit_usd` (empty for the
        /// whole document).
        field: String,
        /// What is wrong; names the field.
        message: String,
    },
    /// A plan name that is not defined.
    #[error("unknown plan {name:?}; known plans: {known}")]
    UnknownPlan {
        /// The name asked for.
        name: String,
        /// The defined plans, comma-separated.
        known: String,
    },
}

fn location_suffix(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// A policy file, validated: the key-level fields plus the [`Policy`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyFile {
    /// The key name to use.
    pub name: Option<String>,
    /// How long after creation the key expires.
    pub ttl: Option<Duration>,
    /// The scopes to grant.
    pub scopes: Option<Scopes>,
    /// A plan to resolve the policy from (see [`PlanSet`](super::PlanSet)).
    pub plan: Option<String>,
    /// The explicit policy fields (overlaid on the plan's).
    pub policy: Policy,
}

/// A duration such as `90s`, `5m`, `1h`, `24h` or `7d` that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {0:?}: expected a whole number followed by s, m, h or d (e.g. 90s, 5m, 1h, 7d), above zero and at most 3660d"
)]
pub struct BadDuration(pub String);

/// Parses `90s`, `5m`, `1h`, `24h`, `7d`: a positive whole number and one
/// unit, no spaces, at most ten years.
pub fn parse_ttl(s: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(s.chars().take(64).collect());
    let split = s.len().checked_sub(1).ok_or_else(bad)?;
    let (digits, unit) = s.split_at_checked(split).ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(unit_secs).ok_or_else(bad)?;
    if secs == 0 || secs > MAX_TTL_SECS {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

/// Reads and validates a policy file; errors name the file by `path`.
pub fn load_policy_file(path: &Path) -> Result<PolicyFile, PolicyError> {
    let shown = path.display().to_string();
    let read_err = |reason: String| PolicyError::Read {
        path: shown.clone(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Err(read_err(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
    parse_policy_yaml(&text, &shown)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    plan: Option<Spanned<String>>,
    providers: Option<Spanned<Vec<Spanned<String>>>>,
    endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    models: Option<Spanned<Vec<Spanned<String>>>>,
    budget: Option<Spanned<RawBudget>>,
    rate_limit: Option<Spanned<RawRateLimit>>,
    max_request_chars: Option<Spanned<u64>>,
    max_parallel: Option<Spanned<u64>>,
    shadow: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    limit_usd: Spanned<f64>,
    period: Option<Spanned<String>>,
    clamp_explicit_limits: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_minute: Option<Spanned<u64>>,
    requests_per_day: Option<Spanned<u64>>,
    requests_per_month: Option<Spanned<u64>>,
    tokens_per_minute: Option<Spanned<u64>>,
}

/// Parses and validates policy YAML; `origin` names it in errors (usually
/// the file name).
pub fn parse_policy_yaml(text: &str, origin: &str) -> Result<PolicyFile, PolicyError> {
    let ctx = Ctx { origin, text };
    if text.len() > MAX_FILE_BYTES {
        return Err(ctx.whole(format!("the policy is larger than {MAX_FILE_BYTES} bytes")));
    }
    let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| ctx.serde_error(&e))?;
    ctx.validate(raw)
}

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn whole(&self, message: String) -> PolicyError {
        PolicyError::Invalid {
            origin: self.origin.to_owned(),
            line: None,
            column: None,
            field: String::new(),
            message,
        }
    }

    fn at(&self, loc: &Location, field: &str, what: impl std::fmt::Display) -> PolicyError {
        let known = *loc != Location::UNKNOWN && loc.line() > 0;
        PolicyError::Invalid {
            origin: self.origin.to_owned(),
            line: known.then(|| loc.line()),
            column: known.then(|| loc.column()),
            field: field.to_owned(),
            message: format!("{field}: {what}"),
        }
    }

    /// Turns a parser error into one naming the field at its location.
    fn serde_error(&self, e: &serde_saphyr::Error) -> PolicyError {
        let mut opts = serde_saphyr::RenderOptions::default();
        opts.snippets = serde_saphyr::SnippetMode::Off;
        let rendered = e.render_with_options(opts);
        let plain = match rendered.rfind(" at line ") {
            Some(i) => &rendered[..i],
            None => rendered.as_str(),
        };
        // The parser suggests one of its own options; a policy has none.
        let plain = plain
            .split_once(", set DuplicateKeyPolicy")
            .map_or(plain, |(head, _)| head);
        let (line, column) = match e.location() {
            Some(l) if l.line() > 0 => (Some(l.line()), Some(l.column())),
            _ => (None, None),
        };
        let path = line
            .zip(column)
            .map(|(l, c)| field_path_at(self.text, l, c))
            .unwrap_or_default();
        let message = if let Some(rest) = plain.strip_prefix("unknown field `") {
            let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let expected = expected
                .trim_start_matches(", ")
                .trim_start_matches("expected one of ")
                .trim_start_matches("expected ");
            let parent = parent_of(&path, name);
            let inside = if parent.is_empty() {
                String::new()
            } else {
                format!(" in {parent}")
            };
            format!("unknown field \"{name}\"{inside}; expected one of: {expected}")
        } else if path.is_empty() {
            format!("{plain} (expected a mapping of policy fields)")
        } else {
            format!("{path}: {plain}")
        };
        PolicyError::Invalid {
            origin: self.origin.to_owned(),
            line,
            column,
            field: path,
            message,
        }
    }

    fn validate(&self, raw: RawFile) -> Result<PolicyFile, PolicyError> {
        let mut out = PolicyFile::default();
        let mut any = false;
        // Where each policy field was written, for the shared rules'
        // errors (docs/policy.md#fields) checked at the end.
        let mut spans: Vec<(&'static str, Location)> = Vec::new();
        if let Some(name) = raw.name {
            any = true;
            validate_name(&name.value).map_err(|e| self.field_at(&name.referenced, &e))?;
            out.name = Some(name.value);
        }
        if let Some(ttl) = raw.ttl {
            any = true;
            let d = parse_ttl(&ttl.value).map_err(|e| self.at(&ttl.referenced, "ttl", e))?;
            out.ttl = Some(d);
        }
        if let Some(scopes) = raw.scopes {
            any = true;
            let items = self.non_empty(scopes, "scopes")?;
            for s in &items {
                Scope::parse(&s.value).map_err(|e| self.at(&s.referenced, "scopes", e))?;
            }
            let names: Vec<&str> = items.iter().map(|s| s.value.as_str()).collect();
            let parsed = Scopes::parse(&names).map_err(|e| self.whole(format!("scopes: {e}")))?;
            out.scopes = Some(parsed);
        }
        if let Some(plan) = raw.plan {
            any = true;
            validate_plan_name(&plan.value).map_err(|e| self.field_at(&plan.referenced, &e))?;
            out.plan = Some(plan.value);
        }
        if let Some(providers) = raw.providers {
            any = true;
            let mut list = Vec::new();
            spans.push(("providers", providers.referenced));
            for p in providers.value {
                let provider: Provider = p
                    .value
                    .parse()
                    .map_err(|e| self.at(&p.referenced, "providers", e))?;
                if !list.contains(&provider) {
                    list.push(provider);
                }
            }
            out.policy.providers = Some(list);
        }
        if let Some(endpoints) = raw.endpoints {
            any = true;
            let mut list = Vec::new();
            spans.push(("endpoints", endpoints.referenced));
            for e in endpoints.value {
                list.push(
                    EndpointRule::parse(&e.value)
                        .map_err(|err| self.at(&e.referenced, "endpoints", err))?,
                );
            }
            out.policy.endpoints = Some(list);
        }
        if let Some(models) = raw.models {
            any = true;
            let mut list = Vec::new();
            spans.push(("models", models.referenced));
            for m in models.value {
                list.push(
                    ModelGlob::parse(&m.value)
                        .map_err(|err| self.at(&m.referenced, "models", err))?,
                );
            }
            out.policy.models = Some(list);
        }
        if let Some(budget) = raw.budget {
            any = true;
            let b = budget.value;
            let limit = Micros::from_usd(b.limit_usd.value).map_err(|_| {
                self.at(
                    &b.limit_usd.referenced,
                    "budget.limit_usd",
                    format!(
                        "must be a finite number of dollars from 0 to 1000000000, got {}",
                        b.limit_usd.value
                    ),
                )
            })?;
            let period = match b.period {
                None => BudgetPeriod::Total,
                Some(p) => match p.value.as_str() {
                    "total" => BudgetPeriod::Total,
                    "daily" => BudgetPeriod::Daily,
                    "monthly" => BudgetPeriod::Monthly,
                    other => {
                        return Err(self.at(
                            &p.referenced,
                            "budget.period",
                            format!(
                                "unknown period {:?}; expected one of: total, daily, monthly",
                                other.chars().take(64).collect::<String>()
                            ),
                        ));
                    }
                },
            };
            out.policy.budget = Some(Budget {
                limit,
                period,
                clamp_explicit_limits: b.clamp_explicit_limits.is_some_and(|c| c.value),
            });
        }
        if let Some(rate) = raw.rate_limit {
            any = true;
            spans.push(("rate_limit", rate.referenced));
            let r = rate.value;
            let mut value = |v: Option<Spanned<u64>>, field: &'static str| {
                v.map(|s| {
                    spans.push((field, s.referenced));
                    s.value
                })
            };
            out.policy.rate_limit = Some(RateLimit {
                requests_per_minute: value(r.requests_per_minute, "rate_limit.requests_per_minute"),
                requests_per_day: value(r.requests_per_day, "rate_limit.requests_per_day"),
                requests_per_month: value(r.requests_per_month, "rate_limit.requests_per_month"),
                tokens_per_minute: value(r.tokens_per_minute, "rate_limit.tokens_per_minute"),
            });
        }
        if let Some(m) = raw.max_request_chars {
            any = true;
            spans.push(("max_request_chars", m.referenced));
            out.policy.max_request_chars = Some(m.value);
        }
        if let Some(m) = raw.max_parallel {
            any = true;
            spans.push(("max_parallel", m.referenced));
            let v = u32::try_from(m.value).ok().ok_or_else(|| {
                self.at(
                    &m.referenced,
                    "max_parallel",
                    format!("must be from 1 to {}, got {}", u32::MAX, m.value),
                )
            })?;
            out.policy.max_parallel = Some(v);
        }
        if let Some(s) = raw.shadow {
            any = true;
            out.policy.shadow = s.value;
        }
        if !any {
            return Err(self.whole(
                "the policy sets no fields; expected a mapping such as `name: my-key`".to_owned(),
            ));
        }
        validate_policy(&out.policy).map_err(|e| {
            let at = spans
                .iter()
                .find(|(field, _)| *field == e.field)
                .map_or(Location::UNKNOWN, |(_, loc)| *loc);
            self.field_at(&at, &e)
        })?;
        Ok(out)
    }

    /// A shared rule's error ([`validate_policy`] and friends) at `loc`.
    fn field_at(&self, loc: &Location, e: &FieldError) -> PolicyError {
        self.at(loc, e.field, &e.message)
    }

    fn non_empty<T>(
        &self,
        list: Spanned<Vec<Spanned<T>>>,
        field: &str,
    ) -> Result<Vec<Spanned<T>>, PolicyError> {
        if list.value.is_empty() {
            return Err(self.at(
                &list.referenced,
                field,
                "an empty list would allow nothing; list at least one entry, or omit the field to allow all",
            ));
        }
        Ok(list.value)
    }
}

/// The dotted path of the field whose key or value is at `line:column`
/// (1-based), from the YAML text's block indentation and any flow-mapping
/// keys before the column on that line. A best effort for parser errors;
/// validation errors know their field exactly.
fn field_path_at(text: &str, line: u64, column: u64) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(idx) = usize::try_from(line).ok().and_then(|l| l.checked_sub(1)) else {
        return String::new();
    };
    let Some(target) = lines.get(idx) else {
        return String::new();
    };
    let col = usize::try_from(column).unwrap_or(0);
    // Keys on the target line up to and including one starting at the column.
    let upto: String = target.chars().take(col.saturating_sub(1)).collect();
    let tail: String = target.chars().skip(col.saturating_sub(1)).collect();
    let mut on_line = keys_in(&upto);
    if let Some(k) = keys_in(&tail)
        .into_iter()
        .next()
        .filter(|_| tail_starts_with_key(&tail))
    {
        on_line.push(k);
    }
    let mut indent = content_indent(target);
    let mut ancestors = Vec::new();
    for prev in lines[..idx].iter().rev() {
        if indent == 0 {
            break;
        }
        let t = prev.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let i = content_indent(prev);
        if i < indent {
            if let Some(k) = keys_in(prev).into_iter().next() {
                ancestors.push(k);
            }
            indent = i;
        }
    }
    ancestors.reverse();
    ancestors.extend(on_line);
    ancestors.join(".")
}

/// Where a line's content starts, past indentation and `- ` markers.
fn content_indent(line: &str) -> usize {
    let mut i = 0;
    let b = line.as_bytes();
    loop {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i + 1 < b.len() && b[i] == b'-' && b[i + 1] == b' ' {
            i += 2;
        } else {
            return i;
        }
    }
}

fn tail_starts_with_key(tail: &str) -> bool {
    tail.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Plain `key:` (followed by a space, a flow brace or the line end) in order.
fn keys_in(s: &str) -> Vec<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_alphanumeric() || b[i] == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let at_word_start = start == 0 || matches!(b[start - 1], b' ' | b'{' | b',' | b'-');
            let colon = b.get(i) == Some(&b':')
                && b.get(i + 1).is_none_or(|n| matches!(n, b' ' | b'{' | b'['));
            if at_word_start && colon {
                out.push(s[start..i].to_owned());
            }
        } else if b[i] == b'#' {
            break;
        } else {
            i += 1;
        }
    }
    out
}

/// `budget.limit` with unknown field `limit` → `budget`.
fn parent_of(path: &str, name: &str) -> String {
    match path.strip_suffix(name) {
        Some(p) => p.trim_end_matches('.').to_owned(),
        None => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
name: nightly-eval
ttl: 1h                       # key expires 1 hour after creation
scopes: [chat:write]
providers: [openai, anthropic]
endpoints:                    # upstream method + path
  - POST /v1/chat/completions
  - POST /v1/messages
models: [gpt-4o-mini, \"claude-3-5-haiku-*\"]
budget:
  limit_usd: 5.00
  period: total               # total | daily | monthly
rate_limit:
  requests_per_minute: 60
  requests_per_day: 500
  tokens_per_minute: 200000
max_request_chars: 3000
";

    #[test]
    fn the_spec_example_parses() {
        let f = parse_policy_yaml(FULL, "agent.policy.yaml").unwrap();
        assert_eq!(f.name.as_deref(), Some("nightly-eval"));
        assert_eq!(f.ttl, Some(Duration::from_secs(3600)));
        assert!(
            f.scopes
                .unwrap()
                .allows(crate::scope::Permission::ChatWrite)
        );
        let p = f.policy;
        assert_eq!(
            p.providers,
            Some(vec![Provider::OpenAi, Provider::Anthropic])
        );
        assert_eq!(p.endpoints.unwrap().len(), 2);
        assert!(p.models.unwrap()[1].matches("claude-3-5-haiku-20241022"));
        assert_eq!(
            p.budget,
            Some(Budget {
                limit: Micros(5_000_000),
                period: BudgetPeriod::Total,
                clamp_explicit_limits: false,
            })
        );
        let r = p.rate_limit.unwrap();
        assert_eq!(r.requests_per_minute, Some(60));
        assert_eq!(r.tokens_per_minute, Some(200_000));
        assert_eq!(p.max_request_chars, Some(3000));
        assert!(!p.shadow);
    }

    #[test]
    fn ttls() {
        for (s, secs) in [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("24h", 86_400),
            ("7d", 604_800),
        ] {
            assert_eq!(parse_ttl(s).unwrap().as_secs(), secs, "{s}");
        }
        for bad in [
            "",
            "h",
            "0s",
            "1",
            "1 h",
            "-1h",
            "1.5h",
            "1H",
            "1w",
            "99999999999999d",
            "3661d",
            "١h",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_paths() {
        let t =
            "name: a\nbudget:\n  limit_usd: abc\n  period: x\nrate_limit: {requests_per_day: -1}\n";
        assert_eq!(field_path_at(t, 3, 14), "budget.limit_usd");
        assert_eq!(field_path_at(t, 4, 3), "budget.period");
        assert_eq!(field_path_at(t, 5, 31), "rate_limit.requests_per_day");
        assert_eq!(field_path_at("scopes:\n  - chat:x\n", 2, 5), "scopes");
    }
}
