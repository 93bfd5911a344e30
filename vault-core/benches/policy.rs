//! The policy engine on the request path: `DefaultEngine::check` + `settle`
//! for a typical policy (provider, endpoint and model allowlists, a rate
//! limit, a budget) with `MemoryStore`; and budget reservations per second
//! under 64-way contention on one key with `SqliteStore`.
//!
//! `reserve_settle_with_open_holds/{memory,sqlite}/{0,1000}`: one
//! reservation and its settlement on a line already holding 0 or 1,000
//! unsettled reservations (the stores' cost per open hold).
//!
//! Run: `cargo bench -p vault-core --bench policy -- --warm-up-time 1 --measurement-time 3`
//!
//! The contention figure is printed as `sqlite_reservations_per_sec_64way`
//! (64 tokio tasks on a multi-thread runtime, each reserving and settling in
//! a loop against one key's budget, for `BENCH_CONTENTION_SECS`, default 5),
//! and the same through `LeasedStore` as
//! `leased_sqlite_reservations_per_sec_64way`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use vault_core::clock::{SystemClock, UnixMillis};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
use vault_core::money::Micros;
use vault_core::policy::{
    Budget, BudgetPeriod, CallOutcome, DefaultEngine, EndpointRule, ModelGlob, Policy,
    PolicyEngine, RateLimit, RequestFacts,
};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::{BudgetLine, KeyRecord, KeyStatus, Settlement};
use vault_core::scope::Scopes;
use vault_core::store::{KeyStore, LeasedStore, MemoryStore, SqliteStore};

fn typical_key() -> KeyRecord {
    let id = KeyId::generate().unwrap();
    KeyRecord {
        hash: KeyHash::of(id.as_str()),
        id,
        prefix: KeyPrefix::new("vpx_live_Ab3x"),
        previous_hash: None,
        previous_valid_until: None,
        name: "bench".into(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: None,
        policy: Policy {
            providers: Some(vec![Provider::OpenAi, Provider::Anthropic]),
            endpoints: Some(vec![
                EndpointRule::parse("POST /v1/chat/completions").unwrap(),
                EndpointRule::parse("POST /v1/messages").unwrap(),
            ]),
            models: Some(vec![
                ModelGlob::parse("gpt-4o-mini").unwrap(),
                ModelGlob::parse("claude-3-5-haiku-*").unwrap(),
            ]),
            budget: Some(Budget {
                limit: Micros(1_000_000_000_000),
                period: BudgetPeriod::Monthly,
                clamp_explicit_limits: false,
            }),
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(1_000_000_000_000),
                requests_per_day: Some(1_000_000_000_000),
                tokens_per_minute: Some(1_000_000_000_000),
                ..RateLimit::default()
            }),
            max_request_chars: Some(100_000),
            ..Policy::default()
        },
        parent: None,
        provider_keys: Vec::new(),
        created_at: UnixMillis(1),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
    }
}

fn facts() -> RequestFacts<'static> {
    RequestFacts {
        method: "POST",
        provider: Provider::OpenAi,
        path: "/v1/chat/completions",
        model: Some("gpt-4o-mini"),
        max_output_tokens: Some(256),
        body_chars: 400,
        stream: false,
        input_tokens_bound: 400,
        input_unbounded: false,
        output_multiplier: 1,
        multipart: false,
    }
}

fn check_and_settle(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let key = typical_key();
    rt.block_on(store.insert_key(&key, None)).unwrap();
    let engine = DefaultEngine::new(
        store,
        Arc::new(PriceTable::builtin()),
        Arc::new(SystemClock),
    );
    let chain = vec![Arc::new(key)];
    let facts = facts();
    let outcome = CallOutcome::Metered(vault_core::meter::Usage {
        tokens_in: 100,
        tokens_out: 50,
        ..Default::default()
    });
    c.bench_function("policy_check_settle_memory", |b| {
        b.iter(|| {
            rt.block_on(async {
                let grant = engine.check(black_box(&chain), &facts).await.unwrap();
                engine.settle(grant, outcome, Some("gpt-4o-mini")).await
            })
        })
    });
    c.bench_function("policy_check_only_memory", |b| {
        // The check alone; settles outside the timing so reservations do not
        // pile up.
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            rt.block_on(async {
                for _ in 0..iters {
                    let start = Instant::now();
                    let grant = engine.check(black_box(&chain), &facts).await.unwrap();
                    took += start.elapsed();
                    engine.settle(grant, outcome, Some("gpt-4o-mini")).await;
                }
            });
            took
        })
    });
}

/// 64 tasks reserving and settling on one key's budget in `SqliteStore`,
/// bare and through `LeasedStore`.
fn sqlite_contention() {
    let dir = tempfile::tempdir().unwrap();
    let bare: Arc<dyn KeyStore> = Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap());
    contention("sqlite_reservations_per_sec_64way", bare);
    let dir = tempfile::tempdir().unwrap();
    let leased: Arc<dyn KeyStore> = Arc::new(LeasedStore::new(
        SqliteStore::open_in_dir(dir.path()).unwrap(),
    ));
    contention("leased_sqlite_reservations_per_sec_64way", leased);
}

fn contention(name: &str, store: Arc<dyn KeyStore>) {
    let secs: u64 = std::env::var("BENCH_CONTENTION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = typical_key();
    rt.block_on(store.insert_key(&key, None)).unwrap();
    let line = BudgetLine {
        key: key.id.clone(),
        limit: Micros(1_000_000_000_000),
        period_start: UnixMillis(0),
    };
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                let line = line.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let now = UnixMillis(1);
                        let r = store
                            .reserve(&line, Micros(500), Micros(100), now, UnixMillis(i64::MAX))
                            .await
                            .unwrap();
                        store
                            .settle(&[Settlement {
                                reservation: r,
                                actual: Micros(300),
                            }])
                            .await
                            .unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let took = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{name}: {:.0} reserve+settle pairs/s ({n} in {took:.1} s)",
        n as f64 / took
    );
}

/// One reservation and its settlement on a line that already holds `open`
/// unsettled reservations (calls in flight, or settlements queued for the
/// usage worker), straight on the store.
fn reserve_with_open_holds(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<(&str, Arc<dyn KeyStore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "sqlite",
            Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap()),
        ),
    ];
    let mut group = c.benchmark_group("reserve_settle_with_open_holds");
    for (name, store) in stores {
        let key = typical_key();
        rt.block_on(store.insert_key(&key, None)).unwrap();
        let line = BudgetLine {
            key: key.id.clone(),
            limit: Micros(1_000_000_000_000),
            period_start: UnixMillis(0),
        };
        let far = UnixMillis(i64::MAX);
        let mut opened = 0;
        for open in [0, 1_000] {
            while opened < open {
                rt.block_on(store.reserve(&line, Micros(500), Micros(1), UnixMillis(1), far))
                    .unwrap();
                opened += 1;
            }
            group.bench_function(format!("{name}/{open}"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let r = store
                            .reserve(&line, Micros(500), Micros(1), UnixMillis(1), far)
                            .await
                            .unwrap();
                        let actual = Micros(400);
                        store
                            .settle(&[Settlement {
                                reservation: r,
                                actual,
                            }])
                            .await
                            .unwrap();
                    })
                })
            });
        }
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    check_and_settle(&mut c);
    reserve_with_open_holds(&mut c);
    c.final_summary();
    if std::env::var_os("BENCH_SKIP_CONTENTION").is_none() {
        sqlite_contention();
    }
}
