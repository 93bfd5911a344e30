//! One `Encryptor` conformance suite, run unchanged against every
//! implementation (docs/threat-model.md, D1–D3, C2), plus the AES-GCM
//! envelope's format checks and the master key's loading rules (C7, D4).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use vault_core::crypto::{
    Aad, AesGcmEncryptor, CryptoError, Encryptor, MasterKey, MasterKeyError, MasterKeyId,
    ProviderSecret, RotationError, Sealed,
};
use vault_core::key::ProviderKeyId;
use vault_core::provider::Provider;

/// Makes an encryptor with a fresh master key; two calls give two keys.
type Make = fn() -> Box<dyn Encryptor>;

const PLAINTEXT: &str = "sk-proj-CONFORMANCE-0123456789abcdefXYZ";

fn secret() -> ProviderSecret {
    ProviderSecret::new(PLAINTEXT.to_owned())
}

fn aad() -> Aad<'static> {
    Aad {
        record_id: "pk_conformance1",
        project: "default",
        provider: Provider::OpenAi,
    }
}

fn assert_decrypt_fails(enc: &dyn Encryptor, sealed: &Sealed, aad: &Aad<'_>, what: &str) {
    match enc.open(sealed, aad) {
        Err(CryptoError::Decrypt) => {}
        Err(other) => panic!("{what}: expected Decrypt, got {other:?}"),
        Ok(_) => panic!("{what}: opened"),
    }
}

/// The generic suite: every function takes a maker of encryptors.
mod suite {
    use super::*;

    pub(super) fn round_trip(make: Make) {
        let enc = make();
        let long = "k".repeat(4096);
        for text in [PLAINTEXT, "", "x", "sk-ą€𝄞-unicode", long.as_str()] {
            let sealed = enc
                .seal(&ProviderSecret::new(text.to_owned()), &aad())
                .unwrap();
            if text.len() >= 8 {
                let raw = sealed
                    .as_bytes()
                    .windows(text.len())
                    .any(|w| w == text.as_bytes());
                assert!(!raw, "plaintext visible in the sealed bytes");
            }
            let opened = enc.open(&sealed, &aad()).unwrap();
            assert_eq!(opened.expose_secret(), text);
            // Re-wrapping under the key that sealed it changes nothing.
            assert_eq!(enc.rewrap(&sealed, &aad()).unwrap(), sealed);
        }
    }

