//! The page shell every dashboard page shares: head, navigation (only the
//! pages the key may open), **Sign out**, and the main region. Every
//! interpolated value goes through maud, which escapes it.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderValue};
use maud::{DOCTYPE, Markup, html};
use vault_core::manage::ManageError;
use vault_core::scope::Permission;

use super::guard::Signed;

/// The navigation entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    /// `/ui/keys`.
    Keys,
    /// `/ui/vault`.
    Vault,
    /// `/ui/usage`.
    Usage,
    /// `/ui/audit`.
    Audit,
    /// None highlighted.
    None,
}

/// Each entry's path, label and the scope it needs.
const NAV: [(Nav, &str, &str, Permission); 4] = [
    (Nav::Keys, "/ui/keys", "API Keys", Permission::KeysManage),
    (Nav::Vault, "/ui/vault", "Vault", Permission::KeysManage),
    (Nav::Usage, "/ui/usage", "Usage", Permission::UsageRead),
    (Nav::Audit, "/ui/audit", "Audit", Permission::AuditRead),
];

/// The first page `signed` may open.
pub(crate) fn home(signed: &Signed) -> &'static str {
    NAV.iter()
        .find(|(_, _, _, p)| signed.may(*p))
        .map_or("/ui/sign-in", |(_, path, _, _)| path)
}

/// A whole page.
pub(crate) fn page(title: &str, signed: Option<&Signed>, active: Nav, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · vaultgate" }
                link rel="stylesheet" href="/ui/assets/app.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    span.brand { "vaultgate" }
                    @if let Some(s) = signed {
                        nav aria-label="Main" {
                            ul {
                                @for (nav, path, label, perm) in NAV {
                                    @if s.may(perm) {
                                        li {
                                            a href=(path) aria-current=[(nav == active).then_some("page")] { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        div.who {
                            @if s.org_wide() { (project_switcher(s, active)) }
                            span { (s.record.name) " · " (if s.org_wide() { s.viewing().unwrap_or("every project") } else { s.record.project.as_str() }) }
                            form method="post" action="/ui/sign-out" {
                                input type="hidden" name="csrf" value=(s.csrf());
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The project switcher of an organisation-wide key: a form posting the
/// chosen project to `/ui/project`, which comes back to `active`'s page.
fn project_switcher(s: &Signed, active: Nav) -> Markup {
    let back = NAV
        .iter()
        .find(|(nav, ..)| *nav == active)
        .map_or("/ui/", |(_, path, ..)| path);
    let viewing = s.viewing();
    let listed = viewing.is_none_or(|v| s.projects.iter().any(|p| p == v));
    html! {
        form.switcher method="post" action="/ui/project" {
            (csrf_field(s))
            input type="hidden" name="back" value=(back);
            label for="project-switch" { "Project" }
            select #project-switch name="project" {
                option value="" selected[viewing.is_none()] { "All projects" }
                @for p in &s.projects {
                    option value=(p) selected[viewing == Some(p.as_str())] { (p) }
                }
                @if !listed { option value=[viewing] selected { (viewing.unwrap_or_default()) } }
            }
            button type="submit" { "Switch" }
        }
    }
}

/// The **Project** field of a create form, for an organisation-wide key:
/// the project the new object goes to, the one being viewed by default
/// (`default` when viewing every project); a project's key has none.
pub(crate) fn project_field(s: &Signed, id: &str) -> Markup {
    if !s.org_wide() {
        return html! {};
    }
    let hint = format!("{id}-hint");
    let known = format!("{id}-known");
    html! {
        div.field {
            label for=(id) { "Project" }
            input id=(id) name="project" type="text" list=(known) autocomplete="off"
                value=(s.viewing().unwrap_or(vault_core::record::DEFAULT_PROJECT)) aria-describedby=(hint);
            datalist id=(known) { @for p in &s.projects { option value=(p) {} } }
            small id=(hint) { "An existing project, or a new name: letters, digits, - and _." }
        }
    }
}

/// An HTML response.
pub(crate) fn html_response(status: StatusCode, markup: Markup) -> Response {
    let mut r = (status, markup.into_string()).into_response();
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// A page with one message, outside any session.
pub(crate) fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    html_response(
        status,
        page(
            title,
            None,
            Nav::None,
            html! { p.notice role="alert" { (message) } p { a href="/ui/" { "Back to the dashboard" } } },
        ),
    )
}

/// A [`ManageError`] as a page with its status (403 for another project's
/// object, 400 with the field for a bad value).
pub(crate) fn error_page(signed: &Signed, e: &ManageError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let title = match status {
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::NOT_FOUND => "Not found",
        s if s.is_client_error() => "Not accepted",
        _ => "Something went wrong",
    };
    html_response(
        status,
        page(
            title,
            Some(signed),
            Nav::None,
            html! { p.notice role="alert" { (e.to_string()) } p { a href=(home(signed)) { "Back" } } },
        ),
    )
}

/// A labelled text input.
pub(crate) fn field(name: &str, label: &str, kind: &str, hint: Option<&str>) -> Markup {
    let id = format!("f-{name}");
    let hint_id = format!("{id}-hint");
    html! {
        div.field {
            label for=(id) { (label) }
            input id=(id) name=(name) type=(kind) autocomplete="off" aria-describedby=[hint.map(|_| hint_id.as_str())];
            @if let Some(h) = hint { small id=(hint_id) { (h) } }
        }
    }
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf_field(signed: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(signed.csrf()); }
}
