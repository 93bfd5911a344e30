//! Finding the virtual key in a request, and removing every client
//! credential before the request goes upstream.
//!
//! A key may arrive in `Authorization: Bearer`, `x-api-key`, `x-goog-api-key`,
//! `api-key` or the `key` query parameter. Two different credentials in one
//! request are refused, never "pick one" (docs/threat-model.md, A3).

use std::borrow::Cow;

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};

/// Header names that may carry a virtual key (besides `Authorization`).
pub(crate) const KEY_HEADERS: [&str; 3] = ["x-api-key", "x-goog-api-key", "api-key"];

/// What the request presented.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Presented<'a> {
    /// No credential anywhere.
    Missing,
    /// Exactly one distinct credential (percent-decoded when it came in
    /// the query).
    One(Cow<'a, str>),
    /// Something unusable: two different credentials, a repeated header with
    /// different values, a non-`Bearer` scheme, or non-UTF-8 bytes.
    Invalid,
}

/// Collects every credential in headers and query and decides what was
/// presented. The scheme is stripped exactly once with `strip_prefix`.
pub(crate) fn presented_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Presented<'a> {
    let mut found: Option<Cow<'a, str>> = None;
    let mut invalid = false;
    fn note<'a>(found: &mut Option<Cow<'a, str>>, invalid: &mut bool, value: Cow<'a, str>) {
        match found {
            None => *found = Some(value),
            Some(prev) if *prev == value => {}
            Some(_) => *invalid = true,
        }
    }

    for value in headers.get_all(AUTHORIZATION) {
        let Ok(v) = value.to_str() else {
            invalid = true;
            continue;
        };
        // An empty value or a bare scheme presents nothing.
        if v.trim().is_empty() || v.trim() == "Bearer" {
            continue;
        }
        match v.strip_prefix("Bearer ") {
            Some(token) if token.trim().is_empty() => {}
            Some(token) => note(&mut found, &mut invalid, Cow::Borrowed(token)),
            None => invalid = true,
        }
    }
    for name in KEY_HEADERS {
        for value in headers.get_all(name) {
            match value.to_str() {
                Ok(v) if v.trim().is_empty() => {}
                Ok(v) => note(&mut found, &mut invalid, Cow::Borrowed(v)),
                Err(_) => invalid = true,
            }
        }
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if is_key_param(name) && !value.is_empty() {
                match percent_decode(value) {
                    Some(v) => note(&mut found, &mut invalid, v),
                    None => invalid = true,
                }
            }
        }
    }
    match (invalid, found) {
        (true, _) => Presented::Invalid,
        (false, Some(k)) => Presented::One(k),
        (false, None) => Presented::Missing,
    }
}

/// `%XX` escapes decoded (`+` is kept: it is not a space in a key); `None`
/// for a bad escape or bytes that are not UTF-8. Borrowed when there are
/// no escapes.
fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// Whether a query parameter name is `key` in any spelling the provider
/// would decode to it (`k%65y`, `%6B%65%79`). A name with a bad escape is
/// treated as `key` too: never forwarded, so it can never smuggle one.
fn is_key_param(name: &str) -> bool {
    percent_decode(name).is_none_or(|n| n == "key")
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), every client credential and
/// framing header the proxy recomputes, the method-override headers (the
/// method run upstream must be the method checked) and the OpenAI
/// organisation and project headers (a client must not pick which
/// organisation a shared provider key bills).
const STRIP_ALWAYS: [&str; 22] = [
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "proxy-authorization",
    "cookie",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "forwarded",
    "accept-encoding",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "openai-organization",
    "openai-project",
];

/// Removes client credentials, hop-by-hop headers (including those a
/// `Connection` header names), framing and host headers, and `X-Forwarded-*`.
/// Run *before* the provider credential is injected, so a `Connection:
/// x-goog-api-key` can never strip the injected header (docs/threat-model.md,
/// F2).
pub(crate) fn strip_request_headers(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // One pass over the names present (a handful) rather than a hashed
    // lookup of every name in the list: `remove(&str)` parses and hashes
    // its argument each time, which showed in the layer bench's profile.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            STRIP_ALWAYS.contains(&k) || k.starts_with("x-forwarded-")
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Removes only the `key` query parameter(s), in any percent-encoding of
/// the name, keeping every other byte and the order of the rest
/// (docs/threat-model.md, C4). `None` when nothing is left.
pub(crate) fn strip_key_param(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !is_key_param(pair.split_once('=').map_or(*pair, |(n, _)| n)))
        .collect();
    let out = kept.join("&");
    (!out.is_empty()).then_some(out)
}

/// Response headers that carry credentials and must never reach the client,
/// whatever the upstream echoes (docs/threat-model.md, C5).
const RESPONSE_CREDENTIAL_HEADERS: [&str; 7] = [
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "proxy-authorization",
    "set-cookie",
    "www-authenticate",
];

