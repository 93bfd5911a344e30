//! `RedisLimiter` behind `DefaultEngine`, as replicas use it: several
//! engines, each with its own limiter (its own connection), one Redis
//! (docs/redis.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use vault_core::clock::{ManualClock, UnixMillis};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
use vault_core::meter::Usage;
use vault_core::money::Micros;
use vault_core::policy::{
    CallOutcome, DefaultEngine, LimitHeaders, LimitStatusError, LimiterFallback, Policy,
    PolicyEngine, RateLimit, RequestFacts,
};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, KeyStatus};
use vault_core::scope::Scopes;
use vault_core::store::MemoryStore;
use vault_redis::testing::TestRedis;
use vault_redis::{RedisConfig, RedisLimiter};

/// 2026-11-26T08:00:30Z: half a minute into a minute.
const T0: i64 = 1_795_680_030_000;

fn key(policy: Policy, parent: Option<&KeyRecord>) -> KeyRecord {
    let id = KeyId::generate().unwrap();
    KeyRecord {
        hash: KeyHash::of(id.as_str()),
        prefix: KeyPrefix::new("vpx_live_test"),
        previous_hash: None,
        previous_valid_until: None,
        name: "rl".into(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: None,
        policy,
        parent: parent.map(|p| p.id.clone()),
        provider_keys: vec![],
        created_at: UnixMillis(0),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    }
}

fn limited(rate: RateLimit) -> Policy {
    Policy {
        rate_limit: Some(rate),
        ..Policy::default()
    }
}

fn rpm(n: u64) -> RateLimit {
    RateLimit {
        requests_per_minute: Some(n),
        ..RateLimit::default()
    }
}

fn chain(keys: &[&KeyRecord]) -> Vec<Arc<KeyRecord>> {
    keys.iter().map(|k| Arc::new((*k).clone())).collect()
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

/// One replica: an engine with its own Redis connection.
fn replica(config: &RedisConfig, clock: &ManualClock, on_error: LimiterFallback) -> DefaultEngine {
    let limiter = RedisLimiter::with_clock(config, Arc::new(clock.clone())).unwrap();
    DefaultEngine::new(
        Arc::new(MemoryStore::new()),
        Arc::new(PriceTable::builtin()),
        Arc::new(clock.clone()),
    )
    .with_shared_limiter(Arc::new(limiter), on_error)
}

fn local(clock: &ManualClock) -> DefaultEngine {
    DefaultEngine::new(
        Arc::new(MemoryStore::new()),
        Arc::new(PriceTable::builtin()),
        Arc::new(clock.clone()),
    )
}

type Outcome = Result<LimitHeaders, (String, String, LimitHeaders)>;

async fn outcome(engine: &DefaultEngine, c: &[Arc<KeyRecord>]) -> Outcome {
    match engine.check(c, &FACTS).await {
        Ok(g) => Ok(g.headers),
        Err((d, h)) => Err((d.code().to_owned(), d.message(), h)),
    }
}

macro_rules! redis_or_skip {
    () => {
        match TestRedis::start().unwrap() {
            Some(r) => r,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_three_replicas_admit_exactly_60_of_200() {
    let redis = redis_or_skip!();
    let config = redis.config().unwrap();
    let clock = ManualClock::new(UnixMillis(T0));
    let replicas: Vec<Arc<DefaultEngine>> = (0..3)
        .map(|_| Arc::new(replica(&config, &clock, LimiterFallback::Refuse)))
        .collect();
    let k = key(limited(rpm(60)), None);
    let c = chain(&[&k]);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let engine = Arc::clone(&replicas[i % 3]);
        let c = c.clone();
        tasks.push(tokio::spawn(async move { outcome(&engine, &c).await }));
    }
    let mut remaining = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(h) => {
                assert_eq!(h.limit, 60);
                remaining.push(h.remaining);
            }
            Err((code, _, h)) => {
                assert_eq!(code, "rate_limited");
                assert_eq!(
                    (h.limit, h.remaining, h.retry_after_secs),
                    (60, 0, Some(30))
                );
                refused += 1;
            }
        }
    }
    assert_eq!((remaining.len(), refused), (60, 140));
    // Each admission saw a different count: the remaining values are 59..=0.
    remaining.sort_unstable();
    assert_eq!(remaining, (0..60).collect::<Vec<u64>>());
    // Every replica agrees on what is left.
    for r in &replicas {
        let (code, _, h) = outcome(r, &c).await.unwrap_err();
        assert_eq!(code, "rate_limited");
        assert_eq!((h.limit, h.remaining), (60, 0));
    }
    // The next minute admits again, on any replica.
    clock.advance(30_000);
    assert_eq!(outcome(&replicas[1], &c).await.unwrap().remaining, 59);
    assert_eq!(outcome(&replicas[2], &c).await.unwrap().remaining, 58);
}

/// The same calls, on the in-memory limiter and on Redis through three
/// replicas in turn, give the same headers and refusals.
#[tokio::test]
async fn boundary_redis_and_in_memory_limits_answer_alike() {
    let redis = redis_or_skip!();
    let config = redis.config().unwrap();
    let clock = ManualClock::new(UnixMillis(T0));
    let replicas: Vec<DefaultEngine> = (0..3)
        .map(|_| replica(&config, &clock, LimiterFallback::Refuse))
        .collect();
    let memory = local(&clock);
    let parent = key(
        limited(RateLimit {
            requests_per_minute: Some(5),
            requests_per_day: Some(7),
            ..RateLimit::default()
        }),
        None,
    );
    let child = key(
        Policy {
            max_parallel: Some(100),
            ..limited(RateLimit {
                requests_per_minute: Some(3),
                tokens_per_minute: Some(1000),
                ..RateLimit::default()
            })
        },
        Some(&parent),
    );
    let sibling = key(Policy::default(), Some(&parent));
    let chains = [
        chain(&[&child, &parent]),
        chain(&[&sibling, &parent]),
        chain(&[&parent]),
    ];
    for (step, (advance, which)) in [
        (0, 0),
        (0, 0),
        (1_000, 1),
        (0, 0),
        (0, 0),
        (0, 2),
        (0, 1),
        (29_999, 1),
        (1, 0),
        (10_000, 0),
        (0, 2),
        (0, 1),
        (60_000, 2),
        (0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        clock.advance(advance);
        let expected = outcome(&memory, &chains[which]).await;
        let got = outcome(&replicas[step % 3], &chains[which]).await;
        assert_eq!(got, expected, "step {step}");
    }
    // Tokens per minute: recorded at settlement, refused until the minute ends.
    let g = memory.check(&chains[0], &FACTS).await;
    let r = replicas[0].check(&chains[0], &FACTS).await;
    for (engine, g) in [(&memory, g), (&replicas[0], r)] {
        if let Ok(g) = g {
            let used = Usage {
                tokens_in: 600,
                tokens_out: 400,
                ..Usage::default()
            };
            engine.settle(g, CallOutcome::Metered(used), None).await;
        }
    }
    // The Redis write is sent in the background.
    let expected = outcome(&memory, &chains[0]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = outcome(&replicas[1], &chains[0]).await;
        if got == expected || tokio::time::Instant::now() > deadline {
            assert_eq!(got, expected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn concurrency_a_parent_limit_refuses_its_child_without_counting_it() {
    let redis = redis_or_skip!();
    let config = redis.config().unwrap();
    let clock = ManualClock::new(UnixMillis(T0));
    let (a, b) = (
        replica(&config, &clock, LimiterFallback::Refuse),
        replica(&config, &clock, LimiterFallback::Refuse),
    );
    let parent = key(limited(rpm(2)), None);
    let child = key(limited(rpm(10)), Some(&parent));
    let c = chain(&[&child, &parent]);
    assert_eq!(outcome(&a, &c).await.unwrap().remaining, 1);
    assert_eq!(outcome(&b, &chain(&[&parent])).await.unwrap().remaining, 0);
    let (code, message, h) = outcome(&a, &c).await.unwrap_err();
    assert_eq!(code, "rate_limited");
    assert!(message.contains("2 requests per minute"), "{message}");
    assert_eq!((h.limit, h.remaining), (2, 0));
    // Refused: the child's own window counted only the admitted call.
    let (_, h) = b
        .check(
            &chain(&[&{
                let mut revoked = child.clone();
                revoked.status = KeyStatus::Revoked;
                revoked
            }]),
            &FACTS,
        )
        .await
        .unwrap_err();
    assert_eq!((h.limit, h.remaining), (10, 9));
}

#[tokio::test]
async fn lifecycle_max_parallel_holds_across_replicas_and_a_dead_replicas_slots_expire() {
    let redis = redis_or_skip!();
    let config = redis
        .config()
        .unwrap()
        .with_slot_lease(Duration::from_secs(30));
    let clock = ManualClock::new(UnixMillis(T0));
    let [a, b, c] = [0, 1, 2].map(|_| replica(&config, &clock, LimiterFallback::Refuse));
    let k = key(
        Policy {
            max_parallel: Some(2),
            ..Policy::default()
        },
        None,
    );
    let ch = chain(&[&k]);
    let g1 = a.check(&ch, &FACTS).await.unwrap();
    let g2 = b.check(&ch, &FACTS).await.unwrap();
    let (code, message, h) = outcome(&c, &ch).await.unwrap_err();
    assert_eq!(code, "rate_limited");
    assert!(message.contains("at most 2 requests"), "{message}");
    assert_eq!(h.retry_after_secs, Some(1));
    // A released slot (in the background) is free for any replica.
    drop(g1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let g3 = loop {
        match c.check(&ch, &FACTS).await {
            Ok(g) => break g,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err((d, _)) => panic!("slot not released: {d}"),
        }
    };
    // Replica b dies holding a slot (never released, never renewed).
    std::mem::forget(g2);
    drop(b);
    assert!(c.check(&ch, &FACTS).await.is_err());
    clock.advance(29_999);
    assert!(a.check(&ch, &FACTS).await.is_err());
    clock.advance(1);
    let g4 = a.check(&ch, &FACTS).await.unwrap();
    drop((g3, g4));
}

#[tokio::test]
async fn lifecycle_a_live_slot_is_renewed_past_its_first_lease() {
    let redis = redis_or_skip!();
    let config = redis
        .config()
        .unwrap()
        .with_slot_lease(Duration::from_millis(300));
    let clock = ManualClock::new(UnixMillis(T0));
    let (a, b) = (
        replica(&config, &clock, LimiterFallback::Refuse),
        replica(&config, &clock, LimiterFallback::Refuse),
    );
    let k = key(
        Policy {
            max_parallel: Some(1),
            ..Policy::default()
        },
        None,
    );
    let ch = chain(&[&k]);
    let g = a.check(&ch, &FACTS).await.unwrap();
    // The lease is renewed every 100 ms from the clock's time, so moving
    // the clock on and letting a renewal run keeps the slot held.
    for _ in 0..5 {
        clock.advance(200);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(b.check(&ch, &FACTS).await.is_err());
    }
    drop(g);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.check(&ch, &FACTS).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_redis_stopped_refuses_503_or_falls_back_and_recovers() {
    let mut redis = redis_or_skip!();
    let config = redis.config().unwrap();
    let clock = ManualClock::new(UnixMillis(T0));
    let strict = replica(&config, &clock, LimiterFallback::Refuse);
    let lenient = replica(&config, &clock, LimiterFallback::Local);
    let k = key(limited(rpm(3)), None);
    let free = key(Policy::default(), None);
    let (ch, free) = (chain(&[&k]), chain(&[&free]));
    assert_eq!(outcome(&strict, &ch).await.unwrap().remaining, 2);
    assert_eq!(outcome(&lenient, &ch).await.unwrap().remaining, 1);

    redis.stop();
    let (code, _, h) = outcome(&strict, &ch).await.unwrap_err();
    assert_eq!(code, "rate_limiter_unavailable");
    assert_eq!(h.retry_after_secs, Some(1));
    assert!(strict.limiter_unavailable() >= 1);
    // A key without limits needs no limiter.
    assert!(outcome(&strict, &free).await.is_ok());
    // The lenient replica limits in memory: 3 per minute of its own.
    for left in [2, 1, 0] {
        assert_eq!(outcome(&lenient, &ch).await.unwrap().remaining, left);
    }
    assert_eq!(outcome(&lenient, &ch).await.unwrap_err().0, "rate_limited");
    assert_eq!(lenient.limiter_fallbacks(), 4);
    // Under load, a stopped Redis fails calls fast (the breaker).
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let _ = outcome(&strict, &ch).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Redis comes back (empty): both recover without being rebuilt.
    redis.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match outcome(&strict, &ch).await {
            Ok(h) => {
                assert_eq!(h.remaining, 2);
                break;
            }
            Err((code, _, _)) if code == "rate_limiter_unavailable" => {
                assert!(tokio::time::Instant::now() < deadline, "no recovery");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let fallbacks = lenient.limiter_fallbacks();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = outcome(&lenient, &ch).await;
        if lenient.limiter_fallbacks() == fallbacks {
            assert_eq!(h.unwrap().remaining, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn lifecycle_a_replica_starts_while_redis_is_down() {
    let mut redis = redis_or_skip!();
    let config = redis.config().unwrap();
    redis.stop();
    let clock = ManualClock::new(UnixMillis(T0));
    let engine = replica(&config, &clock, LimiterFallback::Refuse);
    let ch = chain(&[&key(limited(rpm(3)), None)]);
    assert_eq!(
        outcome(&engine, &ch).await.unwrap_err().0,
        "rate_limiter_unavailable"
    );
    redis.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while outcome(&engine, &ch).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn limit_status_reads_another_replicas_counts_and_changes_nothing() {
    let mut redis = redis_or_skip!();
    let config = redis.config().unwrap();
    let clock = ManualClock::new(UnixMillis(T0));
    let (a, b) = (
        replica(&config, &clock, LimiterFallback::Refuse),
        replica(&config, &clock, LimiterFallback::Refuse),
    );
    let parent = key(
        Policy {
            max_parallel: Some(4),
            ..limited(RateLimit {
                requests_per_day: Some(100),
                ..rpm(5)
            })
        },
        None,
    );
    let child = key(limited(rpm(10)), Some(&parent));
    let c = chain(&[&child, &parent]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(a.check(&c, &FACTS).await.unwrap());
    }
    drop(held.pop());
    // Let the dropped grant's slot release reach Redis.
    for _ in 0..100 {
        let s = b.limit_status(&c).await.unwrap();
        if s.windows.last().is_some_and(|w| w.used == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Replica b peeks what replica a counted, twice alike.
    let s = b.limit_status(&c).await.unwrap();
    assert_eq!(s, b.limit_status(&c).await.unwrap());
    let minute_end = UnixMillis(T0 - 30_000 + 60_000);
    let shown: Vec<_> = s
        .windows
        .iter()
        .map(|w| (&w.key, w.kind.as_str(), w.used, w.limit, w.resets_at))
        .collect();
    assert_eq!(
        shown,
        [
            (&child.id, "requests_per_minute", 3, 10, Some(minute_end)),
            (&parent.id, "requests_per_minute", 3, 5, Some(minute_end)),
            (
                &parent.id,
                "requests_per_day",
                3,
                100,
                Some(UnixMillis(T0).start_of_utc_day().plus_millis(86_400_000))
            ),
            (&parent.id, "max_parallel", 2, 4, None),
        ]
    );
    assert_eq!(s.budget, None);
    // The peeks changed nothing: the next admission sees 3 requests.
    let h = outcome(&b, &c).await.unwrap();
    assert_eq!((h.limit, h.remaining), (5, 1));
    // The same counts as the in-memory limiter after the same calls.
    let mem = local(&clock);
    for _ in 0..3 {
        mem.check(&c, &FACTS).await.unwrap();
    }
    let m = mem.limit_status(&c).await.unwrap();
    assert_eq!(m.windows[..3], s.windows[..3]);
    // Redis gone: the status is an error, never the replica's own guess.
    redis.stop();
    assert!(matches!(
        b.limit_status(&c).await,
        Err(LimitStatusError::Limiter(_))
    ));
}
