//! Master-key rotation: re-wrap every provider key's data key under the
//! current master key.
//!
//! Run it with an encryptor whose current key is the new one and whose
//! previous keys include the old one ([`super::AesGcmEncryptor::with_previous`]).
//! Each record is replaced on its own with a compare-and-swap
//! ([`KeyStore::replace_sealed`]), so:
//! - a crash at any point leaves every record wrapped by the old or the new
//!   key, never by neither; rerunning finishes the job;
//! - a rerun after completion re-wraps nothing;
//! - a record changed or removed concurrently is re-read and retried, or
//!   skipped once gone;
//! - no provider key is ever decrypted: only the 32-byte data keys are.
//!
//! When every record is current, the store's `master_key_check` is moved to
//! the new key, after which starting with only the new key works and
//! starting with only the old key fails with a clear message.

use super::aes_gcm::sealed_key_id;
use super::master::MasterKeyId;
use super::verify::MASTER_KEY_CHECK_META;
use super::{Aad, CryptoError, Encryptor};
use crate::key::ProviderKeyId;
use crate::record::ProviderKeyRecord;
use crate::store::{KeyStore, StoreError};

/// How often one record is re-read and retried when it keeps changing
/// under the rotation before giving up.
const MAX_ATTEMPTS: usize = 8;

/// What a rotation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Records re-wrapped under the current master key by this run.
    pub rewrapped: usize,
    /// Records that were already under the current master key.
    pub already_current: usize,
}

/// Why a rotation stopped. Records re-wrapped before the stop stay
/// re-wrapped; fix the cause and rerun.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// A record is wrapped by a master key that is not loaded.
    #[error(
        "provider key {record} is encrypted with master key id {key_id}, which is not loaded; load it as a previous key and rerun the rotation"
    )]
    UnknownMasterKey {
        /// The record.
        record: ProviderKeyId,
        /// The master key id it needs.
        key_id: MasterKeyId,
    },
    /// A record's data key could not be unwrapped: it is damaged or was
    /// moved from another row.
    #[error(
        "provider key {record} could not be decrypted (damaged or moved from another row); remove it and rerun the rotation"
    )]
    Damaged {
        /// The record.
        record: ProviderKeyId,
    },
    /// A record kept changing concurrently.
    #[error("provider key {record} kept changing during the rotation; rerun the rotation")]
    Contended {
        /// The record.
        record: ProviderKeyId,
    },
    /// Re-wrapping failed (random source or key setup).
    #[error("re-wrapping provider key {record} failed")]
    Crypto {
        /// The record.
        record: ProviderKeyId,
    },
    /// The store failed.
    #[error("store error during master-key rotation: {0}")]
    Store(#[from] StoreError),
}

/// What happened to one record.
enum Outcome {
    Rewrapped,
    AlreadyCurrent,
    Removed,
}

/// Re-wraps every provider key not yet under `enc.current_key_id()`, one
/// record at a time, then stores the current key's check value. Resumable
/// and idempotent (see the module docs).
pub async fn rotate_master_key(
    store: &dyn KeyStore,
    enc: &dyn Encryptor,
) -> Result<RotationReport, RotationError> {
    let mut report = RotationReport::default();
    for record in store.list_provider_keys(None).await? {
        match rotate_one(store, enc, record).await? {
            Outcome::Rewrapped => report.rewrapped += 1,
            Outcome::AlreadyCurrent => report.already_current += 1,
            Outcome::Removed => {}
        }
    }
    if let Some(current) = enc.master_key_checks().first() {
        store
            .set_meta(MASTER_KEY_CHECK_META, &current.to_hex())
            .await?;
    }
    Ok(report)
}

async fn rotate_one(
    store: &dyn KeyStore,
    enc: &dyn Encryptor,
    mut record: ProviderKeyRecord,
) -> Result<Outcome, RotationError> {
    for _ in 0..MAX_ATTEMPTS {
        let aad = Aad {
            record_id: record.id.as_str(),
            project: &record.project,
            provider: record.provider,
        };
        let rewrapped = match enc.rewrap(&record.sealed, &aad) {
            Ok(sealed) => sealed,
            Err(CryptoError::UnknownMasterKey) => {
                return Err(match sealed_key_id(&record.sealed) {
                    Some(key_id) => RotationError::UnknownMasterKey {
                        record: record.id,
                        key_id,
                    },
                    None => RotationError::Damaged { record: record.id },
                });
            }
            Err(CryptoError::Seal) => return Err(RotationError::Crypto { record: record.id }),
            Err(_) => return Err(RotationError::Damaged { record: record.id }),
        };
        if rewrapped == record.sealed {
            return Ok(Outcome::AlreadyCurrent);
        }
        if store
            .replace_sealed(&record.id, &record.sealed, &rewrapped)
            .await?
        {
            return Ok(Outcome::Rewrapped);
        }
        match store.get_provider_key(&record.id).await? {
            Some(fresh) => record = fresh,
            None => return Ok(Outcome::Removed),
        }
    }
    Err(RotationError::Contended { record: record.id })
}
