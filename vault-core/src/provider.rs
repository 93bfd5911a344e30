//! The ten providers: where they live, how they take a credential and which
//! usage format they speak.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An upstream LLM provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Provider {
    /// OpenAI.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic.
    Anthropic,
    /// Google Gemini (Generative Language API).
    Google,
    /// Mistral AI.
    Mistral,
    /// Groq.
    Groq,
    /// DeepSeek.
    #[serde(rename = "deepseek")]
    DeepSeek,
    /// Cohere.
    Cohere,
    /// xAI.
    Xai,
    /// Perplexity.
    Perplexity,
    /// Bielik (SpeakLeash); no public default endpoint.
    Bielik,
}

/// How the provider credential is carried on the upstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `x-api-key: <key>` plus `anthropic-version` (the client's kept when sent).
    AnthropicApiKey,
    /// `x-goog-api-key: <key>`; never in the URL.
    GoogApiKey,
}

/// The shape in which a provider reports token usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsageFormat {
    /// `usage.prompt_tokens` / `usage.completion_tokens`; streams report in the
    /// final chunk when `stream_options.include_usage` is set.
    OpenAi,
    /// `usage.input_tokens` / `usage.output_tokens`; streams: `message_start`
    /// then running totals in `message_delta`.
    Anthropic,
    /// `usageMetadata.promptTokenCount` / `candidatesTokenCount`, running
    /// totals in streams (the last counts).
    Google,
    /// `usage.billed_units.input_tokens` / `output_tokens`.
    Cohere,
}

/// An unknown provider name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown provider {0:?}; known providers: openai, anthropic, google, mistral, groq, deepseek, cohere, xai, perplexity, bielik"
)]
pub struct UnknownProvider(pub String);

impl Provider {
    /// All providers.
    pub const ALL: [Provider; 10] = [
        Provider::OpenAi,
        Provider::Anthropic,
        Provider::Google,
        Provider::Mistral,
        Provider::Groq,
        Provider::DeepSeek,
        Provider::Cohere,
        Provider::Xai,
        Provider::Perplexity,
        Provider::Bielik,
    ];

    /// The lowercase name used in paths and config, e.g. `openai`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Google => "google",
            Provider::Mistral => "mistral",
            Provider::Groq => "groq",
            Provider::DeepSeek => "deepseek",
            Provider::Cohere => "cohere",
            Provider::Xai => "xai",
            Provider::Perplexity => "perplexity",
            Provider::Bielik => "bielik",
        }
    }

    /// The public base URL, where one exists. Paths are appended as the
    /// client sent them, so SDK base URLs map one-to-one (e.g. Groq's SDK base
    /// `https://api.groq.com/openai/v1` is this base plus `/v1`).
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Provider::OpenAi => Some("https://api.openai.com"),
            Provider::Anthropic => Some("https://api.anthropic.com"),
            Provider::Google => Some("https://generativelanguage.googleapis.com"),
            Provider::Mistral => Some("https://api.mistral.ai"),
            Provider::Groq => Some("https://api.groq.com/openai"),
            Provider::DeepSeek => Some("https://api.deepseek.com"),
            Provider::Cohere => Some("https://api.cohere.com"),
            Provider::Xai => Some("https://api.x.ai"),
            Provider::Perplexity => Some("https://api.perplexity.ai"),
            Provider::Bielik => None,
        }
    }

    /// How the credential is injected.
    pub fn auth_style(self) -> AuthStyle {
        match self {
            Provider::Anthropic => AuthStyle::AnthropicApiKey,
            Provider::Google => AuthStyle::GoogApiKey,
            _ => AuthStyle::Bearer,
        }
    }

    /// Which usage format responses carry.
    pub fn usage_format(self) -> UsageFormat {
        match self {
            Provider::Anthropic => UsageFormat::Anthropic,
            Provider::Google => UsageFormat::Google,
            Provider::Cohere => UsageFormat::Cohere,
            _ => UsageFormat::OpenAi,
        }
    }

    /// The `anthropic-version` sent when the client sends none.
    pub const ANTHROPIC_VERSION: &'static str = "2023-06-01";
}

impl FromStr for Provider {
    type Err = UnknownProvider;

    /// Exact lowercase names only: `OpenAI` is unknown, so a path can never
    /// name a provider two ways.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProvider(s.chars().take(64).collect()))
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_exact() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        assert!("OpenAI".parse::<Provider>().is_err());
        assert!("openai ".parse::<Provider>().is_err());
        assert!("".parse::<Provider>().is_err());
    }

    #[test]
    fn every_provider_but_bielik_has_a_https_default() {
        for p in Provider::ALL {
            match p.default_base_url() {
                Some(u) => assert!(u.starts_with("https://"), "{p}"),
                None => assert_eq!(p, Provider::Bielik),
            }
        }
    }
}
