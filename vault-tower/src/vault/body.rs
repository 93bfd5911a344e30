//! `MeteredBody`: passes response frames through as they arrive, meters
//! usage as bytes pass, and settles the call at end of body *or* on drop
//! (client disconnect), like tower-http's `on_early_drop`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use vault_core::crypto::ProviderSecret;
use vault_core::meter::{Filtered, HideUsageChunk, UsageMeter};
use vault_core::policy::CallOutcome;
use vault_core::record::SettledBy;

use super::sink::PendingCall;
use crate::mock::MockBody;

/// Errors a metered body can yield: the inner body's, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest error body redacted in full; larger ones are cut here.
const REDACT_CAP: usize = 1 << 20;

pin_project_lite::pin_project! {
    /// Where a [`MeteredBody`]'s bytes come from.
    #[project = SourceProj]
    pub(crate) enum Source<B> {
        /// The inner service's body.
        Upstream { #[pin] body: B },
        /// The mock provider's.
        Mock { #[pin] body: MockBody },
        /// A complete body made by vaultgate (refusals).
        Full { #[pin] body: Full<Bytes> },
    }
}

/// What the body does besides passing bytes through.
#[derive(Default)]
pub(crate) struct Metering {
    /// Reads usage from the bytes.
    pub(crate) meter: Option<UsageMeter>,
    /// Drops the usage-only SSE chunk vaultgate asked for.
    pub(crate) hide: Option<HideUsageChunk>,
    /// Whether a cut stream should end with an SSE error event.
    pub(crate) sse: bool,
    /// For non-streamed error bodies: buffer and redact the provider key.
    pub(crate) redact: Option<Arc<ProviderSecret>>,
    /// The call to settle at end or drop.
    pub(crate) pending: Option<PendingCall>,
}

pin_project_lite::pin_project! {
    /// The response body of [`Vault`](crate::Vault): the upstream's bytes,
    /// unchanged and unbuffered (but for the hidden usage chunk and redacted
    /// error bodies), metered as they pass. Settles its call when it ends or
    /// is dropped.
    pub struct MeteredBody<B> {
        #[pin]
        source: Source<B>,
        metering: Metering,
        redact_buf: Vec<u8>,
        ended: bool,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            settle_cut(this.metering);
        }
    }
}

impl<B> MeteredBody<B> {
    /// A complete body made by vaultgate (denials), with nothing to meter.
    pub(crate) fn full(body: Full<Bytes>) -> Self {
        Self::new(Source::Full { body }, Metering::default())
    }

    /// `source`'s bytes, metered and settled by `metering`.
    pub(crate) fn new(source: Source<B>, metering: Metering) -> Self {
        MeteredBody {
            source,
            metering,
            redact_buf: Vec::new(),
            ended: false,
        }
    }
}

/// Settles a call whose body arrived whole (docs/budgets.md#settlement):
/// its usage, else nothing for an error status, else the reservation.
fn settle_complete(m: &mut Metering) {
    let Some(call) = m.pending.take() else {
        return;
    };
    let usage = m.meter.as_mut().and_then(UsageMeter::finish);
    let (outcome, rule) = match usage {
        Some(u) => (CallOutcome::Metered(u), SettledBy::Metered),
        None if call.status() >= 400 => (CallOutcome::ErrorReleased, SettledBy::ErrorReleased),
        None => (CallOutcome::Unmetered, SettledBy::NoUsage),
    };
    call.finish(outcome, rule);
}

/// Settles a call whose body was cut short (client gone, upstream reset,
/// timeout, malformed stream): the provider's final count if it had
/// arrived, else the reservation. A running count from inside a stream is
/// never used: the provider bills what it generated, and stalling or
/// disconnecting must not buy free tokens (docs/budgets.md#settlement).
fn settle_cut(m: &mut Metering) {
    let Some(call) = m.pending.take() else {
        return;
    };
    match m.meter.as_ref().and_then(UsageMeter::final_usage) {
        Some(u) => call.finish(CallOutcome::Metered(u), SettledBy::CutAfterFinalCount),
        None => call.finish(CallOutcome::Unmetered, SettledBy::CutReserved),
    }
}

fn redact(buf: &[u8], secret: &str) -> Bytes {
    if secret.is_empty() {
        return Bytes::copy_from_slice(buf);
    }
    let needle = secret.as_bytes();
    let mut out = Vec::with_capacity(buf.len());
    let mut i = 0;
    while i < buf.len() {
        if buf[i..].starts_with(needle) {
            out.extend_from_slice(b"[REDACTED]");
            i += needle.len();
        } else {
            out.push(buf[i]);
            i += 1;
        }
    }
    Bytes::from(out)
}

/// Ends a complete body: flushes what is held back (redacted error body,
/// hidden-usage remainder) and settles the call from the full metering.
fn finish(m: &mut Metering, redact_buf: &[u8]) -> Bytes {
    let tail = if let Some(secret) = m.redact.take() {
        redact(redact_buf, secret.expose_secret())
    } else if let Some(hide) = m.hide.as_mut() {
        Bytes::from(hide.finish())
    } else {
        Bytes::new()
    };
    settle_complete(m);
    tail
}

impl<B> Source<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll_source(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            SourceProj::Upstream { body } => body
                .poll_frame(cx)
                .map(|r| r.map(|r| r.map_err(Into::into))),
            SourceProj::Mock { body } => body.poll_frame(cx).map_err(|e| match e {}),
            SourceProj::Full { body } => body.poll_frame(cx).map_err(|e| match e {}),
        }
    }
}

