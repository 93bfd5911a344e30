//! `Vault<S>`: the request path of ARCHITECTURE.md as a tower `Service`.
//!
//! ```text
//! request → extract virtual key → hash → cache / KeyStore → PolicyEngine::check
//!         → choose provider + provider key → Encryptor::open → strip client
//!           credentials, inject provider credential, rewrite URI → inner service
//!           (or the mock provider for test keys)
//! response ← limit headers ← MeteredBody meters usage and settles at end/drop
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, UPGRADE,
};
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_service::Service;
use vault_core::audit::{AuditEvent, AuditKind};
use vault_core::crypto::{Aad, ProviderSecret};
use vault_core::denial::Denial;
use vault_core::meter::{
    BodyKind, Endpoint, HideUsageChunk, RequestInspection, UsageMeter, count_chars,
    inspect_request, multipart, rewrite_request_at,
};
use vault_core::policy::{CallOutcome, Grant, LimitHeaders, RequestFacts, split_proxy_path};
use vault_core::provider::{AuthStyle, Provider, UsageFormat};
use vault_core::record::{KeyRecord, KeyStatus, SettledBy, UsageRecord};

use super::body::{BoxError, MeteredBody, Metering};
use super::future::ResponseFuture;
use super::sink::PendingCall;
use crate::context::VaultContext;
use crate::credentials::{strip_key_param, strip_request_headers, strip_response_headers};
use crate::forward::UpstreamFailure;
use crate::mock::{MockProvider, MockTarget};
use crate::response::{OUTPUT_TOKENS_CLAMPED, SHADOW_DENIAL, add_limit_headers, denial_response};

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
        ResponseFuture::new(Box::pin(handle(self.ctx.clone(), inner, req)))
    }
}

/// What is known about the caller once the key is found, for denials that
/// are attributed to it (usage record + audit event).
struct Caller<'a> {
    record: &'a KeyRecord,
    provider: Option<Provider>,
    endpoint: String,
    model: Option<String>,
}

fn deny<B>(
    ctx: &VaultContext,
    denial: &Denial,
    limits: Option<&LimitHeaders>,
    caller: Option<Caller<'_>>,
) -> Response<MeteredBody<B>> {
    let mut resp = denial_response(denial).map(MeteredBody::full);
    add_limit_headers(resp.headers_mut(), &limits.copied().unwrap_or_default());
    if let Some(c) = caller {
        let record = usage_record(
            ctx,
            c.record,
            c.provider,
            c.endpoint,
            c.model,
            denial.status(),
        );
        let event = AuditEvent {
            kind: AuditKind::RequestDenied,
            actor: Some(c.record.id.to_string()),
            target: Some(record.endpoint.clone()),
            project: Some(c.record.project.clone()),
            detail: serde_json::json!({"code": denial.code(), "status": denial.status(), "message": denial.message()}),
        };
        let mut record = record;
        record.denial = Some(denial.code().to_owned());
        ctx.sink.denied(record, Some(event));
    } else {
        ctx.metrics.observe_unattributed(denial);
        tracing::debug!(code = denial.code(), "unauthenticated request denied");
    }
    resp
}

/// What the nearest budget in `chain` has left, for the headers of a denial
/// the engine made before it reached the budget: docs/api.md#headers promises
/// `X-Budget-Remaining-USD` on every response to a budgeted key.
async fn budget_remaining(
    ctx: &VaultContext,
    chain: &[Arc<KeyRecord>],
) -> Option<vault_core::money::Micros> {
    let (key, budget) = chain
        .iter()
        .find_map(|k| k.policy.budget.map(|b| (&k.id, b)))?;
    let now = ctx.clock.now();
    let line = budget.line(key.clone(), now);
    match ctx.store.budget_usage(&line, now).await {
        Ok(u) => Some(u.remaining(budget.limit)),
        Err(e) => {
            tracing::warn!(error = %e, "reading the budget for a denial's headers failed");
            None
        }
    }
}

