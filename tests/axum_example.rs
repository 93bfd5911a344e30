#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Runs `examples/axum_app.rs`: the vault layer inside an existing axum app
//! guards `/llm/*` and leaves the app's own routes alone (docs/threat-model.md,
//! A1, A7, E1).

mod support;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/axum_app.rs"]
mod app;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::json;
use support::*;

async fn serve_example() -> (std::net::SocketAddr, app::DemoKeys) {
    let (ctx, keys) = app::demo_vault(None).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app::app(ctx)).await });
    (addr, keys)
}

fn req(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

#[tokio::test]
async fn lifecycle_axum_app_guards_only_its_llm_routes() {
    let (addr, keys) = serve_example().await;
    assert!(keys.test_key.starts_with("vpx_test_"));
    assert!(keys.live_key.is_none());

    // The app's own route needs no key, and ignores one.
    let r = send(addr, req(addr, "GET", "/hello", None, "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello from an ordinary route\n");
    let r = send(addr, req(addr, "GET", "/hello", Some("garbage"), "")).await;
    assert_eq!(r.status, StatusCode::OK);

    // The nested vault: the provider path follows `/llm`.
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let r = send(
        addr,
        req(
            addr,
            "POST",
            "/llm/openai/v1/chat/completions",
            Some(&keys.test_key),
            &chat,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    r.assert_limit_headers();
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some("10"),
        "the free plan's 10 requests per minute"
    );

    // Without a key: 401.
    let r = send(
        addr,
        req(addr, "POST", "/llm/openai/v1/chat/completions", None, &chat),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "missing_api_key");
    r.assert_limit_headers();

    // Paths outside the provider layout are refused by the vault too.
    let r = send(
        addr,
        req(addr, "POST", "/llm/../hello", Some(&keys.test_key), &chat),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "invalid_request");
}

/// The layer drops into `Router::layer(..)` with no adapter: here it guards
/// a whole router whose fallback forwards upstream.
#[tokio::test]
async fn lifecycle_router_layer_needs_no_adapter() {
    let (ctx, keys) = app::demo_vault(None).await.unwrap();
    let router = axum::Router::new()
        .fallback_service(vault_tower::Forwarder::default())
        .layer(vault_tower::VaultLayer::new(ctx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 3, "messages": []}).to_string();
    let path = "/openai/v1/chat/completions";
    let r = send(addr, req(addr, "POST", path, Some(&keys.test_key), &chat)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    let r = send(addr, req(addr, "POST", path, None, &chat)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
