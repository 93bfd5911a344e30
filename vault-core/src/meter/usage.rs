//! Token usage read from provider responses as their bytes pass.
//!
//! [`UsageMeter`] is fed the response body chunk by chunk and reports the
//! provider's own count of input and output tokens (SPEC §4):
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
//! Upstream numbers are not trusted (THREATS H3): a negative count is 0, a
//! fraction is rounded up, anything above [`TOKEN_CAP`] saturates at it, and
//! a report in which a count is not a number at all (a string, an object) is
//! ignored whole, so that the caller charges the reservation instead.

use serde_json::Value;

use super::sse::{DEFAULT_EVENT_CAP, SseParser};
use crate::provider::UsageFormat;

/// The most tokens one count may claim: `u32::MAX * 16` (about 68.7
/// billion). Larger claims saturate here, so cost arithmetic never nears
/// overflow.
pub const TOKEN_CAP: u64 = u32::MAX as u64 * 16;

/// The default cap on a buffered JSON body: 8 MiB.
pub const DEFAULT_JSON_CAP: usize = 8 << 20;

/// Tokens a call used, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens, cache reads and writes included.
    pub tokens_in: u64,
    /// Output (completion) tokens, reasoning included.
    pub tokens_out: u64,
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

/// What has been metered so far; `None` fields were never reported.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    tokens_in: Option<u64>,
    tokens_out: Option<u64>,
}

impl Tally {
    fn merge(&mut self, report: Tally) {
        if report.tokens_in.is_some() {
            self.tokens_in = report.tokens_in;
        }
        if report.tokens_out.is_some() {
            self.tokens_out = report.tokens_out;
        }
    }

    fn usage(self) -> Option<Usage> {
        if self.tokens_in.is_none() && self.tokens_out.is_none() {
            return None;
        }
        Some(Usage {
            tokens_in: self.tokens_in.unwrap_or(0),
            tokens_out: self.tokens_out.unwrap_or(0),
        })
    }
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
            Input::Sse(parser) => {
                parser.feed(chunk, |event| meter_document(format, event.data, tally))
            }
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
            Input::Sse(parser) => parser.finish(|event| meter_document(format, event.data, tally)),
            Input::Array(_) => {}
        }
        self.tally.usage()
    }

    /// What has been metered so far (for a stream cut short). Always `None`
    /// for [`BodyKind::Json`] before [`finish`](Self::finish).
    pub fn seen(&self) -> Option<Usage> {
        self.tally.usage()
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

/// Parses one JSON document (a body, an SSE event's data, an array
/// element) and merges any usage it reports. Anything else is ignored.
fn meter_document(format: UsageFormat, bytes: &[u8], tally: &mut Tally) {
    // A cheap filter: every format names its usage object `usage…`, so a
    // document without the word cannot report it (stream deltas mostly).
    if !contains(bytes, b"usage") && !contains(bytes, b"billed_units") {
        return;
    }
    let Ok(doc) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    match &doc {
        // Google's streamed array, buffered as one body: the last counts.
        Value::Array(items) => {
            for item in items {
                if let Some(report) = report(format, item) {
                    tally.merge(report);
                }
            }
        }
        _ => {
            if let Some(report) = report(format, &doc) {
                tally.merge(report);
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The usage one document reports, if any.
fn report(format: UsageFormat, doc: &Value) -> Option<Tally> {
    match format {
        UsageFormat::OpenAi => {
            let usage = non_null(doc.get("usage"))
                .or_else(|| non_null(doc.get("response").and_then(|r| r.get("usage"))))?;
            counts(
                usage,
                &[&["prompt_tokens"], &["input_tokens"]],
                &[&["completion_tokens"], &["output_tokens"]],
            )
        }
        UsageFormat::Anthropic => {
            let usage = if doc.get("type").and_then(Value::as_str) == Some("message_start") {
                doc.get("message")?.get("usage")?
            } else {
                doc.get("usage")?
            };
            counts(
                usage,
                &[&[
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ]],
                &[&["output_tokens"]],
            )
        }
        UsageFormat::Google => counts(
            non_null(doc.get("usageMetadata"))?,
            &[&["promptTokenCount", "toolUsePromptTokenCount"]],
            &[&["candidatesTokenCount", "thoughtsTokenCount"]],
        ),
        UsageFormat::Cohere => {
            let billed = if doc.get("type").and_then(Value::as_str) == Some("message-end") {
                doc.get("delta")?.get("usage")?.get("billed_units")?
            } else {
                non_null(doc.get("usage").and_then(|u| u.get("billed_units")))
                    .or_else(|| doc.get("meta").and_then(|m| m.get("billed_units")))?
            };
            counts(billed, &[&["input_tokens"]], &[&["output_tokens"]])
        }
    }
}

fn non_null(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

/// Reads the input and output counts of a usage object. Each side is a
/// list of alternatives; an alternative is a primary field plus extras that
/// add to it; the first alternative whose primary (or any extra) is present
/// wins. `None` when the object reports nothing or reports a non-number.
fn counts(usage: &Value, input: &[&[&str]], output: &[&[&str]]) -> Option<Tally> {
    let usage = usage.as_object()?;
    let side = |alternatives: &[&[&str]]| -> Result<Option<u64>, ()> {
        for fields in alternatives {
            let mut total: Option<u64> = None;
            for field in *fields {
                if let Some(n) = count(usage.get(*field))? {
                    total = Some(total.unwrap_or(0).saturating_add(n).min(TOKEN_CAP));
                }
            }
            if total.is_some() {
                return Ok(total);
            }
        }
        Ok(None)
    };
    let tally = Tally {
        tokens_in: side(input).ok()?,
        tokens_out: side(output).ok()?,
    };
    (tally.tokens_in.is_some() || tally.tokens_out.is_some()).then_some(tally)
}

/// One token count: absent or null is `Ok(None)`; a number is clamped into
/// `0..=TOKEN_CAP` (fractions round up); anything else is `Err`.
fn count(v: Option<&Value>) -> Result<Option<u64>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u.min(TOKEN_CAP)))
            } else if n.is_i64() {
                Ok(Some(0)) // negative
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_nan() || f <= 0.0 {
                    Ok(Some(0))
                } else if f >= TOKEN_CAP as f64 {
                    Ok(Some(TOKEN_CAP))
                } else {
                    Ok(Some(f.ceil() as u64))
                }
            }
        }
        Some(_) => Err(()),
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
        let v: Value =
            serde_json::from_str(r#"[-5, 1.2, 1e300, 18446744073709551615, "7", {}]"#).unwrap();
        let got: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| count(Some(x)))
            .collect();
        assert_eq!(
            got,
            vec![
                Ok(Some(0)),
                Ok(Some(2)),
                Ok(Some(TOKEN_CAP)),
                Ok(Some(TOKEN_CAP)),
                Err(()),
                Err(())
            ]
        );
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
