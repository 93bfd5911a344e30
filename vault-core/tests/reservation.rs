#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The reservation is an upper bound of what a call can cost (issue #12
//! items 1, 7, 8): output multipliers, input bounds (bytes, image ceilings,
//! unboundable parts), the Responses API's fields, and the clamp rule.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};
use vault_core::clock::{ManualClock, UnixMillis};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
use vault_core::meter::request::{
    ANTHROPIC_IMAGE_TOKENS, ANTHROPIC_TOOL_PROMPT_TOKENS, OPENAI_IMAGE_TOKENS,
};
use vault_core::meter::{
    BodyError, Endpoint, RequestInspection, Usage, inspect_request, rewrite_request_at,
};
use vault_core::money::Micros;
use vault_core::policy::{
    Budget, BudgetPeriod, CallOutcome, DefaultEngine, Policy, PolicyEngine, RequestFacts,
};
use vault_core::pricing::{ModelPrice, PriceTable};
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, KeyStatus};
use vault_core::scope::Scopes;
use vault_core::store::MemoryStore;

const CHAT: &str = "/v1/chat/completions";
const GOOGLE: &str = "/v1beta/models/m:generateContent";

fn inspect(provider: Provider, path: &str, body: &Value) -> RequestInspection {
    inspect_request(provider, path, body.to_string().as_bytes()).unwrap()
}

fn refused(provider: Provider, path: &str, body: &str) -> BodyError {
    inspect_request(provider, path, body.as_bytes()).unwrap_err()
}

// ---------------------------------------------------------------------------
// Inspection: output multipliers.

#[test]
fn bound_output_multipliers_per_provider_and_endpoint() {
    let m = |p, path, body: Value| inspect(p, path, &body).output_multiplier;
    assert_eq!(
        m(Provider::OpenAi, CHAT, json!({"n": 40, "max_tokens": 20})),
        40
    );
    assert_eq!(m(Provider::Mistral, CHAT, json!({"n": 3})), 3);
    assert_eq!(m(Provider::OpenAi, CHAT, json!({"n": null})), 1);
    // Legacy completions: best_of candidates are billed, per batched prompt.
    let legacy = "/v1/completions";
    assert_eq!(
        m(Provider::OpenAi, legacy, json!({"n": 2, "best_of": 5})),
        5
    );
    assert_eq!(
        m(
            Provider::OpenAi,
            legacy,
            json!({"n": 2, "best_of": 3, "prompt": ["a", "b", "c"]})
        ),
        9
    );
    assert_eq!(m(Provider::OpenAi, legacy, json!({"prompt": [1, 2, 3]})), 1);
    assert_eq!(
        m(Provider::OpenAi, legacy, json!({"prompt": [[1, 2], [3]]})),
        2
    );
    assert_eq!(m(Provider::OpenAi, legacy, json!({"prompt": "one"})), 1);
    assert_eq!(
        m(
            Provider::Google,
            GOOGLE,
            json!({"generationConfig": {"candidateCount": 4, "maxOutputTokens": 10}})
        ),
        4
    );
    assert_eq!(
        m(
            Provider::Google,
            GOOGLE,
            json!({"generation_config": {"candidate_count": 2}})
        ),
        2
    );
    assert_eq!(
        m(
            Provider::Cohere,
            "/v1/generate",
            json!({"num_generations": 3})
        ),
        3
    );
    assert_eq!(
        m(
            Provider::Anthropic,
            "/v1/messages",
            json!({"max_tokens": 9})
        ),
        1
    );
    assert_eq!(
        m(Provider::OpenAi, "/v1/responses", json!({"input": "hi"})),
        1
    );
    // Embeddings have no output.
    for (p, path) in [
        (Provider::OpenAi, "/v1/embeddings"),
        (Provider::Google, "/v1beta/models/m:embedContent"),
        (Provider::Google, "/v1beta/models/m:batchEmbedContents"),
        (Provider::Cohere, "/v2/embed"),
    ] {
        let i = inspect(p, path, &json!({"input": "hi"}));
        assert_eq!(
            (i.endpoint, i.output_multiplier),
            (Endpoint::Embeddings, 0),
            "{path}"
        );
    }
}

