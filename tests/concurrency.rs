#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Many concurrent calls over real HTTP — allowed and denied, JSON and
//! streams, finished and abandoned — complete without deadlock and leave
//! no reservation held; spend equals the sum of the usage records
//! (docs/threat-model.md, H5, I1, J3's "no leaked reservation").

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::json;
use support::*;
use vault_core::money::Micros;
use vault_core::policy::{ModelGlob, Policy};

/// What one request of the mix does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    BadKey,
    ModelDenied,
    TestKey,
    Json,
    Stream,
    StreamAbandoned,
}

fn kind_of(i: usize) -> Kind {
    match i % 10 {
        0 => Kind::BadKey,
        1 => Kind::ModelDenied,
        2 | 3 => Kind::TestKey,
        4 | 5 => Kind::Json,
        6 | 7 => Kind::Stream,
        _ => Kind::StreamAbandoned,
    }
}

fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": text}}]})
    )
}

async fn run_mix(n: usize, sqlite: bool) {
    let up = Arc::new(MockUpstream::start().await);
    let mut opts = GatewayOptions::all_at(&up.url);
    opts.sqlite = sqlite;
    let gw = Arc::new(Gateway::with(opts).await);
    gw.add_provider_key(vault_core::provider::Provider::OpenAi)
        .await;
    let budget_usd = 100.0;
    let (key, id) = gw
        .key_with(Policy {
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            ..budget_policy(budget_usd)
        })
        .await;
    let (test_key, _) = gw.test_key().await;

    // Finished streams get their whole answer at once; abandoned ones get a
    // first chunk and then keep-alives until the gateway hangs up.
    up.on(|got| {
        let body = got.json();
        match (body["stream"].as_bool(), got.header("x-hold")) {
            (Some(true), Some(_)) => Reply::controlled_sse(),
            (Some(true), None) => Reply::sse(vec![
                chunk("a"),
                chunk("b"),
                format!(
                    "data: {}\n\n",
                    json!({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}})
                ),
                "data: [DONE]\n\n".into(),
            ]),
            _ => Reply::json(openai_completion("gpt-4o-mini", 20, 3)),
        }
    });
    let up2 = up.clone();
    let holder = tokio::spawn(async move {
        loop {
            let stream = up2.next_stream().await;
            tokio::spawn(async move {
                if !stream.send(chunk("first")).await {
                    return;
                }
                while stream.send(": keep-alive\n\n").await {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    });

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let gw = gw.clone();
        let key = key.clone();
        let test_key = test_key.clone();
        tasks.push(tokio::spawn(async move {
            let kind = kind_of(i);
            let (secret, model, stream) = match kind {
                Kind::BadKey => (
                    "vpx_live_000000000000000000000000".to_owned(),
                    "gpt-4o-mini",
                    false,
                ),
                Kind::ModelDenied => (key, "gpt-4o", false),
                Kind::TestKey => (test_key, "gpt-4o-mini", i % 4 == 0),
                Kind::Json => (key, "gpt-4o-mini", false),
                Kind::Stream | Kind::StreamAbandoned => (key, "gpt-4o-mini", true),
            };
            let body = json!({"model": model, "max_tokens": 50, "stream": stream,
                              "messages": [{"role": "user", "content": format!("request {i}")}]});
            let mut req = gw
                .req("POST", "/openai/v1/chat/completions")
                .header("authorization", format!("Bearer {secret}"))
                .header("content-type", "application/json");
            if kind == Kind::StreamAbandoned {
                req = req.header("x-hold", "1");
            }
            let resp = open(
                gw.addr,
                req.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
            )
            .await;
            let status = resp.status();
            let mut body = resp.into_body();
            match kind {
                Kind::StreamAbandoned => {
                    assert_eq!(status, StatusCode::OK);
                    // The first event, maybe joined with keep-alives already sent.
                    let first = next_chunk(&mut body).await.unwrap();
                    assert!(first.starts_with(chunk("first").as_bytes()), "{first:?}");
                    drop(body);
                }
                _ => {
                    let bytes = read_all(&mut body).await;
                    let expected = match kind {
                        Kind::BadKey => StatusCode::UNAUTHORIZED,
                        Kind::ModelDenied => StatusCode::FORBIDDEN,
                        _ => StatusCode::OK,
                    };
                    assert_eq!(
                        status,
                        expected,
                        "{kind:?}: {}",
                        String::from_utf8_lossy(&bytes)
                    );
                    if kind == Kind::Stream {
                        assert!(bytes.ends_with(b"data: [DONE]\n\n"));
                    }
                }
            }
            kind
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    match tokio::time::timeout(Duration::from_secs(45), all).await {
        Ok(()) => {}
        Err(_) => panic!("{n} concurrent requests did not finish: deadlock or stall"),
    }

    // Abandoned streams settle when the gateway notices the client is gone.
    let abandoned = (0..n)
        .filter(|i| kind_of(*i) == Kind::StreamAbandoned)
        .count();
    let budgeted = (0..n)
        .filter(|i| {
            matches!(
                kind_of(*i),
                Kind::ModelDenied | Kind::Json | Kind::Stream | Kind::StreamAbandoned
            )
        })
        .count();
    let usage = within("every budgeted call to be settled", async {
        loop {
            let usage = gw.usage_of(&id).await;
            if usage.len() >= budgeted {
                return usage;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    holder.abort();

    assert_eq!(
        usage.len(),
        budgeted,
        "one usage record per call of the budgeted key"
    );
    assert_eq!(usage.iter().filter(|u| u.status == 403).count(), n / 10);
    let budget = gw.budget(&id, budget_usd).await;
    assert_eq!(budget.reserved, Micros::ZERO, "a reservation was left held");
    let sum = usage
        .iter()
        .fold(Micros::ZERO, |a, u| a.saturating_add(u.cost));
    assert_eq!(
        budget.settled, sum,
        "spend equals the sum of the usage records"
    );
    // Completed calls cost their metered usage; abandoned ones their
    // reservation (nothing was metered), which is more.
    let metered = usage.iter().filter(|u| u.tokens_out > 0).count();
    assert_eq!(metered, budgeted - n / 10 - abandoned);
    assert!(
        usage
            .iter()
            .filter(|u| u.status == 200)
            .all(|u| u.cost > Micros::ZERO)
    );
}

// docs/threat-model.md, H5, I1 (no deadlock, no leaked reservation, spend = Σ
// usage)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_mixed_load_leaves_no_reservation_held() {
    run_mix(1000, false).await;
}

// The same on SqliteStore, smaller (every settlement is a transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_mixed_load_on_sqlite_leaves_no_reservation_held() {
    run_mix(200, true).await;
}
