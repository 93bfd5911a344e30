//! AES-256-GCM envelope encryption with ring.
//!
//! Each record gets a fresh 256-bit data key (DEK). The plaintext is sealed
//! under the DEK; the DEK is sealed ("wrapped") under the current master key.
//! Rotating the master key re-wraps the 32-byte DEK and leaves the record's
//! ciphertext untouched, so rotation never handles a provider key in clear.
//!
//! Sealed format, version 1 (all lengths in bytes):
//!
//! ```text
//! version (1) = 1 | master key id (8) | wrap nonce (12) | wrapped DEK + tag (48)
//!                 | data nonce (12)   | ciphertext + tag (len + 16)
//! ```
//!
//! AADs (`‖` is concatenation; `aad` is [`Aad::to_bytes`]):
//! - wrap: `"vaultgate/v1/dek" ‖ master key id ‖ aad`, so a wrapped DEK is
//!   bound to its master key id and its row;
//! - data: `"vaultgate/v1/data" ‖ aad`, bound to the row but not to the master
//!   key, so that a re-wrap does not touch it.
//!
//! Failure policy: [`Encryptor::open`] returns [`CryptoError::Decrypt`] for
//! every kind of failure, including a key id that is not loaded — an id
//! changed by tampering and a genuinely missing key look the same, and the
//! request path has no use for the difference. Only [`Encryptor::rewrap`]
//! (maintenance, never on the request path) reports
//! [`CryptoError::UnknownMasterKey`], for a well-formed value whose key id is
//! not loaded, so that start-up checks and rotation can say which key is
//! missing (the id is written in clear in the stored bytes anyway; see
//! [`sealed_key_id`]).

use std::fmt;

use ring::aead::{AES_256_GCM, Aad as RingAad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::master::{MasterKey, MasterKeyCheck, MasterKeyId};
use super::{Aad, CryptoError, Encryptor, ProviderSecret, Sealed};

/// The format version this encryptor writes and reads.
const VERSION: u8 = 1;
const ID_LEN: usize = 8;
const DEK_LEN: usize = 32;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = DEK_LEN + TAG_LEN;

// Offsets into a sealed value.
const ID_AT: usize = 1;
const WRAP_NONCE_AT: usize = ID_AT + ID_LEN;
const WRAPPED_AT: usize = WRAP_NONCE_AT + NONCE_LEN;
const DATA_NONCE_AT: usize = WRAPPED_AT + WRAPPED_LEN;
const CIPHERTEXT_AT: usize = DATA_NONCE_AT + NONCE_LEN;
/// The shortest well-formed sealed value: an empty plaintext.
const MIN_LEN: usize = CIPHERTEXT_AT + TAG_LEN;

const WRAP_LABEL: &[u8] = b"vaultgate/v1/dek";
const DATA_LABEL: &[u8] = b"vaultgate/v1/data";

/// The master key id written in a sealed value's header, if the value is
/// long enough and of a known version. The id is public (it is stored in
/// clear); this reads nothing secret and proves nothing about integrity.
pub fn sealed_key_id(sealed: &Sealed) -> Option<MasterKeyId> {
    let bytes = sealed.as_bytes();
    if bytes.len() < MIN_LEN || bytes[0] != VERSION {
        return None;
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&bytes[ID_AT..WRAP_NONCE_AT]);
    Some(MasterKeyId::from_bytes(id))
}

/// A loaded master key: its id, its AES-GCM key and its check value.
struct LoadedKey {
    id: MasterKeyId,
    aead: LessSafeKey,
    check: MasterKeyCheck,
}

impl LoadedKey {
    fn new(key: &MasterKey) -> Result<Self, CryptoError> {
        let unbound = UnboundKey::new(&AES_256_GCM, key.bytes()).map_err(|_| CryptoError::Seal)?;
        Ok(LoadedKey {
            id: key.id(),
            aead: LessSafeKey::new(unbound),
            check: MasterKeyCheck::of(key),
        })
    }
}

/// AES-256-GCM envelope encryptor: seals under the current master key and
/// opens (and re-wraps from) the current or any previous one. `Debug` shows
/// key ids only.
pub struct AesGcmEncryptor {
    current: LoadedKey,
    previous: Vec<LoadedKey>,
    rng: SystemRandom,
}

impl AesGcmEncryptor {
    /// An encryptor with one master key.
    pub fn new(current: MasterKey) -> Result<Self, CryptoError> {
        Self::with_previous(current, Vec::new())
    }

    /// An encryptor that seals under `current` and can also open, and
    /// re-wrap from, values wrapped by the `previous` keys (during a
    /// master-key rotation). Previous keys are never used to seal; duplicates
    /// (and the current key listed again) are ignored.
    pub fn with_previous(
        current: MasterKey,
        previous: Vec<MasterKey>,
    ) -> Result<Self, CryptoError> {
        let current = LoadedKey::new(&current)?;
        let mut loaded: Vec<LoadedKey> = Vec::with_capacity(previous.len());
        for key in &previous {
            if key.id() != current.id && loaded.iter().all(|k| k.id != key.id()) {
                loaded.push(LoadedKey::new(key)?);
            }
        }
        Ok(AesGcmEncryptor {
            current,
            previous: loaded,
            rng: SystemRandom::new(),
        })
    }

    /// The ids of every loaded master key, current first.
    pub fn loaded_key_ids(&self) -> Vec<MasterKeyId> {
        self.loaded().map(|k| k.id).collect()
    }

    fn loaded(&self) -> impl Iterator<Item = &LoadedKey> {
        std::iter::once(&self.current).chain(self.previous.iter())
    }

    fn find(&self, id: &[u8]) -> Option<&LoadedKey> {
        self.loaded().find(|k| k.id.as_bytes() == id)
    }

    /// Wraps `dek` under `key` with a fresh nonce: returns nonce and
    /// wrapped bytes (DEK ciphertext + tag).
    fn wrap(
        &self,
        key: &LoadedKey,
        dek: &[u8; DEK_LEN],
        aad: &[u8],
    ) -> Result<([u8; NONCE_LEN], [u8; WRAPPED_LEN]), CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Seal)?;
        let mut buf = Zeroizing::new([0u8; WRAPPED_LEN]);
        buf[..DEK_LEN].copy_from_slice(dek);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                RingAad::from(wrap_aad(key.id, aad)),
                &mut buf[..DEK_LEN],
            )
            .map_err(|_| CryptoError::Seal)?;
        buf[DEK_LEN..].copy_from_slice(tag.as_ref());
        // The wrapped DEK is ciphertext now; only the copy in `buf` is zeroized.
        Ok((nonce, *buf))
    }

    /// Unwraps the DEK of a value whose header has been checked.
    fn unwrap_dek(
        key: &LoadedKey,
        bytes: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<[u8; DEK_LEN]>, CryptoError> {
        let nonce = Nonce::try_assume_unique_for_key(&bytes[WRAP_NONCE_AT..WRAPPED_AT])
            .map_err(|_| CryptoError::Decrypt)?;
        let mut buf = Zeroizing::new([0u8; WRAPPED_LEN]);
        buf.copy_from_slice(&bytes[WRAPPED_AT..DATA_NONCE_AT]);
        let dek = key
            .aead
            .open_in_place(nonce, RingAad::from(wrap_aad(key.id, aad)), &mut buf[..])
            .map_err(|_| CryptoError::Decrypt)?;
        let mut out = Zeroizing::new([0u8; DEK_LEN]);
        out.copy_from_slice(dek);
        Ok(out)
    }
}

