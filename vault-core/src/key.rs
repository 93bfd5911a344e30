//! Virtual keys: the format, generation from the OS CSPRNG, strict parsing,
//! and the public parts (`KeyHash`, `KeyPrefix`, `KeyId`) derived from a key.
//!
//! A [`VirtualKey`] is a secret: it is zeroized on drop, is not `Clone`,
//! `Serialize` or `PartialEq`, and its `Debug` shows only the prefix. The
//! secret→public step is [`VirtualKey::hash`] (SHA-256 of the whole key).

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Errors from parsing or generating a virtual key. Messages never contain
/// the key itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// The input was empty.
    #[error("the key is empty")]
    Empty,
    /// The input does not start with a prefix of this format.
    #[error("the key does not start with a known prefix")]
    WrongPrefix,
    /// The body after the prefix has the wrong length.
    #[error("the key has the wrong length")]
    WrongLength,
    /// The body contains a character outside the format's alphabet.
    #[error("the key contains a character outside its alphabet")]
    BadCharacter,
    /// A `KeyFormat` was built with invalid parameters.
    #[error("invalid key format: {0}")]
    InvalidFormat(&'static str),
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Rng,
}

/// Whether a key reaches real providers (`live`) or the mock provider (`test`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyEnv {
    /// Reaches the real provider.
    Live,
    /// Answered by the built-in mock provider unless configured otherwise.
    Test,
}

impl KeyEnv {
    /// The lowercase name, `live` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyEnv::Live => "live",
            KeyEnv::Test => "test",
        }
    }
}

/// The characters a key body is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Alphabet {
    /// `0-9A-Za-z`.
    Base62,
    /// `0-9a-f`.
    LowerHex,
}

impl Alphabet {
    fn chars(self) -> &'static [u8] {
        match self {
            Alphabet::Base62 => b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
            Alphabet::LowerHex => b"0123456789abcdef",
        }
    }

    fn contains(self, b: u8) -> bool {
        match self {
            Alphabet::Base62 => b.is_ascii_alphanumeric(),
            Alphabet::LowerHex => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        }
    }
}

/// How virtual keys look: a prefix per environment, an alphabet and a body
/// length. The default is `vpx_live_`/`vpx_test_` + 24 base62 characters
/// (about 143 bits).
///
/// ```
/// use vault_core::key::{Alphabet, KeyEnv, KeyFormat};
/// let format = KeyFormat::default();
/// let key = format.generate(KeyEnv::Test).unwrap();
/// assert!(format.parse(key.expose_secret()).is_ok());
///
/// // `vc_` + 32 lowercase hex is expressible too.
/// let vc = KeyFormat::new("vc_", None, Alphabet::LowerHex, 32).unwrap();
/// assert!(vc.parse("vc_0123456789abcdef0123456789abcdef").is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    live_prefix: String,
    test_prefix: Option<String>,
    alphabet: Alphabet,
    body_len: usize,
}

impl Default for KeyFormat {
    fn default() -> Self {
        KeyFormat {
            live_prefix: "vpx_live_".to_owned(),
            test_prefix: Some("vpx_test_".to_owned()),
            alphabet: Alphabet::Base62,
            body_len: 24,
        }
    }
}

/// Characters after the environment prefix that are shown as the key's prefix.
const SHOWN_BODY_CHARS: usize = 4;

