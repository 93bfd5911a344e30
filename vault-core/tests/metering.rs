#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Metering, request inspection and rewriting, and usage-chunk hiding
//! (docs/threat-model.md, E5, G2, H2, H3).

use proptest::prelude::*;
use vault_core::meter::{
    BodyError, BodyKind, Filtered, HideUsageChunk, SseParser, TOKEN_CAP, Usage, UsageMeter,
    inspect_request, rewrite_request,
};
use vault_core::provider::{Provider, UsageFormat};

// ---------------------------------------------------------------------------
// Realistic provider payloads.

const OPENAI_JSON: &str = r#"{"id":"chatcmpl-AbC123","object":"chat.completion","created":1727000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"system_fingerprint":"fp_0ba0d124f1"}"#;

const OPENAI_SSE: &str = concat!(
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Héllo 👋 świecie"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

const ANTHROPIC_JSON: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hi! ✨ How can I help?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":50,"output_tokens":12}}"#;

const ANTHROPIC_SSE: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-3-5-haiku-20241022","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    "\n\n",
    "event: ping\n",
    r#"data: {"type": "ping"}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Zażółć gęślą jaźń"}}"#,
    "\n\n",
    "event: content_block_stop\n",
    r#"data: {"type":"content_block_stop","index":0}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":6}}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
    "\n\n",
    "event: message_stop\n",
    r#"data: {"type":"message_stop"}"#,
    "\n\n",
);

const GOOGLE_JSON: &str = r#"{"candidates":[{"content":{"parts":[{"text":"Cześć! 🌍"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":5,"totalTokenCount":20,"thoughtsTokenCount":7},"modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;

const GOOGLE_SSE: &str = concat!(
    r#"data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 1,"totalTokenCount": 9},"modelVersion": "gemini-2.0-flash"}"#,
    "\r\n\r\n",
    r#"data: {"candidates": [{"content": {"parts": [{"text": " quick brown 🦊"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 4,"totalTokenCount": 12},"modelVersion": "gemini-2.0-flash"}"#,
    "\r\n\r\n",
    r#"data: {"candidates": [{"content": {"parts": [{"text": " jumps."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 9,"totalTokenCount": 17},"modelVersion": "gemini-2.0-flash"}"#,
    "\r\n\r\n",
);

const GOOGLE_ARRAY: &str = concat!(
    "[",
    r#"{"candidates": [{"content": {"parts": [{"text": "The ]} \"quoted\""}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 1,"totalTokenCount": 9}}"#,
    "\n,\r\n",
    r#"{"candidates": [{"content": {"parts": [{"text": " quick 🦊"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 4,"totalTokenCount": 12}}"#,
    "\n,\r\n",
    r#"{"candidates": [{"content": {"parts": [{"text": " jumps."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 9,"totalTokenCount": 17}}"#,
    "\n]",
);

const COHERE_JSON: &str = r#"{"id":"c14c80c3-18eb-4519-9460-6c92edd8cfb4","finish_reason":"COMPLETE","message":{"role":"assistant","content":[{"type":"text","text":"LLMs are neural networks…"}]},"usage":{"billed_units":{"input_tokens":5,"output_tokens":418},"tokens":{"input_tokens":71,"output_tokens":418}}}"#;

const COHERE_SSE: &str = concat!(
    "event: message-start\n",
    r#"data: {"id":"29f14a5a-11de-4cae-9800-25e4747408ea","type":"message-start","delta":{"message":{"role":"assistant","content":[],"tool_plan":"","tool_calls":[],"citations":[]}}}"#,
    "\n\n",
    "event: content-start\n",
    r#"data: {"type":"content-start","index":0,"delta":{"message":{"content":{"type":"text","text":""}}}}"#,
    "\n\n",
    "event: content-delta\n",
    r#"data: {"type":"content-delta","index":0,"delta":{"message":{"content":{"text":"Grüße"}}}}"#,
    "\n\n",
    "event: content-end\n",
    r#"data: {"type":"content-end","index":0}"#,
    "\n\n",
    "event: message-end\n",
    r#"data: {"type":"message-end","delta":{"finish_reason":"COMPLETE","usage":{"billed_units":{"input_tokens":3,"output_tokens":2},"tokens":{"input_tokens":69,"output_tokens":2}}}}"#,
    "\n\n",
);

fn usage(tokens_in: u64, tokens_out: u64) -> Option<Usage> {
    Some(Usage {
        tokens_in,
        tokens_out,
        ..Usage::default()
    })
}

fn meter(format: UsageFormat, kind: BodyKind, chunks: &[&[u8]]) -> Option<Usage> {
    let mut m = UsageMeter::new(format, kind);
    for c in chunks {
        m.feed(c);
    }
    // The totals only: token classes have tests of their own.
    m.finish().map(|u| Usage {
        tokens_in: u.tokens_in,
        tokens_out: u.tokens_out,
        ..Usage::default()
    })
}

