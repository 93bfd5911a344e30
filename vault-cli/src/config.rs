//! The `vaultgate` binary's part of `vaultgate.toml`
//! (docs/configuration.md): where it listens, its data directory and how it
//! logs. The rest of the file (upstreams, plans, prices, limits) is
//! [`vault_core::config::Config`], read from the same text.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vault_core::config::{Config, ConfigError, parse_toml, read};

/// The top-level keys only the binary reads.
const KEYS: [&str; 3] = ["listen", "data_dir", "log_format"];

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
    /// Everything else.
    pub(crate) core: Config,
}

impl Default for BinaryConfig {
    fn default() -> Self {
        BinaryConfig {
            listen: "127.0.0.1:8080".to_owned(),
            data_dir: PathBuf::from(".vaultgate"),
            log_format: LogFormat::Text,
            core: Config::default(),
        }
    }
}

/// The binary's keys as written; the library reads (and checks) the rest.
#[derive(Debug, Deserialize)]
struct RawBinary {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_format: Option<String>,
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
        if let Some(d) = raw.data_dir {
            cfg.data_dir = d;
        }
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
        for (text, needle) in [
            ("listen = \"nowhere\"", "listen"),
            ("log_format = \"xml\"", "log_format"),
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
}
