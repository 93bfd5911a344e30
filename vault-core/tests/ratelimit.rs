//! Rate-limit windows under a controlled clock (docs/threat-model.md, I6),
//! through `DefaultEngine`: fixed UTC-aligned windows, and `Retry-After` equal
//! to the real next admission.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use vault_core::clock::{ManualClock, UnixMillis};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
use vault_core::money::Micros;
use vault_core::policy::{
    CallOutcome, DefaultEngine, LimitHeaders, Policy, PolicyEngine, RateLimit, RequestFacts,
};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, KeyStatus};
use vault_core::scope::Scopes;
use vault_core::store::MemoryStore;

/// 2026-11-26T08:00:00Z, the start of a minute.
const M0: i64 = 1_795_680_000_000;

fn key(limits: RateLimit) -> Arc<KeyRecord> {
    let id = KeyId::generate().unwrap();
    Arc::new(KeyRecord {
        hash: KeyHash::of(id.as_str()),
        prefix: KeyPrefix::new("vpx_live_test"),
        previous_hash: None,
        previous_valid_until: None,
        name: "rl".into(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: None,
        policy: Policy {
            rate_limit: Some(limits),
            ..Policy::default()
        },
        parent: None,
        provider_keys: vec![],
        created_at: UnixMillis(0),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    })
}

fn rpm(n: u64) -> RateLimit {
    RateLimit {
        requests_per_minute: Some(n),
        ..RateLimit::default()
    }
}

fn setup(start: i64) -> (DefaultEngine, ManualClock) {
    let clock = ManualClock::new(UnixMillis(start));
    let engine = DefaultEngine::new(
        Arc::new(MemoryStore::new()),
        Arc::new(PriceTable::builtin()),
        Arc::new(clock.clone()),
    );
    (engine, clock)
}

const FACTS: RequestFacts<'static> = RequestFacts {
    method: "POST",
    provider: Provider::OpenAi,
    path: "/v1/chat/completions",
    model: Some("gpt-4o-mini"),
    max_output_tokens: Some(10),
    body_chars: 10,
    stream: false,
    input_tokens_bound: 10,
    input_unbounded: false,
    output_multiplier: 1,
    multipart: false,
};

/// One call: the headers it got, and whether it was admitted.
async fn call(engine: &DefaultEngine, chain: &[Arc<KeyRecord>]) -> (bool, LimitHeaders) {
    match engine.check(chain, &FACTS).await {
        Ok(g) => {
            let h = g.headers;
            engine.settle(g, CallOutcome::NotSent, None).await;
            (true, h)
        }
        Err((d, h)) => {
            assert_eq!(d.code(), "rate_limited", "{d:?}");
            let Some(secs) = h.retry_after_secs else {
                panic!("a 429 without Retry-After");
            };
            assert!(
                matches!(d, vault_core::denial::Denial::RateLimited { retry_after_secs, .. } if retry_after_secs == secs)
            );
            (false, h)
        }
    }
}

#[tokio::test]
async fn boundary_retry_after_is_the_real_next_admission() {
    let (engine, clock) = setup(M0 + 30_000);
    let chain = [key(rpm(60))];
    for i in 0..60u64 {
        let (ok, h) = call(&engine, &chain).await;
        assert!(ok);
        assert_eq!((h.limit, h.remaining), (60, 59 - i));
        assert_eq!(h.reset_unix_secs, (M0 + 60_000) / 1000);
    }
    let (ok, h) = call(&engine, &chain).await;
    assert!(!ok);
    assert_eq!(
        (h.limit, h.remaining, h.reset_unix_secs),
        (60, 0, (M0 + 60_000) / 1000)
    );
    let wait = h.retry_after_secs.unwrap();
    assert_eq!(wait, 30);
    // One millisecond early: still refused, with a consistent Retry-After.
    clock.advance(i64::try_from(wait).unwrap() * 1000 - 1);
    let (ok, h) = call(&engine, &chain).await;
    assert!(!ok);
    assert_eq!(h.retry_after_secs, Some(1));
    // Exactly Retry-After seconds after the refusal: admitted.
    clock.advance(1);
    let (ok, h) = call(&engine, &chain).await;
    assert!(ok);
    assert_eq!((h.limit, h.remaining), (60, 59));
}

