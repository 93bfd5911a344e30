//! The [`KeyStore`] conformance suite, public so that a store written
//! outside this workspace passes the same cases as `MemoryStore`,
//! `SqliteStore` and `LeasedStore` (behind the `conformance` feature).
//!
//! Each case is a public async function taking a [`StoreFactory`]; it makes
//! a fresh store with it and panics, with an assertion message, where the
//! store breaks a promise of [`KeyStore`]. [`store_conformance_tests!`](crate::store_conformance_tests)
//! expands to one `#[test]` per case, named after it:
//!
//! ```
//! mod memory_store_conformance {
//!     use vault_core::store::MemoryStore;
//!     vault_core::store_conformance_tests!(|| MemoryStore::new());
//! }
//! ```
//!
//! The budget cases of docs/threat-model.md (I1–I4, I7) run through
//! [`DefaultEngine`](crate::policy::DefaultEngine) over a store in the same
//! way; [`threat_conformance_tests!`](crate::threat_conformance_tests) expands them.
//!
//! A dashboard's [`SessionStore`](crate::store::SessionStore) has one case,
//! [`session_store_keeps_purges_and_counts`].
//!
//! How to run it against your own store: `docs/conformance.md`.

// Test support: a failed promise is a panic with a clear message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cases;
mod pages;
mod records;
mod sessions;
mod threats;

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

pub use cases::*;
pub use pages::*;
pub use records::{child_of, fresh_hash, key, key_at, line, provider_key_at, usage_of};
pub use sessions::session_store_keeps_purges_and_counts;
pub use threats::*;

use crate::store::KeyStore;

/// A store under test, shared between the tasks of a case.
pub type Store = Arc<dyn KeyStore>;

/// The name of every case, in the order [`store_conformance_tests!`](crate::store_conformance_tests) runs
/// them.
pub const CASES: &[&str] = crate::store_conformance_tests! {@cases names()};

/// The name of every threat case (docs/threat-model.md, I1–I4, I7), in the
/// order [`threat_conformance_tests!`](crate::threat_conformance_tests) runs them.
pub const THREAT_CASES: &[&str] = crate::threat_conformance_tests! {@cases names()};

/// A fresh store for one case, with whatever must outlive it (a temporary
/// directory, say). Dropping it drops the store first, then the guard.
pub struct FreshStore {
    store: Store,
    _guard: Option<Box<dyn Any + Send>>,
}

impl FreshStore {
    /// A store that needs nothing kept alive beside it.
    pub fn new(store: impl KeyStore) -> Self {
        FreshStore {
            store: Arc::new(store),
            _guard: None,
        }
    }

    /// A store with `guard`, dropped only after the store.
    pub fn with_guard(store: impl KeyStore, guard: impl Send + 'static) -> Self {
        FreshStore {
            store: Arc::new(store),
            _guard: Some(Box::new(guard)),
        }
    }

    /// A handle on the store; the guard lives as long as `self`.
    pub fn store(&self) -> Store {
        self.store.clone()
    }
}

/// What a [`StoreFactory`] may return: a store, a `(store, guard)` pair, a
/// [`Store`] or a [`FreshStore`].
pub trait IntoFreshStore {
    /// Wraps `self` for one case.
    fn into_fresh_store(self) -> FreshStore;
}

impl<S: KeyStore> IntoFreshStore for S {
    fn into_fresh_store(self) -> FreshStore {
        FreshStore::new(self)
    }
}

impl<S: KeyStore, G: Send + 'static> IntoFreshStore for (S, G) {
    fn into_fresh_store(self) -> FreshStore {
        FreshStore::with_guard(self.0, self.1)
    }
}

impl IntoFreshStore for Store {
    fn into_fresh_store(self) -> FreshStore {
        FreshStore {
            store: self,
            _guard: None,
        }
    }
}

impl IntoFreshStore for FreshStore {
    fn into_fresh_store(self) -> FreshStore {
        self
    }
}

/// Makes a fresh, empty store each time it is called: any `Fn() -> T`
/// where `T` is [`IntoFreshStore`], e.g. `MemoryStore::new`.
pub trait StoreFactory {
    /// A new, empty store no other case sees.
    fn fresh(&self) -> FreshStore;
}

