//! The management API (docs/api.md): operations shared with the CLI, JSON
//! views, and the axum router that serves them.

mod ops;
mod routes;
pub mod views;

pub use ops::{Actor, Admin, AdminError, IssuedKey, NewKey};
pub use routes::{AdminOptions, admin_router};
