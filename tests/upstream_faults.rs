#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Upstream faults over real HTTP: timeouts, errors, redirects, refused
//! connections and malformed streams (docs/threat-model.md, H1, H2, H4, E4; the
//! settlement rules of docs/budgets.md#settlement).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{Value, json};
use support::*;
use vault_core::money::Micros;
use vault_core::provider::Provider;
use vault_tower::Timeouts;

const CHAT: &str = "/openai/v1/chat/completions";

/// A gateway whose upstream gives up quickly.
async fn impatient(url: &str) -> Gateway {
    let mut opts = GatewayOptions::all_at(url);
    opts.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        response: Duration::from_millis(300),
        idle: Duration::from_millis(300),
    };
    let gw = Gateway::with(opts).await;
    gw.add_provider_key(Provider::OpenAi).await;
    gw
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 500, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

fn post(gw: &Gateway, key: &str, body: &Value) -> http::Request<Full<Bytes>> {
    gw.req("POST", CHAT)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

// docs/threat-model.md, H1 (no response headers → 504; the call was sent, so it
// is charged)
#[tokio::test]
async fn boundary_upstream_that_never_answers_is_504_and_charged() {
    let up = MockUpstream::start().await;
    let gw = impatient(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::Hang);
    let r = gw.post(CHAT, &key, &chat(false)).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(r.code(), "upstream_timeout");
    r.assert_limit_headers();
    assert_eq!(up.count(), 1);

    let usage = gw.usage_of(&id).await;
    assert_eq!(usage[0].status, 504);
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert!(
        budget.settled > Micros::ZERO,
        "a stalled call is never free"
    );
    assert_eq!(usage[0].cost, budget.settled);
}

// docs/threat-model.md, H1 (headers, then silence past the idle timeout),
// H5-style cut
#[tokio::test]
async fn boundary_stream_silent_past_idle_timeout_ends_with_error_event_and_is_charged() {
    let up = MockUpstream::start().await;
    let gw = impatient(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::controlled_sse());

    let resp = open(gw.addr, post(&gw, &key, &chat(true))).await;
    let stream = up.next_stream().await;
    let held = gw.budget(&id, 5.0).await.reserved;
    assert!(held > Micros::ZERO);
    let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    assert!(stream.send(first).await);
    let mut body = resp.into_body();
    assert_eq!(next_chunk(&mut body).await.unwrap(), first);
    // Now the upstream stays silent.
    let rest = String::from_utf8(read_all(&mut body).await.to_vec()).unwrap();
    assert!(rest.starts_with("event: error\n"), "{rest}");
    assert!(rest.contains("upstream_timeout"), "{rest}");
    assert!(rest.ends_with("\n\n"));
    // The gateway dropped the upstream connection.
    within("the upstream to be dropped", stream.closed()).await;

    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert_eq!(
        budget.settled, held,
        "nothing metered: the reservation is charged, never zero"
    );
    assert_eq!(gw.usage_of(&id).await[0].cost, held);
}

// docs/threat-model.md, H1/H5 (a stream reset mid-body)
#[tokio::test]
async fn boundary_stream_reset_mid_body_ends_with_error_event_and_is_charged() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::controlled_sse());
    let resp = open(gw.addr, post(&gw, &key, &chat(true))).await;
    let stream = up.next_stream().await;
    let held = gw.budget(&id, 5.0).await.reserved;
    let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    assert!(stream.send(first).await);
    let mut body = resp.into_body();
    assert_eq!(next_chunk(&mut body).await.unwrap(), first);
    stream.fail().await;
    let rest = String::from_utf8(read_all(&mut body).await.to_vec()).unwrap();
    assert!(rest.starts_with("event: error\n"), "{rest}");
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert_eq!(budget.settled, held);
}

// docs/threat-model.md, H4 (429, 500, 503 pass through with vaultgate's
// headers)
#[tokio::test]
async fn boundary_upstream_errors_pass_through_with_limit_headers() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;

    up.on(|_| Reply::Full {
        status: StatusCode::TOO_MANY_REQUESTS,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "7".into()),
        ],
        body: Bytes::from(r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#),
    });
    let r = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.json()["error"]["message"], "Rate limit reached");
    r.assert_limit_headers();
    assert!(r.header("x-budget-remaining-usd").is_some());

    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        up.on(move |_| {
            Reply::status_json(
                status,
                json!({"error": {"message": format!("upstream says {status}")}}),
            )
        });
        let r = gw.chat(&key, "gpt-4o-mini").await;
        assert_eq!(r.status, status);
        assert_eq!(
            r.json()["error"]["message"],
            format!("upstream says {status}")
        );
        r.assert_limit_headers();
    }
    let usage = gw.usage_of(&id).await;
    let statuses: Vec<u16> = usage.iter().map(|u| u.status).collect();
    assert_eq!(statuses, [503, 500, 429]);
    assert_eq!(gw.budget(&id, 5.0).await.reserved, Micros::ZERO);
}