impl KeyFormat {
    /// A custom format. Prefixes must be non-empty printable ASCII, neither may
    /// be a prefix of the other, and the body must carry at least 128 bits.
    pub fn new(
        live_prefix: &str,
        test_prefix: Option<&str>,
        alphabet: Alphabet,
        body_len: usize,
    ) -> Result<Self, KeyFormatError> {
        let ok_prefix = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic());
        if !ok_prefix(live_prefix) || !test_prefix.is_none_or(ok_prefix) {
            return Err(KeyFormatError::InvalidFormat(
                "prefixes must be non-empty printable ASCII",
            ));
        }
        if let Some(t) = test_prefix
            && (t.starts_with(live_prefix) || live_prefix.starts_with(t))
        {
            return Err(KeyFormatError::InvalidFormat(
                "one prefix must not start with the other",
            ));
        }
        let bits_per_char = match alphabet {
            Alphabet::Base62 => 5.95,
            Alphabet::LowerHex => 4.0,
        };
        if (body_len as f64) * bits_per_char < 128.0 || body_len > 256 {
            return Err(KeyFormatError::InvalidFormat(
                "the body must carry at least 128 bits and be at most 256 characters",
            ));
        }
        Ok(KeyFormat {
            live_prefix: live_prefix.to_owned(),
            test_prefix: test_prefix.map(str::to_owned),
            alphabet,
            body_len,
        })
    }

    /// The longest a valid key of this format can be, in bytes.
    pub fn max_len(&self) -> usize {
        let p = self.test_prefix.as_ref().map_or(0, String::len);
        self.live_prefix.len().max(p) + self.body_len
    }

    /// Generates a fresh key from the operating system's CSPRNG.
    pub fn generate(&self, env: KeyEnv) -> Result<VirtualKey, KeyFormatError> {
        self.generate_with(env, &SystemRandom::new())
    }

    /// Generates a fresh key from the given random source.
    pub fn generate_with(
        &self,
        env: KeyEnv,
        rng: &dyn SecureRandom,
    ) -> Result<VirtualKey, KeyFormatError> {
        let prefix = match (env, &self.test_prefix) {
            (KeyEnv::Live, _) => &self.live_prefix,
            (KeyEnv::Test, Some(t)) => t,
            (KeyEnv::Test, None) => {
                return Err(KeyFormatError::InvalidFormat(
                    "this format has no test prefix",
                ));
            }
        };
        let mut out = zeroize::Zeroizing::new(String::with_capacity(prefix.len() + self.body_len));
        out.push_str(prefix);
        random_chars(self.alphabet, self.body_len, rng, &mut out)?;
        Ok(VirtualKey {
            secret: SecretString::from(out.as_str()),
            env,
            prefix_len: prefix.len(),
        })
    }

    /// Parses a presented key strictly: exact prefix, exact length, only
    /// alphabet characters. Nothing is trimmed; no store is consulted.
    pub fn parse(&self, input: &str) -> Result<VirtualKey, KeyFormatError> {
        if input.is_empty() {
            return Err(KeyFormatError::Empty);
        }
        let (env, prefix) = if let Some(t) = self
            .test_prefix
            .as_deref()
            .filter(|t| input.starts_with(*t))
        {
            (KeyEnv::Test, t)
        } else if input.starts_with(self.live_prefix.as_str()) {
            (KeyEnv::Live, self.live_prefix.as_str())
        } else {
            return Err(KeyFormatError::WrongPrefix);
        };
        let body = &input.as_bytes()[prefix.len()..];
        if body.len() != self.body_len {
            return Err(KeyFormatError::WrongLength);
        }
        if !body.iter().all(|&b| self.alphabet.contains(b)) {
            return Err(KeyFormatError::BadCharacter);
        }
        Ok(VirtualKey {
            secret: SecretString::from(input),
            env,
            prefix_len: prefix.len(),
        })
    }
}

/// Appends `n` uniformly random characters of `alphabet` to `out`, by
/// rejection sampling (no modulo bias).
fn random_chars(
    alphabet: Alphabet,
    n: usize,
    rng: &dyn SecureRandom,
    out: &mut String,
) -> Result<(), KeyFormatError> {
    let chars = alphabet.chars();
    // Largest multiple of the alphabet size that fits in a byte.
    let limit = (256 / chars.len() * chars.len()) as u8;
    let mut buf = zeroize::Zeroizing::new([0u8; 64]);
    let mut produced = 0;
    while produced < n {
        rng.fill(&mut buf[..]).map_err(|_| KeyFormatError::Rng)?;
        for &b in buf.iter() {
            if produced == n {
                break;
            }
            if limit == 0 || b < limit {
                out.push(chars[b as usize % chars.len()] as char);
                produced += 1;
            }
        }
    }
    Ok(())
}

