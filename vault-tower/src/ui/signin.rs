//! **Sign in** and **Sign out** (docs/dashboard.md#signing-in).
//!
//! A key signs in if it is known, its chain active, and it holds
//! `keys:manage`, `usage:read` or `audit:read`. Every refusal is counted
//! against the client's address (429 after ten a minute) and written to the
//! audit log as `request.denied` with `route: "/ui/sign-in"`. The key itself
//! lives only in this request: the session keeps its hash.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::StatusCode;
use http::header::{HeaderValue, SET_COOKIE};
use maud::html;
use vault_core::audit::{AuditEvent, AuditKind};
use vault_core::record::KeyStatus;

use super::Ui;
use super::guard::{
    COOKIE_NAME, Posted, Signed, client_ip, dashboard_scope, forbidden_form, read_form,
    same_origin, session_cookie, store_unavailable,
};
use super::layout::{Nav, home as home_path, html_response, page};

/// `GET /ui/`: the first page the key may open, or the sign-in form.
pub(crate) async fn home(signed: Result<Signed, Response>) -> Redirect {
    match signed {
        Ok(s) => Redirect::to(home_path(&s)),
        Err(_) => Redirect::to("/ui/sign-in"),
    }
}

/// The sign-in page, with an optional message.
fn sign_in_page(status: StatusCode, message: Option<&str>) -> Response {
    html_response(
        status,
        page(
            "Sign in",
            None,
            Nav::None,
            html! {
                @if let Some(m) = message { p.notice role="alert" { (m) } }
                form.card method="post" action="/ui/sign-in" {
                    div.field {
                        label for="api_key" { "API key" }
                        input #api_key name="api_key" type="password" required autocomplete="off" spellcheck="false"
                            aria-describedby="api_key-hint";
                        small #api_key-hint { "A key with keys:manage, usage:read or audit:read. It is not stored in your browser." }
                    }
                    button.primary type="submit" { "Sign in" }
                }
            },
        ),
    )
}

/// `GET /ui/sign-in`.
pub(crate) async fn form() -> Response {
    sign_in_page(StatusCode::OK, None)
}

/// Why a sign-in was refused.
enum Refused {
    /// Not a key, an unknown one, or a rotated-out secret past its grace.
    Invalid,
    /// Revoked or expired (the key or an ancestor).
    Inactive,
    /// Only `chat:write`.
    NoDashboardScope,
}

impl Refused {
    fn reason(&self) -> &'static str {
        match self {
            Refused::Invalid => "invalid_api_key",
            Refused::Inactive => "key_inactive",
            Refused::NoDashboardScope => "permission_denied",
        }
    }
}

/// `POST /ui/sign-in`.
pub(crate) async fn sign_in(State(ui): State<Arc<Ui>>, req: Request) -> Response {
    let ip = client_ip(req.extensions());
    let now = ui.admin.context().clock().now();
    if !same_origin(&ui, req.headers()) {
        return forbidden_form();
    }
    match ui.sessions.sign_ins_blocked(ip, now).await {
        Ok(false) => {}
        Ok(true) => {
            return sign_in_page(
                StatusCode::TOO_MANY_REQUESTS,
                Some("Too many failed sign-ins from this address. Wait a minute and try again."),
            );
        }
        Err(e) => return store_unavailable(&e),
    }
    // A new sign-in ends the session this browser had (no fixation).
    if let Some(old) = session_cookie(req.headers())
        && let Err(e) = ui.sessions.close(&old).await
    {
        return store_unavailable(&e);
    }
    let fields = match read_form(req.into_body()).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    match check_key(&ui, fields.get("api_key").unwrap_or_default()).await {
        Ok(hash) => open_session(&ui, hash).await,
        Err((refused, target)) => {
            if let Err(e) = ui.sessions.sign_in_failed(ip, now).await {
                tracing::warn!(error = %e, "a failed sign-in could not be counted");
            }
            audit_refusal(&ui, &refused, target, ip).await;
            let (status, message) = match refused {
                Refused::NoDashboardScope => (
                    StatusCode::FORBIDDEN,
                    "This key can only make proxied calls (chat:write). Sign in with a key that has keys:manage, usage:read or audit:read.",
                ),
                Refused::Inactive => (StatusCode::UNAUTHORIZED, "This key is revoked or expired."),
                Refused::Invalid => (StatusCode::UNAUTHORIZED, "This API key is not valid."),
            };
            sign_in_page(status, Some(message))
        }
    }
}
/// The key a refused sign-in presented, when it is one: its id and project
/// (so the project's `audit:read` keys see the attempt).
type Target = Option<(String, String)>;

/// The key's hash if it may sign in; otherwise why not and, when known,
/// which key it was.
async fn check_key(
    ui: &Ui,
    presented: &str,
) -> Result<vault_core::key::KeyHash, (Refused, Target)> {
    let ctx = ui.admin.context();
    let hash = ctx
        .key_format()
        .parse(presented)
        .map_err(|_| (Refused::Invalid, None))?
        .hash();
    let record = match ctx.key_by_hash(&hash).await {
        Ok(Some(r)) => r,
        _ => return Err((Refused::Invalid, None)),
    };
    let id = Some((record.id.to_string(), record.project.clone()));
    let now = ctx.clock().now();
    if record.hash != hash && record.previous_valid_until.is_none_or(|u| now >= u) {
        return Err((Refused::Invalid, id));
    }
    let chain = ctx
        .chain(record.clone())
        .await
        .map_err(|_| (Refused::Inactive, id.clone()))?;
    if chain.iter().any(|k| k.status_at(now) != KeyStatus::Active) {
        return Err((Refused::Inactive, id));
    }
    if !dashboard_scope(&record) {
        return Err((Refused::NoDashboardScope, id));
    }
    Ok(hash)
}

/// Writes the refusal to the audit log (never the presented text).
async fn audit_refusal(ui: &Ui, refused: &Refused, target: Target, ip: IpAddr) {
    let Some(log) = ui.admin.context().audit().cloned() else {
        return;
    };
    let mut event = AuditEvent::new(AuditKind::RequestDenied);
    if let Some((id, project)) = target {
        event.target = Some(id);
        event.project = Some(project);
    }
    event.detail = serde_json::json!({
        "route": "/ui/sign-in",
        "code": refused.reason(),
        "client": ip.to_string(),
    });
    if log.append(event).await.is_err() {
        tracing::error!("writing a refused dashboard sign-in to the audit log failed");
        ui.admin
            .context()
            .metrics()
            .audit_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A new session for `hash` and its cookie; then the first page.
async fn open_session(ui: &Ui, hash: vault_core::key::KeyHash) -> Response {
    let now = ui.admin.context().clock().now();
    let id = match ui.sessions.open(hash, now).await {
        Ok(id) => id,
        Err(e) => return store_unavailable(&e),
    };
    let secure = if ui.secure() { "; Secure" } else { "" };
    let cookie = format!("{COOKIE_NAME}={id}; Path=/ui; HttpOnly; SameSite=Strict{secure}");
    let mut r = Redirect::to("/ui/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

/// `POST /ui/sign-out`: ends the session and clears the cookie.
pub(crate) async fn sign_out(State(ui): State<Arc<Ui>>, posted: Posted) -> Response {
    if let Err(e) = ui.sessions.close(&posted.signed.cookie).await {
        return store_unavailable(&e);
    }
    let secure = if ui.secure() { "; Secure" } else { "" };
    let mut r = Redirect::to("/ui/sign-in").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE_NAME}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
    )) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}
