#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! A panicking inner service (docs/threat-model.md, C6): the client gets a
//! generic 500 with the JSON error body of docs/api.md#errors — no panic text,
//! no secret — the server keeps serving, and the call's reservation is settled,
//! not left held.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tower::ServiceBuilder;
use vault_core::clock::{SharedClock, SystemClock};
use vault_core::crypto::{AesGcmEncryptor, MasterKey, ProviderSecret};
use vault_core::key::{KeyEnv, KeyId};
use vault_core::manage::{AddProviderKeyRequest, CreateKeyRequest};
use vault_core::money::Micros;
use vault_core::policy::{DefaultEngine, PlanSet};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::store::{KeyStore, MemoryStore};
use vault_tower::admin::{Actor, Admin};
use vault_tower::{Upstream, Upstreams, VaultContext, VaultLayer};

/// What the inner service does, chosen by the request's `x-inner` header.
const EXPLODE: &str = "explode";
const EXPLODE_IN_BODY: &str = "explode-in-body";

/// The inner service's response body: complete, or one that panics when
/// first polled.
enum InnerBody {
    Full(Full<Bytes>),
    Panic(String),
}

impl Body for InnerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            InnerBody::Full(b) => Pin::new(b).poll_frame(cx),
            InnerBody::Panic(msg) => panic!("{msg}"),
        }
    }
}

/// The inner service: answers an OpenAI completion, or panics with a
/// message holding the provider credential it was given.
async fn inner(req: Request<axum::body::Body>) -> Result<Response<InnerBody>, Infallible> {
    let credential = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let message = format!("inner service exploded while holding {credential}");
    match req.headers().get("x-inner").map(|v| v.as_bytes()) {
        Some(b) if b == EXPLODE.as_bytes() => panic!("{message}"),
        Some(b) if b == EXPLODE_IN_BODY.as_bytes() => Ok(Response::new(InnerBody::Panic(message))),
        _ => {
            let body = openai_completion("gpt-4o-mini", 10, 5).to_string();
            let mut resp = Response::new(InnerBody::Full(Full::new(Bytes::from(body))));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok(resp)
        }
    }
}

struct Served {
    addr: std::net::SocketAddr,
    ctx: Arc<VaultContext>,
    store: Arc<dyn KeyStore>,
    canary: String,
    key: String,
    id: KeyId,
    _shutdown: oneshot::Sender<()>,
}

const BUDGET_USD: f64 = 5.0;

/// `Vault` over [`inner`], served on loopback as `vaultgate serve` would.
async fn serve() -> Served {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let clock: SharedClock = Arc::new(SystemClock);
    let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        clock.clone(),
    ));
    let timeouts = GatewayOptions::all_at("http://127.0.0.1:9").timeouts;
    let mut upstreams = Upstreams::none();
    // Never dialled: the inner service answers.
    upstreams.set(
        Provider::OpenAi,
        Upstream::new("http://127.0.0.1:9", timeouts).unwrap(),
    );
    let ctx = VaultContext::builder(store.clone(), encryptor, engine)
        .clock(clock)
        .upstreams(upstreams)
        .build();
    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    let canary = format!("sk-CANARY-{}", random_token());
    admin
        .manager()
        .add_provider_key(
            &Actor::Operator,
            AddProviderKeyRequest {
                provider: Provider::OpenAi,
                api_key: ProviderSecret::new(canary.clone()),
                name: Some("canary".into()),
                project: None,
            },
        )
        .await
        .unwrap();
    let issued = admin
        .manager()
        .create_key(
            &Actor::Operator,
            CreateKeyRequest {
                name: Some("panics".into()),
                permissions: Some(vec!["chat:write".into()]),
                env: Some(KeyEnv::Live),
                ..CreateKeyRequest::default()
            }
            .with_policy(budget_policy(BUDGET_USD)),
        )
        .await
        .unwrap();
    let router = axum::Router::new().fallback_service(
        ServiceBuilder::new()
            .layer(VaultLayer::new(ctx.clone()))
            .service(tower::service_fn(inner)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(vault_tower::server::serve(
        listener,
        router,
        async {
            let _ = rx.await;
        },
        std::time::Duration::from_millis(100),
    ));
    Served {
        addr,
        ctx,
        store,
        canary,
        key: issued.key.expose_secret().to_owned(),
        id: issued.record.id,
        _shutdown: tx,
    }
}

impl Served {
    fn chat(&self, inner_action: &str) -> Request<Full<Bytes>> {
        let body = serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
        Request::builder()
            .method("POST")
            .uri("/openai/v1/chat/completions")
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .header("x-inner", inner_action)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    async fn budget(&self) -> vault_core::record::BudgetUsage {
        within("usage flush", self.ctx.flush()).await;
        let line = vault_core::record::BudgetLine {
            key: self.id.clone(),
            limit: Micros::from_usd(BUDGET_USD).unwrap(),
            period_start: vault_core::clock::UnixMillis(0),
        };
        self.store
            .budget_usage(&line, vault_core::clock::Clock::now(&SystemClock))
            .await
            .unwrap()
    }

    async fn usage_statuses(&self) -> Vec<u16> {
        within("usage flush", self.ctx.flush()).await;
        self.store
            .list_usage(&vault_core::record::UsageFilter {
                key_id: Some(self.id.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .iter()
            .map(|r| r.status)
            .collect()
    }
}

#[tokio::test]
async fn leak_panicking_inner_service_is_a_generic_500_and_is_settled() {
    let s = serve().await;

    let resp = send(s.addr, s.chat(EXPLODE)).await;
    assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp.code(), "internal_error");
    assert_eq!(resp.json()["error"]["message"], "internal error");
    resp.assert_limit_headers();
    let seen = seen(&resp);
    assert!(!seen.contains("exploded"), "the panic text leaked: {seen}");
    assert_no_secret(&seen, &[s.canary.clone(), s.key.clone()]);

    // It may have reached the provider: charged its worst case, nothing held.
    let after_panic = s.budget().await;
    assert_eq!(after_panic.reserved, Micros::ZERO, "{after_panic:?}");
    assert!(after_panic.settled > Micros::ZERO, "{after_panic:?}");
    assert_eq!(s.usage_statuses().await, vec![500]);

    // The server keeps serving, on a new connection and the same key.
    let ok = send(s.addr, s.chat("answer")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.json()["usage"]["completion_tokens"], 5);
    let after_ok = s.budget().await;
    assert_eq!(after_ok.reserved, Micros::ZERO);
    assert!(after_ok.settled > after_panic.settled);
}

#[tokio::test]
async fn leak_panicking_response_body_cuts_the_response_and_is_settled() {
    let s = serve().await;

    // The headers may or may not have left before the body panicked; either
    // way the client never sees a complete response or the panic text.
    let stream = TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    match within("the response", sender.send_request(s.chat(EXPLODE_IN_BODY))).await {
        Err(_) => {}
        Ok(resp) => {
            assert_eq!(resp.status(), StatusCode::OK);
            let body = within("the body", resp.into_body().collect()).await;
            assert!(body.is_err(), "a body that panicked looked complete");
        }
    }

    let usage = s.budget().await;
    assert_eq!(usage.reserved, Micros::ZERO, "{usage:?}");
    assert!(usage.settled > Micros::ZERO, "{usage:?}");
    assert_eq!(s.usage_statuses().await, vec![200]);

    let ok = send(s.addr, s.chat("answer")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
}
