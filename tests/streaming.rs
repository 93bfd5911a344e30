#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Streaming and metering over real HTTP: chunks pass unbuffered, usage is read
//! in every provider format, the OpenAI usage chunk is asked for and hidden,
//! and a client that walks away is still metered (docs/threat-model.md, H2, H5;
//! docs/budgets.md#settlement, docs/api.md#streaming).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{Value, json};
use support::*;
use vault_core::money::Micros;
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;

fn post(gw: &Gateway, path: &str, key: &str, body: &Value) -> http::Request<Full<Bytes>> {
    gw.req("POST", path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn openai_chunk(text: &str) -> String {
    let v = json!({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

fn openai_usage_chunk(prompt: u64, completion: u64) -> String {
    let v = json!({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
                   "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
    format!("data: {v}\n\n")
}

// Unbuffered streaming (docs/api.md#streaming; docs/threat-model.md, H2
// "unbuffered")
#[tokio::test]
async fn boundary_first_sse_chunk_reaches_the_client_before_the_upstream_finishes() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    up.on(|_| Reply::controlled_sse());
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let resp = open(
        gw.addr,
        post(&gw, "/openai/v1/chat/completions", &key, &body),
    )
    .await;
    let stream = up.next_stream().await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();

    // The upstream holds the rest until the client has the first chunk.
    assert!(stream.send(openai_chunk("Hel")).await);
    let first = next_chunk(&mut body).await.unwrap();
    assert_eq!(first, openai_chunk("Hel"));
    assert!(stream.send(openai_chunk("lo")).await);
    assert_eq!(next_chunk(&mut body).await.unwrap(), openai_chunk("lo"));

    assert!(stream.send(openai_usage_chunk(9, 2)).await);
    assert!(stream.send("data: [DONE]\n\n").await);
    stream.finish();
    let rest = read_all(&mut body).await;
    assert_eq!(
        rest, "data: [DONE]\n\n",
        "only the hidden usage chunk is held back"
    );
}

/// One provider format: where to call, what to send, what the upstream
/// answers, and the usage it reports.
struct Case {
    name: &'static str,
    provider: Provider,
    model: &'static str,
    path: &'static str,
    body: Value,
    reply: fn() -> Reply,
    tokens: (u64, u64),
}

fn chunks(content_type: &str, parts: &[&str]) -> Reply {
    Reply::Chunks {
        status: StatusCode::OK,
        headers: vec![("content-type".into(), content_type.into())],
        chunks: parts.iter().map(|p| Bytes::from(p.to_string())).collect(),
    }
}

/// Splits `s` into pieces at odd offsets, so events straddle writes.
fn split_odd(s: &str) -> Vec<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut step = 7;
    while i < b.len() {
        let end = (i + step).min(b.len());
        out.push(String::from_utf8(b[i..end].to_vec()).unwrap());
        i = end;
        step = step * 3 % 41 + 5;
    }
    out
}

fn cases() -> Vec<Case> {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let gcontents = json!([{"role": "user", "parts": [{"text": "hi"}]}]);
    vec![
        Case {
            name: "openai json",
            provider: Provider::OpenAi,
            model: "gpt-4o-mini",
            path: "/openai/v1/chat/completions",
            body: json!({"model": "gpt-4o-mini", "max_tokens": 100, "messages": msgs}),
            reply: || Reply::json(openai_completion("gpt-4o-mini", 11, 7)),
            tokens: (11, 7),
        },
        Case {
            name: "openai sse",
            provider: Provider::OpenAi,
            model: "gpt-4o-mini",
            path: "/openai/v1/chat/completions",
            // Asked for usage, so the usage chunk is the client's too.
            body: json!({"model": "gpt-4o-mini", "max_tokens": 100, "stream": true,
                         "stream_options": {"include_usage": true}, "messages": msgs}),
            reply: || {
                let all = [
                    openai_chunk("a"),
                    openai_chunk("b"),
                    openai_usage_chunk(11, 7),
                    "data: [DONE]\n\n".into(),
                ]
                .concat();
                Reply::sse(split_odd(&all))
            },
            tokens: (11, 7),
        },
        Case {
            name: "anthropic json",
            provider: Provider::Anthropic,
            model: "claude-3-5-haiku-20241022",
            path: "/anthropic/v1/messages",
            body: json!({"model": "claude-3-5-haiku-20241022", "max_tokens": 100, "messages": msgs}),
            reply: || {
                Reply::json(
                    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
                    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 11, "output_tokens": 7}}),
                )
            },
            tokens: (11, 7),
        },
        Case {
            name: "anthropic sse",
            provider: Provider::Anthropic,
            model: "claude-3-5-haiku-20241022",
            path: "/anthropic/v1/messages",
            body: json!({"model": "claude-3-5-haiku-20241022", "max_tokens": 100, "stream": true, "messages": msgs}),
            reply: || {
                let ev = |n: &str, v: Value| format!("event: {n}\ndata: {v}\n\n");
                let all = [
                    ev("message_start", json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 11, "output_tokens": 1}}})),
                    ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}})),
                    ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}})),
                    ev("message_delta", json!({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 7}})),
                    ev("message_stop", json!({"type": "message_stop"})),
                ]
                .concat();
                Reply::sse(split_odd(&all))
            },
            tokens: (11, 7),
        },
        Case {
            name: "google json",
            provider: Provider::Google,
            model: "gemini-2.0-flash",
            path: "/google/v1beta/models/gemini-2.0-flash:generateContent",
            body: json!({"contents": gcontents, "generationConfig": {"maxOutputTokens": 100}}),
            reply: || {
                Reply::json(
                    json!({"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
                    "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 7, "totalTokenCount": 18}}),
                )
            },
            tokens: (11, 7),
        },
        Case {
            name: "google sse (alt=sse), running totals",
            provider: Provider::Google,
            model: "gemini-2.0-flash",
            path: "/google/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            body: json!({"contents": gcontents, "generationConfig": {"maxOutputTokens": 100}}),
            reply: || {
                let c = |n: u64| {
                    format!(
                        "data: {}\r\n\r\n",
                        json!({"candidates": [{"content": {"parts": [{"text": "x"}]}}],
                               "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": n, "totalTokenCount": 11 + n}})
                    )
                };
                Reply::sse(split_odd(&[c(2), c(5), c(7)].concat()))
            },
            tokens: (11, 7),
        },
        Case {
            name: "google json-array stream",
            provider: Provider::Google,
            model: "gemini-2.0-flash",
            path: "/google/v1beta/models/gemini-2.0-flash:streamGenerateContent",
            body: json!({"contents": gcontents, "generationConfig": {"maxOutputTokens": 100}}),
            reply: || {
                let c = |n: u64| {
                    json!({"candidates": [{"content": {"parts": [{"text": "x"}]}}],
                           "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": n, "totalTokenCount": 11 + n}})
                    .to_string()
                };
                let all = format!("[{},\r\n{},\r\n{}]", c(3), c(6), c(7));
                let parts = split_odd(&all);
                chunks(
                    "application/json",
                    &parts.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            },
            tokens: (11, 7),
        },
        Case {
            name: "cohere json (billed units)",
            provider: Provider::Cohere,
            model: "command-r",
            path: "/cohere/v2/chat",
            body: json!({"model": "command-r", "max_tokens": 100, "messages": msgs}),
            reply: || {
                Reply::json(json!({"id": "c", "finish_reason": "COMPLETE",
                    "message": {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
                    "usage": {"billed_units": {"input_tokens": 11, "output_tokens": 7},
                              "tokens": {"input_tokens": 40, "output_tokens": 7}}}))
            },
            tokens: (11, 7),
        },
        Case {
            name: "cohere sse",
            provider: Provider::Cohere,
            model: "command-r",
            path: "/cohere/v2/chat",
            body: json!({"model": "command-r", "max_tokens": 100, "stream": true, "messages": msgs}),
            reply: || {
                let ev = |n: &str, v: Value| format!("event: {n}\ndata: {v}\n\n");
                let all = [
                    ev("message-start", json!({"type": "message-start", "id": "c"})),
                    ev("content-delta", json!({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "hi"}}}})),
                    ev("message-end", json!({"type": "message-end", "delta": {"finish_reason": "COMPLETE",
                        "usage": {"billed_units": {"input_tokens": 11, "output_tokens": 7}, "tokens": {"input_tokens": 40, "output_tokens": 7}}}})),
                ]
                .concat();
                Reply::sse(split_odd(&all))
            },
            tokens: (11, 7),
        },
    ]
}