// docs/threat-model.md, H4, E4 (redirects are never followed: credentials never
// go to a Location host)
#[tokio::test]
async fn leak_redirect_to_another_host_is_not_followed() {
    let up = MockUpstream::start().await;
    let elsewhere = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let location = format!("{}/v1/chat/completions", elsewhere.url);
    for status in [
        StatusCode::FOUND,
        StatusCode::MOVED_PERMANENTLY,
        StatusCode::TEMPORARY_REDIRECT,
    ] {
        let loc = location.clone();
        up.on(move |_| Reply::Full {
            status,
            headers: vec![("location".into(), loc.clone())],
            body: Bytes::new(),
        });
        let r = gw.chat(&key, "gpt-4o-mini").await;
        assert_eq!(r.status, status);
        assert_eq!(r.header("location"), Some(location.as_str()));
        r.assert_limit_headers();
    }
    assert_eq!(up.count(), 3);
    assert_eq!(elsewhere.count(), 0, "a redirect was followed");
}

// docs/threat-model.md, H4 (connection refused → 502;
// docs/budgets.md#settlement: never sent → released)
#[tokio::test]
async fn boundary_connection_refused_is_502_and_releases_the_reservation() {
    let refused = refused_url().await;
    let gw = impatient(&refused).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    let r = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.code(), "upstream_unavailable");
    r.assert_limit_headers();
    assert_no_secret(&seen(&r), &gw.canaries());

    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].status, 502);
    assert_eq!(usage[0].cost, Micros::ZERO);
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO, "the reservation is released");
    assert_eq!(
        budget.settled,
        Micros::ZERO,
        "a call that never left costs nothing"
    );
}

// docs/threat-model.md, H4 (a reset before any response: sent, so charged; 502)
#[tokio::test]
async fn boundary_connection_reset_before_headers_is_502_and_charged() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::Reset);
    let r = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.code(), "upstream_unavailable");
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert!(
        budget.settled > Micros::ZERO,
        "the request reached the provider; it may bill it"
    );
}

/// Splits `bytes` into pieces at odd offsets (inside multibyte characters
/// and `\r\n\r\n` included).
fn split_bytes(bytes: &[u8], sizes: &[usize]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < bytes.len() {
        let end = (i + sizes[k % sizes.len()]).min(bytes.len());
        out.push(Bytes::copy_from_slice(&bytes[i..end]));
        i = end;
        k += 1;
    }
    out
}

// docs/threat-model.md, H2 (malformed SSE: bytes unchanged, no panic,
// conservative charge)
#[tokio::test]
async fn corruption_malformed_sse_passes_through_unchanged() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(50.0)).await;
    let ok = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"żółw ✓\"}}]}";
    let streams: Vec<(&str, Vec<u8>)> = vec![
        ("split everywhere, no [DONE]", format!("{ok}\r\n\r\n{ok}\r\n\r\n").into_bytes()),
        ("non-JSON data", b"data: this is not json\n\ndata: {\"broken\": \n\ndata: ]]]\n\n".to_vec()),
        (
            "comments, fields, multi-line data, mixed endings",
            format!(": keep-alive\n\nevent: delta\nid: 7\nretry: 1000\ndata: {{\"a\":\ndata: 1}}\r\r{ok}\n\n").into_bytes(),
        ),
        ("no trailing blank line", format!("{ok}\n\n{ok}").into_bytes()),
        ("invalid UTF-8", b"data: \xff\xfe\xc3\x28\n\n".to_vec()),
        ("a lone \\r at the end", format!("{ok}\r").into_bytes()),
    ];
    let sizes = [1, 3, 2, 7, 5, 11];
    for asked in [true, false] {
        for (name, bytes) in &streams {
            let pieces = split_bytes(bytes, &sizes);
            up.on(move |_| Reply::Chunks {
                status: StatusCode::OK,
                headers: vec![("content-type".into(), "text/event-stream".into())],
                chunks: pieces.clone(),
            });
            let mut body = chat(true);
            if asked {
                body["stream_options"] = json!({"include_usage": true});
            }
            let resp = open(gw.addr, post(&gw, &key, &body)).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let got = read_all(&mut resp.into_body()).await;
            assert_eq!(
                &got[..],
                &bytes[..],
                "{name} (client asked for usage: {asked})"
            );
        }
    }

    // A 10 MB line with no newline, written in 64 KiB pieces.
    let mut huge = b"data: {\"x\":\"".to_vec();
    huge.resize(10 << 20, b'a');
    let pieces = split_bytes(&huge, &[64 << 10]);
    for asked in [true, false] {
        let p = pieces.clone();
        up.on(move |_| Reply::Chunks {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            chunks: p.clone(),
        });
        let mut body = chat(true);
        if asked {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = open(gw.addr, post(&gw, &key, &body)).await;
        let got = read_all(&mut resp.into_body()).await;
        assert_eq!(got.len(), huge.len());
        assert!(
            got[..] == huge[..],
            "the 10 MB line passes unchanged (asked: {asked})"
        );
    }

    // Nothing usable was metered: every call was charged its reservation,
    // none is left held, and the gateway still serves.
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), streams.len() * 2 + 2);
    assert!(
        usage
            .iter()
            .all(|u| u.cost > Micros::ZERO && u.status == 200)
    );
    assert_eq!(gw.budget(&id, 50.0).await.reserved, Micros::ZERO);
    up.on(|_| Reply::json(openai_completion("gpt-4o-mini", 3, 2)));
    assert_eq!(gw.chat(&key, "gpt-4o-mini").await.status, StatusCode::OK);
}
