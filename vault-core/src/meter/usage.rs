//! Token usage read from provider responses as their bytes pass.
//!
//! [`UsageMeter`] is fed the response body chunk by chunk and reports the
//! provider's own count of input and output tokens
//! (docs/budgets.md#token-classes):
//!
//! | format | JSON body | stream |
//! |---|---|---|
//! | OpenAI-compatible | `usage.prompt_tokens` / `completion_tokens` (Responses API: `input_tokens` / `output_tokens`) | the chunk with a non-null `usage` (or `response.usage`); the last one counts |
//! | Anthropic | `usage.input_tokens` (+ `cache_creation_input_tokens` + `cache_read_input_tokens`) / `output_tokens` | `message_start.message.usage`, then `message_delta.usage` running totals; the last counts |
//! | Google | `usageMetadata.promptTokenCount` (+ `toolUsePromptTokenCount`) / `candidatesTokenCount` (+ `thoughtsTokenCount`) | the same in every chunk, running totals; the last counts |
//! | Cohere | `usage.billed_units.input_tokens` / `output_tokens` (v1: `meta.billed_units`) | the `message-end` event's `delta.usage.billed_units` |
//!
//! Reports never add up: a later report replaces the fields it carries.
//!
//! Upstream numbers are not trusted (docs/threat-model.md, H3): a negative
//! count is 0, a fraction is rounded up, anything above [`TOKEN_CAP`] saturates
//! at it, and a report in which a count is not a number at all (a string, an
//! object) is ignored whole, so that the caller charges the reservation
//! instead.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::sse::{DEFAULT_EVENT_CAP, SseParser};
use crate::provider::UsageFormat;

/// The most tokens one count may claim: `u32::MAX * 16` (about 68.7
/// billion). Larger claims saturate here, so cost arithmetic never nears
/// overflow.
pub const TOKEN_CAP: u64 = u32::MAX as u64 * 16;

/// The default cap on a buffered JSON body: 8 MiB.
pub const DEFAULT_JSON_CAP: usize = 8 << 20;

/// Tokens a call used, as the provider reported them, with the token
/// classes that are billed at their own prices (docs/budgets.md#token-classes).
/// The classes are parts of the two totals, never added to them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens, cache reads and writes included.
    pub tokens_in: u64,
    /// Output (completion) tokens, reasoning included.
    pub tokens_out: u64,
    /// Of `tokens_in`: read from the prompt cache.
    pub cached_in: u64,
    /// Of `tokens_in`: written to the prompt cache (5-minute lifetime).
    pub cache_write_in: u64,
    /// Of `tokens_in`: written to the prompt cache (1-hour lifetime).
    pub cache_write_1h_in: u64,
    /// Of `tokens_in`: audio.
    pub audio_in: u64,
    /// Of `tokens_out`: reasoning (thinking).
    pub reasoning_out: u64,
    /// Of `tokens_out`: audio.
    pub audio_out: u64,
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// One JSON document, buffered up to a cap and parsed at the end.
    Json,
    /// Server-Sent Events.
    Sse,
    /// One JSON array streamed element by element (Google
    /// `:streamGenerateContent` without `alt=sse`).
    JsonArrayStream,
}

/// Reads usage from a response body fed in chunks. Memory is bounded by
/// the caps whatever the upstream sends.
#[derive(Debug)]
pub struct UsageMeter {
    format: UsageFormat,
    input: Input,
    tally: Tally,
}

#[derive(Debug)]
enum Input {
    Json {
        buf: Vec<u8>,
        cap: usize,
        overflowed: bool,
    },
    Sse(SseParser),
    Array(ElementScanner),
}

/// The token classes a report may carry, in [`Tally::classes`] order.
const CLASSES: usize = 6;

/// What has been metered so far; `None` fields were never reported.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    tokens_in: Option<u64>,
    tokens_out: Option<u64>,
    /// Cached, cache-write (5 min), cache-write (1 h) and audio input, then
    /// reasoning and audio output.
    classes: [Option<u64>; CLASSES],
    /// The stream's terminal event has been seen: the counts are final.
    terminal: bool,
}

