//! `vaultgate`: serve the proxy and manage keys (README.md#managing-keys).
//!
//! Data goes to stdout, status to stderr. Exit codes: 0 success, 1 runtime
//! failure, 2 bad usage or bad input. Secrets are read from stdin or an
//! environment variable, never from argv.

mod app;
mod commands;
mod config;
mod manage;
mod migrate;
mod output;
mod remote;
mod replicas;
mod request;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::UsageError;

/// vaultgate — a vault and proxy for LLM API keys.
#[derive(Debug, Parser)]
#[command(name = "vaultgate", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// The data directory (database, master key, audit log).
    #[arg(long, global = true, env = "VAULTGATE_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// A vaultgate.toml configuration file.
    #[arg(long, global = true, env = "VAULTGATE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Talk to a running server instead of the data directory (the admin key
    /// comes from VAULTGATE_ADMIN_KEY).
    #[arg(long, global = true, env = "VAULTGATE_URL")]
    pub(crate) url: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// For people.
    Text,
    /// One JSON document.
    Json,
    /// `export VAULTGATE_KEY=...` lines, for CI jobs.
    Env,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the proxy and management API.
    Serve {
        /// Address to listen on (default from config, else 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Initialise the data directory and print an admin key and a test key.
    Init,
    /// Virtual keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Provider keys (the real upstream credentials).
    #[command(subcommand, name = "provider-keys")]
    ProviderKeys(ProviderKeysCommand),
    /// Usage records and totals.
    Usage {
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
        /// Only this project (an organisation-wide key's or the operator's
        /// choice; a project's key may name only its own).
        #[arg(long)]
        project: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The master key.
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Create or upgrade the PostgreSQL schema; with --from, copy an SQLite
    /// install into it and verify the copy.
    Migrate(migrate::MigrateArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; the key is shown once.
    Create(CreateArgs),
    /// List keys (never the keys themselves).
    List,
    /// Show one key.
    Show {
        /// Key id (key_…).
        id: String,
    },
    /// Revoke a key and its descendants.
    Revoke {
        /// Key id (key_…).
        id: String,
    },
    /// Give a key a new secret; the old one works for the grace period.
    Rotate {
        /// Key id (key_…).
        id: String,
        /// Grace period for the old secret, e.g. 60s.
        #[arg(long)]
        grace: Option<String>,
    },
}

/// Flags of `keys create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// A name for the key.
    #[arg(long)]
    name: Option<String>,
    /// A policy file (agent.policy.yaml).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Scopes, e.g. chat:write,usage:read.
    #[arg(long, value_delimiter = ',')]
    scopes: Vec<String>,
    /// A plan: free, pro, enterprise or one from config.
    #[arg(long)]
    plan: Option<String>,
    /// Time to live, e.g. 1h.
    #[arg(long)]
    ttl: Option<String>,
    /// Budget in USD.
    #[arg(long)]
    budget_usd: Option<f64>,
    /// Make a test key (answered by the mock provider).
    #[arg(long)]
    test: bool,
    /// The project; `*` makes an organisation-wide key, which manages and
    /// reads every project (only the operator or another such key may).
    #[arg(long)]
    project: Option<String>,
    /// Parent key id, for a sub-agent key.
    #[arg(long)]
    parent: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProviderKeysCommand {
    /// Store a provider key, read from stdin or --from-env.
    Add {
        /// The provider: openai, anthropic, google, mistral, groq, deepseek,
        /// cohere, xai, perplexity, bielik.
        #[arg(long)]
        provider: String,
        /// A name for it.
        #[arg(long, default_value = "")]
        name: String,
        /// Read the key from this environment variable instead of stdin.
        #[arg(long)]
        from_env: Option<String>,
        /// The project.
        #[arg(long)]
        project: Option<String>,
        /// Refused: secrets never go on the command line.
        #[arg(long, hide = true)]
        api_key: Option<String>,
        /// Refused: secrets never go on the command line.
        #[arg(hide = true)]
        secret: Option<String>,
    },
    /// List provider keys (hints only).
    List,
    /// Remove a provider key.
    Remove {
        /// Provider key id (pk_…).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// The last entries: as text one per line, oldest first; with
    /// `--output json`, as `GET /v1/audit` answers (newest first).
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Only entries about this project.
        #[arg(long)]
        project: Option<String>,
    },
    /// Check the hash chain; names the first bad entry.
    Verify,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MasterKeyCommand {
    /// Re-wrap every provider key under the current master key
    /// (VAULTGATE_MASTER_KEY), opening with VAULTGATE_PREVIOUS_MASTER_KEY.
    /// Resumable: run it again after a crash.
    Rotate,
}

fn main() -> ExitCode {
    // A panic's message may quote data it was handling; print where it
    // happened, never what it said.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!("vaultgate: internal error (panic){at}; the message is withheld");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vaultgate: {}", usage_error_line(&e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The blocking pool runs SQLite calls (one writer, a few readers)
        // and audit appends: more threads than that only wait on the same
        // locks, each with its own stack and malloc arena (tokio's default
        // is 512; under load serve grew to ~60 threads).
        .max_blocking_threads(16)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vaultgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let code = if e.downcast_ref::<UsageError>().is_some() {
                2
            } else {
                1
            };
            eprintln!("vaultgate: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

/// A command-line parsing error as one sentence, exit code 2
/// (docs/configuration.md#errors-in-the-file). clap's own message quotes the
/// offending argument, which may be a secret typed in the wrong place
/// (`provider-keys add --provider openai sk-… sk-…`), so a quoted value that
/// is not a flag name is replaced.
fn usage_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned();
    let first = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) if !is_flag_name(arg) => {
            first.replace(arg.as_str(), "<value not shown>")
        }
        _ => first,
    };
    format!("{first}; see 'vaultgate --help'")
}

/// `--name` or `-n`, without an `=value`.
fn is_flag_name(arg: &str) -> bool {
    arg.starts_with('-')
        && !arg.contains('=')
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
