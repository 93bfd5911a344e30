//! The request path of [`Vault`](crate::Vault), one phase per file:
//!
//! ```text
//! phase              file              produces
//! authenticate       authenticate.rs   Caller
//! read_body          read_body.rs      Payload
//! authorise          authorise.rs      Admitted (with its Call)
//! prepare_upstream   prepare.rs        Outbound + Call
//! forward            forward.rs        Reply + Call
//! wrap_response      wrap.rs           Response<MeteredBody<_>>
//! ```
//!
//! Each phase takes what the one before it produced and returns what the
//! next needs, or a [`Refusal`]; [`handle`] hands every refusal to
//! [`Refusal::respond`]. From [`authorise`](authorise::authorise) on the
//! call is a [`Call`], which settles exactly once however the path ends
//! (docs/budgets.md#settlement).

#![expect(
    clippy::result_large_err,
    clippy::large_enum_variant,
    reason = "a Refusal can carry its admitted call (a few hundred bytes); boxing it would cost an allocation per refused request, and these values live in the request's one boxed future anyway"
)]

mod authenticate;
mod authorise;
mod forward;
mod prepare;
mod read_body;
mod wrap;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;
use vault_core::denial::Denial;
use vault_core::meter::{Endpoint, RequestInspection};
use vault_core::policy::LimitHeaders;
use vault_core::provider::{Provider, UsageFormat};
use vault_core::record::KeyRecord;

use super::body::{BoxError, MeteredBody};
use super::refusal::{Attribution, Refusal};
use super::sink::PendingCall;
use crate::context::VaultContext;

/// Runs the request path for one request.
pub(super) async fn handle<S, ReqBody, ResBody>(
    ctx: Arc<VaultContext>,
    inner: S,
    req: Request<ReqBody>,
) -> Result<Response<MeteredBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
    S::Future: Send,
    ReqBody: Body + From<Bytes> + Send,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send,
    ResBody::Error: Into<BoxError>,
{
    match run(&ctx, inner, req).await {
        Ok(resp) => Ok(resp),
        Err(Halt::Refused(refusal)) => Ok(refusal.respond(&ctx)),
        Err(Halt::Inner(e)) => Err(e),
    }
}

/// The phases in order.
async fn run<S, ReqBody, ResBody>(
    ctx: &VaultContext,
    inner: S,
    req: Request<ReqBody>,
) -> Result<Response<MeteredBody<ResBody>>, Halt<S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
    S::Future: Send,
    ReqBody: Body + From<Bytes> + Send,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send,
    ResBody::Error: Into<BoxError>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let caller = authenticate::authenticate(ctx, &parts).await?;
    let payload = read_body::read_body(ctx, &parts, body, &caller).await?;
    let admitted = authorise::authorise(ctx, &parts.method, caller, payload, started).await?;
    let (outbound, call) = prepare::prepare_upstream(ctx, admitted, parts).await?;
    let (reply, call) = forward::forward(inner, outbound, call).await?;
    Ok(wrap::wrap_response(reply, call))
}

/// Why the path stopped before there was an answer to wrap.
enum Halt<E> {
    /// The layer refused: answered by [`Refusal::respond`].
    Refused(Refusal),
    /// The inner service failed: passed on as the layer's error (the call
    /// settles as it drops).
    Inner(E),
}

impl<E> From<Refusal> for Halt<E> {
    fn from(refusal: Refusal) -> Self {
        Halt::Refused(refusal)
    }
}

/// Who is calling and what for: what [`authenticate`](authenticate::authenticate) found.
struct Caller {
    /// The key presented, active.
    key: Arc<KeyRecord>,
    /// The provider named by the path's first segment.
    provider: Provider,
    /// The canonical upstream path, checked and forwarded byte for byte.
    path: String,
    /// `METHOD /path`, for the usage record.
    endpoint: String,
}

impl Caller {
    /// For a refusal of this caller's request.
    fn attribution(&self, model: Option<&str>) -> Attribution {
        Attribution::new(
            self.key.clone(),
            Some(self.provider),
            self.endpoint.clone(),
            model.map(str::to_owned),
        )
    }
}

/// The request body, read whole and inspected by [`read_body`](read_body::read_body).
struct Payload {
    bytes: Bytes,
    inspection: RequestInspection,
    /// A multipart upload: forwarded unread but for its `model` field.
    multipart: bool,
}

impl Payload {
    /// Whether vaultgate asks the provider for a streamed usage chunk (and
    /// hides it from the client): OpenAI-compatible streams whose client did
    /// not, but never the Responses API, which refuses `stream_options`.
    fn asks_usage(&self, provider: Provider) -> bool {
        let i = &self.inspection;
        i.stream
            && provider.usage_format() == UsageFormat::OpenAi
            && i.endpoint != Endpoint::Responses
            && !i.client_asked_usage
    }
}

/// A request the policy admitted: what [`authorise`](authorise::authorise) hands on.
struct Admitted {
    key: Arc<KeyRecord>,
    path: String,
    /// The body; its model has moved into the call's usage record.
    payload: Payload,
    call: Call,
}

/// An admitted call, from its grant to its answer. It settles exactly once
/// ([`PendingCall`]), through a refusal, its answer's body, or its drop.
struct Call {
    pending: PendingCall,
    /// The grant's `X-RateLimit-*` and budget header values.
    limits: LimitHeaders,
    /// The output limit the policy lowered the request to, if it did.
    clamp: Option<u64>,
    /// In shadow mode, the code of the denial that was not enforced.
    shadow: Option<&'static str>,
    provider: Provider,
    /// Whether the client asked for a stream.
    stream: bool,
    /// See [`Payload::asks_usage`].
    add_usage: bool,
}

impl Call {
    /// Refuses the call before anything was sent: its reservation is released.
    fn not_sent(self, denial: Denial) -> Refusal {
        Refusal::not_sent(denial, self.pending, self.limits)
    }
}
