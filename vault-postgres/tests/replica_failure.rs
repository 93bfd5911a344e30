//! Promise 5 of docs/replicas.md: a replica that dies without a word
//! (`kill -9`, a lost host) leaves the others serving; its calls in flight
//! are charged their reservations, and its unused budget leases are free
//! again within seconds, not at their expiry. Each replica is a
//! `LeasedStore` over its own `PostgresStore` pool on one database; a
//! replica dies by having its heartbeat task aborted and its store leaked
//! (`mem::forget`): nothing is drained or settled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod replica_failure {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use tokio::task::JoinHandle;
    use vault_core::clock::UnixMillis;
    use vault_core::conformance::{key, line};
    use vault_core::money::Micros;
    use vault_core::record::{BudgetLine, Reservation, Settlement};
    use vault_core::store::{KeyStore, LeasedStore, StoreError};
    use vault_postgres::PostgresStore;
    use vault_postgres::testing::TestPostgres;

    const NOW: UnixMillis = UnixMillis(10_000);
    const LATER: UnixMillis = UnixMillis(600_000);
    /// A call's reservation ($0.01) and what a settled call costs.
    const WANT: u64 = 10_000;
    const COST: u64 = 4_000;
    /// Every replica's `stale_after` in these tests (5 s by default).
    const STALE: Duration = Duration::from_secs(1);
    /// How often each replica's maintenance heartbeat runs here.
    const BEAT: Duration = Duration::from_millis(200);

    type Store = LeasedStore<PostgresStore>;

    struct Replica {
        store: Arc<Store>,
        heart: JoinHandle<()>,
    }

    async fn replica(url: &str) -> Replica {
        let pg = PostgresStore::connect(url, 4).await.unwrap();
        let store = Arc::new(LeasedStore::new(pg).with_stale_after(STALE));
        let beating = store.clone();
        let heart = tokio::spawn(async move {
            loop {
                let _ = beating.heartbeat().await;
                tokio::time::sleep(BEAT).await;
            }
        });
        Replica { store, heart }
    }

    /// What one load task did: settled spend, calls, and the calls it left
    /// in flight (reserved, never settled).
    #[derive(Default)]
    struct Done {
        spent: u64,
        calls: usize,
        open: Vec<Reservation>,
    }

    /// Calls on `store` until `stop`: each reserves `WANT` and settles at
    /// `COST`, except every seventh, left in flight. Any refusal or error
    /// fails the test: the budget is ample.
    fn load(store: Arc<Store>, l: BudgetLine, stop: Arc<AtomicBool>) -> JoinHandle<Done> {
        tokio::spawn(async move {
            let mut done = Done::default();
            while !stop.load(Ordering::Relaxed) {
                let r = match store
                    .reserve(&l, Micros(WANT), Micros(WANT), NOW, LATER)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let u = store.get_ref().budget_usage(&l, NOW).await;
                        panic!("a call was refused after {} calls: {e}; {u:?}", done.calls)
                    }
                };
                done.calls += 1;
                if done.calls % 7 == 0 {
                    done.open.push(r);
                } else {
                    store
                        .settle(&[Settlement {
                            reservation: r,
                            actual: Micros(COST),
                        }])
                        .await
                        .unwrap();
                    done.spent += COST;
                }
                // A call takes a while: about a thousand a second per task.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            done
        })
    }

    async fn finish(tasks: Vec<JoinHandle<Done>>) -> Done {
        let mut all = Done::default();
        for t in tasks {
            let d = t.await.unwrap();
            all.spent += d.spent;
            all.calls += d.calls;
            all.open.extend(d.open);
        }
        all
    }

    fn held(open: &[Reservation]) -> u64 {
        open.iter().map(|r| r.amount.0).sum()
    }

    /// How many leases the store still has for `holder`, what they hold,
    /// and what closing them would charge.
    async fn leases_of(url: &str, holder: &str) -> (i64, i64, i64) {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(*), COALESCE(sum(amount), 0)::BIGINT,
                        COALESCE(sum(LEAST(amount, cover - charged)), 0)::BIGINT
                   FROM reservations WHERE holder = $1",
                &[&holder],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_replica_killed_mid_load_others_serve_and_its_unused_leases_return_within_seconds()
     {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let bare = PostgresStore::connect(&url, 2).await.unwrap();
        let k = key();
        bare.insert_key(&k, None).await.unwrap();
        let l = line(&k, 1_000_000_000, 0);
        let replicas = [
            replica(&url).await,
            replica(&url).await,
            replica(&url).await,
        ];
        let (stop_victim, stop_others) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut victim_tasks = Vec::new();
        let mut other_tasks = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            for _ in 0..2 {
                if i == 2 {
                    victim_tasks.push(load(r.store.clone(), l.clone(), stop_victim.clone()));
                } else {
                    other_tasks.push(load(r.store.clone(), l.clone(), stop_others.clone()));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The victim dies between two calls, with calls in flight: no
        // drain, no settlement, its heartbeat gone.
        stop_victim.store(true, Ordering::Relaxed);
        let victim = finish(victim_tasks).await;
        let [a, b, v] = replicas;
        v.heart.abort();
        let _ = v.heart.await;
        let exposure = v.store.exposure().unwrap().0;
        let holder = v.store.holder_id().unwrap().to_owned();
        std::mem::forget(v.store);
        let killed = Instant::now();
        let (count, leased, charge) = leases_of(&url, &holder).await;
        assert!(count > 0, "the victim held leases");

        // The others keep serving; one of them closes the victim's leases.
        while leases_of(&url, &holder).await.0 > 0 {
            assert!(
                killed.elapsed() < STALE * 3,
                "the dead replica's leases were not closed within {:?}",
                STALE * 3
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed_after = killed.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_others.store(true, Ordering::Relaxed);
        let others = finish(other_tasks).await;
        assert!(others.calls > 0);

        // The survivors settle their calls in flight and give back their
        // leases: what is left charged is exactly what every call cost,
        // what the victim's calls in flight held, and the victim's
        // exposure (its covers beyond what its calls spent and held).
        let mut survivors_spent = others.spent;
        for (i, r) in others.open.iter().enumerate() {
            let s = if i % 2 == 0 { &a.store } else { &b.store };
            // Settling on the other replica is a no-op: only the one that
            // holds a call's lease knows it. Settle on both.
            for s in [s, if i % 2 == 0 { &b.store } else { &a.store }] {
                s.settle(&[Settlement {
                    reservation: r.clone(),
                    actual: Micros(COST),
                }])
                .await
                .unwrap();
            }
            survivors_spent += COST;
        }
        a.heart.abort();
        b.heart.abort();
        a.store.flush().await.unwrap();
        b.store.flush().await.unwrap();
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        eprintln!(
            "victim: {} calls, {} µ$ settled, {} µ$ in flight, {leased} µ$ leased, \
             closed at {charge} µ$, exposure {exposure} µ$; its leases closed {closed_after:?} after the kill; \
             survivors: {} calls",
            victim.calls,
            victim.spent,
            held(&victim.open),
            others.calls
        );
        assert!(
            charge < leased,
            "part of the dead replica's leases was released, not charged"
        );
        assert_eq!(usage.reserved, Micros(0), "nothing is left held");
        assert_eq!(
            usage.settled.0,
            survivors_spent + victim.spent + held(&victim.open) + exposure,
            "charged: every settled call, the dead replica's calls in flight, its exposure"
        );
        let spend = bare.get_key(&k.id).await.unwrap().unwrap().spend;
        assert_eq!(spend, usage.settled);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_replica_taken_for_dead_while_alive_never_spends_past_the_cap() {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let bare = PostgresStore::connect(&url, 2).await.unwrap();
        let k = key();
        bare.insert_key(&k, None).await.unwrap();
        // Room for 100 calls of $0.01.
        let cap = 100 * WANT;
        let l = line(&k, cap, 0);
        let new = |url: String| async move {
            let pg = PostgresStore::connect(&url, 4).await.unwrap();
            Arc::new(LeasedStore::new(pg).with_stale_after(STALE))
        };
        let (a, b) = (new(url.clone()).await, new(url.clone()).await);
        // A takes others for dead only once its own heartbeats have held
        // for `STALE`.
        a.heartbeat().await.unwrap();
        // B takes a lease and leaves three calls in flight, then stalls
        // (no heartbeat) until A takes it for dead and closes its leases.
        let mut b_open = Vec::new();
        for _ in 0..3 {
            b_open.push(
                b.reserve(&l, Micros(WANT), Micros(WANT), NOW, LATER)
                    .await
                    .unwrap(),
            );
        }
        let exposure = b.exposure().unwrap().0;
        tokio::time::sleep(STALE + Duration::from_millis(200)).await;
        assert!(a.heartbeat().await.unwrap() > 0, "A closed B's lease");
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        assert_eq!(usage.settled.0, 3 * WANT + exposure, "charged at its cover");
        assert_eq!(usage.reserved, Micros(0), "the rest released");
        // B wakes up: its calls in flight settle as no-ops (charged
        // already), and it takes new leases for new calls.
        b.settle(
            &b_open
                .iter()
                .map(|r| Settlement {
                    reservation: r.clone(),
                    actual: Micros(COST),
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        // Both race for what is left; every call charged its whole hold.
        let mut granted = 0u64;
        loop {
            let mut progressed = false;
            for s in [&a, &b] {
                match s.reserve(&l, Micros(WANT), Micros(1), NOW, LATER).await {
                    Ok(r) => {
                        granted += r.amount.0;
                        s.settle(&[Settlement {
                            actual: r.amount,
                            reservation: r,
                        }])
                        .await
                        .unwrap();
                        progressed = true;
                    }
                    Err(StoreError::BudgetExceeded { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            if !progressed {
                break;
            }
        }
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        assert_eq!(usage.reserved, Micros(0));
        assert_eq!(
            usage.settled.0,
            3 * WANT + exposure + granted,
            "the closed lease's charge plus every later call, nothing twice"
        );
        assert_eq!(
            usage.settled.0, cap,
            "the budget is used up to the cap and not past it"
        );
    }
}
