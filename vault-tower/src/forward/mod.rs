//! The default inner service: forwards the rewritten request over pooled
//! HTTP/1.1 connections that each call drives in its own task (see
//! [`pool`]; TLS by rustls with the `ring` provider), with explicit timeouts
//! and no redirects followed.
//!
//! Failures become the 502/504 JSON responses of docs/api.md#errors, carrying
//! an [`UpstreamFailure`] extension, so the layer knows whether the request
//! reached the provider (the `not_sent` rule of docs/budgets.md#settlement).
//!
//! - `service.rs`: [`Forwarder`], the `Service`, and [`UpstreamFailure`];
//! - `body.rs`: [`ForwardBody`], the response body, with its idle timeout;
//! - `pool.rs`: the connections, kept per origin, and [`Exchange`];
//! - `upstream.rs`: where each provider lives ([`Upstreams`]) and how long
//!   vaultgate waits for it ([`Timeouts`]).

mod body;
mod pool;
mod service;
mod upstream;

pub use body::{ForwardBody, IdleTimeout};
pub use pool::Exchange;
pub use service::{Forwarder, UpstreamFailure};
pub use upstream::{BadBaseUrl, Timeouts, Upstream, Upstreams};
