//! What the policy needs from a request body, read without trusting it,
//! and the few edits the proxy makes to it.
//!
//! [`inspect_request`] reads the model, the output limit, whether a stream
//! is asked for, the body's size in characters, and what bounds the call's
//! cost (the output multipliers `n`, `best_of`, `candidateCount`,
//! `num_generations`; images and parts whose input cannot be bounded). It
//! refuses bodies a provider might read differently from us
//! (docs/threat-model.md E5, G2): duplicate keys
//! (decoded, so `"m\u006fdel"` duplicates `model`; for Google, whose proto
//! JSON accepts both spellings, `generation_config` duplicates
//! `generationConfig`), non-integer or negative token limits, invalid UTF-8,
//! nesting deeper than [`MAX_DEPTH`], and a body model that disagrees with
//! the model in a Google path. Large values the policy does not need
//! (messages) are skipped, never copied.
//!
//! [`rewrite_request`] clamps the output limit and asks for stream usage by
//! editing bytes in place: everything it does not change stays exactly as
//! the client sent it (key order, spacing, escapes), and when nothing needs
//! changing it returns `None` and the body is forwarded untouched.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::provider::{Provider, UsageFormat};

/// Nesting deeper than this is refused (serde_json skips ignored values
/// without a depth limit; providers refuse such bodies anyway).
pub const MAX_DEPTH: usize = 128;

/// The largest output multiplier accepted (`n`, `best_of`, `candidateCount`,
/// `num_generations`); providers allow far less (OpenAI `n` ≤ 128).
pub const MAX_MULTIPLIER: u64 = 128;

/// Input tokens one image may cost at most, for OpenAI-compatible and
/// Cohere bodies (images given by URL have no bytes in the body). The
/// dearest published figure: OpenAI's `gpt-4o-mini` at high detail, an
/// image scaled to 768×2048 = 8 tiles of 512 px at 5,667 tokens plus 2,833
/// base = 48,169 (platform.openai.com/docs/guides/images-vision, "Calculating
/// costs"; other models: 85 + 8 × 170 = 1,445 for `gpt-4o`, 1,536 patches
/// × 2.46 = 3,779 for `gpt-4.1-nano`).
pub const OPENAI_IMAGE_TOKENS: u64 = 48_169;

/// Input tokens one image may cost at most for Anthropic: images are
/// scaled to at most 1,568 px on the long edge and about 1.15 megapixels,
/// at (width × height) / 750 tokens: about 1,600
/// (docs.anthropic.com/en/docs/build-with-claude/vision, "Evaluate image size").
pub const ANTHROPIC_IMAGE_TOKENS: u64 = 1_600;

/// Input tokens Anthropic adds for its tool-use system prompt when `tools`
/// is present: 159–530 depending on model and `tool_choice`
/// (docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview, "Pricing").
pub const ANTHROPIC_TOOL_PROMPT_TOKENS: u64 = 600;

/// Which API of a provider a request is for, as far as its cost goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// Chat-style generation: OpenAI-compatible chat completions, Anthropic
    /// messages, Google `generateContent`, Cohere chat; anything unknown.
    #[default]
    Chat,
    /// OpenAI legacy `/v1/completions` (`best_of`, batched prompts).
    LegacyCompletions,
    /// OpenAI Responses API (`/v1/responses`): `max_output_tokens`, no
    /// `stream_options`.
    Responses,
    /// Embeddings: input only, no output.
    Embeddings,
}

impl Endpoint {
    /// The endpoint of `path` (query ignored) for `provider`.
    pub fn of(provider: Provider, path: &str) -> Endpoint {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        match provider.usage_format() {
            UsageFormat::OpenAi if path.ends_with("/chat/completions") => Endpoint::Chat,
            UsageFormat::OpenAi if path.ends_with("/completions") => Endpoint::LegacyCompletions,
            UsageFormat::OpenAi if path.ends_with("/responses") => Endpoint::Responses,
            UsageFormat::OpenAi if path.ends_with("/embeddings") => Endpoint::Embeddings,
            UsageFormat::Google
                if path.ends_with(":embedContent") || path.ends_with(":batchEmbedContents") =>
            {
                Endpoint::Embeddings
            }
            UsageFormat::Cohere if path.ends_with("/embed") => Endpoint::Embeddings,
            _ => Endpoint::Chat,
        }
    }
}

