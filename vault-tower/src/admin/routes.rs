//! The management API of docs/api.md as an axum `Router` an app can nest.
//!
//! Every route is authenticated except `/healthz`, `/readyz` (and `/metrics` unless
//! protected): authentication runs as a layer over the whole router,
//! fallback included, so unknown paths, aliases, `HEAD` and `OPTIONS` all
//! answer 401 without a key (docs/threat-model.md, A10).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vault_core::denial::Denial;
use vault_core::key::{KeyId, ProviderKeyId};
use vault_core::manage::wire::{
    AddProviderKeyRequest, AuditQuery, CreateKeyRequest, KeyListQuery, RotateKeyRequest, UsageQuery,
};
use vault_core::manage::{Actor, ManageError};
use vault_core::record::KeyStatus;
use vault_core::scope::Permission;

use crate::admin::Admin;
use crate::response::denial_response;

/// Largest management request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Options for [`admin_router`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminOptions {
    /// Require a key with `usage:read` for `/metrics`.
    pub protect_metrics: bool,
}

/// The management API: `/v1/keys…`, `/v1/provider-keys…`, `/v1/projects`,
/// `/v1/usage`, `/v1/audit`, `/healthz`, `/readyz`, `/metrics`.
pub fn admin_router(admin: Admin, options: AdminOptions) -> Router {
    let admin = Arc::new(admin);
    let authed = Router::new()
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", get(get_key).delete(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/keys/{id}/limits", get(key_limits))
        .route(
            "/v1/provider-keys",
            post(add_provider_key).get(list_provider_keys),
        )
        .route(
            "/v1/provider-keys/{id}",
            axum::routing::delete(remove_provider_key),
        )
        .route("/v1/projects", get(list_projects))
        .route("/v1/usage", get(usage))
        .route("/v1/audit", get(audit));
    let authed = if options.protect_metrics {
        authed.route("/metrics", get(protected_metrics))
    } else {
        authed
    };
    let authed = authed
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(admin.clone(), authenticate))
        .with_state(admin.clone());
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let open = if options.protect_metrics {
        open
    } else {
        open.route("/metrics", get(metrics))
    };
    open.with_state(admin).merge(authed)
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn denial(d: &Denial) -> Response {
    denial_response(d).map(Body::new)
}

/// A [`ManageError`] as the JSON error of docs/api.md#errors.
#[derive(Debug)]
struct ApiError(ManageError);

impl From<ManageError> for ApiError {
    fn from(e: ManageError) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let message = e.to_string();
        let mut response = json_response(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &json!({"detail": message, "error": {"type": e.kind(), "code": e.code(), "message": message}}),
        );
        // A dependency that is away: worth retrying in a second, as the
        // proxy's 503s say (docs/api.md#errors).
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

type Answer = Result<Response, ApiError>;

/// Resolves the caller's key (any place docs/api.md#authentication names) and
/// refuses revoked, expired and unknown keys before any handler runs.
async fn authenticate(State(admin): State<Arc<Admin>>, mut req: Request, next: Next) -> Response {
    let ctx = admin.context();
    let record = match ctx.presented_record(req.headers(), req.uri().query()).await {
        Ok(r) => r,
        Err(d) => return denial(&d),
    };
    let now = ctx.clock().now();
    match ctx.chain(record.clone()).await {
        Ok(chain) => {
            for k in &chain {
                match k.status_at(now) {
                    KeyStatus::Revoked => return denial(&Denial::KeyRevoked),
                    KeyStatus::Expired => return denial(&Denial::KeyExpired),
                    KeyStatus::Active => {}
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "loading the key's ancestors failed");
            return denial(&Denial::for_store_error(&e));
        }
    }
    req.extensions_mut().insert(Actor::Key(record));
    next.run(req).await
}

/// The caller, as the authentication layer resolved it; fails closed.
fn actor(req: &Request) -> Result<Actor, ApiError> {
    req.extensions()
        .get::<Actor>()
        .cloned()
        .ok_or(ApiError(ManageError::Internal))
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request) -> Result<T, ApiError> {
    read_optional_json(req).await?.ok_or_else(|| {
        ApiError(ManageError::Invalid(
            "a JSON request body is required".to_owned(),
        ))
    })
}

/// Reads a bounded JSON body; `None` when the body is empty.
async fn read_optional_json<T: for<'de> Deserialize<'de>>(
    req: Request,
) -> Result<Option<T>, ApiError> {
    let body = req.into_body();
    let bytes: Bytes = match Limited::new(body, MAX_ADMIN_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError(ManageError::TooLarge(format!(
                "the request body is larger than {MAX_ADMIN_BODY} bytes"
            ))));
        }
        Err(_) => {
            return Err(ApiError(ManageError::Invalid(
                "the request body could not be read".to_owned(),
            )));
        }
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    // Every body is an object: serde would also read a struct of optional
    // fields from `[]`.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError(ManageError::Invalid(
            "invalid request body: expected a JSON object".to_owned(),
        )));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError(body_error::<T>(&bytes, &e)))
}