// Metering in every format (docs/budgets.md#token-classes per-provider usage;
// docs/threat-model.md, H2 "bytes unchanged"); the settled spend is the metered
// cost, not the reservation.
#[tokio::test]
async fn lifecycle_usage_is_metered_in_every_format() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let prices = PriceTable::builtin();
    let mut total = Micros::ZERO;
    let (key, id) = gw.key_with(budget_policy(10.0)).await;
    for case in cases() {
        let reply = case.reply;
        up.on(move |_| reply());
        // What the upstream sends, to compare with what the client gets.
        let expected = match reply() {
            Reply::Full { body, .. } => body,
            Reply::Chunks { chunks, .. } => Bytes::from(chunks.concat()),
            _ => unreachable!(),
        };
        let before = gw.usage_of(&id).await.len();
        let resp = open(gw.addr, post(&gw, case.path, &key, &case.body)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{}", case.name);
        let got = read_all(&mut resp.into_body()).await;
        assert_eq!(
            got, expected,
            "{}: the client receives the upstream bytes unchanged",
            case.name
        );

        let usage = gw.usage_of(&id).await;
        assert_eq!(usage.len(), before + 1, "{}", case.name);
        let rec = &usage[0];
        assert_eq!(
            (rec.tokens_in, rec.tokens_out),
            case.tokens,
            "{}: {rec:?}",
            case.name
        );
        assert_eq!(rec.provider, Some(case.provider));
        assert_eq!(rec.model.as_deref(), Some(case.model));
        assert_eq!(rec.status, 200);
        let price = prices.lookup(case.provider, case.model).unwrap();
        assert_eq!(
            rec.cost,
            price.cost(case.tokens.0, case.tokens.1),
            "{}",
            case.name
        );
        assert!(rec.cost > Micros::ZERO, "{}", case.name);
        total = total.saturating_add(rec.cost);
    }
    let budget = gw.budget(&id, 10.0).await;
    assert_eq!(budget.reserved, Micros::ZERO, "every reservation settled");
    assert_eq!(
        budget.settled, total,
        "spend is the metered cost, not the reservations"
    );
}

