//! Where each provider lives and how long vaultgate waits for it. Only the
//! operator's configuration sets these; nothing in a request can
//! (docs/threat-model.md, E3–E4).

use std::collections::HashMap;
use std::time::Duration;

use http::Uri;
use vault_core::provider::Provider;

/// Timeouts for one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// Longest wait for a TCP (and TLS) connection.
    pub connect: Duration,
    /// Longest wait from sending the request to the response headers.
    pub response: Duration,
    /// Longest silence inside a streamed response body.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(120),
            idle: Duration::from_secs(60),
        }
    }
}

/// One provider's upstream: a base URL (scheme, host and an optional path
/// prefix) and its timeouts.
#[derive(Debug, Clone)]
pub struct Upstream {
    base: Uri,
    /// Its timeouts.
    pub timeouts: Timeouts,
}

/// A base URL that cannot serve as an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid base_url {url:?}: {why}")]
pub struct BadBaseUrl {
    /// The URL as given.
    pub url: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Upstream {
    /// Parses an `http` or `https` base URL with a host, no query or fragment.
    pub fn new(base_url: &str, timeouts: Timeouts) -> Result<Upstream, BadBaseUrl> {
        let bad = |why| BadBaseUrl {
            url: base_url.to_owned(),
            why,
        };
        let base: Uri = base_url.parse().map_err(|_| bad("not a URL"))?;
        match base.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad("the scheme must be http or https")),
        }
        if base.authority().is_none_or(|a| a.host().is_empty()) {
            return Err(bad("a host is required"));
        }
        if base_url.contains('@') {
            return Err(bad("credentials in the URL are not allowed"));
        }
        if base.query().is_some() || base_url.contains('#') {
            return Err(bad("a query or fragment is not allowed"));
        }
        Ok(Upstream { base, timeouts })
    }

    /// The absolute URI for an upstream path (already canonical) and query.
    pub fn uri_for(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let prefix = self.base.path().trim_end_matches('/');
        let mut pq =
            String::with_capacity(prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(prefix);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(pq.parse()?);
        Ok(Uri::from_parts(parts)?)
    }

    /// The base URL.
    pub fn base(&self) -> &Uri {
        &self.base
    }
}

/// Upstreams by provider; built from the providers' public defaults and
/// overridden by configuration.
#[derive(Debug, Clone)]
pub struct Upstreams {
    by_provider: HashMap<Provider, Upstream>,
}

impl Upstreams {
    /// Every provider with a public default base URL, with default timeouts.
    pub fn defaults() -> Upstreams {
        Self::defaults_with(Timeouts::default())
    }

    /// Every provider with a public default base URL, with these timeouts.
    pub fn defaults_with(timeouts: Timeouts) -> Upstreams {
        let by_provider = Provider::ALL
            .iter()
            .filter_map(|p| {
                let url = p.default_base_url()?;
                Upstream::new(url, timeouts).ok().map(|u| (*p, u))
            })
            .collect();
        Upstreams { by_provider }
    }

    /// No upstreams at all (every live call fails with 502 until one is set).
    pub fn none() -> Upstreams {
        Upstreams {
            by_provider: HashMap::new(),
        }
    }

    /// Sets one provider's upstream.
    pub fn set(&mut self, provider: Provider, upstream: Upstream) -> &mut Self {
        self.by_provider.insert(provider, upstream);
        self
    }

    /// Builder form of [`Upstreams::set`].
    pub fn with(mut self, provider: Provider, upstream: Upstream) -> Self {
        self.set(provider, upstream);
        self
    }

    /// The upstream of a provider, if one is configured.
    pub fn get(&self, provider: Provider) -> Option<&Upstream> {
        self.by_provider.get(&provider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_keep_the_path_byte_for_byte() {
        let u = Upstream::new("https://api.groq.com/openai/", Timeouts::default()).unwrap();
        let uri = u.uri_for("/v1/chat/completions", Some("a=1")).unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.groq.com/openai/v1/chat/completions?a=1"
        );
        let g = Upstream::new("http://127.0.0.1:9", Timeouts::default()).unwrap();
        let uri = g
            .uri_for(
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                Some("alt=sse"),
            )
            .unwrap();
        assert_eq!(
            uri.path_and_query().unwrap().as_str(),
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
        );
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in [
            "ftp://x",
            "not a url",
            "https://user:pw@x",
            "https://x/?q=1",
            "/relative",
        ] {
            assert!(Upstream::new(bad, Timeouts::default()).is_err(), "{bad}");
        }
    }
}
