//! The project switcher (docs/dashboard.md#projects): an
//! organisation-wide key chooses which project the pages show, kept in its
//! session. A project's key has no switcher and sees its own project only.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use vault_core::manage::ManageError;

use super::Ui;
use super::guard::{Posted, store_unavailable};
use super::layout::error_page;

/// `POST /ui/project`: `project` (empty for every project) and `back`, the
/// dashboard page to return to.
pub(crate) async fn switch(State(ui): State<Arc<Ui>>, posted: Posted) -> Response {
    let Posted { signed, fields } = posted;
    if !signed.org_wide() {
        return error_page(&signed, &ManageError::ProjectMismatch);
    }
    let chosen = fields.get("project").map(str::to_owned);
    if let Some(p) = &chosen
        && !signed.projects.contains(p)
        && signed.viewing() != Some(p.as_str())
    {
        return error_page(
            &signed,
            &ManageError::Invalid(format!("project: no key or provider key belongs to {p}")),
        );
    }
    if let Err(e) = ui
        .sessions
        .choose_project(&signed.cookie, chosen.as_deref())
        .await
    {
        return store_unavailable(&e);
    }
    let back = fields
        .get("back")
        .filter(|b| b.starts_with("/ui/") && !b.contains("//") && !b.contains('\\'))
        .unwrap_or("/ui/");
    Redirect::to(back).into_response()
}
