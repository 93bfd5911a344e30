//! The one path canonicaliser: splits `/{provider}/{upstream path}` and
//! refuses every spelling that another parser could read differently.
//!
//! There is no normalisation: a path is either accepted and returned
//! verbatim (the exact bytes that are checked against allowlists and then
//! forwarded upstream), or rejected. Nothing downstream may decode or
//! re-encode it (docs/threat-model.md, E1–E2).
//!
//! Rejected:
//! - a path not starting with `/`; a `?` or `#` (the caller passes the path
//!   without its query);
//! - an unknown provider, or a known one spelled in another case (`/OpenAI/…`);
//! - empty segments (`//`, and a trailing `/`: a trailing slash is an empty
//!   last segment, so `/openai/v1/chat/completions/` is refused rather than
//!   kept);
//! - dot segments `.` and `..` anywhere;
//! - percent-encoded `/`, `\`, `.`, `%` (double encoding: any `%25`), NUL or
//!   any other control byte; a `%` not followed by two hex digits; encoded
//!   bytes that do not form valid UTF-8 (overlong forms such as `%c0%af`);
//! - raw `\`, space, control bytes, DEL and any non-ASCII byte (full-width
//!   `／` included).
//!
//! Everything else is returned as it came: Google's
//! `/v1beta/models/gemini-2.0-flash:generateContent` keeps its `:`, and
//! `/v1/chat/completions;x=1` is kept too (it simply matches no rule
//! written for `/v1/chat/completions`).

use crate::provider::Provider;

/// Why a proxy path was refused. Every variant maps to 400 `invalid_request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// The first segment names no provider (names are exact and lowercase).
    #[error(
        "unknown provider {0:?} in the path; known providers: openai, anthropic, google, mistral, groq, deepseek, cohere, xai, perplexity, bielik"
    )]
    UnknownProvider(String),
    /// Nothing follows the provider.
    #[error("the path names a provider but no upstream path")]
    NoUpstreamPath,
    /// An empty segment (`//` or a trailing `/`).
    #[error("the path has an empty segment (// or a trailing /)")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("the path has a . or .. segment")]
    DotSegment,
    /// A percent-encoded `/`, `\`, `.`, `%`, NUL or control byte, a malformed
    /// escape, or encoded bytes that are not valid UTF-8.
    #[error("the path has a forbidden or malformed percent-encoding")]
    ForbiddenEncoding,
    /// A raw `\`, space, `?`, `#`, control byte or non-ASCII byte.
    #[error("the path has a forbidden character")]
    ForbiddenCharacter,
}

/// Splits a proxy request path (no query) into its provider and the upstream
/// path that will be checked and forwarded, byte for byte.
///
/// ```
/// use vault_core::policy::split_proxy_path;
/// use vault_core::provider::Provider;
/// let (p, up) = split_proxy_path("/google/v1beta/models/gemini-2.0-flash:generateContent").unwrap();
/// assert_eq!(p, Provider::Google);
/// assert_eq!(up, "/v1beta/models/gemini-2.0-flash:generateContent");
/// assert!(split_proxy_path("/openai/v1/chat/../files").is_err());
/// ```
pub fn split_proxy_path(path: &str) -> Result<(Provider, &str), PathError> {
    check_bytes(path.as_bytes())?;
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let (name, upstream) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if name.is_empty() {
        return Err(PathError::EmptySegment);
    }
    let provider: Provider = name
        .parse()
        .map_err(|_| PathError::UnknownProvider(name.chars().take(64).collect()))?;
    if upstream.is_empty() {
        return Err(PathError::NoUpstreamPath);
    }
    for segment in upstream[1..].split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok((provider, upstream))
}

/// Checks every byte and every percent-escape of the whole path.
fn check_bytes(bytes: &[u8]) -> Result<(), PathError> {
    let mut i = 0;
    // Encoded non-ASCII bytes are collected (rarely) to check they form UTF-8.
    let mut encoded_high: Option<Vec<u8>> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(PathError::ForbiddenEncoding);
                };
                let (Some(h), Some(l)) = (hex_value(h), hex_value(l)) else {
                    return Err(PathError::ForbiddenEncoding);
                };
                let decoded = h << 4 | l;
                if matches!(decoded, b'/' | b'\\' | b'.' | b'%')
                    || decoded < 0x20
                    || decoded == 0x7f
                {
                    return Err(PathError::ForbiddenEncoding);
                }
                if decoded >= 0x80 {
                    encoded_high.get_or_insert_with(Vec::new).push(decoded);
                } else if let Some(run) = encoded_high.take() {
                    utf8_run(&run)?;
                }
                i += 3;
                continue;
            }
            b'\\' | b'?' | b'#' => return Err(PathError::ForbiddenCharacter),
            0x21..=0x7e => {}
            _ => return Err(PathError::ForbiddenCharacter),
        }
        if let Some(run) = encoded_high.take() {
            utf8_run(&run)?;
        }
        i += 1;
    }
    if let Some(run) = encoded_high.take() {
        utf8_run(&run)?;
    }
    Ok(())
}