impl<B: Body> Source<B> {
    fn is_end(&self) -> bool {
        match self {
            Source::Upstream { body } => body.is_end_stream(),
            Source::Mock { body } => body.is_end_stream(),
            Source::Full { body } => body.is_end_stream(),
        }
    }
}

/// What [`on_data`] makes of a data frame.
enum Step {
    /// Pass these bytes on.
    Emit(Bytes),
    /// Nothing to pass on yet: poll the source again.
    Continue,
    /// The body is over.
    End,
}

/// Meters a data frame and decides what of it goes out: held back while an
/// error body is gathered for redaction, the usage chunk vaultgate asked
/// for hidden, and what was held back joined on when the source has ended
/// (the call then settles).
fn on_data(
    m: &mut Metering,
    redact_buf: &mut Vec<u8>,
    ended: &mut bool,
    frame: Bytes,
    source_ended: bool,
) -> Step {
    if let Some(meter) = m.meter.as_mut() {
        meter.feed(&frame);
    }
    if m.redact.is_some() {
        let room = REDACT_CAP.saturating_sub(redact_buf.len());
        redact_buf.extend_from_slice(&frame[..frame.len().min(room)]);
        if !source_ended {
            return Step::Continue;
        }
    }
    let mut out = match (&m.redact, m.hide.as_mut()) {
        (Some(_), _) => Bytes::new(),
        (None, Some(hide)) => match hide.filter(&frame) {
            Filtered::Unchanged => frame,
            Filtered::Replaced(out) => Bytes::from(out),
        },
        (None, None) => frame,
    };
    if source_ended {
        // Servers stop polling a body whose length is known once it is all
        // sent: finish here, not at `None`.
        *ended = true;
        let tail = finish(m, redact_buf);
        if !tail.is_empty() {
            let mut joined = Vec::with_capacity(out.len() + tail.len());
            joined.extend_from_slice(&out);
            joined.extend_from_slice(&tail);
            out = Bytes::from(joined);
        }
    }
    match (out.is_empty(), source_ended) {
        (false, _) => Step::Emit(out),
        (true, false) => Step::Continue,
        (true, true) => Step::End,
    }
}

/// The SSE event a cut stream ends with, so SDKs raise instead of hanging.
const STREAM_ERROR_EVENT: &[u8] = b"event: error\ndata: {\"error\":{\"type\":\"upstream_error\",\"code\":\"upstream_timeout\",\"message\":\"the upstream stream was interrupted\"}}\n\n";

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        loop {
            let polled = ready!(this.source.as_mut().poll_source(cx));
            let m = &mut *this.metering;
            match polled {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let source_ended = this.source.is_end();
                    match on_data(m, this.redact_buf, this.ended, data, source_ended) {
                        Step::Emit(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Step::Continue => continue,
                        Step::End => return Poll::Ready(None),
                    }
                }
                Some(Err(e)) => {
                    *this.ended = true;
                    settle_cut(m);
                    if m.sse {
                        tracing::warn!(error = %e, "upstream stream cut; ending the client stream with an error event");
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                            STREAM_ERROR_EVENT,
                        )))));
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    *this.ended = true;
                    let tail = finish(m, this.redact_buf);
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        let m = &self.metering;
        if m.hide.is_some() || m.redact.is_some() {
            return SizeHint::default();
        }
        match &self.source {
            Source::Upstream { body } => body.size_hint(),
            Source::Mock { body } => body.size_hint(),
            Source::Full { body } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_every_occurrence() {
        let out = redact(b"{\"e\":\"bad key sk-abc, sk-abc\"}", "sk-abc");
        assert_eq!(&out[..], b"{\"e\":\"bad key [REDACTED], [REDACTED]\"}");
    }
}
