//! (being written)
/// In-memory store (being written).
#[derive(Debug)]
pub struct MemoryStore;
