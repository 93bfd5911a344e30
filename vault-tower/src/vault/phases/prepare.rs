//! Phase 4, `prepare_upstream`: where the call goes ([`Target`]), the body
//! rewritten where the policy clamps it or usage must be asked for, client
//! credentials and hop-by-hop headers stripped, the provider credential
//! injected and the URI set to the configured base URL (docs/threat-model.md,
//! E3–E4: the client never picks the host).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Request};
use vault_core::crypto::{Aad, ProviderSecret};
use vault_core::denial::Denial;
use vault_core::key::KeyEnv;
use vault_core::meter::rewrite_request_at;
use vault_core::provider::{AuthStyle, Provider};
use vault_core::record::KeyRecord;

use super::{Call, Payload};
use crate::context::VaultContext;
use crate::credentials::{strip_key_param, strip_request_headers};
use crate::forward::Upstream;
use crate::mock::MockTarget;

/// Where an admitted call goes: one or the other, never half of each.
enum Target<'a> {
    /// The built-in mock provider (test keys, when the context says so): no
    /// credential, never dials out.
    Mock,
    /// The provider's configured upstream, and its key to inject.
    Provider {
        upstream: &'a Upstream,
        secret: ProviderSecret,
    },
}

/// The request as it goes out, and to whom.
pub(super) enum Outbound<B> {
    /// To the mock provider, addressed by its upstream path.
    Mock(Request<Bytes>),
    /// To the provider's upstream through the inner service; its answer is
    /// redacted of `secret`.
    Provider {
        request: Request<B>,
        secret: ProviderSecret,
    },
}

/// The request `call` sends for `key` to the upstream `path`, built from
/// the client's `parts` and `payload`; or why it cannot be sent.
pub(super) async fn prepare_upstream<B: From<Bytes>>(
    ctx: &VaultContext,
    call: &Call,
    key: &KeyRecord,
    path: &str,
    payload: Payload,
    mut parts: Parts,
) -> Result<Outbound<B>, Denial> {
    let target = target(ctx, key, call.provider).await?;
    let body = rewrite(payload, call, path)?;
    strip_request_headers(&mut parts.headers);
    let query = parts.uri.query().and_then(strip_key_param);
    let outbound = match target {
        Target::Mock => {
            let mut req = Request::new(body);
            *req.method_mut() = parts.method;
            *req.uri_mut() = match query.as_deref() {
                Some(q) => format!("{path}?{q}").parse().unwrap_or_default(),
                None => path.parse().unwrap_or_default(),
            };
            req.extensions_mut().insert(MockTarget(call.provider));
            Outbound::Mock(req)
        }
        Target::Provider { upstream, secret } => {
            parts.uri = match upstream.uri_for(path, query.as_deref()) {
                Ok(u) => u,
                Err(_) => {
                    return Err(Denial::InvalidRequest(
                        "the request target is invalid".to_owned(),
                    ));
                }
            };
            inject_credential(&mut parts.headers, call.provider, &secret);
            // The upstream protocol is negotiated per connection, whatever
            // the client spoke to us.
            parts.version = http::Version::HTTP_11;
            parts.extensions.insert(upstream.timeouts);
            let request = Request::from_parts(parts, B::from(body));
            Outbound::Provider { request, secret }
        }
    };
    Ok(outbound)
}

/// The mock for test keys (when the context says so); else the provider's
/// upstream and the key it opens, or why there is none.
async fn target<'a>(
    ctx: &'a VaultContext,
    key: &KeyRecord,
    provider: Provider,
) -> Result<Target<'a>, Denial> {
    if key.env == KeyEnv::Test && ctx.test_keys_use_mock {
        return Ok(Target::Mock);
    }
    let Some(upstream) = ctx.upstreams.get(provider) else {
        return Err(Denial::UpstreamUnavailable(format!(
            "no base_url is configured for provider {provider}"
        )));
    };
    let pk = match ctx.provider_key_for(key, provider).await {
        Ok(Some(pk)) => pk,
        Ok(None) => {
            return Err(Denial::ProviderNotAllowed(format!(
                "no {provider} provider key is available to this key in project {}",
                key.project
            )));
        }
        Err(e) => {
            tracing::error!(error = %e, "loading provider keys failed");
            return Err(Denial::for_store_error(&e));
        }
    };
    let aad = Aad {
        record_id: pk.id.as_str(),
        project: &pk.project,
        provider: pk.provider,
    };
    match ctx.encryptor.open(&pk.sealed, &aad) {
        Ok(secret) => Ok(Target::Provider { upstream, secret }),
        Err(_) => {
            tracing::error!(provider_key = %pk.id, "a provider key could not be decrypted");
            Err(Denial::Internal)
        }
    }
}

/// The body to send: rewritten only when the policy clamps the output limit
/// or usage must be asked for, and never for multipart uploads.
fn rewrite(payload: Payload, call: &Call, path: &str) -> Result<Bytes, Denial> {
    if payload.multipart {
        return Ok(payload.bytes);
    }
    match rewrite_request_at(
        call.provider,
        path,
        &payload.bytes,
        call.clamp,
        call.add_usage,
    ) {
        Ok(Some(rewritten)) => Ok(Bytes::from(rewritten)),
        Ok(None) => Ok(payload.bytes),
        Err(e) => Err(Denial::InvalidRequest(e.to_string())),
    }
}

// Provider credential headers, parsed once (`from_static` parses per call).
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

/// Puts the provider credential where the provider expects it, marked
/// sensitive so HTTP/2 never indexes it and `Debug` hides it.
fn inject_credential(headers: &mut HeaderMap, provider: Provider, secret: &ProviderSecret) {
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