/// The facts about a request the policy engine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInspection {
    /// The model, decoded exactly as the provider reads it (no trimming or
    /// case folding); for Google, from the path.
    pub model: Option<String>,
    /// The output limit the client set; for OpenAI-compatible bodies the
    /// larger of `max_completion_tokens` and `max_tokens`.
    pub max_output_tokens: Option<u64>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Unicode scalar values in the body.
    pub body_chars: u64,
    /// OpenAI-compatible `stream_options.include_usage == true`.
    pub client_asked_usage: bool,
    /// The field [`max_output_tokens`](Self::max_output_tokens) came from,
    /// e.g. `max_tokens` or `generationConfig.maxOutputTokens`.
    pub output_limit_field: Option<&'static str>,
    /// The API the request is for.
    pub endpoint: Endpoint,
    /// How many outputs of up to the output limit one call may bill: `n`
    /// (OpenAI chat), `max(n, best_of)` × prompts (legacy completions),
    /// `candidateCount` (Google), `num_generations` (Cohere); 1 otherwise,
    /// 0 for embeddings (no output).
    pub output_multiplier: u64,
    /// The most input tokens the body's content can cost: its UTF-8 bytes
    /// (a token covers at least one byte) plus each image's ceiling plus
    /// fixed prompts the provider adds. Meaningless when
    /// [`input_unbounded`](Self::input_unbounded).
    pub input_tokens_bound: u64,
    /// The body refers to input it does not carry (file ids, audio, earlier
    /// responses, server-side tools, Google media): only the model's context
    /// window bounds it.
    pub input_unbounded: bool,
}

impl Default for RequestInspection {
    /// Nothing known: a chat call of one output and no input.
    fn default() -> Self {
        RequestInspection {
            model: None,
            max_output_tokens: None,
            stream: false,
            body_chars: 0,
            client_asked_usage: false,
            output_limit_field: None,
            endpoint: Endpoint::Chat,
            output_multiplier: 1,
            input_tokens_bound: 0,
            input_unbounded: false,
        }
    }
}

/// A request body the policy cannot read safely (→ 400 `invalid_request`).
/// Messages never quote the body beyond a truncated key name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is not UTF-8.
    #[error("request body is not valid UTF-8")]
    InvalidUtf8,
    /// The body is not JSON.
    #[error("request body is not valid JSON ({0})")]
    InvalidJson(String),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("request body is nested more than {MAX_DEPTH} levels deep")]
    TooDeep,
    /// A key appears twice in the same object.
    #[error("duplicate key {0:?} in request body")]
    DuplicateKey(String),
    /// A field the policy reads has the wrong type or value.
    #[error("invalid value for {0}: expected {expected}", expected = expected_for(.0))]
    InvalidField(&'static str),
    /// The body names another model than the path.
    #[error("model {body:?} in the body conflicts with model {path:?} in the path")]
    ModelConflict {
        /// The model in the path.
        path: String,
        /// The model in the body.
        body: String,
    },
}

fn expected_for(field: &str) -> &'static str {
    match field {
        "n" | "best_of" | "num_generations" | "generationConfig.candidateCount" => {
            "an integer from 1 to 128"
        }
        "model" => "a string",
        "stream" | "stream_options.include_usage" => "true or false",
        "stream_options" | "generationConfig" => "an object",
        _ => "a non-negative integer",
    }
}

