//! The secret and public forms of a provider key, and its sealed form.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};

/// A provider key in plaintext: zeroized on drop, never `Debug`-printed,
/// not `Clone`, `Serialize` or `PartialEq`.
pub struct ProviderSecret(SecretBox<str>);

impl ProviderSecret {
    /// Wraps a plaintext key, trimming one trailing newline (`\n` or `\r\n`)
    /// as read from stdin.
    pub fn new(mut plaintext: String) -> Self {
        if plaintext.ends_with('\n') {
            plaintext.pop();
            if plaintext.ends_with('\r') {
                plaintext.pop();
            }
        }
        ProviderSecret(SecretBox::from(plaintext.into_boxed_str()))
    }

    /// Wraps bytes from a decryption; `None` when they are not UTF-8. The
    /// input buffer is zeroized either way.
    pub fn from_utf8(bytes: zeroize::Zeroizing<Vec<u8>>) -> Option<Self> {
        let s = std::str::from_utf8(&bytes).ok()?;
        Some(ProviderSecret(SecretBox::from(Box::<str>::from(s))))
    }

    /// The plaintext, for header injection and the encryptor only.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// The public hint: first 3 and last 4 characters, e.g. `sk-...x7fQ`.
    pub fn hint(&self) -> ProviderKeyHint {
        ProviderKeyHint::of(self.0.expose_secret())
    }

    /// Whether the plaintext is acceptable as a header value: 8 to 4096
    /// visible ASCII characters (providers issue nothing else).
    pub fn is_well_formed(&self) -> bool {
        let s = self.0.expose_secret();
        (8..=4096).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
    }
}

impl fmt::Debug for ProviderSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProviderSecret({})", self.hint())
    }
}

/// The public hint of a provider key: `sk-...x7fQ`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ProviderKeyHint(String);

impl ProviderKeyHint {
    /// First 3 and last 4 characters; shorter keys (under 12 characters) show
    /// only `...` so that a hint never reveals most of a key.
    pub fn of(plaintext: &str) -> Self {
        let chars: Vec<char> = plaintext.chars().collect();
        if chars.len() < 12 {
            return ProviderKeyHint("...".to_owned());
        }
        let head: String = chars[..3].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        ProviderKeyHint(format!("{head}...{tail}"))
    }

    /// Wraps a stored hint.
    pub fn from_stored(s: String) -> Self {
        ProviderKeyHint(s)
    }

    /// The hint text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProviderKeyHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sealed provider key: versioned bytes (format in `aes_gcm.rs`). Not a
/// secret by itself, but `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(Vec<u8>);

impl Sealed {
    /// Wraps stored bytes (checked when opened).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Sealed(bytes)
    }

    /// The bytes, for storing.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_and_trimming() {
        let s = ProviderSecret::new("sk-proj-abcdefghijklmnopx7fQ\n".to_owned());
        assert_eq!(s.expose_secret(), "sk-proj-abcdefghijklmnopx7fQ");
        assert_eq!(s.hint().as_str(), "sk-...x7fQ");
        assert_eq!(
            ProviderSecret::new("short\r\n".into()).hint().as_str(),
            "..."
        );
        assert!(!format!("{s:?}").contains("abcdefghijklmnop"));
        assert!(s.is_well_formed());
        assert!(!ProviderSecret::new("has space in it".into()).is_well_formed());
    }
}
