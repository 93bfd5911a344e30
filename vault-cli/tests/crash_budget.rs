//! Issue #12 item 4, against the real binary: a `kill -9` of `serve` with
//! calls in flight neither locks the budget until the dead leases expire
//! nor charges them in full. After a restart the budget left is the cap
//! less settled spend less what the lost calls held, at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::*;

/// An OpenAI-shaped upstream: a request whose body contains `answer` gets a
/// completion (10 + 20 tokens); any other is held open forever (a call in
/// flight). Counts the requests it holds.
fn start_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let counter = held.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let _ = answer(stream, counter).await;
                });
            }
        });
    });
    (addr, held)
}

async fn answer(mut stream: tokio::net::TcpStream, held: Arc<AtomicUsize>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len: usize = text[..head_end]
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + len {
            break;
        }
    }
    if !String::from_utf8_lossy(&buf).contains("answer") {
        held.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3_600)).await;
        return Ok(());
    }
    let body = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A chat call whose body makes the upstream answer (`answer`) or hold it
/// (`hangup`): the same length, so the same reservation.
async fn call(addr: SocketAddr, key: &str, word: &str) -> Resp {
    post(
        addr,
        "/openai/v1/chat/completions",
        key,
        &json!({"model": "gpt-4o-mini", "max_tokens": 2000,
                "messages": [{"role": "user", "content": word}]}),
    )
    .await
}

fn micros(usd: &str) -> u64 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, "0"));
    let frac = format!("{frac:0<6}");
    whole.parse::<u64>().unwrap() * 1_000_000 + frac[..6].parse::<u64>().unwrap()
}

fn remaining(r: &Resp) -> u64 {
    micros(
        r.header("x-budget-remaining-usd")
            .unwrap_or_else(|| panic!("no remaining header: {}", r.everything())),
    )
}

async fn spend(addr: SocketAddr, admin: &str, id: &str) -> u64 {
    let r = get(addr, &format!("/v1/keys/{id}"), admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    micros(r.json()["spend_usd"].as_str().unwrap())
}

#[tokio::test]
async fn lifecycle_kill_9_with_calls_in_flight_leaves_cap_minus_settled_minus_in_flight() {
    const CAP: u64 = 5_000_000;
    let (upstream, held) = start_upstream();
    let dir = tempdir();
    write_config(dir.path(), &["openai"], &format!("http://{upstream}"), "");
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin().to_owned());
    add_provider_key(addr, &admin, "openai", "sk-upstream-test").await;
    let (id, key, _) = create_key(
        addr,
        &admin,
        &json!({"name": "crash", "budget": {"limit_usd": 5}}),
    )
    .await;

    // One settled call: what it reserved shows in the remaining header.
    let first = call(addr, &key, "answer").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let reservation = CAP - remaining(&first);
    let settled = spend(addr, &admin, &id).await;
    assert!(
        settled > 0 && settled < reservation,
        "{settled} of {reservation}"
    );

    // Two calls in flight, reserved and sent, when the server is killed.
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let key = key.clone();
            tokio::spawn(async move { call(addr, &key, "hangup").await })
        })
        .collect();
    poll_until(Duration::from_secs(20), || {
        let held = held.clone();
        async move { held.load(Ordering::SeqCst) == 2 }
    })
    .await
    .expect("both calls reach the upstream");
    server.kill9();
    for t in in_flight {
        t.abort();
    }

    // Restarted: at once, not after the dead leases expire.
    let server = Server::start(dir.path());
    let addr = server.addr;
    let charged = spend(addr, &admin, &id).await;
    assert_eq!(
        charged,
        settled + 2 * reservation,
        "settled spend plus the calls lost in flight, not the whole lease"
    );
    let next = call(addr, &key, "answer").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(
        remaining(&next),
        CAP - charged - reservation,
        "the budget left is the cap less settled less in-flight"
    );
}
