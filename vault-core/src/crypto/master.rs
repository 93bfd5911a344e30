//! (being written)
/// Master key (being written).
#[derive(Debug)]
pub struct MasterKey;
/// Master key id (being written).
#[derive(Debug, Clone)]
pub struct MasterKeyId;
/// Master key error (being written).
#[derive(Debug)]
pub struct MasterKeyError;
/// Loads or creates (being written).
pub fn load_or_create_master_key() {}
