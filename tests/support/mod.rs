//! Shared support for the end-to-end tests: a recording mock upstream, a
//! gateway served on loopback exactly as `vaultgate serve` mounts it, and a
//! small HTTP client (one fresh HTTP/1.1 connection per request, or raw TCP
//! for bytes no client library would send).
//!
//! Each test file uses a subset of this module.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tower::ServiceBuilder;
use vault_core::clock::{SharedClock, SystemClock};
use vault_core::crypto::{AesGcmEncryptor, MasterKey, ProviderSecret};
use vault_core::key::{KeyEnv, KeyId};
use vault_core::manage::{AddProviderKeyRequest, CreateKeyRequest, IssuedKey};
use vault_core::money::Micros;
use vault_core::policy::{BudgetPeriod, DefaultEngine, PlanSet, Policy, RateLimit};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::{BudgetLine, BudgetUsage, UsageFilter, UsageRecord};
use vault_core::store::{KeyStore, MemoryStore, SqliteStore};
use vault_tower::admin::{Actor, Admin, AdminOptions, admin_router};
use vault_tower::{
    Forwarder, RequestLimits, Timeouts, Upstream, Upstreams, VaultContext, VaultLayer,
};

/// Longest any single step of a test may take before it is a failure.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// A random token (base62), for canaries.
pub fn random_token() -> String {
    let id = KeyId::generate().unwrap();
    id.as_str().trim_start_matches("key_").to_owned()
}

// ---------------------------------------------------------------------------
// The mock upstream
// ---------------------------------------------------------------------------

