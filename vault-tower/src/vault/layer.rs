//! `VaultLayer`: wraps any service in a [`Vault`].

use std::sync::Arc;

use tower_layer::Layer;

use super::service::Vault;
use crate::context::VaultContext;

/// Adds vaultgate to a service: authenticate the virtual key, apply its
/// policy, inject the provider key, forward, meter. Small and `Clone`.
#[derive(Debug, Clone)]
pub struct VaultLayer {
    ctx: Arc<VaultContext>,
}

impl VaultLayer {
    /// A layer over a shared context.
    pub fn new(ctx: Arc<VaultContext>) -> Self {
        VaultLayer { ctx }
    }
}

impl<S> Layer<S> for VaultLayer {
    type Service = Vault<S>;

    fn layer(&self, inner: S) -> Vault<S> {
        Vault::new(inner, self.ctx.clone())
    }
}
