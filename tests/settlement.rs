#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Every way a call can end leaves one settlement and one usage record, by
//! the rules of docs/budgets.md#settlement: cut streams are charged the
//! provider's final count or else the reservation (never a running count),
//! complete error answers are free, and a call abandoned before its
//! answer's headers (client gone, an outer timeout, the inner service
//! failing or the future dropped) settles itself.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use support::*;
use tower::{Service, ServiceExt};
use vault_core::money::Micros;
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::SettledBy;
use vault_tower::Vault;

const MESSAGES: &str = "/anthropic/v1/messages";
const HAIKU: &str = "claude-3-5-haiku-20241022";

fn messages(stream: bool) -> Value {
    json!({"model": HAIKU, "max_tokens": 4000, "stream": stream,
           "messages": [{"role": "user", "content": "write a long story"}]})
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn message_start(input: u64) -> String {
    sse(
        "message_start",
        &json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": HAIKU, "content": [], "usage": {"input_tokens": input, "output_tokens": 1}}}),
    )
}

fn text_delta(text: &str) -> String {
    sse(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
    )
}

fn message_delta(output: u64) -> String {
    sse(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": output}}),
    )
}

fn post(gw: &Gateway, path: &str, key: &str, body: &Value) -> Request<Full<Bytes>> {
    gw.req("POST", path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn haiku_cost(tokens_in: u64, tokens_out: u64) -> Micros {
    PriceTable::builtin()
        .lookup(Provider::Anthropic, HAIKU)
        .unwrap()
        .cost(tokens_in, tokens_out)
}

/// A streamed call in flight through a gateway, on a key with a $5 budget.
struct InFlight {
    _up: MockUpstream,
    gw: Gateway,
    id: vault_core::key::KeyId,
    /// The client's side of the answer.
    body: hyper::body::Incoming,
    /// The upstream's side, driven by the test.
    stream: StreamHandle,
}

async fn in_flight(path: &str, request: &Value) -> InFlight {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::controlled_sse());
    let resp = open(gw.addr, post(&gw, path, &key, request)).await;
    let stream = up.next_stream().await;
    InFlight {
        _up: up,
        gw,
        id,
        body: resp.into_body(),
        stream,
    }
}

/// Waits until the gateway has dropped its upstream stream.
async fn until_dropped(stream: &StreamHandle) {
    within("the upstream connection to be dropped", async {
        while stream.send(text_delta("more")).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

// Issue #12, item 2: an Anthropic stream cut by the client after three
// deltas was settled at input + 1 output token (the `message_start` count):
// free tokens, repeatable without limit.
#[tokio::test]
async fn edge_stream_cut_by_the_client_is_charged_its_reservation_not_a_running_count() {
    let InFlight {
        gw,
        id,
        mut body,
        stream,
        ..
    } = in_flight(MESSAGES, &messages(true)).await;
    let held = gw.budget(&id, 5.0).await.reserved;
    assert!(stream.send(message_start(12)).await);
    for word in ["once", "upon", "a time"] {
        assert!(stream.send(text_delta(word)).await);
    }
    next_chunk(&mut body).await.unwrap();
    drop(body);
    until_dropped(&stream).await;

    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert!(held > haiku_cost(12, 1), "the reservation bounds the call");
    assert_eq!(
        budget.settled, held,
        "a running count is not final: the reservation is charged"
    );
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].settlement, Some(SettledBy::CutReserved));
    assert_eq!(usage[0].cost, held);
}

// The final count arrived (`message_delta`, then `message_stop`): a cut
// after it costs exactly that count.
#[tokio::test]
async fn edge_stream_cut_after_its_final_count_is_charged_that_count() {
    let InFlight {
        gw,
        id,
        mut body,
        stream,
        ..
    } = in_flight(MESSAGES, &messages(true)).await;
    assert!(stream.send(message_start(12)).await);
    assert!(stream.send(text_delta("the end")).await);
    assert!(stream.send(message_delta(40)).await);
    assert!(
        stream
            .send(sse("message_stop", &json!({"type": "message_stop"})))
            .await
    );
    next_chunk(&mut body).await.unwrap();
    stream.fail().await;
    let _ = read_all(&mut body).await;

    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert_eq!(budget.settled, haiku_cost(12, 40));
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage[0].settlement, Some(SettledBy::CutAfterFinalCount));
    assert_eq!((usage[0].tokens_in, usage[0].tokens_out), (12, 40));
}

// Issue #12, item 2: Google streams carry running totals in every chunk;
// none of them is final until the stream ends.
#[tokio::test]
async fn edge_google_stream_cut_mid_way_is_charged_its_reservation() {
    let path = "/google/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";
    let request = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                         "generationConfig": {"maxOutputTokens": 2000}});
    let InFlight {
        gw,
        id,
        mut body,
        stream,
        ..
    } = in_flight(path, &request).await;
    let held = gw.budget(&id, 5.0).await.reserved;
    let chunk = json!({"candidates": [{"content": {"parts": [{"text": "a"}], "role": "model"}}],
                       "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}});
    assert!(stream.send(format!("data: {chunk}\r\n\r\n")).await);
    next_chunk(&mut body).await.unwrap();
    drop(body);
    until_dropped(&stream).await;
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!((budget.reserved, budget.settled), (Micros::ZERO, held));
    assert_eq!(
        gw.usage_of(&id).await[0].settlement,
        Some(SettledBy::CutReserved)
    );
}

// Issue #12, item 3: a complete 429 or 500 from the provider, with no usage,
// was charged the whole reservation, and SDK retries multiplied it. The
// provider bills nothing for these.
#[tokio::test]
async fn edge_complete_upstream_error_answers_cost_nothing_and_release_their_hold() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    // Room for one call's reservation (no output limit: the model maximum).
    let (key, id) = gw.key_with(budget_policy(0.05)).await;
    let body = json!({"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]});
    for (i, status) in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ]
    .into_iter()
    .cycle()
    .take(12)
    .enumerate()
    {
        up.on(move |_| {
            Reply::status_json(
                status,
                json!({"type": "error", "error": {"type": "overloaded_error", "message": format!("try {i}")}}),
            )
        });
        let r = gw.post(MESSAGES, &key, &body).await;
        assert_eq!(r.status, status, "{}", r.text());
        // Released as the usage worker settles it (its next batch, ~10 ms;
        // an SDK's retry backoff is longer).
        assert_eq!(gw.budget(&id, 0.05).await.reserved, Micros::ZERO);
    }
    let budget = gw.budget(&id, 0.05).await;
    assert_eq!(budget.settled, Micros::ZERO, "errors are never billed");
    assert_eq!(budget.reserved, Micros::ZERO);
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 12);
    assert!(
        usage
            .iter()
            .all(|u| u.settlement == Some(SettledBy::ErrorReleased) && u.cost == Micros::ZERO)
    );
    // The budget is whole: the next call goes through and is metered.
    up.on(|_| {
        Reply::json(
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": HAIKU,
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 8, "output_tokens": 3}}),
        )
    });
    let r = gw.post(MESSAGES, &key, &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(gw.budget(&id, 0.05).await.settled, haiku_cost(8, 3));
}

