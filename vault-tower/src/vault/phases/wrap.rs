//! Phase 6, `wrap_response`: the answer with echoed credentials stripped,
//! the limit headers added (docs/api.md#headers), and its body metered by a
//! [`MeteredBody`] that settles the call at its end or drop.

use std::sync::Arc;

use http::Response;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::response::Parts;
use vault_core::crypto::ProviderSecret;
use vault_core::meter::{BodyKind, DEFAULT_EVENT_CAP, HideUsageChunk, UsageMeter};
use vault_core::provider::Provider;

use super::Call;
use super::forward::Reply;
use crate::credentials::strip_response_headers;
use crate::forward::UpstreamFailure;
use crate::response::{OUTPUT_TOKENS_CLAMPED, SHADOW_DENIAL, add_limit_headers};
use crate::vault::body::{MeteredBody, Metering, Source};

/// The client's answer to `call`.
pub(super) fn wrap_response<B>(reply: Reply<B>, call: Call) -> Response<MeteredBody<B>> {
    let (mut parts, source, secret) = match reply {
        Reply::Mock(response) => {
            let (parts, body) = response.into_parts();
            (parts, Source::Mock { body }, None)
        }
        Reply::Provider { response, secret } => {
            let (parts, body) = response.into_parts();
            (parts, Source::Upstream { body }, Some(secret))
        }
    };
    if let Some(failure) = parts.extensions.get::<UpstreamFailure>().copied() {
        // The forwarder's own 502/504: nothing to meter or strip. Whether
        // the request reached the provider decides the charge.
        let mut pending = call.pending;
        pending.set_status(parts.status.as_u16());
        pending.finish_unanswered(failure.sent);
        add_limit_headers(&mut parts.headers, &call.limits);
        let body = MeteredBody::new(source, Metering::default());
        return Response::from_parts(parts, body);
    }
    // Stripped first: a `Connection` header naming ours must not remove them.
    strip_response_headers(
        &mut parts.headers,
        secret.as_ref().map(ProviderSecret::expose_secret),
    );
    add_limit_headers(&mut parts.headers, &call.limits);
    if let Some(n) = call.clamp {
        parts.headers.insert(
            HeaderName::from_static(OUTPUT_TOKENS_CLAMPED),
            HeaderValue::from(n),
        );
    }
    if let Some(code) = call.shadow {
        parts.headers.insert(
            HeaderName::from_static(SHADOW_DENIAL),
            HeaderValue::from_static(code),
        );
    }
    let metering = metering(&mut parts, call, secret);
    Response::from_parts(parts, MeteredBody::new(source, metering))
}

/// How the body of an answer with head `parts` is metered, and the length
/// header dropped where the body will not keep it.
fn metering(parts: &mut Parts, call: Call, secret: Option<ProviderSecret>) -> Metering {
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let kind = if sse {
        BodyKind::Sse
    } else if call.stream && call.provider == Provider::Google {
        BodyKind::JsonArrayStream
    } else {
        BodyKind::Json
    };
    let mut pending = call.pending;
    pending.set_status(parts.status.as_u16());
    // An error answer is never a long stream: held whole (up to a cap) and
    // redacted, whatever its content type.
    let redact = (parts.status.as_u16() >= 400)
        .then_some(secret)
        .flatten()
        .map(Arc::new);
    // The usage-only chunk vaultgate asked for is hidden from the client.
    let hide = (call.add_usage && sse).then(|| HideUsageChunk::new(DEFAULT_EVENT_CAP));
    if redact.is_some() || hide.is_some() {
        parts.headers.remove(CONTENT_LENGTH);
    }
    Metering {
        meter: Some(UsageMeter::new(call.provider.usage_format(), kind)),
        hide,
        sse,
        redact,
        pending: Some(pending),
    }
}
