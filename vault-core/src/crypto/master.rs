//! The master key: the one secret that lives outside the database and wraps
//! every data key.
//!
//! It comes from `VAULTGATE_MASTER_KEY` (standard base64 of 32 bytes) or from
//! the file `master.key` in the data directory, which is created with mode
//! `0600` on first start and refused when group or others may read or write
//! it. A [`MasterKeyId`] (derived from the key, not secret) names the key in
//! every sealed value, and a [`MasterKeyCheck`] lets start-up detect a wrong
//! key even when no provider key is stored yet.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::key::ProviderKeyId;
use crate::store::StoreError;

/// The environment variable a master key is read from.
pub const MASTER_KEY_ENV: &str = "VAULTGATE_MASTER_KEY";

/// The file name of the master key inside the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";

/// Domain label hashed with the key to derive its id.
const ID_LABEL: &[u8] = b"vaultgate master key id v1";

/// The fixed message whose HMAC under the master key is the check value.
const CHECK_LABEL: &[u8] = b"vaultgate master key check v1";

/// Why a master key could not be loaded, created or verified. Messages name
/// files, modes, key ids and record ids, never key material or the text a
/// key was parsed from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterKeyError {
    /// The text is not standard base64.
    #[error("the master key is not valid base64")]
    InvalidBase64,
    /// The text decodes to a number of bytes other than 32.
    #[error("the master key must decode to 32 bytes, got {got}")]
    WrongLength {
        /// How many bytes it decoded to.
        got: usize,
    },
    /// A key read from a named place (a file or the environment) is unusable.
    #[error("{origin}: {problem}")]
    Unusable {
        /// Where the key came from, e.g. `VAULTGATE_MASTER_KEY` or a path.
        origin: String,
        /// What is wrong with it ([`Self::InvalidBase64`] or [`Self::WrongLength`]).
        problem: Box<MasterKeyError>,
    },
    /// The key file may be read or written by group or others.
    #[error(
        "master key file {} has mode {mode:04o}; it must not be accessible to group or others (run: chmod 600 {})",
        path.display(),
        path.display()
    )]
    InsecureFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or creating the key file (or its directory) failed.
    #[error("master key file {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Rng,
    /// A stored provider key is wrapped by a master key that is not loaded.
    #[error(
        "provider key {record} is encrypted with master key id {key_id}, which is not loaded; set {MASTER_KEY_ENV} to the key it was created with"
    )]
    NotLoaded {
        /// The provider-key record.
        record: ProviderKeyId,
        /// The id of the master key it needs (public; derived from the key).
        key_id: MasterKeyId,
    },
    /// The stored check value matches none of the loaded master keys.
    #[error(
        "the master key does not match the one this data directory was created with; set {MASTER_KEY_ENV} to that key"
    )]
    WrongMasterKey,
    /// The stored check value is not well-formed hex.
    #[error("the stored master key check value is damaged")]
    DamagedCheck,
    /// The store failed while verifying.
    #[error("store error while verifying the master key: {0}")]
    Store(#[from] StoreError),
}

/// The public id of a master key: the first 8 bytes of
/// SHA-256(`"vaultgate master key id v1"` ‖ key), shown as 16 hex digits.
/// Written in clear into every sealed value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MasterKeyId([u8; 8]);

impl MasterKeyId {
    /// Wraps raw id bytes (as read from a sealed value).
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        MasterKeyId(bytes)
    }

    /// The raw id bytes.
    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn derive(key: &[u8; 32]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(ID_LABEL);
        ctx.update(key);
        let digest = ctx.finish();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_ref()[..8]);
        MasterKeyId(id)
    }
}

impl fmt::Display for MasterKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MasterKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKeyId({})", self.to_hex())
    }
}

/// A 256-bit master key: zeroized on drop, not `Clone`, `Serialize` or
/// `PartialEq`; `Debug` shows only its id.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
    id: MasterKeyId,
}

