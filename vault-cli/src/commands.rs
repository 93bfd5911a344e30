//! Each command: `serve`, `init`, `audit verify` and `master-key rotate` on
//! the data directory; every management verb through one
//! [`Management`](crate::manage::Management) implementation, direct (the
//! data directory) or remote (`--url`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde_json::json;
use vault_core::crypto::rotate_master_key;
use vault_core::key::KeyEnv;
use vault_core::manage::wire::CreateKeyRequest;
use vault_core::manage::{Actor, Manager};
use vault_tower::admin::{AdminOptions, admin_router};
use vault_tower::ui::{UiOptions, ui_router};
use vault_tower::{Forwarder, VaultLayer};

use crate::app::{self, UsageError};
use crate::config::{BinaryConfig, LogFormat};
use crate::manage::{self, Direct};
use crate::remote::Remote;
use crate::request::refuse_argv_secret;
use crate::{AuditCommand, Cli, Command, MasterKeyCommand, Output, ProviderKeysCommand};

/// Runs the parsed command.
pub(crate) async fn run(cli: Cli) -> Result<ExitCode> {
    let file = app::load_config(cli.config.as_deref())?;
    init_logging(file.log_format);
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| file.data_dir.clone());
    let listen_default = file.listen.clone();
    let format = cli.output;
    // A secret on the command line is refused before anything is opened or
    // created (docs/threat-model.md, C7): a usage error has no side effects.
    if let Command::ProviderKeys(ProviderKeysCommand::Add {
        api_key, secret, ..
    }) = &cli.command
    {
        refuse_argv_secret(api_key.is_some() || secret.is_some())?;
    }
    if let Command::Migrate(args) = cli.command {
        return crate::migrate::run(args, file.postgres.as_ref()).await;
    }
    if let Some(url) = cli.url.as_deref() {
        return manage::run(&Remote::new(url)?, cli.command, format).await;
    }
    match cli.command {
        Command::Serve { listen } => serve(file, data_dir, listen.unwrap_or(listen_default)).await,
        Command::Init => {
            let opened = app::open(file, data_dir).await?;
            first_start(&opened.manager(), &opened.location, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify) => match &file.postgres {
            Some(settings) => audit_verify_postgres(settings).await,
            None => audit_verify(&data_dir),
        },
        Command::MasterKey(MasterKeyCommand::Rotate) => {
            let opened = app::open(file, data_dir).await?;
            master_key_rotate(&opened, format).await
        }
        other => {
            let opened = app::open(file, data_dir).await?;
            let result = manage::run(&Direct::new(opened.manager()), other, format).await;
            // Revocations reach the other replicas before the process exits.
            opened.finish().await;
            result
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VAULTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file get in the way
    // of every grep, leak sweeps included.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// On a fresh store: an admin key and a test key, printed once.
/// `location` names the store (the data directory or the database).
async fn first_start(manager: &Manager, location: &str, format: Output) -> Result<()> {
    let me = Actor::Operator;
    let keys = manager.list_keys(&me).await.map_err(|e| anyhow!("{e}"))?;
    if !keys.data.is_empty() {
        eprintln!("vaultgate: {location} is already initialised");
        return Ok(());
    }
    let admin = manager
        .create_key(
            &me,
            CreateKeyRequest {
                name: Some("admin".to_owned()),
                permissions: Some(vec!["*".to_owned()]),
                ..CreateKeyRequest::default()
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let test = manager
        .create_key(
            &me,
            CreateKeyRequest {
                name: Some("test".to_owned()),
                permissions: Some(vec!["chat:write".to_owned(), "usage:read".to_owned()]),
                env: Some(KeyEnv::Test),
                plan: Some("free".to_owned()),
                ..CreateKeyRequest::default()
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    match format {
        Output::Json => println!(
            "{}",
            json!({"admin_key": admin.key.expose_secret(), "test_key": test.key.expose_secret()})
        ),
        Output::Env => {
            println!("export VAULTGATE_ADMIN_KEY={}", admin.key.expose_secret());
            println!("export VAULTGATE_TEST_KEY={}", test.key.expose_secret());
        }
        Output::Text => {
            println!("admin key: {}", admin.key.expose_secret());
            println!("test key:  {}", test.key.expose_secret());
            eprintln!(
                "vaultgate: initialised {location}; these keys are shown once, store them now"
            );
        }
    }
    Ok(())
}

async fn serve(file: BinaryConfig, data_dir: PathBuf, listen: String) -> Result<ExitCode> {
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        UsageError(format!(
            "--listen {listen:?}: expected an address like 127.0.0.1:8080"
        ))
    })?;
    let ui = file.ui.clone();
    let opened = app::open_serving(file, data_dir).await?;
    let serving = app::serving(&opened)?;
    if opened.fresh {
        first_start(serving.admin.manager(), &opened.location, Output::Text).await?;
    }
    if let Some(redis) = &opened.redis {
        redis.check().await;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
    let mut router = admin_router(
        serving.admin.clone(),
        AdminOptions {
            protect_metrics: opened.config.protect_metrics,
        },
    );
    // The dashboard (docs/dashboard.md): `/` and `/ui/…`; without it those
    // paths fall through to the proxy like any other.
    if ui.enabled {
        router = router.merge(ui_router(
            serving.admin.clone(),
            UiOptions {
                origin: ui.origin,
                sessions: Some(opened.sessions.clone()),
            },
        ));
    }
    let router = router.fallback_service(
        tower::ServiceBuilder::new()
            .layer(VaultLayer::new(serving.ctx.clone()))
            .service(Forwarder::new(vault_tower::Timeouts {
                connect: opened.config.upstream.connect_timeout,
                response: opened.config.upstream.response_timeout,
                idle: opened.config.upstream.idle_timeout,
            })),
    );
    let maintenance = serving.ctx.start_maintenance();
    tracing::info!(%addr, data_dir = %opened.data_dir.display(), "vaultgate is listening");
    eprintln!(
        "vaultgate: listening on http://{}",
        listener.local_addr().unwrap_or(addr)
    );
    vault_tower::server::serve(listener, router, shutdown_signal(), Duration::from_secs(30))
        .await?;
    // Every call has finished: write what is queued, give the leases back.
    maintenance.shutdown().await;
    tracing::info!("usage flushed; bye");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn audit_verify(data_dir: &std::path::Path) -> Result<ExitCode> {
    let path = app::audit_file(data_dir);
    match vault_core::audit::verify(&path) {
        Ok(report) => {
            println!("ok: {} entries, chain intact", report.entries);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("vaultgate: {}: {e}", path.display());
            Ok(ExitCode::from(1))
        }
    }
}

/// `audit verify` on the chain the replicas share in PostgreSQL
/// (docs/replicas.md#the-audit-chain). Messages name the database, never
/// the URL.
async fn audit_verify_postgres(settings: &crate::config::PostgresSettings) -> Result<ExitCode> {
    use vault_core::audit::AuditTrail as _;
    let store = crate::replicas::connect_postgres(settings).await?;
    let target = store.to_string();
    match vault_postgres::PostgresAudit::new(&store).verify().await {
        Ok(report) => {
            println!("ok: {} entries, chain intact", report.entries);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("vaultgate: {target}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// `master-key rotate`: re-wraps every provider key under the current
/// master key (docs/configuration.md).
async fn master_key_rotate(opened: &app::Opened, format: Output) -> Result<ExitCode> {
    if format == Output::Env {
        return Err(
            UsageError("--output env is only for keys create and keys rotate".to_owned()).into(),
        );
    }
    let report = rotate_master_key(opened.store.as_ref(), opened.encryptor.as_ref())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    match format {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"rewrapped": report.rewrapped, "already_current": report.already_current})
            )
            .unwrap_or_default()
        ),
        _ => println!(
            "re-wrapped {} provider key(s); {} already current",
            report.rewrapped, report.already_current
        ),
    }
    Ok(ExitCode::SUCCESS)
}
