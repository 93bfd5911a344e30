#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The forwarder's upstream connections: kept alive and reused, never
//! reused after the provider closed them or a client abandoned a body.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vault_core::provider::Provider;

const CHAT: &str = "/openai/v1/chat/completions";

/// How the raw upstream treats a connection after answering on it.
#[derive(Clone, Copy, PartialEq)]
enum AfterAnswer {
    /// Keep it open for the next request.
    KeepAlive,
    /// Close it at once, without announcing `Connection: close`.
    Close,
    /// Close it after a pause (an idle timeout on the provider's side).
    CloseLater,
}

/// A raw HTTP/1.1 upstream: counts connections and requests, records each
/// request's head, answers an OpenAI completion (or, for `"stream": true`,
/// a burst of SSE events in one write).
struct RawUpstream {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start(after: AfterAnswer) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r, h) = (connections.clone(), requests.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, after, r.clone(), h.clone()));
            }
        });
        RawUpstream {
            url,
            connections,
            requests,
            heads,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    after: AfterAnswer,
    requests: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    loop {
        // Read one request: the head, then content-length bytes of body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
        buf.drain(..head_end + length);
        requests.fetch_add(1, Ordering::SeqCst);
        heads.lock().unwrap().push(head);
        let answer = if body.contains("\"stream\":true") {
            let mut events = String::new();
            for word in ["a", "b", "c", "d", "e"] {
                let event = json!({"choices": [{"index": 0, "delta": {"content": word}}]});
                events.push_str(&format!("data: {event}\n\n"));
            }
            let usage = json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}});
            events.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}",
                events.len()
            )
        } else {
            let json = openai_completion("gpt-4o-mini", 10, 5).to_string();
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                json.len()
            )
        };
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        match after {
            AfterAnswer::KeepAlive => {}
            AfterAnswer::Close => return,
            AfterAnswer::CloseLater => {
                tokio::time::sleep(Duration::from_millis(30)).await;
                return;
            }
        }
    }
}

async fn gateway(upstream: &RawUpstream) -> (Gateway, String) {
    let gw = Gateway::start(&upstream.url).await;
    gw.add_provider_key(Provider::OpenAi).await;
    let key = gw.key().await;
    (gw, key)
}

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 50, "stream": stream,
           "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn boundary_sequential_calls_share_one_kept_alive_connection() {
    let upstream = RawUpstream::start(AfterAnswer::KeepAlive).await;
    let (gw, key) = gateway(&upstream).await;
    for i in 0..20 {
        let r = gw.post(CHAT, &key, &chat(i % 2 == 1)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(upstream.requests(), 20);
    assert_eq!(upstream.connections(), 1);
    // HTTP/1.1 origin form, with the provider's host in `Host`.
    let host = upstream.url.trim_start_matches("http://");
    for head in upstream.heads.lock().unwrap().iter() {
        assert!(
            head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("\r\nhost: {host}\r\n")),
            "{head}"
        );
    }
}

#[tokio::test]
async fn lifecycle_a_connection_the_provider_closed_while_idle_is_not_used() {
    let upstream = RawUpstream::start(AfterAnswer::CloseLater).await;
    let (gw, key) = gateway(&upstream).await;
    for _ in 0..5 {
        let r = gw.post(CHAT, &key, &chat(false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // Long enough for the close to arrive while the connection is idle.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(upstream.requests(), 5);
    assert_eq!(upstream.connections(), 5);
}

#[tokio::test]
async fn fault_a_provider_closing_after_every_answer_fails_no_call() {
    // The provider closes right after each answer, back to back with the
    // next call: that call finds the pooled connection closed (or, should
    // the close land between checkout and send, gets its unsent request back
    // and retries). Either way it succeeds and reaches the provider once.
    let upstream = RawUpstream::start(AfterAnswer::Close).await;
    let (gw, key) = gateway(&upstream).await;
    for i in 0..30 {
        let r = gw.post(CHAT, &key, &chat(i % 3 == 0)).await;
        assert_eq!(r.status, 200, "call {i}: {}", r.text());
    }
    assert_eq!(upstream.requests(), 30);
}

#[tokio::test]
async fn fault_a_connection_whose_body_the_client_abandoned_is_not_reused() {
    let upstream = MockUpstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    gw.add_provider_key(Provider::OpenAi).await;
    let key = gw.key().await;
    upstream.on(|r| {
        if r.header("x-hold").is_some() {
            Reply::controlled_sse()
        } else {
            Reply::json(openai_completion("gpt-4o-mini", 10, 5))
        }
    });
    let req = gw
        .req("POST", CHAT)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("x-hold", "1")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            chat(true).to_string(),
        )))
        .unwrap();
    let resp = open(gw.addr, req).await;
    let handle = upstream.next_stream().await;
    handle
        .send("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n")
        .await;
    let mut body = resp.into_body();
    assert!(next_chunk(&mut body).await.is_some());
    drop(body);
    // The provider sees the abandoned call's connection close.
    within("the upstream connection to close", handle.closed()).await;
    // And the next call is answered normally on another connection.
    let r = gw.post(CHAT, &key, &chat(false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn boundary_a_burst_of_events_is_metered_and_delivered_whole() {
    let upstream = RawUpstream::start(AfterAnswer::KeepAlive).await;
    let (gw, _) = gateway(&upstream).await;
    let (secret, id) = gw.key_with(budget_policy(10.0)).await;
    let r = gw.post(CHAT, &secret, &chat(true)).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let words: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(words, "abcde");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].tokens_in, usage[0].tokens_out), (7, 5));
}
