//! The management API of docs/api.md as an axum `Router` an app can nest.
//!
//! Every route is authenticated except `/healthz` (and `/metrics` unless
//! protected): authentication runs as a layer over the whole router,
//! fallback included, so unknown paths, aliases, `HEAD` and `OPTIONS` all
//! answer 401 without a key (docs/threat-model.md, A10).

use std::sync::Arc;
use std::time::Duration;

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
use serde::Deserialize;
use serde_json::{Value, json};
use vault_core::crypto::ProviderSecret;
use vault_core::denial::Denial;
use vault_core::key::{KeyEnv, KeyId, ProviderKeyId};
use vault_core::policy::{Budget, EndpointRule, ModelGlob, Policy, RateLimit};
use vault_core::provider::Provider;
use vault_core::record::{KeyStatus, UsageFilter};
use vault_core::scope::Permission;

use crate::admin::ops::{Actor, Admin, AdminError, NewKey};
use crate::admin::views;
use crate::response::denial_response;

/// Largest management request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Options for [`admin_router`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminOptions {
    /// Require a key with `usage:read` for `/metrics`.
    pub protect_metrics: bool,
}

/// The management API: `/v1/keys…`, `/v1/provider-keys…`, `/v1/usage`,
/// `/v1/audit`, `/healthz`, `/metrics`.
pub fn admin_router(admin: Admin, options: AdminOptions) -> Router {
    let admin = Arc::new(admin);
    let authed = Router::new()
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", get(get_key).delete(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route(
            "/v1/provider-keys",
            post(add_provider_key).get(list_provider_keys),
        )
        .route(
            "/v1/provider-keys/{id}",
            axum::routing::delete(remove_provider_key),
        )
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
    let open = Router::new().route("/healthz", get(healthz));
    let open = if options.protect_metrics {
        open
    } else {
        open.route("/metrics", get(metrics))
    };
    open.with_state(admin).merge(authed)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn denial(d: &Denial) -> Response {
    denial_response(d).map(Body::new)
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let kind = match self.status() {
            400 => "invalid_request_error",
            402 => "insufficient_quota",
            413 => "request_too_large",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            _ => "api_error",
        };
        json_response(
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &json!({"detail": message, "error": {"type": kind, "code": self.code(), "message": message}}),
        )
    }
}

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
            return denial(&Denial::Internal);
        }
    }
    req.extensions_mut().insert(Actor::Key(record));
    next.run(req).await
}

/// The caller, as the authentication layer resolved it; fails closed.
fn actor(req: &Request) -> Result<Actor, AdminError> {
    req.extensions()
        .get::<Actor>()
        .cloned()
        .ok_or(AdminError::Internal)
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request) -> Result<T, AdminError> {
    read_optional_json(req)
        .await?
        .ok_or_else(|| AdminError::Invalid("a JSON request body is required".to_owned()))
}

/// Reads a bounded JSON body; `None` when the body is empty.
async fn read_optional_json<T: for<'de> Deserialize<'de>>(
    req: Request,
) -> Result<Option<T>, AdminError> {
    let body = req.into_body();
    let bytes: Bytes = match Limited::new(body, MAX_ADMIN_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(AdminError::TooLarge(format!(
                "the request body is larger than {MAX_ADMIN_BODY} bytes"
            )));
        }
        Err(_) => {
            return Err(AdminError::Invalid(
                "the request body could not be read".to_owned(),
            ));
        }
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| body_error::<T>(&bytes, &e))
}

/// Explains a body that did not deserialise, naming the field at fault
/// (docs/threat-model.md, A8): serde_json's own message for a wrong type says
/// what was expected but not where ("invalid type: integer `5`, expected a
/// string").
fn body_error<T: for<'de> Deserialize<'de>>(bytes: &[u8], e: &serde_json::Error) -> AdminError {
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return AdminError::Invalid(format!("the request body is not valid JSON: {e}"));
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
                    return AdminError::Invalid(format!("{name}: {msg}"));
                }
            }
        }
    }
    AdminError::Invalid(format!("invalid request body: {e}"))
}

