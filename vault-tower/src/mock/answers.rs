//! Each provider's answer, in its own shape, with deterministic usage.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use vault_core::provider::{Provider, UsageFormat};

use super::body::MockBody;

/// The text every mock completion is cut from.
const MOCK_TEXT: &str = "This is a mock response from the vaultgate test provider. \
It answers test keys offline with realistic usage so budgets, rate limits and metering \
can be tried without a real provider key.";

struct Ask {
    model: String,
    prompt_tokens: u64,
    max_out: Option<u64>,
    stream: bool,
    include_usage: bool,
}

impl Ask {
    fn words(&self) -> Vec<&'static str> {
        let all: Vec<&str> = MOCK_TEXT.split(' ').collect();
        let n = self
            .max_out
            .map_or(all.len(), |m| (m as usize).min(all.len()));
        all[..n].to_vec()
    }
}

/// The mock `provider`'s answer to `req`: its models, a completion in its
/// shape (JSON or SSE), or 404 for a path it does not implement.
pub(super) fn answer(provider: Provider, req: &Request<Bytes>) -> Response<MockBody> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    if req.method() == http::Method::GET && path.ends_with("/models") {
        return json_response(StatusCode::OK, &models(provider));
    }
    let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
    let google_model = path
        .rsplit_once("/models/")
        .and_then(|(_, rest)| rest.split_once(':'))
        .map(|(m, action)| (m.to_owned(), action.to_owned()));
    let max_out = match provider.usage_format() {
        UsageFormat::Google => body["generationConfig"]["maxOutputTokens"].as_u64(),
        _ => body["max_completion_tokens"]
            .as_u64()
            .or_else(|| body["max_tokens"].as_u64()),
    };
    let ask = Ask {
        model: body["model"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| google_model.as_ref().map(|g| g.0.clone()))
            .unwrap_or_else(|| "mock-model".to_owned()),
        prompt_tokens: (req.body().len() as u64).div_ceil(4).max(1),
        max_out,
        stream: body["stream"].as_bool().unwrap_or(false)
            || google_model
                .as_ref()
                .is_some_and(|g| g.1 == "streamGenerateContent"),
        include_usage: body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
    };
    match (provider.usage_format(), path) {
        (UsageFormat::OpenAi, p) if p.ends_with("/chat/completions") => openai_chat(&ask),
        (UsageFormat::OpenAi, p) if p.ends_with("/embeddings") => json_response(
            StatusCode::OK,
            &json!({"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0,0.1,0.2]}],
                    "model": ask.model, "usage":{"prompt_tokens": ask.prompt_tokens, "total_tokens": ask.prompt_tokens}}),
        ),
        (UsageFormat::Anthropic, p) if p.ends_with("/messages") => anthropic(&ask),
        (UsageFormat::Google, _) if google_model.is_some() => {
            google(&ask, query.contains("alt=sse"))
        }
        (UsageFormat::Cohere, p) if p.ends_with("/chat") => cohere(&ask),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"type": "not_found", "message": format!("the mock {provider} provider does not implement {path}")}}),
        ),
    }
}

fn models(provider: Provider) -> Value {
    let ids: &[&str] = match provider {
        Provider::Anthropic => &["claude-3-5-haiku-20241022", "claude-sonnet-4-20250514"],
        Provider::Google => &["models/gemini-2.0-flash", "models/gemini-2.5-pro"],
        _ => &["gpt-4o-mini", "gpt-4o"],
    };
    json!({"object": "list", "data": ids.iter().map(|id| json!({"id": id, "object": "model", "owned_by": "vaultgate-mock"})).collect::<Vec<_>>()})
}

fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    let mut r = Response::new(MockBody::new(vec![Bytes::from(v.to_string())]));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn sse_response(events: Vec<String>) -> Response<MockBody> {
    let frames = events.into_iter().map(Bytes::from).collect();
    let mut r = Response::new(MockBody::new(frames));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r
}

