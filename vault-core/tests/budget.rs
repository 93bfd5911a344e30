//! Budgets under concurrency (docs/threat-model.md, I1–I4, I7), through
//! `DefaultEngine`, against `MemoryStore`, `SqliteStore` and both behind
//! `LeasedStore`. The cases are public (`vault_core::conformance`, see
//! docs/conformance.md) so that other stores run them too; each test here
//! runs its case on every store in turn.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::future::Future;

use vault_core::conformance::{self, FreshStore};
use vault_core::store::{LeasedStore, MemoryStore, SqliteStore};

fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("vaultgate.db")).unwrap();
    (store, dir)
}

/// Makes a fresh store of one kind.
type Factory = fn() -> FreshStore;

/// Every store of this crate, by name, as a factory of fresh ones.
const BACKENDS: [(&str, Factory); 4] = [
    ("leased memory", || {
        FreshStore::new(LeasedStore::new(MemoryStore::new()))
    }),
    ("leased sqlite", || {
        let (store, dir) = sqlite();
        FreshStore::with_guard(LeasedStore::new(store), dir)
    }),
    ("memory", || FreshStore::new(MemoryStore::new())),
    ("sqlite", || {
        let (store, dir) = sqlite();
        FreshStore::with_guard(store, dir)
    }),
];

/// Runs `case` on every store; a failure's output names the store.
async fn on_every_store<F: Future<Output = ()>>(case: impl Fn(Factory) -> F) {
    for (name, factory) in BACKENDS {
        println!("store: {name}");
        case(factory).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_i1_racing_the_cap_admits_exactly_what_fits() {
    on_every_store(conformance::concurrency_i1_racing_the_cap_admits_exactly_what_fits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_i2_racing_a_fresh_key_and_a_fresh_child() {
    on_every_store(conformance::concurrency_i2_racing_a_fresh_key_and_a_fresh_child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_i3_child_carve_outs() {
    on_every_store(conformance::concurrency_i3_child_carve_outs).await;
}

#[tokio::test]
async fn boundary_i4_no_output_limit_reserves_the_model_maximum() {
    on_every_store(conformance::boundary_i4_no_output_limit_reserves_the_model_maximum).await;
}

#[tokio::test]
async fn boundary_i7_daily_and_monthly_budgets_roll_over_at_utc_midnight() {
    on_every_store(conformance::boundary_i7_daily_and_monthly_budgets_roll_over_at_utc_midnight)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_i7_requests_racing_the_rollover_are_bounded_per_period() {
    on_every_store(conformance::concurrency_i7_requests_racing_the_rollover_are_bounded_per_period)
        .await;
}

/// The list the macro expands for other stores is the one run here.
#[test]
fn threat_cases_are_the_ones_run_here() {
    assert_eq!(
        conformance::THREAT_CASES,
        [
            "concurrency_i1_racing_the_cap_admits_exactly_what_fits",
            "concurrency_i2_racing_a_fresh_key_and_a_fresh_child",
            "concurrency_i3_child_carve_outs",
            "boundary_i4_no_output_limit_reserves_the_model_maximum",
            "boundary_i7_daily_and_monthly_budgets_roll_over_at_utc_midnight",
            "concurrency_i7_requests_racing_the_rollover_are_bounded_per_period",
        ]
    );
}