/// Reads the policy facts from a request. An empty (or all-whitespace)
/// body yields no facts but the path's (GET requests). Call it only for
/// JSON bodies; for other content types (multipart uploads) use
/// [`count_chars`] alone.
pub fn inspect_request(
    provider: Provider,
    path: &str,
    body: &[u8],
) -> Result<RequestInspection, BodyError> {
    let google_path = (provider == Provider::Google)
        .then(|| google_model_and_action(path))
        .flatten();
    let endpoint = Endpoint::of(provider, path);
    let mut inspection = RequestInspection {
        model: google_path.map(|(model, _)| model.to_owned()),
        stream: google_path.is_some_and(|(_, action)| action == Some("streamGenerateContent")),
        endpoint,
        output_multiplier: u64::from(endpoint != Endpoint::Embeddings),
        input_tokens_bound: body.len() as u64,
        ..RequestInspection::default()
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        inspection.body_chars = count_chars(body);
        return Ok(inspection);
    }
    let text = std::str::from_utf8(body).map_err(|_| BodyError::InvalidUtf8)?;
    inspection.body_chars = text.chars().count() as u64;
    check_depth(body)?;
    let facts = parse_top(provider, endpoint, text)?;

    if let Some(body_model) = facts.model {
        match &inspection.model {
            Some(path_model) => {
                let bare = body_model.strip_prefix("models/").unwrap_or(&body_model);
                if bare != path_model {
                    return Err(BodyError::ModelConflict {
                        path: path_model.clone(),
                        body: truncate(&body_model),
                    });
                }
            }
            None => inspection.model = Some(body_model),
        }
    }
    let format = provider.usage_format();
    match format {
        UsageFormat::OpenAi if endpoint == Endpoint::Responses => {
            inspection.stream = facts.stream.unwrap_or(false);
            inspection.max_output_tokens = facts.max_output_tokens;
            inspection.output_limit_field = facts.max_output_tokens.map(|_| "max_output_tokens");
        }
        UsageFormat::OpenAi => {
            inspection.stream = facts.stream.unwrap_or(false);
            inspection.client_asked_usage = facts.include_usage == Some(true);
            let (value, field) = match (facts.max_completion_tokens, facts.max_tokens) {
                (Some(a), Some(b)) if b > a => (Some(b), "max_tokens"),
                (Some(a), _) => (Some(a), "max_completion_tokens"),
                (None, Some(b)) => (Some(b), "max_tokens"),
                (None, None) => (None, ""),
            };
            inspection.max_output_tokens = value;
            inspection.output_limit_field = value.map(|_| field);
        }
        UsageFormat::Anthropic | UsageFormat::Cohere => {
            inspection.stream = facts.stream.unwrap_or(false);
            inspection.max_output_tokens = facts.max_tokens;
            inspection.output_limit_field = facts.max_tokens.map(|_| "max_tokens");
        }
        UsageFormat::Google => {
            inspection.max_output_tokens = facts.max_output_tokens;
            inspection.output_limit_field = facts
                .max_output_tokens
                .map(|_| "generationConfig.maxOutputTokens");
        }
    }
    if endpoint != Endpoint::Embeddings {
        let n = facts.n.unwrap_or(1);
        inspection.output_multiplier = match endpoint {
            // `best_of` candidates are generated (and billed) server-side,
            // per prompt of a batch.
            Endpoint::LegacyCompletions => n
                .max(facts.best_of.unwrap_or(1))
                .saturating_mul(facts.prompts.unwrap_or(1).max(1)),
            _ => n,
        };
    }
    let scan = facts.scan;
    let image_tokens = match format {
        UsageFormat::Anthropic => ANTHROPIC_IMAGE_TOKENS,
        _ => OPENAI_IMAGE_TOKENS,
    };
    let tool_prompt = if scan.tool_prompt {
        ANTHROPIC_TOOL_PROMPT_TOKENS
    } else {
        0
    };
    inspection.input_tokens_bound = (body.len() as u64)
        .saturating_add(scan.images.saturating_mul(image_tokens))
        .saturating_add(tool_prompt);
    inspection.input_unbounded = scan.unbounded;
    Ok(inspection)
}

/// Unicode scalar values in `body`, without allocating. For invalid UTF-8
/// it counts every byte that does not continue a sequence.
pub fn count_chars(body: &[u8]) -> u64 {
    body.iter().filter(|&&b| (b & 0xC0) != 0x80).count() as u64
}

/// `(model, action)` from `/v1beta/models/{model}:{action}` or
/// `/v1/models/{model}[:{action}]`.
fn google_model_and_action(path: &str) -> Option<(&str, Option<&str>)> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    match rest.split_once(':') {
        Some((model, action)) if !model.is_empty() => Some((model, Some(action))),
        Some(_) => None,
        None => Some((rest, None)),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Refuses nesting deeper than [`MAX_DEPTH`] in one pass, without recursion.
fn check_depth(body: &[u8]) -> Result<(), BodyError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(BodyError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Parsing: one pass with serde visitors, skipping what the policy ignores.

/// The fields read from the top-level object.
#[derive(Debug, Default)]
struct Facts {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    /// Google `generationConfig.maxOutputTokens`, Responses `max_output_tokens`.
    max_output_tokens: Option<u64>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    /// `n`, `candidateCount` or `num_generations`.
    n: Option<u64>,
    best_of: Option<u64>,
    /// Prompts in a legacy completions batch.
    prompts: Option<u64>,
    scan: ScanFacts,
}

/// What the content scan found anywhere in the body.
#[derive(Debug, Default, Clone, Copy)]
struct ScanFacts {
    images: u64,
    unbounded: bool,
    tool_prompt: bool,
}

/// Carries our own error out of serde, which field was being read when
/// serde_json failed (so `1e400` for `max_tokens` names `max_tokens`), and
/// what the content scan found.
#[derive(Default)]
struct ErrorSlot {
    error: RefCell<Option<BodyError>>,
    field: RefCell<Option<&'static str>>,
    scan: RefCell<ScanFacts>,
}

impl ErrorSlot {
    fn fail<E: de::Error>(&self, error: BodyError) -> E {
        *self.error.borrow_mut() = Some(error);
        E::custom("rejected")
    }
}

fn parse_top(provider: Provider, endpoint: Endpoint, text: &str) -> Result<Facts, BodyError> {
    let slot = ErrorSlot::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let visitor = TopVisitor {
        format: provider.usage_format(),
        endpoint,
        slot: &slot,
    };
    let result = (&mut de)
        .deserialize_any(visitor)
        .and_then(|facts| de.end().map(|()| facts));
    result
        .map(|mut facts| {
            facts.scan = *slot.scan.borrow();
            facts
        })
        .map_err(|e| {
            if let Some(error) = slot.error.take() {
                return error;
            }
            if let Some(field) = slot.field.take()
                && (e.is_data() || e.classify() == serde_json::error::Category::Syntax)
            {
                return BodyError::InvalidField(field);
            }
            BodyError::InvalidJson(format!(
                "{} at line {} column {}",
                category(&e),
                e.line(),
                e.column()
            ))
        })
}

fn category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected value",
        serde_json::error::Category::Eof => "unexpected end",
    }
}

