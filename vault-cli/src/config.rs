//! The `vaultgate` binary's part of `vaultgate.toml`
//! (docs/configuration.md): where it listens, its data directory, how it
//! logs, and the shared engines of several replicas (`[store]` PostgreSQL,
//! `[redis]`). The rest of the file (upstreams, plans, prices, limits) is
//! [`vault_core::config::Config`], read from the same text.
//!
//! The two connection URLs may hold passwords: they are kept in secret
//! types (`SecretString`, [`RedisConfig`]) and never printed, in `Debug`
//! output or in an error; errors name the field or variable instead.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use vault_core::config::{Config, ConfigError, parse_toml, read};
use vault_core::policy::LimiterFallback;
use vault_redis::RedisConfig;

/// The top-level keys only the binary reads.
const KEYS: [&str; 6] = ["listen", "data_dir", "log_format", "store", "redis", "ui"];

/// The environment variable that sets (and wins over) `[store] url`.
pub(crate) const DATABASE_URL_ENV: &str = "VAULTGATE_DATABASE_URL";

/// The environment variable that sets (and wins over) `[redis] url`.
pub(crate) const REDIS_URL_ENV: &str = "VAULTGATE_REDIS_URL";

/// The default number of PostgreSQL connections per replica.
const DEFAULT_POOL_SIZE: usize = 16;

/// `[store]` with a URL: keys, budgets and usage in PostgreSQL, shared by
/// every replica (docs/replicas.md).
#[derive(Clone)]
pub(crate) struct PostgresSettings {
    /// `postgres://user:password@host:port/db?sslmode=require`: a secret.
    pub(crate) url: SecretString,
    /// A PEM bundle of CA certificates trusted besides the Mozilla roots.
    pub(crate) ca_file: Option<PathBuf>,
    /// Connections kept open at most.
    pub(crate) pool_size: usize,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &"***")
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// `[redis]`: rate limits, `max_parallel` slots and the revocation
/// broadcast shared by every replica (docs/redis.md).
#[derive(Debug, Clone)]
pub(crate) struct RedisSettings {
    /// Where Redis is; its `Debug` shows only the redacted URL.
    pub(crate) config: RedisConfig,
    /// What a call that needs Redis gets while Redis cannot be reached.
    pub(crate) on_error: LimiterFallback,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole file: the binary's keys and the library's configuration.
#[derive(Debug, Clone)]
pub(crate) struct BinaryConfig {
    /// Where `serve` listens.
    pub(crate) listen: String,
    /// The data directory (database, master key, audit log).
    pub(crate) data_dir: PathBuf,
    /// Log format.
    pub(crate) log_format: LogFormat,
    /// PostgreSQL (`[store] url` or `VAULTGATE_DATABASE_URL`); none:
    /// embedded SQLite in the data directory.
    pub(crate) postgres: Option<PostgresSettings>,
    /// Redis (`[redis] url` or `VAULTGATE_REDIS_URL`).
    pub(crate) redis: Option<RedisSettings>,
    /// `[store]`'s fields besides the URL.
    store_options: StoreOptions,
    /// `[redis] on_error`, for a URL from the environment.
    redis_on_error: LimiterFallback,
    /// The dashboard (`[ui]`).
    pub(crate) ui: UiConfig,
    /// Everything else.
    pub(crate) core: Config,
}

/// `[ui]`: the dashboard under `/ui/` (docs/dashboard.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UiConfig {
    /// Serve it (default `true`); `false` removes its routes.
    #[serde(default = "yes")]
    pub(crate) enabled: bool,
    /// Its public origin when not `http://` + the request's Host.
    #[serde(default)]
    pub(crate) origin: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            enabled: true,
            origin: None,
        }
    }
}

impl Default for BinaryConfig {
    fn default() -> Self {
        BinaryConfig {
            listen: "127.0.0.1:8080".to_owned(),
            data_dir: PathBuf::from(".vaultgate"),
            log_format: LogFormat::Text,
            postgres: None,
            redis: None,
            store_options: StoreOptions::default(),
            redis_on_error: LimiterFallback::default(),
            ui: UiConfig::default(),
            core: Config::default(),
        }
    }
}

