//! One `KeyStore` conformance suite, run unchanged against every backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "support/store_suite.rs"]
mod store_suite;

use std::sync::Arc;

use tempfile::TempDir;
use vault_core::store::{MemoryStore, SqliteStore};

/// A store under test plus whatever must live as long as it.
struct Harness {
    store: store_suite::Store,
    _dir: Option<TempDir>,
}

impl Harness {
    fn memory() -> Self {
        Harness {
            store: Arc::new(MemoryStore::new()),
            _dir: None,
        }
    }

    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(&dir.path().join("data")).unwrap();
        Harness {
            store: Arc::new(store),
            _dir: Some(dir),
        }
    }
}

/// Generates one test module per backend, each running every named case
/// of `store_suite` on a multi-thread runtime.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let h = Harness::memory();
                    store_suite::$case(h.store.clone()).await;
                }
            )*
        }

        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let h = Harness::sqlite();
                    store_suite::$case(h.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    keys_insert_find_get_list,
    keys_conflicts_insert_nothing,
    keys_child_of_unknown_parent_is_not_found,
    lifecycle_revoke_cascades_to_grandchildren,
    lifecycle_rotate_keeps_previous_hash_for_grace,
    provider_keys_crud_and_compare_and_swap,
    usage_append_list_filter_and_count,
    meta_round_trip,
    budget_reserve_settle_and_usage,
    budget_periods_are_separate,
    budget_sweep_charges_expired_reservations,
    concurrency_reserve_never_exceeds_limit,
    concurrency_first_reservations_on_fresh_key,
    concurrency_two_children_of_parent_exactly_one_fits,
    budget_carve_out_settles_on_revoke,
    budget_carve_outs_settle_through_grandchildren,
    budget_carve_out_settles_when_child_expires,
    boundary_carve_out_that_does_not_fit_inserts_nothing,
);