/// A virtual key in full: a secret. Only its hash is ever stored.
pub struct VirtualKey {
    secret: SecretString,
    env: KeyEnv,
    prefix_len: usize,
}

impl VirtualKey {
    /// The environment the key belongs to.
    pub fn env(&self) -> KeyEnv {
        self.env
    }

    /// The SHA-256 of the whole key: the only form that is stored and the
    /// cache key.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.secret.expose_secret())
    }

    /// The public prefix: the environment prefix plus four body characters.
    pub fn prefix(&self) -> KeyPrefix {
        let s = self.secret.expose_secret();
        KeyPrefix(s[..self.prefix_len + SHOWN_BODY_CHARS.min(s.len() - self.prefix_len)].to_owned())
    }

    /// The full key, for showing it once to its owner at creation.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for VirtualKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtualKey({}…)", self.prefix().as_str())
    }
}

/// SHA-256 of a whole virtual key. Not a secret, but never shown to clients;
/// its `Debug` shows only the first 8 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a presented key string.
    pub fn of(key: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        KeyHash(out)
    }

    /// Wraps raw digest bytes (as read from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyHash(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, for stores.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses lowercase or uppercase hex of exactly 32 bytes.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(KeyHash(out))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &hex::encode(&self.0[..4]))
    }
}

