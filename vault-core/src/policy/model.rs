//! The policy a key carries, as stored with the key record.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::UnixMillis;
use crate::key::KeyId;
use crate::money::Micros;
use crate::provider::Provider;
use crate::record::BudgetLine;

/// A key's policy: every field optional; absent means "no restriction".
/// Stored with the key record (plans are resolved into it at creation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Providers the key may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<Provider>>,
    /// Upstream method + path patterns the key may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointRule>>,
    /// Model globs the key may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelGlob>>,
    /// A dollar budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Request and token rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Most characters (not bytes) a request body may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_chars: Option<u64>,
    /// Most requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// Evaluate everything, deny nothing, record what would have been denied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// How often a budget starts afresh (UTC, calendar-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    /// Once, for the key's life.
    Total,
    /// Every UTC day.
    Daily,
    /// Every UTC calendar month.
    Monthly,
}

impl BudgetPeriod {
    /// When the period holding `now` began: the epoch for `total`, 00:00 UTC
    /// for `daily`, the first of the month for `monthly`. A budget line is
    /// keyed by it, so spend starts afresh when it moves (docs/budgets.md).
    pub fn start_at(self, now: UnixMillis) -> UnixMillis {
        match self {
            BudgetPeriod::Total => UnixMillis(0),
            BudgetPeriod::Daily => now.start_of_utc_day(),
            BudgetPeriod::Monthly => now.start_of_utc_month(),
        }
    }
}

/// A dollar budget over a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The cap, written `limit_usd: 5.00`.
    #[serde(rename = "limit_usd", with = "usd")]
    pub limit: Micros,
    /// The period; `total` when absent.
    #[serde(default = "default_period")]
    pub period: BudgetPeriod,
    /// When the budget cannot cover a call with the output limit the
    /// client set, forward it with a lower limit instead of refusing it
    /// (limits the client left open are always lowered to what fits).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clamp_explicit_limits: bool,
}

impl Budget {
    /// `key`'s line for this budget in the period holding `now`: what
    /// reservations are held against and spend is summed over.
    pub fn line(&self, key: KeyId, now: UnixMillis) -> BudgetLine {
        BudgetLine {
            key,
            limit: self.limit,
            period_start: self.period.start_at(now),
        }
    }
}

fn default_period() -> BudgetPeriod {
    BudgetPeriod::Total
}

/// Rate limits; each absent field is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Requests per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    /// Requests per UTC month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_month: Option<u64>,
    /// Tokens (in + out) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

mod usd {
    use super::*;

    pub(super) fn serialize<S: Serializer>(m: &Micros, s: S) -> Result<S::Ok, S::Error> {
        // Exact: micro-dollars are at most 16 significant digits here.
        s.serialize_f64(m.0 as f64 / 1e6)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Micros, D::Error> {
        let v = f64::deserialize(d)?;
        Micros::from_usd(v).map_err(serde::de::Error::custom)
    }
}

/// An invalid endpoint rule or model glob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(pub String);

/// `METHOD /path/pattern`: `*` matches any characters within one segment,
/// `**` (a whole last segment) matches the rest. The method may be `*`.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointRule {
    method: Option<String>,
    segments: Vec<String>,
    rest: bool,
    source: String,
}