/// A decoded object key, borrowed when it had no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Google's proto JSON accepts `snake_case` and `lowerCamelCase` for the
/// same field; both spellings map to the camel-case one.
fn canonical_key(format: UsageFormat, key: Cow<'_, str>) -> Cow<'_, str> {
    if format != UsageFormat::Google || !key.contains('_') {
        return key;
    }
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Walks an object's keys, refusing duplicates, handing each value to `on_value`.
fn walk_object<'de, A: MapAccess<'de>>(
    format: UsageFormat,
    slot: &ErrorSlot,
    mut map: A,
    mut on_value: impl FnMut(&str, &mut A) -> Result<(), A::Error>,
) -> Result<(), A::Error> {
    let mut seen = SeenKeys::default();
    while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
        let key = canonical_key(format, key);
        if seen.contains(&key) {
            return Err(slot.fail(BodyError::DuplicateKey(truncate(&key))));
        }
        on_value(&key, &mut map)?;
        *slot.field.borrow_mut() = None;
        seen.insert(key);
    }
    Ok(())
}

/// Keys up to this many are compared one by one; past it they are hashed.
const LINEAR_KEYS: usize = 16;

/// The keys of one object seen so far. Most request objects have a handful
/// of keys, where comparing them costs less than hashing each; a hostile
/// object with thousands of keys moves to a hash set and stays linear.
#[derive(Default)]
struct SeenKeys<'de> {
    few: Vec<Cow<'de, str>>,
    many: HashSet<Cow<'de, str>>,
}

impl<'de> SeenKeys<'de> {
    fn contains(&self, key: &str) -> bool {
        self.few.iter().any(|k| k == key) || self.many.contains(key)
    }

    fn insert(&mut self, key: Cow<'de, str>) {
        if self.few.len() < LINEAR_KEYS {
            self.few.push(key);
        } else {
            self.many.insert(key);
        }
    }
}

struct TopVisitor<'s> {
    format: UsageFormat,
    endpoint: Endpoint,
    slot: &'s ErrorSlot,
}