/// A run of consecutive percent-encoded high bytes must be valid UTF-8
/// (which excludes overlong forms like `%c0%af` for `/`).
fn utf8_run(run: &[u8]) -> Result<(), PathError> {
    std::str::from_utf8(run)
        .map(|_| ())
        .map_err(|_| PathError::ForbiddenEncoding)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::EndpointRule;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_returns_verbatim() {
        let cases = [
            (
                "/openai/v1/chat/completions",
                Provider::OpenAi,
                "/v1/chat/completions",
            ),
            (
                "/anthropic/v1/messages",
                Provider::Anthropic,
                "/v1/messages",
            ),
            (
                "/google/v1beta/models/gemini-2.0-flash:generateContent",
                Provider::Google,
                "/v1beta/models/gemini-2.0-flash:generateContent",
            ),
            (
                "/openai/v1/chat/completions;x=1",
                Provider::OpenAi,
                "/v1/chat/completions;x=1",
            ),
            (
                "/openai/v1/files/file-%C3%A9",
                Provider::OpenAi,
                "/v1/files/file-%C3%A9",
            ),
            ("/bielik/v1/x", Provider::Bielik, "/v1/x"),
            ("/openai/v1/a..b/.c/d.", Provider::OpenAi, "/v1/a..b/.c/d."),
        ];
        for (input, provider, upstream) in cases {
            assert_eq!(split_proxy_path(input), Ok((provider, upstream)), "{input}");
        }
    }

    #[test]
    fn smuggling_e1_path_normalisation_tricks_are_rejected() {
        let rejected = [
            "/openai/v1/chat/completions/../../v1/files",
            "/openai/v1/./chat/completions",
            "/openai//v1/chat/completions",
            "/openai/v1/chat/completions/",
            "/openai/v1/chat%2Fcompletions",
            "/openai/v1/chat%2fcompletions",
            "/openai/%2e%2e/v1/files",
            "/openai/%2E%2E/v1/files",
            "/openai/v1/%252e%252e/files",
            "/openai/v1%5cchat",
            "/openai/v1%5Cchat",
            "/openai/v1\\chat\\completions",
            "/openai/v1/chat%00/completions",
            "/openai/v1/chat\0/completions",
            "/openai/v1/chat/completions\r\n",
            "/openai/v1/chat%0d%0a",
            "/openai/v1/chat%c0%af/completions",
            "/openai/v1/chat%e0%80%af",
            "/openai/v1/chat%c3",
            "/openai/v1/chat／completions",
            "/openai/v1/chat completions",
            "/openai/v1/chat%zz",
            "/openai/v1/chat%2",
            "/openai/v1/chat?x=1",
            "/openai/v1/chat#frag",
            "/openai/v1/..",
            "/openai/v1/.",
            "/openai/.",
            "openai/v1/chat/completions",
            "",
            "/",
            "//openai/v1",
            "/openai",
            "/openai/",
        ];
        for input in rejected {
            assert!(split_proxy_path(input).is_err(), "{input:?} was accepted");
        }
        // Case variants are accepted verbatim but match no lowercase rule.
        let rule = EndpointRule::parse("POST /v1/chat/completions").unwrap();
        let (_, up) = split_proxy_path("/openai/V1/Chat/Completions").unwrap();
        assert!(!rule.matches("POST", up));
    }

    #[test]
    fn smuggling_e2_provider_hops_are_rejected() {
        assert_eq!(
            split_proxy_path("/openai/../anthropic/v1/messages"),
            Err(PathError::DotSegment)
        );
        assert_eq!(
            split_proxy_path("/openai%2F..%2Fanthropic/v1/messages"),
            Err(PathError::ForbiddenEncoding)
        );
        assert!(matches!(
            split_proxy_path("/OpenAI/v1/chat/completions"),
            Err(PathError::UnknownProvider(p)) if p == "OpenAI"
        ));
        assert!(matches!(
            split_proxy_path("/unknown/v1/chat/completions"),
            Err(PathError::UnknownProvider(_))
        ));
        assert!(split_proxy_path("/%6fpenai/v1/chat/completions").is_err());
    }

    fn token() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "..",
            ".",
            "%2e",
            "%2f",
            "//",
            "\\",
            "v1",
            "chat",
            "completions",
            "files",
            "/",
        ])
    }

    proptest! {
        #[test]
        fn smuggling_random_paths_never_escape_the_allowlist(parts in prop::collection::vec(token(), 0..12)) {
            let input = format!("/openai/{}", parts.concat());
            let rule = EndpointRule::parse("POST /v1/chat/completions").unwrap();
            if let Ok((provider, up)) = split_proxy_path(&input) {
                prop_assert_eq!(provider, Provider::OpenAi);
                prop_assert!(input.ends_with(up));
                prop_assert!(up.starts_with('/'));
                let lower = up.to_ascii_lowercase();
                prop_assert!(!lower.contains("%2e") && !lower.contains("%2f") && !up.contains('\\'));
                prop_assert!(up[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
                prop_assert_eq!(rule.matches("POST", up), up == "/v1/chat/completions");
            }
        }
    }
}