/// `"vaultgate/v1/dek" ‖ master key id ‖ aad`.
fn wrap_aad(id: MasterKeyId, aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(WRAP_LABEL.len() + ID_LEN + aad.len());
    out.extend_from_slice(WRAP_LABEL);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(aad);
    out
}

/// `"vaultgate/v1/data" ‖ aad`.
fn data_aad(aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DATA_LABEL.len() + aad.len());
    out.extend_from_slice(DATA_LABEL);
    out.extend_from_slice(aad);
    out
}

/// The bytes of a sealed value, if its length and version are acceptable.
fn checked_header(sealed: &Sealed) -> Result<&[u8], CryptoError> {
    let bytes = sealed.as_bytes();
    if bytes.len() < MIN_LEN || bytes[0] != VERSION {
        return Err(CryptoError::Decrypt);
    }
    Ok(bytes)
}

fn dek_key(dek: &[u8; DEK_LEN]) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&AES_256_GCM, dek)
        .map(LessSafeKey::new)
        .map_err(|_| CryptoError::Decrypt)
}

impl Encryptor for AesGcmEncryptor {
    fn seal(&self, plaintext: &ProviderSecret, aad: &Aad<'_>) -> Result<Sealed, CryptoError> {
        let aad = aad.to_bytes();
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        self.rng.fill(&mut dek[..]).map_err(|_| CryptoError::Seal)?;
        let mut data_nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut data_nonce)
            .map_err(|_| CryptoError::Seal)?;
        let (wrap_nonce, wrapped) = self.wrap(&self.current, &dek, &aad)?;