/// The public prefix of a key, e.g. `vpx_live_Ab3x`: shown in lists instead
/// of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Wraps a stored prefix.
    pub fn new(s: impl Into<String>) -> Self {
        KeyPrefix(s.into())
    }

    /// The prefix text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! public_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        /// Read with [`parse`](Self::parse): a malformed id is refused where
        /// it is read, naming what was expected.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "expected an id like {}… ({} and 1 to 64 letters, digits or _)",
                        Self::PREFIX,
                        Self::PREFIX
                    ))
                })
            }
        }

        impl $name {
            /// The prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random id: the prefix plus 16 base62 characters.
            pub fn generate() -> Result<Self, KeyFormatError> {
                let mut s = String::with_capacity(Self::PREFIX.len() + 16);
                s.push_str(Self::PREFIX);
                random_chars(Alphabet::Base62, 16, &SystemRandom::new(), &mut s)?;
                Ok($name(s))
            }

            /// Parses an id: the prefix plus 1 to 64 ASCII alphanumerics or `_`.
            pub fn parse(s: &str) -> Option<Self> {
                let body = s.strip_prefix(Self::PREFIX)?;
                let ok = !body.is_empty()
                    && body.len() <= 64
                    && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                ok.then(|| $name(s.to_owned()))
            }

            /// The id text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

public_id!(
    /// The public id of a virtual key, `key_…`; stable across rotation.
    KeyId,
    "key_"
);
public_id!(
    /// The public id of a stored provider key, `pk_…`.
    ProviderKeyId,
    "pk_"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt() -> KeyFormat {
        KeyFormat::default()
    }

    #[test]
    fn generated_keys_parse_and_have_the_right_shape() {
        for env in [KeyEnv::Live, KeyEnv::Test] {
            let k = fmt().generate(env).unwrap();
            let s = k.expose_secret();
            assert_eq!(s.len(), 9 + 24);
            assert!(s.starts_with(if env == KeyEnv::Live {
                "vpx_live_"
            } else {
                "vpx_test_"
            }));
            let parsed = fmt().parse(s).unwrap();
            assert_eq!(parsed.env(), env);
            assert_eq!(parsed.hash(), k.hash());
            assert_eq!(parsed.prefix().as_str().len(), 13);
        }
    }

    #[test]
    fn boundary_rejects_malformed_keys() {
        let good = fmt().generate(KeyEnv::Live).unwrap();
        let g = good.expose_secret().to_owned();
        let body = &g[9..];
        let cases: Vec<String> = vec![
            String::new(),
            " ".into(),
            "vpx_live_".into(),
            "vpx_test_".into(),
            format!("vpx_prod_{body}"),
            format!("VPX_LIVE_{body}"),
            format!("vpx-live-{body}"),
            format!("vpx_live_{}", &body[..23]),
            format!("vpx_live_{body}A"),
            format!("vpx_live_{}-", &body[..23]),
            format!("vpx_live_{}_", &body[..23]),
            format!("vpx_live_{}=", &body[..23]),
            format!("vpx_live_{}+", &body[..23]),
            format!("vpx_live_{}/", &body[..23]),
            format!(" {g}"),
            format!("{g} "),
            format!("{g}\n"),
            format!("\t{g}"),
            format!("{}\0", &g[..32]),
            format!("vpx_live_{}\u{0430}", &body[..22]), // Cyrillic a, 2 bytes
            format!("vpx_live_{}\u{FF21}", &body[..21]), // full-width A, 3 bytes
            format!("Bearer {g}"),
            format!("Bearer Bearer {g}"),
            format!("bearer {g}"),
            format!("{g}{g}"),
            format!("vc_{body}"),
            "sk-proj-0123456789abcdefghij".into(),
            format!("vpx_live_{}", "é".repeat(12)),
        ];
        for c in &cases {
            assert!(fmt().parse(c).is_err(), "accepted {c:?}");
        }
        assert!(cases.len() >= 25);
    }

    #[test]
    fn custom_hex_format() {
        let f = KeyFormat::new("vc_", None, Alphabet::LowerHex, 32).unwrap();
        let k = f.generate(KeyEnv::Live).unwrap();
        assert!(k.expose_secret().starts_with("vc_"));
        assert_eq!(k.expose_secret().len(), 35);
        assert!(f.parse(k.expose_secret()).is_ok());
        assert!(f.parse("vc_0123456789ABCDEF0123456789abcdef").is_err());
        assert!(f.generate(KeyEnv::Test).is_err());
        assert!(KeyFormat::new("vc_", None, Alphabet::LowerHex, 16).is_err());
        assert!(KeyFormat::new("a_", Some("a_b"), Alphabet::Base62, 24).is_err());
    }

    #[test]
    fn leak_debug_shows_only_the_prefix() {
        let k = fmt().generate(KeyEnv::Live).unwrap();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&k.expose_secret()[13..]));
        let h = format!("{:?}", k.hash());
        assert!(!h.contains(&k.hash().to_hex()));
    }

    #[test]
    fn ids_have_prefixes_and_parse() {
        let id = KeyId::generate().unwrap();
        assert!(id.as_str().starts_with("key_"));
        assert_eq!(KeyId::parse(id.as_str()), Some(id));
        assert!(KeyId::parse("key_").is_none());
        assert!(KeyId::parse("pk_abc").is_none());
        assert!(KeyId::parse("key_a/b").is_none());
        assert!(ProviderKeyId::parse("pk_abc").is_some());
    }

    proptest::proptest! {
        #[test]
        fn prop_generated_keys_round_trip(seed in proptest::prelude::any::<u8>()) {
            let _ = seed;
            let k = KeyFormat::default().generate(KeyEnv::Live).unwrap();
            let p = KeyFormat::default().parse(k.expose_secret()).unwrap();
            proptest::prop_assert_eq!(p.hash(), k.hash());
        }

        #[test]
        fn prop_parse_never_panics(s in ".{0,64}") {
            let _ = KeyFormat::default().parse(&s);
        }

        #[test]
        fn prop_body_roundtrip(body in "[0-9A-Za-z]{24}") {
            let s = format!("vpx_live_{body}");
            let k = KeyFormat::default().parse(&s).unwrap();
            proptest::prop_assert_eq!(k.expose_secret(), s.as_str());
        }
    }
}