    pub(super) fn corruption_every_bit_flip(make: Make) {
        let enc = make();
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        let bytes = sealed.as_bytes();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.to_vec();
                b[i] ^= 1 << bit;
                assert_decrypt_fails(
                    &*enc,
                    &Sealed::from_bytes(b),
                    &aad(),
                    &format!("flip {i}.{bit}"),
                );
            }
        }
        // The original still opens: the flips were all on copies.
        assert_eq!(
            enc.open(&sealed, &aad()).unwrap().expose_secret(),
            PLAINTEXT
        );
    }

    pub(super) fn corruption_every_truncation(make: Make) {
        let enc = make();
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        let bytes = sealed.as_bytes();
        for len in 0..bytes.len() {
            let cut = Sealed::from_bytes(bytes[..len].to_vec());
            assert_decrypt_fails(&*enc, &cut, &aad(), &format!("truncated to {len}"));
            let tail = Sealed::from_bytes(bytes[len + 1..].to_vec());
            assert_decrypt_fails(&*enc, &tail, &aad(), &format!("first {} removed", len + 1));
        }
    }

    pub(super) fn corruption_appended_bytes(make: Make) {
        let enc = make();
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        for extra in [
            vec![0u8],
            vec![0u8; 16],
            vec![0xff; 17],
            (0..=255u8).collect(),
        ] {
            let mut b = sealed.as_bytes().to_vec();
            b.extend_from_slice(&extra);
            assert_decrypt_fails(&*enc, &Sealed::from_bytes(b), &aad(), "appended");
        }
        let doubled = [sealed.as_bytes(), sealed.as_bytes()].concat();
        assert_decrypt_fails(&*enc, &Sealed::from_bytes(doubled), &aad(), "doubled");
    }

    pub(super) fn corruption_empty_value(make: Make) {
        let enc = make();
        assert_decrypt_fails(&*enc, &Sealed::from_bytes(Vec::new()), &aad(), "empty");
        assert_decrypt_fails(&*enc, &Sealed::from_bytes(vec![0u8; 200]), &aad(), "zeros");
        assert!(enc.rewrap(&Sealed::from_bytes(Vec::new()), &aad()).is_err());
    }

    pub(super) fn corruption_row_swap(make: Make) {
        let enc = make();
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        let other_id = Aad {
            record_id: "pk_conformance2",
            ..aad()
        };
        let other_project = Aad {
            project: "other",
            ..aad()
        };
        let other_provider = Aad {
            provider: Provider::Anthropic,
            ..aad()
        };
        // Length-prefixed fields: moving bytes between fields is a different AAD.
        let shifted = Aad {
            record_id: "pk_conformance1d",
            project: "efault",
            ..aad()
        };
        for (what, a) in [
            ("other record id", other_id),
            ("other project", other_project),
            ("other provider", other_provider),
            ("shifted fields", shifted),
        ] {
            assert_decrypt_fails(&*enc, &sealed, &a, what);
        }
        // A real swap: row Y's ciphertext copied into row X.
        let y = Aad {
            record_id: "pk_conformance2",
            project: "p2",
            provider: Provider::Google,
        };
        let sealed_y = enc
            .seal(&ProviderSecret::new("AIza-other-secret-000".into()), &y)
            .unwrap();
        assert_decrypt_fails(&*enc, &sealed_y, &aad(), "row swap");
    }

    pub(super) fn wrong_master_key_fails(make: Make) {
        let enc = make();
        let other = make();
        assert_ne!(enc.current_key_id(), other.current_key_id());
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        assert_decrypt_fails(&*other, &sealed, &aad(), "other master key");
        assert!(other.rewrap(&sealed, &aad()).is_err());
    }

    pub(super) fn boundary_100k_sealed_values_are_distinct(make: Make) {
        let enc = make();
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            assert!(seen.insert(enc.seal(&secret(), &aad()).unwrap().as_bytes().to_vec()));
        }
    }
}

/// Instantiates the generic suite for one implementation.
macro_rules! conformance {
    ($name:ident, $make:expr, [$($case:ident),* $(,)?]) => {
        mod $name {
            use super::*;
            $(
                #[test]
                fn $case() {
                    suite::$case($make);
                }
            )*
        }
    };
}

fn make_aes_gcm() -> Box<dyn Encryptor> {
    Box::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap())
}

conformance!(
    aes_gcm,
    make_aes_gcm,
    [
        round_trip,
        corruption_every_bit_flip,
        corruption_every_truncation,
        corruption_appended_bytes,
        corruption_empty_value,
        corruption_row_swap,
        wrong_master_key_fails,
        boundary_100k_sealed_values_are_distinct,
    ]
);

/// The AES-GCM envelope's own format (see `crypto/aes_gcm.rs`):
/// version (1) | key id (8) | wrap nonce (12) | wrapped DEK (48) | data nonce (12) | ct.
mod aes_gcm_format {
    use super::*;

    const KEY_ID: std::ops::Range<usize> = 1..9;
    const WRAP_NONCE: std::ops::Range<usize> = 9..21;
    const WRAPPED: std::ops::Range<usize> = 21..69;
    const DATA_NONCE: std::ops::Range<usize> = 69..81;
    const CIPHERTEXT: std::ops::RangeFrom<usize> = 81..;

    fn enc() -> AesGcmEncryptor {
        AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap()
    }

    fn with(sealed: &Sealed, edit: impl FnOnce(&mut Vec<u8>)) -> Sealed {
        let mut b = sealed.as_bytes().to_vec();
        edit(&mut b);
        Sealed::from_bytes(b)
    }

