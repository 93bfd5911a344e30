//! **Create API Key**: the form (the dialog on the key table, a page at
//! `/ui/keys/new`), its **Policy YAML** tab, and both turned into the
//! `POST /v1/keys` request the manager takes, so the API's rules and
//! messages apply unchanged; the one page that shows a new secret.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::{Markup, html};
use serde_json::{Map, Value, json};
use vault_core::manage::ManageError;
use vault_core::manage::wire::{CreateKeyRequest, IssuedKey};
use vault_core::scope::Permission;

use super::Ui;
use super::guard::{Fields, Posted, Signed};
use super::keys::{provider_keys_viewed, when};
use super::layout::{Nav, csrf_field, error_page, field, html_response, page, project_field};

/// The scopes offered by the create form.
const SCOPES: [&str; 5] = ["chat:write", "usage:read", "audit:read", "keys:manage", "*"];

/// The create form (in the dialog, on `/ui/keys/new`, and for a sub-agent
/// key with `parent`).
pub(crate) fn create_form(
    signed: &Signed,
    pks: &[vault_core::manage::ProviderKeyView],
    parent: Option<&str>,
    yaml: Option<(&str, &str)>,
) -> Markup {
    html! {
        form.stack method="post" action="/ui/keys" {
            (csrf_field(signed))
            @if let Some(p) = parent { input type="hidden" name="parent" value=(p); p { "Sub-agent key of " code { (p) } } }
            (field("name", "Name", "text", Some("A descriptive name, e.g. nightly-eval.")))
            @if parent.is_none() { (project_field(signed, "f-project")) }
            fieldset {
                legend { "Scopes" }
                @for s in SCOPES {
                    label.check { input type="checkbox" name="scopes" value=(s) checked[s == "chat:write"]; " " (s) }
                }
            }
            div.field {
                label for="f-env" { "Environment" }
                select #f-env name="env" { option value="" { "Default (the parent's, else live)" } option value="live" { "live" } option value="test" { "test (mock provider)" } }
            }
            (field("plan", "Plan", "text", Some("free, pro, enterprise or a configured plan; empty for none.")))
            (field("ttl", "TTL", "text", Some("e.g. 90s, 5m, 1h, 7d; empty for no expiry.")))
            div.row {
                (field("budget_usd", "Budget (USD)", "text", None))
                div.field {
                    label for="f-period" { "Budget period" }
                    select #f-period name="budget_period" { option value="total" { "total" } option value="daily" { "daily" } option value="monthly" { "monthly" } }
                }
            }
            div.row {
                (field("requests_per_minute", "Requests per minute", "number", None))
                (field("requests_per_day", "Requests per day", "number", None))
                (field("requests_per_month", "Requests per month", "number", None))
                (field("tokens_per_minute", "Tokens per minute", "number", None))
            }
            (field("max_parallel", "Calls at once (max_parallel)", "number", Some("Calls in flight at once, sub-agent keys' included; empty for no limit.")))
            (field("providers", "Providers allowed", "text", Some("Comma-separated, e.g. openai, anthropic; empty for all.")))
            (field("models", "Models allowed", "text", Some("Comma-separated patterns, e.g. gpt-4o-mini, claude-*; empty for all.")))
            (field("endpoints", "Endpoints allowed", "text", Some("Comma-separated, e.g. POST /v1/chat/completions; empty for all.")))
            @if !pks.is_empty() {
                fieldset {
                    legend { "Provider keys it may use (none ticked: any of the project's)" }
                    @for pk in pks {
                        label.check { input type="checkbox" name="provider_keys" value=(pk.id.as_str()); " " (pk.provider.as_str()) " · " (pk.name) " · " (pk.hint.as_str()) }
                    }
                }
            }
            div.actions {
                button.primary type="submit" { "Create API Key" }
                button type="button" data-close="" { "Cancel" }
            }
        }
        details.yaml open[yaml.is_some()] {
            summary { "Policy YAML" }
            (yaml_form(signed, parent, yaml))
        }
    }
}

/// The "Policy YAML" form: a policy file's text (docs/policy.md), checked
/// as a file is; an error names its line and field beside the text.
fn yaml_form(signed: &Signed, parent: Option<&str>, yaml: Option<(&str, &str)>) -> Markup {
    let (text, error) = yaml.unwrap_or(("", ""));
    html! {
        form.stack method="post" action="/ui/keys" {
            (csrf_field(signed))
            input type="hidden" name="mode" value="yaml";
            @if let Some(p) = parent { input type="hidden" name="parent" value=(p); }
            @if parent.is_none() { (project_field(signed, "f-yaml-project")) }
            div.field {
                label for="f-policy_yaml" { "Policy YAML" }
                textarea #f-policy_yaml name="policy_yaml" rows="10" spellcheck="false"
                    aria-describedby="f-policy_yaml-hint" aria-invalid=[(!error.is_empty()).then_some("true")] { (text) }
                @if error.is_empty() {
                    small #f-policy_yaml-hint { "name, ttl, scopes, plan and the policy fields, e.g. models: [gpt-4o-mini] and budget: { limit_usd: 5 }." }
                } @else {
                    small #f-policy_yaml-hint .bad role="alert" { (error) }
                }
            }
            div.field {
                label for="f-yaml-env" { "Environment" }
                select #f-yaml-env name="env" { option value="" { "Default" } option value="live" { "live" } option value="test" { "test (mock provider)" } }
            }
            button.primary type="submit" { "Create API Key" }
        }
    }
}

