//! (being written)
/// SQLite store (being written).
#[derive(Debug)]
pub struct SqliteStore;
