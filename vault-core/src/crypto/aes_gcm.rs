//! (being written)
/// AES-256-GCM envelope encryptor (being written).
#[derive(Debug)]
pub struct AesGcmEncryptor;