#[test]
fn bound_multipliers_out_of_range_are_refused_naming_the_field() {
    for (p, path, body, field) in [
        (Provider::OpenAi, CHAT, r#"{"n":129}"#, "n"),
        (Provider::OpenAi, CHAT, r#"{"n":0}"#, "n"),
        (Provider::OpenAi, CHAT, r#"{"n":1.5}"#, "n"),
        (Provider::OpenAi, CHAT, r#"{"n":-1}"#, "n"),
        (Provider::OpenAi, CHAT, r#"{"n":"2"}"#, "n"),
        (Provider::OpenAi, CHAT, r#"{"n":1e400}"#, "n"),
        (
            Provider::OpenAi,
            "/v1/completions",
            r#"{"best_of":1000}"#,
            "best_of",
        ),
        (
            Provider::Google,
            GOOGLE,
            r#"{"generationConfig":{"candidateCount":0}}"#,
            "generationConfig.candidateCount",
        ),
        (
            Provider::Cohere,
            "/v1/generate",
            r#"{"num_generations":500}"#,
            "num_generations",
        ),
    ] {
        let err = refused(p, path, body);
        assert_eq!(err, BodyError::InvalidField(field), "{body}");
        assert!(err.to_string().contains("from 1 to 128"), "{err}");
    }
    // A repeated multiplier is a duplicate key, as any other.
    assert!(matches!(
        refused(Provider::OpenAi, CHAT, r#"{"n":1,"n":50}"#),
        BodyError::DuplicateKey(_)
    ));
}

// ---------------------------------------------------------------------------
// Inspection: input bounds.

#[test]
fn bound_input_is_the_bytes_not_chars_over_four() {
    let text = "日本語のテキストは一文字が一トークン以上になることがある";
    let body = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    let raw = body.to_string();
    let i = inspect(Provider::OpenAi, CHAT, &body);
    assert_eq!(i.input_tokens_bound, raw.len() as u64);
    assert!(i.input_tokens_bound > i.body_chars, "bytes, not chars");
    assert!(!i.input_unbounded);
}

#[test]
fn bound_images_add_their_providers_ceiling() {
    let url = json!({"url": "https://example.com/cat.png"});
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "two cats"},
        {"type": "image_url", "image_url": url},
        {"type": "image_url", "image_url": url}
    ]}]});
    let i = inspect(Provider::OpenAi, CHAT, &body);
    assert_eq!(
        i.input_tokens_bound,
        body.to_string().len() as u64 + 2 * OPENAI_IMAGE_TOKENS
    );
    // Responses input images.
    let body = json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/cat.png"}
    ]}]});
    let i = inspect(Provider::OpenAi, "/v1/responses", &body);
    assert_eq!(
        i.input_tokens_bound,
        body.to_string().len() as u64 + OPENAI_IMAGE_TOKENS
    );
    // Anthropic images, and its tool-use system prompt.
    let body = json!({"model": "m", "max_tokens": 5, "tools": [{"name": "t", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    ]}]});
    let i = inspect(Provider::Anthropic, "/v1/messages", &body);
    assert_eq!(
        i.input_tokens_bound,
        body.to_string().len() as u64 + ANTHROPIC_IMAGE_TOKENS + ANTHROPIC_TOOL_PROMPT_TOKENS
    );
    // An escaped key or value is read as the provider decodes it.
    let raw =
        r#"{"messages":[{"content":[{"typ\u0065":"image\u005furl","image_url":{"url":"u"}}]}]}"#;
    let i = inspect_request(Provider::OpenAi, CHAT, raw.as_bytes()).unwrap();
    assert_eq!(i.input_tokens_bound, raw.len() as u64 + OPENAI_IMAGE_TOKENS);
}

