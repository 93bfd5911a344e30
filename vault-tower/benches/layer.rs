//! The whole `Vault` layer on the request path, against the bare inner
//! service it wraps: a live key (cache hit) whose policy has a rate limit, a
//! budget, and provider, endpoint and model allowlists; `MemoryStore`,
//! `AesGcmEncryptor`, `DefaultEngine`; the provider key decrypted and
//! injected, client credentials stripped, the URI rewritten; the response
//! body metered to its end (collected). The usage worker settles calls on
//! the runtime's worker threads, off the measured path, as in production.
//!
//! Run: `cargo bench -p vault-tower --bench layer -- --warm-up-time 1 --measurement-time 3`
//!
//! Allocations per request (valgrind's DHAT counts them; the difference of
//! two runs cancels the setup):
//! ```sh
//! BENCH_LAYER_ITERS=1000 valgrind --tool=dhat target/release/deps/layer-* ...
//! BENCH_LAYER_ITERS=2000 valgrind --tool=dhat target/release/deps/layer-* ...
//! ```
//! `BENCH_LAYER_ITERS=N` runs N requests through the layer and exits
//! (`BENCH_LAYER_BARE=1`: through the bare inner service).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::Criterion;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use vault_core::clock::{SystemClock, UnixMillis};
use vault_core::crypto::{Aad, AesGcmEncryptor, Encryptor, MasterKey, ProviderSecret};
use vault_core::key::{KeyEnv, KeyFormat, KeyId, KeyPrefix, ProviderKeyId};
use vault_core::money::Micros;
use vault_core::policy::{
    Budget, BudgetPeriod, DefaultEngine, EndpointRule, ModelGlob, Policy, RateLimit,
};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, KeyStatus, ProviderKeyRecord};
use vault_core::scope::Scopes;
use vault_core::store::{KeyStore, MemoryStore};
use vault_tower::{Timeouts, Upstream, Upstreams, Vault, VaultContext};

const RESPONSE: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21},"system_fingerprint":"fp_bench"}"#;

const REQUEST: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}"#;

const PROVIDER_KEY: &str = "sk-proj-bench0123456789abcdefghijklmnopqrstuvwxyzABCD";

/// The in-process upstream: a fixed OpenAI chat completion. Checks that the
/// provider key arrived, so the bench cannot pass by skipping injection.
#[derive(Clone)]
struct Upstream200 {
    expect_key: bool,
}

impl Service<Request<Full<Bytes>>> for Upstream200 {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        if self.expect_key {
            let auth = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            assert_eq!(
                auth,
                Some(format!("Bearer {PROVIDER_KEY}").as_bytes()),
                "provider key not injected"
            );
        }
        let mut resp = Response::new(Full::new(Bytes::from_static(RESPONSE.as_bytes())));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        std::future::ready(Ok(resp))
    }
}

struct Setup {
    vault: Vault<Upstream200>,
    ctx: Arc<VaultContext>,
    key: String,
}