/// The binary's keys as written; the library reads (and checks) the rest.
/// Not `Debug`: it holds the URLs as written.
#[derive(Deserialize)]
struct RawBinary {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_format: Option<String>,
    /// `[store]` (a table), or the older `store = "sqlite"`.
    store: Option<serde_json::Value>,
    redis: Option<RawRedis>,
    ui: Option<UiConfig>,
}

/// `[store]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
}

/// `[redis]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    on_error: Option<String>,
}

/// Whether `url` looks like a PostgreSQL connection string (a URL, or
/// libpq's `key=value` form); the driver checks the rest when connecting.
fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://") || url.contains('=')
}

/// A checked `[redis] url`; `origin` names where it came from.
fn redis_config(url: String, origin: &str) -> Result<RedisConfig, ConfigError> {
    RedisConfig::new(url).map_err(|e| ConfigError(format!("{origin}: {e}")))
}

impl BinaryConfig {
    /// Loads a file; errors name the file, the field (and line where known).
    pub(crate) fn load(path: &Path) -> Result<BinaryConfig, ConfigError> {
        BinaryConfig::parse(&read(path)?, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub(crate) fn parse(text: &str, origin: &str) -> Result<BinaryConfig, ConfigError> {
        let core = Config::parse_for(text, origin, &KEYS)?;
        let raw: RawBinary = parse_toml(text, origin)?;
        let mut cfg = BinaryConfig {
            core,
            ..BinaryConfig::default()
        };
        if let Some(l) = raw.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError(format!(
                    "{origin}: listen: expected an address like 127.0.0.1:8080"
                )));
            }
            cfg.listen = l;
        }
        if let Some(ui) = raw.ui {
            if let Some(o) = &ui.origin
                && !valid_origin(o)
            {
                return Err(ConfigError(format!(
                    "{origin}: ui.origin: expected a scheme and host like https://gate.example.com, without a path"
                )));
            }
            cfg.ui = ui;
        }
        if let Some(d) = raw.data_dir {
            cfg.data_dir = d;
        }
        let (url, options) = parse_store(raw.store, text, origin)?;
        cfg.postgres = url.map(|u| options.with_url(u));
        cfg.store_options = options;
        let (redis, on_error) = parse_redis(raw.redis, origin)?;
        cfg.redis = redis.map(|config| RedisSettings { config, on_error });
        cfg.redis_on_error = on_error;
        if let Some(f) = raw.log_format {
            cfg.log_format = match f.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError(format!(
                        "{origin}: log_format: expected \"text\" or \"json\""
                    )));
                }
            };
        }
        Ok(cfg)
    }

    /// Applies the environment (`var` reads a variable): `VAULTGATE_DATABASE_URL`
    /// and `VAULTGATE_REDIS_URL` win over the file's URLs, so a secret can
    /// come from the environment (a Kubernetes Secret) while the file is
    /// shared. `[store]`'s other fields and `[redis] on_error` apply to a
    /// URL from either place.
    pub(crate) fn with_env(
        mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<BinaryConfig, ConfigError> {
        if let Some(url) = var(DATABASE_URL_ENV).filter(|u| !u.is_empty()) {
            if !is_postgres_url(&url) {
                return Err(ConfigError(format!(
                    "{DATABASE_URL_ENV}: expected a postgres:// or postgresql:// URL"
                )));
            }
            self.postgres = Some(self.store_options.with_url(url));
        }
        if let Some(url) = var(REDIS_URL_ENV).filter(|u| !u.is_empty()) {
            self.redis = Some(RedisSettings {
                config: redis_config(url, REDIS_URL_ENV)?,
                on_error: self.redis_on_error,
            });
        }
        Ok(self)
    }
}

