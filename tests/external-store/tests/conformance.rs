//! The `KeyStore` conformance suite and the budget threat cases against a
//! store from outside the workspace: one test per case, each on a fresh
//! store.

vault_core::store_conformance_tests!(external_store::WrappedStore::new);
vault_core::threat_conformance_tests!(external_store::WrappedStore::new);