impl EndpointRule {
    /// Parses `POST /v1/chat/completions`, `* /v1/**`, `POST /v1beta/models/*:generateContent`.
    pub fn parse(s: &str) -> Result<EndpointRule, PatternError> {
        let err = |why: &str| PatternError(format!("invalid endpoint {s:?}: {why}"));
        let (method, path) = s
            .split_once(' ')
            .ok_or_else(|| err("expected METHOD /path"))?;
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.to_owned()),
            _ => return Err(err("the method must be uppercase letters or *")),
        };
        let path = path
            .strip_prefix('/')
            .ok_or_else(|| err("the path must start with /"))?;
        if !path.bytes().all(|b| b.is_ascii_graphic()) || path.contains(['\\', '%', '?', '#']) {
            return Err(err(
                "the path may hold only printable ASCII, no \\ % ? or #",
            ));
        }
        let mut segments: Vec<String> = path.split('/').map(str::to_owned).collect();
        let rest = segments.last().is_some_and(|l| l == "**");
        if rest {
            segments.pop();
        }
        for seg in &segments {
            if seg.is_empty() || seg == "." || seg == ".." || seg.contains("**") {
                return Err(err(
                    "segments must be non-empty, not . or .., and ** only as the last one",
                ));
            }
        }
        Ok(EndpointRule {
            method,
            segments,
            rest,
            source: s.to_owned(),
        })
    }

    /// Whether `method` and the canonical `path` (starting with `/`) match.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(path) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = path.split('/');
        for pat in &self.segments {
            match parts.next() {
                Some(seg) if glob_match(pat, seg) => {}
                _ => return false,
            }
        }
        if self.rest {
            true
        } else {
            parts.next().is_none()
        }
    }

    /// Whether every request this rule admits is admitted by `other`
    /// (a conservative check used for sub-agent subsets).
    pub fn is_within(&self, other: &EndpointRule) -> bool {
        if other.method.is_some() && other.method != self.method {
            return false;
        }
        if self.rest && !other.rest {
            return false;
        }
        if other.rest {
            if self.segments.len() < other.segments.len() {
                return false;
            }
        } else if self.segments.len() != other.segments.len() {
            return false;
        }
        self.segments
            .iter()
            .zip(&other.segments)
            .all(|(mine, theirs)| glob_within(mine, theirs))
    }

    /// The rule as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for EndpointRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointRule({:?})", self.source)
    }
}

impl Serialize for EndpointRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for EndpointRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EndpointRule::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A model name glob: `*` matches any run of characters; everything else
/// matches exactly (case-sensitive, as providers read model names).
#[derive(Clone, PartialEq, Eq)]
pub struct ModelGlob(String);

impl ModelGlob {
    /// Parses a glob: 1 to 256 printable ASCII characters.
    pub fn parse(s: &str) -> Result<ModelGlob, PatternError> {
        if s.is_empty() || s.len() > 256 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PatternError(format!(
                "invalid model pattern {s:?}: 1 to 256 printable ASCII characters, * as wildcard"
            )));
        }
        Ok(ModelGlob(s.to_owned()))
    }

    /// Whether `model` matches.
    pub fn matches(&self, model: &str) -> bool {
        glob_match(&self.0, model)
    }

    /// Whether everything this glob matches is matched by `other`
    /// (conservative: exact text, or `other` matches this glob's text with
    /// its wildcards treated as literals and `other` is a pure `*` glob).
    pub fn is_within(&self, other: &ModelGlob) -> bool {
        glob_within(&self.0, &other.0)
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ModelGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelGlob({:?})", self.0)
    }
}