/// Removes credential and hop-by-hop headers from an upstream response, and
/// any header whose value contains `secret`.
pub(crate) fn strip_response_headers(headers: &mut HeaderMap, secret: Option<&str>) {
    let secret = secret.filter(|s| !s.is_empty());
    // One pass over the headers present; see `strip_request_headers`.
    let doomed: Vec<HeaderName> = headers
        .iter()
        .filter(|(k, v)| {
            let k = k.as_str();
            RESPONSE_CREDENTIAL_HEADERS.contains(&k)
                || RESPONSE_HOP_BY_HOP.contains(&k)
                || secret.is_some_and(|s| v.as_bytes().windows(s.len()).any(|w| w == s.as_bytes()))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Hop-by-hop headers removed from upstream responses.
const RESPONSE_HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn finds_the_key_in_each_place() {
        assert_eq!(
            presented_key(&h(&[("authorization", "Bearer k1")]), None),
            Presented::One("k1".into())
        );
        for name in KEY_HEADERS {
            let mut m = HeaderMap::new();
            m.insert(name, HeaderValue::from_static("k1"));
            assert_eq!(presented_key(&m, None), Presented::One("k1".into()));
        }
        assert_eq!(
            presented_key(&HeaderMap::new(), Some("a=1&key=k1")),
            Presented::One("k1".into())
        );
        assert_eq!(
            presented_key(&HeaderMap::new(), Some("monkey=k1")),
            Presented::Missing
        );
    }

    #[test]
    fn boundary_missing_and_malformed() {
        assert_eq!(presented_key(&HeaderMap::new(), None), Presented::Missing);
        assert_eq!(
            presented_key(&h(&[("authorization", "")]), None),
            Presented::Missing
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "Bearer")]), None),
            Presented::Missing
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "Bearer   ")]), None),
            Presented::Missing
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "bearer k1")]), None),
            Presented::Invalid
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "Basic k1")]), None),
            Presented::Invalid
        );
        // `Bearer Bearer k` strips once, leaving `Bearer k`, which fails key parsing.
        assert_eq!(
            presented_key(&h(&[("authorization", "Bearer Bearer k1")]), None),
            Presented::One("Bearer k1".into())
        );
    }

    #[test]
    fn smuggling_two_credentials_are_refused() {
        let m = h(&[("authorization", "Bearer k1"), ("x-api-key", "k2")]);
        assert_eq!(presented_key(&m, None), Presented::Invalid);
        let m = h(&[("authorization", "Bearer k1")]);
        assert_eq!(presented_key(&m, Some("key=k2")), Presented::Invalid);
        assert_eq!(
            presented_key(&HeaderMap::new(), Some("key=k1&key=k2")),
            Presented::Invalid
        );
        let m = h(&[("x-api-key", "k1"), ("x-api-key", "k2")]);
        assert_eq!(presented_key(&m, None), Presented::Invalid);
        // The same key twice is one credential.
        let m = h(&[("authorization", "Bearer k1"), ("x-api-key", "k1")]);
        assert_eq!(presented_key(&m, None), Presented::One("k1".into()));
    }

    #[test]
    fn smuggling_key_param_removal_is_surgical() {
        assert_eq!(
            strip_key_param("a=1&key=vpx&b=%26&monkey=2").as_deref(),
            Some("a=1&b=%26&monkey=2")
        );
        assert_eq!(strip_key_param("KEY=x").as_deref(), Some("KEY=x"));
        assert_eq!(strip_key_param("key"), None);
        assert_eq!(strip_key_param("key=a&key=b"), None);
        assert_eq!(strip_key_param("alt=sse&key=x").as_deref(), Some("alt=sse"));
        // Percent-encoded names are the same parameter to the provider.
        assert_eq!(strip_key_param("k%65y=x&a=1").as_deref(), Some("a=1"));
        assert_eq!(
            strip_key_param("%6B%65%79=x&%6b=1").as_deref(),
            Some("%6b=1")
        );
        assert_eq!(strip_key_param("k%zzy=x&a=1").as_deref(), Some("a=1"));
    }

    #[test]
    fn smuggling_percent_encoded_key_params_are_read_and_stripped() {
        assert_eq!(
            presented_key(&HeaderMap::new(), Some("k%65y=vpx%5Flive")),
            Presented::One("vpx_live".into())
        );
        // Two spellings of one parameter carrying different keys.
        assert_eq!(
            presented_key(&HeaderMap::new(), Some("key=k1&k%65y=k2")),
            Presented::Invalid
        );
        assert_eq!(
            presented_key(&HeaderMap::new(), Some("key=k%zz")),
            Presented::Invalid
        );
        let m = h(&[("authorization", "Bearer k1")]);
        assert_eq!(presented_key(&m, Some("%6Bey=k2")), Presented::Invalid);
    }

    #[test]
    fn smuggling_method_override_and_organisation_headers_are_stripped() {
        let mut m = h(&[
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("openai-organization", "org-victim"),
            ("openai-project", "proj-victim"),
            ("content-type", "application/json"),
        ]);
        strip_request_headers(&mut m);
        assert_eq!(m.len(), 1);
        assert!(m.contains_key("content-type"));
    }

    #[test]
    fn smuggling_connection_named_headers_are_stripped_first() {
        let mut m = h(&[
            ("connection", "close, x-custom"),
            ("x-custom", "1"),
            ("cookie", "a=b"),
            ("proxy-authorization", "Basic x"),
            ("x-forwarded-host", "evil.example"),
            ("content-type", "application/json"),
        ]);
        strip_request_headers(&mut m);
        assert_eq!(m.len(), 1);
        assert!(m.contains_key("content-type"));
    }

    #[test]
    fn leak_response_headers_echoing_the_secret_are_removed() {
        let mut m = h(&[
            ("x-goog-api-key", "sk-secret-123"),
            ("location", "https://x/?key=sk-secret-123"),
            ("content-type", "application/json"),
        ]);
        strip_response_headers(&mut m, Some("sk-secret-123"));
        assert_eq!(m.len(), 1);
    }
}
