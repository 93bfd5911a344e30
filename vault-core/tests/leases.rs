//! What `LeasedStore` promises beyond the conformance suite: one store
//! write per lease, the cap across processes sharing a store, shutdown and
//! crash accounting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use tokio::sync::Barrier;
use vault_core::clock::UnixMillis;
use vault_core::conformance::{key, line};
use vault_core::money::Micros;
use vault_core::record::Settlement;
use vault_core::store::{KeyStore, LeasedStore, SqliteStore, StoreError};

const NOW: UnixMillis = UnixMillis(10_000);
const LATER: UnixMillis = UnixMillis(70_000);

fn settle_at(r: &vault_core::record::Reservation, actual: u64) -> Settlement {
    Settlement {
        reservation: r.clone(),
        actual: Micros(actual),
    }
}

/// Reserves a 100 µ$ call on `l` at `now` through `leased`, and returns it
/// with what the inner store took for it: held plus settled, since a used-up
/// lease is settled as the next is taken (0 when the call fit the lease).
async fn reserve_measuring_lease(
    leased: &LeasedStore<vault_core::store::MemoryStore>,
    l: &vault_core::record::BudgetLine,
    now: UnixMillis,
) -> Result<(vault_core::record::Reservation, u64), StoreError> {
    let taken_so_far = |u: vault_core::record::BudgetUsage| u.reserved.0 + u.settled.0;
    let before = taken_so_far(leased.get_ref().budget_usage(l, now).await?);
    let r = leased
        .reserve(l, Micros(100), Micros(1), now, LATER)
        .await?;
    let after = taken_so_far(leased.get_ref().budget_usage(l, now).await?);
    Ok((r, after.saturating_sub(before)))
}

#[tokio::test]
async fn boundary_one_store_reservation_covers_a_lease_of_calls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let leased = LeasedStore::new(SqliteStore::open(&path).unwrap()).with_lease_factor(4);
    let bare = SqliteStore::open(&path).unwrap();
    let k = key();
    leased.insert_key(&k, None).await.unwrap();
    let l = line(&k, 1_000_000, 0);
    let mut calls = Vec::new();
    for _ in 0..4 {
        calls.push(
            leased
                .reserve(&l, Micros(100), Micros(1), NOW, LATER)
                .await
                .unwrap(),
        );
    }
    // Four calls, one lease of 4 × 100 in the store; the leased view is exact.
    assert_eq!(
        bare.budget_usage(&l, NOW).await.unwrap().reserved,
        Micros(400)
    );
    assert_eq!(
        leased.budget_usage(&l, NOW).await.unwrap().reserved,
        Micros(400)
    );
    // The fifth takes a second lease, twice as big: the first was used up
    // within a second.
    calls.push(
        leased
            .reserve(&l, Micros(100), Micros(1), NOW, LATER)
            .await
            .unwrap(),
    );
    assert_eq!(
        bare.budget_usage(&l, NOW).await.unwrap().reserved,
        Micros(1_200)
    );
    assert_eq!(
        leased.budget_usage(&l, NOW).await.unwrap().reserved,
        Micros(500)
    );
    let all: Vec<Settlement> = calls.iter().map(|r| settle_at(r, 30)).collect();
    leased.settle(&all).await.unwrap();
    let usage = leased.budget_usage(&l, NOW).await.unwrap();
    assert_eq!((usage.settled, usage.reserved), (Micros(150), Micros::ZERO));
    // Shutdown gives everything back: the bare store agrees to the micro-dollar.
    leased.flush().await.unwrap();
    let usage = bare.budget_usage(&l, NOW).await.unwrap();
    assert_eq!((usage.settled, usage.reserved), (Micros(150), Micros::ZERO));
    assert_eq!(
        bare.get_key(&k.id).await.unwrap().unwrap().spend,
        Micros(150)
    );
}