// docs/api.md#what-is-stripped-and-injected (OpenAI-compatible: usage asked
// with stream_options.include_usage when the client did not ask),
// docs/threat-model.md, H2 (client bytes otherwise unchanged)
#[tokio::test]
async fn boundary_openai_stream_usage_is_requested_and_hidden_unless_asked() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(open_policy()).await;
    // An upstream that honours include_usage.
    up.on(|got| {
        let body = got.json();
        let mut events = vec![openai_chunk("a"), openai_chunk("b")];
        if body["stream_options"]["include_usage"] == true {
            events.push(openai_usage_chunk(12, 2));
        }
        events.push("data: [DONE]\n\n".into());
        Reply::sse(events)
    });

    // Not asked: requested upstream, hidden from the client, still metered.
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = open(
        gw.addr,
        post(&gw, "/openai/v1/chat/completions", &key, &body),
    )
    .await;
    let got = read_all(&mut resp.into_body()).await;
    let sent = up.only().json();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        sent["messages"], body["messages"],
        "the rest of the body is untouched"
    );
    assert_eq!(
        got,
        [
            openai_chunk("a"),
            openai_chunk("b"),
            "data: [DONE]\n\n".into()
        ]
        .concat()
    );
    let usage = gw.usage_of(&id).await;
    assert_eq!((usage[0].tokens_in, usage[0].tokens_out), (12, 2));

    // Asked: passed through as sent, usage chunk included.
    up.clear();
    let body = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hi"}]});
    let raw_body = body.to_string();
    let resp = open(
        gw.addr,
        post(&gw, "/openai/v1/chat/completions", &key, &body),
    )
    .await;
    let got = read_all(&mut resp.into_body()).await;
    assert_eq!(
        up.only().body,
        raw_body,
        "a body needing no rewrite is forwarded byte for byte"
    );
    assert_eq!(
        got,
        [
            openai_chunk("a"),
            openai_chunk("b"),
            openai_usage_chunk(12, 2),
            "data: [DONE]\n\n".into()
        ]
        .concat()
    );
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 2);
    assert_eq!((usage[0].tokens_in, usage[0].tokens_out), (12, 2));
}

// docs/threat-model.md, H5 (and docs/budgets.md#settlement: a call cut short is
// charged, never free)
#[tokio::test]
async fn lifecycle_client_disconnect_mid_stream_cancels_upstream_and_settles() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::controlled_sse());
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let resp = open(
        gw.addr,
        post(&gw, "/openai/v1/chat/completions", &key, &body),
    )
    .await;
    let stream = up.next_stream().await;
    let held = gw.budget(&id, 5.0).await.reserved;
    assert!(
        held > Micros::ZERO,
        "the call holds a reservation while it streams"
    );

    let mut body = resp.into_body();
    assert!(stream.send(openai_chunk("first")).await);
    assert_eq!(next_chunk(&mut body).await.unwrap(), openai_chunk("first"));
    // The client walks away: body and connection dropped.
    drop(body);

    // The gateway drops its upstream request: the mock's writes start failing.
    within("the upstream connection to be dropped", async {
        while stream.send(openai_chunk("more")).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1, "the cut call has a usage record");
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO, "no reservation leaks");
    assert_eq!(
        budget.settled, held,
        "nothing metered: the reservation is charged"
    );
    assert_eq!(usage[0].cost, held);
}

/// Usage reaches the store within one second, with no flush asked for (the
/// usage worker batches off the request path, about every 10 ms:
/// docs/api.md#usage).
#[tokio::test]
async fn lifecycle_usage_reaches_the_store_within_one_second_unflushed() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.test_key().await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": []});
    let r = gw.post("/openai/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let sent = std::time::Instant::now();
    let filter = vault_core::record::UsageFilter {
        key_id: Some(id),
        ..Default::default()
    };
    loop {
        let rows = gw.store.list_usage(&filter).await.unwrap();
        if let Some(row) = rows.first() {
            assert_eq!((row.tokens_out, row.status), (4, 200));
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "no usage record within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
