#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Issue #12 over real HTTP: the clamp rule (explicit output limits are
//! refused, open ones set in each API's own field and announced), the
//! Responses API (its own limit field, no `stream_options`) against an
//! upstream as strict as the real one, and multipart uploads.

mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{Value, json};
use support::*;
use vault_core::money::Micros;
use vault_core::policy::{Budget, BudgetPeriod, ModelGlob, Policy};

const CLAMP_HEADER: &str = "x-vaultgate-max-output-tokens";

/// Reads the output limit from a forwarded body.
type LimitOf = fn(&Value) -> Option<u64>;

/// Fields the Responses API accepts at the top level (a subset is enough:
/// anything else, `max_tokens` and `stream_options` included, is a 400 as
/// from the real API).
const RESPONSES_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "stream",
    "temperature",
    "previous_response_id",
    "tools",
    "store",
];

/// A mock `/v1/responses` as strict as the real one about unknown fields.
fn strict_responses(r: &Recorded) -> Reply {
    let body = r.json();
    let unknown: Vec<&String> = body
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !RESPONSES_FIELDS.contains(&k.as_str()))
        .collect();
    if let Some(k) = unknown.first() {
        return Reply::status_json(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": format!("Unknown parameter: '{k}'."), "type": "invalid_request_error", "param": k, "code": "unknown_parameter"}}),
        );
    }
    let usage = json!({"input_tokens": 12, "output_tokens": 7, "total_tokens": 19});
    let response = json!({"id": "resp_1", "object": "response", "status": "completed", "model": body["model"],
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}],
        "usage": usage});
    if body["stream"] == json!(true) {
        let created = json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}});
        let delta = json!({"type": "response.output_text.delta", "delta": "hi"});
        let done = json!({"type": "response.completed", "response": response});
        Reply::sse(vec![
            format!("event: response.created\ndata: {created}\n\n"),
            format!("event: response.output_text.delta\ndata: {delta}\n\n"),
            format!("event: response.completed\ndata: {done}\n\n"),
        ])
    } else {
        Reply::json(response)
    }
}

/// A total budget of `micros`, with the clamp opt-in as given.
fn budget(micros: u64, clamp_explicit_limits: bool) -> Policy {
    Policy {
        budget: Some(Budget {
            limit: Micros(micros),
            period: BudgetPeriod::Total,
            clamp_explicit_limits,
        }),
        ..open_policy()
    }
}

// ---------------------------------------------------------------------------
// The Responses API.