/// `GET /ui/keys/new` (the dialog's form as a page, for a browser without
/// script and for sub-agent keys).
pub(crate) async fn new_form(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = signed.actor.require(Permission::KeysManage) {
        return error_page(&signed, &e);
    }
    let pks = provider_keys_viewed(ui.admin.manager(), &signed).await;
    let parent = q.get("parent").map(String::as_str);
    let body = create_form(&signed, &pks, parent, None);
    html_response(
        StatusCode::OK,
        page("Create API Key", Some(&signed), Nav::Keys, body),
    )
}

/// Comma- or newline-separated values.
fn list_of(s: Option<&str>) -> Option<Value> {
    s.map(|s| {
        Value::Array(
            s.split([',', '\n'])
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| Value::String(v.to_owned()))
                .collect(),
        )
    })
}

/// A whole number field.
fn number(f: &Fields, name: &str) -> Result<Option<Value>, ManageError> {
    f.get(name)
        .map(|v| {
            v.parse::<u64>()
                .map(Value::from)
                .map_err(|_| ManageError::Invalid(format!("{name}: expected a whole number")))
        })
        .transpose()
}

/// The form as the JSON body `POST /v1/keys` takes, read by the same type,
/// so the API's rules and messages apply unchanged.
pub(crate) fn create_request(f: &Fields) -> Result<CreateKeyRequest, ManageError> {
    let mut o = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            o.insert(k.to_owned(), v);
        }
    };
    put("name", f.get("name").map(Value::from));
    let scopes = f.all("scopes");
    put("permissions", (!scopes.is_empty()).then(|| json!(scopes)));
    put("env", f.get("env").map(Value::from));
    put("plan", f.get("plan").map(Value::from));
    put("ttl", f.get("ttl").map(Value::from));
    put("parent", f.get("parent").map(Value::from));
    put("project", f.get("project").map(Value::from));
    put("providers", list_of(f.get("providers")));
    put("models", list_of(f.get("models")));
    put("endpoints", list_of(f.get("endpoints")));
    let pks = f.all("provider_keys");
    put("provider_keys", (!pks.is_empty()).then(|| json!(pks)));
    if let Some(usd) = f.get("budget_usd") {
        let limit: f64 = usd.parse().map_err(|_| {
            ManageError::Invalid("budget: the limit must be a number of dollars".to_owned())
        })?;
        put(
            "budget",
            Some(json!({"limit_usd": limit, "period": f.get("budget_period").unwrap_or("total")})),
        );
    }
    let mut rate = Map::new();
    for name in [
        "requests_per_minute",
        "requests_per_day",
        "requests_per_month",
        "tokens_per_minute",
    ] {
        if let Some(v) = number(f, name)? {
            rate.insert(name.to_owned(), v);
        }
    }
    if !rate.is_empty() {
        o.insert("rate_limit".to_owned(), Value::Object(rate));
    }
    if let Some(n) = number(f, "max_parallel")? {
        o.insert("max_parallel".to_owned(), n);
    }
    serde_json::from_value(Value::Object(o)).map_err(|e| ManageError::Invalid(e.to_string()))
}

/// The page that shows a new secret, once.
pub(crate) fn issued_page(signed: &Signed, title: &str, issued: &IssuedKey) -> Response {
    let r = &issued.record;
    let body = html! {
        div.card.issued role="dialog" aria-labelledby="issued-title" {
            h2 #issued-title { "Your new key: " (r.name) }
            p.warn { "Copy it now — you won't see it again." }
            div.secret {
                code #new-key { (issued.key.expose_secret()) }
                button type="button" data-copy="new-key" { "Copy" }
            }
            p { "Prefix " code { (r.prefix.as_str()) "…" } " · " (r.env.as_str()) " · id " code { (r.id.as_str()) } }
            @if let Some(until) = &r.rotation_grace_until { p { "The previous secret works until " (when(Some(until))) "." } }
            a.button.primary href="/ui/keys" data-done="" { "Done" }
        }
    };
    html_response(
        StatusCode::CREATED,
        page(title, Some(signed), Nav::Keys, body),
    )
}

