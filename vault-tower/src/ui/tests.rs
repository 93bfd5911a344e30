//! The dashboard's router in process, over a `MemoryStore`: scale and
//! session lifecycle (the browser suite is vault-cli/tests/ui_browser.rs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vault_core::clock::SystemClock;
use vault_core::crypto::{AesGcmEncryptor, MasterKey};
use vault_core::manage::{Actor, CreateKeyRequest, Manager};
use vault_core::policy::{DefaultEngine, PlanSet, PolicyEngine, RequestFacts};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::store::MemoryStore;

use super::{UiOptions, ui_router};
use crate::VaultContext;
use crate::admin::Admin;

/// A router and its manager over an empty memory store.
fn setup() -> (Router, Manager) {
    let (router, manager, _) = setup_with_engine();
    (router, manager)
}

/// As [`setup`], with the engine the proxy would check calls with.
fn setup_with_engine() -> (Router, Manager, Arc<DefaultEngine>) {
    let store = Arc::new(MemoryStore::new());
    let enc = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        Arc::new(SystemClock),
    ));
    let ctx = VaultContext::builder(store, enc, engine.clone()).build();
    let admin = Admin::new(ctx, Arc::new(PlanSet::seeded()));
    let manager = admin.manager().clone();
    (ui_router(admin, UiOptions::default()), manager, engine)
}

async fn create(m: &Manager, body: &str) -> (String, String) {
    let req: CreateKeyRequest = serde_json::from_str(body).unwrap();
    let issued = m.create_key(&Actor::Operator, req).await.unwrap();
    (
        issued.record.id.to_string(),
        issued.key.expose_secret().to_owned(),
    )
}