/// `POST /v1/keys`: unknown fields (`spend`, `status`, `id`, `created_at`…)
/// are refused by name (docs/threat-model.md, A8).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    name: Option<String>,
    #[serde(alias = "scopes")]
    permissions: Option<Vec<String>>,
    project: Option<String>,
    env: Option<KeyEnv>,
    plan: Option<String>,
    ttl: Option<String>,
    parent: Option<String>,
    provider_keys: Option<Vec<String>>,
    providers: Option<Vec<Provider>>,
    endpoints: Option<Vec<EndpointRule>>,
    models: Option<Vec<ModelGlob>>,
    budget: Option<Budget>,
    rate_limit: Option<RateLimit>,
    max_request_chars: Option<u64>,
    max_parallel: Option<u32>,
    shadow: Option<bool>,
}

/// Parses `90s`, `5m`, `1h`, `24h`, `7d` (the policy files' TTL syntax).
fn parse_duration(s: &str) -> Option<Duration> {
    vault_core::policy::parse_ttl(s).ok()
}

async fn create_key(State(admin): State<Arc<Admin>>, req: Request) -> Result<Response, AdminError> {
    let actor = actor(&req)?;
    let b: CreateKeyBody = read_json(req).await?;
    let ttl = match b.ttl.as_deref() {
        Some(t) => Some(parse_duration(t).ok_or_else(|| {
            AdminError::Invalid("ttl: expected a duration like 90s, 5m, 1h, 24h or 7d".to_owned())
        })?),
        None => None,
    };
    let parent = match b.parent.as_deref() {
        Some(p) => Some(KeyId::parse(p).ok_or_else(|| {
            AdminError::Invalid("parent: expected a key id like key_…".to_owned())
        })?),
        None => None,
    };
    let mut provider_keys = Vec::new();
    for pk in b.provider_keys.unwrap_or_default() {
        provider_keys.push(ProviderKeyId::parse(&pk).ok_or_else(|| {
            AdminError::Invalid("provider_keys: expected ids like pk_…".to_owned())
        })?);
    }
    let new = NewKey {
        name: b.name.unwrap_or_default(),
        project: b.project,
        scopes: b.permissions.unwrap_or_default(),
        env: b.env,
        plan: b.plan,
        policy: Policy {
            providers: b.providers,
            endpoints: b.endpoints,
            models: b.models,
            budget: b.budget,
            rate_limit: b.rate_limit,
            max_request_chars: b.max_request_chars,
            max_parallel: b.max_parallel,
            shadow: b.shadow.unwrap_or(false),
        },
        ttl,
        parent,
        provider_keys,
    };
    let issued = admin.create_key(&actor, new).await?;
    let mut v = views::key(&issued.record, admin.context().clock().now());
    v["key"] = Value::String(issued.key.expose_secret().to_owned());
    Ok(json_response(StatusCode::CREATED, &v))
}

async fn list_keys(State(admin): State<Arc<Admin>>, req: Request) -> Result<Response, AdminError> {
    let keys = admin.list_keys(&actor(&req)?).await?;
    let now = admin.context().clock().now();
    let data: Vec<Value> = keys.iter().map(|k| views::key(k, now)).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

fn key_id(id: &str) -> Result<KeyId, AdminError> {
    KeyId::parse(id).ok_or(AdminError::NotFound("key"))
}

async fn get_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let k = admin.get_key(&actor(&req)?, &key_id(&id)?).await?;
    Ok(json_response(
        StatusCode::OK,
        &views::key(&k, admin.context().clock().now()),
    ))
}

async fn revoke_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let revoked = admin.revoke_key(&actor(&req)?, &key_id(&id)?).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "status": "revoked", "revoked": revoked}),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    grace: Option<String>,
    grace_seconds: Option<u64>,
}