impl Tally {
    fn merge(&mut self, report: Tally) {
        if report.tokens_in.is_some() {
            self.tokens_in = report.tokens_in;
        }
        if report.tokens_out.is_some() {
            self.tokens_out = report.tokens_out;
        }
        for (mine, theirs) in self.classes.iter_mut().zip(report.classes) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
    }

    fn usage(self) -> Option<Usage> {
        if self.tokens_in.is_none() && self.tokens_out.is_none() {
            return None;
        }
        let [
            cached_in,
            cache_write_in,
            cache_write_1h_in,
            audio_in,
            reasoning_out,
            audio_out,
        ] = self.classes.map(|c| c.unwrap_or(0));
        Some(Usage {
            tokens_in: self.tokens_in.unwrap_or(0),
            tokens_out: self.tokens_out.unwrap_or(0),
            cached_in,
            cache_write_in,
            cache_write_1h_in,
            audio_in,
            reasoning_out,
            audio_out,
        })
    }
}

/// Whether an SSE event ends its stream: after it the provider sends no
/// further usage, so what was metered is final even if the connection is
/// then cut (docs/budgets.md#settlement). OpenAI chat ends with
/// `data: [DONE]`, the Responses API with `response.completed` (or
/// `.incomplete`/`.failed`), Anthropic with `message_stop`, Cohere v2 with
/// `message-end` (which carries the usage itself).
fn is_terminal(event: &super::sse::SseEvent<'_>) -> bool {
    matches!(
        event.event,
        b"message_stop"
            | b"response.completed"
            | b"response.incomplete"
            | b"response.failed"
            | b"message-end"
    ) || event.data == b"[DONE]"
}

impl UsageMeter {
    /// A meter with the default caps (1 MiB per event, 8 MiB per JSON body).
    pub fn new(format: UsageFormat, kind: BodyKind) -> Self {
        UsageMeter::with_caps(format, kind, DEFAULT_EVENT_CAP, DEFAULT_JSON_CAP)
    }

