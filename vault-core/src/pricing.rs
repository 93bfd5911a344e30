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
//! assert!(table.lookup(Provider::OpenAi, "gpt-4o-2024-08-06").is_some()); // a dated one
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::meter::Usage;
use crate::money::Micros;
use crate::provider::{Provider, UsageFormat};

/// The built-in table's source text.
const BUILTIN: &str = include_str!("../data/prices.toml");

/// The context window assumed for a model whose entry names none (config
/// overrides of unknown models): larger than any model's today, so the
/// reservation of a call whose input cannot be bounded stays an upper bound.
pub const DEFAULT_CONTEXT_WINDOW: u64 = 2_000_000;

/// Prompts longer than this many tokens are billed at a model's
/// [`ModelPrice::above_200k`] prices, where it has them.
pub const LONG_CONTEXT_TOKENS: u64 = 200_000;

/// What one model costs, per token class (docs/budgets.md#token-classes).
///
/// The optional class prices fall back to the figure the provider bills
/// when it does not price the class apart: cached input and audio input at
/// the input price, reasoning and audio output at the output price, cache
/// writes at 1.25× (5-minute) and 2× (1-hour) the input price (Anthropic's
/// published multipliers, the only provider that reports cache writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    /// Micro-dollars per million input tokens.
    pub input_per_million: Micros,
    /// Micro-dollars per million output tokens.
    pub output_per_million: Micros,
    /// The most output tokens one call may produce: what a budget reserves
    /// when the client sets no output limit.
    pub max_output_tokens: u64,
    /// The most input and output tokens one call may hold: the input bound
    /// of a call whose input cannot be measured from its body.
    pub context_window: u64,
    /// Input read from the provider's prompt cache.
    pub cached_input_per_million: Option<Micros>,
    /// Input written to the prompt cache with the 5-minute lifetime.
    pub cache_write_per_million: Option<Micros>,
    /// Input written to the prompt cache with the 1-hour lifetime.
    pub cache_write_1h_per_million: Option<Micros>,
    /// Reasoning (thinking) output.
    pub reasoning_per_million: Option<Micros>,
    /// Audio input.
    pub audio_input_per_million: Option<Micros>,
    /// Audio output.
    pub audio_output_per_million: Option<Micros>,
    /// Input and output prices of calls whose prompt is longer than
    /// [`LONG_CONTEXT_TOKENS`], where the provider charges more for them.
    pub above_200k: Option<(Micros, Micros)>,
}

impl ModelPrice {
    /// A price with input and output figures only (every class at its
    /// fallback, the default context window).
    pub fn new(input: Micros, output: Micros, max_output_tokens: u64) -> ModelPrice {
        ModelPrice {
            input_per_million: input,
            output_per_million: output,
            max_output_tokens,
            context_window: DEFAULT_CONTEXT_WINDOW,
            cached_input_per_million: None,
            cache_write_per_million: None,
            cache_write_1h_per_million: None,
            reasoning_per_million: None,
            audio_input_per_million: None,
            audio_output_per_million: None,
            above_200k: None,
        }
    }

    /// A price from USD-per-million figures (as written in config files).
    pub fn from_usd_per_million(
        input: f64,
        output: f64,
        max_output_tokens: u64,
    ) -> Result<ModelPrice, PriceError> {
        if max_output_tokens == 0 {
            return Err(PriceError("max_output must be at least 1".to_owned()));
        }
        Ok(ModelPrice::new(
            usd_per_million(input, "input")?,
            usd_per_million(output, "output")?,
            max_output_tokens,
        ))
    }

    /// The input and output prices that apply to a prompt of `tokens_in`.
    fn tier(&self, tokens_in: u64) -> (Micros, Micros) {
        match self.above_200k {
            Some(long) if tokens_in > LONG_CONTEXT_TOKENS => long,
            _ => (self.input_per_million, self.output_per_million),
        }
    }

    /// The cost of a call of plain input and output tokens, rounded up to
    /// the micro-dollar, saturating.
    pub fn cost(&self, tokens_in: u64, tokens_out: u64) -> Micros {
        self.cost_of(&Usage {
            tokens_in,
            tokens_out,
            ..Usage::default()
        })
    }

