//! `Vault<S>`: the layer's `Service`. `call` runs the request path of
//! [`phases`] in a [`ResponseFuture`].

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::{BoxError, MeteredBody};
use super::future::ResponseFuture;
use super::phases;
use crate::context::VaultContext;

/// The vaultgate middleware: see the [crate docs](crate). Denials are
/// responses, never errors, and never reach the inner service.
#[derive(Debug, Clone)]
pub struct Vault<S> {
    inner: S,
    ctx: Arc<VaultContext>,
}

impl<S> Vault<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, ctx: Arc<VaultContext>) -> Self {
        Vault { inner, ctx }
    }

    /// A [`VaultLayer`](crate::VaultLayer) over `ctx`.
    pub fn layer(ctx: Arc<VaultContext>) -> crate::VaultLayer {
        crate::VaultLayer::new(ctx)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Vault<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Use the service that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(Box::pin(phases::handle(self.ctx.clone(), inner, req)))
    }
}
