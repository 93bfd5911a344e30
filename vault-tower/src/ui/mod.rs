//! The dashboard (docs/dashboard.md): server-rendered pages under `/ui/`
//! for people who hand out model access — **API Keys**, **Vault**,
//! **Usage**, **Audit** — as an axum `Router` that `vaultgate serve`
//! merges beside the management API.
//!
//! It is another client of [`vault_core::manage::Manager`], exactly as the
//! `/v1/*` routes are: a signed-in browser acts as the key it signed in
//! with (`Actor::Key`), so permissions, project checks, validation errors
//! and audit entries are the API's. Its own parts are the web ones:
//! - `session`: sessions (256-bit ids kept hashed, in the shared store) and
//!   the failed-sign-in limiter;
//! - `guard`: security headers, the session check on every request, the
//!   exact `Origin` and CSRF token on every `POST`;
//! - `layout`: the page shell; `signin`, `keys`, `key_form`, `vault_page`, `usage`,
//!   `audit`: the pages (`limits`: a key's live limits on its detail page;
//!   `project`: the project switcher); `assets`: the stylesheet and script, embedded.
//!
//! No template or handler writes a secret into a page except the one
//! response that issues a key (create, rotate), which shows it once.

mod assets;
mod audit;
mod guard;
mod key_form;
mod keys;
mod layout;
mod limits;
mod project;
mod session;
mod signin;
mod usage;
mod vault_page;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use vault_core::store::{MemorySessions, SessionStore};

pub use guard::CSP;
pub use session::{ABSOLUTE_TIMEOUT_MS, IDLE_TIMEOUT_MS, SIGN_IN_FAILURES_ALLOWED};

use crate::admin::Admin;

/// How the dashboard is served.
#[derive(Clone, Default)]
pub struct UiOptions {
    /// The dashboard's public origin, e.g. `https://gate.example.com`, when
    /// it is not `http://` + the request's `Host` (behind a TLS-terminating
    /// proxy). A `POST` must come from exactly this origin; an `https`
    /// origin also marks the session cookie `Secure`.
    pub origin: Option<String>,
    /// Where sessions and failed sign-ins are kept: the store every replica
    /// shares (`SqliteStore`, `PostgresStore`); this process's memory when
    /// `None` (docs/dashboard.md#sessions).
    pub sessions: Option<Arc<dyn SessionStore>>,
}

impl std::fmt::Debug for UiOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UiOptions")
            .field("origin", &self.origin)
            .field("shared_sessions", &self.sessions.is_some())
            .finish()
    }
}

/// What the dashboard's handlers share.
#[derive(Debug)]
pub(crate) struct Ui {
    admin: Admin,
    sessions: session::Sessions,
    options: UiOptions,
}

impl Ui {
    /// Whether the session cookie is marked `Secure`.
    fn secure(&self) -> bool {
        self.options
            .origin
            .as_deref()
            .is_some_and(|o| o.starts_with("https://"))
    }
}

/// The dashboard's routes: `/` (a redirect to `/ui/`) and everything under
/// `/ui`. Merge it into the router that serves the management API.
pub fn ui_router(admin: Admin, options: UiOptions) -> Router {
    let store = options
        .sessions
        .clone()
        .unwrap_or_else(|| Arc::new(MemorySessions::default()));
    let ui = Arc::new(Ui {
        admin,
        sessions: session::Sessions::new(store),
        options,
    });
    let pages = Router::new()
        .route("/ui", get(to_home))
        .route("/ui/", get(signin::home))
        .route("/ui/sign-in", get(signin::form).post(signin::sign_in))
        .route("/ui/sign-out", post(signin::sign_out))
        .route("/ui/project", post(project::switch))
        .route("/ui/keys", get(keys::list).post(key_form::create))
        .route("/ui/keys/new", get(key_form::new_form))
        .route("/ui/keys/{id}", get(keys::detail))
        .route("/ui/keys/{id}/revoke", post(keys::revoke))
        .route("/ui/keys/{id}/rotate", post(keys::rotate))
        .route("/ui/vault", get(vault_page::list).post(vault_page::add))
        .route("/ui/vault/{id}/remove", post(vault_page::remove))
        .route("/ui/vault/proxy-key", post(vault_page::proxy_key))
        .route("/ui/usage", get(usage::show))
        .route("/ui/usage.csv", get(usage::csv))
        .route("/ui/audit", get(audit::show))
        .route("/ui/assets/{file}", get(assets::serve))
        .route("/ui/{*rest}", get(not_found).post(not_found))
        .layer(middleware::from_fn(guard::security_headers))
        .with_state(ui);
    Router::new().route("/", get(to_home)).merge(pages)
}

async fn to_home() -> Redirect {
    Redirect::to("/ui/")
}

async fn not_found() -> Response {
    layout::message_page(
        http::StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
    )
    .into_response()
}
