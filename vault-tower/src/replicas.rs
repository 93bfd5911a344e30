//! What a replica shares with the others beyond the store
//! (docs/replicas.md): a [`RevocationNotifier`] that tells the other
//! replicas which cached keys to drop, and [`ReadinessProbe`]s that
//! `GET /readyz` runs against the engines the replica depends on.
//!
//! Both are small traits so that vault-tower depends on no particular
//! broadcast or database: the `vaultgate` binary implements them over
//! Redis (`vault-redis`), an embedding application over whatever it runs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use vault_core::key::KeyId;

/// The longest a readiness probe may take before it counts as failed:
/// well inside a Kubernetes probe's default one-second timeout.
pub const READINESS_TIMEOUT: Duration = Duration::from_millis(500);

/// Told about keys whose cached records every other replica must drop:
/// keys revoked on this replica (a key and all its descendants) and keys
/// rotated on it (the old secret's cached record). Called by
/// [`VaultContext`](crate::VaultContext)'s management hook after the store
/// applied the change; it must return quickly (queue the message, do not
/// wait for the network).
pub trait RevocationNotifier: Send + Sync {
    /// `ids` changed in the store; other replicas should forget them.
    fn revoked(&self, ids: &[KeyId]);
}

/// One dependency `GET /readyz` checks.
#[async_trait]
pub trait ReadinessProbe: Send + Sync {
    /// Its name in the `/readyz` answer (`"store"`, `"redis"`).
    fn name(&self) -> &'static str;

    /// Whether it answers now. The error is logged, never sent to the
    /// client, and must hold no secret.
    async fn check(&self) -> Result<(), String>;
}

/// The outcome of one probe, as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The probe's name.
    pub name: &'static str,
    /// Whether it answered within [`READINESS_TIMEOUT`].
    pub ok: bool,
}

/// Runs every probe at once, each within [`READINESS_TIMEOUT`]; a failure
/// is logged at `warn` with its reason.
pub(crate) async fn run_probes(probes: &[Arc<dyn ReadinessProbe>]) -> Vec<ProbeOutcome> {
    let checks = probes.iter().map(|p| async move {
        let ok = match tokio::time::timeout(READINESS_TIMEOUT, p.check()).await {
            Ok(Ok(())) => true,
            Ok(Err(reason)) => {
                tracing::warn!(dependency = p.name(), %reason, "readiness check failed");
                false
            }
            Err(_) => {
                tracing::warn!(dependency = p.name(), "readiness check timed out");
                false
            }
        };
        ProbeOutcome { name: p.name(), ok }
    });
    futures_util::future::join_all(checks).await
}

/// The store's probe: one small read (`get_meta`).
pub(crate) struct StoreProbe(pub(crate) Arc<dyn vault_core::store::KeyStore>);

#[async_trait]
impl ReadinessProbe for StoreProbe {
    fn name(&self) -> &'static str {
        "store"
    }

    async fn check(&self) -> Result<(), String> {
        self.0
            .get_meta("readyz")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