/// Every stream fixture with its format, kind and expected usage.
fn stream_fixtures() -> Vec<(
    &'static str,
    UsageFormat,
    BodyKind,
    &'static str,
    Option<Usage>,
)> {
    vec![
        (
            "openai",
            UsageFormat::OpenAi,
            BodyKind::Sse,
            OPENAI_SSE,
            usage(19, 10),
        ),
        (
            "anthropic",
            UsageFormat::Anthropic,
            BodyKind::Sse,
            ANTHROPIC_SSE,
            usage(25, 15),
        ),
        (
            "google",
            UsageFormat::Google,
            BodyKind::Sse,
            GOOGLE_SSE,
            usage(8, 9),
        ),
        (
            "google-array",
            UsageFormat::Google,
            BodyKind::JsonArrayStream,
            GOOGLE_ARRAY,
            usage(8, 9),
        ),
        (
            "cohere",
            UsageFormat::Cohere,
            BodyKind::Sse,
            COHERE_SSE,
            usage(3, 2),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Usage from bodies and streams.

#[test]
fn json_usage_in_all_four_formats() {
    assert_eq!(
        meter(
            UsageFormat::OpenAi,
            BodyKind::Json,
            &[OPENAI_JSON.as_bytes()]
        ),
        usage(19, 10)
    );
    // Cache writes and reads are input.
    assert_eq!(
        meter(
            UsageFormat::Anthropic,
            BodyKind::Json,
            &[ANTHROPIC_JSON.as_bytes()]
        ),
        usage(175, 12)
    );
    // Thoughts are output.
    assert_eq!(
        meter(
            UsageFormat::Google,
            BodyKind::Json,
            &[GOOGLE_JSON.as_bytes()]
        ),
        usage(8, 12)
    );
    // Billed units, not `usage.tokens`.
    assert_eq!(
        meter(
            UsageFormat::Cohere,
            BodyKind::Json,
            &[COHERE_JSON.as_bytes()]
        ),
        usage(5, 418)
    );
}

#[test]
fn stream_usage_in_all_four_formats() {
    for (name, format, kind, text, expected) in stream_fixtures() {
        assert_eq!(meter(format, kind, &[text.as_bytes()]), expected, "{name}");
    }
}

#[test]
fn boundary_split_at_every_byte() {
    for (name, format, kind, text, expected) in stream_fixtures() {
        let bytes = text.as_bytes();
        for i in 0..=bytes.len() {
            assert_eq!(
                meter(format, kind, &[&bytes[..i], &bytes[i..]]),
                expected,
                "{name} split at {i}"
            );
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            meter(format, kind, &singles),
            expected,
            "{name} byte by byte"
        );
    }
}

#[test]
fn boundary_line_ending_variants() {
    for (name, format, kind, text, expected) in stream_fixtures() {
        if kind != BodyKind::Sse {
            continue;
        }
        let lf = text.replace("\r\n", "\n");
        for ending in ["\n", "\r", "\r\n"] {
            let variant = lf.replace('\n', ending);
            let bytes = variant.as_bytes();
            assert_eq!(
                meter(format, kind, &[bytes]),
                expected,
                "{name} with {ending:?}"
            );
            for i in 0..=bytes.len() {
                assert_eq!(
                    meter(format, kind, &[&bytes[..i], &bytes[i..]]),
                    expected,
                    "{name} {ending:?} at {i}"
                );
            }
        }
    }
}

#[test]
fn boundary_no_done_and_no_trailing_blank_line() {
    let cut = OPENAI_SSE.trim_end_matches("data: [DONE]\n\n").trim_end();
    assert!(!cut.ends_with('\n'));
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Sse, &[cut.as_bytes()]),
        usage(19, 10)
    );
}

#[test]
fn non_json_data_lines_are_ignored() {
    let text = format!(
        "data: not json at all\n\ndata: {{\"usage\": broken\n\n: a comment\n\nevent: x\ndata: usage\n\n{OPENAI_SSE}data: usage\n\n"
    );
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Sse, &[text.as_bytes()]),
        usage(19, 10)
    );
    assert_eq!(
        meter(
            UsageFormat::OpenAi,
            BodyKind::Json,
            &[b"<html>502 Bad Gateway</html>"]
        ),
        None
    );
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Sse, &[b"data: [DONE]\n\n"]),
        None
    );
}

#[test]
fn boundary_ten_megabyte_line_uses_bounded_memory() {
    let cap = 1 << 20;
    let mut m = UsageMeter::new(UsageFormat::OpenAi, BodyKind::Sse);
    m.feed(b"data: {\"usage\":\"");
    let block = vec![b'a'; 64 * 1024];
    for _ in 0..160 {
        m.feed(&block);
        assert!(m.buffered_len() <= cap, "buffered {}", m.buffered_len());
    }
    assert_eq!(m.seen(), None);
    // The stream recovers at the next event.
    let last = OPENAI_SSE.split("\n\n").nth(3).unwrap();
    m.feed(format!("\"}}\n\n{last}\n\n").as_bytes());
    assert_eq!(m.finish(), usage(19, 10));
    assert_eq!(m.dropped_oversize(), 1);

    // With no newline ever: nothing usable, still bounded.
    let mut parser = SseParser::default();
    for _ in 0..160 {
        parser.feed(&block, |_| panic!("no event can complete"));
        assert!(parser.buffered_len() <= parser.cap());
    }
    parser.finish(|_| panic!("the oversize event is dropped"));
    assert_eq!(parser.dropped_oversize(), 1);
}

#[test]
fn boundary_json_body_over_cap_is_unmetered() {
    let mut m = UsageMeter::with_caps(UsageFormat::OpenAi, BodyKind::Json, 1024, 100);
    m.feed(OPENAI_JSON.as_bytes());
    assert_eq!(m.buffered_len(), 0);
    assert_eq!(m.finish(), None);
    assert_eq!(m.dropped_oversize(), 1);
}