// A complete success without usage is still charged its reservation
// (docs/threat-model.md, H2): an upstream that omits usage never makes a
// call free.
#[tokio::test]
async fn edge_complete_success_without_usage_is_charged_its_reservation() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::json(json!({"id": "msg_1", "type": "message", "content": []})));
    let r = gw.post(MESSAGES, &key, &messages(false)).await;
    assert_eq!(r.status, StatusCode::OK);
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage[0].settlement, Some(SettledBy::NoUsage));
    assert!(usage[0].cost > Micros::ZERO);
    assert_eq!(gw.budget(&id, 5.0).await.settled, usage[0].cost);
}

// Issue #12, item 6: a client gone while waiting for the answer's headers
// left no usage record, no request count, and a reservation held until the
// sweeper charged it in full.
#[tokio::test]
async fn edge_client_gone_before_the_headers_leaves_one_record_and_no_hold() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    up.on(|_| Reply::Hang);
    let req = post(&gw, MESSAGES, &key, &messages(false));
    let addr = gw.addr;
    let client = tokio::spawn(async move { open(addr, req).await });
    up.wait_for(1).await;
    let held = gw.budget(&id, 5.0).await.reserved;
    assert!(held > Micros::ZERO);
    // The client gives up: its connection closes with the request in flight.
    client.abort();
    let _ = client.await;

    within("the abandoned call to settle", async {
        while gw.budget(&id, 5.0).await.reserved != Micros::ZERO {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(
        budget.settled, held,
        "it was sent: the reservation is charged"
    );
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1, "one usage record");
    assert_eq!(usage[0].status, 499);
    assert_eq!(usage[0].settlement, Some(SettledBy::CutReserved));
    assert_eq!(usage[0].cost, held);
    let record = gw.store.get_key(&id).await.unwrap().unwrap();
    assert_eq!(record.request_count, 1);
}

fn layer_request(key: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(MESSAGES)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(messages(false).to_string())))
        .unwrap()
}

// Issue #12, item 6: an inner service that fails (rather than answering)
// still leaves one settlement and one record.
#[tokio::test]
async fn edge_inner_service_error_settles_the_call() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    let failing = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, std::io::Error>(std::io::Error::other("inner failure"))
    });
    let mut vault = Vault::new(failing, gw.ctx.clone());
    let result = vault.ready().await.unwrap().call(layer_request(&key)).await;
    assert!(result.is_err(), "the inner error is passed on");
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].status, 502);
    assert_eq!(usage[0].settlement, Some(SettledBy::CutReserved));
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert_eq!(budget.settled, usage[0].cost);
}

// Issue #12, item 6: an outer timeout drops the layer's future while the
// inner service has the request: the call still settles, once.
#[tokio::test]
async fn edge_dropped_future_settles_the_call() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    let never = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
    });
    let mut vault = Vault::new(never, gw.ctx.clone());
    let call = vault.ready().await.unwrap().call(layer_request(&key));
    let timed_out = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(timed_out.is_err(), "the outer timeout fired");
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].status, 499);
    assert_eq!(usage[0].settlement, Some(SettledBy::CutReserved));
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(budget.reserved, Micros::ZERO);
    assert_eq!(budget.settled, usage[0].cost);
    assert!(budget.settled > Micros::ZERO);
}

// A refusal after admission (no provider key for this provider): nothing
// was sent, so the reservation is released, and the record says so.
#[tokio::test]
async fn edge_refused_after_admission_releases_and_records_not_sent() {
    let up = MockUpstream::start().await;
    let gw = Gateway::with(GatewayOptions::all_at(&up.url)).await;
    let (key, id) = gw.key_with(budget_policy(5.0)).await;
    let r = gw.post(MESSAGES, &key, &messages(false)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage[0].settlement, Some(SettledBy::NotSent));
    let budget = gw.budget(&id, 5.0).await;
    assert_eq!(
        (budget.reserved, budget.settled),
        (Micros::ZERO, Micros::ZERO)
    );
    assert_eq!(up.count(), 0);
}