    #[test]
    fn corruption_changed_version_key_id_and_nonces() {
        let enc = enc();
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        for v in [0u8, 2, 0x80, 0xff] {
            assert_decrypt_fails(&enc, &with(&sealed, |b| b[0] = v), &aad(), "version");
        }
        let other_id = MasterKey::generate().unwrap().id();
        let cases: Vec<(&str, Sealed)> = vec![
            (
                "key id of another key",
                with(&sealed, |b| b[KEY_ID].copy_from_slice(other_id.as_bytes())),
            ),
            ("key id zeroed", with(&sealed, |b| b[KEY_ID].fill(0))),
            (
                "wrap nonce zeroed",
                with(&sealed, |b| b[WRAP_NONCE].fill(0)),
            ),
            (
                "wrap nonce of data",
                with(&sealed, |b| {
                    let d = b[DATA_NONCE].to_vec();
                    b[WRAP_NONCE].copy_from_slice(&d);
                }),
            ),
            (
                "data nonce zeroed",
                with(&sealed, |b| b[DATA_NONCE].fill(0)),
            ),
            (
                "nonces swapped",
                with(&sealed, |b| {
                    let w = b[WRAP_NONCE].to_vec();
                    let d = b[DATA_NONCE].to_vec();
                    b[WRAP_NONCE].copy_from_slice(&d);
                    b[DATA_NONCE].copy_from_slice(&w);
                }),
            ),
        ];
        for (what, bad) in &cases {
            assert_decrypt_fails(&enc, bad, &aad(), what);
        }
    }

    #[test]
    fn corruption_wrapped_dek_from_another_record() {
        let enc = enc();
        let a = enc.seal(&secret(), &aad()).unwrap();
        let b = enc.seal(&secret(), &aad()).unwrap();
        // Same key, same row, same plaintext: still, parts do not mix.
        let mixed = with(&a, |x| {
            x[WRAP_NONCE.start..WRAPPED.end]
                .copy_from_slice(&b.as_bytes()[WRAP_NONCE.start..WRAPPED.end])
        });
        assert_decrypt_fails(&enc, &mixed, &aad(), "wrapped DEK of another seal");
    }

    type Fields = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

    fn fields(s: &Sealed) -> Fields {
        let b = s.as_bytes();
        (
            b[WRAP_NONCE].to_vec(),
            b[WRAPPED].to_vec(),
            b[DATA_NONCE].to_vec(),
            b[CIPHERTEXT].to_vec(),
        )
    }

    fn assert_all_distinct(all: Vec<Fields>) {
        let n = all.len();
        let mut nonces = HashSet::with_capacity(2 * n);
        let mut wrapped = HashSet::with_capacity(n);
        let mut ciphertexts = HashSet::with_capacity(n);
        for (wn, w, dn, c) in all {
            assert!(nonces.insert(wn), "repeated wrap nonce");
            assert!(nonces.insert(dn), "repeated data nonce");
            assert!(wrapped.insert(w), "repeated wrapped DEK");
            assert!(ciphertexts.insert(c), "repeated ciphertext");
        }
        assert_eq!(
            (nonces.len(), wrapped.len(), ciphertexts.len()),
            (2 * n, n, n)
        );
    }

    #[test]
    fn boundary_100k_seals_are_distinct() {
        let enc = enc();
        let all: Vec<Fields> = (0..100_000)
            .map(|_| fields(&enc.seal(&secret(), &aad()).unwrap()))
            .collect();
        assert_all_distinct(all);
    }

    #[test]
    fn concurrency_100k_seals_from_16_threads_are_distinct() {
        let enc = enc();
        let all: Vec<Fields> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        (0..6_250)
                            .map(|_| fields(&enc.seal(&secret(), &aad()).unwrap()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(all.len(), 100_000);
        assert_all_distinct(all);
    }

    #[test]
    fn previous_keys_open_but_never_seal() {
        let old = MasterKey::generate().unwrap();
        let old_b64 = old.to_base64();
        let old_enc = AesGcmEncryptor::new(old).unwrap();
        let sealed_old = old_enc.seal(&secret(), &aad()).unwrap();
        let new = MasterKey::generate().unwrap();
        let new_id = new.id();
        let both =
            AesGcmEncryptor::with_previous(new, vec![MasterKey::from_base64(&old_b64).unwrap()])
                .unwrap();
        assert_eq!(both.current_key_id(), new_id);
        assert_eq!(
            both.open(&sealed_old, &aad()).unwrap().expose_secret(),
            PLAINTEXT
        );
        let sealed_new = both.seal(&secret(), &aad()).unwrap();
        assert_eq!(&sealed_new.as_bytes()[KEY_ID], new_id.as_bytes());
        assert_decrypt_fails(&old_enc, &sealed_new, &aad(), "old key opens new seal");
        assert_eq!(both.loaded_key_ids().len(), 2);
    }
}

/// Debug, Display and errors never show key material (docs/threat-model.md,
/// C2).
mod leaks {
    use super::*;

    /// Every representation of `secret` we look for: raw, hex (both cases)
    /// and base64 (standard and url-safe, padded or not, at offsets 0/1/2),
    /// whole and in 8-byte windows.
    fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for w in secret.windows(8.min(secret.len())) {
            out.push(w.to_vec());
            out.push(hex::encode(w).into_bytes());
            out.push(hex::encode_upper(w).into_bytes());
        }
        for off in 0..3.min(secret.len()) {
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                let enc = engine.encode(&secret[off..]);
                // Drop the last characters, which depend on what follows.
                let keep = enc.trim_end_matches('=').len().saturating_sub(3);
                out.push(enc.as_bytes()[..keep].to_vec());
            }
        }
        out
    }