/// Signs in with `key`; the session cookie (`vg_session=…`).
async fn sign_in(router: &Router, key: &str) -> String {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("api_key", key)
        .finish();
    let r = router
        .clone()
        .oneshot(
            Request::post("/ui/sign-in")
                .header("host", "dash.test")
                .header("origin", "http://dash.test")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

async fn get(router: &Router, path: &str, cookie: &str) -> (StatusCode, String) {
    let r = router
        .clone()
        .oneshot(
            Request::get(path)
                .header("cookie", cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn boundary_ten_thousand_keys_paginate_and_a_page_answers_within_a_second() {
    let (router, m) = setup();
    let (_, admin) = create(&m, r#"{"name": "admin", "permissions": ["*"]}"#).await;
    for i in 0..10_000 {
        create(&m, &format!(r#"{{"name": "bulk-{i}", "env": "test"}}"#)).await;
    }
    let cookie = sign_in(&router, &admin).await;
    for path in ["/ui/keys", "/ui/keys?page=150", "/ui/keys?q=bulk-9999"] {
        let start = Instant::now();
        let (status, html) = get(&router, path, &cookie).await;
        let took = start.elapsed();
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
        let rows = html.matches("<tr><td><a href=\"/ui/keys/key_").count();
        match path {
            "/ui/keys?q=bulk-9999" => assert_eq!(rows, 1, "{path}"),
            _ => assert_eq!(rows, super::keys::PAGE_SIZE, "{path}"),
        }
    }
    let (_, html) = get(&router, "/ui/keys?page=150", &cookie).await;
    assert!(html.contains("10001 keys · page 150 of 201"));
    // The store filters and counts; a page past the last shows the last.
    let (_, html) = get(&router, "/ui/keys?status=revoked", &cookie).await;
    assert!(html.contains("0 keys · page 1 of 1"), "{html}");
    let (_, html) = get(&router, "/ui/keys?status=active&page=999", &cookie).await;
    assert!(html.contains("10001 keys · page 201 of 201"));
    assert_eq!(html.matches("<tr><td><a href=\"/ui/keys/key_").count(), 1);
}

#[tokio::test]
async fn lifecycle_revoking_the_signing_key_ends_its_session() {
    let (router, m) = setup();
    let (id, key) = create(&m, r#"{"name": "lead", "permissions": ["keys:manage"]}"#).await;
    let cookie = sign_in(&router, &key).await;
    assert_eq!(get(&router, "/ui/keys", &cookie).await.0, StatusCode::OK);
    // A key without usage:read is refused Usage with the API's message.
    let (status, html) = get(&router, "/ui/usage", &cookie).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains("usage:read"));
    m.revoke_key(
        &Actor::Operator,
        &vault_core::key::KeyId::parse(&id).unwrap(),
    )
    .await
    .unwrap();
    let (status, _) = get(&router, "/ui/keys", &cookie).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "signed out at once");
    // And the session is gone, not just refused once.
    let (status, _) = get(&router, "/ui/audit", &cookie).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_key_detail_shows_its_limit_windows_live() {
    let (router, m, engine) = setup_with_engine();
    let (_, admin) = create(&m, r#"{"name": "admin", "permissions": ["*"]}"#).await;
    let (id, _) = create(
        &m,
        r#"{"name": "<b>ten</b>", "rate_limit": {"requests_per_minute": 10}, "max_parallel": 2}"#,
    )
    .await;
    let rec = m
        .store()
        .get_key(&vault_core::key::KeyId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    let chain = [Arc::new(rec)];
    let facts = RequestFacts {
        method: "GET",
        provider: Provider::OpenAi,
        path: "/v1/models",
        model: None,
        max_output_tokens: None,
        body_chars: 0,
        stream: false,
        input_tokens_bound: 0,
        input_unbounded: false,
        output_multiplier: 0,
        multipart: false,
    };
    for _ in 0..3 {
        engine.check(&chain, &facts).await.unwrap();
    }
    let cookie = sign_in(&router, &admin).await;
    let (status, html) = get(&router, &format!("/ui/keys/{id}"), &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("<h2>Limits</h2>"), "{html}");
    assert!(html.contains("requests per minute"), "{html}");
    assert!(html.contains("3 / 10"), "{html}");
    // The grants were dropped: nothing is in flight.
    assert!(html.contains("0 / 2"), "{html}");
    assert!(!html.contains("<b>ten</b>"), "names are escaped");
    // Showing the page counted nothing: the next call is the fourth.
    let g = engine.check(&chain, &facts).await.unwrap();
    assert_eq!((g.headers.limit, g.headers.remaining), (10, 6));
    let (_, html) = get(&router, &format!("/ui/keys/{id}"), &cookie).await;
    assert!(html.contains("4 / 10"), "{html}");
}

/// The session's CSRF token, read from a page's form.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    html[at..at + 64].to_owned()
}

async fn post(
    router: &Router,
    path: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> (StatusCode, String) {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let r = router
        .clone()
        .oneshot(
            Request::post(path)
                .header("host", "dash.test")
                .header("origin", "http://dash.test")
                .header("cookie", cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = r.status();
    let location = r
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned());
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    (status, location.unwrap_or(text))
}

/// Two projects, `alpha` and `beta`, one agent key in each; the router, its
/// manager, an organisation-wide key and `alpha`'s `keys:manage` key.
async fn two_projects() -> (Router, Manager, String, String) {
    let (router, m) = setup();
    let (_, org) = create(
        &m,
        r#"{"name": "org", "project": "*", "permissions": ["*"]}"#,
    )
    .await;
    let (_, lead) = create(
        &m,
        r#"{"name": "lead", "project": "alpha", "permissions": ["keys:manage"]}"#,
    )
    .await;
    create(&m, r#"{"name": "alpha-agent", "project": "alpha"}"#).await;
    create(&m, r#"{"name": "beta-agent", "project": "beta"}"#).await;
    (router, m, org, lead)
}

/// docs/dashboard.md#projects: an organisation-wide key's pages show every
/// project until it switches to one, then only that project, and its create
/// form makes the key there.
#[tokio::test]
async fn boundary_an_organisation_wide_key_switches_projects() {
    let (router, m, org, _) = two_projects().await;
    let cookie = sign_in(&router, &org).await;
    let (_, html) = get(&router, "/ui/keys", &cookie).await;
    assert!(
        html.contains("<option value=\"\" selected>All projects</option>"),
        "{html}"
    );
    assert!(html.contains("alpha-agent") && html.contains("beta-agent"));
    assert!(html.contains("<th>Project</th>"));
    let csrf = csrf_of(&html);

    let (status, to) = post(
        &router,
        "/ui/project",
        &cookie,
        &[("csrf", &csrf), ("project", "beta"), ("back", "/ui/keys")],
    )
    .await;
    assert_eq!((status, to.as_str()), (StatusCode::SEE_OTHER, "/ui/keys"));
    let (_, html) = get(&router, "/ui/keys", &cookie).await;
    assert!(
        html.contains("beta-agent") && !html.contains("alpha-agent"),
        "{html}"
    );
    assert!(html.contains("<option value=\"beta\" selected>beta</option>"));
    assert!(
        html.contains("value=\"beta\" aria-describedby=\"f-project-hint\""),
        "the create form defaults to it"
    );

    // A key made from the form goes to the chosen project.
    let (status, _) = post(
        &router,
        "/ui/keys",
        &cookie,
        &[
            ("csrf", &csrf),
            ("name", "made-in-beta"),
            ("project", "beta"),
            ("env", "test"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let beta = m
        .list_keys(&Actor::Operator)
        .await
        .unwrap()
        .data
        .into_iter()
        .find(|k| k.name == "made-in-beta")
        .unwrap();
    assert_eq!(beta.project, "beta");

    // Not a project of this install, or a foreign `back`: refused / ignored.
    let (status, _) = post(
        &router,
        "/ui/project",
        &cookie,
        &[("csrf", &csrf), ("project", "gamma")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, to) = post(
        &router,
        "/ui/project",
        &cookie,
        &[
            ("csrf", &csrf),
            ("project", ""),
            ("back", "//evil.test/ui/"),
        ],
    )
    .await;
    assert_eq!(to, "/ui/");
    let (_, html) = get(&router, "/ui/keys", &cookie).await;
    assert!(
        html.contains("alpha-agent") && html.contains("beta-agent"),
        "every project again"
    );
}

/// docs/dashboard.md#projects: a project's key has no switcher, cannot post
/// one, and sees its project only.
#[tokio::test]
async fn boundary_a_project_key_cannot_switch_projects() {
    let (router, _, _, lead) = two_projects().await;
    let cookie = sign_in(&router, &lead).await;
    let (_, html) = get(&router, "/ui/keys", &cookie).await;
    assert!(
        !html.contains("project-switch") && !html.contains("beta-agent"),
        "{html}"
    );
    let csrf = csrf_of(&html);
    let (status, _) = post(
        &router,
        "/ui/project",
        &cookie,
        &[("csrf", &csrf), ("project", "beta")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, html) = get(&router, "/ui/keys", &cookie).await;
    assert!(!html.contains("beta-agent"));
}
