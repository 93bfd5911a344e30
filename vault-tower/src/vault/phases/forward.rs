//! Phase 5, `forward`: the request goes to the mock provider or through the
//! inner service; a panic there becomes a 500 rather than a dropped
//! connection (docs/threat-model.md, C6).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;
use vault_core::crypto::ProviderSecret;
use vault_core::denial::Denial;

use super::Call;
use super::prepare::Outbound;
use crate::mock::{MockBody, MockProvider};

/// What came back, and from where.
pub(super) enum Reply<B> {
    /// The mock provider's answer.
    Mock(Response<MockBody>),
    /// The inner service's answer (the provider's, or the forwarder's own
    /// 502/504), to be redacted of `secret`.
    Provider {
        response: Response<B>,
        secret: ProviderSecret,
    },
}

/// Why there is no reply.
pub(super) enum Failed<E> {
    /// The inner service panicked (the payload is dropped unread).
    Panicked,
    /// The inner service failed: passed on as the layer's error.
    Inner(E),
}

/// Sends `outbound` for `call`. From here an unsettled drop charges the
/// reservation: the request may have reached the provider.
pub(super) async fn forward<S, B, R>(
    mut inner: S,
    outbound: Outbound<B>,
    call: &mut Call,
) -> Result<Reply<R>, Failed<S::Error>>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    call.pending.mark_sent();
    let (request, secret) = match outbound {
        Outbound::Mock(request) => {
            let response = match MockProvider.call(request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            return Ok(Reply::Mock(response));
        }
        Outbound::Provider { request, secret } => (request, secret),
    };
    // A panic in the inner service (its `call` or its future) must not take
    // the connection down with no answer or leave the reservation held. The
    // request may have reached the provider, so it is charged as sent and
    // cut. The panic payload is never looked at: it may hold anything,
    // secrets included. An error from the inner service is passed on; the
    // call is charged the same way as it drops.
    match CatchPanic::new(async move { inner.call(request).await }).await {
        Ok(Ok(response)) => Ok(Reply::Provider { response, secret }),
        Ok(Err(e)) => {
            let status = Denial::UpstreamUnavailable(String::new()).status();
            call.pending.set_status(status);
            Err(Failed::Inner(e))
        }
        Err(Panicked) => {
            tracing::error!(provider = %call.provider, "the inner service panicked");
            Err(Failed::Panicked)
        }
    }
}

/// The inner service panicked (the payload is dropped unread).
struct Panicked;

pin_project_lite::pin_project! {
    /// Polls a future inside `catch_unwind`, turning a panic into
    /// `Err(Panicked)`. Once it has panicked the future is never polled again
    /// (the result is returned at once and the wrapper is dropped).
    struct CatchPanic<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchPanic<F> {
    fn new(inner: F) -> Self {
        CatchPanic { inner }
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_payload) => Poll::Ready(Err(Panicked)),
        }
    }
}