    fn assert_clean(text: &str, secret: &[u8], what: &str) {
        for form in forms(secret) {
            assert!(
                !text
                    .as_bytes()
                    .windows(form.len())
                    .any(|w| w == form.as_slice()),
                "{what} leaks key material: {text}"
            );
        }
    }

    fn key_bytes(key: &MasterKey) -> Vec<u8> {
        STANDARD.decode(key.to_base64().as_bytes()).unwrap()
    }

    #[test]
    fn leak_debug_and_errors() {
        let old = MasterKey::generate().unwrap();
        let key = MasterKey::generate().unwrap();
        let old_bytes = key_bytes(&old);
        let bytes = key_bytes(&key);
        let b64 = key.to_base64().to_string();
        let id = key.id();
        let mut texts: Vec<(String, String)> = vec![
            ("MasterKey".into(), format!("{key:?} {:?}", key.id())),
            ("MasterKeyId".into(), format!("{id} {id:?}")),
            (
                "MasterKeyCheck".into(),
                format!("{:?}", vault_core::crypto::MasterKeyCheck::of(&key)),
            ),
        ];
        let enc = AesGcmEncryptor::with_previous(key, vec![old]).unwrap();
        texts.push(("AesGcmEncryptor".into(), format!("{enc:?} {enc:#?}")));
        let sealed = enc.seal(&secret(), &aad()).unwrap();
        texts.push(("Sealed".into(), format!("{sealed:?}")));
        texts.push((
            "ProviderSecret".into(),
            format!("{:?}", enc.open(&sealed, &aad()).unwrap()),
        ));

        for e in [
            CryptoError::Decrypt,
            CryptoError::Seal,
            CryptoError::UnknownMasterKey,
        ] {
            texts.push((format!("{e:?}"), format!("{e} {e:?}")));
        }
        // Real errors from inputs that are (nearly) the key itself.
        let almost = &b64[..b64.len() - 5];
        let too_long = STANDARD.encode([bytes.as_slice(), b"x"].concat());
        let dir = tempfile::tempdir().unwrap();
        let mut master_errors = vec![
            MasterKey::from_base64(almost).unwrap_err(),
            MasterKey::from_base64(&format!("{b64}!")).unwrap_err(),
            MasterKey::from_base64(&too_long).unwrap_err(),
            vault_core::crypto::load_or_create_master_key(dir.path(), Some(almost)).unwrap_err(),
            vault_core::crypto::load_or_create_master_key(dir.path(), Some(&too_long)).unwrap_err(),
            MasterKeyError::InsecureFile {
                path: dir.path().join("master.key"),
                mode: 0o644,
            },
            MasterKeyError::Io {
                path: dir.path().into(),
                source: std::io::Error::other("denied"),
            },
            MasterKeyError::Rng,
            MasterKeyError::NotLoaded {
                record: ProviderKeyId::parse("pk_x").unwrap(),
                key_id: id,
            },
            MasterKeyError::WrongMasterKey,
            MasterKeyError::DamagedCheck,
            MasterKeyError::Store(vault_core::store::StoreError::NotFound),
        ];
        for e in master_errors.drain(..) {
            texts.push((format!("{e:?}"), format!("{e} {e:?}")));
        }
        let record = ProviderKeyId::parse("pk_x").unwrap();
        for e in [
            RotationError::UnknownMasterKey {
                record: record.clone(),
                key_id: id,
            },
            RotationError::Damaged {
                record: record.clone(),
            },
            RotationError::Contended {
                record: record.clone(),
            },
            RotationError::Crypto { record },
            RotationError::Store(vault_core::store::StoreError::Conflict),
        ] {
            texts.push((format!("{e:?}"), format!("{e} {e:?}")));
        }

        let middle = &PLAINTEXT.as_bytes()[3..PLAINTEXT.len() - 4];
        for (what, text) in &texts {
            assert_clean(text, &bytes, what);
            assert_clean(text, &old_bytes, what);
            assert_clean(text, middle, what);
            assert!(!text.contains(almost), "{what} echoes its input");
        }
        // The id shown is not derived from the key by any simple encoding.
        assert_ne!(id.as_bytes(), &bytes[..8]);
        let _: MasterKeyId = id;
    }

