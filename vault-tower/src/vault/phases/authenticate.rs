//! Phase 1, `authenticate`: the credential, the key's own status, and the
//! provider and canonical path the request is for.

use http::Method;
use http::header::UPGRADE;
use http::request::Parts;
use vault_core::denial::Denial;
use vault_core::policy::split_proxy_path;
use vault_core::record::KeyStatus;

use super::Caller;
use crate::context::VaultContext;
use crate::vault::refusal::{Attribution, Refusal};

/// The active key the request presents and the provider path it calls.
pub(super) async fn authenticate(ctx: &VaultContext, parts: &Parts) -> Result<Caller, Refusal> {
    refuse_tunnels(parts)?;
    // The credential: exactly one, strictly parsed, before any lookup.
    let key = ctx
        .presented_record(&parts.headers, parts.uri.query())
        .await
        .map_err(Refusal::anonymous)?;
    // The endpoint as presented, for refusals before the path is split.
    let presented = || format!("{} {}", parts.method, parts.uri.path());
    // A revoked or expired key is refused at once, before its body is read
    // (its ancestors are checked by the policy engine).
    let refused = match key.status_at(ctx.clock.now()) {
        KeyStatus::Revoked => Some(Denial::KeyRevoked),
        KeyStatus::Expired => Some(Denial::KeyExpired),
        KeyStatus::Active => None,
    };
    if let Some(d) = refused {
        let who = Attribution::new(key, None, presented(), None);
        return Err(Refusal::of_key(d, who));
    }
    // The provider and the canonical upstream path: checked and forwarded
    // byte for byte.
    let (provider, path) = match split_proxy_path(parts.uri.path()) {
        Ok(split) => split,
        Err(e) => {
            let who = Attribution::new(key, None, presented(), None);
            return Err(Refusal::of_key(Denial::InvalidRequest(e.to_string()), who));
        }
    };
    Ok(Caller {
        key,
        provider,
        path: path.to_owned(),
        endpoint: format!("{} {}", parts.method, path),
    })
}

/// Tunnels and protocol switches are never proxied (docs/threat-model.md,
/// F4).
fn refuse_tunnels(parts: &Parts) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT
        || parts.method == Method::TRACE
        || parts.headers.contains_key(UPGRADE)
        || parts.extensions.get::<hyper::ext::Protocol>().is_some()
    {
        let d = Denial::MethodNotAllowed(format!(
            "{} and protocol upgrades are not proxied",
            parts.method
        ));
        return Err(Refusal::anonymous(d));
    }
    Ok(())
}