impl<'de> Visitor<'de> for TopVisitor<'_> {
    type Value = Facts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Facts, A::Error> {
        let mut facts = Facts::default();
        let (format, endpoint, slot) = (self.format, self.endpoint, self.slot);
        let field = |name: &'static str| *slot.field.borrow_mut() = Some(name);
        let scan = ScanSeed {
            format,
            slot,
            type_value: false,
        };
        let responses = endpoint == Endpoint::Responses;
        let legacy = endpoint == Endpoint::LegacyCompletions;
        walk_object(format, slot, map, |key, map| {
            match (format, key) {
                (UsageFormat::OpenAi, "max_output_tokens") if responses => {
                    field("max_output_tokens");
                    facts.max_output_tokens = map.next_value::<Option<TokenLimit>>()?.map(|t| t.0);
                }
                (UsageFormat::OpenAi, "n") => {
                    field("n");
                    facts.n = map.next_value::<Option<Multiplier>>()?.map(|m| m.0);
                }
                (UsageFormat::OpenAi, "best_of") if legacy => {
                    field("best_of");
                    facts.best_of = map.next_value::<Option<Multiplier>>()?.map(|m| m.0);
                }
                (UsageFormat::Cohere, "num_generations") => {
                    field("num_generations");
                    facts.n = map.next_value::<Option<Multiplier>>()?.map(|m| m.0);
                }
                (UsageFormat::OpenAi, "prompt") if legacy => {
                    facts.prompts = Some(map.next_value::<PromptCount>()?.0);
                }
                // Input the body does not carry: an earlier response or
                // conversation, a stored prompt, web search results.
                (UsageFormat::OpenAi, "previous_response_id" | "conversation" | "prompt")
                    if responses =>
                {
                    if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                        slot.scan.borrow_mut().unbounded = true;
                    }
                }
                (UsageFormat::OpenAi, "web_search_options")
                | (UsageFormat::Anthropic, "mcp_servers" | "container")
                | (UsageFormat::Google, "cachedContent") => {
                    if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                        slot.scan.borrow_mut().unbounded = true;
                    }
                }
                (UsageFormat::Anthropic, "tools") => {
                    if map.next_value_seed(OptionSeed(scan))?.is_some() {
                        slot.scan.borrow_mut().tool_prompt = true;
                    }
                }
                (_, "model") => {
                    field("model");
                    facts.model = map.next_value::<Option<String>>()?;
                }
                (
                    UsageFormat::OpenAi | UsageFormat::Anthropic | UsageFormat::Cohere,
                    "max_tokens",
                ) => {
                    field("max_tokens");
                    facts.max_tokens = map.next_value::<Option<TokenLimit>>()?.map(|t| t.0);
                }
                (UsageFormat::OpenAi, "max_completion_tokens") => {
                    field("max_completion_tokens");
                    facts.max_completion_tokens =
                        map.next_value::<Option<TokenLimit>>()?.map(|t| t.0);
                }
                (UsageFormat::OpenAi | UsageFormat::Anthropic | UsageFormat::Cohere, "stream") => {
                    field("stream");
                    facts.stream = map.next_value::<Option<bool>>()?;
                }
                (UsageFormat::OpenAi, "stream_options") => {
                    field("stream_options");
                    let seed = NestedSeed {
                        format,
                        slot,
                        kind: Nested::StreamOptions,
                    };
                    if let Some(nested) = map.next_value_seed(OptionSeed(seed))? {
                        facts.include_usage = nested.flag;
                    }
                }
                (UsageFormat::Google, "generationConfig") => {
                    field("generationConfig");
                    let seed = NestedSeed {
                        format,
                        slot,
                        kind: Nested::GenerationConfig,
                    };
                    if let Some(nested) = map.next_value_seed(OptionSeed(seed))? {
                        facts.max_output_tokens = nested.limit;
                        facts.n = nested.count;
                    }
                }
                _ => map.next_value_seed(scan)?,
            }
            Ok(())
        })?;
        Ok(facts)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Facts, A::Error> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Facts, E> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Facts, E> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Facts, E> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Facts, E> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Facts, E> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Facts, E> {
        Err(self.slot.fail(BodyError::NotAnObject))
    }
}

/// A token limit: a JSON integer ≥ 0 and nothing else (not `1.5`, `1e2`,
/// `-1` or `"100"`).
struct TokenLimit(u64);

impl<'de> de::Deserialize<'de> for TokenLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LimitVisitor;
        impl Visitor<'_> for LimitVisitor {
            type Value = TokenLimit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TokenLimit, E> {
                Ok(TokenLimit(v))
            }
        }
        d.deserialize_u64(LimitVisitor)
    }
}

/// An output multiplier: a JSON integer from 1 to [`MAX_MULTIPLIER`].
struct Multiplier(u64);

impl<'de> de::Deserialize<'de> for Multiplier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MultiplierVisitor;
        impl Visitor<'_> for MultiplierVisitor {
            type Value = Multiplier;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer from 1 to {MAX_MULTIPLIER}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Multiplier, E> {
                if (1..=MAX_MULTIPLIER).contains(&v) {
                    Ok(Multiplier(v))
                } else {
                    Err(E::invalid_value(de::Unexpected::Unsigned(v), &self))
                }
            }
        }
        d.deserialize_u64(MultiplierVisitor)
    }
}

/// How many prompts a legacy completions `prompt` holds: a string or a
/// token array is one; an array of strings or of token arrays is a batch.
struct PromptCount(u64);

