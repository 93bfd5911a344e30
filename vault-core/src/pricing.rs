//! Model prices: USD per million input and output tokens, and each model's
//! maximum output, built in (`data/prices.toml`) and overridable.
//!
//! ```
//! use vault_core::money::Micros;
//! use vault_core::pricing::PriceTable;
//! use vault_core::provider::Provider;
//! let table = PriceTable::builtin();
//! let p = table.lookup(Provider::Anthropic, "claude-3-5-haiku-20241022").unwrap();
//! assert_eq!(p.input_per_million, Micros(800_000));
//! assert!(table.lookup(Provider::OpenAi, "o3-pro").is_none()); // not a dated variant of o3
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::money::Micros;
use crate::provider::Provider;

/// The built-in table's source text.
const BUILTIN: &str = include_str!("../data/prices.toml");

/// What one model costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    /// Micro-dollars per million input tokens.
    pub input_per_million: Micros,
    /// Micro-dollars per million output tokens.
    pub output_per_million: Micros,
    /// The most output tokens one call may produce: what a budget reserves
    /// when the client sets no output limit.
    pub max_output_tokens: u64,
}

impl ModelPrice {
    /// A price from USD-per-million figures (as written in config files).
    pub fn from_usd_per_million(
        input: f64,
        output: f64,
        max_output_tokens: u64,
    ) -> Result<ModelPrice, PriceError> {
        let money = |v: f64, field: &str| {
            Micros::from_usd(v).map_err(|_| {
                PriceError(format!(
                    "{field} must be a finite number of USD per million tokens between 0 and 1000000000, got {v}"
                ))
            })
        };
        if max_output_tokens == 0 {
            return Err(PriceError("max_output must be at least 1".to_owned()));
        }
        Ok(ModelPrice {
            input_per_million: money(input, "input")?,
            output_per_million: money(output, "output")?,
            max_output_tokens,
        })
    }

    /// The cost of a call, each part rounded up, saturating.
    pub fn cost(&self, tokens_in: u64, tokens_out: u64) -> Micros {
        Micros::for_tokens(tokens_in, self.input_per_million)
            .saturating_add(Micros::for_tokens(tokens_out, self.output_per_million))
    }
}

/// A price table that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid price table: {0}")]
pub struct PriceError(pub String);

/// Prices per provider and model, plus an optional fallback for models the
/// table does not know.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    by_provider: HashMap<Provider, ProviderPrices>,
    fallback: Option<ModelPrice>,
}

#[derive(Debug, Clone, Default)]
struct ProviderPrices {
    exact: HashMap<String, ModelPrice>,
    /// The same entries, longest name first, for prefix lookups.
    by_length: Vec<(String, ModelPrice)>,
}

