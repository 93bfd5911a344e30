//! **API Keys**: the table (search, status filter, pages) with the **Create
//! API Key** dialog (its form is `key_form`), a key's detail with its
//! sub-agent keys, **Revoke** (with a confirmation naming how many
//! descendants go with it) and **Rotate**.
//! Every change is a [`Manager`](vault_core::manage::Manager) call as the
//! signed-in key; a new secret is shown once, in the response that issued
//! it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use vault_core::key::KeyId;
use vault_core::manage::wire::{KeyListQuery, KeyPageView, KeyView, RotateKeyRequest};
use vault_core::manage::{ManageError, Manager, ProviderKeyView, UsageQuery};
use vault_core::record::KeyStatus;
use vault_core::scope::Permission;

use super::Ui;
use super::guard::{Posted, Signed};
use super::key_form::{create_form, issued_page};
use super::layout::{Nav, csrf_field, error_page, html_response, page};
use super::limits::limits_section;
use super::usage::{calls_table, chart};

/// Rows per page of the key table.
pub(crate) const PAGE_SIZE: usize = 50;

/// The table's query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    /// Part of a name, or the start of a prefix.
    q: Option<String>,
    /// `active`, `revoked`, `expired` or `exhausted`.
    status: Option<String>,
    /// 1-based page.
    page: Option<usize>,
}

/// A key's shown status: the stored one, or `budget exhausted` for an
/// active key whose lifetime budget is spent.
fn shown_status(k: &KeyView) -> &'static str {
    match k.status {
        KeyStatus::Active if budget_fraction(k).is_some_and(|f| f >= 1.0) => "budget exhausted",
        s => s.as_str(),
    }
}

/// Spend over a `total` budget, when the key has one.
fn budget_fraction(k: &KeyView) -> Option<f64> {
    let b = k.policy.budget.as_ref()?;
    if b.period != vault_core::policy::BudgetPeriod::Total || b.limit.0 == 0 {
        return None;
    }
    let spend: f64 = k.spend_usd.parse().ok()?;
    Some(spend / (b.limit.0 as f64 / 1e6))
}

/// A timestamp as `2026-12-05 07:35`.
pub(crate) fn when(t: Option<&str>) -> String {
    t.map_or_else(
        || "—".to_owned(),
        |s| s.get(..16).unwrap_or(s).replace('T', " "),
    )
}

fn spend_cell(k: &KeyView) -> Markup {
    let budget = k.policy.budget.as_ref().map(|b| b.limit.to_usd_string());
    match (budget_fraction(k), budget) {
        (Some(f), Some(limit)) => {
            let pct = (f * 100.0).clamp(0.0, 100.0);
            html! {
                span { "$" (k.spend_usd) " / $" (limit) }
                meter min="0" max="100" value=(format!("{pct:.0}")) aria-label="budget used" {}
                span.pct { (format!("{pct:.0}%")) }
            }
        }
        (_, Some(limit)) => html! { "$" (k.spend_usd) " / $" (limit) " per period" },
        _ => html! { "$" (k.spend_usd) },
    }
}

/// Page `n` (1-based) of the keys `q` selects, searched, filtered and
/// counted by the store (docs/dashboard.md#api-keys).
async fn key_page(
    m: &Manager,
    signed: &Signed,
    q: &ListQuery,
    n: usize,
) -> Result<KeyPageView, ManageError> {
    let offset = n.saturating_sub(1).saturating_mul(PAGE_SIZE);
    let query = KeyListQuery {
        limit: Some(PAGE_SIZE as u64),
        offset: Some(u64::try_from(offset).unwrap_or(u64::MAX)),
        search: q.q.clone(),
        status: q.status.clone().filter(|s| !s.is_empty() && s != "all"),
        project: signed.viewing().map(str::to_owned),
    };
    m.list_keys_page(&signed.actor, &query).await
}

