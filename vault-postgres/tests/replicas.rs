//! Several `PostgresStore`s on one database, each with its own pool, as
//! several `vaultgate` replicas are: budgets stay exact across them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod replicas {
    use std::sync::Arc;

    use tokio::sync::Barrier;
    use vault_core::clock::UnixMillis;
    use vault_core::conformance::{child_of, key, line};
    use vault_core::money::Micros;
    use vault_core::record::{Reservation, Settlement};
    use vault_core::store::{KeyStore, StoreError};
    use vault_postgres::PostgresStore;
    use vault_postgres::testing::TestPostgres;

    const NOW: UnixMillis = UnixMillis(10_000);
    const LATER: UnixMillis = UnixMillis(70_000);

    /// Three stores (three pools, as three replicas) on one fresh database.
    async fn three_replicas() -> Vec<Arc<PostgresStore>> {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(Arc::new(PostgresStore::connect(&url, 8).await.unwrap()));
        }
        stores
    }

    /// `n` reservations of `want` (at least `at_least`) raced from the
    /// three stores in turn; the granted ones.
    async fn race(
        stores: &[Arc<PostgresStore>],
        l: &vault_core::record::BudgetLine,
        n: usize,
        want: u64,
        at_least: u64,
    ) -> Vec<Reservation> {
        let barrier = Arc::new(Barrier::new(n));
        let mut tasks = Vec::new();
        for i in 0..n {
            let (store, l, barrier) = (stores[i % 3].clone(), l.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store
                    .reserve(&l, Micros(want), Micros(at_least), NOW, LATER)
                    .await
            }));
        }
        let mut granted = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(r) => granted.push(r),
                Err(StoreError::BudgetExceeded { .. }) => {}
                Err(e) => panic!("unexpected store error: {e}"),
            }
        }
        granted
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_200_reservations_from_three_replicas_admit_exactly_what_fits() {
        let stores = three_replicas().await;
        let k = key();
        stores[0].insert_key(&k, None).await.unwrap();
        // 77 reservations of $0.01 fit; 200 race for them.
        let l = line(&k, 770_000, 0);
        let granted = race(&stores, &l, 200, 10_000, 10_000).await;
        eprintln!(
            "granted {} of 200 racing reservations (77 fit)",
            granted.len()
        );
        assert_eq!(granted.len(), 77);
        for s in &stores {
            let usage = s.budget_usage(&l, NOW).await.unwrap();
            assert_eq!(
                (usage.settled, usage.reserved),
                (Micros(0), Micros(770_000))
            );
        }
        // Every replica settles every reservation at once: each is charged
        // exactly once.
        let all: Vec<Settlement> = granted
            .iter()
            .map(|r| Settlement {
                reservation: r.clone(),
                actual: Micros(4_000),
            })
            .collect();
        let mut tasks = Vec::new();
        for s in &stores {
            let (s, all) = (s.clone(), all.clone());
            tasks.push(tokio::spawn(async move { s.settle(&all).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let usage = stores[2].budget_usage(&l, NOW).await.unwrap();
        assert_eq!(
            (usage.settled, usage.reserved),
            (Micros(77 * 4_000), Micros(0))
        );
        let k = stores[1].get_key(&k.id).await.unwrap().unwrap();
        assert_eq!(k.spend, Micros(77 * 4_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_partial_reservations_fill_the_line_exactly() {
        let stores = three_replicas().await;
        let k = key();
        stores[0].insert_key(&k, None).await.unwrap();
        let l = line(&k, 1_234_567, 0);
        // Each wants $0.01 and takes as little as one micro-dollar.
        let granted = race(&stores, &l, 200, 10_000, 1).await;
        let held: u64 = granted.iter().map(|r| r.amount.0).sum();
        assert_eq!(held, 1_234_567, "the line is filled to the micro-dollar");
        assert_eq!(granted.len(), 124, "123 whole, one partial");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_sweeps_and_revocations_from_three_replicas_apply_once() {
        let stores = three_replicas().await;
        let parent = key();
        stores[0].insert_key(&parent, None).await.unwrap();
        let pl = line(&parent, 5_000_000, 0);
        let child = child_of(&parent);
        stores[1]
            .insert_key(&child, Some((&pl, Micros(3_000_000))))
            .await
            .unwrap();
        // Reservations that expire at LATER, on the parent.
        for _ in 0..10 {
            stores[2]
                .reserve(&pl, Micros(1_000), Micros(1_000), NOW, LATER)
                .await
                .unwrap();
        }
        let mut sweeps = Vec::new();
        let mut revokes = Vec::new();
        for s in &stores {
            let s2 = s.clone();
            sweeps.push(tokio::spawn(async move { s2.sweep(LATER).await }));
            let (s3, id) = (s.clone(), child.id.clone());
            revokes.push(tokio::spawn(async move { s3.revoke_key(&id, NOW).await }));
        }
        let mut swept = 0;
        for t in sweeps {
            swept += t.await.unwrap().unwrap();
        }
        let mut newly = Vec::new();
        for t in revokes {
            newly.extend(t.await.unwrap().unwrap());
        }
        assert_eq!(swept, 10, "each expired reservation swept once");
        assert_eq!(newly, vec![child.id.clone()], "revoked once");
        // Charged in full, once each; the unspent carve-out released.
        let usage = stores[0].budget_usage(&pl, NOW).await.unwrap();
        assert_eq!((usage.settled, usage.reserved), (Micros(10_000), Micros(0)));
    }
}
