//! The library's part of the optional `vaultgate.toml`
//! (docs/configuration.md): upstreams, plans, prices and request limits.
//! Every field has a default, so no file is needed to start; an unknown key
//! or a bad value is an error that names the file, the field and what is
//! allowed. Keys only an application reads (the `vaultgate` binary's
//! `listen`, `data_dir`, `log_format`, `[store]`, `[redis]`) are named by it in
//! [`Config::parse_for`] and parsed by it from the same text.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::money::Micros;
use crate::policy::{
    Budget, EndpointRule, ModelGlob, Policy, RateLimit, validate_plan_name, validate_policy,
};
use crate::provider::Provider;

/// A configuration problem, in one sentence naming file, field and what is
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The configuration the library's parts read.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Defaults for every provider.
    pub upstream: UpstreamSettings,
    /// Per-provider overrides.
    pub providers: BTreeMap<Provider, ProviderSettings>,
    /// Custom plans, by name.
    pub plans: BTreeMap<String, Policy>,
    /// Price overrides, `"provider/model"` → price.
    pub prices: BTreeMap<(Provider, String), PriceSetting>,
    /// The price used for budgeted calls to unpriced models (none: refuse them).
    pub fallback_price: Option<PriceSetting>,
    /// Whether `vpx_test_` keys are answered by the mock provider.
    pub test_keys_use_mock: bool,
    /// Require a `usage:read` key for `/metrics`.
    pub protect_metrics: bool,
    /// Largest proxied request body, in bytes.
    pub max_body_bytes: usize,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for response headers.
    pub response_timeout: Duration,
    /// Longest silence inside a streamed body.
    pub idle_timeout: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// One provider's settings: a base URL and any timeout override.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProviderSettings {
    /// Where the provider lives (overrides the public default).
    pub base_url: Option<String>,
    /// Timeouts, with unset fields taken from `[upstream]`.
    pub timeouts: UpstreamSettings,
}

/// A price in USD per million tokens, as micro-dollars per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceSetting {
    /// Input tokens.
    pub input: Micros,
    /// Output tokens.
    pub output: Micros,
    /// Most output tokens a call can produce, if known.
    pub max_output_tokens: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstream: UpstreamSettings::default(),
            providers: BTreeMap::new(),
            plans: BTreeMap::new(),
            prices: BTreeMap::new(),
            fallback_price: None,
            test_keys_use_mock: true,
            protect_metrics: false,
            max_body_bytes: 10 << 20,
        }
    }
}

/// The library's top-level keys. Unknown top-level keys are found before
/// this is read (see [`Config::parse_for`]), so it does not deny them;
/// every nested table does.
const KEYS: [&str; 8] = [
    "test_keys_use_mock",
    "protect_metrics",
    "max_body_bytes",
    "upstream",
    "providers",
    "plans",
    "prices",
    "fallback_price",
];

#[derive(Debug, Deserialize)]
struct RawConfig {
    test_keys_use_mock: Option<bool>,
    protect_metrics: Option<bool>,
    max_body_bytes: Option<usize>,
    upstream: Option<RawTimeouts>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
    fallback_price: Option<RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    providers: Option<Vec<Provider>>,
    endpoints: Option<Vec<EndpointRule>>,
    models: Option<Vec<ModelGlob>>,
    budget: Option<Budget>,
    rate_limit: Option<RateLimit>,
    max_request_chars: Option<u64>,
    max_parallel: Option<u32>,
    shadow: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    max_output_tokens: Option<u64>,
}

/// Parses `250ms`, `90s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

/// Reads a configuration file; the error names it.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot be read: {e}", path.display())))
}

/// Deserialises TOML `text` into `T`; errors name `origin`, the line where
/// known, and the field.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_owned();
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(l) => ConfigError(format!("{origin}:{l}: {msg}")),
            None => ConfigError(format!("{origin}: {msg}")),
        }
    })
}

/// The line (from 1) where top-level `key` is written, before any table.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with('[') {
            return None;
        }
        let name = t.split(['=', ' ', '\t']).next().unwrap_or("");
        if name.trim_matches('"') == key {
            return Some(i + 1);
        }
    }
    None
}

