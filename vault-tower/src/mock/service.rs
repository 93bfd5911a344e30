//! `MockProvider`: the mock provider as a tower `Service`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use vault_core::provider::Provider;

use super::answers::answer;
use super::body::MockBody;

/// The provider a mock request is addressed to (set by the layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockTarget(pub Provider);

/// A tower service answering in each provider's shape. The request's path is
/// the upstream path (e.g. `/v1/chat/completions`); a [`MockTarget`]
/// extension names the provider (OpenAI-compatible when absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct MockProvider;

impl tower_service::Service<Request<Bytes>> for MockProvider {
    type Response = Response<MockBody>;
    type Error = Infallible;
    type Future = Ready<Result<Response<MockBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let provider = req
            .extensions()
            .get::<MockTarget>()
            .map_or(Provider::OpenAi, |t| t.0);
        ready(Ok(answer(provider, &req)))
    }
}
