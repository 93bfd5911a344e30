//! The layer: [`VaultLayer`] wraps a service in a [`Vault`].

mod body;
mod future;
mod layer;
mod phases;
mod refusal;
mod service;
pub(crate) mod sink;

pub use body::{BoxError, MeteredBody};
pub use future::ResponseFuture;
pub use layer::VaultLayer;
pub use service::Vault;