impl Config {
    /// Loads a file; errors name the file, the field (and line where known).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_for(text, origin, &[])
    }

    /// Parses TOML text in which the top-level keys `app_keys` belong to
    /// the application (which reads them from the same text, e.g. with
    /// [`parse_toml`]); any other key the library does not know is an
    /// error naming it and the line.
    pub fn parse_for(text: &str, origin: &str, app_keys: &[&str]) -> Result<Config, ConfigError> {
        let table: toml::Table = parse_toml(text, origin)?;
        // The first unknown key as written (the table is sorted by name).
        let unknown = table
            .keys()
            .filter(|k| !KEYS.contains(&k.as_str()) && !app_keys.contains(&k.as_str()))
            .map(|k| (line_of_key(text, k), k))
            .min_by_key(|(line, _)| line.unwrap_or(usize::MAX));
        if let Some((line, key)) = unknown {
            let expected: Vec<String> = app_keys
                .iter()
                .chain(KEYS.iter())
                .map(|k| format!("`{k}`"))
                .collect();
            let at = line.map_or_else(String::new, |l| format!(":{l}"));
            return Err(ConfigError(format!(
                "{origin}{at}: unknown field `{key}`, expected one of {}",
                expected.join(", ")
            )));
        }
        let raw: RawConfig = parse_toml(text, origin)?;
        let err = |field: &str, allowed: &str| ConfigError(format!("{origin}: {field}: {allowed}"));
        let dur =
            |field: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(s) => parse_duration(s)
                        .ok_or_else(|| err(field, "expected a duration like 250ms, 5s, 2m or 1h")),
                }
            };
        let mut cfg = Config::default();
        if let Some(b) = raw.test_keys_use_mock {
            cfg.test_keys_use_mock = b;
        }
        if let Some(b) = raw.protect_metrics {
            cfg.protect_metrics = b;
        }
        if let Some(n) = raw.max_body_bytes {
            if n == 0 || n > 1 << 30 {
                return Err(err("max_body_bytes", "expected 1 to 1073741824"));
            }
            cfg.max_body_bytes = n;
        }
        if let Some(u) = raw.upstream {
            let d = UpstreamSettings::default();
            cfg.upstream = UpstreamSettings {
                connect_timeout: dur(
                    "upstream.connect_timeout",
                    &u.connect_timeout,
                    d.connect_timeout,
                )?,
                response_timeout: dur(
                    "upstream.response_timeout",
                    &u.response_timeout,
                    d.response_timeout,
                )?,
                idle_timeout: dur("upstream.idle_timeout", &u.idle_timeout, d.idle_timeout)?,
            };
        }
        for (name, p) in raw.providers {
            let provider: Provider =
                name.parse()
                    .map_err(|e: crate::provider::UnknownProvider| {
                        err(&format!("providers.{name}"), &e.to_string())
                    })?;
            if let Some(url) = &p.base_url {
                let ok = (url.starts_with("https://") || url.starts_with("http://"))
                    && url.len() > 8
                    && !url.contains(['@', '?', '#', ' ']);
                if !ok {
                    return Err(err(
                        &format!("providers.{name}.base_url"),
                        "expected an http:// or https:// URL with a host and no credentials, query or fragment",
                    ));
                }
            }
            let u = cfg.upstream;
            let timeouts = UpstreamSettings {
                connect_timeout: dur(
                    &format!("providers.{name}.connect_timeout"),
                    &p.connect_timeout,
                    u.connect_timeout,
                )?,
                response_timeout: dur(
                    &format!("providers.{name}.response_timeout"),
                    &p.response_timeout,
                    u.response_timeout,
                )?,
                idle_timeout: dur(
                    &format!("providers.{name}.idle_timeout"),
                    &p.idle_timeout,
                    u.idle_timeout,
                )?,
            };
            cfg.providers.insert(
                provider,
                ProviderSettings {
                    base_url: p.base_url,
                    timeouts,
                },
            );
        }
        for (name, p) in raw.plans {
            if let Err(e) = validate_plan_name(&name) {
                return Err(err(&format!("plans.{name}"), &e.message));
            }
            let policy = Policy {
                providers: p.providers,
                endpoints: p.endpoints,
                models: p.models,
                budget: p.budget,
                rate_limit: p.rate_limit,
                max_request_chars: p.max_request_chars,
                max_parallel: p.max_parallel,
                shadow: p.shadow.unwrap_or(false),
            };
            // The same rules as a policy file and the API (docs/policy.md#fields).
            if let Err(e) = validate_policy(&policy) {
                return Err(err(&format!("plans.{name}.{}", e.field), &e.message));
            }
            cfg.plans.insert(name, policy);
        }
        let price = |field: &str, p: &RawPrice| -> Result<PriceSetting, ConfigError> {
            let usd = |v: f64, f: &str| {
                Micros::from_usd(v).map_err(|_| {
                    err(
                        &format!("{field}.{f}"),
                        "expected a non-negative USD amount per million tokens",
                    )
                })
            };
            Ok(PriceSetting {
                input: usd(p.input, "input")?,
                output: usd(p.output, "output")?,
                max_output_tokens: p.max_output_tokens,
            })
        };
        for (name, p) in raw.prices {
            let field = format!("prices.\"{name}\"");
            let (prov, model) = name
                .split_once('/')
                .ok_or_else(|| err(&field, "expected \"provider/model\""))?;
            let provider: Provider = prov
                .parse()
                .map_err(|e: crate::provider::UnknownProvider| err(&field, &e.to_string()))?;
            if model.is_empty() {
                return Err(err(&field, "expected \"provider/model\""));
            }
            cfg.prices
                .insert((provider, model.to_owned()), price(&field, &p)?);
        }
        if let Some(p) = raw.fallback_price {
            cfg.fallback_price = Some(price("fallback_price", &p)?);
        }
        Ok(cfg)
    }

    /// The base URL for a provider: configured, else the public default.
    pub fn base_url(&self, provider: Provider) -> Option<&str> {
        self.providers
            .get(&provider)
            .and_then(|p| p.base_url.as_deref())
            .or_else(|| provider.default_base_url())
    }

    /// The timeouts for a provider.
    pub fn timeouts(&self, provider: Provider) -> UpstreamSettings {
        self.providers
            .get(&provider)
            .map_or(self.upstream, |p| p.timeouts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of docs/configuration.md#the-file.
    const DOCS_EXAMPLE: &str = r#"
listen = "127.0.0.1:8080"
data_dir = ".vaultgate"
# store = "sqlite"

[upstream]
connect_timeout = "5s"
response_timeout = "120s"
idle_timeout = "60s"

[providers.openai]
base_url = "https://api.openai.com"
response_timeout = "30s"

[providers.bielik]
base_url = "https://bielik.example"

[plans.team]
rate_limit = { requests_per_minute = 300 }

[prices."openai/gpt-4o-mini"]
input = 0.15
output = 0.60
"#;

    #[test]
    fn the_spec_example_parses() {
        let c = Config::parse_for(
            DOCS_EXAMPLE,
            "vaultgate.toml",
            &["listen", "data_dir", "log_format"],
        )
        .unwrap();
        // Without the application's keys, they are unknown, named with their line.
        let e = Config::parse(DOCS_EXAMPLE, "vaultgate.toml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("vaultgate.toml:2: unknown field `listen`"),
            "{e}"
        );
        assert_eq!(
            c.timeouts(Provider::OpenAi).response_timeout,
            Duration::from_secs(30)
        );
        assert_eq!(
            c.timeouts(Provider::OpenAi).idle_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(c.base_url(Provider::Bielik), Some("https://bielik.example"));
        assert_eq!(
            c.base_url(Provider::Groq),
            Some("https://api.groq.com/openai")
        );
        assert_eq!(
            c.plans["team"].rate_limit.unwrap().requests_per_minute,
            Some(300)
        );
        assert_eq!(
            c.prices[&(Provider::OpenAi, "gpt-4o-mini".to_owned())].input,
            Micros(150_000)
        );
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    }

    #[test]
    fn errors_name_file_field_and_allowed() {
        let cases = [
            ("lisen = \"x\"", "unknown field"),
            (
                "[plans.Team]\nrate_limit = { requests_per_minute = 3 }",
                "plans.Team",
            ),
            ("[plans.team]\nmodels = []", "plans.team.models"),
            ("[plans.team]\nmax_parallel = 0", "plans.team.max_parallel"),
            (
                "[upstream]\nconnect_timeout = \"5 parsecs\"",
                "upstream.connect_timeout",
            ),
            (
                "[providers.opnai]\nbase_url = \"https://x\"",
                "providers.opnai",
            ),
            (
                "[providers.openai]\nbase_url = \"ftp://x\"",
                "providers.openai.base_url",
            ),
            (
                "[providers.openai]\nbase_url = \"https://u:p@x\"",
                "providers.openai.base_url",
            ),
            (
                "[prices.\"gpt-4o\"]\ninput = 1.0\noutput = 2.0",
                "prices.\"gpt-4o\"",
            ),
            ("[prices.\"openai/x\"]\ninput = -1.0\noutput = 2.0", "input"),
            ("store = \"postgres\"", "store"),
            (
                "[plans.team]\nrate_limit = { requests_per_hour = 3 }",
                "unknown field",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::parse(text, "vaultgate.toml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("vaultgate.toml"), "{e}");
            assert!(e.contains(needle), "{text:?} → {e}");
        }
    }
}