#[tokio::test]
async fn responses_api_limit_is_clamped_in_max_output_tokens_non_stream() {
    let up = MockUpstream::start().await;
    up.on(strict_responses);
    let gw = Gateway::start(&up.url).await;
    // $0.005 cannot hold gpt-4o-mini's 16,384-token maximum output
    // (~$0.0098): the open limit is set to what fits.
    let (key, id) = gw.key_with(budget(5_000, false)).await;
    let resp = gw
        .post(
            "/openai/v1/responses",
            &key,
            &json!({"model": "gpt-4o-mini", "input": "hi"}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let sent = up.only().json();
    let clamp = sent["max_output_tokens"]
        .as_u64()
        .expect("max_output_tokens set");
    assert!(clamp > 16 && clamp < 16_384, "{clamp}");
    assert_eq!(resp.header(CLAMP_HEADER), Some(clamp.to_string().as_str()));
    assert!(sent.get("max_tokens").is_none() && sent.get("max_completion_tokens").is_none());
    let usage = gw.usage_of(&id).await;
    assert_eq!((usage[0].tokens_in, usage[0].tokens_out), (12, 7));

    // An explicit limit that fits is forwarded as sent.
    up.clear();
    let resp = gw
        .post(
            "/openai/v1/responses",
            &key,
            &json!({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 100}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(up.only().json()["max_output_tokens"], json!(100));
    assert_eq!(resp.header(CLAMP_HEADER), None);
}

#[tokio::test]
async fn responses_api_stream_gets_no_stream_options_and_is_metered() {
    let up = MockUpstream::start().await;
    up.on(strict_responses);
    let gw = Gateway::start(&up.url).await;
    let (key, id) = gw.key_with(budget_policy(1.0)).await;
    let resp = gw
        .post(
            "/openai/v1/responses",
            &key,
            &json!({"model": "gpt-4o-mini", "input": "hi", "stream": true, "max_output_tokens": 50}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let sent = up.only();
    assert!(sent.json().get("stream_options").is_none());
    assert_eq!(
        sent.body,
        Bytes::from(
            json!({"model": "gpt-4o-mini", "input": "hi", "stream": true, "max_output_tokens": 50})
                .to_string()
        ),
        "forwarded untouched"
    );
    // Nothing is hidden from the client: it gets every event.
    assert!(
        resp.text().contains("response.completed"),
        "{}",
        resp.text()
    );
    let usage = gw.usage_of(&id).await;
    assert_eq!((usage[0].tokens_in, usage[0].tokens_out), (12, 7));
    assert_eq!(gw.budget(&id, 1.0).await.reserved, Micros::ZERO);
}

// ---------------------------------------------------------------------------
// The clamp rule.

#[tokio::test]
async fn clamp_explicit_limit_over_budget_is_refused_402_not_lowered() {
    let up = MockUpstream::start().await;
    up.on(|_| Reply::json(openai_completion("gpt-4o-mini", 5, 5)));
    let gw = Gateway::start(&up.url).await;
    let (key, _) = gw.key_with(budget(5_000, false)).await;
    let resp = gw
        .post(
            "/openai/v1/chat/completions",
            &key,
            &json!({"model": "gpt-4o-mini", "max_tokens": 16000, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::PAYMENT_REQUIRED, "{}", resp.text());
    assert_eq!(resp.code(), "budget_exceeded");
    let msg = resp.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("$0.005000 of the $0.005000 total budget remains"),
        "{msg}"
    );
    assert!(msg.contains("this call needs at least $0.00"), "{msg}");
    assert!(msg.contains("output limit of 16000"), "{msg}");
    assert_eq!(up.count(), 0, "never forwarded");

    // Opted in: the explicit limit is lowered and announced.
    let (key, _) = gw.key_with(budget(5_000, true)).await;
    let resp = gw
        .post(
            "/openai/v1/chat/completions",
            &key,
            &json!({"model": "gpt-4o-mini", "max_tokens": 16000, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let clamp = up.only().json()["max_tokens"].as_u64().unwrap();
    assert!(clamp < 16_000);
    assert_eq!(resp.header(CLAMP_HEADER), Some(clamp.to_string().as_str()));
}

#[tokio::test]
async fn clamp_open_limit_is_set_in_each_apis_own_field_and_announced() {
    let up = MockUpstream::start().await;
    up.on(|r| {
        if r.path().contains(":generateContent") {
            Reply::json(json!({"candidates": [], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}))
        } else if r.path().ends_with("/v1/messages") {
            Reply::json(json!({"type": "message", "content": [], "usage": {"input_tokens": 3, "output_tokens": 4}}))
        } else {
            Reply::json(openai_completion("gpt-4o-mini", 3, 4))
        }
    });
    let gw = Gateway::start(&up.url).await;
    let cases: [(&str, Value, LimitOf); 3] = [
        (
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
            |b| b["max_completion_tokens"].as_u64(),
        ),
        (
            "/google/v1beta/models/gemini-2.5-pro:generateContent",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
            |b| b["generationConfig"]["maxOutputTokens"].as_u64(),
        ),
        (
            "/anthropic/v1/messages",
            json!({"model": "claude-3-5-haiku-20241022", "messages": [{"role": "user", "content": "hi"}]}),
            |b| b["max_tokens"].as_u64(),
        ),
    ];
    for (path, body, field) in cases {
        up.clear();
        // A fresh key each: a call holds all that is left until it settles.
        let (key, _) = gw.key_with(budget(5_000, false)).await;
        let resp = gw.post(path, &key, &body).await;
        assert_eq!(resp.status, StatusCode::OK, "{path}: {}", resp.text());
        let sent = up.only().json();
        let clamp = field(&sent).unwrap_or_else(|| panic!("{path}: no limit in {sent}"));
        assert_eq!(
            resp.header(CLAMP_HEADER),
            Some(clamp.to_string().as_str()),
            "{path}"
        );
    }
}

#[tokio::test]
async fn clamp_opt_in_is_accepted_by_the_management_api() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let admin = gw.admin_key().await;
    let create = |body: Value| {
        gw.req("POST", "/v1/keys")
            .header("authorization", format!("Bearer {admin}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let r = send(
        gw.addr,
        create(json!({"name": "c", "permissions": ["chat:write"],
                      "budget": {"limit_usd": 1.0, "clamp_explicit_limits": true}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(
        r.json()["policy"]["budget"]["clamp_explicit_limits"],
        json!(true)
    );
    let r = send(
        gw.addr,
        create(json!({"name": "c", "permissions": ["chat:write"],
                      "budget": {"limit_usd": 1.0, "clamp_explicit_limit": true}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

// ---------------------------------------------------------------------------
// Multipart uploads.

const BOUNDARY: &str = "vaultgate-test-boundary";

/// A transcription upload: binary audio (not UTF-8) and, optionally, a model.
fn upload(model: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    b.extend_from_slice(b"RIFF\xff\xfe\x00\x01WAVEfmt \x80\x81\x82");
    b.extend_from_slice(b"\r\n");
    if let Some(m) = model {
        b.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n"
            )
            .as_bytes(),
        );
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

async fn post_upload(gw: &Gateway, key: &str, body: Vec<u8>) -> Resp {
    let req = gw
        .req("POST", "/openai/v1/audio/transcriptions")
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(gw.addr, req).await
}

#[tokio::test]
async fn multipart_uploads_are_forwarded_untouched_for_keys_without_a_budget() {
    let up = MockUpstream::start().await;
    up.on(|_| Reply::json(json!({"text": "hello"})));
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let body = upload(Some("whisper-1"));
    let resp = post_upload(&gw, &key, body.clone()).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let sent = up.only();
    assert_eq!(sent.path(), "/v1/audio/transcriptions");
    assert_eq!(sent.body, Bytes::from(body), "byte for byte");
    assert_eq!(
        sent.header("content-type"),
        Some(format!("multipart/form-data; boundary={BOUNDARY}").as_str())
    );
}

#[tokio::test]
async fn multipart_uploads_are_refused_for_budgeted_keys() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, _) = gw.key_with(budget_policy(5.0)).await;
    let resp = post_upload(&gw, &key, upload(Some("whisper-1"))).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{}", resp.text());
    assert_eq!(resp.code(), "invalid_request");
    assert!(resp.text().contains("multipart uploads"), "{}", resp.text());
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn multipart_model_allowlists_read_the_model_field() {
    let up = MockUpstream::start().await;
    up.on(|_| Reply::json(json!({"text": "hello"})));
    let gw = Gateway::start(&up.url).await;
    let (key, _) = gw
        .key_with(Policy {
            models: Some(vec![ModelGlob::parse("whisper-*").unwrap()]),
            ..open_policy()
        })
        .await;
    let resp = post_upload(&gw, &key, upload(Some("whisper-1"))).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let resp = post_upload(&gw, &key, upload(Some("gpt-4o-transcribe"))).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "{}", resp.text());
    assert_eq!(resp.code(), "model_not_allowed");
    let resp = post_upload(&gw, &key, upload(None)).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{}", resp.text());
    assert_eq!(resp.code(), "invalid_request");
    assert!(resp.text().contains("names no model"), "{}", resp.text());
    assert_eq!(up.count(), 1);
}
