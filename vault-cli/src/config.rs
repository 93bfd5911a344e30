//! The `vaultgate` binary's part of `vaultgate.toml`
//! (docs/configuration.md): where it listens, its data directory and how it
//! logs. The rest of the file (upstreams, plans, prices, limits) is
//! [`vault_core::config::Config`], read from the same text.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vault_core::config::{Config, ConfigError, parse_toml, read};

/// The top-level keys only the binary reads.
const KEYS: [&str; 4] = ["listen", "data_dir", "log_format", "ui"];

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
            ui: UiConfig::default(),
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
    ui: Option<UiConfig>,
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
}