impl ProviderPrices {
    fn insert(&mut self, model: &str, price: ModelPrice) {
        self.exact.insert(model.to_owned(), price);
        self.by_length.retain(|(m, _)| m != model);
        let at = self
            .by_length
            .partition_point(|(m, _)| m.len() >= model.len());
        self.by_length.insert(at, (model.to_owned(), price));
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    max_output: u64,
}

impl PriceTable {
    /// The built-in table of `data/prices.toml`. Its parse is proven by a
    /// unit test; should it ever fail, the table is empty and every budgeted
    /// call is refused as unpriced (fail closed), with an error logged.
    pub fn builtin() -> PriceTable {
        match PriceTable::from_toml(BUILTIN) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "the built-in price table is invalid");
                PriceTable::default()
            }
        }
    }

    /// Parses a table in the `data/prices.toml` format.
    pub fn from_toml(text: &str) -> Result<PriceTable, PriceError> {
        let raw: BTreeMap<String, BTreeMap<String, RawPrice>> =
            toml::from_str(text).map_err(|e| PriceError(e.to_string()))?;
        let mut table = PriceTable::default();
        for (provider, models) in raw {
            let provider: Provider = provider.parse().map_err(|e| PriceError(format!("{e}")))?;
            for (model, p) in models {
                let price = ModelPrice::from_usd_per_million(p.input, p.output, p.max_output)
                    .map_err(|e| PriceError(format!("{provider}/{model}: {}", e.0)))?;
                table.insert(provider, &model, price);
            }
        }
        Ok(table)
    }

    /// The same table with `provider/model` priced at `price` (replacing any
    /// built-in entry).
    pub fn with_override(mut self, provider: Provider, model: &str, price: ModelPrice) -> Self {
        self.insert(provider, model, price);
        self
    }

    /// The same table with a price for models it does not know (`None`:
    /// unknown models stay unpriced, and budgeted calls to them are refused).
    pub fn with_fallback(mut self, fallback: Option<ModelPrice>) -> Self {
        self.fallback = fallback;
        self
    }

    /// The price for models the table does not know, if configured.
    pub fn fallback(&self) -> Option<&ModelPrice> {
        self.fallback.as_ref()
    }

    fn insert(&mut self, provider: Provider, model: &str, price: ModelPrice) {
        self.by_provider
            .entry(provider)
            .or_default()
            .insert(model, price);
    }

    /// The price of `model` at `provider`: the exact entry, else the longest
    /// entry that `model` extends with a version or date suffix (`-` or `@`
    /// followed by a digit, or `-latest`). No fallback.
    pub fn lookup(&self, provider: Provider, model: &str) -> Option<&ModelPrice> {
        let prices = self.by_provider.get(&provider)?;
        if let Some(p) = prices.exact.get(model) {
            return Some(p);
        }
        prices
            .by_length
            .iter()
            .find(|(name, _)| {
                model
                    .strip_prefix(name.as_str())
                    .is_some_and(is_version_suffix)
            })
            .map(|(_, p)| p)
    }

    /// [`lookup`](Self::lookup), then the fallback.
    pub fn price_for(&self, provider: Provider, model: &str) -> Option<&ModelPrice> {
        self.lookup(provider, model).or(self.fallback.as_ref())
    }

    /// Every entry, for listings: provider, model, price.
    pub fn entries(&self) -> impl Iterator<Item = (Provider, &str, &ModelPrice)> {
        self.by_provider.iter().flat_map(|(provider, prices)| {
            prices
                .by_length
                .iter()
                .map(move |(m, p)| (*provider, m.as_str(), p))
        })
    }
}