#[test]
fn google_running_totals_count_the_last_not_the_sum() {
    // 1 + 4 + 9 = 14 would be the sum; 9 is right.
    assert_eq!(
        meter(UsageFormat::Google, BodyKind::Sse, &[GOOGLE_SSE.as_bytes()]),
        usage(8, 9)
    );
    // The array stream, buffered as one JSON body, agrees.
    assert_eq!(
        meter(
            UsageFormat::Google,
            BodyKind::Json,
            &[GOOGLE_ARRAY.as_bytes()]
        ),
        usage(8, 9)
    );
}

#[test]
fn seen_reports_a_cut_stream() {
    let cut = ANTHROPIC_SSE
        .split("event: content_block_delta")
        .next()
        .unwrap();
    let mut m = UsageMeter::new(UsageFormat::Anthropic, BodyKind::Sse);
    assert_eq!(m.seen(), None);
    m.feed(cut.as_bytes());
    assert_eq!(m.seen(), usage(25, 1));
}

#[test]
fn anthropic_message_delta_may_carry_input() {
    let text = concat!(
        r#"data: {"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1}}}"#,
        "\n\n",
        r#"data: {"type":"message_delta","usage":{"input_tokens":12,"cache_read_input_tokens":3,"output_tokens":40}}"#,
        "\n\n"
    );
    assert_eq!(
        meter(UsageFormat::Anthropic, BodyKind::Sse, &[text.as_bytes()]),
        usage(15, 40)
    );
}

#[test]
fn openai_responses_api_usage_is_read() {
    let text = concat!(
        "event: response.completed\n",
        r#"data: {"type":"response.completed","response":{"id":"resp_1","status":"completed","usage":{"input_tokens":36,"output_tokens":87,"total_tokens":123}}}"#,
        "\n\n"
    );
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Sse, &[text.as_bytes()]),
        usage(36, 87)
    );
}