#[tokio::test]
async fn boundary_requests_straddling_a_window_boundary() {
    // 60 at the last second of one minute, 60 at the first of the next:
    // fixed windows admit both bursts (the documented 2N-per-60-s worst
    // case), and never a 61st within one aligned minute.
    let (engine, clock) = setup(M0 + 59_000);
    let chain = [key(rpm(60))];
    for _ in 0..60 {
        assert!(call(&engine, &chain).await.0);
    }
    assert!(!call(&engine, &chain).await.0);
    clock.set(UnixMillis(M0 + 59_999));
    let (ok, h) = call(&engine, &chain).await;
    assert!(!ok);
    assert_eq!(h.retry_after_secs, Some(1));
    clock.set(UnixMillis(M0 + 60_000));
    for _ in 0..60 {
        assert!(call(&engine, &chain).await.0);
    }
    let (ok, h) = call(&engine, &chain).await;
    assert!(!ok);
    assert_eq!(h.retry_after_secs, Some(60));
}

#[tokio::test]
async fn boundary_no_aligned_minute_ever_admits_more_than_the_limit() {
    let (engine, clock) = setup(M0);
    let chain = [key(rpm(60))];
    let mut per_minute = std::collections::BTreeMap::<i64, u32>::new();
    // A deterministic, irregular walk over five minutes.
    let mut step = 7u64;
    while clock_now(&clock) < M0 + 5 * 60_000 {
        let (ok, h) = call(&engine, &chain).await;
        let now = clock_now(&clock);
        if ok {
            *per_minute.entry(now.div_euclid(60_000)).or_default() += 1;
        } else {
            // The refusal's Retry-After never points before the window's end.
            let wait_ms = i64::try_from(h.retry_after_secs.unwrap()).unwrap() * 1000;
            assert!(now + wait_ms >= (now.div_euclid(60_000) + 1) * 60_000);
            assert_eq!(
                h.reset_unix_secs * 1000,
                (now.div_euclid(60_000) + 1) * 60_000
            );
        }
        step = step * 1_103_515_245 % 2_147_483_648;
        clock.advance(i64::try_from(step % 1500).unwrap());
    }
    assert!(per_minute.values().all(|n| *n <= 60), "{per_minute:?}");
    assert!(per_minute.values().any(|n| *n == 60), "{per_minute:?}");
}

fn clock_now(c: &ManualClock) -> i64 {
    use vault_core::clock::Clock;
    c.now().0
}

#[tokio::test]
async fn boundary_daily_limit_retry_after_points_at_utc_midnight() {
    let (engine, clock) = setup(M0); // 08:00 UTC
    let chain = [key(RateLimit {
        requests_per_minute: Some(100),
        requests_per_day: Some(3),
        ..RateLimit::default()
    })];
    for _ in 0..3 {
        assert!(call(&engine, &chain).await.0);
    }
    let (ok, h) = call(&engine, &chain).await;
    assert!(!ok);
    assert_eq!(h.retry_after_secs, Some(16 * 3600));
    assert_eq!(h.limit, 3);
    clock.advance(16 * 3600 * 1000 - 1);
    assert!(!call(&engine, &chain).await.0);
    clock.advance(1);
    assert!(call(&engine, &chain).await.0);
}

#[tokio::test]
async fn a_parents_limit_counts_its_childrens_requests() {
    let (engine, _clock) = setup(M0);
    let parent = key(rpm(3));
    let mut a = (*key(rpm(10))).clone();
    a.parent = Some(parent.id.clone());
    let mut b = (*key(rpm(10))).clone();
    b.parent = Some(parent.id.clone());
    let (a, b) = (Arc::new(a), Arc::new(b));
    assert!(call(&engine, &[a.clone(), parent.clone()]).await.0);
    assert!(call(&engine, &[b.clone(), parent.clone()]).await.0);
    let (ok, h) = call(&engine, &[a.clone(), parent.clone()]).await;
    assert!(ok);
    assert_eq!((h.limit, h.remaining), (3, 0));
    let (ok, h) = call(&engine, &[b, parent.clone()]).await;
    assert!(!ok);
    assert_eq!(h.limit, 3);
}