    /// A meter with explicit caps: `event_cap` bounds one SSE event or one
    /// streamed array element, `json_cap` a whole JSON body.
    pub fn with_caps(
        format: UsageFormat,
        kind: BodyKind,
        event_cap: usize,
        json_cap: usize,
    ) -> Self {
        let input = match kind {
            BodyKind::Json => Input::Json {
                buf: Vec::new(),
                cap: json_cap,
                overflowed: false,
            },
            BodyKind::Sse => Input::Sse(SseParser::new(event_cap)),
            BodyKind::JsonArrayStream => Input::Array(ElementScanner::new(event_cap)),
        };
        UsageMeter {
            format,
            input,
            tally: Tally::default(),
        }
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let format = self.format;
        let tally = &mut self.tally;
        match &mut self.input {
            Input::Json {
                buf,
                cap,
                overflowed,
            } => {
                if *overflowed {
                    return;
                }
                if buf.len().saturating_add(chunk.len()) > *cap {
                    *overflowed = true;
                    *buf = Vec::new();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            Input::Sse(parser) => parser.feed(chunk, |event| meter_event(format, &event, tally)),
            Input::Array(scanner) => {
                scanner.feed(chunk, |element| meter_document(format, element, tally))
            }
        }
    }

    /// Ends the body and returns the usage, or `None` when nothing usable
    /// was reported (the caller then charges the reservation).
    pub fn finish(&mut self) -> Option<Usage> {
        let format = self.format;
        let tally = &mut self.tally;
        match &mut self.input {
            Input::Json { buf, .. } => {
                let body = std::mem::take(buf);
                meter_document(format, &body, tally);
            }
            Input::Sse(parser) => parser.finish(|event| meter_event(format, &event, tally)),
            Input::Array(_) => {}
        }
        self.tally.usage()
    }

    /// What has been metered so far (for a stream cut short). Always `None`
    /// for [`BodyKind::Json`] before [`finish`](Self::finish). A running
    /// count inside a stream is not what the provider bills: see
    /// [`final_usage`](Self::final_usage).
    pub fn seen(&self) -> Option<Usage> {
        self.tally.usage()
    }

    /// The usage of a body cut short, when it is final: the stream's
    /// terminal event has passed, so the provider reports nothing more
    /// (docs/budgets.md#settlement). `None` otherwise, and always for JSON
    /// bodies and Google's streams, whose counts are final only at the end.
    pub fn final_usage(&self) -> Option<Usage> {
        self.tally.terminal.then(|| self.tally.usage()).flatten()
    }

    /// Bytes held in memory right now; never above the applicable cap.
    pub fn buffered_len(&self) -> usize {
        match &self.input {
            Input::Json { buf, .. } => buf.len(),
            Input::Sse(parser) => parser.buffered_len(),
            Input::Array(scanner) => scanner.element.len(),
        }
    }

    /// Events, elements or bodies skipped because they exceeded a cap (a
    /// counter for metrics; the payload itself is never logged).
    pub fn dropped_oversize(&self) -> u64 {
        match &self.input {
            Input::Json { overflowed, .. } => u64::from(*overflowed),
            Input::Sse(parser) => parser.dropped_oversize(),
            Input::Array(scanner) => scanner.dropped_oversize,
        }
    }
}

/// Meters one SSE event, noting a terminal one.
fn meter_event(format: UsageFormat, event: &super::sse::SseEvent<'_>, tally: &mut Tally) {
    meter_document(format, event.data, tally);
    if is_terminal(event) {
        tally.terminal = true;
    }
}

/// Reads one JSON document (a body, an SSE event's data, an array
/// element) and merges any usage it reports. Anything else is ignored, and
/// so is a document that is not valid JSON as a whole.
///
/// The document is not built into a tree: a typed visitor walks it, reads
/// only the keys on the way to the format's usage objects (and a top-level
/// `type`), and skips everything else without allocating. It decides as a
/// parse into `serde_json::Value` would: a repeated key's last value counts.
fn meter_document(format: UsageFormat, bytes: &[u8], tally: &mut Tally) {
    if !may_report_usage(bytes) {
        return;
    }
    // Reports are staged and kept only if the whole document parses.
    let mut staged = *tally;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let body = Body {
        format,
        tally: &mut staged,
    };
    if body.deserialize(&mut de).and_then(|()| de.end()).is_ok() {
        *tally = staged;
    }
}

/// A cheap filter before a parse: every format names its usage object
/// `usage…` or `billed_units`, so a document without either word cannot
/// report usage (stream deltas, mostly), and neither can one where each is
/// a key set to `null` (OpenAI's stream chunks carry `"usage":null`). Any
/// other mention, even inside a string, says "maybe": then the parse decides.
pub(crate) fn may_report_usage(bytes: &[u8]) -> bool {
    // Built once: building a searcher costs more than searching an event.
    static WORDS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 2]> =
        std::sync::LazyLock::new(|| {
            [
                memchr::memmem::Finder::new(b"usage"),
                memchr::memmem::Finder::new(b"billed_units"),
            ]
        });
    WORDS.iter().any(|word| {
        word.find_iter(bytes).any(|at| {
            let after = &bytes[at + word.needle().len()..];
            !(after.starts_with(b"\":null") || after.starts_with(b"\": null"))
        })
    })
}

/// Where a format's usage objects sit in a document.
#[derive(Debug)]
struct Layout {
    /// Key paths from the document's root to each usage object, indexes
    /// into [`Found::slots`]. No path is a prefix of another.
    paths: &'static [&'static [&'static str]],
    /// The top-level `type` value that changes which path counts.
    event_type: Option<&'static str>,
    /// The count fields of a usage object, indexes into [`Slot::Object`];
    /// `a.b` is field `b` of the object at `a` (one level down).
    fields: &'static [&'static str],
}

/// The most paths and count fields a layout has.
const MAX_PATHS: usize = 3;
const MAX_FIELDS: usize = 10;

impl UsageFormat {
    fn layout(self) -> &'static Layout {
        match self {
            UsageFormat::OpenAi => &Layout {
                paths: &[&["usage"], &["response", "usage"]],
                event_type: None,
                fields: &[
                    "prompt_tokens",
                    "input_tokens",
                    "completion_tokens",
                    "output_tokens",
                    "prompt_tokens_details.cached_tokens",
                    "input_tokens_details.cached_tokens",
                    "prompt_tokens_details.audio_tokens",
                    "completion_tokens_details.reasoning_tokens",
                    "output_tokens_details.reasoning_tokens",
                    "completion_tokens_details.audio_tokens",
                ],
            },
            UsageFormat::Anthropic => &Layout {
                paths: &[&["usage"], &["message", "usage"]],
                event_type: Some("message_start"),
                fields: &[
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                    "output_tokens",
                    "cache_creation.ephemeral_5m_input_tokens",
                    "cache_creation.ephemeral_1h_input_tokens",
                ],
            },
            UsageFormat::Google => &Layout {
                paths: &[&["usageMetadata"]],
                event_type: None,
                fields: &[
                    "promptTokenCount",
                    "toolUsePromptTokenCount",
                    "candidatesTokenCount",
                    "thoughtsTokenCount",
                    "cachedContentTokenCount",
                ],
            },
            UsageFormat::Cohere => &Layout {
                paths: &[
                    &["usage", "billed_units"],
                    &["meta", "billed_units"],
                    &["delta", "usage", "billed_units"],
                ],
                event_type: Some("message-end"),
                fields: &["input_tokens", "output_tokens"],
            },
        }
    }
}