fn openai_usage(body: &str) -> Option<Usage> {
    meter(
        UsageFormat::OpenAi,
        BodyKind::Json,
        &[format!(r#"{{"choices":[],"usage":{body}}}"#).as_bytes()],
    )
}

#[test]
fn corruption_upstream_usage_lies_are_clamped() {
    assert_eq!(
        openai_usage(r#"{"prompt_tokens":-5,"completion_tokens":-1}"#),
        usage(0, 0)
    );
    assert_eq!(
        openai_usage(r#"{"prompt_tokens":18446744073709551615,"completion_tokens":1e300}"#),
        usage(TOKEN_CAP, TOKEN_CAP)
    );
    assert_eq!(
        openai_usage(r#"{"prompt_tokens":99999999999999999999999,"completion_tokens":1}"#),
        usage(TOKEN_CAP, 1)
    );
    assert_eq!(
        openai_usage(r#"{"prompt_tokens":10.2,"completion_tokens":3.0}"#),
        usage(11, 3)
    );
    assert_eq!(TOKEN_CAP, u64::from(u32::MAX) * 16);
    // Not numbers: the whole report is unusable, so the reservation is charged.
    assert_eq!(
        openai_usage(r#"{"prompt_tokens":"100","completion_tokens":5}"#),
        None
    );
    assert_eq!(
        openai_usage(r#"{"prompt_tokens":{},"completion_tokens":5}"#),
        None
    );
    assert_eq!(openai_usage(r#"{}"#), None);
    assert_eq!(openai_usage(r#""lots""#), None);
    // Anthropic cache fields saturate instead of wrapping.
    let body = r#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":18446744073709551615,"output_tokens":1}}"#;
    assert_eq!(
        meter(UsageFormat::Anthropic, BodyKind::Json, &[body.as_bytes()]),
        usage(TOKEN_CAP, 1)
    );
}

#[test]
fn corruption_usage_in_last_and_trailing_chunk_is_not_double_counted() {
    let text = concat!(
        r#"data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":19,"completion_tokens":10}}"#,
        "\n\n",
        r#"data: {"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10}}"#,
        "\n\n",
        "data: [DONE]\n\n"
    );
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Sse, &[text.as_bytes()]),
        usage(19, 10)
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), split in 0usize..2048) {
        let split = split.min(bytes.len());
        for format in [UsageFormat::OpenAi, UsageFormat::Anthropic, UsageFormat::Google, UsageFormat::Cohere] {
            for kind in [BodyKind::Json, BodyKind::Sse, BodyKind::JsonArrayStream] {
                let mut m = UsageMeter::with_caps(format, kind, 64, 512);
                m.feed(&bytes[..split]);
                m.feed(&bytes[split..]);
                prop_assert!(m.buffered_len() <= 512);
                let _ = m.seen();
                let _ = m.finish();
            }
        }
        let mut hide = HideUsageChunk::new(64);
        let mut out = hide.push(&bytes[..split]);
        out.extend(hide.push(&bytes[split..]));
        out.extend(hide.finish());
        prop_assert!(out.len() <= bytes.len());
        let _ = inspect_request(Provider::OpenAi, "/v1/chat/completions", &bytes);
        let _ = rewrite_request(Provider::Google, &bytes, Some(5), true);
    }

    #[test]
    fn sse_like_streams_meter_the_same_however_split(
        pieces in proptest::collection::vec(0usize..OPENAI_SSE.len(), 0..6)
    ) {
        let bytes = OPENAI_SSE.as_bytes();
        let mut cuts = pieces;
        cuts.sort_unstable();
        let mut m = UsageMeter::new(UsageFormat::OpenAi, BodyKind::Sse);
        let mut at = 0;
        for cut in cuts {
            m.feed(&bytes[at..cut]);
            at = cut;
        }
        m.feed(&bytes[at..]);
        prop_assert_eq!(m.finish(), usage(19, 10));
    }
}

// ---------------------------------------------------------------------------
// Request inspection (E5, G2).

const CHAT: &str = "/v1/chat/completions";

#[test]
fn inspect_reads_openai_facts() {
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"max_completion_tokens":300,"stream":true,"stream_options":{"include_usage":true}}"#;
    let i = inspect_request(Provider::OpenAi, CHAT, body).unwrap();
    assert_eq!(i.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(i.max_output_tokens, Some(300));
    assert_eq!(i.output_limit_field, Some("max_completion_tokens"));
    assert!(i.stream);
    assert!(i.client_asked_usage);
    assert_eq!(i.body_chars, body.len() as u64);

    let i = inspect_request(
        Provider::Groq,
        CHAT,
        br#"{"model":"llama","max_tokens":50,"stream":false}"#,
    )
    .unwrap();
    assert_eq!(
        (i.max_output_tokens, i.output_limit_field, i.stream),
        (Some(50), Some("max_tokens"), false)
    );
    assert!(!i.client_asked_usage);
}

#[test]
fn inspect_reads_anthropic_google_cohere_facts() {
    let i = inspect_request(
        Provider::Anthropic,
        "/v1/messages",
        br#"{"model":"claude-3-5-haiku-20241022","max_tokens":1024,"stream":true,"messages":[]}"#,
    )
    .unwrap();
    assert_eq!(
        (i.model.as_deref(), i.max_output_tokens, i.stream),
        (Some("claude-3-5-haiku-20241022"), Some(1024), true)
    );

    let body = br#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"temperature":0.2,"maxOutputTokens":256}}"#;
    let i = inspect_request(
        Provider::Google,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        body,
    )
    .unwrap();
    assert_eq!(i.model.as_deref(), Some("gemini-2.0-flash"));
    assert_eq!(
        (i.max_output_tokens, i.output_limit_field),
        (Some(256), Some("generationConfig.maxOutputTokens"))
    );
    assert!(i.stream);
    let i = inspect_request(
        Provider::Google,
        "/v1/models/gemini-pro:generateContent",
        b"{}",
    )
    .unwrap();
    assert_eq!((i.model.as_deref(), i.stream), (Some("gemini-pro"), false));

    let i = inspect_request(
        Provider::Cohere,
        "/v2/chat",
        br#"{"model":"command-r-plus","max_tokens":77,"stream":true}"#,
    )
    .unwrap();
    assert_eq!(
        (i.model.as_deref(), i.max_output_tokens, i.stream),
        (Some("command-r-plus"), Some(77), true)
    );
}

#[test]
fn inspect_empty_body_has_no_facts() {
    let i = inspect_request(Provider::OpenAi, "/v1/models", b"").unwrap();
    assert_eq!(i, Default::default());
    let i = inspect_request(Provider::Google, "/v1beta/models/gemini-pro", b"").unwrap();
    assert_eq!(i.model.as_deref(), Some("gemini-pro"));
}

#[test]
fn smuggling_duplicate_keys_are_refused() {
    let cases: &[(Provider, &str)] = &[
        (
            Provider::OpenAi,
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
        ),
        (
            Provider::OpenAi,
            r#"{"model":"gpt-4o-mini","m\u006fdel":"gpt-4o"}"#,
        ),
        (
            Provider::OpenAi,
            r#"{"max_tokens":1,"messages":[],"max_tokens":100000}"#,
        ),
        (Provider::OpenAi, r#"{"stream":false,"stream":true}"#),
        (Provider::OpenAi, r#"{"messages":[],"messages":[]}"#),
        (
            Provider::OpenAi,
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
        ),
        (Provider::Anthropic, r#"{"max_tokens":1,"max_tokens":2}"#),
        (
            Provider::Google,
            r#"{"generationConfig":{"maxOutputTokens":1,"maxOutputTokens":9}}"#,
        ),
        (
            Provider::Google,
            r#"{"generationConfig":{"maxOutputTokens":1,"max_output_tokens":9}}"#,
        ),
        (
            Provider::Google,
            r#"{"generationConfig":{},"generation_config":{"maxOutputTokens":9}}"#,
        ),
    ];
    for (provider, body) in cases {
        let err = inspect_request(
            *provider,
            "/v1beta/models/g:generateContent",
            body.as_bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, BodyError::DuplicateKey(_)), "{body}: {err:?}");
        assert!(
            rewrite_request(*provider, body.as_bytes(), Some(1), true).is_err(),
            "{body}"
        );
    }
    // Past the first sixteen keys too, whichever of them comes back.
    let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
    for again in ["k3", "k20", "k39"] {
        let body = format!(
            r#"{{"model":"gpt-4o-mini",{},"{again}":0}}"#,
            many.join(",")
        );
        let err =
            inspect_request(Provider::OpenAi, "/v1/chat/completions", body.as_bytes()).unwrap_err();
        assert!(
            matches!(err, BodyError::DuplicateKey(_)),
            "{again}: {err:?}"
        );
    }
    let body = format!(r#"{{"model":"gpt-4o-mini",{}}}"#, many.join(","));
    assert!(inspect_request(Provider::OpenAi, "/v1/chat/completions", body.as_bytes()).is_ok());
    // Keys in different objects are not duplicates.
    inspect_request(
        Provider::OpenAi,
        CHAT,
        br#"{"model":"a","messages":[{"model":"b"},{"model":"c"}]}"#,
    )
    .unwrap();
}

#[test]
fn smuggling_model_is_compared_as_decoded_and_verbatim() {
    let model = |body: &str| {
        inspect_request(Provider::OpenAi, CHAT, body.as_bytes())
            .unwrap()
            .model
    };
    assert_eq!(
        model(r#"{"model":"gpt-4o\u002dmini"}"#).as_deref(),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        model(r#"{"model":" gpt-4o-mini"}"#).as_deref(),
        Some(" gpt-4o-mini")
    );
    assert_eq!(
        model(r#"{"model":"GPT-4O-MINI"}"#).as_deref(),
        Some("GPT-4O-MINI")
    );
    assert_eq!(model(r#"{"messages":[]}"#), None);
    assert_eq!(
        inspect_request(Provider::OpenAi, CHAT, br#"{"model":5}"#),
        Err(BodyError::InvalidField("model"))
    );
}

#[test]
fn smuggling_google_path_and_body_model_must_agree() {
    let path = "/v1beta/models/gemini-pro:generateContent";
    let err = inspect_request(Provider::Google, path, br#"{"model":"gemini-ultra"}"#).unwrap_err();
    assert!(matches!(err, BodyError::ModelConflict { .. }), "{err:?}");
    let ok = inspect_request(Provider::Google, path, br#"{"model":"models/gemini-pro"}"#).unwrap();
    assert_eq!(ok.model.as_deref(), Some("gemini-pro"));
}

#[test]
fn corruption_hostile_json_is_an_error_not_a_crash() {
    let deep_open = "[".repeat(100_000);
    let deep_balanced = format!(
        r#"{{"messages":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for body in [deep_open.as_bytes(), deep_balanced.as_bytes()] {
        assert!(inspect_request(Provider::OpenAi, CHAT, body).is_err());
        assert!(rewrite_request(Provider::OpenAi, body, Some(1), true).is_err());
    }
    assert_eq!(
        inspect_request(Provider::OpenAi, CHAT, b"{\"model\":\"\xff\"}"),
        Err(BodyError::InvalidUtf8)
    );
    assert!(matches!(
        inspect_request(Provider::OpenAi, CHAT, b"model=gpt-4o"),
        Err(BodyError::InvalidJson(_))
    ));
    assert!(matches!(
        inspect_request(Provider::OpenAi, CHAT, b"{\"model\":\"a\"} x"),
        Err(BodyError::InvalidJson(_))
    ));
    assert_eq!(
        inspect_request(Provider::OpenAi, CHAT, b"[1,2]"),
        Err(BodyError::NotAnObject)
    );
    assert_eq!(
        inspect_request(Provider::OpenAi, CHAT, b"\"s\""),
        Err(BodyError::NotAnObject)
    );
}

#[test]
fn corruption_max_tokens_must_be_a_non_negative_integer() {
    for value in [
        "1e400", "-1", "\"100\"", "1.5", "1e2", "100.0", "true", "[]",
    ] {
        let body = format!(r#"{{"model":"m","max_tokens":{value}}}"#);
        assert_eq!(
            inspect_request(Provider::Anthropic, "/v1/messages", body.as_bytes()),
            Err(BodyError::InvalidField("max_tokens")),
            "{value}"
        );
    }
    let body = br#"{"generationConfig":{"maxOutputTokens":-1}}"#;
    assert_eq!(
        inspect_request(Provider::Google, "/v1beta/models/g:generateContent", body),
        Err(BodyError::InvalidField("generationConfig.maxOutputTokens"))
    );
    let i = inspect_request(Provider::OpenAi, CHAT, br#"{"max_tokens":null}"#).unwrap();
    assert_eq!(i.max_output_tokens, None);
}

#[test]
fn boundary_body_chars_count_characters_not_bytes() {
    let body = r#"{"messages":[{"content":"zażółć 👋 日本"}]}"#;
    let i = inspect_request(Provider::OpenAi, CHAT, body.as_bytes()).unwrap();
    assert_eq!(i.body_chars, body.chars().count() as u64);
    assert!(i.body_chars < body.len() as u64);
    assert_eq!(vault_core::meter::count_chars("ż👋".as_bytes()), 2);
}

// ---------------------------------------------------------------------------
// Rewriting.

fn rewrite(provider: Provider, body: &str, clamp: Option<u64>, usage: bool) -> Option<String> {
    rewrite_request(provider, body.as_bytes(), clamp, usage)
        .unwrap()
        .map(|b| String::from_utf8(b).unwrap())
}

#[test]
fn rewrite_is_none_when_nothing_changes() {
    let body = r#"{ "model" : "gpt-4o-mini", "max_tokens": 10, "stream": true, "stream_options": {"include_usage": true} }"#;
    assert_eq!(rewrite(Provider::OpenAi, body, None, false), None);
    assert_eq!(rewrite(Provider::OpenAi, body, Some(50), true), None);
    assert_eq!(
        rewrite(Provider::Anthropic, r#"{"max_tokens":5}"#, Some(5), true),
        None
    );
    assert_eq!(
        rewrite(
            Provider::Google,
            r#"{"generationConfig":{"maxOutputTokens":3}}"#,
            Some(9),
            false
        ),
        None
    );
}

#[test]
fn rewrite_clamps_each_providers_field() {
    // OpenAI: both fields present are lowered; other bytes untouched.
    let body = r#"{"model":"gpt-4o-mini", "max_tokens": 4000, "messages":[{"content":"caf\u00e9"}], "max_completion_tokens":8000}"#;
    assert_eq!(
        rewrite(Provider::OpenAi, body, Some(100), false).unwrap(),
        r#"{"model":"gpt-4o-mini", "max_tokens": 100, "messages":[{"content":"caf\u00e9"}], "max_completion_tokens":100}"#
    );
    // Absent: added (OpenAI itself uses max_completion_tokens).
    assert_eq!(
        rewrite(Provider::OpenAi, r#"{"model":"o1"}"#, Some(100), false).unwrap(),
        r#"{"max_completion_tokens":100,"model":"o1"}"#
    );
    assert_eq!(
        rewrite(Provider::Mistral, r#"{}"#, Some(7), false).unwrap(),
        r#"{"max_tokens":7}"#
    );
    assert_eq!(
        rewrite(
            Provider::Anthropic,
            r#"{"max_tokens":4096,"model":"claude"}"#,
            Some(64),
            false
        )
        .unwrap(),
        r#"{"max_tokens":64,"model":"claude"}"#
    );
    assert_eq!(
        rewrite(
            Provider::Cohere,
            r#"{"model":"command-r","max_tokens":null}"#,
            Some(64),
            false
        )
        .unwrap(),
        r#"{"model":"command-r","max_tokens":64}"#
    );
    // Google: inside generationConfig, created where absent.
    assert_eq!(
        rewrite(
            Provider::Google,
            r#"{"contents":[],"generationConfig":{"temperature":1,"maxOutputTokens":8192}}"#,
            Some(10),
            false
        )
        .unwrap(),
        r#"{"contents":[],"generationConfig":{"temperature":1,"maxOutputTokens":10}}"#
    );
    assert_eq!(
        rewrite(
            Provider::Google,
            r#"{"contents":[],"generationConfig":{"temperature":1}}"#,
            Some(10),
            false
        )
        .unwrap(),
        r#"{"contents":[],"generationConfig":{"maxOutputTokens":10,"temperature":1}}"#
    );
    assert_eq!(
        rewrite(Provider::Google, r#"{"contents":[]}"#, Some(10), false).unwrap(),
        r#"{"generationConfig":{"maxOutputTokens":10},"contents":[]}"#
    );
    assert_eq!(
        rewrite(
            Provider::Google,
            r#"{"generation_config":{"max_output_tokens":99}}"#,
            Some(10),
            false
        )
        .unwrap(),
        r#"{"generation_config":{"max_output_tokens":10}}"#
    );
    // The clamped body reads back as clamped.
    let out = rewrite(Provider::OpenAi, body, Some(100), false).unwrap();
    assert_eq!(
        inspect_request(Provider::OpenAi, CHAT, out.as_bytes())
            .unwrap()
            .max_output_tokens,
        Some(100)
    );
}

#[test]
fn rewrite_adds_include_usage_keeping_other_stream_options() {
    assert_eq!(
        rewrite(
            Provider::OpenAi,
            r#"{"model":"m","stream":true}"#,
            None,
            true
        )
        .unwrap(),
        r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
    );
    assert_eq!(
        rewrite(
            Provider::OpenAi,
            r#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#,
            None,
            true
        )
        .unwrap(),
        r#"{"stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#
    );
    assert_eq!(
        rewrite(
            Provider::OpenAi,
            r#"{"stream":true,"stream_options":{"x":1,"include_usage":false}}"#,
            None,
            true
        )
        .unwrap(),
        r#"{"stream":true,"stream_options":{"x":1,"include_usage":true}}"#
    );
    assert_eq!(
        rewrite(
            Provider::Groq,
            r#"{"stream":true,"stream_options":null}"#,
            Some(5),
            true
        )
        .unwrap(),
        r#"{"max_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#
    );
    // Not an OpenAI-compatible provider: nothing to add.
    assert_eq!(
        rewrite(Provider::Anthropic, r#"{"stream":true}"#, None, true),
        None
    );
    let out = rewrite(
        Provider::OpenAi,
        r#"{"model":"m","stream":true}"#,
        None,
        true,
    )
    .unwrap();
    assert!(
        inspect_request(Provider::OpenAi, CHAT, out.as_bytes())
            .unwrap()
            .client_asked_usage
    );
}

// ---------------------------------------------------------------------------
// Hiding the usage chunk.

const HIDDEN_CHUNK: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}"#;

fn hide_all(chunks: &[&[u8]]) -> Vec<u8> {
    let mut h = HideUsageChunk::new(4096);
    let mut out = Vec::new();
    for c in chunks {
        out.extend(h.push(c));
    }
    out.extend(h.finish());
    out
}

#[test]
fn hide_usage_removes_only_the_usage_chunk_at_every_split() {
    for ending in ["\n", "\r\n", "\r"] {
        let input = OPENAI_SSE.replace('\n', ending);
        let expected = OPENAI_SSE
            .replace(&format!("{HIDDEN_CHUNK}\n\n"), "")
            .replace('\n', ending);
        assert_ne!(input, expected);
        let bytes = input.as_bytes();
        assert_eq!(hide_all(&[bytes]), expected.as_bytes(), "{ending:?}");
        for i in 0..=bytes.len() {
            assert_eq!(
                hide_all(&[&bytes[..i], &bytes[i..]]),
                expected.as_bytes(),
                "{ending:?} split at {i}"
            );
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            hide_all(&singles),
            expected.as_bytes(),
            "{ending:?} byte by byte"
        );
    }
}

#[test]
fn hide_usage_forwards_whole_events_without_copying_them() {
    let events: Vec<String> = OPENAI_SSE
        .split_inclusive("\n\n")
        .map(str::to_owned)
        .collect();
    let mut h = HideUsageChunk::new(4096);
    let mut copies = 0;
    for event in &events {
        match h.filter(event.as_bytes()) {
            Filtered::Unchanged => assert!(!event.contains(HIDDEN_CHUNK), "{event}"),
            Filtered::Replaced(out) => {
                copies += 1;
                assert!(event.contains(HIDDEN_CHUNK), "{event}");
                assert!(out.is_empty());
            }
        }
    }
    assert_eq!(copies, 1);
    // Held bytes before a chunk, or an event cut at its end, take the
    // copying path and still forward every byte.
    let mut h = HideUsageChunk::new(4096);
    assert_eq!(h.filter(b"data: {\"a\""), Filtered::Replaced(Vec::new()));
    assert_eq!(
        h.filter(b":1}\n\ndata: [DONE]\n\n"),
        Filtered::Replaced(b"data: {\"a\":1}\n\ndata: [DONE]\n\n".to_vec())
    );
    assert_eq!(h.filter(b"data: x\n\n"), Filtered::Unchanged);
}

#[test]
fn hide_usage_passes_everything_else_byte_identical() {
    let text = concat!(
        ": keep-alive\n\n",
        "event: x\nid: 4\nretry: 100\ndata: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
        "data: {\"choices\":[],\"usage\":null}\n\n",
        "data: not json\n\n",
        "data: [DONE]\n\n",
        "data: trailing without blank line"
    );
    let bytes = text.as_bytes();
    for i in 0..=bytes.len() {
        assert_eq!(hide_all(&[&bytes[..i], &bytes[i..]]), bytes, "split at {i}");
    }
    // A final usage chunk without its blank line is still removed.
    assert_eq!(hide_all(&[HIDDEN_CHUNK.as_bytes()]), b"");
}

#[test]
fn boundary_hide_usage_flushes_oversize_events_unchanged() {
    let big = format!(
        "data: {{\"choices\":[],\"usage\":{{\"x\":\"{}\"}}}}\n\n",
        "a".repeat(10_000)
    );
    let mut h = HideUsageChunk::new(1024);
    let mut out = Vec::new();
    for piece in big.as_bytes().chunks(100) {
        out.extend(h.push(piece));
    }
    out.extend(h.finish());
    assert_eq!(out, big.as_bytes());
    assert_eq!(h.hidden(), 0);
}

// ---------------------------------------------------------------------------
// Document shapes read by the typed usage parser.

#[test]
fn usage_extras_and_older_shapes_are_read() {
    // Google: tool-use prompt tokens are input, thoughts are output.
    let google = r#"{"candidates":[],"usageMetadata":{"promptTokenCount":8,"toolUsePromptTokenCount":3,"candidatesTokenCount":5,"thoughtsTokenCount":7,"promptTokensDetails":[{"modality":"TEXT","tokenCount":8}]}}"#;
    assert_eq!(
        meter(UsageFormat::Google, BodyKind::Json, &[google.as_bytes()]),
        usage(11, 12)
    );
    // Cohere v1: `meta.billed_units`.
    let cohere_v1 = r#"{"text":"hi","generation_id":"g","meta":{"api_version":{"version":"1"},"billed_units":{"input_tokens":12,"output_tokens":34}}}"#;
    assert_eq!(
        meter(UsageFormat::Cohere, BodyKind::Json, &[cohere_v1.as_bytes()]),
        usage(12, 34)
    );
    // Cohere v2 wins over v1 when both are present; a null v2 falls back.
    let both = r#"{"meta":{"billed_units":{"input_tokens":1,"output_tokens":1}},"usage":{"billed_units":{"input_tokens":2,"output_tokens":3}}}"#;
    assert_eq!(
        meter(UsageFormat::Cohere, BodyKind::Json, &[both.as_bytes()]),
        usage(2, 3)
    );
    let null_v2 = r#"{"usage":{"billed_units":null},"meta":{"billed_units":{"input_tokens":4,"output_tokens":5}}}"#;
    assert_eq!(
        meter(UsageFormat::Cohere, BodyKind::Json, &[null_v2.as_bytes()]),
        usage(4, 5)
    );
    // OpenAI Responses API body: `usage` at the top with input/output names.
    let responses = r#"{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"usage"}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[responses.as_bytes()]),
        usage(36, 87)
    );
}

#[test]
fn usage_object_choice_follows_key_values_not_key_order() {
    // `type` after the message: still a message_start.
    let anthropic = r#"{"message":{"usage":{"input_tokens":10,"output_tokens":1}},"usage":{"input_tokens":99,"output_tokens":99},"type":"message_start"}"#;
    assert_eq!(
        meter(
            UsageFormat::Anthropic,
            BodyKind::Json,
            &[anthropic.as_bytes()]
        ),
        usage(10, 1)
    );
    // An escaped `type` value is compared decoded.
    let escaped = r#"{"type":"message\u005fstart","message":{"usage":{"input_tokens":3}}}"#;
    assert_eq!(
        meter(
            UsageFormat::Anthropic,
            BodyKind::Json,
            &[escaped.as_bytes()]
        ),
        usage(3, 0)
    );
    // Not a message_start (a number is not a type name): the top-level usage.
    let not_start =
        r#"{"type":5,"message":{"usage":{"input_tokens":3}},"usage":{"output_tokens":8}}"#;
    assert_eq!(
        meter(
            UsageFormat::Anthropic,
            BodyKind::Json,
            &[not_start.as_bytes()]
        ),
        usage(0, 8)
    );
    // Cohere message-end with `type` last.
    let cohere = r#"{"delta":{"usage":{"billed_units":{"input_tokens":3,"output_tokens":2}}},"type":"message-end"}"#;
    assert_eq!(
        meter(UsageFormat::Cohere, BodyKind::Json, &[cohere.as_bytes()]),
        usage(3, 2)
    );
    // OpenAI: a null `usage` falls back to `response.usage`; a non-null
    // non-object `usage` does not.
    let fallback = r#"{"usage":null,"response":{"usage":{"input_tokens":6,"output_tokens":7}}}"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[fallback.as_bytes()]),
        usage(6, 7)
    );
    let unusable = r#"{"usage":"lots","response":{"usage":{"input_tokens":6,"output_tokens":7}}}"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[unusable.as_bytes()]),
        None
    );
}

#[test]
fn corruption_repeated_keys_count_their_last_value() {
    // As a parse into a JSON tree would: the last `usage` replaces the first,
    // and the last value of a repeated count field counts.
    let body = r#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":"x","prompt_tokens":5,"completion_tokens":6}}"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[body.as_bytes()]),
        usage(5, 6)
    );
    // A later repeat that is not an object leaves nothing to read.
    let body = r#"{"response":{"usage":{"input_tokens":6}},"response":[]}"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[body.as_bytes()]),
        None
    );
    let body = r#"{"type":"message_start","type":"message_delta","message":{"usage":{"input_tokens":3}},"usage":{"output_tokens":4}}"#;
    assert_eq!(
        meter(UsageFormat::Anthropic, BodyKind::Json, &[body.as_bytes()]),
        usage(0, 4)
    );
}

#[test]
fn corruption_a_document_counts_only_if_it_parses_whole() {
    // Usage first, then broken JSON: nothing is merged.
    let cut = r#"{"usage":{"prompt_tokens":19,"completion_tokens":10},"choices":[}"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[cut.as_bytes()]),
        None
    );
    let trailing = r#"{"usage":{"prompt_tokens":19,"completion_tokens":10}} x"#;
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[trailing.as_bytes()]),
        None
    );
    // A buffered array whose last element is broken merges none of it.
    let array =
        r#"[{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1}},{"usageMetadata":"#;
    assert_eq!(
        meter(UsageFormat::Google, BodyKind::Json, &[array.as_bytes()]),
        None
    );
    // Array items that are not objects are skipped, the rest count.
    let mixed = r#"[1,"usage",[{"usageMetadata":{"promptTokenCount":99}}],null,{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":9}}]"#;
    assert_eq!(
        meter(UsageFormat::Google, BodyKind::Json, &[mixed.as_bytes()]),
        usage(8, 9)
    );
}

#[test]
fn boundary_deep_nesting_outside_the_usage_path_is_skipped() {
    // Skipped values are walked without recursion, so depth there does not
    // matter (a parse into a JSON tree stopped at 128 levels and lost the
    // usage). Depth on the usage path is at most three levels.
    let deep = format!(
        r#"{{"choices":{}{},"usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_eq!(
        meter(UsageFormat::OpenAi, BodyKind::Json, &[deep.as_bytes()]),
        usage(1, 2)
    );
}

/// A stream cut short is charged its final count only once its terminal
/// event has passed (docs/budgets.md#settlement); a running count before
/// it is not what the provider bills.
#[test]
fn boundary_only_a_terminal_event_makes_a_cut_streams_count_final() {
    let cases: [(UsageFormat, &str, &str); 4] = [
        (
            UsageFormat::OpenAi,
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\n",
            "data: [DONE]\n\n",
        ),
        (
            UsageFormat::Anthropic,
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ),
        (
            UsageFormat::OpenAi,
            "event: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"response\":{\"usage\":null}}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":9}}}\n\n",
        ),
        (
            UsageFormat::Cohere,
            "event: content-delta\ndata: {\"type\":\"content-delta\"}\n\n",
            "event: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"usage\":{\"billed_units\":{\"input_tokens\":5,\"output_tokens\":9}}}}\n\n",
        ),
    ];
    for (format, before, terminal) in cases {
        let mut m = UsageMeter::new(format, BodyKind::Sse);
        m.feed(before.as_bytes());
        assert_eq!(m.final_usage(), None, "{before}");
        m.feed(terminal.as_bytes());
        let u = m.final_usage().unwrap_or_else(|| panic!("{terminal}"));
        assert_eq!(u.tokens_out, 9);
    }
    // Google: running totals in every chunk, none final before the end.
    let mut m = UsageMeter::new(UsageFormat::Google, BodyKind::Sse);
    m.feed(
        b"data: {\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":9}}\r\n\r\n",
    );
    assert!(m.seen().is_some());
    assert_eq!(m.final_usage(), None);
}