fn usage_record(
    ctx: &VaultContext,
    key: &KeyRecord,
    provider: Option<Provider>,
    endpoint: String,
    model: Option<String>,
    status: u16,
) -> UsageRecord {
    UsageRecord {
        at: ctx.clock.now(),
        key_id: key.id.clone(),
        project: key.project.clone(),
        provider,
        endpoint,
        model,
        tokens_in: 0,
        tokens_out: 0,
        cost: vault_core::money::Micros::ZERO,
        latency_ms: 0,
        status,
        denial: None,
        shadow: false,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        audio_tokens: 0,
        settlement: None,
    }
}

async fn handle<S, ReqBody, ResBody>(
    ctx: Arc<VaultContext>,
    mut inner: S,
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
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();

    // Tunnels and protocol switches are never proxied (docs/threat-model.md,
    // F4).
    if parts.method == Method::CONNECT
        || parts.method == Method::TRACE
        || parts.headers.contains_key(UPGRADE)
        || parts.extensions.get::<hyper::ext::Protocol>().is_some()
    {
        let d = Denial::MethodNotAllowed(format!(
            "{} and protocol upgrades are not proxied",
            parts.method
        ));
        return Ok(deny(&ctx, &d, None, None));
    }

    // 1. The credential: exactly one, strictly parsed, before any lookup.
    let record = match ctx
        .presented_record(&parts.headers, parts.uri.query())
        .await
    {
        Ok(r) => r,
        Err(d) => return Ok(deny(&ctx, &d, None, None)),
    };
    let now = ctx.clock.now();
    // The endpoint as presented, for refusals before the path is split.
    let presented = || format!("{} {}", parts.method, parts.uri.path());
    let caller = |provider, endpoint: &str, model: Option<&str>| Caller {
        record: &record,
        provider,
        endpoint: endpoint.to_owned(),
        model: model.map(str::to_owned),
    };
    // A revoked or expired key is refused at once, before its body is read
    // (its ancestors are checked by the policy engine).
    let refused = match record.status_at(now) {
        KeyStatus::Revoked => Some(Denial::KeyRevoked),
        KeyStatus::Expired => Some(Denial::KeyExpired),
        KeyStatus::Active => None,
    };
    if let Some(d) = refused {
        return Ok(deny(&ctx, &d, None, Some(caller(None, &presented(), None))));
    }

    // 2. The provider and the canonical upstream path: checked and forwarded
    //    byte for byte.
    let (provider, path) = match split_proxy_path(parts.uri.path()) {
        Ok(split) => split,
        Err(e) => {
            let d = Denial::InvalidRequest(e.to_string());
            return Ok(deny(&ctx, &d, None, Some(caller(None, &presented(), None))));
        }
    };
    let path = path.to_owned();
    let endpoint = format!("{} {}", parts.method, path);

    // 3. The body: bounded in size and time, never compressed.
    if parts
        .headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        let d = Denial::InvalidRequest("compressed request bodies are not accepted".to_owned());
        return Ok(deny(
            &ctx,
            &d,
            None,
            Some(caller(Some(provider), &endpoint, None)),
        ));
    }
    let max = ctx.limits.max_body_bytes;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let d = Denial::RequestTooLarge(format!("the request body is larger than {max} bytes"));
        return Ok(deny(
            &ctx,
            &d,
            None,
            Some(caller(Some(provider), &endpoint, None)),
        ));
    }
    let bytes = match tokio::time::timeout(
        ctx.limits.body_timeout,
        Limited::new(body, max).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            let d = if e.downcast_ref::<LengthLimitError>().is_some() {
                Denial::RequestTooLarge(format!("the request body is larger than {max} bytes"))
            } else {
                Denial::InvalidRequest("the request body could not be read".to_owned())
            };
            return Ok(deny(
                &ctx,
                &d,
                None,
                Some(caller(Some(provider), &endpoint, None)),
            ));
        }
        Err(_) => {
            return Ok(deny(
                &ctx,
                &Denial::RequestTimeout,
                None,
                Some(caller(Some(provider), &endpoint, None)),
            ));
        }
    };
    // Multipart uploads (audio, files) are forwarded unread: only a `model`
    // field is read, for model allowlists; the policy refuses them for
    // budgeted keys, as their cost cannot be bounded in advance.
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let is_multipart = multipart::is_multipart(content_type);
    let inspected = if is_multipart {
        Ok(RequestInspection {
            model: multipart::form_field(content_type, &bytes, "model"),
            body_chars: count_chars(&bytes),
            input_tokens_bound: bytes.len() as u64,
            input_unbounded: true,
            ..RequestInspection::default()
        })
    } else {
        inspect_request(provider, &path, &bytes)
    };
    let mut inspection: RequestInspection = match inspected {
        Ok(i) => i,
        Err(e) => {
            let d = Denial::InvalidRequest(e.to_string());
            return Ok(deny(
                &ctx,
                &d,
                None,
                Some(caller(Some(provider), &endpoint, None)),
            ));
        }
    };
    let model = inspection.model.take();

    // 4. The policy: scopes, allowlists, limits, budget reservation.
    let chain = match ctx.chain(record.clone()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "loading the key's ancestors failed");
            return Ok(deny(
                &ctx,
                &Denial::Internal,
                None,
                Some(caller(Some(provider), &endpoint, model.as_deref())),
            ));
        }
    };
    let facts = RequestFacts {
        method: parts.method.as_str(),
        provider,
        path: &path,
        model: model.as_deref(),
        max_output_tokens: inspection.max_output_tokens,
        body_chars: inspection.body_chars,
        stream: inspection.stream,
        input_tokens_bound: inspection.input_tokens_bound,
        input_unbounded: inspection.input_unbounded,
        output_multiplier: inspection.output_multiplier,
        multipart: is_multipart,
    };
    let grant: Grant = match ctx.engine.check(&chain, &facts).await {
        Ok(g) => g,
        Err((d, mut limits)) => {
            if limits.budget_remaining.is_none() {
                limits.budget_remaining = budget_remaining(&ctx, &chain).await;
            }
            return Ok(deny(
                &ctx,
                &d,
                Some(&limits),
                Some(caller(Some(provider), &endpoint, model.as_deref())),
            ));
        }
    };
    let limits = grant.headers;
    let clamp = grant.clamp_output_tokens;
    let shadow_code = grant.shadow_denial.as_ref().map(Denial::code);
    let mut pending_record = usage_record(&ctx, &record, Some(provider), endpoint, model, 0);
    if let Some(code) = shadow_code {
        // Shadow mode: the call goes ahead; its record says what would have
        // been denied.
        pending_record.denial = Some(code.to_owned());
        pending_record.shadow = true;
    }
    // From here the call settles exactly once however it ends, even if this
    // future is dropped (docs/budgets.md#settlement).
    let mut pending = PendingCall::new(ctx.sink.clone(), grant, pending_record, started);
    // A refusal after admission: nothing was sent, the reservation is released.
    let not_sent = |mut pending: PendingCall, d: Denial| {
        pending.set_status(d.status());
        pending.set_denial(d.code());
        pending.finish(CallOutcome::NotSent, SettledBy::NotSent);
        let mut resp = denial_response(&d).map(MeteredBody::full);
        add_limit_headers(resp.headers_mut(), &limits);
        resp
    };

    // 5. The upstream and the provider credential (none for the mock).
    let use_mock = record.env == vault_core::key::KeyEnv::Test && ctx.test_keys_use_mock;
    let mut secret: Option<ProviderSecret> = None;
    let mut upstream = None;
    if !use_mock {
        let Some(up) = ctx.upstreams.get(provider) else {
            let d = Denial::UpstreamUnavailable(format!(
                "no base_url is configured for provider {provider}"
            ));
            return Ok(not_sent(pending, d));
        };
        upstream = Some(up.clone());
        let pk = match ctx.provider_key_for(&record, provider).await {
            Ok(Some(pk)) => pk,
            Ok(None) => {
                let d = Denial::ProviderNotAllowed(format!(
                    "no {provider} provider key is available to this key in project {}",
                    record.project
                ));
                return Ok(not_sent(pending, d));
            }
            Err(e) => {
                tracing::error!(error = %e, "loading provider keys failed");
                return Ok(not_sent(pending, Denial::Internal));
            }
        };
        let aad = Aad {
            record_id: pk.id.as_str(),
            project: &pk.project,
            provider: pk.provider,
        };
        match ctx.encryptor.open(&pk.sealed, &aad) {
            Ok(s) => secret = Some(s),
            Err(_) => {
                tracing::error!(provider_key = %pk.id, "a provider key could not be decrypted");
                return Ok(not_sent(pending, Denial::Internal));
            }
        }
    }

    // 6. Rewrite: the body only when the policy clamps the output limit or
    //    usage must be requested (never for multipart uploads, and never
    //    `stream_options` for the Responses API, which refuses it); headers
    //    always.
    let add_usage = inspection.stream
        && provider.usage_format() == UsageFormat::OpenAi
        && inspection.endpoint != Endpoint::Responses
        && !inspection.client_asked_usage;
    let rewritten = if is_multipart {
        Ok(None)
    } else {
        rewrite_request_at(provider, &path, &bytes, clamp, add_usage)
    };
    let body = match rewritten {
        Ok(Some(rewritten)) => Bytes::from(rewritten),
        Ok(None) => bytes,
        Err(e) => return Ok(not_sent(pending, Denial::InvalidRequest(e.to_string()))),
    };
    strip_request_headers(&mut parts.headers);
    let query = parts.uri.query().and_then(strip_key_param);

    let (mut resp_parts, source) = if use_mock {
        let mut mreq = Request::new(body);
        *mreq.method_mut() = parts.method.clone();
        *mreq.uri_mut() = match query.as_deref() {
            Some(q) => format!("{path}?{q}").parse().unwrap_or_default(),
            None => path.parse().unwrap_or_default(),
        };
        mreq.extensions_mut().insert(MockTarget(provider));
        pending.mark_sent();
        let resp = match MockProvider.call(mreq).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let (p, b) = resp.into_parts();
        (p, Err(b))
    } else {
        let (Some(up), Some(secret)) = (upstream.as_ref(), secret.as_ref()) else {
            return Ok(not_sent(pending, Denial::Internal));
        };
        parts.uri = match up.uri_for(&path, query.as_deref()) {
            Ok(u) => u,
            Err(_) => {
                let d = Denial::InvalidRequest("the request target is invalid".to_owned());
                return Ok(not_sent(pending, d));
            }
        };
        inject_credential(&mut parts.headers, provider, secret);
        // The upstream protocol is negotiated per connection, whatever the
        // client spoke to us.
        parts.version = http::Version::HTTP_11;
        parts.extensions.insert(up.timeouts);
        let req = Request::from_parts(parts, ReqBody::from(body));
        // A panic in the inner service (its `call` or its future) must not
        // take the connection down with no answer or leave the reservation
        // held (docs/threat-model.md, C6). The request may have reached the
        // provider, so it is charged as sent and cut. The panic payload is
        // never looked at: it may hold anything, secrets included. An error
        // from the inner service is passed on; the call is charged the same
        // way as `pending` drops.
        pending.mark_sent();
        let resp = match CatchPanic::new(async move { inner.call(req).await }).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                pending.set_status(Denial::UpstreamUnavailable(String::new()).status());
                return Err(e);
            }
            Err(Panicked) => {
                tracing::error!(%provider, "the inner service panicked");
                pending.set_status(Denial::Internal.status());
                pending.finish(CallOutcome::Unmetered, SettledBy::CutReserved);
                let mut resp = denial_response(&Denial::Internal).map(MeteredBody::full);
                add_limit_headers(resp.headers_mut(), &limits);
                return Ok(resp);
            }
        };
        let (p, b) = resp.into_parts();
        (p, Ok(b))
    };

    // 7. The response: strip echoed credentials, add limit headers, meter.
    if let Some(failure) = resp_parts.extensions.get::<UpstreamFailure>().copied() {
        pending.set_status(resp_parts.status.as_u16());
        if failure.sent {
            pending.finish(CallOutcome::Unmetered, SettledBy::CutReserved);
        } else {
            pending.finish(CallOutcome::NotSent, SettledBy::NotSent);
        }
        add_limit_headers(&mut resp_parts.headers, &limits);
        let body = match source {
            Ok(b) => MeteredBody::upstream(b, Metering::default()),
            Err(b) => MeteredBody::mock(b, Metering::default()),
        };
        return Ok(Response::from_parts(resp_parts, body));
    }
    strip_response_headers(
        &mut resp_parts.headers,
        secret.as_ref().map(ProviderSecret::expose_secret),
    );
    add_limit_headers(&mut resp_parts.headers, &limits);
    if let Some(n) = clamp {
        resp_parts.headers.insert(
            HeaderName::from_static(OUTPUT_TOKENS_CLAMPED),
            HeaderValue::from(n),
        );
    }
    if let Some(code) = shadow_code {
        resp_parts.headers.insert(
            HeaderName::from_static(SHADOW_DENIAL),
            HeaderValue::from_static(code),
        );
    }
    let sse = resp_parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let kind = if sse {
        BodyKind::Sse
    } else if inspection.stream && provider == Provider::Google {
        BodyKind::JsonArrayStream
    } else {
        BodyKind::Json
    };
    let status = resp_parts.status;
    pending.set_status(status.as_u16());
    // An error answer is never a long stream: held whole (up to a cap) and
    // redacted, whatever its content type.
    let redact = (status.as_u16() >= 400)
        .then_some(secret)
        .flatten()
        .map(Arc::new);
    if redact.is_some() {
        resp_parts.headers.remove(CONTENT_LENGTH);
    }
    let metering = Metering {
        meter: Some(UsageMeter::new(provider.usage_format(), kind)),
        hide: (add_usage && sse).then(|| HideUsageChunk::new(vault_core::meter::DEFAULT_EVENT_CAP)),
        sse,
        redact,
        pending: Some(pending),
    };
    if add_usage && sse {
        resp_parts.headers.remove(CONTENT_LENGTH);
    }
    let body = match source {
        Ok(b) => MeteredBody::upstream(b, metering),
        Err(b) => MeteredBody::mock(b, metering),
    };
    Ok(Response::from_parts(resp_parts, body))
}