/// `[store]`'s fields besides the URL.
#[derive(Debug, Clone)]
pub(crate) struct StoreOptions {
    /// See [`PostgresSettings::ca_file`].
    pub(crate) ca_file: Option<PathBuf>,
    /// See [`PostgresSettings::pool_size`].
    pub(crate) pool_size: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ca_file: None,
            pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

impl StoreOptions {
    fn with_url(&self, url: String) -> PostgresSettings {
        PostgresSettings {
            url: SecretString::from(url),
            ca_file: self.ca_file.clone(),
            pool_size: self.pool_size,
        }
    }
}

/// `[store]`: a table with `url` (PostgreSQL), or the older
/// `store = "sqlite"` (the default, kept working). Returns the URL, if any,
/// and the other fields, which also apply to `VAULTGATE_DATABASE_URL`.
fn parse_store(
    raw: Option<serde_json::Value>,
    text: &str,
    origin: &str,
) -> Result<(Option<String>, StoreOptions), ConfigError> {
    let table = match raw {
        None => return Ok((None, StoreOptions::default())),
        Some(serde_json::Value::String(s)) if s == "sqlite" => {
            return Ok((None, StoreOptions::default()));
        }
        Some(serde_json::Value::Object(t)) => t,
        Some(_) => {
            return Err(ConfigError(format!(
                "{origin}: store: expected a [store] table with url = \"postgres://…\" (or \"sqlite\")"
            )));
        }
    };
    let raw: RawStore = serde_json::from_value(serde_json::Value::Object(table)).map_err(|e| {
        let line = text
            .lines()
            .position(|l| l.trim() == "[store]")
            .map_or_else(String::new, |i| format!(":{}", i + 1));
        ConfigError(format!("{origin}{line}: store: {e}"))
    })?;
    if let Some(n) = raw.pool_size
        && !(1..=1000).contains(&n)
    {
        return Err(ConfigError(format!(
            "{origin}: store.pool_size: expected 1 to 1000"
        )));
    }
    let url = raw.url.filter(|u| !u.is_empty());
    if url.as_deref().is_some_and(|u| !is_postgres_url(u)) {
        return Err(ConfigError(format!(
            "{origin}: store.url: expected a postgres:// or postgresql:// URL"
        )));
    }
    let options = StoreOptions {
        ca_file: raw.ca_file,
        pool_size: raw.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
    };
    Ok((url, options))
}

/// `[redis]`: the URL, if any, and `on_error`.
fn parse_redis(
    raw: Option<RawRedis>,
    origin: &str,
) -> Result<(Option<RedisConfig>, LimiterFallback), ConfigError> {
    let Some(raw) = raw else {
        return Ok((None, LimiterFallback::default()));
    };
    let on_error = match raw.on_error.as_deref() {
        None | Some("closed") => LimiterFallback::Refuse,
        Some("local") => LimiterFallback::Local,
        Some(_) => {
            return Err(ConfigError(format!(
                "{origin}: redis.on_error: expected \"closed\" (refuse with 503) or \"local\" (per-replica limits)"
            )));
        }
    };
    let config = match raw.url.filter(|u| !u.is_empty()) {
        Some(url) => Some(redis_config(url, &format!("{origin}: redis.url"))?),
        None => None,
    };
    Ok((config, on_error))
}

/// `http://` or `https://`, a host (and port), nothing after.
fn valid_origin(o: &str) -> bool {
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"));
    rest.is_some_and(|h| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_keys_and_the_library_keys_share_one_file() {
        let c = BinaryConfig::parse(
            "listen = \"0.0.0.0:9000\"\nlog_format = \"json\"\n[plans.team]\nrate_limit = { requests_per_minute = 3 }\n",
            "vaultgate.toml",
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.core.plans.contains_key("team"));
        assert_eq!(c.ui, UiConfig::default());
        let off = BinaryConfig::parse("[ui]\nenabled = false\n", "vaultgate.toml").unwrap();
        assert!(!off.ui.enabled);
        for (text, needle) in [
            ("listen = \"nowhere\"", "listen"),
            ("log_format = \"xml\"", "log_format"),
            ("[ui]\nenable = true", "unknown field `enable`"),
            ("[ui]\norigin = \"https://x/ui\"", "ui.origin"),
            (
                "lisen = \"x\"",
                "unknown field `lisen`, expected one of `listen`",
            ),
        ] {
            let e = BinaryConfig::parse(text, "vaultgate.toml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("vaultgate.toml"), "{e}");
            assert!(e.contains(needle), "{text:?} → {e}");
        }
    }

    #[test]
    fn store_and_redis_are_read_and_their_urls_never_printed() {
        use secrecy::ExposeSecret;
        let text = "[store]\nurl = \"postgres://vg:hunter2@db.internal/vg?sslmode=require\"\npool_size = 4\nca_file = \"/etc/ca.pem\"\n\n[redis]\nurl = \"rediss://:s3cret@cache:6380/0\"\non_error = \"local\"\n";
        let c = BinaryConfig::parse(text, "vaultgate.toml").unwrap();
        let pg = c.postgres.as_ref().unwrap();
        assert_eq!(pg.pool_size, 4);
        assert_eq!(pg.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        let redis = c.redis.as_ref().unwrap();
        assert_eq!(redis.on_error, LimiterFallback::Local);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        // Neither set, or the older spelling: SQLite, as before.
        for text in ["", "store = \"sqlite\"\n"] {
            let c = BinaryConfig::parse(text, "vaultgate.toml").unwrap();
            assert!(c.postgres.is_none() && c.redis.is_none());
        }
        // The environment wins; the file's other fields still apply.
        let c = BinaryConfig::parse(
            "[store]\npool_size = 3\n[redis]\non_error = \"local\"\n",
            "f",
        )
        .unwrap()
        .with_env(|name| match name {
            DATABASE_URL_ENV => Some("postgres://env@db/vg".to_owned()),
            REDIS_URL_ENV => Some("redis://cache:6379".to_owned()),
            _ => None,
        })
        .unwrap();
        let pg = c.postgres.unwrap();
        assert_eq!(pg.url.expose_secret(), "postgres://env@db/vg");
        assert_eq!(pg.pool_size, 3);
        assert_eq!(c.redis.unwrap().on_error, LimiterFallback::Local);
        let c = BinaryConfig::parse(text, "f")
            .unwrap()
            .with_env(|name| (name == DATABASE_URL_ENV).then(|| "postgres://env@db/vg".to_owned()))
            .unwrap();
        assert_eq!(
            c.postgres.unwrap().url.expose_secret(),
            "postgres://env@db/vg"
        );
        assert_eq!(c.redis.unwrap().on_error, LimiterFallback::Local);
    }

    #[test]
    fn store_and_redis_errors_name_the_field_and_never_the_secret() {
        for (text, needles) in [
            (
                "[store]\nurll = \"x\"",
                &["vaultgate.toml:1", "store", "unknown field `urll`", "`url`"][..],
            ),
            (
                "[store]\nurl = \"mysql://u:hunter2@h/db\"",
                &["store.url", "postgres://"],
            ),
            ("[store]\npool_size = 0", &["store.pool_size", "1 to 1000"]),
            ("store = 5", &["store", "[store] table"]),
            (
                "[redis]\non_error = \"open\"",
                &["redis.on_error", "\"closed\"", "\"local\""],
            ),
            (
                "[redis]\nurl = \"http://u:hunter2@h\"",
                &["redis.url", "redis://"],
            ),
            (
                "[redis]\nurl = \"redis://h\"\ntimeout = \"1s\"",
                &["unknown field `timeout`"],
            ),
        ] {
            let e = BinaryConfig::parse(text, "vaultgate.toml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("vaultgate.toml"), "{text:?} → {e}");
            for n in needles {
                assert!(e.contains(n), "{text:?} → {e} (wanted {n})");
            }
            assert!(!e.contains("hunter2") && !e.contains('\n'), "{e}");
        }
        let e = BinaryConfig::default()
            .with_env(|name| (name == DATABASE_URL_ENV).then(|| "mysql://u:hunter2@h".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(DATABASE_URL_ENV) && !e.contains("hunter2"),
            "{e}"
        );
        let e = BinaryConfig::default()
            .with_env(|name| (name == REDIS_URL_ENV).then(|| "http://u:hunter2@h".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(REDIS_URL_ENV) && !e.contains("hunter2"),
            "{e}"
        );
    }
}
