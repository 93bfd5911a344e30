//! `ResponseFuture` of [`Vault`](crate::Vault).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use super::body::MeteredBody;

type Inner<B, E> = Pin<Box<dyn Future<Output = Result<Response<MeteredBody<B>>, E>> + Send>>;

pin_project_lite::pin_project! {
    /// The future `Vault::call` returns.
    ///
    /// The request path awaits the store, the policy engine and the inner
    /// service in turn; those are trait objects whose futures are already
    /// boxed (`async_trait`), so one boxed `async` block here costs one more
    /// allocation and keeps the code a straight line rather than a
    /// hand-written state machine.
    pub struct ResponseFuture<B, E> {
        #[pin]
        inner: Inner<B, E>,
    }
}

impl<B, E> ResponseFuture<B, E> {
    pub(crate) fn new(inner: Inner<B, E>) -> Self {
        ResponseFuture { inner }
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