// Provider credential headers, parsed once (`from_static` parses per call).
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

/// Puts the provider credential where the provider expects it, marked
/// sensitive so HTTP/2 never indexes it and `Debug` hides it.
fn inject_credential(headers: &mut http::HeaderMap, provider: Provider, secret: &ProviderSecret) {
    let raw = secret.expose_secret().as_bytes();
    // `Bearer …` is built in a zeroizing buffer: the header value is then
    // the only copy outside the vault's own types.
    let bearer = || {
        let mut v = zeroize::Zeroizing::new(Vec::with_capacity(7 + raw.len()));
        v.extend_from_slice(b"Bearer ");
        v.extend_from_slice(raw);
        HeaderValue::from_bytes(&v)
    };
    let (name, value) = match provider.auth_style() {
        AuthStyle::AnthropicApiKey => (X_API_KEY, HeaderValue::from_bytes(raw)),
        AuthStyle::GoogApiKey => (X_GOOG_API_KEY, HeaderValue::from_bytes(raw)),
        _ => (http::header::AUTHORIZATION, bearer()),
    };
    match value {
        Ok(mut v) => {
            v.set_sensitive(true);
            headers.insert(name, v);
        }
        Err(_) => tracing::error!(%provider, "the provider key is not a valid header value"),
    }
    if provider.auth_style() == AuthStyle::AnthropicApiKey
        && !headers.contains_key("anthropic-version")
    {
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(Provider::ANTHROPIC_VERSION),
        );
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