/// What one document holds at its layout's paths.
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    slots: [Slot; MAX_PATHS],
    /// Whether the top-level `type` is the layout's `event_type`.
    event_type: bool,
}

/// The value at a usage path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Slot {
    #[default]
    Absent,
    Null,
    /// An object, with the layout's count fields read from it.
    Object([Count; MAX_FIELDS]),
    /// Any other value (a string, a number, an array).
    Other,
}

impl Slot {
    /// Present and not null.
    fn is_given(self) -> bool {
        !matches!(self, Slot::Absent | Slot::Null)
    }
}

/// One count field as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Count {
    /// Absent or null.
    #[default]
    Absent,
    /// A number, clamped into `0..=TOKEN_CAP` (fractions round up).
    Tokens(u64),
    /// Anything else: the report is unusable.
    NotANumber,
}

/// The usage one document reports, if any.
fn report(format: UsageFormat, found: &Found) -> Option<Tally> {
    let [first, second, third] = found.slots;
    match format {
        UsageFormat::OpenAi => {
            // `usage`, else the Responses API's `response.usage`. Totals
            // include the classes: cached and audio input, reasoning and
            // audio output.
            let usage = if first.is_given() { first } else { second };
            counts(
                usage,
                &[&[0], &[1]],
                &[&[2], &[3]],
                [&[&[4], &[5]], &[], &[], &[&[6]], &[&[7], &[8]], &[&[9]]],
            )
        }
        UsageFormat::Anthropic => {
            // `message_start` carries it in `message.usage`. Input is the
            // sum of plain, cache-write and cache-read tokens; cache writes
            // split by lifetime when `cache_creation` says, else 5-minute.
            let usage = if found.event_type { second } else { first };
            let split = matches!(usage, Slot::Object(f)
                if !matches!(f[4], Count::Absent) || !matches!(f[5], Count::Absent));
            let writes: &[&[usize]] = if split { &[&[4]] } else { &[&[1]] };
            counts(
                usage,
                &[&[0, 1, 2]],
                &[&[3]],
                [&[&[2]], writes, &[&[5]], &[], &[], &[]],
            )
        }
        UsageFormat::Google => counts(
            first,
            &[&[0, 1]],
            &[&[2, 3]],
            [&[&[4]], &[], &[], &[], &[&[3]], &[]],
        ),
        UsageFormat::Cohere => {
            // v2 `message-end`: `delta.usage.billed_units`; v2 body:
            // `usage.billed_units`; v1: `meta.billed_units`.
            let billed = if found.event_type {
                third
            } else if first.is_given() {
                first
            } else {
                second
            };
            counts(billed, &[&[0]], &[&[1]], [&[]; CLASSES])
        }
    }
}

