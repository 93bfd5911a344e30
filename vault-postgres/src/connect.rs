//! Turning a connection URL into a pool of TLS-capable connections, and
//! describing where it points without ever repeating its password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::PostgresError;

/// How long opening one connection may take when the URL sets no
/// `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a pooled connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// How [`PostgresStore`](crate::PostgresStore) connects, beyond the URL.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Connections kept open at most (one per concurrent store operation).
    pub pool_size: usize,
    /// PEM file of CA certificates trusted for the server's TLS certificate,
    /// besides the Mozilla roots (`webpki-roots`). Managed databases often
    /// use a private CA (RDS, Cloud SQL): name its bundle here.
    pub ca_file: Option<PathBuf>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            ca_file: None,
        }
    }
}

impl PostgresOptions {
    /// The defaults with `pool_size` connections.
    pub fn with_pool_size(pool_size: usize) -> Self {
        PostgresOptions {
            pool_size,
            ..PostgresOptions::default()
        }
    }

    /// Trusts the CA certificates of the PEM file at `path` too.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_owned());
        self
    }
}

/// Where a URL points, for `Debug`, errors and logs: user, hosts, ports
/// and database, never the password.
#[derive(Clone)]
pub(crate) struct Target {
    user: Option<String>,
    hosts: Vec<String>,
    ports: Vec<u16>,
    dbname: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(host)?;
            if let Some(port) = self.ports.get(i).or(self.ports.first()) {
                write!(f, ":{port}")?;
            }
        }
        write!(f, "/{}", self.dbname.as_deref().unwrap_or(""))
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses a connection URL (`postgres://user:password@host:port/db?sslmode=require`
/// or libpq's `key=value` form). The error never repeats the URL: only an
/// option's name, when the driver says which one was wrong.
pub(crate) fn parse(url: &str) -> Result<(tokio_postgres::Config, Target), PostgresError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        let detail = e.to_string();
        // "invalid value for option `port`", "unknown option `x`": names
        // only. Anything else may quote characters of the URL.
        let named = detail
            .split_once("invalid value for option")
            .or_else(|| detail.split_once("unknown option"))
            .map(|(_, rest)| rest.trim().to_owned());
        PostgresError::Url(match named {
            Some(option) => format!("bad option {option}"),
            None => "it could not be parsed (expected \
                     postgres://user:password@host:port/database?sslmode=require)"
                .to_owned(),
        })
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("vaultgate");
    }
    let target = Target {
        user: config.get_user().map(str::to_owned),
        hosts: config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect(),
        ports: config.get_ports().to_vec(),
        dbname: config.get_dbname().map(str::to_owned),
    };
    Ok((config, target))
}

/// The TLS connector: rustls with the ring provider, trusting the Mozilla
/// roots and `ca_file`'s certificates. Used as the URL's `sslmode` says
/// (`disable`, `prefer` — the default — or `require`).
pub(crate) fn tls(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, PostgresError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| PostgresError::Tls(format!("reading {}: {e}", path.display())))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| PostgresError::Tls(format!("reading {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| PostgresError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| PostgresError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A pool of at most `options.pool_size` connections to `config`, opened
/// as they are first needed.
pub(crate) fn pool(
    config: tokio_postgres::Config,
    options: &PostgresOptions,
) -> Result<Pool, PostgresError> {
    let manager = Manager::from_config(
        config,
        tls(options.ca_file.as_deref())?,
        ManagerConfig {
            // A connection whose socket closed is replaced; a broken one
            // fails its query, and the pool drops it.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(DEFAULT_CONNECT_TIMEOUT + Duration::from_secs(1)))
        .build()
        .map_err(|e| PostgresError::Backend(format!("building the connection pool: {e}")))
}

/// One connection outside any pool (for migrations), its driver task
/// spawned on the current runtime.
pub(crate) async fn single(
    config: &tokio_postgres::Config,
    options: &PostgresOptions,
    target: &Target,
) -> Result<tokio_postgres::Client, PostgresError> {
    let (client, connection) = config
        .connect(tls(options.ca_file.as_deref())?)
        .await
        .map_err(|e| PostgresError::Backend(format!("connecting to {target}: {}", describe(&e))))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// An error with its chain of causes ("creating a connection: error
/// performing TLS handshake: invalid peer certificate: UnknownIssuer"):
/// the pool's and the driver's own `Display` stop at the first level.
/// Causes name hosts and reasons, never the URL or its password.
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
