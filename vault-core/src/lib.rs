//! # vault-core
//!
//! The engine of vaultgate: virtual keys ([`key`]), scopes ([`scope`]),
//! policies and the policy engine ([`policy`]), envelope encryption of
//! provider keys ([`crypto`]), stores ([`store`]), providers ([`provider`]),
//! prices ([`pricing`]), usage metering ([`meter`]), the audit trail
//! ([`audit`]) and the management operations and their wire types
//! ([`manage`]). No HTTP server or client lives here. With the
//! `conformance` feature, `conformance` is the suite every `KeyStore` must
//! pass (docs/conformance.md).
//!
//! ```
//! use vault_core::key::{KeyEnv, KeyFormat};
//! use vault_core::scope::{Permission, Scopes};
//!
//! let key = KeyFormat::default().generate(KeyEnv::Live).unwrap();
//! let presented = KeyFormat::default().parse(key.expose_secret()).unwrap();
//! assert_eq!(presented.hash(), key.hash()); // only the hash is ever stored
//!
//! let scopes = Scopes::parse(&["chat:write", "keys:*"]).unwrap();
//! assert!(scopes.allows(Permission::KeysManage));
//! ```

pub mod audit;
pub mod clock;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod crypto;
pub mod denial;
pub mod key;
pub mod manage;
pub mod meter;
pub mod money;
pub mod policy;
pub mod pricing;
pub mod provider;
pub mod record;
pub mod scope;
pub mod store;
