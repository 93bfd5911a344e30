//! Envelope encryption of provider keys.
//!
//! [`Encryptor`] seals a provider key under a fresh data key that is itself
//! wrapped by a master key; [`AesGcmEncryptor`] does it with ring's
//! AES-256-GCM. The AAD binds each ciphertext to its record id, project and
//! provider, so ciphertexts cannot be swapped between rows.
//!
//! The master key ([`MasterKey`]) comes from `VAULTGATE_MASTER_KEY` or the
//! data directory's `master.key` ([`load_or_create_master_key`]). At every
//! start, after opening the store, call [`verify_master_keys`]: it refuses a
//! wrong or missing master key in one clear sentence. [`rotate_master_key`]
//! re-wraps every record under a new master key, resumably.

mod aes_gcm;
mod master;
mod rotation;
mod secret;
mod verify;

pub use aes_gcm::{AesGcmEncryptor, sealed_key_id};
pub use master::{
    MASTER_KEY_ENV, MASTER_KEY_FILE, MasterKey, MasterKeyCheck, MasterKeyError, MasterKeyId,
    MasterKeySource, load_or_create_master_key,
};
pub use rotation::{RotationError, RotationReport, rotate_master_key};
pub use secret::{ProviderKeyHint, ProviderSecret, Sealed};
pub use verify::{MASTER_KEY_CHECK_META, verify_master_key_check, verify_master_keys};

use crate::provider::Provider;

/// Failure to seal or open. Deliberately opaque: the cause of a failed open
/// (wrong key, tampering, truncation, swapped row) is never told apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The sealed value could not be opened.
    #[error("the sealed value could not be decrypted")]
    Decrypt,
    /// Sealing failed (random source or key setup).
    #[error("sealing failed")]
    Seal,
    /// The sealed value names a master key id that is not loaded.
    #[error("the sealed value was wrapped by a master key that is not loaded")]
    UnknownMasterKey,
}

/// What a ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// The provider-key record id.
    pub record_id: &'a str,
    /// Its project.
    pub project: &'a str,
    /// Its provider.
    pub provider: Provider,
}

impl Aad<'_> {
    /// Unambiguous bytes: length-prefixed fields.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        for part in [self.record_id, self.project, self.provider.as_str()] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

/// Seals and opens provider keys.
pub trait Encryptor: Send + Sync {
    /// Seals `plaintext` under a fresh data key wrapped by the current master key.
    fn seal(&self, plaintext: &ProviderSecret, aad: &Aad<'_>) -> Result<Sealed, CryptoError>;

    /// Opens a sealed value; any mismatch is [`CryptoError::Decrypt`].
    fn open(&self, sealed: &Sealed, aad: &Aad<'_>) -> Result<ProviderSecret, CryptoError>;

    /// Re-wraps the data key under the current master key without exposing the
    /// plaintext outside the encryptor. A value already under the current key
    /// is returned unchanged.
    fn rewrap(&self, sealed: &Sealed, aad: &Aad<'_>) -> Result<Sealed, CryptoError>;

    /// The id of the master key new seals use.
    fn current_key_id(&self) -> MasterKeyId;

    /// The check values of every loaded master key, current first (see
    /// [`MasterKeyCheck`]); start-up and rotation store and compare them.
    /// The default, for encryptors without master keys, is none, which
    /// skips the check.
    fn master_key_checks(&self) -> Vec<MasterKeyCheck> {
        Vec::new()
    }
}
