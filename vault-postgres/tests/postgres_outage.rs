//! Promise 6 of docs/replicas.md: PostgreSQL stopped under load. Calls
//! answer 503 `store_unavailable` (fail closed), never a panic or a 500;
//! every call answered 200 keeps its usage record and its charge, written
//! once PostgreSQL is back; when what waits for the store fills its
//! buffer, new calls are refused rather than records dropped; the service
//! recovers by itself. Each test stops and restarts a server of its own
//! (by PID, same port and data).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod outage {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tokio::task::JoinHandle;
    use tower::{Layer, ServiceExt};
    use vault_core::clock::{Clock, SystemClock, UnixMillis};
    use vault_core::crypto::{AesGcmEncryptor, MasterKey};
    use vault_core::key::{KeyEnv, KeyId};
    use vault_core::manage::CreateKeyRequest;
    use vault_core::money::Micros;
    use vault_core::policy::{Budget, BudgetPeriod, DefaultEngine, PlanSet, Policy, RateLimit};
    use vault_core::pricing::PriceTable;
    use vault_core::record::{BudgetLine, UsageFilter};
    use vault_core::store::{KeyStore, LeasedStore};
    use vault_postgres::PostgresStore;
    use vault_postgres::testing::TestPostgres;
    use vault_tower::admin::{Actor, Admin};
    use vault_tower::{Maintenance, VaultContext, VaultLayer};

    struct Gateway {
        ctx: Arc<VaultContext>,
        maintenance: Maintenance,
        key: String,
        id: KeyId,
        bare: PostgresStore,
    }

    /// One replica on `url`: the store `vaultgate serve` builds, its
    /// maintenance running, and a test-environment key (answered by the
    /// mock provider) with `budget`.
    async fn gateway(url: &str, usage_buffer: usize, budget: Option<f64>) -> Gateway {
        let pg = PostgresStore::connect(url, 8).await.unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(LeasedStore::new(pg).with_stale_after(Duration::from_secs(2)));
        let engine = Arc::new(DefaultEngine::new(
            store.clone(),
            Arc::new(PriceTable::builtin()),
            Arc::new(SystemClock),
        ));
        let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
        let ctx = VaultContext::builder(store, encryptor, engine)
            .heartbeat_interval(Duration::from_millis(200))
            .usage_buffer(usage_buffer)
            .build();
        let maintenance = ctx.start_maintenance();
        let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
        let policy = Policy {
            budget: budget.map(|usd| Budget {
                limit: Micros::from_usd(usd).unwrap(),
                period: BudgetPeriod::Total,
                clamp_explicit_limits: false,
            }),
            // Far above what the test sends (a key's default plan is lower).
            rate_limit: Some(RateLimit {
                requests_per_minute: Some(10_000_000),
                ..RateLimit::default()
            }),
            ..Policy::default()
        };
        let issued = admin
            .manager()
            .create_key(
                &Actor::Operator,
                CreateKeyRequest {
                    name: Some("outage".into()),
                    permissions: Some(vec!["chat:write".into()]),
                    env: Some(KeyEnv::Test),
                    ..CreateKeyRequest::default()
                }
                .with_policy(policy),
            )
            .await
            .unwrap();
        Gateway {
            ctx,
            maintenance,
            key: issued.key.expose_secret().to_owned(),
            id: issued.record.id,
            bare: PostgresStore::connect(url, 2).await.unwrap(),
        }
    }

    /// One chat call through the layer: its status and error code.
    async fn call(ctx: &Arc<VaultContext>, key: &str) -> (StatusCode, Option<String>) {
        // Never called: test keys are answered by the mock provider.
        let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let body = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = Request::post("/openai/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = VaultLayer::new(ctx.clone())
            .layer(inner)
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
        (status, code)
    }

    /// What the load saw.
    #[derive(Default)]
    struct Seen {
        ok: AtomicUsize,
        unavailable: AtomicUsize,
    }

    /// `tasks` callers until `stop`; any answer but 200 or 503
    /// `store_unavailable` fails the test.
    fn load(
        g: &Gateway,
        tasks: usize,
        seen: Arc<Seen>,
        stop: Arc<AtomicBool>,
    ) -> Vec<JoinHandle<()>> {
        (0..tasks)
            .map(|_| {
                let (ctx, key, seen, stop) =
                    (g.ctx.clone(), g.key.clone(), seen.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match call(&ctx, &key).await {
                            (StatusCode::OK, _) => seen.ok.fetch_add(1, Ordering::Relaxed),
                            (StatusCode::SERVICE_UNAVAILABLE, Some(code))
                                if code == "store_unavailable" =>
                            {
                                seen.unavailable.fetch_add(1, Ordering::Relaxed)
                            }
                            other => panic!("unexpected answer: {other:?}"),
                        };
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect()
    }

    async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < limit,
                "{what} did not happen within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    /// The key's usage records that answered 200, and their total cost.
    async fn answered(bare: &PostgresStore, id: &KeyId) -> (usize, u64) {
        let records = bare
            .list_usage(&UsageFilter {
                key_id: Some(id.clone()),
                ..UsageFilter::default()
            })
            .await
            .unwrap();
        let ok: Vec<_> = records.iter().filter(|r| r.status == 200).collect();
        (ok.len(), ok.iter().map(|r| r.cost.0).sum())
    }

    fn stop_pg(pg: &TestPostgres) -> Instant {
        pg.stop().unwrap();
        Instant::now()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_postgres_stopped_under_load_fails_closed_loses_no_acknowledged_usage_and_recovers()
     {
        let pg = TestPostgres::start_or_skip().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let g = gateway(&url, vault_tower::DEFAULT_USAGE_BUFFER, Some(1_000.0)).await;
        let (seen, stop) = (Arc::new(Seen::default()), Arc::new(AtomicBool::new(false)));
        let tasks = load(&g, 4, seen.clone(), stop.clone());
        wait_until("calls", Duration::from_secs(10), || {
            seen.ok.load(Ordering::Relaxed) > 100
        })
        .await;

        let stopped = tokio::task::block_in_place(|| stop_pg(&pg));
        let refused_after = wait_until("503 store_unavailable", Duration::from_secs(10), || {
            seen.unavailable.load(Ordering::Relaxed) > 0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ok_before_restart = seen.ok.load(Ordering::Relaxed);
        tokio::task::block_in_place(|| pg.restart()).unwrap();
        let down_for = stopped.elapsed();
        let recovered_after = wait_until(
            "a 200 after PostgreSQL returned",
            Duration::from_secs(15),
            || seen.ok.load(Ordering::Relaxed) > ok_before_restart,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let ok = seen.ok.load(Ordering::Relaxed);
        eprintln!(
            "{ok} calls answered 200, {} refused 503 store_unavailable; the first refusal \
             {refused_after:?} after the stop completed; PostgreSQL down {down_for:?}; a 200 again \
             {recovered_after:?} after it returned",
            seen.unavailable.load(Ordering::Relaxed)
        );
        g.ctx.flush().await;
        g.maintenance.shutdown().await;

        // Every call answered 200 has its record and its charge.
        let (records, cost) = answered(&g.bare, &g.id).await;
        assert_eq!(records, ok, "one usage record per call answered 200");
        let line = BudgetLine {
            key: g.id.clone(),
            limit: Micros::from_usd(1_000.0).unwrap(),
            period_start: UnixMillis(0),
        };
        let usage = g.bare.budget_usage(&line, SystemClock.now()).await.unwrap();
        assert_eq!(usage.reserved, Micros::ZERO, "nothing left held");
        assert_eq!(usage.settled.0, cost, "every charge reached the budget");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_postgres_stopped_a_full_usage_buffer_refuses_new_calls_and_drains_when_it_returns()
     {
        let pg = TestPostgres::start_or_skip().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        // A key without a budget: while its record is cached, its calls
        // need nothing from the store but their usage records written.
        const BUFFER: usize = 50;
        let g = gateway(&url, BUFFER, None).await;
        let (seen, stop) = (Arc::new(Seen::default()), Arc::new(AtomicBool::new(false)));
        let tasks = load(&g, 4, seen.clone(), stop.clone());
        wait_until("calls", Duration::from_secs(10), || {
            seen.ok.load(Ordering::Relaxed) > 100
        })
        .await;
        // The key's record freshly cached (for KEY_CACHE_TTL, 0.9 s), then
        // PostgreSQL stopped: until the cache expires, calls are admitted
        // and only their records wait for the store.
        g.ctx.invalidate_keys();
        assert_eq!(call(&g.ctx, &g.key).await.0, StatusCode::OK);
        seen.ok.fetch_add(1, Ordering::Relaxed);
        let ok_before_stop = seen.ok.load(Ordering::Relaxed);
        let stopped = Instant::now();
        tokio::task::block_in_place(|| stop_pg(&pg));
        wait_until("503 store_unavailable", Duration::from_secs(10), || {
            seen.unavailable.load(Ordering::Relaxed) > 0
        })
        .await;
        let refused_after = stopped.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acknowledged_while_down = seen.ok.load(Ordering::Relaxed) - ok_before_stop;
        assert!(
            refused_after < vault_tower::KEY_CACHE_TTL / 2,
            "refused {refused_after:?} after the stop: the buffer, not the key cache, refused"
        );
        // (Records of calls answered just before the stop may have been
        // queued already.)
        assert!(
            acknowledged_while_down >= BUFFER / 2,
            "only {acknowledged_while_down} calls were answered before the refusals began"
        );
        // The buffer plus its headroom for calls already admitted (a
        // quarter, at least 16) and the batch the worker holds (at most
        // 512 jobs taken before the stop was noticed).
        assert!(
            acknowledged_while_down <= 512 + BUFFER + 16,
            "{acknowledged_while_down} calls were answered while the buffer was full"
        );
        tokio::task::block_in_place(|| pg.restart()).unwrap();
        let ok_before_restart = seen.ok.load(Ordering::Relaxed);
        wait_until(
            "a 200 after PostgreSQL returned",
            Duration::from_secs(15),
            || seen.ok.load(Ordering::Relaxed) > ok_before_restart + 20,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let ok = seen.ok.load(Ordering::Relaxed);
        eprintln!(
            "{ok} calls answered 200 ({acknowledged_while_down} while PostgreSQL was down, \
             the buffer full {refused_after:?} after the stop), {} refused",
            seen.unavailable.load(Ordering::Relaxed)
        );
        g.ctx.flush().await;
        g.maintenance.shutdown().await;
        let (records, _) = answered(&g.bare, &g.id).await;
        assert_eq!(records, ok, "no acknowledged call lost its usage record");
        let dropped = g.ctx.metrics().dropped_records.load(Ordering::Relaxed);
        assert_eq!(dropped, 0, "no record dropped");
    }
}