/// `-20241022`, `-2024-08-06`, `-001`, `@20240620`, `-latest`: the same model
/// in a pinned or floating version. `-mini`, `-pro`, `-lite` are other models.
fn is_version_suffix(rest: &str) -> bool {
    let mut bytes = rest.bytes();
    match (bytes.next(), bytes.next()) {
        (Some(b'-' | b'@'), Some(d)) if d.is_ascii_digit() => true,
        _ => rest == "-latest",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_parses_and_covers_every_priced_provider() {
        let table = PriceTable::from_toml(BUILTIN).unwrap();
        for p in Provider::ALL {
            let count = table.entries().filter(|(q, _, _)| *q == p).count();
            if p == Provider::Bielik {
                assert_eq!(count, 0, "bielik is deliberately unpriced");
            } else {
                assert!(count >= 2, "{p} has {count} prices");
            }
        }
        assert_eq!(
            PriceTable::builtin().entries().count(),
            table.entries().count()
        );
    }

    #[test]
    fn exact_then_longest_versioned_prefix() {
        let t = PriceTable::builtin();
        let mini = t.lookup(Provider::OpenAi, "gpt-4o-mini").unwrap();
        assert_eq!(mini.input_per_million, Micros(150_000));
        assert_eq!(mini.output_per_million, Micros(600_000));
        assert_eq!(
            t.lookup(Provider::OpenAi, "gpt-4o-mini-2024-07-18"),
            Some(mini)
        );
        assert_eq!(
            t.lookup(Provider::OpenAi, "gpt-4o-2024-08-06"),
            t.lookup(Provider::OpenAi, "gpt-4o")
        );
        assert_eq!(
            t.lookup(Provider::Anthropic, "claude-3-5-haiku-20241022"),
            t.lookup(Provider::Anthropic, "claude-3-5-haiku")
        );
        assert_eq!(
            t.lookup(Provider::Anthropic, "claude-opus-4-1-20250805"),
            t.lookup(Provider::Anthropic, "claude-opus-4-1")
        );
        assert_eq!(
            t.lookup(Provider::Mistral, "mistral-large-latest"),
            t.lookup(Provider::Mistral, "mistral-large")
        );
        assert_eq!(
            t.lookup(Provider::Cohere, "command-r-plus-08-2024"),
            t.lookup(Provider::Cohere, "command-r-plus")
        );
        // A newer release listed on its own is priced as itself, not as the
        // older entry its name extends (Opus 4.5 costs a third of Opus 4; a
        // moving `-latest` alias can cost more than the base name).
        let opus_4_5 = t.lookup(Provider::Anthropic, "claude-opus-4-5-20251101");
        assert_eq!(opus_4_5, t.lookup(Provider::Anthropic, "claude-opus-4-5"));
        assert_ne!(opus_4_5, t.lookup(Provider::Anthropic, "claude-opus-4"));
        let medium = t
            .lookup(Provider::Mistral, "mistral-medium-latest")
            .unwrap();
        let medium_base = t.lookup(Provider::Mistral, "mistral-medium").unwrap();
        assert!(medium.input_per_million > medium_base.input_per_million);
        // Other models that merely share a prefix are not priced as it.
        assert!(t.lookup(Provider::OpenAi, "o3-pro").is_none());
        assert!(t.lookup(Provider::OpenAi, "gpt-4o-audio-preview").is_none());
        assert!(t.lookup(Provider::Anthropic, "gpt-4o").is_none());
        assert!(t.lookup(Provider::OpenAi, "GPT-4O-MINI").is_none());
        assert!(
            t.lookup(Provider::Bielik, "bielik-11b-v2.3-instruct")
                .is_none()
        );
    }

    #[test]
    fn overrides_and_fallback() {
        let cheap = ModelPrice::from_usd_per_million(0.01, 0.02, 100).unwrap();
        let t = PriceTable::builtin()
            .with_override(Provider::OpenAi, "gpt-4o-mini", cheap)
            .with_override(Provider::Bielik, "bielik", cheap);
        assert_eq!(t.lookup(Provider::OpenAi, "gpt-4o-mini"), Some(&cheap));
        assert_eq!(
            t.lookup(Provider::OpenAi, "gpt-4o-mini-2024-07-18"),
            Some(&cheap)
        );
        assert_eq!(t.lookup(Provider::Bielik, "bielik-11b"), Some(&cheap));
        assert_eq!(t.lookup(Provider::Bielik, "bielik-instruct"), None);
        assert_eq!(t.price_for(Provider::Bielik, "other"), None);
        let t = t.with_fallback(Some(cheap));
        assert_eq!(t.price_for(Provider::Bielik, "other"), Some(&cheap));
        assert_eq!(t.lookup(Provider::Bielik, "other"), None);
    }

    #[test]
    fn costs_round_up() {
        let p = ModelPrice::from_usd_per_million(0.15, 0.60, 16_384).unwrap();
        assert_eq!(p.cost(1, 0), Micros(1));
        assert_eq!(p.cost(1_000_000, 1_000_000), Micros(750_000));
        let dear = ModelPrice::from_usd_per_million(1e9, 1e9, 1).unwrap();
        assert_eq!(dear.cost(u64::MAX, u64::MAX), Micros::MAX);
        assert_eq!(dear.cost(u64::MAX, 0), Micros::MAX);
    }

    #[test]
    fn corruption_bad_tables_are_errors() {
        for bad in [
            "[openai]\n\"x\" = { input = -1.0, output = 1.0, max_output = 10 }",
            "[openai]\n\"x\" = { input = 1.0, output = nan, max_output = 10 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 0 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1, extra = 2 }",
            "[OpenAI]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1 }",
        ] {
            assert!(PriceTable::from_toml(bad).is_err(), "{bad}");
        }
    }
}