/// Reads the counts of a usage object: input, output and each token class.
/// Each is a list of alternatives; an alternative is a primary field plus
/// extras that add to it (indexes into the layout's fields); the first
/// alternative with any field present wins. `None` when the slot is not an
/// object, reports no total, or reports a non-number.
fn counts(
    usage: Slot,
    input: &[&[usize]],
    output: &[&[usize]],
    classes: [&[&[usize]]; CLASSES],
) -> Option<Tally> {
    let Slot::Object(fields) = usage else {
        return None;
    };
    // The outer `None`: a field is not a number.
    let side = |alternatives: &[&[usize]]| -> Option<Option<u64>> {
        for alternative in alternatives {
            let mut total: Option<u64> = None;
            for &i in *alternative {
                match fields.get(i).copied().unwrap_or_default() {
                    Count::Absent => {}
                    Count::Tokens(n) => {
                        total = Some(total.unwrap_or(0).saturating_add(n).min(TOKEN_CAP));
                    }
                    Count::NotANumber => return None,
                }
            }
            if total.is_some() {
                return Some(total);
            }
        }
        Some(None)
    };
    let mut tally = Tally {
        tokens_in: side(input)?,
        tokens_out: side(output)?,
        ..Tally::default()
    };
    for (slot, alternatives) in tally.classes.iter_mut().zip(classes) {
        *slot = side(alternatives)?;
    }
    (tally.tokens_in.is_some() || tally.tokens_out.is_some()).then_some(tally)
}

/// A count from a float: `0..=TOKEN_CAP`, fractions rounded up.
fn clamp_float(f: f64) -> u64 {
    if f.is_nan() || f <= 0.0 {
        0
    } else if f >= TOKEN_CAP as f64 {
        TOKEN_CAP
    } else {
        f.ceil() as u64
    }
}

// ----------------------------------------------------------------------
// The visitors. Only the levels on a layout's paths recurse (three at
// most); everything else is skipped as `IgnoredAny`, which serde_json
// walks without recursion.

/// A whole document: an object, or an array of objects (Google's streamed
/// array buffered as one body), whose reports merge in order.
struct Body<'t> {
    format: UsageFormat,
    tally: &'t mut Tally,
}

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        if let Some(report) = Document(self.format).read_map(map)? {
            self.tally.merge(report);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element_seed(Peek::new(Document(self.format)))? {
            if let Peeked::Map(Some(report)) = item {
                self.tally.merge(report);
            }
        }
        Ok(())
    }
}

/// Reads what a map holds, for [`Peek`].
trait ReadMap<'de> {
    type Output;
    fn read_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Output, A::Error>;
}

/// One JSON value, of which only a map is read further (by `R`).
enum Peeked<T> {
    Null,
    /// A number as a token count.
    Number(u64),
    /// A string; whether it equals the one looked for.
    Text(bool),
    Map(T),
    /// `true`, `false` or an array.
    Other,
}

struct Peek<R> {
    map: R,
    /// The string [`Peeked::Text`] compares with.
    text: Option<&'static str>,
}

impl<R> Peek<R> {
    fn new(map: R) -> Self {
        Peek { map, text: None }
    }
}

