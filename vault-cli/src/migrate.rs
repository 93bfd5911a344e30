//! `vaultgate migrate`: create or upgrade the PostgreSQL schema, and with
//! `--from DIR` copy an SQLite install into it and verify the copy
//! (docs/replicas.md#moving-an-install-to-postgresql).
//!
//! The database URL may hold a password: it is only ever printed in its
//! redacted form (user, hosts, database), and read from the environment
//! unless given with `--to`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use secrecy::ExposeSecret as _;
use vault_core::audit::{self, AuditTrail, VerifyReport};
use vault_core::store::copy::TableRows;
use vault_core::store::{DB_FILE_NAME, SqliteStore, recover_lease_journals};
use vault_postgres::{PostgresAudit, PostgresError, PostgresStore, SCHEMA_VERSION, TableImport};

use crate::app::{self, UsageError};
use crate::config::{DATABASE_URL_ENV, PostgresSettings};

/// Connections the copy uses.
const POOL: usize = 2;

/// Flags of `migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct MigrateArgs {
    /// The PostgreSQL URL (default: VAULTGATE_DATABASE_URL, the better
    /// place for one holding a password: argv is visible to every user).
    #[arg(long, value_name = "URL")]
    to: Option<String>,
    /// An SQLite data directory to copy into the database (e.g. .vaultgate).
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
}

/// The database to migrate: `--to`, else the configured store
/// (`VAULTGATE_DATABASE_URL`, else `[store] url`).
fn database_url(flag: Option<String>, configured: Option<&PostgresSettings>) -> Option<String> {
    flag.filter(|u| !u.trim().is_empty())
        .or_else(|| configured.map(|p| p.url.expose_secret().to_owned()))
}

/// A PostgreSQL error as a command error: a URL that does not parse or a
/// refused copy is the caller's input (exit 2), anything else a runtime
/// failure. Neither repeats the URL.
fn pg_error(e: PostgresError) -> anyhow::Error {
    match e {
        PostgresError::Url(_) | PostgresError::Conflict(_) => UsageError(e.to_string()).into(),
        other => anyhow!("{other}"),
    }
}

/// Runs `vaultgate migrate`.
pub(crate) async fn run(
    args: MigrateArgs,
    configured: Option<&PostgresSettings>,
) -> Result<ExitCode> {
    let url = database_url(args.to, configured).ok_or_else(|| {
        UsageError(format!(
            "no database to migrate: give --to URL, set {DATABASE_URL_ENV} or [store] url"
        ))
    })?;
    let target = vault_postgres::redacted(&url).map_err(pg_error)?;
    // Bad input is found before anything is written.
    if let Some(dir) = &args.from {
        check_install(dir)?;
    }
    let applied = PostgresStore::migrate(&url).await.map_err(pg_error)?;
    if applied.is_empty() {
        println!("{target}: schema already at version {SCHEMA_VERSION}; nothing to apply");
    } else {
        let list: Vec<String> = applied.iter().map(i32::to_string).collect();
        println!(
            "{target}: applied migration(s) {}; schema now at version {SCHEMA_VERSION}",
            list.join(", ")
        );
    }
    if let Some(dir) = &args.from {
        copy(dir, &url, &target).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `dir` is an SQLite install no server is running on.
fn check_install(dir: &Path) -> Result<()> {
    if !dir.join(DB_FILE_NAME).is_file() {
        return Err(UsageError(format!(
            "--from {}: not a vaultgate data directory (no {DB_FILE_NAME})",
            dir.display()
        ))
        .into());
    }
    if !app::audit_file(dir).is_file() {
        return Err(UsageError(format!(
            "--from {}: no audit.jsonl; a missing audit log is not copied as an empty one",
            dir.display()
        ))
        .into());
    }
    if let Some(journal) = live_journal(dir) {
        return Err(UsageError(format!(
            "--from {}: a vaultgate serve is running on it (its lease journal {} is locked); \
             stop it first",
            dir.display(),
            journal.display()
        ))
        .into());
    }
    Ok(())
}

/// A lease journal in `dir` that a live `vaultgate serve` holds locked
/// (vault-core's store/journal.rs: each server locks its own for its
/// life). Checked when the copy starts: do not start a server on `dir`
/// while it runs.
fn live_journal(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir.join(app::LEASE_JOURNAL_DIR)).ok()?;
    entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.extension().is_some_and(|x| x == "journal")
            && std::fs::File::open(p).is_ok_and(|f| f.try_lock().is_err())
    })
}