fn openai_chat(ask: &Ask) -> Response<MockBody> {
    let words = ask.words();
    let out = words.len() as u64;
    let usage = json!({"prompt_tokens": ask.prompt_tokens, "completion_tokens": out, "total_tokens": ask.prompt_tokens + out});
    let finish = if ask
        .max_out
        .is_some_and(|m| (m as usize) < MOCK_TEXT.split(' ').count())
    {
        "length"
    } else {
        "stop"
    };
    if !ask.stream {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": ask.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" ")}, "finish_reason": finish}],
                "usage": usage,
            }),
        );
    }
    let mut events = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let text = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": ask.model,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
        events.push(format!("data: {chunk}\n\n"));
    }
    let last = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": ask.model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]});
    events.push(format!("data: {last}\n\n"));
    if ask.include_usage {
        let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": ask.model,
            "choices": [], "usage": usage});
        events.push(format!("data: {u}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    sse_response(events)
}

fn anthropic(ask: &Ask) -> Response<MockBody> {
    let words = ask.words();
    let out = words.len() as u64;
    let stop = if ask
        .max_out
        .is_some_and(|m| (m as usize) < MOCK_TEXT.split(' ').count())
    {
        "max_tokens"
    } else {
        "end_turn"
    };
    if !ask.stream {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "msg_mock", "type": "message", "role": "assistant", "model": ask.model,
                "content": [{"type": "text", "text": words.join(" ")}],
                "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": ask.prompt_tokens, "output_tokens": out},
            }),
        );
    }
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
            "model": ask.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": ask.prompt_tokens, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for (i, w) in words.iter().enumerate() {
        let text = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        events.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})));
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": out}})));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    sse_response(events)
}

fn google(ask: &Ask, sse: bool) -> Response<MockBody> {
    let words = ask.words();
    let chunk = |text: String, done: bool, so_far: u64| {
        let mut v = json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
            "usageMetadata": {"promptTokenCount": ask.prompt_tokens, "candidatesTokenCount": so_far,
                              "totalTokenCount": ask.prompt_tokens + so_far},
            "modelVersion": ask.model});
        if done {
            v["candidates"][0]["finishReason"] = json!("STOP");
        }
        v
    };
    if !ask.stream {
        return json_response(
            StatusCode::OK,
            &chunk(words.join(" "), true, words.len() as u64),
        );
    }
    let pieces: Vec<Value> = words
        .chunks(4)
        .enumerate()
        .map(|(i, ws)| {
            let so_far = ((i + 1) * 4).min(words.len()) as u64;
            chunk(ws.join(" "), so_far == words.len() as u64, so_far)
        })
        .collect();
    if sse {
        return sse_response(
            pieces
                .iter()
                .map(|p| format!("data: {p}\r\n\r\n"))
                .collect(),
        );
    }
    let mut frames = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let sep = if i == 0 { "[" } else { ",\r\n" };
        frames.push(Bytes::from(format!("{sep}{p}")));
    }
    frames.push(Bytes::from_static(b"]"));
    let mut r = Response::new(MockBody::new(frames));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn cohere(ask: &Ask) -> Response<MockBody> {
    let words = ask.words();
    let out = words.len() as u64;
    let usage = json!({"billed_units": {"input_tokens": ask.prompt_tokens, "output_tokens": out},
                       "tokens": {"input_tokens": ask.prompt_tokens + 8, "output_tokens": out}});
    if !ask.stream {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "mock", "finish_reason": "COMPLETE",
                "message": {"role": "assistant", "content": [{"type": "text", "text": words.join(" ")}]},
                "usage": usage,
            }),
        );
    }
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut events = vec![ev(
        "message-start",
        json!({"type": "message-start", "id": "mock", "delta": {"message": {"role": "assistant"}}}),
    )];
    for (i, w) in words.iter().enumerate() {
        let text = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        events.push(ev("content-delta", json!({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": text}}}})));
    }
    events.push(ev(
        "message-end",
        json!({"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": usage}}),
    ));
    sse_response(events)
}