/// Explains a body that did not deserialise, naming the field at fault
/// (docs/threat-model.md, A8): serde_json's own message for a wrong type says
/// what was expected but not where ("invalid type: integer `5`, expected a
/// string").
fn body_error<T: for<'de> Deserialize<'de>>(bytes: &[u8], e: &serde_json::Error) -> ManageError {
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return ManageError::Invalid(format!("the request body is not valid JSON: {e}"));
    };
    // Try each field alone: the first one that fails on its own (other
    // than for the fields it leaves out) is the one at fault.
    if let Value::Object(fields) = &value {
        for (name, v) in fields {
            let mut alone = serde_json::Map::new();
            alone.insert(name.clone(), v.clone());
            if let Err(err) = T::deserialize(Value::Object(alone)) {
                let msg = err.to_string();
                if !msg.starts_with("missing field") {
                    return ManageError::Invalid(format!("{name}: {msg}"));
                }
            }
        }
    }
    ManageError::Invalid(format!("invalid request body: {e}"))
}

/// `POST /v1/keys` (docs/api.md#post-v1keys).
async fn create_key(State(admin): State<Arc<Admin>>, req: Request) -> Answer {
    let actor = actor(&req)?;
    let body: CreateKeyRequest = read_json(req).await?;
    let issued = admin.manager().create_key(&actor, body).await?;
    Ok(json_response(StatusCode::CREATED, &issued))
}

/// `GET /v1/keys` (docs/api.md#get-v1keys): every key, or one page when
/// any of `limit`, `offset`, `search`, `status` is given.
async fn list_keys(
    State(admin): State<Arc<Admin>>,
    q: Result<Query<KeyListQuery>, QueryRejection>,
    req: Request,
) -> Answer {
    let q = query(q)?;
    let actor = actor(&req)?;
    if q.is_empty() {
        let list = admin.manager().list_keys(&actor).await?;
        return Ok(json_response(StatusCode::OK, &list));
    }
    let page = admin.manager().list_keys_page(&actor, &q).await?;
    Ok(json_response(StatusCode::OK, &page))
}

/// A key id in a path; one that is not `key_…` is no key's (404).
fn key_id(id: &str) -> Result<KeyId, ApiError> {
    KeyId::parse(id).ok_or(ApiError(ManageError::NotFound("key")))
}

/// `GET /v1/keys/{id}` (docs/api.md#get-v1keysid).
async fn get_key(State(admin): State<Arc<Admin>>, Path(id): Path<String>, req: Request) -> Answer {
    let k = admin
        .manager()
        .get_key(&actor(&req)?, &key_id(&id)?)
        .await?;
    Ok(json_response(StatusCode::OK, &k))
}

