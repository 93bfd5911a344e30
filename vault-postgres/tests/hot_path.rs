//! The hot path of a replica on PostgreSQL (docs/replicas.md): with its
//! key's budget within a lease, a call costs no PostgreSQL round trip —
//! leases, cover raises and heartbeats together stay a small fraction of
//! the calls, measured with PostgreSQL's own transaction counter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod hot_path {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vault_core::clock::UnixMillis;
    use vault_core::conformance::{key, line};
    use vault_core::money::Micros;
    use vault_core::record::Settlement;
    use vault_core::store::{KeyStore, LeasedStore};
    use vault_postgres::PostgresStore;
    use vault_postgres::testing::TestPostgres;

    const NOW: UnixMillis = UnixMillis(10_000);
    const LATER: UnixMillis = UnixMillis(600_000);

    /// Transactions committed in `url`'s database so far, as PostgreSQL's
    /// statistics have them (a session reports its own at the latest when
    /// it ends).
    async fn commits(url: &str) -> i64 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("SELECT pg_stat_force_next_flush()")
            .await
            .unwrap();
        client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_calls_within_a_lease_make_no_postgres_round_trip() {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let bare = PostgresStore::connect(&url, 1).await.unwrap();
        let k = key();
        bare.insert_key(&k, None).await.unwrap();
        let l = line(&k, 1_000_000_000, 0);
        let store = Arc::new(LeasedStore::new(
            PostgresStore::connect(&url, 4).await.unwrap(),
        ));
        let beating = store.clone();
        let heart = tokio::spawn(async move {
            loop {
                let _ = beating.heartbeat().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let before = commits(&url).await;
        const TASKS: usize = 4;
        const CALLS: usize = 5_000;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (store, l) = (store.clone(), l.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..CALLS / TASKS {
                    let r = store
                        .reserve(&l, Micros(10_000), Micros(10_000), NOW, LATER)
                        .await
                        .unwrap();
                    store
                        .settle(&[Settlement {
                            reservation: r,
                            actual: Micros(4_000),
                        }])
                        .await
                        .unwrap();
                    // Calls spread over about two seconds.
                    tokio::time::sleep(Duration::from_micros(1_500)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = started.elapsed();
        heart.abort();
        let _ = heart.await;
        // Its connections closed: their sessions report every transaction.
        drop(store);
        let trips = commits(&url).await - before;
        eprintln!(
            "{CALLS} calls in {elapsed:?}: {trips} PostgreSQL transactions \
             (leases, cover raises, heartbeats, reads), {:.4} per call",
            trips as f64 / CALLS as f64
        );
        assert!(
            (trips as usize) * 20 < CALLS,
            "{trips} transactions for {CALLS} calls"
        );
    }
}
