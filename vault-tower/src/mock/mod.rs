//! The built-in mock provider: answers `vpx_test_` keys in each provider's
//! own shape (JSON and SSE) with deterministic, realistic `usage`, honouring
//! the output limit, so a fresh install works offline. It never dials out.
//!
//! - `service.rs`: [`MockProvider`], the `Service`, and [`MockTarget`];
//! - `body.rs`: [`MockBody`], its response body;
//! - `answers.rs`: each provider's answer, JSON or SSE.

mod answers;
mod body;
mod service;

pub use body::MockBody;
pub use service::{MockProvider, MockTarget};
