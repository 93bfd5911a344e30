//! What every dashboard request passes (docs/dashboard.md#security): the
//! response headers, the session check (the key it was opened with is
//! looked up again, through the proxy's cache, on every request), and for
//! every `POST` the exact `Origin` and the session's CSRF token.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, COOKIE, HOST, ORIGIN};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use vault_core::manage::Actor;
use vault_core::record::{KeyRecord, KeyStatus};
use vault_core::scope::Permission;

use super::Ui;
use super::layout::message_page;
use super::session::{Session, csrf_matches};

/// The session cookie's name.
pub(crate) const COOKIE_NAME: &str = "vg_session";
/// Largest dashboard form body.
const MAX_FORM_BODY: usize = 64 * 1024;

/// The Content-Security-Policy of every dashboard response: our own
/// scripts and styles only, no plugins, never framed.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Adds the security headers to every response under `/ui`.
pub(crate) async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin`, not `no-referrer`: with `no-referrer` Chromium sends
    // `Origin: null` on same-origin form posts, which the Origin check
    // must refuse (docs/dashboard.md#csrf).
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// The client's address (the peer the server loop recorded); the
/// unspecified address when unknown (one shared bucket, failing safe).
pub(crate) fn client_ip(parts_ext: &http::Extensions) -> IpAddr {
    parts_ext
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// The session cookie's value, if the request carries one.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == COOKIE_NAME)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether the request's `Origin` is exactly the dashboard's own. A missing
/// `Origin` and `Origin: null` are foreign.
pub(crate) fn same_origin(ui: &Ui, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    match &ui.options.origin {
        Some(own) => origin == own.trim_end_matches('/'),
        None => headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|host| origin == format!("http://{host}")),
    }
}

/// A signed-in caller: the session, and the key it was opened with, whose
/// whole chain is active as of this request.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    /// The session (its CSRF token goes into every form).
    pub(crate) session: Session,
    /// The cookie's value, to end the session.
    pub(crate) cookie: String,
    /// The key, as the manager's caller.
    pub(crate) actor: Actor,
    /// The key's record.
    pub(crate) record: Arc<KeyRecord>,
    /// For an organisation-wide key, the projects the switcher offers;
    /// empty for a project's key (docs/dashboard.md#projects).
    pub(crate) projects: Vec<String>,
}

impl Signed {
    /// Whether the key holds `perm`.
    pub(crate) fn may(&self, perm: Permission) -> bool {
        self.record.scopes.allows(perm)
    }

    /// The CSRF token for this session's forms.
    pub(crate) fn csrf(&self) -> &str {
        &self.session.csrf
    }

    /// Whether the key sees every project (and the pages show the project
    /// switcher).
    pub(crate) fn org_wide(&self) -> bool {
        self.actor.project().is_none()
    }

    /// The project the pages show: the one chosen with the switcher, else
    /// `None` (every project the key sees).
    pub(crate) fn viewing(&self) -> Option<&str> {
        self.session.project.as_deref()
    }
}

/// 503 with a page saying sessions cannot be read or written now (the
/// store is down); the browser keeps its cookie and may retry.
pub(crate) fn store_unavailable(e: &vault_core::store::StoreError) -> Response {
    tracing::warn!(error = %e, "dashboard sessions are unavailable");
    let mut r = message_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again shortly",
        "The dashboard cannot reach its store right now. Nothing was changed.",
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Why a request is not signed in: the browser goes to the sign-in page.
fn to_sign_in() -> Response {
    Redirect::to("/ui/sign-in").into_response()
}

impl FromRequestParts<Arc<Ui>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Response> {
        let cookie = session_cookie(&parts.headers).ok_or_else(to_sign_in)?;
        let ctx = ui.admin.context();
        let now = ctx.clock().now();
        let session = ui
            .sessions
            .touch(&cookie, now)
            .await
            .map_err(|e| store_unavailable(&e))?
            .ok_or_else(to_sign_in)?;
        match signing_key(ui, &session).await {
            Some(record) => {
                let actor = Actor::Key(record.clone());
                let projects = match actor.project() {
                    Some(_) => Vec::new(),
                    None => ui
                        .admin
                        .manager()
                        .list_projects(&actor)
                        .await
                        .map(|l| l.data)
                        .unwrap_or_default(),
                };
                Ok(Signed {
                    session,
                    cookie,
                    actor,
                    record,
                    projects,
                })
            }
            None => {
                ui.sessions
                    .close(&cookie)
                    .await
                    .map_err(|e| store_unavailable(&e))?;
                Err(to_sign_in())
            }
        }
    }
}

/// The session's key, if it still may use the dashboard: found by its hash
/// through the proxy's cache (so a revocation anywhere is seen within the
/// cache's lifetime, under a second), its rotated-out secret inside its
/// grace period, every key of its chain active, and holding a dashboard
/// scope.
async fn signing_key(ui: &Ui, session: &Session) -> Option<Arc<KeyRecord>> {
    let ctx = ui.admin.context();
    let record = ctx.key_by_hash(&session.key_hash).await.ok().flatten()?;
    let now = ctx.clock().now();
    if record.hash != session.key_hash
        && record.previous_valid_until.is_none_or(|until| now >= until)
    {
        return None;
    }
    let chain = ctx.chain(record.clone()).await.ok()?;
    if chain.iter().any(|k| k.status_at(now) != KeyStatus::Active) {
        return None;
    }
    dashboard_scope(&record).then_some(record)
}

/// Whether a key may sign in: it holds `keys:manage`, `usage:read` or
/// `audit:read` (`*` holds all three).
pub(crate) fn dashboard_scope(record: &KeyRecord) -> bool {
    record.scopes.allows_any(&Permission::MANAGEMENT)
}

/// A form's fields, in order; a field may repeat (checkboxes). A form may
/// carry a secret (the sign-in key, a provider key): `Debug` shows only the
/// names, and the values are zeroed when it is dropped.
#[derive(Default)]
pub(crate) struct Fields(Vec<(String, String)>);

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Drop for Fields {
    fn drop(&mut self) {
        for (_, v) in &mut self.0 {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

impl Fields {
    /// Parses an `application/x-www-form-urlencoded` body.
    pub(crate) fn parse(body: &[u8]) -> Fields {
        Fields(form_urlencoded::parse(body).into_owned().collect())
    }

    /// The first value of `name`, trimmed; `None` when absent or blank.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Every non-blank value of `name`.
    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

/// A state-changing request that passed every check: signed in, from the
/// dashboard's own origin, carrying the session's CSRF token.
#[derive(Debug)]
pub(crate) struct Posted {
    /// The caller.
    pub(crate) signed: Signed,
    /// The form.
    pub(crate) fields: Fields,
}

/// 403 with a page saying the form was refused.
pub(crate) fn forbidden_form() -> Response {
    message_page(
        StatusCode::FORBIDDEN,
        "Request refused",
        "This form did not come from this dashboard's page (origin or form token mismatch). Nothing was changed.",
    )
}

impl FromRequest<Arc<Ui>> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, ui: &Arc<Ui>) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        if !same_origin(ui, &parts.headers) {
            return Err(forbidden_form());
        }
        let signed = Signed::from_request_parts(&mut parts, ui).await?;
        let fields = read_form(body).await?;
        match fields.get("csrf") {
            Some(t) if csrf_matches(&signed.session, t) => Ok(Posted { signed, fields }),
            _ => Err(forbidden_form()),
        }
    }
}

/// Reads a bounded form body.
pub(crate) async fn read_form(body: axum::body::Body) -> Result<Fields, Response> {
    let bytes: Bytes = Limited::new(body, MAX_FORM_BODY)
        .collect()
        .await
        .map_err(|_| {
            message_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Form too large",
                "The form could not be read (at most 64 KiB).",
            )
        })?
        .to_bytes();
    Ok(Fields::parse(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_form_fields_repeat_and_blank_is_absent() {
        let f = Fields::parse(b"scopes=chat%3Awrite&scopes=usage%3Aread&name=+&ttl=1h");
        assert_eq!(f.all("scopes"), ["chat:write", "usage:read"]);
        assert_eq!(f.get("name"), None);
        assert_eq!(f.get("ttl"), Some("1h"));
    }

    #[test]
    fn leak_form_debug_shows_names_only() {
        let f = Fields::parse(b"api_key=vpx_live_secretsecretsecret1234&name=x");
        let shown = format!("{f:?}");
        assert!(
            shown.contains("api_key") && !shown.contains("secret"),
            "{shown}"
        );
    }

    #[test]
    fn corruption_only_a_well_formed_session_cookie_is_read() {
        let mut h = HeaderMap::new();
        let id = "a".repeat(64);
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("x=1; {COOKIE_NAME}={id}")).unwrap(),
        );
        assert_eq!(session_cookie(&h), Some(id));
        h.insert(COOKIE, HeaderValue::from_static("vg_session=../../etc"));
        assert_eq!(session_cookie(&h), None);
    }
}
