//! Removing the usage chunk vaultgate asked for on the client's behalf.
//!
//! When the client of an OpenAI-compatible stream did not set
//! `stream_options.include_usage`, the proxy sets it (to meter the call) and
//! the provider then sends one extra event before `data: [DONE]`:
//! `data: {"id":…,"choices":[],"usage":{…}}`. The client did not ask for it,
//! so [`HideUsageChunk`] removes exactly that event and passes every other
//! byte through unchanged.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::sse::{DEFAULT_EVENT_CAP, SseParser};

/// What [`HideUsageChunk::filter`] forwards for one chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Forward the chunk itself, unchanged.
    Unchanged,
    /// Forward these bytes instead (possibly none).
    Replaced(Vec<u8>),
}

/// Forwards complete SSE events unchanged, dropping only events whose JSON
/// has an empty `choices` array and a non-null `usage`. A partial event is
/// held until it completes, up to the per-event cap; past the cap the held
/// bytes are flushed unchanged and the rest of that event passes through.
#[derive(Debug)]
pub struct HideUsageChunk {
    parser: SseParser,
    /// Raw bytes of the current event not yet forwarded.
    held: Vec<u8>,
    /// Part of the current event was already forwarded (it went over the cap).
    flushed_part: bool,
    /// The last event ended with `\r`: a `\n` next completes its terminator
    /// and shares its fate (`Some(true)`: it was dropped).
    pending_lf_dropped: Option<bool>,
    hidden: u64,
}

impl Default for HideUsageChunk {
    fn default() -> Self {
        HideUsageChunk::new(DEFAULT_EVENT_CAP)
    }
}

impl HideUsageChunk {
    /// A filter holding at most `cap` bytes of one event.
    pub fn new(cap: usize) -> Self {
        HideUsageChunk {
            parser: SseParser::new(cap),
            held: Vec::new(),
            flushed_part: false,
            pending_lf_dropped: None,
            hidden: 0,
        }
    }

    /// Takes the next upstream chunk and returns the bytes to forward now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        match self.filter(chunk) {
            Filtered::Unchanged => chunk.to_vec(),
            Filtered::Replaced(out) => out,
        }
    }

    /// [`push`](Self::push) without a copy in the common case: a chunk of
    /// whole events, none of them hidden, with nothing held before it, is
    /// forwarded as it came ([`Filtered::Unchanged`]).
    pub fn filter(&mut self, chunk: &[u8]) -> Filtered {
        let nothing_held =
            self.pending_lf_dropped.is_none() && self.held.is_empty() && !self.flushed_part;
        let mut start = 0;
        let mut out = Vec::new();
        if let Some(dropped) = self.pending_lf_dropped.take() {
            if chunk.first() == Some(&b'\n') {
                if !dropped {
                    out.push(b'\n');
                }
                start = 1;
            } else if chunk.is_empty() {
                self.pending_lf_dropped = Some(dropped);
            }
        }
        // The parser sees every byte (it skips that `\n` itself), so its
        // offsets are offsets into `chunk`.
        let mut boundaries: Vec<(usize, bool)> = Vec::new();
        self.parser.feed_with_boundaries(chunk, |event, end| {
            let hide = event.is_some_and(|e| is_usage_only(e.data));
            boundaries.push((end, hide));
        });
        if nothing_held
            && boundaries.last().map(|&(end, _)| end) == Some(chunk.len())
            && chunk.last() != Some(&b'\r')
            && boundaries.iter().all(|&(_, hide)| !hide)
        {
            return Filtered::Unchanged;
        }
        out.reserve(chunk.len() + self.held.len());
        for (end, hide) in boundaries {
            self.held.extend_from_slice(&chunk[start..end]);
            start = end;
            if hide && !self.flushed_part {
                self.hidden += 1;
            } else {
                out.extend_from_slice(&self.held);
            }
            // A `\r` ending the chunk may be the first half of `\r\n`.
            if end == chunk.len() && chunk.get(end.wrapping_sub(1)) == Some(&b'\r') {
                self.pending_lf_dropped = Some(hide && !self.flushed_part);
            }
            self.held.clear();
            self.flushed_part = false;
        }
        let rest = &chunk[start..];
        if self.flushed_part || self.held.len() + rest.len() > self.parser.cap() {
            out.extend_from_slice(&self.held);
            out.extend_from_slice(rest);
            self.held = Vec::new();
            self.flushed_part = true;
        } else {
            self.held.extend_from_slice(rest);
        }
        Filtered::Replaced(out)
    }

    /// Ends the stream and returns whatever is still held (a final event
    /// without its blank line is dropped too if it is the usage chunk).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut hide = false;
        self.parser.finish_with_boundaries(|event| {
            hide |= event.is_some_and(|e| is_usage_only(e.data));
        });
        let held = std::mem::take(&mut self.held);
        self.pending_lf_dropped = None;
        if hide && !std::mem::take(&mut self.flushed_part) {
            self.hidden += 1;
            return Vec::new();
        }
        held
    }

    /// How many usage chunks were removed.
    pub fn hidden(&self) -> u64 {
        self.hidden
    }
}

/// An OpenAI stream chunk that carries only usage: `choices` is an empty
/// array and `usage` is not null.
fn is_usage_only(data: &[u8]) -> bool {
    if !super::usage::may_report_usage(data) {
        return false;
    }
    #[derive(Deserialize)]
    struct Probe {
        choices: Option<Vec<IgnoredAny>>,
        usage: Option<IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(data) {
        Ok(Probe {
            choices: Some(choices),
            usage: Some(_),
        }) => choices.is_empty(),
        _ => false,
    }
}
