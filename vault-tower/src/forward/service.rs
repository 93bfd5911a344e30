//! `Forwarder`: the `Service` that sends a rewritten request upstream and
//! turns a failure into a 502/504 answer marked [`UpstreamFailure`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use vault_core::denial::Denial;

use super::body::ForwardBody;
use super::pool::{ConnPool, SendError};
use super::upstream::Timeouts;
use crate::BoxError;
use crate::response::denial_response;

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
