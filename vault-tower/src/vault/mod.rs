//! The layer: [`VaultLayer`] wraps a service in a [`Vault`], whose request
//! path is a sequence of phases (ARCHITECTURE.md, "The request path"):
//!
//! ```text
//! authenticate → read_body → authorise → prepare_upstream → forward → wrap_response
//! ```
//!
//! - `layer.rs`: [`VaultLayer`], small and `Clone`;
//! - `service.rs`: [`Vault`], the `Service`;
//! - `phases/`: one file per phase, each returning what the next needs or a
//!   `Refusal`;
//! - `refusal.rs`: `Refusal` and `Refusal::respond`, the one place a refusal
//!   becomes its answer, usage record or settlement, audit event and limit
//!   headers;
//! - `future.rs`: [`ResponseFuture`];
//! - `body.rs`: [`MeteredBody`], which meters the answer as it passes and
//!   settles the call at its end or drop;
//! - `sink.rs`: `PendingCall` (an admitted call until it settles) and the
//!   usage worker that writes usage records and denial audit events.

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