        let text = plaintext.expose_secret().as_bytes();
        // The plaintext is copied in and encrypted in place; the buffer is
        // zeroized if anything fails before it holds only ciphertext.
        let mut out = Zeroizing::new(Vec::with_capacity(MIN_LEN + text.len()));
        out.push(VERSION);
        out.extend_from_slice(self.current.id.as_bytes());
        out.extend_from_slice(&wrap_nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&data_nonce);
        out.extend_from_slice(text);
        let tag = dek_key(&dek)
            .map_err(|_| CryptoError::Seal)?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(data_nonce),
                RingAad::from(data_aad(&aad)),
                &mut out[CIPHERTEXT_AT..],
            )
            .map_err(|_| CryptoError::Seal)?;
        out.extend_from_slice(tag.as_ref());
        Ok(Sealed::from_bytes(std::mem::take(&mut *out)))
    }

    fn open(&self, sealed: &Sealed, aad: &Aad<'_>) -> Result<ProviderSecret, CryptoError> {
        let bytes = checked_header(sealed)?;
        let key = self
            .find(&bytes[ID_AT..WRAP_NONCE_AT])
            .ok_or(CryptoError::Decrypt)?;
        let aad = aad.to_bytes();
        let dek = Self::unwrap_dek(key, bytes, &aad)?;
        let nonce = Nonce::try_assume_unique_for_key(&bytes[DATA_NONCE_AT..CIPHERTEXT_AT])
            .map_err(|_| CryptoError::Decrypt)?;
        let mut buf = Zeroizing::new(bytes[CIPHERTEXT_AT..].to_vec());
        let len = dek_key(&dek)?
            .open_in_place(nonce, RingAad::from(data_aad(&aad)), &mut buf[..])
            .map_err(|_| CryptoError::Decrypt)?
            .len();
        buf.truncate(len);
        ProviderSecret::from_utf8(buf).ok_or(CryptoError::Decrypt)
    }

    fn rewrap(&self, sealed: &Sealed, aad: &Aad<'_>) -> Result<Sealed, CryptoError> {
        let bytes = checked_header(sealed)?;
        let id = &bytes[ID_AT..WRAP_NONCE_AT];
        if id == self.current.id.as_bytes() {
            return Ok(sealed.clone());
        }
        let key = self.find(id).ok_or(CryptoError::UnknownMasterKey)?;
        let aad = aad.to_bytes();
        let dek = Self::unwrap_dek(key, bytes, &aad)?;
        let (wrap_nonce, wrapped) = self.wrap(&self.current, &dek, &aad)?;
        let mut out = Vec::with_capacity(bytes.len());
        out.push(VERSION);
        out.extend_from_slice(self.current.id.as_bytes());
        out.extend_from_slice(&wrap_nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&bytes[DATA_NONCE_AT..]);
        Ok(Sealed::from_bytes(out))
    }

    fn current_key_id(&self) -> MasterKeyId {
        self.current.id
    }

    fn master_key_checks(&self) -> Vec<MasterKeyCheck> {
        self.loaded().map(|k| k.check).collect()
    }
}

impl fmt::Debug for AesGcmEncryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AesGcmEncryptor")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Provider;

    fn aad() -> Aad<'static> {
        Aad {
            record_id: "pk_a",
            project: "default",
            provider: Provider::OpenAi,
        }
    }

    fn secret() -> ProviderSecret {
        ProviderSecret::new("sk-proj-0123456789abcdef".to_owned())
    }

    #[test]
    fn layout_is_as_documented() {
        let key = MasterKey::generate().unwrap();
        let id = key.id();
        let enc = AesGcmEncryptor::new(key).unwrap();
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        let b = sealed.as_bytes();
        assert_eq!(b.len(), 1 + 8 + 12 + 48 + 12 + 24 + 16);
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..9], id.as_bytes());
        assert_eq!(sealed_key_id(&sealed), Some(id));
        assert_eq!(MIN_LEN, 97);
    }

    #[test]
    fn rewrap_moves_to_the_current_key_and_keeps_the_ciphertext() {
        let old = MasterKey::generate().unwrap();
        let old_b64 = old.to_base64();
        let old_enc = AesGcmEncryptor::new(old).unwrap();
        let sealed = old_enc.seal(&secret(), &aad()).unwrap();

        let new = MasterKey::generate().unwrap();
        let new_id = new.id();
        let both =
            AesGcmEncryptor::with_previous(new, vec![MasterKey::from_base64(&old_b64).unwrap()])
                .unwrap();
        let moved = both.rewrap(&sealed, &aad()).unwrap();
        assert_eq!(sealed_key_id(&moved), Some(new_id));
        assert_eq!(
            &moved.as_bytes()[DATA_NONCE_AT..],
            &sealed.as_bytes()[DATA_NONCE_AT..]
        );
        assert_eq!(
            both.open(&moved, &aad()).unwrap().expose_secret(),
            secret().expose_secret()
        );
        assert_eq!(both.rewrap(&moved, &aad()).unwrap(), moved);
        // Only the new key can open the re-wrapped value.
        assert_eq!(
            old_enc.open(&moved, &aad()).unwrap_err(),
            CryptoError::Decrypt
        );
        // An unloaded key is reported by rewrap, but open stays opaque.
        let stranger = AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap();
        assert_eq!(
            stranger.rewrap(&sealed, &aad()).unwrap_err(),
            CryptoError::UnknownMasterKey
        );
        assert_eq!(
            stranger.open(&sealed, &aad()).unwrap_err(),
            CryptoError::Decrypt
        );
        // A swapped row cannot be re-wrapped either.
        let other = Aad {
            record_id: "pk_b",
            ..aad()
        };
        assert_eq!(
            both.rewrap(&sealed, &other).unwrap_err(),
            CryptoError::Decrypt
        );
    }

    #[test]
    fn debug_shows_ids_only() {
        let key = MasterKey::generate().unwrap();
        let id = key.id();
        let enc = AesGcmEncryptor::new(key).unwrap();
        assert_eq!(
            format!("{enc:?}"),
            format!("AesGcmEncryptor {{ current: MasterKeyId({id}), previous: [] }}")
        );
    }
}
