#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! `/metrics` behind `protect_metrics = true` needs a key with `usage:read`
//! (docs/configuration.md): a `chat:write`-only key is refused.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::*;
use vault_core::key::KeyEnv;
use vault_core::manage::CreateKeyRequest;
use vault_tower::admin::{AdminOptions, admin_router};

#[tokio::test]
async fn leak_protected_metrics_need_usage_read() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let router = admin_router(
        gw.admin.clone(),
        AdminOptions {
            protect_metrics: true,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(vault_tower::server::serve(
        listener,
        router,
        std::future::pending::<()>(),
        Duration::from_millis(100),
    ));
    let key_with = |scopes: &[&str]| CreateKeyRequest {
        name: Some("metrics".into()),
        permissions: Some(scopes.iter().map(|s| (*s).to_owned()).collect()),
        env: Some(KeyEnv::Live),
        ..CreateKeyRequest::default()
    };
    let chat = gw.create(key_with(&["chat:write"])).await;
    let reader = gw.create(key_with(&["usage:read"])).await;
    let get = |key: Option<String>| {
        let mut b = http::Request::builder()
            .uri("/metrics")
            .header("host", addr.to_string());
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        send(addr, b.body(Full::new(Bytes::new())).unwrap())
    };
    assert_eq!(get(None).await.status, StatusCode::UNAUTHORIZED);
    let r = get(Some(chat.key.expose_secret().to_owned())).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.code(), "permission_denied");
    let r = get(Some(reader.key.expose_secret().to_owned())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.text().contains("# TYPE"), "{}", r.text());
}