impl<'de, R: ReadMap<'de>> DeserializeSeed<'de> for Peek<R> {
    type Value = Peeked<R::Output>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, R: ReadMap<'de>> Visitor<'de> for Peek<R> {
    type Value = Peeked<R::Output>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Peeked::Null)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Peeked::Other)
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Peeked::Number(n.min(TOKEN_CAP)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        // Negative counts are 0.
        Ok(Peeked::Number(u64::try_from(n).unwrap_or(0).min(TOKEN_CAP)))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        Ok(Peeked::Number(clamp_float(f)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Peeked::Text(self.text == Some(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Peeked::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.map.read_map(map).map(Peeked::Map)
    }
}

/// A map read only to be skipped.
struct SkipMap;

impl<'de> ReadMap<'de> for SkipMap {
    type Output = ();

    fn read_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// A map key, matched without allocating (`F` maps the name to what the
/// caller needs).
struct Key<F>(F);

impl<'de, T, F: FnOnce(&str) -> T> DeserializeSeed<'de> for Key<F> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, T, F: FnOnce(&str) -> T> Visitor<'de> for Key<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, s: &str) -> Result<T, E> {
        Ok((self.0)(s))
    }
}

/// A document object: its usage report, if any.
struct Document(UsageFormat);

impl<'de> ReadMap<'de> for Document {
    type Output = Option<Tally>;

    fn read_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<Tally>, A::Error> {
        let layout = self.0.layout();
        let mut found = Found::default();
        let all = (1u8 << layout.paths.len()) - 1;
        Level {
            layout,
            depth: 0,
            live: all,
            found: &mut found,
        }
        .read_map(map)?;
        Ok(report(self.0, &found))
    }
}

/// An object at `depth` on the paths in the bit set `live`.
struct Level<'f> {
    layout: &'static Layout,
    depth: usize,
    live: u8,
    found: &'f mut Found,
}

/// What a key at some level is to the layout.
enum KeyRole {
    /// The top-level `type`.
    EventType,
    /// On the paths in the bit set.
    OnPaths(u8),
    /// Nothing: skipped.
    Skip,
}

impl<'de> ReadMap<'de> for Level<'_> {
    type Output = ();

    fn read_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Level {
            layout,
            depth,
            live,
            found,
        } = self;
        let role = |name: &str| {
            if depth == 0 && layout.event_type.is_some() && name == "type" {
                return KeyRole::EventType;
            }
            let mut on = 0u8;
            for (i, path) in layout.paths.iter().enumerate() {
                if live & (1 << i) != 0 && path.get(depth) == Some(&name) {
                    on |= 1 << i;
                }
            }
            if on == 0 {
                KeyRole::Skip
            } else {
                KeyRole::OnPaths(on)
            }
        };
        while let Some(role) = map.next_key_seed(Key(role))? {
            match role {
                KeyRole::Skip => {
                    map.next_value::<IgnoredAny>()?;
                }
                KeyRole::EventType => {
                    let value = map.next_value_seed(Peek {
                        map: SkipMap,
                        text: layout.event_type,
                    })?;
                    found.event_type = matches!(value, Peeked::Text(true));
                }
                KeyRole::OnPaths(on) => {
                    // A repeated key replaces what the earlier one held.
                    for (i, slot) in found.slots.iter_mut().enumerate() {
                        if on & (1 << i) != 0 {
                            *slot = Slot::Absent;
                        }
                    }
                    let ends_here =
                        |i: usize| layout.paths.get(i).is_some_and(|p| p.len() == depth + 1);
                    if (0..MAX_PATHS).any(|i| on & (1 << i) != 0 && ends_here(i)) {
                        let slot =
                            match map.next_value_seed(Peek::new(CountFields(layout.fields)))? {
                                Peeked::Null => Slot::Null,
                                Peeked::Map(counts) => Slot::Object(counts),
                                _ => Slot::Other,
                            };
                        for (i, s) in found.slots.iter_mut().enumerate() {
                            if on & (1 << i) != 0 && ends_here(i) {
                                *s = slot;
                            }
                        }
                    } else {
                        // Not an object: the paths below are absent.
                        map.next_value_seed(Peek::new(Level {
                            layout,
                            depth: depth + 1,
                            live: on,
                            found: &mut *found,
                        }))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A usage object: the layout's count fields, `a.b` ones read from the
/// object at `a`.
struct CountFields(&'static [&'static str]);

/// What a key of a usage object is to its layout.
enum FieldRole {
    /// A count field, by index.
    Count(usize),
    /// An object holding `a.b` fields: its name `a`.
    Details(&'static str),
    Skip,
}

impl<'de> ReadMap<'de> for CountFields {
    type Output = [Count; MAX_FIELDS];

    fn read_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Output, A::Error> {
        let fields = self.0;
        let mut counts = [Count::Absent; MAX_FIELDS];
        // Compared byte-wise, with no `split_once`: this runs for every key
        // of every usage object a stream reports.
        let role = |name: &str| {
            for (i, f) in fields.iter().enumerate() {
                if *f == name {
                    return FieldRole::Count(i);
                }
                if let Some(outer) = outer_of(f, name) {
                    return FieldRole::Details(outer);
                }
            }
            FieldRole::Skip
        };
        while let Some(role) = map.next_key_seed(Key(role))? {
            match role {
                FieldRole::Count(i) => {
                    // A repeated field's last value counts.
                    counts[i] = match map.next_value_seed(Peek::new(SkipMap))? {
                        Peeked::Null => Count::Absent,
                        Peeked::Number(n) => Count::Tokens(n),
                        _ => Count::NotANumber,
                    };
                }
                FieldRole::Details(outer) => {
                    let details = Details {
                        fields,
                        outer,
                        counts: &mut counts,
                    };
                    map.next_value_seed(Peek::new(details))?;
                }
                FieldRole::Skip => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(counts)
    }
}

/// `field`'s outer object name when `field` is `name.something`.
fn outer_of(field: &'static str, name: &str) -> Option<&'static str> {
    let bytes = field.as_bytes();
    (bytes.len() > name.len() && bytes[name.len()] == b'.' && bytes.starts_with(name.as_bytes()))
        .then(|| &field[..name.len()])
}

/// The object `outer` inside a usage object: its `outer.b` count fields.
/// A value that is not an object (or `null`) holds none of them.
struct Details<'c> {
    fields: &'static [&'static str],
    outer: &'static str,
    counts: &'c mut [Count; MAX_FIELDS],
}

impl<'de> ReadMap<'de> for Details<'_> {
    type Output = ();

    fn read_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (fields, outer) = (self.fields, self.outer);
        let index = |name: &str| {
            fields.iter().position(|f| {
                outer_of(f, outer).is_some() && f.get(outer.len() + 1..) == Some(name)
            })
        };
        while let Some(i) = map.next_key_seed(Key(index))? {
            let Some(count) = i.and_then(|i| self.counts.get_mut(i)) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            *count = match map.next_value_seed(Peek::new(SkipMap))? {
                Peeked::Null => Count::Absent,
                Peeked::Number(n) => Count::Tokens(n),
                _ => Count::NotANumber,
            };
        }
        Ok(())
    }
}

/// Splits a streamed JSON array (or a sequence of top-level objects) into
/// its object elements without buffering more than one element, and that
/// one only up to the cap. Never recursive.
#[derive(Debug)]
struct ElementScanner {
    cap: usize,
    depth: u64,
    in_string: bool,
    escaped: bool,
    /// The depth at which the element being captured opened.
    element_depth: Option<u64>,
    element: Vec<u8>,
    oversize: bool,
    dropped_oversize: u64,
}

impl ElementScanner {
    fn new(cap: usize) -> Self {
        ElementScanner {
            cap,
            depth: 0,
            in_string: false,
            escaped: false,
            element_depth: None,
            element: Vec::new(),
            oversize: false,
            dropped_oversize: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8], mut on_element: impl FnMut(&[u8])) {
        for &b in chunk {
            let capturing = self.element_depth.is_some();
            if capturing && !self.oversize {
                if self.element.len() >= self.cap {
                    self.oversize = true;
                    self.dropped_oversize = self.dropped_oversize.saturating_add(1);
                    self.element = Vec::new();
                } else {
                    self.element.push(b);
                }
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    if b == b'{' && !capturing && self.depth <= 1 {
                        self.element_depth = Some(self.depth);
                        self.element.clear();
                        self.element.push(b);
                    }
                    self.depth = self.depth.saturating_add(1);
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.element_depth == Some(self.depth) {
                        if !self.oversize {
                            on_element(&self.element);
                        }
                        self.element_depth = None;
                        self.element.clear();
                        self.oversize = false;
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_clamped() {
        let got = [
            r#"-5"#,
            "1.2",
            "1e300",
            "18446744073709551615",
            r#""7""#,
            "{}",
        ]
        .map(|v| {
            let body = format!(r#"{{"usage":{{"prompt_tokens":{v},"completion_tokens":1}}}}"#);
            let mut tally = Tally::default();
            meter_document(UsageFormat::OpenAi, body.as_bytes(), &mut tally);
            tally.usage().map(|u| u.tokens_in)
        });
        assert_eq!(
            got,
            [
                Some(0),
                Some(2),
                Some(TOKEN_CAP),
                Some(TOKEN_CAP),
                None,
                None
            ]
        );
    }

    #[test]
    fn layouts_fit_their_bounds_and_no_path_is_a_prefix_of_another() {
        for format in [
            UsageFormat::OpenAi,
            UsageFormat::Anthropic,
            UsageFormat::Google,
            UsageFormat::Cohere,
        ] {
            let layout = format.layout();
            assert!(layout.paths.len() <= MAX_PATHS && layout.fields.len() <= MAX_FIELDS);
            for a in layout.paths {
                for b in layout.paths {
                    assert!(a == b || !b.starts_with(a), "{format:?}: {a:?} / {b:?}");
                }
            }
        }
    }

    /// The filter never skips a document whose parse would report usage.
    fn parse_reports(format: UsageFormat, doc: &str) -> bool {
        let mut staged = Tally::default();
        let mut de = serde_json::Deserializer::from_slice(doc.as_bytes());
        let body = Body {
            format,
            tally: &mut staged,
        };
        body.deserialize(&mut de).and_then(|()| de.end()).is_ok() && staged.usage().is_some()
    }

    #[test]
    fn usage_filter_skips_only_documents_that_cannot_report() {
        let skipped = [
            r#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
            r#"{"choices":[],"usage": null}"#,
            r#"{"type":"content_block_delta","delta":{"text":"x"}}"#,
        ];
        let parsed = [
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"usage":null,"response":{"usage":{"input_tokens":1,"output_tokens":2}}}"#,
            r#"{"usageMetadata":{"promptTokenCount":3}}"#,
            r#"{"meta":{"billed_units":{"input_tokens":1}}}"#,
            r#"{"text":"usage"}"#,
        ];
        for doc in skipped {
            assert!(!may_report_usage(doc.as_bytes()), "{doc}");
        }
        for doc in parsed {
            assert!(may_report_usage(doc.as_bytes()), "{doc}");
        }
    }

    proptest::proptest! {
        #[test]
        fn usage_filter_agrees_with_the_parse(
            usage in proptest::option::of((0u64..1000, 0u64..1000)),
            content in "[a-z\\\" ]{0,12}",
            spaced in proptest::bool::ANY,
        ) {
            let usage = match usage {
                Some((i, o)) => format!(r#"{{"prompt_tokens":{i},"completion_tokens":{o},"input_tokens":{i},"output_tokens":{o}}}"#),
                None => "null".to_owned(),
            };
            let colon = if spaced { ": " } else { ":" };
            let content = serde_json::to_string(&content).unwrap();
            for doc in [
                format!(r#"{{"choices":[{{"delta":{{"content":{content}}}}}],"usage"{colon}{usage}}}"#),
                format!(r#"{{"type":"message_delta","usage"{colon}{usage}}}"#),
                format!(r#"{{"message":{{"usage"{colon}{usage}}}}}"#),
            ] {
                for format in [UsageFormat::OpenAi, UsageFormat::Anthropic] {
                    if parse_reports(format, &doc) {
                        proptest::prop_assert!(may_report_usage(doc.as_bytes()), "{}", doc);
                    }
                }
            }
        }
    }

    #[test]
    fn scanner_splits_array_elements_with_tricky_strings() {
        let mut s = ElementScanner::new(1024);
        let mut got = Vec::new();
        s.feed(br#"[{"a":"}]\"{"}, {"b":[1,{"c":2}]}]"#, |e| {
            got.push(String::from_utf8(e.to_vec()).unwrap())
        });
        assert_eq!(got, vec![r#"{"a":"}]\"{"}"#, r#"{"b":[1,{"c":2}]}"#]);
    }
}