    /// The cost of a call's usage, each token class at its own price
    /// (docs/budgets.md#token-classes), summed and then rounded up once to
    /// the micro-dollar, saturating. Class counts are parts of the totals; a class claiming more than
    /// its total is charged whole and the plain part is then zero.
    pub fn cost_of(&self, usage: &Usage) -> Micros {
        let (input, output) = self.tier(usage.tokens_in);
        let scale = |class: Option<Micros>, base: Micros, num: u64, den: u64| {
            class.unwrap_or_else(|| Micros(base.0.saturating_mul(num) / den))
        };
        let classes_in = usage
            .cached_in
            .saturating_add(usage.cache_write_in)
            .saturating_add(usage.cache_write_1h_in)
            .saturating_add(usage.audio_in);
        let classes_out = usage.reasoning_out.saturating_add(usage.audio_out);
        let parts = [
            (usage.tokens_in.saturating_sub(classes_in), input),
            (
                usage.cached_in,
                scale(self.cached_input_per_million, input, 1, 1),
            ),
            (
                usage.cache_write_in,
                scale(self.cache_write_per_million, input, 5, 4),
            ),
            (
                usage.cache_write_1h_in,
                scale(self.cache_write_1h_per_million, input, 2, 1),
            ),
            (
                usage.audio_in,
                scale(self.audio_input_per_million, input, 1, 1),
            ),
            (usage.tokens_out.saturating_sub(classes_out), output),
            (
                usage.reasoning_out,
                scale(self.reasoning_per_million, output, 1, 1),
            ),
            (
                usage.audio_out,
                scale(self.audio_output_per_million, output, 1, 1),
            ),
        ];
        // Summed exactly, rounded up once: rounding each class apart could
        // make a call split across classes cost a micro-dollar more than
        // the same tokens at the dearest class, which its reservation is.
        let product: u128 = parts
            .iter()
            .map(|&(tokens, price)| u128::from(tokens) * u128::from(price.0))
            .sum();
        Micros(u64::try_from(product.div_ceil(1_000_000)).unwrap_or(u64::MAX))
    }