impl<F, T> StoreFactory for F
where
    F: Fn() -> T,
    T: IntoFreshStore,
{
    fn fresh(&self) -> FreshStore {
        self().into_fresh_store()
    }
}

/// Runs one case to completion on its own multi-thread runtime with four
/// workers (the concurrency cases race real threads). The tests
/// [`store_conformance_tests!`](crate::store_conformance_tests) generates call it.
pub fn run(case: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance case");
    runtime.block_on(case);
}

/// Expands to one `#[test]` per conformance case, named after the case,
/// each running it against a fresh store from the factory expression
/// (evaluated once per test). Invoke it once per module:
///
/// ```
/// mod memory {
///     vault_core::store_conformance_tests!(vault_core::store::MemoryStore::new);
/// }
/// ```
///
/// The `@…` arms are internal: the one list of cases, from which
/// [`conformance::CASES`](crate::conformance::CASES) is made too.
#[macro_export]
macro_rules! store_conformance_tests {
    (@cases $then:ident ( $($args:tt)* )) => {
        $crate::store_conformance_tests! {@$then ($($args)*)
            keys_insert_find_get_list,
            budget_add_spend_without_reservation,
            keys_conflicts_insert_nothing,
            keys_child_of_unknown_parent_is_not_found,
            lifecycle_revoke_cascades_to_grandchildren,
            lifecycle_rotate_keeps_previous_hash_for_grace,
            provider_keys_crud_and_compare_and_swap,
            projects_listed_once_in_byte_order,
            keys_children_listed_oldest_first,
            keys_with_provider_keys_listed_by_project,
            usage_append_list_filter_and_count,
            meta_round_trip,
            budget_reserve_settle_and_usage,
            budget_settle_part_keeps_the_rest_held,
            budget_periods_are_separate,
            budget_sweep_charges_expired_reservations,
            concurrency_reserve_never_exceeds_limit,
            concurrency_first_reservations_on_fresh_key,
            concurrency_two_children_of_parent_exactly_one_fits,
            budget_carve_out_settles_on_revoke,
            budget_carve_outs_settle_through_grandchildren,
            budget_carve_out_settles_when_child_expires,
            boundary_carve_out_that_does_not_fit_inserts_nothing,
            budget_revoking_a_child_keeps_what_its_open_calls_hold,
            budget_expiring_a_child_keeps_what_its_open_calls_hold,
            budget_revoked_grandchild_open_call_reaches_the_root,
            keys_page_newest_first_with_offset_limit_and_total,
            keys_page_search_by_name_and_prefix,
            keys_page_filters_by_status_at_now,
        }
    };
    (@names () $($case:ident,)*) => {
        &[$(::core::stringify!($case)),*]
    };
    (@tests ($factory:expr) $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::run($crate::conformance::$case($factory));
            }
        )*
    };
    ($factory:expr $(,)?) => {
        $crate::store_conformance_tests! {@cases tests($factory)}
    };
}

/// Expands to one `#[test]` per threat case of docs/threat-model.md (I1–I4,
/// I7: budgets through [`DefaultEngine`](crate::policy::DefaultEngine)),
/// named after the case, each running it against fresh stores from the
/// factory expression, as [`store_conformance_tests!`](crate::store_conformance_tests) does:
///
/// ```
/// mod memory_threats {
///     vault_core::threat_conformance_tests!(vault_core::store::MemoryStore::new);
/// }
/// ```
///
/// The `@…` arms are internal: the one list of cases, from which
/// [`conformance::THREAT_CASES`](crate::conformance::THREAT_CASES) is made too.
#[macro_export]
macro_rules! threat_conformance_tests {
    (@cases $then:ident ( $($args:tt)* )) => {
        $crate::store_conformance_tests! {@$then ($($args)*)
            concurrency_i1_racing_the_cap_admits_exactly_what_fits,
            concurrency_i2_racing_a_fresh_key_and_a_fresh_child,
            concurrency_i3_child_carve_outs,
            boundary_i4_no_output_limit_reserves_the_model_maximum,
            boundary_i7_daily_and_monthly_budgets_roll_over_at_utc_midnight,
            concurrency_i7_requests_racing_the_rollover_are_bounded_per_period,
        }
    };
    ($factory:expr $(,)?) => {
        $crate::threat_conformance_tests! {@cases tests($factory)}
    };
}
