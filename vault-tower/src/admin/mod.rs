//! The management API of docs/api.md as an axum router: a thin adapter over
//! [`vault_core::manage::Manager`], which holds the rules (who may do what,
//! project checks, validation, audit before mutation). Each route parses
//! the request into its [`vault_core::manage::wire`] type, calls the
//! manager, and serialises the answer; a [`ManageError`] becomes the JSON
//! error of docs/api.md#errors.

mod routes;

use std::sync::Arc;

use vault_core::manage::{Change, ManageHook, Manager};
use vault_core::policy::PlanSet;

pub use routes::{AdminOptions, admin_router};
pub use vault_core::manage::{Actor, ManageError};

use crate::context::VaultContext;

/// What the management router serves: a [`Manager`] and the
/// [`VaultContext`] it authenticates callers with.
#[derive(Debug, Clone)]
pub struct Admin {
    ctx: Arc<VaultContext>,
    manager: Manager,
}

impl Admin {
    /// A manager over `ctx`'s store, encryptor, clock, key format, audit
    /// log and policy engine (for keys' live limits), resolving plans from
    /// `plans`, that drops `ctx`'s cached keys on
    /// every revocation and rotation (at once on this process,
    /// docs/api.md#authentication).
    pub fn new(ctx: Arc<VaultContext>, plans: Arc<PlanSet>) -> Self {
        let mut builder = Manager::builder(ctx.store().clone(), ctx.encryptor().clone())
            .clock(ctx.clock().clone())
            .key_format(ctx.key_format().clone())
            .plans(plans)
            .engine(ctx.engine.clone())
            .hook(ctx.clone());
        if let Some(log) = ctx.audit() {
            builder = builder.audit(log.clone());
        }
        Admin {
            manager: builder.build(),
            ctx,
        }
    }

    /// Serves `manager` (built with `ctx` as its hook, or with a hook that
    /// reaches `ctx`), authenticating callers with `ctx`.
    pub fn with_manager(ctx: Arc<VaultContext>, manager: Manager) -> Self {
        Admin { ctx, manager }
    }

    /// The management operations.
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<VaultContext> {
        &self.ctx
    }
}

/// The proxy's side of a management change: cached key records and
/// provider-key lists are dropped, revoked and rotated keys are announced
/// to the [`RevocationNotifier`](crate::RevocationNotifier) (other
/// replicas), and failed audit writes are counted in
/// `vaultgate_audit_failures_total`.
impl ManageHook for VaultContext {
    fn changed(&self, change: Change<'_>) {
        match change {
            Change::KeysRevoked(ids) => {
                self.invalidate_keys();
                self.announce(ids);
            }
            Change::KeyRotated(id) => {
                self.invalidate_keys();
                self.announce(std::slice::from_ref(id));
            }
            Change::ProviderKeysChanged(_) => self.invalidate_provider_keys(),
            _ => {}
        }
    }

    fn audit_failed(&self) {
        self.metrics()
            .audit_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
