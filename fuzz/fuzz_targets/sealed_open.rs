//! Opening a sealed provider key: arbitrary bytes, and a genuine sealed value
//! with fuzzer-chosen damage, must give `Err` (never a panic, never a wrong
//! plaintext); only the undamaged value opens.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vault_core::crypto::{Aad, AesGcmEncryptor, Encryptor, MasterKey, ProviderSecret, Sealed};
use vault_core::provider::Provider;

const PLAINTEXT: &str = "sk-fuzz-0123456789abcdef";

fn aad() -> Aad<'static> {
    Aad {
        record_id: "pk_fuzz",
        project: "default",
        provider: Provider::OpenAi,
    }
}

/// An encryptor rotating from key 1 to key 2, and a value sealed under key 1,
/// so that re-wrapping really unwraps the data key.
fn fixture() -> &'static (AesGcmEncryptor, Sealed) {
    static FIXTURE: OnceLock<(AesGcmEncryptor, Sealed)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key1 =
            || MasterKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let key2 = MasterKey::from_base64("ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap();
        let sealed = AesGcmEncryptor::new(key1())
            .unwrap()
            .seal(&ProviderSecret::new(PLAINTEXT.to_owned()), &aad())
            .unwrap();
        let enc = AesGcmEncryptor::with_previous(key2, vec![key1()]).unwrap();
        (enc, sealed)
    })
}

fuzz_target!(|data: &[u8]| {
    let (enc, genuine) = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let candidate = if mode & 1 == 0 {
        // Arbitrary bytes.
        rest.to_vec()
    } else {
        // The genuine value, XORed with the fuzzer's bytes from an offset,
        // then truncated or extended.
        let mut bytes = genuine.as_bytes().to_vec();
        let offset = usize::from(mode >> 1) % bytes.len();
        for (b, x) in bytes[offset..].iter_mut().zip(rest) {
            *b ^= x;
        }
        if rest.len() > bytes.len() - offset {
            bytes.extend_from_slice(&rest[bytes.len() - offset..]);
        }
        bytes
    };
    let sealed = Sealed::from_bytes(candidate);
    let genuine_again = &sealed == genuine;
    match enc.open(&sealed, &aad()) {
        Ok(secret) => {
            assert!(genuine_again, "a damaged value opened");
            assert_eq!(secret.expose_secret(), PLAINTEXT);
        }
        Err(_) => assert!(!genuine_again, "the genuine value failed to open"),
    }
    // Re-wrapping touches only the wrapped data key, so it may accept a
    // value whose ciphertext is damaged; it must never launder the damage.
    if let Ok(rewrapped) = enc.rewrap(&sealed, &aad()) {
        assert_eq!(enc.open(&rewrapped, &aad()).is_ok(), genuine_again);
    } else {
        assert!(!genuine_again, "the genuine value failed to re-wrap");
    }
});