/// `GET /v1/keys/{id}/limits` (docs/api.md#get-v1keysidlimits).
async fn key_limits(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Answer {
    let limits = admin
        .manager()
        .key_limits(&actor(&req)?, &key_id(&id)?)
        .await?;
    Ok(json_response(StatusCode::OK, &limits))
}

/// `DELETE /v1/keys/{id}` (docs/api.md#delete-v1keysid).
async fn revoke_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Answer {
    let revoked = admin
        .manager()
        .revoke_key(&actor(&req)?, &key_id(&id)?)
        .await?;
    Ok(json_response(StatusCode::OK, &revoked))
}

/// `POST /v1/keys/{id}/rotate` (docs/api.md#post-v1keysidrotate).
async fn rotate_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Answer {
    let actor = actor(&req)?;
    // The body is optional, however it is framed (length or chunked).
    let body: RotateKeyRequest = read_optional_json(req).await?.unwrap_or_default();
    let issued = admin
        .manager()
        .rotate_key(&actor, &key_id(&id)?, body)
        .await?;
    Ok(json_response(StatusCode::OK, &issued))
}

/// `POST /v1/provider-keys` (docs/api.md#post-v1provider-keys). The secret
/// never appears in a response.
async fn add_provider_key(State(admin): State<Arc<Admin>>, req: Request) -> Answer {
    let actor = actor(&req)?;
    let body: AddProviderKeyRequest = read_json(req).await?;
    let rec = admin.manager().add_provider_key(&actor, body).await?;
    Ok(json_response(StatusCode::CREATED, &rec))
}

/// `GET /v1/provider-keys` (docs/api.md#get-v1provider-keys).
async fn list_provider_keys(State(admin): State<Arc<Admin>>, req: Request) -> Answer {
    let list = admin.manager().list_provider_keys(&actor(&req)?).await?;
    Ok(json_response(StatusCode::OK, &list))
}

/// `DELETE /v1/provider-keys/{id}` (docs/api.md#delete-v1provider-keysid).
async fn remove_provider_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Answer {
    let pk = ProviderKeyId::parse(&id).ok_or(ApiError(ManageError::NotFound("provider key")))?;
    let removed = admin
        .manager()
        .remove_provider_key(&actor(&req)?, &pk)
        .await?;
    Ok(json_response(StatusCode::OK, &removed))
}

/// `GET /v1/projects` (docs/api.md#get-v1projects).
async fn list_projects(State(admin): State<Arc<Admin>>, req: Request) -> Answer {
    let list = admin.manager().list_projects(&actor(&req)?).await?;
    Ok(json_response(StatusCode::OK, &list))
}

/// A query string that does not parse is a JSON error (docs/api.md#errors)
/// naming the parameter, not axum's plain-text rejection.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        let text = e.body_text();
        let why = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text);
        ApiError(ManageError::Invalid(format!("query: {why}")))
    })
}

/// `GET /v1/usage` (docs/api.md#get-v1usage).
async fn usage(
    State(admin): State<Arc<Admin>>,
    q: Result<Query<UsageQuery>, QueryRejection>,
    req: Request,
) -> Answer {
    let q = query(q)?;
    let list = admin.manager().usage(&actor(&req)?, q).await?;
    Ok(json_response(StatusCode::OK, &list))
}

/// `GET /v1/audit` (docs/api.md#get-v1audit).
async fn audit(
    State(admin): State<Arc<Admin>>,
    q: Result<Query<AuditQuery>, QueryRejection>,
    req: Request,
) -> Answer {
    let q = query(q)?;
    let list = admin.manager().audit_entries(&actor(&req)?, q).await?;
    Ok(json_response(StatusCode::OK, &list))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when every dependency answers (the store, and Redis
/// where configured), else 503 naming each one's state
/// (docs/api.md#get-readyz). Reasons go to the log, not to the client.
async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let outcomes = admin.context().readiness().await;
    let ready = outcomes.iter().all(|o| o.ok);
    let checks: serde_json::Map<String, Value> = outcomes
        .iter()
        .map(|o| {
            let state = if o.ok { "ok" } else { "unavailable" };
            (o.name.to_owned(), Value::from(state))
        })
        .collect();
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    json_response(status, &json!({"status": word, "checks": checks}))
}

/// `/metrics` when the configuration protects it: a key with `usage:read`.
async fn protected_metrics(State(admin): State<Arc<Admin>>, req: Request) -> Answer {
    actor(&req)?.require(Permission::UsageRead)?;
    Ok(metrics(State(admin)).await)
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let mut r = Response::new(Body::from(admin.context().metrics().render()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"detail": "no such route", "error": {"type": "not_found_error", "code": "not_found", "message": "no such route"}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A management call that found the store or Redis away says when to
    /// retry, as the proxy's 503s do; other errors do not.
    #[test]
    fn boundary_unavailable_dependencies_answer_503_with_retry_after() {
        for e in [
            ManageError::StoreUnavailable,
            ManageError::LimiterUnavailable,
        ] {
            let r = ApiError(e).into_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers().get(http::header::RETRY_AFTER).unwrap(), "1");
        }
        let r = ApiError(ManageError::Internal).into_response();
        assert!(r.headers().get(http::header::RETRY_AFTER).is_none());
    }
}
