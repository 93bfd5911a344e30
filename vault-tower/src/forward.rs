//! The default inner service: forwards the rewritten request over pooled
//! HTTP/1.1 connections that each call drives in its own task (see
//! [`pool`](crate::pool); TLS by rustls with the `ring` provider), with
//! explicit timeouts and no redirects followed.
//!
//! Failures become the 502/504 JSON responses of docs/api.md#errors, carrying
//! an [`UpstreamFailure`] extension, so the layer knows whether the request
//! reached the provider (the `not_sent` rule of docs/budgets.md#settlement).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::time::{Instant, Sleep};
use vault_core::denial::Denial;

use crate::pool::{BoxError, ConnPool, Exchange, SendError};
use crate::response::denial_response;
use crate::upstream::Timeouts;

/// Marks a response that vaultgate made because the upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure {
    /// Whether the request may have reached the provider (then the provider
    /// may bill it, and the reservation is charged, not released).
    pub sent: bool,
}

/// Forwards requests whose URI is already absolute (set by the layer).
/// Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Forwarder {
    defaults: Timeouts,
    pool: ConnPool,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder::new(Timeouts::default())
    }
}

impl Forwarder {
    /// A forwarder using `defaults` for requests that carry no [`Timeouts`]
    /// extension.
    pub fn new(defaults: Timeouts) -> Self {
        Forwarder {
            defaults,
            pool: ConnPool::new(),
        }
    }
}

impl<B> tower_service::Service<Request<B>> for Forwarder
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ForwardBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let timeouts = req
            .extensions()
            .get::<Timeouts>()
            .copied()
            .unwrap_or(self.defaults);
        let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
        let pool = self.pool.clone();
        Box::pin(async move {
            // For failure messages: a clone of shared bytes, no allocation.
            let authority = req.uri().authority().cloned();
            let host = authority.as_ref().map_or("", |a| a.host());
            let sent = match tokio::time::timeout(
                timeouts.response,
                pool.send(req, timeouts.connect),
            )
            .await
            {
                Ok(Ok(resp)) => return Ok(resp.map(|b| ForwardBody::upstream(b, timeouts.idle))),
                Ok(Err(e)) => {
                    let sent = matches!(e, SendError::Exchange(_));
                    tracing::warn!(upstream = %host, sent, error = %e, "upstream request failed");
                    sent
                }
                Err(_) => {
                    tracing::warn!(upstream = %host, "upstream response timed out");
                    let d = Denial::UpstreamTimeout(format!(
                        "the upstream {host} did not answer within {} s",
                        timeouts.response.as_secs()
                    ));
                    return Ok(failure(d, true));
                }
            };
            let d =
                Denial::UpstreamUnavailable(format!("the upstream {host} could not be reached"));
            Ok(failure(d, sent))
        })
    }
}

fn failure(d: Denial, sent: bool) -> Response<ForwardBody> {
    let mut resp = denial_response(&d).map(ForwardBody::full);
    resp.extensions_mut().insert(UpstreamFailure { sent });
    resp
}

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
    fn upstream(body: Exchange, idle_for: Duration) -> Self {
        ForwardBody::Upstream {
            body,
            idle: tokio::time::sleep(idle_for),
            idle_for,
        }
    }

    fn full(body: Full<Bytes>) -> Self {
        ForwardBody::Full { body }
    }
}

/// The upstream fell silent for longer than the idle timeout mid-body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream was silent for longer than the idle timeout")]
pub struct IdleTimeout;

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

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
