//! **Audit**: the entries `GET /v1/audit` returns (the manager's
//! `audit_entries`, so a project's key sees its project's), filtered by
//! kind, and the hash chain's state, verified on the server over the whole
//! log as `vaultgate audit verify` does.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;
use vault_core::audit::VerifyError;
use vault_core::manage::AuditQuery;

use super::Ui;
use super::guard::Signed;
use super::layout::{Nav, error_page, html_response, page};

/// The filter, in the query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Filter {
    /// An event kind, e.g. `key.revoked`.
    kind: Option<String>,
    /// Part of an actor or target id.
    id: Option<String>,
    /// How many of the newest entries to read.
    limit: Option<usize>,
}

/// The chain's state as one sentence.
async fn chain_state(ui: &Ui) -> Markup {
    let Some(log) = ui.admin.context().audit() else {
        return html! { p.notice { "No audit log is configured." } };
    };
    match log.verify().await {
        Ok(r) => html! { p.ok role="status" { "Chain verified, " (r.entries) " entries." } },
        Err(VerifyError::BadEntry { line, seq, problem }) => html! {
            p.bad role="alert" { "Chain broken: entry " (seq.unwrap_or(line)) " (line " (line) ") was changed, removed or reordered: " (problem.to_string()) "." }
        },
        Err(e) => {
            html! { p.bad role="alert" { "The audit chain did not verify: " (e.to_string()) "." } }
        }
    }
}

fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// `GET /ui/audit`.
pub(crate) async fn show(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(f): Query<Filter>,
) -> Response {
    let q = AuditQuery {
        limit: Some(f.limit.unwrap_or(500).min(10_000)),
        project: signed.viewing().map(str::to_owned),
    };
    let entries = match ui.admin.manager().audit_entries(&signed.actor, q).await {
        Ok(l) => l.data,
        Err(e) => return error_page(&signed, &e),
    };
    let kind = f.kind.as_deref().filter(|k| !k.is_empty());
    let id = f.id.as_deref().map(str::trim).filter(|k| !k.is_empty());
    let shown: Vec<&Value> = entries
        .iter()
        .filter(|e| kind.is_none_or(|k| e.get("kind").and_then(Value::as_str) == Some(k)))
        .filter(|e| {
            id.is_none_or(|i| text(e, "actor").contains(i) || text(e, "target").contains(i))
        })
        .collect();
    let kinds = [
        "key.created",
        "key.rotated",
        "key.revoked",
        "provider_key.added",
        "provider_key.removed",
        "request.denied",
        "master_key.rotated",
    ];
    let body = html! {
        (chain_state(&ui).await)
        form.filters method="get" action="/ui/audit" {
            div.field {
                label for="a-kind" { "Kind" }
                select #a-kind name="kind" {
                    option value="" { "All" }
                    @for k in kinds { option value=(k) selected[kind == Some(k)] { (k) } }
                }
            }
            div.field { label for="a-id" { "Actor or target id" } input #a-id name="id" type="text" value=[id]; }
            button type="submit" { "Filter" }
        }
        div.scroll { table {
            thead { tr { th { "#" } th { "Time" } th { "Kind" } th { "Actor" } th { "Target" } th { "Project" } th { "Detail" } } }
            tbody { @for e in &shown {
                @let ev = *e;
                tr {
                    td { (text(e, "seq")) }
                    td { (super::keys::when(Some(&text(e, "at")))) }
                    td { (text(ev, "kind")) }
                    td { code { (text(ev, "actor")) } }
                    td { code { (text(ev, "target")) } }
                    td { (text(ev, "project")) }
                    td { code { (ev.get("detail").map(Value::to_string).unwrap_or_default()) } }
                }
            } }
        } }
    };
    html_response(
        StatusCode::OK,
        page("Audit", Some(&signed), Nav::Audit, body),
    )
}