    /// The dearest price an input token can have at `provider`: the most a
    /// reservation must set aside per input token whatever class it turns
    /// out to be. Cache writes count only where the provider reports (and
    /// bills) them apart: Anthropic's format.
    pub fn input_ceiling_per_million(&self, provider: Provider) -> Micros {
        let input = self.above_200k.map_or(self.input_per_million, |(i, _)| {
            i.max(self.input_per_million)
        });
        let writes = provider.usage_format() == UsageFormat::Anthropic;
        [
            Some(input),
            self.cached_input_per_million,
            writes.then(|| {
                self.cache_write_per_million
                    .unwrap_or(Micros(input.0.saturating_mul(5) / 4))
            }),
            writes.then(|| {
                self.cache_write_1h_per_million
                    .unwrap_or(Micros(input.0.saturating_mul(2)))
            }),
            self.audio_input_per_million,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(input)
    }

    /// The dearest price an output token can have.
    pub fn output_ceiling_per_million(&self) -> Micros {
        let output = self.above_200k.map_or(self.output_per_million, |(_, o)| {
            o.max(self.output_per_million)
        });
        [
            Some(output),
            self.reasoning_per_million,
            self.audio_output_per_million,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(output)
    }
}

fn usd_per_million(v: f64, field: &str) -> Result<Micros, PriceError> {
    Micros::from_usd(v).map_err(|_| {
        PriceError(format!(
            "{field} must be a finite number of USD per million tokens between 0 and 1000000000, got {v}"
        ))
    })
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
    context: u64,
    cached_input: Option<f64>,
    cache_write: Option<f64>,
    cache_write_1h: Option<f64>,
    reasoning: Option<f64>,
    audio_input: Option<f64>,
    audio_output: Option<f64>,
    above_200k: Option<RawTier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    input: f64,
    output: f64,
}

impl RawPrice {
    fn price(&self) -> Result<ModelPrice, PriceError> {
        let class = |v: Option<f64>, field: &str| v.map(|v| usd_per_million(v, field)).transpose();
        if self.context == 0 {
            return Err(PriceError("context must be at least 1".to_owned()));
        }
        let mut price = ModelPrice::from_usd_per_million(self.input, self.output, self.max_output)?;
        price.context_window = self.context;
        price.cached_input_per_million = class(self.cached_input, "cached_input")?;
        price.cache_write_per_million = class(self.cache_write, "cache_write")?;
        price.cache_write_1h_per_million = class(self.cache_write_1h, "cache_write_1h")?;
        price.reasoning_per_million = class(self.reasoning, "reasoning")?;
        price.audio_input_per_million = class(self.audio_input, "audio_input")?;
        price.audio_output_per_million = class(self.audio_output, "audio_output")?;
        price.above_200k = match &self.above_200k {
            Some(t) => Some((
                usd_per_million(t.input, "above_200k.input")?,
                usd_per_million(t.output, "above_200k.output")?,
            )),
            None => None,
        };
        Ok(price)
    }
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
                let price = p
                    .price()
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
    /// entry that `model` extends with a date suffix (see
    /// `is_version_suffix`). No fallback.
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

/// A date suffix: the same model pinned to a release date. `-20241022`,
/// `@20240620`, `-2024-08-06`, `-08-2024` (Cohere), `-2411` (Mistral's
/// year and month), `-0709` (xAI's month and day). Anything else names
/// another model or an undated version (`-mini`, `-pro`, `-001`, `-latest`:
/// a moving alias can cost more than the base name), which must be priced
/// by its own entry.
fn is_version_suffix(rest: &str) -> bool {
    let Some(date) = rest.strip_prefix('-').or_else(|| rest.strip_prefix('@')) else {
        return false;
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = date.split('-').collect();
    match parts.as_slice() {
        [d] => digits(d, 8) || digits(d, 4),
        [y, m, d] => digits(y, 4) && digits(m, 2) && digits(d, 2),
        [m, y] => digits(m, 2) && digits(y, 4),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens split across classes of one price cost what they cost
    /// together: the sum is rounded once, not once per class (a reservation
    /// at that price must cover any split).
    #[test]
    fn boundary_a_split_across_classes_is_rounded_once() {
        let price = ModelPrice::new(Micros(1), Micros(1), 10);
        let split = Usage {
            tokens_in: 2,
            cached_in: 1,
            ..Usage::default()
        };
        assert_eq!(price.cost_of(&split), price.cost(2, 0));
        assert_eq!(price.cost_of(&split), Micros(1));
    }

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
            t.lookup(Provider::Mistral, "mistral-large-2411"),
            t.lookup(Provider::Mistral, "mistral-large")
        );
        assert_eq!(
            t.lookup(Provider::Xai, "grok-4-0709"),
            t.lookup(Provider::Xai, "grok-4")
        );
        // Only dates extend a name: undated versions and aliases need their
        // own entries.
        assert!(t.lookup(Provider::Google, "gemini-1.5-pro-003").is_none());
        assert!(t.lookup(Provider::Mistral, "codestral-latest2").is_none());
        assert!(t.lookup(Provider::OpenAi, "gpt-4o-1").is_none());
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
        assert_eq!(t.lookup(Provider::Bielik, "bielik-20250101"), Some(&cheap));
        assert_eq!(t.lookup(Provider::Bielik, "bielik-11b"), None);
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
    fn token_classes_are_priced_apart_and_bound_the_ceilings() {
        let t = PriceTable::builtin();
        let sonnet = t.lookup(Provider::Anthropic, "claude-sonnet-4-5").unwrap();
        let usage = Usage {
            tokens_in: 1_000,
            cached_in: 600,
            cache_write_in: 200,
            cache_write_1h_in: 100,
            tokens_out: 500,
            ..Usage::default()
        };
        // 100 plain × $3 + 600 cached × $0.30 + 200 × $3.75 + 100 × $6, then 500 × $15.
        assert_eq!(
            sonnet.cost_of(&usage),
            Micros(300 + 180 + 750 + 600 + 7_500)
        );
        assert_eq!(
            sonnet.input_ceiling_per_million(Provider::Anthropic),
            Micros(6_000_000)
        );
        assert_eq!(sonnet.output_ceiling_per_million(), Micros(22_500_000));
        // Past 200k prompt tokens, the long-context prices apply.
        let pro = t.lookup(Provider::Google, "gemini-2.5-pro").unwrap();
        assert_eq!(pro.cost(200_000, 0), Micros(250_000));
        assert_eq!(pro.cost(200_001, 1_000), Micros(500_003 + 15_000));
        // Classes without a price of their own fall back: cached at input,
        // reasoning at output, cache writes at 1.25× and 2× input.
        let plain = ModelPrice::from_usd_per_million(1.0, 2.0, 10).unwrap();
        let classes = Usage {
            tokens_in: 40,
            tokens_out: 10,
            cached_in: 10,
            cache_write_in: 10,
            cache_write_1h_in: 10,
            reasoning_out: 5,
            ..Usage::default()
        };
        assert_eq!(plain.cost_of(&classes), Micros(10 + 10 + 13 + 20 + 10 + 10));
        assert_eq!(
            plain.input_ceiling_per_million(Provider::Anthropic),
            Micros(2_000_000)
        );
        // Providers that never report cache writes do not reserve for them.
        assert_eq!(
            plain.input_ceiling_per_million(Provider::OpenAi),
            Micros(1_000_000)
        );
        // A class claiming more than its total is charged whole.
        let hostile = Usage {
            tokens_in: 1,
            cache_write_1h_in: 1_000_000,
            ..Usage::default()
        };
        assert_eq!(plain.cost_of(&hostile), Micros(2_000_000));
        for (_, _, p) in t.entries() {
            assert!(p.context_window >= p.max_output_tokens.min(16_385));
        }
    }

    #[test]
    fn corruption_bad_tables_are_errors() {
        for bad in [
            "[openai]\n\"x\" = { input = -1.0, output = 1.0, max_output = 10, context = 100 }",
            "[openai]\n\"x\" = { input = 1.0, output = nan, max_output = 10, context = 100 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 0, context = 100 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, context = 100 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1, context = 0 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1, context = 9, cached_input = -1.0 }",
            "[openai]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1, context = 100, extra = 2 }",
            "[OpenAI]\n\"x\" = { input = 1.0, output = 1.0, max_output = 1, context = 100 }",
        ] {
            assert!(PriceTable::from_toml(bad).is_err(), "{bad}");
        }
    }
}
