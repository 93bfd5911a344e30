//! `ForwardBody`: the forwarder's response body, the upstream's with an idle
//! timeout or vaultgate's own error body.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tokio::time::{Instant, Sleep};

use super::pool::Exchange;
use crate::BoxError;

pin_project_lite::pin_project! {
    /// The forwarder's response body: the upstream's, with an idle timeout,
    /// or vaultgate's own error body.
    // pin-project-lite cannot carry docs on variant fields.
    #[allow(missing_docs)]
    #[project = ForwardBodyProj]
    pub enum ForwardBody {
        /// Streaming from the upstream.
        Upstream {
            #[pin]
            body: Exchange,
            #[pin]
            idle: Sleep,
            idle_for: Duration,
        },
        /// A complete body made here.
        Full {
            #[pin]
            body: Full<Bytes>,
        },
    }
}

impl ForwardBody {
    pub(super) fn upstream(body: Exchange, idle_for: Duration) -> Self {
        ForwardBody::Upstream {
            body,
            idle: tokio::time::sleep(idle_for),
            idle_for,
        }
    }

    pub(super) fn full(body: Full<Bytes>) -> Self {
        ForwardBody::Full { body }
    }
}

/// The upstream fell silent for longer than the idle timeout mid-body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream was silent for longer than the idle timeout")]
pub struct IdleTimeout;

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ForwardBodyProj::Upstream {
                body,
                mut idle,
                idle_for,
            } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    idle.as_mut().reset(Instant::now() + *idle_for);
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => match idle.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout)))),
                    Poll::Pending => Poll::Pending,
                },
            },
            ForwardBodyProj::Full { body } => body.poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Upstream { body, .. } => body.is_end_stream(),
            ForwardBody::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Upstream { body, .. } => body.size_hint(),
            ForwardBody::Full { body } => body.size_hint(),
        }
    }
}