    static_assertions::assert_not_impl_any!(ProviderSecret: Clone, serde::Serialize, PartialEq);
    static_assertions::assert_not_impl_any!(MasterKey: Clone, serde::Serialize, PartialEq);
    static_assertions::assert_not_impl_any!(
        vault_core::key::VirtualKey: Clone,
        serde::Serialize,
        PartialEq
    );
}

/// Where the master key comes from, and what is refused (docs/threat-model.md,
/// C7, D4).
mod master_key_file {
    use std::os::unix::fs::PermissionsExt;

    use vault_core::crypto::{MasterKeySource, load_or_create_master_key};

    use super::*;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn lifecycle_created_0600_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("fresh");
        let (key, source) = load_or_create_master_key(&data, None).unwrap();
        let path = data.join("master.key");
        assert_eq!(source, MasterKeySource::Created(path.clone()));
        assert_eq!(mode(&path), 0o600);
        // Only the key file is left behind (no temporary names).
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
        let (again, source) = load_or_create_master_key(&data, None).unwrap();
        assert_eq!(source, MasterKeySource::File(path));
        assert_eq!(again.id(), key.id());
    }

    #[test]
    fn concurrency_racing_creators_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<MasterKeyId> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create_master_key(dir.path(), None).unwrap().0.id()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|i| *i == ids[0]));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn env_value_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = MasterKey::generate().unwrap();
        let (loaded, source) =
            load_or_create_master_key(dir.path(), Some(&key.to_base64())).unwrap();
        assert_eq!((loaded.id(), source), (key.id(), MasterKeySource::Env));
        assert!(!dir.path().join("master.key").exists());
    }

    #[test]
    fn boundary_group_or_world_accessible_file_is_refused() {
        for bad in [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o700] {
            let dir = tempfile::tempdir().unwrap();
            load_or_create_master_key(dir.path(), None).unwrap();
            let path = dir.path().join("master.key");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
            let result = load_or_create_master_key(dir.path(), None);
            if bad & 0o077 == 0 {
                assert!(result.is_ok(), "{bad:o} refused");
                continue;
            }
            let e = result.unwrap_err();
            assert!(matches!(e, MasterKeyError::InsecureFile { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
        }
    }

    #[test]
    fn boundary_bad_env_values_are_refused_without_echo() {
        let dir = tempfile::tempdir().unwrap();
        let long = STANDARD.encode([9u8; 33]);
        let short = STANDARD.encode([9u8; 16]);
        for (value, expect) in [
            ("c2VjcmV0LXZhbHVl!!!", "not valid base64"),
            ("sk-live-SEEKRIT", "not valid base64"),
            (long.as_str(), "must decode to 32 bytes, got 33"),
            (short.as_str(), "must decode to 32 bytes, got 16"),
            ("", "must decode to 32 bytes, got 0"),
        ] {
            let e = load_or_create_master_key(dir.path(), Some(value)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(expect), "{msg}");
            assert!(msg.contains("VAULTGATE_MASTER_KEY"), "{msg}");
            assert!(value.len() < 4 || !msg.contains(value), "{msg}");
        }
        // No file is created when the env value is refused.
        assert!(!dir.path().join("master.key").exists());
    }

    #[test]
    fn corruption_bad_key_file_names_the_file_not_the_content() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let content = STANDARD.encode([5u8; 31]);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(content.as_bytes()).unwrap();
        let msg = load_or_create_master_key(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("got 31"), "{msg}");
        assert!(!msg.contains(&content), "{msg}");
    }
}