impl<'de> de::Deserialize<'de> for PromptCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PromptVisitor;
        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = PromptCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PromptCount, A::Error> {
                let (mut prompts, mut tokens) = (0u64, false);
                while let Some(element) = seq.next_element::<PromptElement>()? {
                    match element {
                        PromptElement::Token => tokens = true,
                        PromptElement::Prompt => prompts += 1,
                    }
                }
                Ok(PromptCount(if tokens { 1 } else { prompts.max(1) }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PromptCount, A::Error> {
                IgnoredAny.visit_map(map)?;
                Ok(PromptCount(1))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<PromptCount, E> {
                Ok(PromptCount(1))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PromptCount, E> {
                Ok(PromptCount(1))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<PromptCount, E> {
                Ok(PromptCount(1))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PromptCount, E> {
                Ok(PromptCount(1))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<PromptCount, E> {
                Ok(PromptCount(1))
            }
            fn visit_unit<E: de::Error>(self) -> Result<PromptCount, E> {
                Ok(PromptCount(1))
            }
        }
        d.deserialize_any(PromptVisitor)
    }
}

/// One element of a `prompt` array: a token id, or a prompt of its own.
enum PromptElement {
    Token,
    Prompt,
}

impl<'de> de::Deserialize<'de> for PromptElement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ElementVisitor;
        impl<'de> Visitor<'de> for ElementVisitor {
            type Value = PromptElement;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt or a token")
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PromptElement, E> {
                Ok(PromptElement::Token)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<PromptElement, E> {
                Ok(PromptElement::Token)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PromptElement, E> {
                Ok(PromptElement::Token)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<PromptElement, E> {
                Ok(PromptElement::Prompt)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<PromptElement, E> {
                Ok(PromptElement::Prompt)
            }
            fn visit_unit<E: de::Error>(self) -> Result<PromptElement, E> {
                Ok(PromptElement::Prompt)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<PromptElement, A::Error> {
                IgnoredAny.visit_seq(seq)?;
                Ok(PromptElement::Prompt)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PromptElement, A::Error> {
                IgnoredAny.visit_map(map)?;
                Ok(PromptElement::Prompt)
            }
        }
        d.deserialize_any(ElementVisitor)
    }
}

/// Content `type` values whose input the body does not bound: files and
/// audio by reference or in formats whose token count is not tied to their
/// bytes (PDF pages, audio seconds), earlier items, and server-side tools
/// whose results are billed as input. Matched as prefixes.
const UNBOUNDED_TYPES: &[&str] = &[
    "input_audio",
    "input_file",
    "file",
    "document",
    "container_upload",
    "item_reference",
    "web_search",
    "web_fetch",
    "code_execution",
    "code_interpreter",
    "computer",
    "bash",
    "text_editor",
    "memory",
    "tool_search",
    "mcp",
    "image_generation",
    "local_shell",
    "shell",
    "apply_patch",
];

/// Walks any value looking for images (`type` `image_url`, `input_image`,
/// `image`) and input it cannot bound (see [`UNBOUNDED_TYPES`]; `file_id`
/// and message `audio` references; Google `inlineData`/`fileData`, whose
/// video, audio, PDF pages and image tiles are not bounded by their
/// bytes), recording them in the slot's [`ScanFacts`].
#[derive(Clone, Copy)]
struct ScanSeed<'s> {
    format: UsageFormat,
    slot: &'s ErrorSlot,
    /// The value of a `type` key.
    type_value: bool,
}

impl ScanSeed<'_> {
    fn classify(&self, value: &str) {
        if !self.type_value {
            return;
        }
        let mut scan = self.slot.scan.borrow_mut();
        if matches!(value, "image_url" | "input_image" | "image") {
            scan.images = scan.images.saturating_add(1);
        } else if UNBOUNDED_TYPES.iter().any(|t| value.starts_with(t)) {
            scan.unbounded = true;
        }
    }

    fn inner(self) -> Self {
        ScanSeed {
            type_value: false,
            ..self
        }
    }
}

impl<'de> DeserializeSeed<'de> for ScanSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScanSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let key = canonical_key(self.format, key);
            match (self.format, key.as_ref()) {
                (_, "type") => map.next_value_seed(ScanSeed {
                    type_value: true,
                    ..inner
                })?,
                (UsageFormat::Google, "inlineData" | "fileData")
                | (UsageFormat::OpenAi | UsageFormat::Anthropic | UsageFormat::Cohere, "file_id")
                | (UsageFormat::OpenAi, "audio") => {
                    if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                        self.slot.scan.borrow_mut().unbounded = true;
                    }
                }
                _ => map.next_value_seed(inner)?,
            }
        }
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner();
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.classify(v);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// `null` or the seed's object.
struct OptionSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OptionSeed<S> {
    type Value = Option<S::Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct OptionVisitor<S>(S);
        impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OptionVisitor<S> {
            type Value = Option<S::Value>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null or an object")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                self.0.deserialize(d).map(Some)
            }
        }
        d.deserialize_option(OptionVisitor(self.0))
    }
}

#[derive(Clone, Copy)]
enum Nested {
    /// `stream_options`: yields `include_usage`.
    StreamOptions,
    /// `generationConfig`: yields `maxOutputTokens`.
    GenerationConfig,
}

struct NestedSeed<'s> {
    format: UsageFormat,
    slot: &'s ErrorSlot,
    kind: Nested,
}

/// What a nested object yields: `include_usage`, or `maxOutputTokens` and
/// `candidateCount`.
struct NestedValue {
    flag: Option<bool>,
    limit: Option<u64>,
    count: Option<u64>,
}

impl<'de> DeserializeSeed<'de> for NestedSeed<'_> {
    type Value = NestedValue;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<NestedValue, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for NestedSeed<'_> {
    type Value = NestedValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<NestedValue, A::Error> {
        let (slot, kind) = (self.slot, self.kind);
        let mut flag = None;
        let mut limit = None;
        let mut count = None;
        walk_object(self.format, slot, map, |key, map| {
            match (kind, key) {
                (Nested::StreamOptions, "include_usage") => {
                    *slot.field.borrow_mut() = Some("stream_options.include_usage");
                    flag = map.next_value::<Option<bool>>()?;
                }
                (Nested::GenerationConfig, "maxOutputTokens") => {
                    *slot.field.borrow_mut() = Some("generationConfig.maxOutputTokens");
                    limit = map.next_value::<Option<TokenLimit>>()?.map(|t| t.0);
                }
                (Nested::GenerationConfig, "candidateCount") => {
                    *slot.field.borrow_mut() = Some("generationConfig.candidateCount");
                    count = map.next_value::<Option<Multiplier>>()?.map(|m| m.0);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        })?;
        Ok(NestedValue { flag, limit, count })
    }
}

// ---------------------------------------------------------------------------
// Rewriting: targeted byte edits, so untouched bytes stay the client's.

/// Edits a request body before forwarding: with `clamp_output_tokens`, the
/// provider's output limit becomes at most that value (set where absent;
/// for OpenAI-compatible bodies every limit field present is lowered); with
/// `add_include_usage` (OpenAI-compatible streams only; ignored for other
/// providers), `stream_options.include_usage` becomes `true`, keeping the
/// client's other stream options. Returns `None` when nothing changes,
/// which is the common case: the body is then forwarded as it came.
///
/// The body is validated as [`inspect_request`] does (duplicate keys,
/// depth, types) before any edit. When an output field is added to an
/// OpenAI body without one, `openai` gets `max_completion_tokens` (its
/// reasoning models refuse `max_tokens`) and the other compatible
/// providers `max_tokens`. This is [`rewrite_request_at`] for a chat path.
pub fn rewrite_request(
    provider: Provider,
    body: &[u8],
    clamp_output_tokens: Option<u64>,
    add_include_usage: bool,
) -> Result<Option<Vec<u8>>, BodyError> {
    rewrite_request_at(provider, "", body, clamp_output_tokens, add_include_usage)
}

/// [`rewrite_request`] for the API at `path`: for the Responses API
/// (`/v1/responses`) the output limit is `max_output_tokens` and
/// `add_include_usage` is ignored (that API refuses `stream_options`; its
/// usage arrives in `response.completed`).
pub fn rewrite_request_at(
    provider: Provider,
    path: &str,
    body: &[u8],
    clamp_output_tokens: Option<u64>,
    add_include_usage: bool,
) -> Result<Option<Vec<u8>>, BodyError> {
    let format = provider.usage_format();
    let endpoint = Endpoint::of(provider, path);
    let add_include_usage =
        add_include_usage && format == UsageFormat::OpenAi && endpoint != Endpoint::Responses;
    if clamp_output_tokens.is_none() && !add_include_usage {
        return Ok(None);
    }
    let text = std::str::from_utf8(body).map_err(|_| BodyError::InvalidUtf8)?;
    check_depth(body)?;
    parse_top(provider, endpoint, text)?;

    let top = scan_object(body, skip_ws(body, 0))?;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut top_inserts: Vec<String> = Vec::new();

    if let Some(clamp) = clamp_output_tokens {
        match format {
            UsageFormat::OpenAi | UsageFormat::Anthropic | UsageFormat::Cohere => {
                let fields: &[&str] = if endpoint == Endpoint::Responses {
                    &["max_output_tokens"]
                } else if format == UsageFormat::OpenAi {
                    &["max_completion_tokens", "max_tokens"]
                } else {
                    &["max_tokens"]
                };
                let mut present = false;
                for member in top
                    .members
                    .iter()
                    .filter(|m| fields.contains(&m.key.as_ref()))
                {
                    present = true;
                    clamp_value(body, &member.value, clamp, &mut edits)?;
                }
                if !present {
                    let field = if endpoint == Endpoint::Responses {
                        "max_output_tokens"
                    } else if provider == Provider::OpenAi {
                        "max_completion_tokens"
                    } else {
                        "max_tokens"
                    };
                    top_inserts.push(format!("\"{field}\":{clamp}"));
                }
            }
            UsageFormat::Google => {
                let config = top
                    .members
                    .iter()
                    .find(|m| canonical_key(format, Cow::Borrowed(&m.key)) == "generationConfig");
                let inserted = format!("{{\"maxOutputTokens\":{clamp}}}");
                match config {
                    None => top_inserts.push(format!("\"generationConfig\":{inserted}")),
                    Some(m) if &body[m.value.clone()] == b"null" => {
                        edits.push((m.value.clone(), inserted))
                    }
                    Some(m) => {
                        let inner = scan_object(body, m.value.start)?;
                        let limit = inner.members.iter().find(|m| {
                            canonical_key(format, Cow::Borrowed(&m.key)) == "maxOutputTokens"
                        });
                        match limit {
                            Some(limit) => clamp_value(body, &limit.value, clamp, &mut edits)?,
                            None => edits
                                .push(insert_into(&inner, format!("\"maxOutputTokens\":{clamp}"))),
                        }
                    }
                }
            }
        }
    }

    if add_include_usage {
        match top.members.iter().find(|m| m.key == "stream_options") {
            None => top_inserts.push("\"stream_options\":{\"include_usage\":true}".to_owned()),
            Some(m) if &body[m.value.clone()] == b"null" => {
                edits.push((m.value.clone(), "{\"include_usage\":true}".to_owned()));
            }
            Some(m) => {
                let inner = scan_object(body, m.value.start)?;
                match inner.members.iter().find(|m| m.key == "include_usage") {
                    Some(flag) if &body[flag.value.clone()] == b"true" => {}
                    Some(flag) => edits.push((flag.value.clone(), "true".to_owned())),
                    None => edits.push(insert_into(&inner, "\"include_usage\":true".to_owned())),
                }
            }
        }
    }

    if !top_inserts.is_empty() {
        edits.push(insert_into(&top, top_inserts.join(",")));
    }
    if edits.is_empty() {
        return Ok(None);
    }
    edits.sort_by_key(|(range, _)| range.start);
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (range, text) in edits {
        out.extend_from_slice(body.get(at..range.start).ok_or(BodyError::NotAnObject)?);
        out.extend_from_slice(text.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(body.get(at..).unwrap_or_default());
    Ok(Some(out))
}

/// Lowers the integer (or `null`) at `value` to `clamp` when above it.
fn clamp_value(
    body: &[u8],
    value: &Range<usize>,
    clamp: u64,
    edits: &mut Vec<(Range<usize>, String)>,
) -> Result<(), BodyError> {
    let current: Option<u64> = serde_json::from_slice(&body[value.clone()])
        .map_err(|_| BodyError::InvalidField("max_tokens"))?;
    if current.is_none_or(|n| n > clamp) {
        edits.push((value.clone(), clamp.to_string()));
    }
    Ok(())
}

/// An edit adding `member` as the first member of `object`.
fn insert_into(object: &ObjectSpan, member: String) -> (Range<usize>, String) {
    let at = object.open + 1;
    let text = if object.members.is_empty() {
        member
    } else {
        member + ","
    };
    (at..at, text)
}

/// One member of a scanned object: its decoded key and its value's bytes.
struct Member {
    key: String,
    value: Range<usize>,
}

/// A scanned object: where its `{` is and its members.
struct ObjectSpan {
    open: usize,
    members: Vec<Member>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// The members of the object starting at `open`. The body has been
/// validated, so a surprise is reported as an error, never a panic.
fn scan_object(b: &[u8], open: usize) -> Result<ObjectSpan, BodyError> {
    let bad = || BodyError::NotAnObject;
    if b.get(open) != Some(&b'{') {
        return Err(bad());
    }
    let mut members = Vec::new();
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Ok(ObjectSpan { open, members });
    }
    loop {
        let key_start = i;
        let key_end = skip_value(b, i)?;
        let key: String = serde_json::from_slice(&b[key_start..key_end]).map_err(|_| bad())?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return Err(bad());
        }
        let value_start = skip_ws(b, i + 1);
        let value_end = skip_value(b, value_start)?;
        members.push(Member {
            key,
            value: value_start..value_end,
        });
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Ok(ObjectSpan { open, members }),
            _ => return Err(bad()),
        }
    }
}

/// The end of the JSON value starting at `i`, without recursion.
fn skip_value(b: &[u8], i: usize) -> Result<usize, BodyError> {
    let bad = BodyError::NotAnObject;
    let mut depth = 0usize;
    let mut j = i;
    loop {
        let c = *b.get(j).ok_or(bad.clone())?;
        match c {
            b'"' => {
                j += 1;
                loop {
                    match b.get(j).ok_or(bad.clone())? {
                        b'\\' => j += 2,
                        b'"' => break,
                        _ => j += 1,
                    }
                }
                j += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                j += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1).ok_or(bad.clone())?;
                j += 1;
            }
            _ if depth == 0 => {
                // A scalar: runs to the next delimiter.
                while b
                    .get(j)
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    j += 1;
                }
                return Ok(j);
            }
            _ => j += 1,
        }
        if depth == 0 {
            return Ok(j);
        }
    }
}