/// `GET /ui/keys`.
pub(crate) async fn list(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(q): Query<ListQuery>,
) -> Response {
    let m = ui.admin.manager();
    let want = q.page.unwrap_or(1).max(1);
    let mut found = match key_page(m, &signed, &q, want).await {
        Ok(p) => p,
        Err(e) => return error_page(&signed, &e),
    };
    let pages = usize::try_from(found.total)
        .unwrap_or(usize::MAX)
        .div_ceil(PAGE_SIZE)
        .max(1);
    let n = want.min(pages);
    if n != want {
        found = match key_page(m, &signed, &q, n).await {
            Ok(p) => p,
            Err(e) => return error_page(&signed, &e),
        };
    }
    let pks = provider_keys_viewed(m, &signed).await;
    let rows = found.data.iter();
    let by_project = signed.org_wide() && signed.viewing().is_none();
    let body = html! {
        div.actions {
            a.button.primary href="/ui/keys/new" data-dialog="create-key" { "Create API Key" }
        }
        form.filters method="get" action="/ui/keys" role="search" {
            div.field { label for="q" { "Search by name or prefix" } input #q name="q" type="search" value=[q.q.as_deref()]; }
            div.field {
                label for="status" { "Status" }
                select #status name="status" {
                    @for (v, label) in [("all", "All"), ("active", "Active"), ("revoked", "Revoked"), ("expired", "Expired"), ("exhausted", "Budget exhausted")] {
                        option value=(v) selected[q.status.as_deref() == Some(v)] { (label) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        p { (found.total) @if found.total == 1 { " key" } @else { " keys" } " · page " (n) " of " (pages) }
        div.scroll {
            table {
                thead { tr {
                    th { "Name" } @if by_project { th { "Project" } } th { "Prefix" } th { "Env" } th { "Status" } th { "Scopes" }
                    th { "Created" } th { "Last used" } th { "Requests" } th { "Spend" } th { "Expires" }
                } }
                tbody {
                    @for k in rows {
                        tr {
                            td { a href={"/ui/keys/" (k.id.as_str())} { @if k.name.is_empty() { "(unnamed)" } @else { (k.name) } } }
                            @if by_project { td { (k.project) } }
                            td { code { (k.prefix.as_str()) "…" } }
                            td { (k.env.as_str()) }
                            td { span class={"status " (k.status.as_str())} { (shown_status(k)) } }
                            td { (scopes_text(k)) }
                            td { (when(Some(&k.created_at))) }
                            td { (when(k.last_used_at.as_deref())) }
                            td { (k.request_count) }
                            td.spend { (spend_cell(k)) }
                            td { (when(k.expires_at.as_deref())) }
                        }
                    }
                }
            }
        }
        (pager(&q, n, pages))
        dialog #create-key aria-labelledby="create-key-title" {
            h2 #create-key-title { "Create API Key" }
            (create_form(&signed, &pks, None, None))
        }
    };
    html_response(
        StatusCode::OK,
        page("API Keys", Some(&signed), Nav::Keys, body),
    )
}

fn scopes_text(k: &KeyView) -> String {
    k.scopes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn pager(q: &ListQuery, n: usize, pages: usize) -> Markup {
    let link = |p: usize| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        if let Some(t) = &q.q {
            s.append_pair("q", t);
        }
        if let Some(st) = &q.status {
            s.append_pair("status", st);
        }
        s.append_pair("page", &p.to_string());
        format!("/ui/keys?{}", s.finish())
    };
    html! {
        nav.pager aria-label="Pages" {
            @if n > 1 { a href=(link(n - 1)) rel="prev" { "Previous" } }
            @if n < pages { a href=(link(n + 1)) rel="next" { "Next" } }
        }
    }
}

/// The provider keys of the project being viewed (every project the key
/// sees, when none is chosen), for the create forms and the Vault page.
pub(crate) async fn provider_keys_viewed(m: &Manager, signed: &Signed) -> Vec<ProviderKeyView> {
    let mut pks = m
        .list_provider_keys(&signed.actor)
        .await
        .map(|l| l.data)
        .unwrap_or_default();
    if let Some(p) = signed.viewing() {
        pks.retain(|pk| pk.project == p);
    }
    pks
}

/// A key id from a path; anything else is no key's (404).
fn key_id(id: &str) -> Result<KeyId, ManageError> {
    KeyId::parse(id).ok_or(ManageError::NotFound("key"))
}

fn tree(keys: &[KeyView], id: &KeyId) -> Markup {
    let children: Vec<&KeyView> = keys
        .iter()
        .filter(|k| k.parent.as_ref() == Some(id))
        .collect();
    html! {
        @if !children.is_empty() {
            ul.tree {
                @for c in children {
                    li {
                        a href={"/ui/keys/" (c.id.as_str())} { (c.name) } " "
                        code { (c.prefix.as_str()) "…" } " · " (shown_status(c)) " · " (spend_cell(c))
                        (tree(keys, &c.id))
                    }
                }
            }
        }
    }
}

/// `GET /ui/keys/{id}`.
pub(crate) async fn detail(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Path(id): Path<String>,
) -> Response {
    let m = ui.admin.manager();
    let k = match key_id(&id) {
        Ok(id) => m.get_key(&signed.actor, &id).await,
        Err(e) => Err(e),
    };
    let k = match k {
        Ok(k) => k,
        Err(e) => return error_page(&signed, &e),
    };
    let all = m.key_tree(&signed.actor, &k.id).await.unwrap_or_default();
    let calls = if signed.may(Permission::UsageRead) {
        let q = UsageQuery {
            key_id: Some(k.id.clone()),
            limit: Some(1000),
            ..UsageQuery::default()
        };
        m.usage(&signed.actor, q)
            .await
            .map(|u| u.data)
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let limits = m.key_limits(&signed.actor, &k.id).await;
    let policy = serde_json::to_string_pretty(&k.policy).unwrap_or_default();
    let body = html! {
        dl.facts {
            dt { "Name" } dd { (k.name) }
            dt { "Prefix" } dd { code { (k.prefix.as_str()) "…" } }
            dt { "Id" } dd { code { (k.id.as_str()) } }
            dt { "Project" } dd { (k.project) }
            dt { "Status" } dd { (shown_status(&k)) }
            dt { "Scopes" } dd { (scopes_text(&k)) }
            dt { "Plan" } dd { (k.plan.as_deref().unwrap_or("—")) }
            dt { "Created" } dd { (when(Some(&k.created_at))) }
            dt { "Expires" } dd { (when(k.expires_at.as_deref())) }
            dt { "Last used" } dd { (when(k.last_used_at.as_deref())) }
            dt { "Requests" } dd { (k.request_count) }
            dt { "Spend" } dd { (spend_cell(&k)) }
            @if let Some(p) = &k.parent { dt { "Parent" } dd { a href={"/ui/keys/" (p.as_str())} { (p.as_str()) } } }
        }
        h2 { "Policy" }
        pre.policy { (policy) }
        (limits_section(&limits))
        h2 { "Sub-agent keys" }
        @if all.iter().any(|c| c.parent.as_ref() == Some(&k.id)) { (tree(&all, &k.id)) } @else { p { "None." } }
        @if k.status == KeyStatus::Active {
            p { a href={"/ui/keys/new?parent=" (k.id.as_str())} { "Create a sub-agent key" } }
            div.danger {
                form method="post" action={"/ui/keys/" (k.id.as_str()) "/rotate"} {
                    (csrf_field(&signed))
                    div.field {
                        label for="grace" { "Grace period for the old secret" }
                        select #grace name="grace" { option value="" { "none (stops at once)" } option value="60s" { "60 seconds" } option value="1h" { "1 hour" } option value="1d" { "1 day" } }
                    }
                    button type="submit" { "Rotate" }
                }
                form method="post" action={"/ui/keys/" (k.id.as_str()) "/revoke"} {
                    (csrf_field(&signed))
                    button.danger type="submit" { "Revoke" }
                }
            }
        }
        @if !calls.is_empty() {
            h2 { "Usage" }
            (chart(&calls, false))
            h2 { "Recent calls" }
            (calls_table(&calls[..calls.len().min(20)]))
        }
    };
    let title = format!(
        "Key {}",
        if k.name.is_empty() {
            k.id.as_str()
        } else {
            &k.name
        }
    );
    html_response(StatusCode::OK, page(&title, Some(&signed), Nav::Keys, body))
}

/// `POST /ui/keys/{id}/revoke`: without `confirm=yes`, a confirmation
/// naming the descendants that go with it; with it, the revocation.
pub(crate) async fn revoke(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Response {
    let Posted { signed, fields } = posted;
    let m = ui.admin.manager();
    let id = match key_id(&id) {
        Ok(id) => id,
        Err(e) => return error_page(&signed, &e),
    };
    let k = match m.get_key(&signed.actor, &id).await {
        Ok(k) => k,
        Err(e) => return error_page(&signed, &e),
    };
    if fields.get("confirm") != Some("yes") {
        let below: Vec<KeyView> = m
            .key_tree(&signed.actor, &id)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.status == KeyStatus::Active)
            .collect();
        let body = html! {
            div.card role="alertdialog" aria-labelledby="confirm-title" {
                h2 #confirm-title { "Revoke " (k.name) "?" }
                p { "Calls with this key are refused at once." }
                p.warn { @if below.is_empty() { "It has no active sub-agent keys." } @else if below.len() == 1 { "1 sub-agent key is revoked with it." } @else { (below.len()) " sub-agent keys are revoked with it." } }
                form method="post" action={"/ui/keys/" (id.as_str()) "/revoke"} {
                    (csrf_field(&signed))
                    input type="hidden" name="confirm" value="yes";
                    button.danger type="submit" { "Revoke" }
                    " " a href={"/ui/keys/" (id.as_str())} { "Cancel" }
                }
            }
        };
        return html_response(
            StatusCode::OK,
            page("Confirm revocation", Some(&signed), Nav::Keys, body),
        );
    }
    match m.revoke_key(&signed.actor, &id).await {
        Ok(r) => {
            let body = html! {
                p.notice role="status" { "Revoked " (r.revoked.len()) " key(s)." }
                p { a href="/ui/keys" { "Back to API Keys" } }
            };
            html_response(
                StatusCode::OK,
                page("Key revoked", Some(&signed), Nav::Keys, body),
            )
        }
        Err(e) => error_page(&signed, &e),
    }
}

/// `POST /ui/keys/{id}/rotate`: **Rotate**, with an optional grace period.
pub(crate) async fn rotate(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Response {
    let Posted { signed, fields } = posted;
    let id = match key_id(&id) {
        Ok(id) => id,
        Err(e) => return error_page(&signed, &e),
    };
    let body = match fields.get("grace") {
        Some(g) => json!({"grace": g}),
        None => json!({}),
    };
    let req: RotateKeyRequest = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => return error_page(&signed, &ManageError::Invalid(format!("grace: {e}"))),
    };
    match ui.admin.manager().rotate_key(&signed.actor, &id, req).await {
        Ok(issued) => issued_page(&signed, "API key rotated", &issued),
        Err(e) => error_page(&signed, &e),
    }
}
