//! The start-up check: is the loaded master key the one the store was
//! written with (docs/threat-model.md, D4, B2)?
//!
//! Call [`verify_master_keys`] once at every start, after opening the store
//! and before serving or running a command that reads provider keys. It does
//! both checks below; [`verify_master_key_check`] is the second alone, for
//! callers that have already checked the records.

use super::aes_gcm::sealed_key_id;
use super::master::{MasterKeyCheck, MasterKeyError};
use super::{Aad, CryptoError, Encryptor};
use crate::store::KeyStore;

/// The store meta entry holding the hex check value of the master key the
/// store was last verified or rotated with.
pub const MASTER_KEY_CHECK_META: &str = "master_key_check";

/// Verifies that the loaded master keys fit the store:
///
/// 1. every stored provider key is opened; one wrapped by a master key that
///    is not loaded stops start-up with [`MasterKeyError::NotLoaded`], naming
///    the record and the key id (never the key). A record that is damaged or
///    was moved from another row is logged (by id) and skipped: requests
///    that use it fail, the others are served;
/// 2. [`verify_master_key_check`]: the stored check value must match a
///    loaded key, so a wrong key is caught even with no provider key stored.
pub async fn verify_master_keys(
    store: &dyn KeyStore,
    enc: &dyn Encryptor,
) -> Result<(), MasterKeyError> {
    for record in store.list_provider_keys(None).await? {
        let aad = Aad {
            record_id: record.id.as_str(),
            project: &record.project,
            provider: record.provider,
        };
        if enc.open(&record.sealed, &aad).is_ok() {
            continue;
        }
        // `open` is opaque by design; `rewrap` tells a missing key apart.
        match (
            enc.rewrap(&record.sealed, &aad),
            sealed_key_id(&record.sealed),
        ) {
            (Err(CryptoError::UnknownMasterKey), Some(key_id)) => {
                return Err(MasterKeyError::NotLoaded {
                    record: record.id,
                    key_id,
                });
            }
            _ => tracing::warn!(
                record = %record.id,
                "provider key could not be decrypted: it is damaged or was moved from another row"
            ),
        }
    }
    verify_master_key_check(store, enc).await
}

/// Compares the stored `master_key_check` with the loaded keys' check values
/// (in constant time). On a store without one, stores the current key's.
/// A match with a previous key is accepted: a rotation is under way and
/// [`super::rotate_master_key`] moves the check value when it completes.
pub async fn verify_master_key_check(
    store: &dyn KeyStore,
    enc: &dyn Encryptor,
) -> Result<(), MasterKeyError> {
    let checks = enc.master_key_checks();
    let Some(current) = checks.first() else {
        return Ok(());
    };
    let Some(stored) = store.get_meta(MASTER_KEY_CHECK_META).await? else {
        store
            .set_meta(MASTER_KEY_CHECK_META, &current.to_hex())
            .await?;
        return Ok(());
    };
    let mut matched = false;
    for check in &checks {
        matched |= matches(check, &stored)?;
    }
    if matched {
        Ok(())
    } else {
        Err(MasterKeyError::WrongMasterKey)
    }
}

fn matches(check: &MasterKeyCheck, stored: &str) -> Result<bool, MasterKeyError> {
    check
        .matches_hex(stored)
        .ok_or(MasterKeyError::DamagedCheck)
}
