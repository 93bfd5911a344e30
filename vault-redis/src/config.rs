//! [`RedisConfig`]: where Redis is and how long to wait for it. The URL may
//! hold a password, so it is a secret: never printed, logged or put in an
//! error (only [`RedisConfig::redacted_url`] is).

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::error::Error;

/// The default wait for one Redis operation (docs/redis.md#failure).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// The default time calls fail fast after Redis failed, before one call
/// tries it again.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The default lease of a `max_parallel` slot: renewed while its call runs,
/// so a dead replica's slots free themselves within this long.
pub const DEFAULT_SLOT_LEASE: Duration = Duration::from_secs(120);

/// How to reach Redis (`[redis]` in vaultgate.toml, docs/redis.md).
#[derive(Clone)]
pub struct RedisConfig {
    url: SecretString,
    redactor: Redactor,
    key_prefix: String,
    timeout: Duration,
    retry_interval: Duration,
    slot_lease: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redactor.redacted_url)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("retry_interval", &self.retry_interval)
            .field("slot_lease", &self.slot_lease)
            .finish()
    }
}

impl RedisConfig {
    /// Redis at `url`: `redis://[user:password@]host[:port][/db]`,
    /// `rediss://…` for TLS (rustls, the system's roots), or
    /// `redis+unix:///path/to/socket`. The URL is checked here; nothing
    /// connects.
    pub fn new(url: impl Into<String>) -> Result<RedisConfig, Error> {
        let url: String = url.into();
        let redactor = Redactor::for_url(&url);
        let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|s| url.starts_with(s));
        if !scheme_ok {
            return Err(Error::Config(format!(
                "the Redis URL {} must start with redis://, rediss:// or redis+unix://",
                redactor.redacted_url
            )));
        }
        if let Err(e) = redis::Client::open(url.as_str()) {
            return Err(Error::Config(format!(
                "the Redis URL {} is invalid: {}",
                redactor.redacted_url,
                redactor.describe(&e)
            )));
        }
        Ok(RedisConfig {
            url: SecretString::from(url),
            redactor,
            key_prefix: "vaultgate:".to_owned(),
            timeout: DEFAULT_TIMEOUT,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            slot_lease: DEFAULT_SLOT_LEASE,
        })
    }

    /// The prefix of every key and channel name (default `vaultgate:`), to
    /// share one Redis between deployments.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The longest wait for one operation, connecting included (default
    /// 250 ms): a call of a limited key waits at most this long before it
    /// is refused or limited locally.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// After Redis failed, calls fail at once for this long (default 1 s)
    /// before one call tries Redis again; under load a dead Redis costs no
    /// waiting.
    pub fn with_retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// The lease of a `max_parallel` slot (default 2 minutes), renewed
    /// every third of it while the call runs.
    pub fn with_slot_lease(mut self, lease: Duration) -> Self {
        self.slot_lease = lease.max(Duration::from_millis(3));
        self
    }

    /// The URL with any user and password replaced by `***` and without
    /// its query: safe to print.
    pub fn redacted_url(&self) -> &str {
        &self.redactor.redacted_url
    }

    pub(crate) fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn retry_interval(&self) -> Duration {
        self.retry_interval
    }

    pub(crate) fn slot_lease(&self) -> Duration {
        self.slot_lease
    }

    pub(crate) fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// A driver client. The one place the URL is exposed.
    pub(crate) fn client(&self) -> Result<redis::Client, Error> {
        redis::Client::open(self.url.expose_secret()).map_err(|e| {
            Error::Config(format!(
                "the Redis URL {} is invalid: {}",
                self.redactor.redacted_url,
                self.redactor.describe(&e)
            ))
        })
    }
}

/// Removes a URL's credentials from text that may quote them.
#[derive(Clone)]
pub(crate) struct Redactor {
    redacted_url: String,
    /// The URL, its user-info and password, raw and percent-decoded.
    secrets: Vec<String>,
}

impl Redactor {
    fn for_url(url: &str) -> Redactor {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let path = path.split(['?', '#']).next().unwrap_or("");
        let mut secrets = vec![url.to_owned()];
        let host = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                secrets.push(userinfo.to_owned());
                if let Some((_, password)) = userinfo.split_once(':') {
                    secrets.push(password.to_owned());
                }
                secrets.push(percent_decode(userinfo));
                host
            }
            None => authority,
        };
        for s in secrets.clone() {
            if let Some((_, password)) = s.split_once(':') {
                secrets.push(password.to_owned());
            }
        }
        let query = url[scheme.len()..].find('?').map(|_| "?***").unwrap_or("");
        let userinfo = if authority.contains('@') { "***@" } else { "" };
        secrets.retain(|s| !s.is_empty());
        // Longest first, so a password inside the URL does not leave the
        // rest of the URL half replaced.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor {
            redacted_url: format!("{scheme}://{userinfo}{host}{path}{query}"),
            secrets,
        }
    }

    /// `text` with every credential replaced by `***`.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }

    /// A driver error, safe to print.
    pub(crate) fn describe(&self, e: &redis::RedisError) -> String {
        self.redact(&e.to_string())
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leak_the_url_password_is_never_printed() {
        let c = RedisConfig::new("rediss://agent:s3cr%21t-pw@cache.internal:6380/2?protocol=resp3")
            .unwrap();
        assert_eq!(c.redacted_url(), "rediss://***@cache.internal:6380/2?***");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr"), "{shown}");
        let r = c.redactor();
        assert_eq!(
            r.redact("auth failed for agent:s3cr!t-pw and s3cr%21t-pw"),
            "auth failed for *** and ***"
        );
        let e = RedisConfig::new("http://u:hunter2@h").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(
            RedisConfig::new("redis://127.0.0.1:6379")
                .unwrap()
                .redacted_url(),
            "redis://127.0.0.1:6379"
        );
    }
}