impl MasterKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, MasterKeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| MasterKeyError::Rng)?;
        Ok(Self::from_bytes(bytes))
    }

    /// Parses standard base64 (with padding) that decodes to exactly 32
    /// bytes. Surrounding whitespace (a trailing newline) is ignored. Errors
    /// never contain the input.
    pub fn from_base64(text: &str) -> Result<Self, MasterKeyError> {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| MasterKeyError::InvalidBase64)?,
        );
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| MasterKeyError::WrongLength { got: decoded.len() })?;
        Ok(Self::from_bytes(Zeroizing::new(bytes)))
    }

    /// Reads `VAULTGATE_MASTER_KEY`: `Ok(None)` when it is unset, an error
    /// naming the variable when it is set but unusable.
    pub fn from_env() -> Result<Option<Self>, MasterKeyError> {
        let Some(value) = std::env::var_os(MASTER_KEY_ENV) else {
            return Ok(None);
        };
        let origin = || MASTER_KEY_ENV.to_owned();
        let text = Zeroizing::new(value.into_string().map_err(|_| MasterKeyError::Unusable {
            origin: origin(),
            problem: Box::new(MasterKeyError::InvalidBase64),
        })?);
        Self::from_base64(&text)
            .map(Some)
            .map_err(|e| MasterKeyError::Unusable {
                origin: origin(),
                problem: Box::new(e),
            })
    }

    /// The key's public id.
    pub fn id(&self) -> MasterKeyId {
        self.id
    }

    /// The key as standard base64, for writing it to its file or showing it
    /// to its operator once. Zeroized on drop.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(&self.bytes[..]))
    }

    /// The key bytes, for the encryptor in this module tree only.
    pub(super) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        let id = MasterKeyId::derive(&bytes);
        MasterKey { bytes, id }
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

/// A master key's check value: HMAC-SHA256 under the key of a fixed label.
/// Stored in store meta (`master_key_check`) so that start-up detects a wrong
/// master key even with no provider key stored. Not secret, but compared
/// only in constant time ([`MasterKeyCheck::matches_hex`]).
#[derive(Clone, Copy)]
pub struct MasterKeyCheck {
    id: MasterKeyId,
    value: [u8; 32],
}

impl MasterKeyCheck {
    /// The check value of `key`.
    pub fn of(key: &MasterKey) -> Self {
        let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.bytes());
        let tag = ring::hmac::sign(&hmac_key, CHECK_LABEL);
        let mut value = [0u8; 32];
        value.copy_from_slice(tag.as_ref());
        MasterKeyCheck {
            id: key.id(),
            value,
        }
    }

    /// The id of the key this check value belongs to.
    pub fn key_id(&self) -> MasterKeyId {
        self.id
    }

    /// Lowercase hex, as stored.
    pub fn to_hex(&self) -> String {
        hex::encode(self.value)
    }

    /// Whether a stored hex check value is this one, compared with
    /// [`subtle::ConstantTimeEq`]. `None` when `stored` is not 32 bytes of hex.
    pub fn matches_hex(&self, stored: &str) -> Option<bool> {
        let mut decoded = [0u8; 32];
        hex::decode_to_slice(stored.trim(), &mut decoded).ok()?;
        Some(bool::from(self.value.ct_eq(&decoded)))
    }
}

impl fmt::Debug for MasterKeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKeyCheck({})", self.id)
    }
}

/// Where the master key in use came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MasterKeySource {
    /// The `VAULTGATE_MASTER_KEY` environment variable.
    Env,
    /// An existing key file.
    File(PathBuf),
    /// A key file created just now (a fresh data directory).
    Created(PathBuf),
}

