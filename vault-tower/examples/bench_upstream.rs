//! A mock OpenAI-compatible upstream for the load harness (`bench/run.sh`).
//!
//! Answers `POST /v1/chat/completions` with a fixed chat completion: JSON, or
//! SSE (five content chunks, then a usage chunk and `[DONE]`) when the body
//! asks for `"stream": true`. Every connection gets `TCP_NODELAY`.
//!
//! It counts the requests it answers and those that carried exactly
//! `Authorization: Bearer $BENCH_PROVIDER_KEY`; `GET /_bench/count` returns
//! `total good` (that request itself is not counted), so the harness can
//! check that every proxied request reached the upstream with the injected
//! provider key.
//!
//! ```sh
//! BENCH_PROVIDER_KEY=sk-bench-... cargo run --release -p vault-tower \
//!     --example bench_upstream -- 127.0.0.1:9100 [delay_ms]
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const JSON_BODY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21},"system_fingerprint":"fp_bench"}"#;

const SSE_WORDS: [&str; 5] = ["Hello", "!", " How", " can", " I help?"];

struct State {
    expected: String,
    delay: Duration,
    total: AtomicU64,
    good: AtomicU64,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn sse_frames() -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(SSE_WORDS.len() + 3);
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n"));
    for w in SSE_WORDS {
        frames.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )));
    }
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":9,\"total_tokens\":21}}\n\n"));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

async fn handle(
    state: Arc<State>,
    sse: Arc<Vec<Bytes>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/_bench/count" {
        let text = format!(
            "{} {}\n",
            state.total.load(Ordering::Relaxed),
            state.good.load(Ordering::Relaxed)
        );
        return Ok(Response::new(Full::new(Bytes::from(text)).boxed()));
    }
    let authorized = req
        .headers()
        .get_all(AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes())
        .eq([state.expected.as_bytes()]);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    state.total.fetch_add(1, Ordering::Relaxed);
    if authorized {
        state.good.fetch_add(1, Ordering::Relaxed);
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let stream = body
        .windows(b"\"stream\":true".len())
        .any(|w| w == b"\"stream\":true");
    let mut resp = if stream {
        let mut r = Response::new(Frames(sse.iter().cloned().collect()).boxed());
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(JSON_BODY.as_bytes())).boxed());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// The SSE frames, one `poll_frame` each (the chunk boundaries a real
/// provider sends).
struct Frames(std::collections::VecDeque<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9100".to_owned())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let delay_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let key = std::env::var("BENCH_PROVIDER_KEY").unwrap_or_default();
    let state = Arc::new(State {
        expected: format!("Bearer {key}"),
        delay: Duration::from_millis(delay_ms),
        total: AtomicU64::new(0),
        good: AtomicU64::new(0),
    });
    let sse = Arc::new(sse_frames());
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "bench_upstream: listening on http://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let state = state.clone();
        let sse = sse.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), sse.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
