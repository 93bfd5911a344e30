//! Management: the typed requests and responses of docs/api.md and the
//! rules behind them, below any transport.
//!
//! - [`wire`]: one type per request and response, serialised exactly as
//!   docs/api.md writes them. vault-tower's HTTP routes parse and answer
//!   with them, and the `vaultgate` CLI sends (remote mode) or passes
//!   (direct mode) the same values.
//! - [`Manager`]: who may do what ([`Actor`]), project checks (403
//!   `project_mismatch`), validation (the same rules as policy files:
//!   [`validate_policy`](crate::policy::validate_policy)), and the audit
//!   entry written before every mutation. A [`ManageHook`] hears of every
//!   change, so a proxy can drop what it cached.
//! - [`ManageError`]: each refusal is one status and code of
//!   docs/api.md#errors.
//!
//! ```
//! use std::sync::Arc;
//! use vault_core::crypto::{AesGcmEncryptor, MasterKey};
//! use vault_core::manage::{Actor, CreateKeyRequest, Manager};
//! use vault_core::store::MemoryStore;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let store = Arc::new(MemoryStore::new());
//! let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate()?)?);
//! let manager = Manager::builder(store, encryptor).build();
//! let req: CreateKeyRequest = serde_json::from_str(r#"{"name": "ci", "ttl": "1h"}"#)?;
//! let issued = manager.create_key(&Actor::Operator, req).await?;
//! assert!(issued.key.expose_secret().starts_with("vpx_live_"));
//! assert_eq!(manager.list_keys(&Actor::Operator).await?.data.len(), 1);
//! # Ok(()) })
//! # }
//! ```

mod error;
mod manager;
pub mod wire;

pub use error::ManageError;
pub use manager::{Actor, Change, ManageHook, Manager, ManagerBuilder};
pub use wire::{
    AddProviderKeyRequest, AuditList, AuditQuery, BudgetLineView, CreateKeyRequest, IssuedKey,
    IssuedSecret, KeyLimits, KeyListQuery, KeyPageView, KeyView, LimitWindowView, List,
    ProviderKeyView, RemovedProviderKey, RevokedKey, RotateKeyRequest, Ttl, UsageList, UsageQuery,
    UsageTotals, UsageView,
};
