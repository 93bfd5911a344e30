#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Slow and oversized clients over real HTTP (docs/threat-model.md, G1): a body
//! trickled at one byte per second is answered 408 `request_timeout` once the
//! body timeout passes, and nothing reaches the upstream; `max_request_chars`
//! counts characters, not bytes, end to end.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vault_core::policy::Policy;
use vault_core::provider::Provider;
use vault_tower::RequestLimits;

/// The gateway's body timeout in these tests.
const BODY_TIMEOUT: Duration = Duration::from_secs(1);

async fn gateway(up: &MockUpstream) -> Gateway {
    let mut opts = GatewayOptions::all_at(&up.url);
    opts.limits = RequestLimits {
        body_timeout: BODY_TIMEOUT,
        ..RequestLimits::default()
    };
    let gw = Gateway::with(opts).await;
    gw.add_provider_key(Provider::OpenAi).await;
    gw
}

/// A parsed raw HTTP/1.1 response.
struct RawResponse {
    status: u16,
    body: Value,
}

/// Reads one complete response (head and `Content-Length` body).
async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> RawResponse {
    let mut buf = Vec::new();
    within("a complete response", async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed before a complete response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            if body.len() >= len {
                return RawResponse {
                    status: raw_status(head),
                    body: serde_json::from_str(&body[..len]).unwrap(),
                };
            }
        }
    })
    .await
}

/// Sends a request head with `framing` at once, then one of `pieces` per
/// second, while waiting for the response; returns it and how long it took.
async fn trickle(
    gw: &Gateway,
    key: &str,
    framing: &str,
    pieces: Vec<&'static [u8]>,
) -> (RawResponse, Duration) {
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n{framing}\r\n"
    );
    let started = Instant::now();
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for piece in pieces {
            if write.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Keep the connection open; the gateway must not wait for more.
        std::future::pending::<()>().await;
    });
    let resp = read_response(&mut read).await;
    let took = started.elapsed();
    writer.abort();
    (resp, took)
}

#[tokio::test]
async fn boundary_slow_loris_body_is_408_after_the_body_timeout() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let (key, id) = gw.key_with(open_policy()).await;

    // 100 bytes announced, one sent per second; and a chunked body of
    // one-byte chunks, one per second. Both at once, to keep the test short.
    let byte: &'static [u8] = b"{";
    let chunk: &'static [u8] = b"1\r\n{\r\n";
    let ((length, length_took), (chunked, chunked_took)) = tokio::join!(
        trickle(&gw, &key, "Content-Length: 100\r\n", vec![byte; 100]),
        trickle(
            &gw,
            &key,
            "Transfer-Encoding: chunked\r\n",
            vec![chunk; 100]
        ),
    );
    for (resp, took) in [(&length, length_took), (&chunked, chunked_took)] {
        assert_eq!(resp.status, 408, "{}", resp.body);
        assert_eq!(resp.body["error"]["code"], "request_timeout");
        assert!(
            took >= BODY_TIMEOUT,
            "answered before the body timeout: {took:?}"
        );
        assert!(
            took < BODY_TIMEOUT * 4,
            "the body timeout was not enforced: {took:?}"
        );
    }
    assert_eq!(up.count(), 0, "a timed-out body reached the upstream");
    let statuses: Vec<u16> = gw.usage_of(&id).await.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![408, 408]);

    // The gateway still serves.
    let ok = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
}

#[tokio::test]
async fn boundary_max_request_chars_counts_characters_not_bytes() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let (key, _) = gw
        .key_with(Policy {
            max_request_chars: Some(10),
            ..open_policy()
        })
        .await;
    let post = |body: &'static str| {
        let req = gw
            .req("POST", "/openai/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap();
        send(gw.addr, req)
    };

    // Ten characters, four of them four-byte emoji: 22 bytes.
    let multibyte = r#"{"😀😀😀😀":1}"#;
    assert_eq!((multibyte.chars().count(), multibyte.len()), (10, 22));
    let resp = post(multibyte).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(up.only().body.as_ref(), multibyte.as_bytes());

    // Eleven ASCII characters (11 bytes): over the limit.
    up.clear();
    let ascii = r#"{"abcde":1}"#;
    assert_eq!((ascii.chars().count(), ascii.len()), (11, 11));
    let resp = post(ascii).await;
    assert_eq!(
        resp.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        resp.text()
    );
    assert_eq!(resp.code(), "request_too_large");
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("11 characters")
    );
    resp.assert_limit_headers();
    assert_eq!(up.count(), 0);
}
