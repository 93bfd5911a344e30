//! # vaultgate
//!
//! A vault and proxy for LLM API keys. This facade re-exports the engine
//! ([`core`], the `vault-core` crate) and the tower layer ([`tower`], the
//! `vault-tower` crate); the `vaultgate` binary lives in `vault-cli`.

pub use vault_core as core;
pub use vault_tower as tower;