/// One request the mock upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The method.
    pub method: Method,
    /// The request target exactly as received (path and query).
    pub target: String,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Recorded {
    /// The path part of the target.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query part of the target.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// One header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// What the mock upstream answers.
pub enum Reply {
    /// A complete response.
    Full {
        /// Status.
        status: StatusCode,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Bytes,
    },
    /// Headers at once, then the given chunks as separate writes.
    Chunks {
        /// Status.
        status: StatusCode,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body chunks, written one by one.
        chunks: Vec<Bytes>,
    },
    /// Headers at once, then whatever the test sends through the
    /// [`StreamHandle`] it receives from [`MockUpstream::next_stream`].
    Controlled {
        /// Status.
        status: StatusCode,
        /// Headers.
        headers: Vec<(String, String)>,
    },
    /// Never answer.
    Hang,
    /// Close the connection without a response.
    Reset,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn json(v: Value) -> Reply {
        Reply::status_json(StatusCode::OK, v)
    }

    /// A status with a JSON body.
    pub fn status_json(status: StatusCode, v: Value) -> Reply {
        Reply::Full {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(v.to_string()),
        }
    }

    /// 200 `text/event-stream`, one write per chunk.
    pub fn sse(chunks: Vec<String>) -> Reply {
        Reply::Chunks {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            chunks: chunks.into_iter().map(Bytes::from).collect(),
        }
    }

    /// 200 `text/event-stream`, driven by the test.
    pub fn controlled_sse() -> Reply {
        Reply::Controlled {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
        }
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// The sending side of a [`Reply::Controlled`] body.
pub struct StreamHandle {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// The request this stream answers.
    pub request: Recorded,
}

impl StreamHandle {
    /// Writes a chunk; `false` once the connection to the gateway is gone.
    pub async fn send(&self, chunk: impl Into<Bytes>) -> bool {
        self.tx.send(Ok(chunk.into())).await.is_ok()
    }

    /// Aborts the body mid-stream (the connection is reset).
    pub async fn fail(&self) {
        let _ = self
            .tx
            .send(Err(std::io::Error::other("mock upstream aborts")))
            .await;
    }

    /// Resolves once the gateway dropped the upstream response (the
    /// connection was closed or the request cancelled).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Ends the body normally.
    pub fn finish(self) {}
}

/// A hyper server on 127.0.0.1:0 that records every request and answers
/// with the current handler.
pub struct MockUpstream {
    /// Its address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<Mutex<Handler>>,
    streams: tokio::sync::Mutex<mpsc::UnboundedReceiver<StreamHandle>>,
    received: Arc<Notify>,
}

impl MockUpstream {
    /// Starts a mock answering an OpenAI-style completion to everything.
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let handler: Arc<Mutex<Handler>> = Arc::new(Mutex::new(Arc::new(|_: &Recorded| {
            Reply::json(openai_completion("gpt-4o-mini", 10, 5))
        })));
        let (streams_tx, streams_rx) = mpsc::unbounded_channel();
        let received = Arc::new(Notify::new());
        let state = MockState {
            requests: requests.clone(),
            handler: handler.clone(),
            streams: streams_tx,
            received: received.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { state.answer(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockUpstream {
            addr,
            url: format!("http://{addr}"),
            requests,
            handler,
            streams: tokio::sync::Mutex::new(streams_rx),
            received,
        }
    }

    /// Replaces the handler.
    pub fn on(&self, f: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        *self.handler.lock().unwrap() = Arc::new(f);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// The only request received (fails unless exactly one arrived).
    pub fn only(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one upstream request, got {}",
            all.len()
        );
        all.into_iter().next().unwrap()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// Waits for the stream of the next [`Reply::Controlled`] answer.
    pub async fn next_stream(&self) -> StreamHandle {
        let mut rx = self.streams.lock().await;
        within("the upstream stream to open", rx.recv())
            .await
            .unwrap()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for(&self, n: usize) {
        within("upstream requests", async {
            loop {
                let notified = self.received.notified();
                if self.count() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

#[derive(Clone)]
struct MockState {
    requests: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<Mutex<Handler>>,
    streams: mpsc::UnboundedSender<StreamHandle>,
    received: Arc<Notify>,
}

impl MockState {
    async fn answer(&self, req: Request<Incoming>) -> Result<Response<MockBody>, std::io::Error> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let recorded = Recorded {
            method: parts.method,
            target: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned()),
            headers: parts.headers,
            body,
        };
        self.requests.lock().unwrap().push(recorded.clone());
        self.received.notify_waiters();
        let handler = self.handler.lock().unwrap().clone();
        let (status, headers, body) = match handler(&recorded) {
            Reply::Full {
                status,
                mut headers,
                body,
            } => {
                // Like real providers: a complete answer has a Content-Length.
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                {
                    headers.push(("content-length".into(), body.len().to_string()));
                }
                (status, headers, MockBody::full(body))
            }
            Reply::Chunks {
                status,
                headers,
                chunks,
            } => (status, headers, MockBody::chunks(chunks)),
            Reply::Controlled { status, headers } => {
                let (tx, rx) = mpsc::channel(16);
                let _ = self.streams.send(StreamHandle {
                    tx,
                    request: recorded,
                });
                (status, headers, MockBody::Channel { rx })
            }
            Reply::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Reply::Reset => return Err(std::io::Error::other("mock upstream resets")),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        for (k, v) in headers {
            resp.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(&v).unwrap(),
            );
        }
        Ok(resp)
    }
}

/// The mock upstream's response body.
enum MockBody {
    Chunks {
        chunks: VecDeque<Bytes>,
        yielded: bool,
    },
    Channel {
        rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    },
}

impl MockBody {
    fn full(b: Bytes) -> Self {
        MockBody::Chunks {
            chunks: VecDeque::from([b]),
            yielded: false,
        }
    }

    fn chunks(c: Vec<Bytes>) -> Self {
        MockBody::Chunks {
            chunks: c.into(),
            yielded: false,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            MockBody::Chunks { chunks, yielded } => {
                // Yield once between chunks so each goes out as its own write.
                if *yielded {
                    *yielded = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                *yielded = true;
                Poll::Ready(chunks.pop_front().map(|c| Ok(Frame::data(c))))
            }
            MockBody::Channel { rx } => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }
}

/// An OpenAI chat completion with usage.
pub fn openai_completion(model: &str, prompt: u64, completion: u64) -> Value {
    serde_json::json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
}

/// A port nothing listens on (bound, then released).
pub async fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// How to build a [`Gateway`].
pub struct GatewayOptions {
    /// Upstream base URL per provider.
    pub upstreams: Vec<(Provider, String)>,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Request limits.
    pub limits: RequestLimits,
    /// Use a `SqliteStore` in a temporary directory instead of `MemoryStore`.
    pub sqlite: bool,
}

impl GatewayOptions {
    /// Every provider pointed at `url`, quick timeouts.
    pub fn all_at(url: &str) -> Self {
        GatewayOptions {
            upstreams: Provider::ALL.iter().map(|p| (*p, url.to_owned())).collect(),
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                response: Duration::from_secs(5),
                idle: Duration::from_secs(5),
            },
            limits: RequestLimits::default(),
            sqlite: false,
        }
    }
}

/// vaultgate on 127.0.0.1:0: the management API with the proxy as its
/// fallback, as the standalone server mounts them.
pub struct Gateway {
    /// Its address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The shared context.
    pub ctx: Arc<VaultContext>,
    /// Management operations.
    pub admin: Admin,
    /// The store.
    pub store: Arc<dyn KeyStore>,
    /// Provider keys added so far (plaintext canaries), by provider.
    canaries: Mutex<Vec<(Provider, String)>>,
    _shutdown: oneshot::Sender<()>,
    _dir: Option<tempfile::TempDir>,
}

/// The standard proxy policy of these tests: generous rate limits, so
/// every response carries meaningful `X-RateLimit-*` values.
pub fn open_policy() -> Policy {
    Policy {
        rate_limit: Some(RateLimit {
            requests_per_minute: Some(100_000),
            ..RateLimit::default()
        }),
        ..Policy::default()
    }
}

/// [`open_policy`] with a total budget.
pub fn budget_policy(usd: f64) -> Policy {
    Policy {
        budget: Some(vault_core::policy::Budget {
            limit: Micros::from_usd(usd).unwrap(),
            period: BudgetPeriod::Total,
            clamp_explicit_limits: false,
        }),
        ..open_policy()
    }
}

impl Gateway {
    /// A gateway with every provider at `url` and a provider key (a
    /// canary) for openai, anthropic, google and cohere.
    pub async fn start(url: &str) -> Gateway {
        let gw = Gateway::with(GatewayOptions::all_at(url)).await;
        for p in [
            Provider::OpenAi,
            Provider::Anthropic,
            Provider::Google,
            Provider::Cohere,
        ] {
            gw.add_provider_key(p).await;
        }
        gw
    }

    /// A gateway built from `opts`, with no provider keys yet.
    pub async fn with(opts: GatewayOptions) -> Gateway {
        let (store, dir): (Arc<dyn KeyStore>, _) = if opts.sqlite {
            let dir = tempfile::tempdir().unwrap();
            (
                Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap()),
                Some(dir),
            )
        } else {
            (Arc::new(MemoryStore::new()), None)
        };
        let clock: SharedClock = Arc::new(SystemClock);
        let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
        let engine = Arc::new(DefaultEngine::new(
            store.clone(),
            Arc::new(PriceTable::builtin()),
            clock.clone(),
        ));
        let mut upstreams = Upstreams::none();
        for (p, url) in &opts.upstreams {
            upstreams.set(*p, Upstream::new(url, opts.timeouts).unwrap());
        }
        let ctx = VaultContext::builder(store.clone(), encryptor, engine)
            .clock(clock)
            .upstreams(upstreams)
            .request_limits(opts.limits)
            .build();
        let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
        let router = admin_router(admin.clone(), AdminOptions::default()).fallback_service(
            ServiceBuilder::new()
                .layer(VaultLayer::new(ctx.clone()))
                .service(Forwarder::new(opts.timeouts)),
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
            Duration::from_millis(100),
        ));
        Gateway {
            addr,
            url: format!("http://{addr}"),
            ctx,
            admin,
            store,
            canaries: Mutex::new(Vec::new()),
            _shutdown: tx,
            _dir: dir,
        }
    }

    /// Adds a provider key `sk-CANARY-<random>` for `provider`; returns it.
    pub async fn add_provider_key(&self, provider: Provider) -> String {
        let canary = format!("sk-CANARY-{}", random_token());
        self.admin
            .manager()
            .add_provider_key(
                &Actor::Operator,
                AddProviderKeyRequest {
                    provider,
                    api_key: ProviderSecret::new(canary.clone()),
                    name: Some(format!("{provider} canary")),
                    project: None,
                },
            )
            .await
            .unwrap();
        self.canaries
            .lock()
            .unwrap()
            .push((provider, canary.clone()));
        canary
    }

    /// The canary provider key of `provider`.
    pub fn canary(&self, provider: Provider) -> String {
        self.canaries
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == provider)
            .map(|(_, c)| c.clone())
            .unwrap()
    }

    /// Every canary added.
    pub fn canaries(&self) -> Vec<String> {
        self.canaries
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Creates a key as the operator.
    pub async fn create(&self, new: CreateKeyRequest) -> IssuedKey {
        self.admin
            .manager()
            .create_key(&Actor::Operator, new)
            .await
            .unwrap()
    }

    /// A live `chat:write` key with `policy`; returns (secret, id).
    pub async fn key_with(&self, policy: Policy) -> (String, KeyId) {
        let issued = self
            .create(
                CreateKeyRequest {
                    name: Some("test".into()),
                    permissions: Some(vec!["chat:write".into()]),
                    env: Some(KeyEnv::Live),
                    ..CreateKeyRequest::default()
                }
                .with_policy(policy),
            )
            .await;
        (issued.key.expose_secret().to_owned(), issued.record.id)
    }

    /// A live `chat:write` key with [`open_policy`].
    pub async fn key(&self) -> String {
        self.key_with(open_policy()).await.0
    }

    /// A `test` (mock-provider) `chat:write` key with [`open_policy`].
    pub async fn test_key(&self) -> (String, KeyId) {
        let issued = self
            .create(
                CreateKeyRequest {
                    name: Some("test env".into()),
                    permissions: Some(vec!["chat:write".into()]),
                    env: Some(KeyEnv::Test),
                    ..CreateKeyRequest::default()
                }
                .with_policy(open_policy()),
            )
            .await;
        (issued.key.expose_secret().to_owned(), issued.record.id)
    }

    /// An operator key with `*`, for the management API.
    pub async fn admin_key(&self) -> String {
        let issued = self
            .create(CreateKeyRequest {
                name: Some("admin".into()),
                permissions: Some(vec!["*".into()]),
                env: Some(KeyEnv::Live),
                ..CreateKeyRequest::default()
            })
            .await;
        issued.key.expose_secret().to_owned()
    }

    /// Usage records of one key (after flushing the usage worker), newest first.
    pub async fn usage_of(&self, id: &KeyId) -> Vec<UsageRecord> {
        within("usage flush", self.ctx.flush()).await;
        self.store
            .list_usage(&UsageFilter {
                key_id: Some(id.clone()),
                ..UsageFilter::default()
            })
            .await
            .unwrap()
    }

    /// Settled and held amounts of a key's total budget.
    pub async fn budget(&self, id: &KeyId, limit_usd: f64) -> BudgetUsage {
        within("usage flush", self.ctx.flush()).await;
        let line = BudgetLine {
            key: id.clone(),
            limit: Micros::from_usd(limit_usd).unwrap(),
            period_start: vault_core::clock::UnixMillis(0),
        };
        self.store
            .budget_usage(&line, vault_core::clock::Clock::now(&SystemClock))
            .await
            .unwrap()
    }

    /// A request builder for `method path` with `Host` set.
    pub fn req(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
    }

    /// `POST path` with a JSON body and `Authorization: Bearer key`.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Resp {
        let req = self
            .req("POST", path)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        send(self.addr, req).await
    }

    /// A chat completion for `model` through the OpenAI route.
    pub async fn chat(&self, key: &str, model: &str) -> Resp {
        self.post(
            "/openai/v1/chat/completions",
            key,
            &serde_json::json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
    }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// A complete response.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The error code (docs/api.md#errors).
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// One header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts `X-RateLimit-Limit/Remaining/Reset` are present and numeric
    /// (limit and remaining may be `unlimited` for a key with no request limit).
    pub fn assert_limit_headers(&self) {
        for h in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            let v = self
                .header(h)
                .unwrap_or_else(|| panic!("{h} missing on a {} response", self.status));
            let unlimited = v == "unlimited" && h != "x-ratelimit-reset";
            assert!(
                unlimited || v.parse::<i64>().is_ok(),
                "{h} is not numeric: {v}"
            );
        }
    }
}

/// Opens a fresh HTTP/1.1 connection and sends `req`; the response body
/// streams.
pub async fn open(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    within("the response headers", async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    })
    .await
}

/// Sends `req` on a fresh connection and reads the whole response.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
    let resp = open(addr, req).await;
    let (parts, body) = resp.into_parts();
    let body = within("the response body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The next data frame of a streaming body (`None` at the end).
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    within("the next body chunk", async {
        loop {
            match body.frame().await {
                None => return None,
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        return Some(d);
                    }
                }
                Some(Err(e)) => panic!("body error: {e}"),
            }
        }
    })
    .await
}

/// Reads a streaming body to its end.
pub async fn read_all(body: &mut Incoming) -> Bytes {
    let mut out = Vec::new();
    while let Some(c) = next_chunk(body).await {
        out.extend_from_slice(&c);
    }
    Bytes::from(out)
}

/// Writes raw bytes on a fresh TCP connection and reads what comes back
/// until the server closes the connection (or [`STEP`] passes).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before reading everything.
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response (0 when there is none).
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A complete HTTP/1.1 request with `Connection: close` and a body.
pub fn raw_request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut s = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.into_bytes()
}

/// Asserts that nothing in `haystack` contains any of `secrets`.
pub fn assert_no_secret(haystack: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !haystack.contains(s.as_str()),
            "a secret leaked: {haystack}"
        );
    }
}

/// Everything a client saw, as one string: status, headers and body.
pub fn seen(resp: &Resp) -> String {
    let mut s = format!("{}\n", resp.status);
    for (k, v) in &resp.headers {
        s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    s.push_str(&resp.text());
    s
}