/// `POST /ui/keys`: **Create API Key**.
pub(crate) async fn create(State(ui): State<Arc<Ui>>, posted: Posted) -> Response {
    let Posted { signed, fields } = posted;
    let req = if fields.get("mode") == Some("yaml") {
        let text = fields.get("policy_yaml").unwrap_or_default();
        match yaml_request(&fields) {
            Ok(r) => r,
            Err(e) => return yaml_error(&signed, &fields, text, &e.to_string()),
        }
    } else {
        match create_request(&fields) {
            Ok(r) => r,
            Err(e) => return error_page(&signed, &e),
        }
    };
    match ui.admin.manager().create_key(&signed.actor, req).await {
        Ok(issued) => issued_page(&signed, "API key created", &issued),
        Err(e) => error_page(&signed, &e),
    }
}

/// The Policy YAML form again, the text kept and its error beside it
/// (400).
fn yaml_error(signed: &Signed, f: &Fields, text: &str, error: &str) -> Response {
    let body = html! {
        (yaml_form(signed, f.get("parent"), Some((text, error))))
        p { a href="/ui/keys/new" { "Use the form instead" } }
    };
    html_response(
        StatusCode::BAD_REQUEST,
        page(
            "Create API Key from Policy YAML",
            Some(signed),
            Nav::Keys,
            body,
        ),
    )
}

/// The "Policy YAML" form as the API's request: the file's name, TTL,
/// scopes, plan and policy, as `vaultgate keys create --policy` reads a
/// file; `env`, `parent` and `project` from the form.
pub(crate) fn yaml_request(f: &Fields) -> Result<CreateKeyRequest, ManageError> {
    let text = f.get("policy_yaml").unwrap_or_default();
    let file = vault_core::policy::parse_policy_yaml(text, "policy.yaml")
        .map_err(|e| ManageError::Invalid(e.to_string()))?;
    let mut req = CreateKeyRequest::default().with_policy(file.policy);
    req.name = file.name;
    req.plan = file.plan;
    req.permissions = file
        .scopes
        .map(|s| s.iter().map(|x| x.to_string_lossless()).collect());
    req.ttl = file
        .ttl
        .map(|d| format!("{}s", d.as_secs()).parse())
        .transpose()
        .map_err(|e| ManageError::Invalid(format!("ttl: {e}")))?;
    let extra = json!({"env": f.get("env"), "parent": f.get("parent")});
    let extra: CreateKeyRequest =
        serde_json::from_value(extra).map_err(|e| ManageError::Invalid(e.to_string()))?;
    req.env = extra.env;
    req.parent = extra.parent;
    req.project = f.get("project").map(str::to_owned);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_the_form_becomes_the_api_request() {
        let f = Fields::parse(
            b"name=ci&scopes=chat%3Awrite&scopes=usage%3Aread&ttl=1h&budget_usd=5&budget_period=daily&requests_per_minute=60&requests_per_month=9000&max_parallel=4&models=gpt-4o-mini%2C+claude-*",
        );
        let r = create_request(&f).unwrap();
        assert_eq!(r.name.as_deref(), Some("ci"));
        assert_eq!(r.permissions.as_ref().map(Vec::len), Some(2));
        assert_eq!(r.models.as_ref().map(Vec::len), Some(2));
        assert!(r.budget.is_some() && r.rate_limit.is_some() && r.ttl.is_some());
        assert_eq!(r.max_parallel, Some(4));
        assert_eq!(r.rate_limit.and_then(|l| l.requests_per_month), Some(9000));
        for bad in [
            &b"ttl=forever"[..],
            b"budget_usd=lots",
            b"requests_per_minute=-1",
        ] {
            assert!(create_request(&Fields::parse(bad)).is_err());
        }
    }

    #[test]
    fn boundary_policy_yaml_becomes_the_request_and_errors_name_line_and_field() {
        let yaml = "name: eval\nttl: 1h\nscopes: [chat:write]\nmodels: [gpt-4o-mini]\nbudget: { limit_usd: 5 }\n";
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("policy_yaml", yaml)
            .append_pair("env", "test")
            .finish();
        let r = yaml_request(&Fields::parse(body.as_bytes())).unwrap();
        assert_eq!(r.name.as_deref(), Some("eval"));
        assert_eq!(r.ttl.map(|t| t.get().as_secs()), Some(3600));
        assert!(r.models.is_some() && r.budget.is_some());
        assert_eq!(r.env, Some(vault_core::key::KeyEnv::Test));
        let bad = form_urlencoded::Serializer::new(String::new())
            .append_pair("policy_yaml", "name: x\nbudget:\n  limit: 5\n")
            .finish();
        let e = yaml_request(&Fields::parse(bad.as_bytes()))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("policy.yaml:3"), "{e}");
        assert!(e.contains("limit"), "{e}");
    }
}