#[tokio::test]
async fn boundary_leases_grow_under_load_and_shrink_when_quiet() {
    let leased = LeasedStore::new(vault_core::store::MemoryStore::new()).with_lease_factor(2);
    let k = key();
    leased.insert_key(&k, None).await.unwrap();
    let l = line(&k, 1_000_000_000, 0);
    // Store-held amount after each call at `now`, with every call settled at
    // once (so each lease is used up only by calls of its own).
    let mut held = Vec::new();
    let mut now = NOW;
    for step in 0..40 {
        if step == 30 {
            // A quiet spell: the next leases are taken seconds apart.
            now = now.plus_millis(5_000);
        }
        let (r, taken) = reserve_measuring_lease(&leased, &l, now).await.unwrap();
        if taken > 0 {
            held.push(taken);
        }
        leased.settle(&[settle_at(&r, 100)]).await.unwrap();
        if step >= 30 {
            now = now.plus_millis(5_000);
        }
    }
    // Busy: 2 calls, then 4, 8, 16 (each lease covers twice the last).
    assert_eq!(&held[..4], &[200, 400, 800, 1_600], "{held:?}");
    // Quiet: back down to halving leases, never below factor × want.
    let last = *held.last().unwrap();
    assert!(last < 1_600, "leases shrink when quiet: {held:?}");
    assert!(held.iter().all(|&h| h >= 200), "{held:?}");
}

#[tokio::test]
async fn boundary_a_lease_never_takes_more_than_a_quarter_of_what_is_left() {
    let leased = LeasedStore::new(vault_core::store::MemoryStore::new()).with_lease_factor(2);
    let k = key();
    leased.insert_key(&k, None).await.unwrap();
    let l = line(&k, 100_000, 0);
    let mut max_lease = 0;
    for _ in 0..200 {
        let before = leased.get_ref().budget_usage(&l, NOW).await.unwrap();
        let left = 100_000 - before.settled.0 - before.reserved.0;
        let Ok((r, taken)) = reserve_measuring_lease(&leased, &l, NOW).await else {
            break;
        };
        assert!(
            taken <= (left / 4).max(200),
            "lease of {taken} with {left} left"
        );
        max_lease = max_lease.max(taken);
        leased.settle(&[settle_at(&r, 100)]).await.unwrap();
    }
    assert!(max_lease > 200, "leases grew: {max_lease}");
}

#[tokio::test]
async fn lifecycle_a_crashed_process_lease_is_charged_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let k = key();
    let l = line(&k, 1_000_000, 0);
    let window = std::time::Duration::from_secs(30);
    {
        let leased = LeasedStore::new(SqliteStore::open(&path).unwrap())
            .with_lease_factor(10)
            .with_lease_window(window);
        leased.insert_key(&k, None).await.unwrap();
        let r = leased
            .reserve(&l, Micros(100), Micros(1), NOW, LATER)
            .await
            .unwrap();
        leased.settle(&[settle_at(&r, 40)]).await.unwrap();
        // Dropped without `flush`: the process died.
    }
    let bare = SqliteStore::open(&path).unwrap();
    let usage = bare.budget_usage(&l, NOW).await.unwrap();
    assert_eq!(
        (usage.settled, usage.reserved),
        (Micros::ZERO, Micros(1_000))
    );
    let lease_expiry = LATER.plus_millis(30_000);
    assert_eq!(bare.sweep(UnixMillis(lease_expiry.0 - 1)).await.unwrap(), 0);
    assert_eq!(bare.sweep(lease_expiry).await.unwrap(), 1);
    // Never less than was spent (40): the whole lease.
    let usage = bare.budget_usage(&l, NOW).await.unwrap();
    assert_eq!(
        (usage.settled, usage.reserved),
        (Micros(1_000), Micros::ZERO)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_two_leased_processes_never_exceed_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let a = Arc::new(LeasedStore::new(SqliteStore::open(&path).unwrap()));
    let b = Arc::new(LeasedStore::new(SqliteStore::open(&path).unwrap()));
    let k = key();
    a.insert_key(&k, None).await.unwrap();
    let l = line(&k, 500_000, 0);
    let barrier = Arc::new(Barrier::new(200));
    let mut tasks = Vec::new();
    for n in 0..200 {
        let store: Arc<dyn KeyStore> = if n % 2 == 0 { a.clone() } else { b.clone() };
        let (l, barrier) = (l.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match store
                .reserve(&l, Micros(10_000), Micros(10_000), NOW, LATER)
                .await
            {
                Ok(r) => {
                    store.settle(&[settle_at(&r, 10_000)]).await.unwrap();
                    1u64
                }
                Err(StoreError::BudgetExceeded { .. }) => 0,
                Err(e) => panic!("unexpected: {e}"),
            }
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.unwrap();
    }
    assert!(granted * 10_000 <= 500_000, "{granted} calls granted");
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    let bare = SqliteStore::open(&path).unwrap();
    let usage = bare.budget_usage(&l, NOW).await.unwrap();
    assert_eq!(
        (usage.settled, usage.reserved),
        (Micros(granted * 10_000), Micros::ZERO)
    );
}