impl Serialize for ModelGlob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ModelGlob::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `*` matches any run of characters (none included); iterative, no
/// backtracking blow-up.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Whether the language of glob `inner` is contained in that of `outer`:
/// true when `outer` matches `inner` read literally and every `*` of `inner`
/// is absorbed by a `*` of `outer`. Checked by matching `outer` against
/// `inner` with `*` treated as a character only `*` can match.
fn glob_within(inner: &str, outer: &str) -> bool {
    if !inner.contains('*') {
        return glob_match(outer, inner);
    }
    // A wildcard in `inner` can only be covered by a wildcard in `outer`:
    // replace it by a byte no model name or path segment holds, then require
    // `outer` to match that text with its own `*` (which matches anything).
    let probe = inner.replace('*', "\u{1}");
    glob_match(outer, &probe) && outer.contains('*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_lines_start_with_their_period() {
        // 2024-03-15T13:20:00Z.
        let now = UnixMillis(1_710_508_800_000);
        assert_eq!(BudgetPeriod::Total.start_at(now), UnixMillis(0));
        assert_eq!(
            BudgetPeriod::Daily.start_at(now),
            UnixMillis(1_710_460_800_000)
        );
        assert_eq!(
            BudgetPeriod::Monthly.start_at(now),
            UnixMillis(1_709_251_200_000)
        );
        let budget = Budget {
            limit: Micros(5_000_000),
            period: BudgetPeriod::Daily,
            clamp_explicit_limits: false,
        };
        let key = KeyId::generate().unwrap();
        let line = budget.line(key.clone(), now);
        assert_eq!(line.key, key);
        assert_eq!(line.limit, Micros(5_000_000));
        assert_eq!(line.period_start, UnixMillis(1_710_460_800_000));
    }

    #[test]
    fn endpoint_rules_match_segments() {
        let r = EndpointRule::parse("POST /v1/chat/completions").unwrap();
        assert!(r.matches("POST", "/v1/chat/completions"));
        assert!(!r.matches("GET", "/v1/chat/completions"));
        assert!(!r.matches("POST", "/v1/chat/completions/"));
        assert!(!r.matches("POST", "/v1/chat"));
        let g = EndpointRule::parse("POST /v1beta/models/*:generateContent").unwrap();
        assert!(g.matches("POST", "/v1beta/models/gemini-2.0-flash:generateContent"));
        assert!(!g.matches("POST", "/v1beta/models/a/b:generateContent"));
        let any = EndpointRule::parse("* /v1/**").unwrap();
        assert!(any.matches("GET", "/v1/models"));
        assert!(any.matches("DELETE", "/v1/files/x/y"));
        assert!(!any.matches("GET", "/v2/models"));
        for bad in [
            "/v1",
            "post /v1",
            "POST v1",
            "POST /v1/../x",
            "POST /v1//x",
            "POST /a/**/b",
            "POST /v1%2f",
            "POST /a\\b",
        ] {
            assert!(EndpointRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_subsets() {
        let p = |s| EndpointRule::parse(s).unwrap();
        assert!(p("POST /v1/chat/completions").is_within(&p("POST /v1/**")));
        assert!(p("POST /v1/chat/completions").is_within(&p("* /v1/*/completions")));
        assert!(!p("* /v1/chat/completions").is_within(&p("POST /v1/**")));
        assert!(!p("POST /v1/**").is_within(&p("POST /v1/chat/completions")));
        assert!(p("POST /v1/**").is_within(&p("POST /**")));
    }

    #[test]
    fn model_globs() {
        let g = ModelGlob::parse("claude-3-5-haiku-*").unwrap();
        assert!(g.matches("claude-3-5-haiku-20241022"));
        assert!(!g.matches("claude-3-5-sonnet-20241022"));
        assert!(
            !ModelGlob::parse("gpt-4o-mini")
                .unwrap()
                .matches("GPT-4O-MINI")
        );
        assert!(
            !ModelGlob::parse("gpt-4o-mini")
                .unwrap()
                .matches(" gpt-4o-mini")
        );
        assert!(ModelGlob::parse("a b").is_err());
        let sub = ModelGlob::parse("claude-3-5-haiku-2024*").unwrap();
        assert!(sub.is_within(&g));
        assert!(!g.is_within(&sub));
        assert!(
            ModelGlob::parse("x")
                .unwrap()
                .is_within(&ModelGlob::parse("*").unwrap())
        );
        assert!(
            !ModelGlob::parse("*")
                .unwrap()
                .is_within(&ModelGlob::parse("x").unwrap())
        );
    }

    #[test]
    fn glob_is_not_exponential() {
        let text = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*a*a*b", &text));
    }

    #[test]
    fn policy_json_round_trip() {
        let p: Policy = serde_json::from_str(
            r#"{"providers":["openai"],"endpoints":["POST /v1/chat/completions"],"models":["gpt-4o-mini"],
                "budget":{"limit_usd":5.0,"period":"daily"},"rate_limit":{"requests_per_minute":60},
                "max_request_chars":3000}"#,
        )
        .unwrap();
        assert_eq!(p.budget.unwrap().limit, Micros(5_000_000));
        let back: Policy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<Policy>(r#"{"bogus":1}"#).is_err());
    }
}
