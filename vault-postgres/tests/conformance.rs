//! The public `KeyStore` conformance suite and the budget threat cases
//! (docs/threat-model.md, I1–I4, I7) against `PostgresStore`, run exactly as
//! every other store runs them (docs/conformance.md): one test per case,
//! each on a fresh database of one server shared by this binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

/// Without PostgreSQL the cases below are not compiled (build.rs); this
/// says so loudly, and fails under `CI=true`.
#[test]
fn postgres_is_installed_or_skipped() {
    // Starts (or skips) the shared server.
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
fn fresh() -> vault_postgres::PostgresStore {
    TestPostgres::shared()
        .expect("build.rs found PostgreSQL")
        .fresh_store(8)
}

#[cfg(postgres_installed)]
mod postgres {
    vault_core::store_conformance_tests!(super::fresh);
    vault_core::threat_conformance_tests!(super::fresh);
}

#[cfg(postgres_installed)]
mod leased_postgres {
    use vault_core::store::LeasedStore;
    vault_core::store_conformance_tests!(|| LeasedStore::new(super::fresh()));
    vault_core::threat_conformance_tests!(|| LeasedStore::new(super::fresh()));
}

/// Dashboard sessions shared by every replica (docs/dashboard.md#sessions).
#[cfg(postgres_installed)]
#[test]
fn sessions() {
    let store = fresh();
    vault_core::conformance::run(
        vault_core::conformance::session_store_keeps_purges_and_counts(std::sync::Arc::new(store)),
    );
}
