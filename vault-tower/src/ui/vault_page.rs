//! **Vault**: provider keys as hints, **Add Provider Key** (the secret in a
//! password field, sent once and never back), removal (a confirmation
//! listing the keys that name it), and **Create Proxy Key**: a
//! `chat:write` key limited to one provider key and its provider.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::StatusCode;
use maud::html;
use serde_json::json;
use vault_core::key::ProviderKeyId;
use vault_core::manage::ManageError;
use vault_core::manage::wire::{AddProviderKeyRequest, CreateKeyRequest, KeyView, ProviderKeyView};
use vault_core::provider::Provider;
use vault_core::scope::Permission;

use super::Ui;
use super::guard::{Posted, Signed};
use super::key_form::issued_page;
use super::keys::{provider_keys_viewed, when};
use super::layout::{Nav, csrf_field, error_page, field, html_response, page, project_field};

/// Keys that name `pk` in their `provider_keys`.
fn users<'a>(keys: &'a [KeyView], pk: &ProviderKeyView) -> Vec<&'a KeyView> {
    keys.iter()
        .filter(|k| k.provider_keys.contains(&pk.id))
        .collect()
}

/// `GET /ui/vault`.
pub(crate) async fn list(State(ui): State<Arc<Ui>>, signed: Signed) -> Response {
    let m = ui.admin.manager();
    if let Err(e) = signed.actor.require(Permission::KeysManage) {
        return error_page(&signed, &e);
    }
    let pks = provider_keys_viewed(m, &signed).await;
    let keys = m
        .list_keys_with_provider_keys(&signed.actor)
        .await
        .map(|l| l.data)
        .unwrap_or_default();
    let by_project = signed.org_wide() && signed.viewing().is_none();
    let body = html! {
        div.scroll {
            table {
                thead { tr { th { "Provider" } @if by_project { th { "Project" } } th { "Name" } th { "Hint" } th { "Created" } th { "Keys using it" } th { span.sr { "Actions" } } } }
                tbody {
                    @for pk in &pks {
                        tr {
                            td { (pk.provider.as_str()) }
                            @if by_project { td { (pk.project) } }
                            td { (pk.name) }
                            td { code { (pk.hint.as_str()) } }
                            td { (when(Some(&pk.created_at))) }
                            td { (users(&keys, pk).len()) }
                            td {
                                form method="post" action={"/ui/vault/" (pk.id.as_str()) "/remove"} {
                                    (csrf_field(&signed))
                                    button type="submit" aria-label={"Remove " (pk.name)} { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if pks.is_empty() { p { "No provider keys yet. Test keys are answered by the mock provider without one." } }
        p.note { "\"Keys using it\" counts keys limited to it; a key with no provider-key list may use any of its project's keys for that provider." }
        div.columns {
            section aria-labelledby="add-title" {
                h2 #add-title { "Add Provider Key" }
                form.stack method="post" action="/ui/vault" {
                    (csrf_field(&signed))
                    div.field {
                        label for="f-provider" { "Provider" }
                        select #f-provider name="provider" required {
                            @for p in Provider::ALL { option value=(p.as_str()) { (p.as_str()) } }
                        }
                    }
                    (field("name", "Name", "text", None))
                    (project_field(&signed, "f-pk-project"))
                    div.field {
                        label for="f-api_key" { "Provider API key" }
                        input #f-api_key name="api_key" type="password" required autocomplete="off" spellcheck="false" aria-describedby="f-api_key-hint";
                        small #f-api_key-hint { "Stored encrypted; only its hint is ever shown." }
                    }
                    button.primary type="submit" { "Add Provider Key" }
                }
            }
            @if !pks.is_empty() {
                section aria-labelledby="proxy-title" {
                    h2 #proxy-title { "Create Proxy Key" }
                    form.stack method="post" action="/ui/vault/proxy-key" {
                        (csrf_field(&signed))
                        (field("proxy_name", "Name", "text", None))
                        div.field {
                            label for="f-pk" { "Provider key" }
                            select #f-pk name="provider_key" required {
                                @for pk in &pks { option value=(pk.id.as_str()) { (pk.provider.as_str()) " · " (pk.name) " · " (pk.hint.as_str()) } }
                            }
                        }
                        button.primary type="submit" { "Create Proxy Key" }
                    }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page("Vault", Some(&signed), Nav::Vault, body),
    )
}

/// `POST /ui/vault`: **Add Provider Key**, read by the API's request type.
pub(crate) async fn add(State(ui): State<Arc<Ui>>, posted: Posted) -> Response {
    let Posted { signed, fields } = posted;
    let body = json!({
        "provider": fields.get("provider").unwrap_or_default(),
        "api_key": fields.get("api_key").unwrap_or_default(),
        "name": fields.get("name").unwrap_or_default(),
        "project": fields.get("project"),
    });
    drop(fields);
    let req: AddProviderKeyRequest = match serde_json::from_value(body) {
        Ok(r) => r,
        // serde's message names the field, never the value of a secret.
        Err(_) => {
            return error_page(
                &signed,
                &ManageError::Invalid("provider: choose one of the listed providers".to_owned()),
            );
        }
    };
    match ui
        .admin
        .manager()
        .add_provider_key(&signed.actor, req)
        .await
    {
        Ok(_) => Redirect::to("/ui/vault").into_response(),
        Err(e) => error_page(&signed, &e),
    }
}

/// `POST /ui/vault/{id}/remove`: a confirmation listing the keys that name
/// it, then the removal.
pub(crate) async fn remove(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Response {
    let Posted { signed, fields } = posted;
    let m = ui.admin.manager();
    let Some(id) = ProviderKeyId::parse(&id) else {
        return error_page(&signed, &ManageError::NotFound("provider key"));
    };
    if fields.get("confirm") == Some("yes") {
        return match m.remove_provider_key(&signed.actor, &id).await {
            Ok(_) => Redirect::to("/ui/vault").into_response(),
            Err(e) => error_page(&signed, &e),
        };
    }
    let pks = m
        .list_provider_keys(&signed.actor)
        .await
        .map(|l| l.data)
        .unwrap_or_default();
    let Some(pk) = pks.iter().find(|p| p.id == id) else {
        return error_page(&signed, &ManageError::NotFound("provider key"));
    };
    let keys = m
        .list_keys_with_provider_keys(&signed.actor)
        .await
        .map(|l| l.data)
        .unwrap_or_default();
    let deps = users(&keys, pk);
    let body = html! {
        div.card role="alertdialog" aria-labelledby="confirm-title" {
            h2 #confirm-title { "Remove " (pk.provider.as_str()) " key " (pk.name) " (" (pk.hint.as_str()) ")?" }
            @if deps.is_empty() { p { "No key is limited to it." } }
            @else {
                p.warn { (deps.len()) @if deps.len() == 1 { " key is" } @else { " keys are" } " limited to it and will have no provider key for " (pk.provider.as_str()) ":" }
                ul { @for k in &deps { li { a href={"/ui/keys/" (k.id.as_str())} { (k.name) } " " code { (k.prefix.as_str()) "…" } } } }
            }
            form method="post" action={"/ui/vault/" (id.as_str()) "/remove"} {
                (csrf_field(&signed))
                input type="hidden" name="confirm" value="yes";
                button.danger type="submit" { "Remove" }
                " " a href="/ui/vault" { "Cancel" }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page("Confirm removal", Some(&signed), Nav::Vault, body),
    )
}

/// `POST /ui/vault/proxy-key`: **Create Proxy Key**, a `chat:write` key
/// that may use only this provider key (and so only its provider).
pub(crate) async fn proxy_key(State(ui): State<Arc<Ui>>, posted: Posted) -> Response {
    let Posted { signed, fields } = posted;
    let m = ui.admin.manager();
    let pks = match m.list_provider_keys(&signed.actor).await {
        Ok(l) => l.data,
        Err(e) => return error_page(&signed, &e),
    };
    let Some(pk) = fields
        .get("provider_key")
        .and_then(|id| pks.iter().find(|p| p.id.as_str() == id))
    else {
        return error_page(
            &signed,
            &ManageError::Invalid("provider_key: choose one of the vault's keys".to_owned()),
        );
    };
    let body = json!({
        "name": fields.get("proxy_name").unwrap_or_default(),
        "permissions": ["chat:write"],
        "env": "live",
        "provider_keys": [pk.id.as_str()],
        "providers": [pk.provider.as_str()],
        "project": pk.project,
    });
    let req: CreateKeyRequest = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => return error_page(&signed, &ManageError::Invalid(e.to_string())),
    };
    match m.create_key(&signed.actor, req).await {
        Ok(issued) => issued_page(&signed, "Proxy key created", &issued),
        Err(e) => error_page(&signed, &e),
    }
}