/// Loads the master key, or creates one on a fresh data directory.
///
/// - `env_value` (the value of `VAULTGATE_MASTER_KEY`, if set) wins.
/// - Otherwise `data_dir/master.key` (base64 text) is read; a file that group
///   or others may read or write (`mode & 0o077 != 0`) is refused.
/// - Otherwise a fresh key is written there with mode `0600`: written and
///   synced under a temporary name, then linked into place, which fails if
///   another process got there first (whose key is then used), so a crash
///   never leaves a half-written key file and a race never loses a key.
pub fn load_or_create_master_key(
    data_dir: &Path,
    env_value: Option<&str>,
) -> Result<(MasterKey, MasterKeySource), MasterKeyError> {
    if let Some(text) = env_value {
        let key = MasterKey::from_base64(text).map_err(|e| MasterKeyError::Unusable {
            origin: MASTER_KEY_ENV.to_owned(),
            problem: Box::new(e),
        })?;
        return Ok((key, MasterKeySource::Env));
    }
    let path = data_dir.join(MASTER_KEY_FILE);
    match read_key_file(&path) {
        Ok(key) => Ok((key, MasterKeySource::File(path))),
        Err(MasterKeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            create_key_file(data_dir, &path)
        }
        Err(e) => Err(e),
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MasterKeyError + '_ {
    move |source| MasterKeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a key file, checking its mode on the open handle (no race between
/// the check and the read).
fn read_key_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let meta = file.metadata().map_err(io_error(path))?;
    if !meta.is_file() {
        return Err(io_error(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(MasterKeyError::InsecureFile {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|_| MasterKeyError::Unusable {
            origin: path.display().to_string(),
            problem: Box::new(MasterKeyError::InvalidBase64),
        })?;
    MasterKey::from_base64(&text).map_err(|e| MasterKeyError::Unusable {
        origin: path.display().to_string(),
        problem: Box::new(e),
    })
}

fn create_key_file(
    data_dir: &Path,
    path: &Path,
) -> Result<(MasterKey, MasterKeySource), MasterKeyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io_error(data_dir))?;
    let key = MasterKey::generate()?;
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| MasterKeyError::Rng)?;
    let tmp = data_dir.join(format!(".{MASTER_KEY_FILE}.{}.tmp", hex::encode(suffix)));
    let written = write_synced(&tmp, &key);
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    // The temporary name goes either way; the key lives on under `path`.
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(data_dir)?;
            Ok((key, MasterKeySource::Created(path.to_owned())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another process created the key first: use theirs.
            read_key_file(path).map(|k| (k, MasterKeySource::File(path.to_owned())))
        }
        Err(e) => Err(io_error(path)(e)),
    }
}

fn write_synced(path: &Path, key: &MasterKey) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut text = key.to_base64();
    text.push('\n');
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> Result<(), MasterKeyError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = MasterKey::generate().unwrap();
        let b = MasterKey::generate().unwrap();
        assert_ne!(a.id(), b.id());
        let a2 = MasterKey::from_base64(&a.to_base64()).unwrap();
        assert_eq!(a.id(), a2.id());
        assert_eq!(a.id().to_hex().len(), 16);
    }

    #[test]
    fn id_is_the_documented_derivation() {
        let key = MasterKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        let mut input = ID_LABEL.to_vec();
        input.extend_from_slice(&[7u8; 32]);
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        assert_eq!(key.id().as_bytes(), &digest.as_ref()[..8]);
    }

    #[test]
    fn base64_errors_do_not_echo_input() {
        let e = MasterKey::from_base64("not base64 !!secret-ish").unwrap_err();
        assert_eq!(e.to_string(), "the master key is not valid base64");
        let e = MasterKey::from_base64(&STANDARD.encode([1u8; 31])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the master key must decode to 32 bytes, got 31"
        );
        assert!(MasterKey::from_base64(&format!("{}\n", STANDARD.encode([1u8; 32]))).is_ok());
    }

    #[test]
    fn check_values_match_only_their_key() {
        let a = MasterKey::generate().unwrap();
        let b = MasterKey::generate().unwrap();
        let ca = MasterKeyCheck::of(&a);
        assert_eq!(ca.matches_hex(&ca.to_hex()), Some(true));
        assert_eq!(
            ca.matches_hex(&MasterKeyCheck::of(&b).to_hex()),
            Some(false)
        );
        assert_eq!(ca.matches_hex("zz"), None);
        assert_eq!(ca.matches_hex(&ca.to_hex()[..62]), None);
    }

    /// docs/threat-model.md, B2: the check value is compared with
    /// `subtle::ConstantTimeEq`, never with `==` or ring's deprecated slice
    /// comparison.
    #[test]
    fn check_value_compare_is_constant_time() {
        let src = include_str!("master.rs");
        let start = src.find("pub fn matches_hex").unwrap();
        let end = start + src[start..].find("\n    }\n").unwrap();
        let body = &src[start..end];
        assert!(body.contains(".ct_eq("));
        assert!(!body.contains("=="));
        let forbidden = ["verify_slices", "_are_equal"].concat();
        assert!(!src.contains(&forbidden));
    }
}