#[test]
fn bound_parts_that_cannot_be_bounded_mark_the_input_unbounded() {
    let unbounded = [
        (
            Provider::OpenAi,
            CHAT,
            json!({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}),
        ),
        (
            Provider::OpenAi,
            CHAT,
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
        ),
        (
            Provider::OpenAi,
            CHAT,
            json!({"messages": [{"role": "assistant", "audio": {"id": "audio_1"}}]}),
        ),
        (Provider::OpenAi, CHAT, json!({"web_search_options": {}})),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"previous_response_id": "resp_1", "input": "and then?"}),
        ),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"conversation": "conv_1"}),
        ),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"prompt": {"id": "pmpt_1"}}),
        ),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}),
        ),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
        ),
        (
            Provider::Anthropic,
            "/v1/messages",
            json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}]}]}),
        ),
        (
            Provider::Anthropic,
            "/v1/messages",
            json!({"messages": [{"role": "user", "content": [{"type": "container_upload", "file_id": "f"}]}]}),
        ),
        (
            Provider::Anthropic,
            "/v1/messages",
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        ),
        (
            Provider::Google,
            GOOGLE,
            json!({"contents": [{"parts": [{"inlineData": {"mimeType": "video/mp4", "data": "AAAA"}}]}]}),
        ),
        (
            Provider::Google,
            GOOGLE,
            json!({"contents": [{"parts": [{"file_data": {"file_uri": "gs://x"}}]}]}),
        ),
        (
            Provider::Google,
            GOOGLE,
            json!({"cachedContent": "cachedContents/1"}),
        ),
    ];
    for (p, path, body) in unbounded {
        assert!(inspect(p, path, &body).input_unbounded, "{p} {path} {body}");
    }
    let bounded = [
        (
            Provider::OpenAi,
            CHAT,
            json!({"messages": [{"role": "user", "content": "file_id input_audio"}]}),
        ),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"previous_response_id": null, "input": "hi"}),
        ),
        (
            Provider::OpenAi,
            "/v1/responses",
            json!({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"type": {"type": "string"}}}}]}),
        ),
        (
            Provider::Google,
            GOOGLE,
            json!({"contents": [{"parts": [{"text": "inlineData"}]}]}),
        ),
    ];
    for (p, path, body) in bounded {
        assert!(
            !inspect(p, path, &body).input_unbounded,
            "{p} {path} {body}"
        );
    }
}

// ---------------------------------------------------------------------------
// The Responses API.