/// The lines of a verified audit file, without newlines.
fn audit_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// Copies the install at `dir` into the database at `url` (migrated), then
/// verifies the copy.
async fn copy(dir: &Path, url: &str, target: &str) -> Result<()> {
    let audit_path = app::audit_file(dir);
    let source_chain = audit::verify(&audit_path)
        .map_err(|e| anyhow!("the install's audit log does not verify, not copying it: {e}"))?;
    let sqlite = SqliteStore::open_in_dir(dir)
        .map_err(|e| anyhow!("cannot open the store in {}: {e}", dir.display()))?;
    // A dead server's leases are settled first, so spend is complete.
    recover_lease_journals(&sqlite, &dir.join(app::LEASE_JOURNAL_DIR))
        .await
        .map_err(|e| anyhow!("cannot settle a dead server's leases: {e}"))?;
    let tables = sqlite
        .export_tables()
        .await
        .map_err(|e| anyhow!("cannot read {}: {e}", dir.display()))?;
    let lines = audit_lines(&audit_path)?;

    let store = PostgresStore::connect(url, POOL).await.map_err(pg_error)?;
    let report = store.import_tables(&tables).await.map_err(pg_error)?;
    let trail = PostgresAudit::new(&store);
    let (copied, present) = trail.copy_chain(&lines).await.map_err(pg_error)?;
    println!(
        "copied {} from {} to {target}; audit chain: {copied} entries copied, {present} already there",
        summary(&report),
        dir.display()
    );

    let copied_chain = verify_copy(&store, &trail, &tables, &source_chain).await?;
    println!(
        "verified: {} tables, counts and checksums equal; audit chain intact in both ({} entries in the file, {} in the database)",
        tables.len(),
        source_chain.entries,
        copied_chain.entries
    );
    Ok(())
}

/// Every copied table reads back with the same rows, and the copied chain
/// verifies, holding the file's (the same last hash, or more entries
/// appended after an earlier copy, whose prefix `copy_chain` compared).
async fn verify_copy(
    store: &PostgresStore,
    trail: &PostgresAudit,
    tables: &[TableRows],
    source_chain: &VerifyReport,
) -> Result<VerifyReport> {
    check_tables(store, tables).await?;
    let copied = trail
        .verify()
        .await
        .map_err(|e| anyhow!("the copied audit chain does not verify: {e}"))?;
    let holds_the_file = copied.entries > source_chain.entries
        || (copied.entries == source_chain.entries && copied.last_hash == source_chain.last_hash);
    if !holds_the_file {
        return Err(anyhow!(
            "the copied audit chain ({} entries) does not end as the file's ({} entries)",
            copied.entries,
            source_chain.entries
        ));
    }
    Ok(copied)
}

/// "3 keys (1 already there), …".
fn summary(report: &[TableImport]) -> String {
    let parts: Vec<String> = report
        .iter()
        .map(|t| {
            let name = match t.table {
                "carve_outs" => "carve-outs".to_owned(),
                "usage" => "usage records".to_owned(),
                "meta" => "meta values".to_owned(),
                other => other.replace('_', " "),
            };
            if t.present > 0 {
                format!("{} {name} ({} already there)", t.copied, t.present)
            } else {
                format!("{} {name}", t.copied)
            }
        })
        .collect();
    parts.join(", ")
}

/// Every copied table reads back from the database with the same rows:
/// counts and checksums equal.
async fn check_tables(store: &PostgresStore, tables: &[TableRows]) -> Result<()> {
    for source in tables {
        let copied = store.rows_like(source).await.map_err(pg_error)?;
        if copied.rows.len() != source.rows.len() || copied.checksum() != source.checksum() {
            return Err(anyhow!(
                "the copy of {} does not match: {} rows in the install, {} in the database",
                source.spec.name,
                source.rows.len(),
                copied.rows.len()
            ));
        }
    }
    Ok(())
}