async fn rotate_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let actor = actor(&req)?;
    // The body is optional, however it is framed (length or chunked).
    let b: RotateBody = read_optional_json(req).await?.unwrap_or_default();
    let grace = match (b.grace.as_deref(), b.grace_seconds) {
        (Some(_), Some(_)) => {
            return Err(AdminError::Invalid(
                "grace: give grace or grace_seconds, not both".to_owned(),
            ));
        }
        (Some(g), None) => Some(parse_duration(g).ok_or_else(|| {
            AdminError::Invalid("grace: expected a duration like 60s or 1h".to_owned())
        })?),
        (None, Some(s)) => Some(Duration::from_secs(s)),
        (None, None) => None,
    };
    let issued = admin.rotate_key(&actor, &key_id(&id)?, grace).await?;
    let mut v = views::key(&issued.record, admin.context().clock().now());
    v["key"] = Value::String(issued.key.expose_secret().to_owned());
    Ok(json_response(StatusCode::OK, &v))
}

/// `POST /v1/provider-keys`. The secret never appears in a response.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddProviderKeyBody {
    provider: String,
    api_key: String,
    name: Option<String>,
    project: Option<String>,
}

async fn add_provider_key(
    State(admin): State<Arc<Admin>>,
    req: Request,
) -> Result<Response, AdminError> {
    let actor = actor(&req)?;
    let b: AddProviderKeyBody = read_json(req).await?;
    let provider: Provider =
        b.provider
            .parse()
            .map_err(|e: vault_core::provider::UnknownProvider| {
                AdminError::Invalid(format!("provider: {e}"))
            })?;
    let secret = ProviderSecret::new(b.api_key);
    let rec = admin
        .add_provider_key(
            &actor,
            provider,
            b.name.unwrap_or_default(),
            b.project,
            secret,
        )
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &views::provider_key(&rec),
    ))
}

async fn list_provider_keys(
    State(admin): State<Arc<Admin>>,
    req: Request,
) -> Result<Response, AdminError> {
    let list = admin.list_provider_keys(&actor(&req)?).await?;
    let data: Vec<Value> = list.iter().map(views::provider_key).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

async fn remove_provider_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let pk = ProviderKeyId::parse(&id).ok_or(AdminError::NotFound("provider key"))?;
    admin.remove_provider_key(&actor(&req)?, &pk).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "deleted": true}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    key_id: Option<String>,
    since: Option<i64>,
    limit: Option<usize>,
}

/// A query string that does not parse is a JSON error (docs/api.md#errors)
/// naming the parameter, not axum's plain-text rejection.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, AdminError> {
    q.map(|Query(q)| q).map_err(|e| {
        let text = e.body_text();
        let why = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text);
        AdminError::Invalid(format!("query: {why}"))
    })
}

async fn usage(
    State(admin): State<Arc<Admin>>,
    q: Result<Query<UsageQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, AdminError> {
    let q = query(q)?;
    let filter = UsageFilter {
        project: None,
        key_id: match q.key_id.as_deref() {
            Some(k) => Some(
                KeyId::parse(k)
                    .ok_or_else(|| AdminError::Invalid("key_id: expected key_…".to_owned()))?,
            ),
            None => None,
        },
        since: q.since.map(vault_core::clock::UnixMillis),
        limit: Some(q.limit.unwrap_or(1000).min(10_000)),
    };
    let records = admin.usage(&actor(&req)?, filter).await?;
    Ok(json_response(StatusCode::OK, &views::usage(&records)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(
    State(admin): State<Arc<Admin>>,
    q: Result<Query<AuditQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, AdminError> {
    let q = query(q)?;
    let entries = admin
        .audit_entries(&actor(&req)?, q.limit.unwrap_or(100).min(10_000))
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": entries}),
    ))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// `/metrics` when the configuration protects it: a key with `usage:read`.
async fn protected_metrics(
    State(admin): State<Arc<Admin>>,
    req: Request,
) -> Result<Response, AdminError> {
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
