//! An incremental Server-Sent Events parser with bounded memory.
//!
//! Fed arbitrary byte chunks (split anywhere, even inside a multibyte
//! character or inside `\r\n\r\n`), it dispatches events as the WHATWG
//! `EventSource` algorithm would: `\r`, `\n` and `\r\n` end lines; several
//! `data:` lines are joined with `\n`; `:` starts a comment; `event:`, `id:`
//! and `retry:` are understood; a leading UTF-8 BOM is skipped. Unlike a
//! browser it also dispatches a final event that lacks its trailing blank
//! line, when [`SseParser::finish`] is called.
//!
//! Memory is bounded by a per-event cap: an event whose buffered bytes
//! (the current line, its data so far and its event name) would exceed the
//! cap is dropped whole, counted in [`SseParser::dropped_oversize`], and its
//! remaining bytes are skipped without being buffered.

/// The default per-event cap: 1 MiB.
pub const DEFAULT_EVENT_CAP: usize = 1 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event, borrowed from the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` name; empty means the default, `message`.
    pub event: &'a [u8],
    /// The `data:` lines joined with `\n`.
    pub data: &'a [u8],
    /// The last event id seen so far in the stream (ids persist across
    /// events, as in `EventSource`).
    pub id: Option<&'a [u8]>,
    /// A `retry:` value given inside this event.
    pub retry: Option<u64>,
}

/// The incremental parser. See the module docs.
#[derive(Debug)]
pub struct SseParser {
    cap: usize,
    line: Vec<u8>,
    /// Bytes of the current line have been seen (it is not blank), even if
    /// they were skipped because the event is oversize.
    line_started: bool,
    /// The previous chunk ended with `\r`: a leading `\n` completes it.
    after_cr: bool,
    at_start: bool,
    data: Vec<u8>,
    has_data: bool,
    event: Vec<u8>,
    last_id: Option<Vec<u8>>,
    retry: Option<u64>,
    /// The current event went over the cap and is being skipped.
    oversize: bool,
    dropped_oversize: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new(DEFAULT_EVENT_CAP)
    }
}

impl SseParser {
    /// A parser that drops events larger than `cap` bytes.
    pub fn new(cap: usize) -> Self {
        SseParser {
            cap,
            line: Vec::new(),
            line_started: false,
            after_cr: false,
            at_start: true,
            data: Vec::new(),
            has_data: false,
            event: Vec::new(),
            last_id: None,
            retry: None,
            oversize: false,
            dropped_oversize: 0,
        }
    }

    /// Feeds a chunk, calling `on_event` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        self.feed_with_boundaries(chunk, |event, _| {
            if let Some(event) = event {
                on_event(event);
            }
        });
    }

    /// Ends the stream: a last line or event without its terminator is
    /// processed and dispatched. The parser can then be reused.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) {
        self.finish_with_boundaries(|event| {
            if let Some(event) = event {
                on_event(event);
            }
        });
    }

    /// Events dropped because they exceeded the cap.
    pub fn dropped_oversize(&self) -> u64 {
        self.dropped_oversize
    }

    /// Bytes currently buffered; never more than the cap.
    pub fn buffered_len(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }

    /// The per-event cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Like [`feed`](Self::feed), but calls `on_boundary` at every blank
    /// line (the end of an event, dispatched or not) with the offset in
    /// `chunk` just past that line's terminator. A `\r` terminator at the
    /// very end of a chunk may be followed by a `\n` at the start of the
    /// next one, which the parser then skips.
    pub(crate) fn feed_with_boundaries(
        &mut self,
        chunk: &[u8],
        mut on_boundary: impl FnMut(Option<SseEvent<'_>>, usize),
    ) {
        let mut pos = 0;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                pos = 1;
            }
        }
        while pos < chunk.len() {
            let rest = &chunk[pos..];
            match memchr::memchr2(b'\n', b'\r', rest) {
                None => {
                    self.push_line_bytes(rest);
                    pos = chunk.len();
                }
                Some(i) => {
                    self.push_line_bytes(&rest[..i]);
                    pos += i + 1;
                    if rest[i] == b'\r' {
                        match chunk.get(pos) {
                            Some(b'\n') => pos += 1,
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                    self.end_line(|event| on_boundary(event, pos));
                }
            }
        }
    }

    /// [`finish`](Self::finish) reporting whether the final event was
    /// dispatched, for [`HideUsageChunk`](super::HideUsageChunk).
    pub(crate) fn finish_with_boundaries(&mut self, mut on_end: impl FnMut(Option<SseEvent<'_>>)) {
        if self.line_started {
            self.end_line(&mut on_end);
        }
        // A blank line that never came.
        self.end_line(&mut on_end);
        self.after_cr = false;
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.line_started = true;
        if self.oversize {
            return;
        }
        if self.buffered_len().saturating_add(bytes.len()) > self.cap {
            self.enter_oversize();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn enter_oversize(&mut self) {
        self.oversize = true;
        self.dropped_oversize = self.dropped_oversize.saturating_add(1);
        // Free the memory, not just the length: the cap bounds capacity too.
        self.line = Vec::new();
        self.data = Vec::new();
        self.event = Vec::new();
        self.has_data = false;
    }

    fn end_line(&mut self, mut on_boundary: impl FnMut(Option<SseEvent<'_>>)) {
        let mut blank = !self.line_started;
        self.line_started = false;
        if std::mem::take(&mut self.at_start) && self.line.starts_with(BOM) {
            self.line.drain(..BOM.len());
            blank = self.line.is_empty() && !self.oversize;
        }
        if blank {
            self.dispatch(&mut on_boundary);
            return;
        }
        if self.oversize {
            return;
        }
        let line = std::mem::take(&mut self.line);
        self.process_field(&line);
        self.line = line;
        self.line.clear();
        if self.buffered_len() > self.cap {
            self.enter_oversize();
        }
    }

    fn process_field(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return; // a comment
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => self.last_id = Some(value.to_vec()),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_boundary: &mut impl FnMut(Option<SseEvent<'_>>)) {
        if self.has_data && !self.oversize {
            on_boundary(Some(SseEvent {
                event: &self.event,
                data: &self.data,
                id: self.last_id.as_deref(),
                retry: self.retry,
            }));
        } else {
            on_boundary(None);
        }
        self.data.clear();
        self.event.clear();
        self.has_data = false;
        self.retry = None;
        self.oversize = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]], cap: usize) -> (Vec<(String, String)>, SseParser) {
        let mut p = SseParser::new(cap);
        let mut out = Vec::new();
        let mut push = |e: SseEvent<'_>| {
            out.push((
                String::from_utf8_lossy(e.event).into_owned(),
                String::from_utf8_lossy(e.data).into_owned(),
            ))
        };
        for c in chunks {
            p.feed(c, &mut push);
        }
        p.finish(&mut push);
        (out, p)
    }

    #[test]
    fn fields_comments_and_joined_data() {
        let (ev, _) = parse_all(
            &[b": hi\nevent: ping\nid: 7\nretry: 10\ndata: a\ndata:b\ndata\n\ndata: x\n\n"],
            64,
        );
        assert_eq!(
            ev,
            vec![("ping".into(), "a\nb\n".into()), ("".into(), "x".into())]
        );
    }

    #[test]
    fn line_endings_and_bom() {
        for text in [
            &b"\xEF\xBB\xBFdata: 1\r\rdata: 2\r\r"[..],
            b"data: 1\n\ndata: 2\n\n",
            b"data: 1\r\n\r\ndata: 2\r\n\r\n",
        ] {
            let (ev, _) = parse_all(&[text], 64);
            let data: Vec<_> = ev.into_iter().map(|e| e.1).collect();
            assert_eq!(data, ["1", "2"], "{text:?}");
        }
    }

    #[test]
    fn boundary_crlf_split_between_chunks() {
        let (ev, _) = parse_all(&[b"data: 1\r", b"\n\r", b"\ndata: 2\r\n", b"\r\n"], 64);
        assert_eq!(ev.len(), 2);
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_unterminated_is_flushed() {
        let (ev, _) = parse_all(&[b"event: x\n\ndata: last"], 64);
        assert_eq!(ev, vec![("".into(), "last".into())]);
    }

    #[test]
    fn boundary_oversize_event_is_dropped_and_next_survives() {
        let big = vec![b'a'; 500];
        let mut p = SseParser::new(100);
        let mut got = Vec::new();
        p.feed(b"data: ", |_| {});
        for piece in big.chunks(7) {
            p.feed(piece, |e| got.push(e.data.to_vec()));
            assert!(p.buffered_len() <= 100);
        }
        p.feed(b"\ndata: more\n\ndata: ok\n\n", |e| {
            got.push(e.data.to_vec())
        });
        assert_eq!(got, vec![b"ok".to_vec()]);
        assert_eq!(p.dropped_oversize(), 1);
    }

    #[test]
    fn boundary_many_empty_data_lines_stay_under_cap() {
        let mut p = SseParser::new(16);
        p.feed(&b"data\n".repeat(100), |_| {});
        assert!(p.buffered_len() <= 16);
        assert_eq!(p.dropped_oversize(), 1);
    }
}