async fn setup() -> Setup {
    let store = Arc::new(MemoryStore::new());
    let enc = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let clock = Arc::new(SystemClock);
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        clock.clone(),
    ));

    let pk_id = ProviderKeyId::generate().unwrap();
    let secret = ProviderSecret::new(PROVIDER_KEY.to_owned());
    let aad = Aad {
        record_id: pk_id.as_str(),
        project: "default",
        provider: Provider::OpenAi,
    };
    store
        .insert_provider_key(&ProviderKeyRecord {
            id: pk_id.clone(),
            project: "default".into(),
            provider: Provider::OpenAi,
            name: "bench".into(),
            sealed: enc.seal(&secret, &aad).unwrap(),
            hint: secret.hint(),
            created_at: UnixMillis(1),
        })
        .await
        .unwrap();

    let format = KeyFormat::default();
    let key = format.generate(KeyEnv::Live).unwrap();
    let policy = Policy {
        providers: Some(vec![Provider::OpenAi]),
        endpoints: Some(vec![
            EndpointRule::parse("POST /v1/chat/completions").unwrap(),
        ]),
        models: Some(vec![ModelGlob::parse("gpt-4o-mini*").unwrap()]),
        budget: Some(Budget {
            limit: Micros(1_000_000_000_000),
            period: BudgetPeriod::Total,
            clamp_explicit_limits: false,
        }),
        rate_limit: Some(RateLimit {
            requests_per_minute: Some(1_000_000_000_000),
            requests_per_day: Some(1_000_000_000_000),
            ..RateLimit::default()
        }),
        ..Policy::default()
    };
    store
        .insert_key(
            &KeyRecord {
                id: KeyId::generate().unwrap(),
                hash: key.hash(),
                prefix: KeyPrefix::new(&key.expose_secret()[..13]),
                previous_hash: None,
                previous_valid_until: None,
                name: "bench".into(),
                project: "default".into(),
                env: KeyEnv::Live,
                scopes: Scopes::parse(&["chat:write"]).unwrap(),
                plan: None,
                policy,
                parent: None,
                provider_keys: Vec::new(),
                created_at: UnixMillis(1),
                expires_at: None,
                last_used_at: None,
                request_count: 0,
                status: KeyStatus::Active,
                revoked_at: None,
                spend: Micros::ZERO,
            },
            None,
        )
        .await
        .unwrap();

    let upstreams = Upstreams::none().with(
        Provider::OpenAi,
        Upstream::new("http://127.0.0.1:9", Timeouts::default()).unwrap(),
    );
    let ctx = VaultContext::builder(store, enc, engine)
        .clock(clock)
        .upstreams(upstreams)
        .build();
    Setup {
        vault: Vault::new(Upstream200 { expect_key: true }, ctx.clone()),
        ctx,
        key: key.expose_secret().to_owned(),
    }
}

fn request(path: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(AUTHORIZATION, format!("Bearer {key}"))
        .header(CONTENT_TYPE, "application/json")
        .header("content-length", REQUEST.len())
        .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))
        .unwrap()
}

async fn through_vault(vault: &mut Vault<Upstream200>, key: &str) -> Bytes {
    let resp = vault
        .ready()
        .await
        .unwrap()
        .call(request("/openai/v1/chat/completions", key))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap().to_bytes()
}

async fn through_bare(inner: &mut Upstream200, key: &str) -> Bytes {
    let resp = inner
        .ready()
        .await
        .unwrap()
        .call(request("/v1/chat/completions", key))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap().to_bytes()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn layer(c: &mut Criterion) {
    let rt = runtime();
    let Setup {
        mut vault,
        ctx,
        key,
    } = rt.block_on(setup());
    // Warm the key cache and the provider-key cache.
    rt.block_on(through_vault(&mut vault, &key));
    let mut bare = Upstream200 { expect_key: false };

    let mut group = c.benchmark_group("layer");
    group.bench_function("bare_inner", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(through_bare(&mut bare, &key).await);
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("vault_cache_hit", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(through_vault(&mut vault, &key).await);
                }
                let took = start.elapsed();
                // Let the usage worker catch up outside the measured time,
                // so reservations do not pile up in the store.
                ctx.flush().await;
                took
            })
        });
    });
    group.finish();
}

/// `BENCH_LAYER_ITERS=N`: N requests and exit, for allocation counting.
fn drive(iters: u64) {
    let rt = runtime();
    let Setup {
        mut vault,
        ctx,
        key,
    } = rt.block_on(setup());
    let bare = std::env::var_os("BENCH_LAYER_BARE").is_some();
    let mut inner = Upstream200 { expect_key: false };
    rt.block_on(async {
        for _ in 0..iters {
            if bare {
                black_box(through_bare(&mut inner, &key).await);
            } else {
                black_box(through_vault(&mut vault, &key).await);
            }
        }
        ctx.flush().await;
    });
}

fn main() {
    if let Some(n) = std::env::var("BENCH_LAYER_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        drive(n);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    layer(&mut c);
    c.final_summary();
}