#[test]
fn responses_limit_is_max_output_tokens_and_it_is_clamped_there() {
    let path = "/v1/responses";
    let i = inspect(
        Provider::OpenAi,
        path,
        &json!({"model": "gpt-4.1", "input": "hi", "max_output_tokens": 300, "stream": true}),
    );
    assert_eq!(i.endpoint, Endpoint::Responses);
    assert_eq!(
        (i.max_output_tokens, i.output_limit_field, i.stream),
        (Some(300), Some("max_output_tokens"), true)
    );
    let rewrite = |body: &str, clamp, usage| {
        rewrite_request_at(Provider::OpenAi, path, body.as_bytes(), clamp, usage)
            .unwrap()
            .map(|b| String::from_utf8(b).unwrap())
    };
    assert_eq!(
        rewrite(r#"{"input":"hi","max_output_tokens":300}"#, Some(100), true).as_deref(),
        Some(r#"{"input":"hi","max_output_tokens":100}"#)
    );
    assert_eq!(
        rewrite(r#"{"input":"hi","stream":true}"#, Some(100), true).as_deref(),
        Some(r#"{"max_output_tokens":100,"input":"hi","stream":true}"#)
    );
    // Never `stream_options`: the Responses API refuses it.
    assert_eq!(rewrite(r#"{"input":"hi","stream":true}"#, None, true), None);
    // Chat completions keep their own fields.
    assert_eq!(
        rewrite_request_at(Provider::OpenAi, CHAT, br#"{"stream":true}"#, Some(7), true)
            .unwrap()
            .map(|b| String::from_utf8(b).unwrap())
            .as_deref(),
        Some(
            r#"{"max_completion_tokens":7,"stream_options":{"include_usage":true},"stream":true}"#
        )
    );
}

// ---------------------------------------------------------------------------
// The engine.

const T0: i64 = 1_795_680_000_000;

fn key(budget: Option<Budget>) -> Vec<Arc<KeyRecord>> {
    let id = KeyId::generate().unwrap();
    vec![Arc::new(KeyRecord {
        hash: KeyHash::of(id.as_str()),
        prefix: KeyPrefix::new("vpx_live_test"),
        previous_hash: None,
        previous_valid_until: None,
        name: "k".into(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: None,
        policy: Policy {
            budget,
            ..Policy::default()
        },
        parent: None,
        provider_keys: vec![],
        created_at: UnixMillis(T0 - 1000),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    })]
}

fn budget(micros: u64, clamp_explicit_limits: bool) -> Option<Budget> {
    Some(Budget {
        limit: Micros(micros),
        period: BudgetPeriod::Total,
        clamp_explicit_limits,
    })
}

/// $1/M input (every class), $10/M output, 1,000 max output, 100,000 context.
fn flat_price() -> ModelPrice {
    let mut p = ModelPrice::new(Micros(1_000_000), Micros(10_000_000), 1000);
    p.cache_write_per_million = Some(p.input_per_million);
    p.cache_write_1h_per_million = Some(p.input_per_million);
    p.context_window = 100_000;
    p
}

fn engine_with(price: ModelPrice) -> DefaultEngine {
    let mut prices = PriceTable::default();
    for p in [
        Provider::OpenAi,
        Provider::Anthropic,
        Provider::Google,
        Provider::Cohere,
    ] {
        prices = prices.with_override(p, "m", price);
    }
    DefaultEngine::new(
        Arc::new(MemoryStore::new()),
        Arc::new(prices),
        Arc::new(ManualClock::new(UnixMillis(T0))),
    )
}

fn facts<'a>(provider: Provider, path: &'a str, i: &'a RequestInspection) -> RequestFacts<'a> {
    RequestFacts {
        method: "POST",
        provider,
        path,
        model: i.model.as_deref(),
        max_output_tokens: i.max_output_tokens,
        body_chars: i.body_chars,
        stream: i.stream,
        input_tokens_bound: i.input_tokens_bound,
        input_unbounded: i.input_unbounded,
        output_multiplier: i.output_multiplier,
        multipart: false,
    }
}

#[tokio::test]
async fn bound_n_multiplies_the_reservation_so_calls_never_settle_past_the_cap() {
    // The issue's case: {"n": 40, "max_tokens": 20} settles 800 output tokens.
    let engine = engine_with(flat_price());
    let body = json!({"model": "m", "n": 40, "max_tokens": 20, "messages": []});
    let i = inspect(Provider::OpenAi, CHAT, &body);
    let bytes = body.to_string().len() as u64;
    let cap = 20_000;
    let chain = key(budget(cap, false));
    let mut settled = Micros::ZERO;
    let mut admitted = 0;
    for _ in 0..3 {
        match engine
            .check(&chain, &facts(Provider::OpenAi, CHAT, &i))
            .await
        {
            Ok(g) => {
                // 800 output tokens at $10/M, plus the body's bytes at $1/M.
                assert_eq!(
                    g.reservation.as_ref().unwrap().amount,
                    Micros(8_000 + bytes)
                );
                assert_eq!(g.clamp_output_tokens, None);
                let outcome = CallOutcome::Metered(vault_core::meter::Usage {
                    tokens_in: bytes,
                    tokens_out: 800,
                    ..Default::default()
                });
                settled = settled.saturating_add(engine.settle(g, outcome, Some("m")).await.cost);
                admitted += 1;
            }
            Err((d, _)) => assert_eq!(d.code(), "budget_exceeded"),
        }
    }
    assert_eq!(admitted, 2);
    assert!(
        settled <= Micros(cap),
        "{settled} settled against a cap of {cap}"
    );
}

#[tokio::test]
async fn bound_unbounded_input_reserves_the_context_window() {
    let engine = engine_with(flat_price());
    let chain = key(budget(10_000_000, false));
    let path = "/v1/responses";
    let body = json!({"model": "m", "previous_response_id": "resp_1", "input": "go on", "max_output_tokens": 10});
    let i = inspect(Provider::OpenAi, path, &body);
    let g = engine
        .check(&chain, &facts(Provider::OpenAi, path, &i))
        .await
        .unwrap();
    // 100,000 context tokens at $1/M + 10 output at $10/M.
    assert_eq!(
        g.reservation.as_ref().unwrap().amount,
        Micros(100_000 + 100)
    );
    // A body larger than the context window is bounded by the window.
    let big = RequestInspection {
        model: Some("m".into()),
        input_tokens_bound: 5_000_000,
        max_output_tokens: Some(10),
        ..RequestInspection::default()
    };
    let g = engine
        .check(&chain, &facts(Provider::OpenAi, CHAT, &big))
        .await
        .unwrap();
    assert_eq!(
        g.reservation.as_ref().unwrap().amount,
        Micros(100_000 + 100)
    );
    // Embeddings reserve their input only, and are never clamped.
    let emb = inspect(
        Provider::OpenAi,
        "/v1/embeddings",
        &json!({"model": "m", "input": "hi"}),
    );
    let g = engine
        .check(&chain, &facts(Provider::OpenAi, "/v1/embeddings", &emb))
        .await
        .unwrap();
    assert_eq!(
        g.reservation.as_ref().unwrap().amount,
        Micros(emb.input_tokens_bound)
    );
    assert_eq!(g.clamp_output_tokens, None);
}

#[tokio::test]
async fn clamp_explicit_limits_are_refused_unless_the_budget_opts_in() {
    let engine = engine_with(flat_price());
    let limited = RequestInspection {
        model: Some("m".into()),
        input_tokens_bound: 100,
        max_output_tokens: Some(500),
        ..RequestInspection::default()
    };
    // Wants 100 + 5,000; only 3,000 is left: refused, naming both.
    let chain = key(budget(3_000, false));
    let (d, h) = engine
        .check(&chain, &facts(Provider::OpenAi, CHAT, &limited))
        .await
        .unwrap_err();
    assert_eq!(d.code(), "budget_exceeded");
    assert!(
        d.message()
            .contains("$0.003000 of the $0.003000 total budget remains"),
        "{}",
        d.message()
    );
    assert!(
        d.message().contains("needs at least $0.005100"),
        "{}",
        d.message()
    );
    assert!(
        d.message().contains("output limit of 500"),
        "{}",
        d.message()
    );
    assert_eq!(h.budget_remaining, Some(Micros(3_000)));

    // Opted in: clamped to what fits, (3,000 - 100) / 10 = 290.
    let chain = key(budget(3_000, true));
    let g = engine
        .check(&chain, &facts(Provider::OpenAi, CHAT, &limited))
        .await
        .unwrap();
    assert_eq!(g.clamp_output_tokens, Some(290));

    // A limit left open is clamped either way, per candidate.
    let open = RequestInspection {
        max_output_tokens: None,
        output_multiplier: 2,
        ..limited
    };
    let chain = key(budget(3_000, false));
    let g = engine
        .check(&chain, &facts(Provider::OpenAi, CHAT, &open))
        .await
        .unwrap();
    assert_eq!(g.clamp_output_tokens, Some(145));
}

#[tokio::test]
async fn multipart_uploads_are_refused_for_budgeted_keys() {
    let engine = engine_with(flat_price());
    let i = RequestInspection {
        model: Some("m".into()),
        input_unbounded: true,
        ..RequestInspection::default()
    };
    let mut f = facts(Provider::OpenAi, "/v1/audio/transcriptions", &i);
    f.multipart = true;
    let (d, _) = engine
        .check(&key(budget(10_000_000, false)), &f)
        .await
        .unwrap_err();
    assert_eq!(d.code(), "invalid_request");
    assert!(d.message().contains("multipart uploads"), "{}", d.message());
    assert!(engine.check(&key(None), &f).await.is_ok());
}

// ---------------------------------------------------------------------------
// The property: whatever the request, what the provider can bill for it
// costs at most the reservation.

#[derive(Debug, Clone, Copy)]
enum Shape {
    Chat,
    Legacy,
    Responses,
    Anthropic,
    Google,
    Cohere,
    Embeddings,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Chat),
        Just(Shape::Legacy),
        Just(Shape::Responses),
        Just(Shape::Anthropic),
        Just(Shape::Google),
        Just(Shape::Cohere),
        Just(Shape::Embeddings),
    ]
}

/// Text from ASCII, Latin, CJK and emoji.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            prop::char::range('a', 'z'),
            prop::char::range('\u{e0}', '\u{17f}'),
            prop::char::range('\u{4e00}', '\u{9fff}'),
            prop::char::range('\u{1f600}', '\u{1f64f}'),
        ],
        0..200,
    )
    .prop_map(|c| c.into_iter().collect())
}

/// The request: its provider, path and body, and the most input tokens the
/// provider can really count for it (text bytes plus image ceilings).
fn request(
    shape: Shape,
    text: &str,
    images: u64,
    n: u64,
    best_of: u64,
    prompts: usize,
    limit: Option<u64>,
) -> (Provider, &'static str, Value, u64) {
    let text_bytes = text.len() as u64;
    let img_url = json!({"url": "https://example.com/i.png"});
    match shape {
        Shape::Chat => {
            let mut content = vec![json!({"type": "text", "text": text})];
            content.extend((0..images).map(|_| json!({"type": "image_url", "image_url": img_url})));
            let mut b =
                json!({"model": "m", "n": n, "messages": [{"role": "user", "content": content}]});
            if let Some(l) = limit {
                b["max_completion_tokens"] = json!(l);
            }
            (
                Provider::OpenAi,
                CHAT,
                b,
                text_bytes + images * OPENAI_IMAGE_TOKENS,
            )
        }
        Shape::Legacy => {
            let prompt: Vec<&str> = (0..prompts).map(|_| text).collect();
            let mut b = json!({"model": "m", "n": n, "best_of": best_of.max(n), "prompt": prompt});
            if let Some(l) = limit {
                b["max_tokens"] = json!(l);
            }
            (
                Provider::OpenAi,
                "/v1/completions",
                b,
                text_bytes * prompts as u64,
            )
        }
        Shape::Responses => {
            let mut content = vec![json!({"type": "input_text", "text": text})];
            content.extend(
                (0..images).map(
                    |_| json!({"type": "input_image", "image_url": "https://example.com/i.png"}),
                ),
            );
            let mut b = json!({"model": "m", "input": [{"role": "user", "content": content}]});
            if let Some(l) = limit {
                b["max_output_tokens"] = json!(l);
            }
            (
                Provider::OpenAi,
                "/v1/responses",
                b,
                text_bytes + images * OPENAI_IMAGE_TOKENS,
            )
        }
        Shape::Anthropic => {
            let mut content = vec![json!({"type": "text", "text": text})];
            content.extend((0..images).map(|_| json!({"type": "image", "source": {"type": "url", "url": "https://example.com/i.png"}})));
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": content}]});
            if let Some(l) = limit {
                b["max_tokens"] = json!(l);
            }
            (
                Provider::Anthropic,
                "/v1/messages",
                b,
                text_bytes + images * ANTHROPIC_IMAGE_TOKENS,
            )
        }
        Shape::Google => {
            let mut config = json!({"candidateCount": n.min(8)});
            if let Some(l) = limit {
                config["maxOutputTokens"] = json!(l);
            }
            let b = json!({"contents": [{"parts": [{"text": text}]}], "generationConfig": config});
            (Provider::Google, GOOGLE, b, text_bytes)
        }
        Shape::Cohere => {
            let mut b = json!({"model": "m", "message": text, "num_generations": n.min(5)});
            if let Some(l) = limit {
                b["max_tokens"] = json!(l);
            }
            (Provider::Cohere, "/v1/generate", b, text_bytes)
        }
        Shape::Embeddings => (
            Provider::OpenAi,
            "/v1/embeddings",
            json!({"model": "m", "input": text}),
            text_bytes,
        ),
    }
}

/// What the provider can bill at most for each candidate's output.
fn billed_multiplier(shape: Shape, n: u64, best_of: u64, prompts: usize) -> u64 {
    match shape {
        Shape::Chat => n,
        Shape::Legacy => best_of.max(n) * prompts.max(1) as u64,
        Shape::Google => n.min(8),
        Shape::Cohere => n.min(5),
        Shape::Embeddings => 0,
        Shape::Responses | Shape::Anthropic => 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn property_usage_the_provider_can_bill_never_costs_more_than_the_reservation(
        shape in shape(),
        text in text(),
        images in 0u64..4,
        n in 1u64..=10,
        best_of in 1u64..=20,
        prompts in 1usize..4,
        limit in prop::option::of(1u64..5_000),
        cap in 1_000u64..50_000_000,
        clamp_explicit in any::<bool>(),
        input_frac in 0u64..=100,
        output_frac in 0u64..=100,
        classes in (0u64..=100, 0u64..=100, 0u64..=100),
        output_price in 1u64..100_000_000,
        input_price in 1u64..20_000_000,
        context in 1_000u64..2_000_000,
    ) {
        let mut price = ModelPrice::new(Micros(input_price), Micros(output_price), 4_096);
        price.context_window = context;
        let engine = engine_with(price);
        let (provider, path, body, real_input) =
            request(shape, &text, images, n, best_of, prompts, limit);
        let i = inspect(provider, path, &body);
        let chain = key(budget(cap, clamp_explicit));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let Ok(grant) = rt.block_on(engine.check(&chain, &facts(provider, path, &i))) else {
            return Ok(());
        };
        let reserved = grant.reservation.as_ref().unwrap().amount;
        prop_assert!(reserved <= Micros(cap));
        // The limit the provider sees: the clamp, else the client's, else
        // the model's maximum.
        let per_candidate = grant
            .clamp_output_tokens
            .or(limit)
            .unwrap_or(price.max_output_tokens);
        if grant.clamp_output_tokens.is_some() && limit.is_some() {
            prop_assert!(clamp_explicit, "an explicit limit was clamped without the opt-in");
        }
        let max_out = per_candidate * billed_multiplier(shape, n, best_of, prompts);
        // The provider refuses prompts past the context window.
        let max_in = real_input.min(context);
        let tokens_in = max_in * input_frac / 100;
        let tokens_out = max_out * output_frac / 100;
        let (cached, write, write_1h) = classes;
        // Only Anthropic reports (and bills) cache writes.
        let (write, write_1h) = if provider.usage_format() == vault_core::provider::UsageFormat::Anthropic {
            (write, write_1h)
        } else {
            (0, 0)
        };
        let usage = Usage {
            tokens_in,
            tokens_out,
            cached_in: tokens_in * cached / 300,
            cache_write_in: tokens_in * write / 300,
            cache_write_1h_in: tokens_in * write_1h / 300,
            reasoning_out: tokens_out / 2,
            ..Usage::default()
        };
        let cost = price.cost_of(&usage);
        prop_assert!(
            cost <= reserved,
            "{shape:?}: usage {usage:?} costs {cost}, reserved {reserved} ({i:?})"
        );
        drop(grant);
    }
}
