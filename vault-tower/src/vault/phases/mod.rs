//! The request path of [`Vault`](crate::Vault), one phase per file:
//!
//! ```text
//! phase              file              produces          or
//! authenticate       authenticate.rs   Caller            Refusal
//! read_body          read_body.rs      Payload           Refusal
//! authorise          authorise.rs      Admitted + Call   Refusal
//! prepare_upstream   prepare.rs        Outbound          Denial
//! forward            forward.rs        Reply             Failed
//! wrap_response      wrap.rs           Response<MeteredBody<_>>
//! ```
//!
//! Each phase takes what the one before it produced and returns what the
//! next needs, or why not; [`handle`] hands every [`Refusal`] to
//! [`Refusal::respond`]. From [`authorise`](authorise::authorise) on, the
//! call is a [`Call`] that settles exactly once however the path ends
//! (docs/budgets.md#settlement). [`handle`] keeps it and lends it to the
//! later phases (moving it into each would copy its few hundred bytes every
//! time); it turns their denial or failure into the call's refusal.

#![expect(
    clippy::result_large_err,
    reason = "a Refusal (~150 bytes: a key's attribution and limit headers) is returned by value; boxing it would cost an allocation per refused request"
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

/// The phase's product, or — for a refusal — the answer from
/// [`Refusal::respond`], returned at once.
macro_rules! or_refuse {
    ($ctx:expr, $phase:expr) => {
        match $phase {
            Ok(product) => product,
            Err(refusal) => return Ok(Refusal::respond(refusal, $ctx)),
        }
    };
}

/// Runs the phases in order for one request. One frame for the whole path
/// (no wrapper turning a returned refusal into a response): the answer is
/// a few hundred bytes, copied once more per layer it passes through.
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
    let ctx = &*ctx;
    let started = Instant::now();
    if !ctx.sink.accepting() {
        // What waits for the store fills its buffer: no new call until it
        // drains (docs/replicas.md#when-postgresql-stops).
        return Ok(Refusal::anonymous(Denial::StoreUnavailable).respond(ctx));
    }
    let (parts, body) = req.into_parts();
    let caller = or_refuse!(ctx, authenticate::authenticate(ctx, &parts).await);
    let payload = or_refuse!(ctx, read_body::read_body(ctx, &parts, body, &caller).await);
    let admitted = authorise::authorise(ctx, &parts.method, caller, payload, started).await;
    // From here the call stays in this frame: the later phases borrow it,
    // and their denials and failures become its refusal here.
    let Admitted {
        key,
        path,
        payload,
        mut call,
    } = or_refuse!(ctx, admitted);
    let prepared = prepare::prepare_upstream(ctx, &call, &key, &path, payload, parts).await;
    let outbound = match prepared {
        Ok(outbound) => outbound,
        Err(denial) => return Ok(call.not_sent(denial).respond(ctx)),
    };
    let reply = match forward::forward(inner, outbound, &mut call).await {
        Ok(reply) => reply,
        Err(forward::Failed::Panicked) => return Ok(call.cut(Denial::Internal).respond(ctx)),
        // Passed on as the layer's error; the call settles as it drops.
        Err(forward::Failed::Inner(e)) => return Err(e),
    };
    Ok(wrap::wrap_response(reply, call))
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

    /// Ends the call with `denial` after it may have been sent: it is
    /// charged its reservation.
    fn cut(self, denial: Denial) -> Refusal {
        Refusal::cut(denial, self.pending, self.limits)
    }
}
