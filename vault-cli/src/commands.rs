//! Each verb, in direct mode (the data directory) or remote mode (`--url`).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow};
use http::Method;
use serde_json::{Value, json};
use vault_core::crypto::{ProviderSecret, rotate_master_key};
use vault_core::key::{KeyEnv, KeyId, ProviderKeyId};
use vault_core::policy::{Budget, BudgetPeriod, load_policy_file};
use vault_core::record::UsageFilter;
use vault_tower::admin::{Actor, AdminOptions, NewKey, admin_router, views};
use vault_tower::{Forwarder, VaultLayer};

use crate::app::{self, Opened, UsageError};
use crate::output;
use crate::remote::Remote;
use crate::{
    AuditCommand, Cli, Command, CreateArgs, KeysCommand, MasterKeyCommand, Output,
    ProviderKeysCommand,
};

/// Runs the parsed command.
pub(crate) async fn run(cli: Cli) -> Result<ExitCode> {
    let config = app::load_config(cli.config.as_deref())?;
    init_logging(config.log_format);
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.clone());
    let format = cli.output;
    // A secret on the command line is refused before anything is opened or
    // created (docs/threat-model.md, C7): a usage error has no side effects.
    if let Command::ProviderKeys(ProviderKeysCommand::Add {
        api_key, secret, ..
    }) = &cli.command
    {
        refuse_argv_secret(api_key.is_some() || secret.is_some())?;
    }
    if let Some(url) = cli.url.as_deref() {
        return remote(Remote::new(url)?, cli.command, format).await;
    }
    match cli.command {
        Command::Serve { listen } => serve(config, data_dir, listen).await,
        Command::Init => {
            let opened = app::open(config, data_dir).await?;
            first_start(&opened, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify) => audit_verify(&data_dir),
        other => {
            let opened = app::open(config, data_dir).await?;
            let code = direct(&opened, other, format).await;
            opened.ctx.flush().await;
            code
        }
    }
}

fn init_logging(format: vault_core::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VAULTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file get in the way
    // of every grep, leak sweeps included.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        vault_core::config::LogFormat::Json => builder.json().try_init(),
        vault_core::config::LogFormat::Text => builder.try_init(),
    };
}

/// On a fresh data directory: an admin key and a test key, printed once.
async fn first_start(opened: &Opened, format: Output) -> Result<()> {
    let keys = opened
        .ctx
        .store()
        .list_keys(None)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if !keys.is_empty() {
        eprintln!(
            "vaultgate: {} is already initialised",
            opened.data_dir.display()
        );
        return Ok(());
    }
    let admin = opened
        .admin
        .create_key(
            &Actor::Operator,
            NewKey {
                name: "admin".to_owned(),
                scopes: vec!["*".to_owned()],
                ..NewKey::default()
            },
        )
        .await?;
    let test = opened
        .admin
        .create_key(
            &Actor::Operator,
            NewKey {
                name: "test".to_owned(),
                scopes: vec!["chat:write".to_owned(), "usage:read".to_owned()],
                env: Some(KeyEnv::Test),
                plan: Some("free".to_owned()),
                ..NewKey::default()
            },
        )
        .await?;
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
                "vaultgate: initialised {}; these keys are shown once, store them now",
                opened.data_dir.display()
            );
        }
    }
    Ok(())
}

async fn serve(
    config: vault_core::config::Config,
    data_dir: PathBuf,
    listen: Option<String>,
) -> Result<ExitCode> {
    let listen = listen.unwrap_or_else(|| config.listen.clone());
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        UsageError(format!(
            "--listen {listen:?}: expected an address like 127.0.0.1:8080"
        ))
    })?;
    let opened = app::open_serving(config, data_dir).await?;
    if opened.fresh {
        first_start(&opened, Output::Text).await?;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
    let router = admin_router(
        opened.admin.clone(),
        AdminOptions {
            protect_metrics: opened.config.protect_metrics,
        },
    )
    .fallback_service(
        tower::ServiceBuilder::new()
            .layer(VaultLayer::new(opened.ctx.clone()))
            .service(Forwarder::new(vault_tower::Timeouts {
                connect: opened.config.upstream.connect_timeout,
                response: opened.config.upstream.response_timeout,
                idle: opened.config.upstream.idle_timeout,
            })),
    );
    let maintenance = opened.ctx.start_maintenance();
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
    let path = data_dir.join("audit.jsonl");
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

fn key_id(s: &str) -> Result<KeyId> {
    KeyId::parse(s).ok_or_else(|| UsageError(format!("{s:?} is not a key id (key_…)")).into())
}

fn read_secret(from_env: Option<&str>) -> Result<ProviderSecret> {
    let raw = match from_env {
        Some(var) => std::env::var(var)
            .map_err(|_| UsageError(format!("--from-env {var}: the variable is not set")))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut s)
                .map_err(|_| {
                    UsageError("the provider key on stdin is not UTF-8 text".to_owned())
                })?;
            s
        }
    };
    let secret = ProviderSecret::new(raw);
    if secret.expose_secret().is_empty() {
        return Err(UsageError(
            "no provider key given: pipe it on stdin or use --from-env VAR".to_owned(),
        )
        .into());
    }
    Ok(secret)
}

/// The body of a create request, from flags and an optional policy file.
fn new_key_body(args: CreateArgs) -> Result<(NewKey, Value)> {
    let CreateArgs {
        name,
        policy,
        scopes,
        plan,
        ttl,
        budget_usd,
        test,
        project,
        parent,
    } = args;
    let mut new = NewKey::default();
    if let Some(path) = policy {
        let file = load_policy_file(&path).map_err(|e| UsageError(e.to_string()))?;
        new.name = file.name.unwrap_or_default();
        new.ttl = file.ttl;
        new.scopes = file
            .scopes
            .map(|s| s.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default();
        new.plan = file.plan;
        new.policy = file.policy;
    }
    if let Some(n) = name {
        new.name = n;
    }
    if !scopes.is_empty() {
        new.scopes = scopes;
    }
    if plan.is_some() {
        new.plan = plan;
    }
    if let Some(t) = ttl {
        new.ttl =
            Some(vault_core::policy::parse_ttl(&t).map_err(|e| UsageError(format!("--ttl: {e}")))?);
    }
    if let Some(usd) = budget_usd {
        let limit = vault_core::money::Micros::from_usd(usd)
            .map_err(|e| UsageError(format!("--budget-usd: {e}")))?;
        new.policy.budget = Some(Budget {
            limit,
            period: BudgetPeriod::Total,
            clamp_explicit_limits: false,
        });
    }
    if test {
        new.env = Some(KeyEnv::Test);
    }
    new.project = project;
    if let Some(p) = parent {
        new.parent = Some(key_id(&p)?);
    }
    // The same request as JSON, for remote mode.
    let mut body = serde_json::to_value(&new.policy).unwrap_or_else(|_| json!({}));
    body["name"] = json!(new.name);
    if !new.scopes.is_empty() {
        body["permissions"] = json!(new.scopes);
    }
    if let Some(p) = &new.plan {
        body["plan"] = json!(p);
    }
    if let Some(t) = new.ttl {
        body["ttl"] = json!(format!("{}s", t.as_secs()));
    }
    if let Some(e) = new.env {
        body["env"] = json!(e.as_str());
    }
    if let Some(p) = &new.project {
        body["project"] = json!(p);
    }
    if let Some(p) = &new.parent {
        body["parent"] = json!(p);
    }
    Ok((new, body))
}

async fn direct(opened: &Opened, command: Command, format: Output) -> Result<ExitCode> {
    let admin = &opened.admin;
    let me = Actor::Operator;
    let now = opened.ctx.clock().now();
    match command {
        Command::Keys(KeysCommand::Create(args)) => {
            let (new, _) = new_key_body(args)?;
            let issued = admin.create_key(&me, new).await?;
            let mut v = views::key(&issued.record, now);
            v["key"] = json!(issued.key.expose_secret());
            output::issued_key(format, &v);
        }
        Command::Keys(KeysCommand::List) => {
            let keys = admin.list_keys(&me).await?;
            let v = json!({"data": keys.iter().map(|k| views::key(k, now)).collect::<Vec<_>>()});
            output::value(format, &v, output::keys_text)?;
        }
        Command::Keys(KeysCommand::Show { id }) => {
            let k = admin.get_key(&me, &key_id(&id)?).await?;
            output::value(format, &views::key(&k, now), output::key_text)?;
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            let revoked = admin.revoke_key(&me, &key_id(&id)?).await?;
            let v = json!({"id": id, "status": "revoked", "revoked": revoked});
            output::value(format, &v, |_| {
                format!(
                    "revoked {id} and {} descendant(s)\n",
                    revoked.len().saturating_sub(1)
                )
            })?;
        }
        Command::Keys(KeysCommand::Rotate { id, grace }) => {
            let grace = grace
                .map(|g| {
                    vault_core::policy::parse_ttl(&g)
                        .map_err(|e| UsageError(format!("--grace: {e}")))
                })
                .transpose()?;
            let issued = admin.rotate_key(&me, &key_id(&id)?, grace).await?;
            let mut v = views::key(&issued.record, now);
            v["key"] = json!(issued.key.expose_secret());
            output::issued_key(format, &v);
        }
        Command::ProviderKeys(ProviderKeysCommand::Add {
            provider,
            name,
            from_env,
            project,
            api_key,
            secret,
        }) => {
            refuse_argv_secret(api_key.is_some() || secret.is_some())?;
            let provider =
                provider
                    .parse()
                    .map_err(|e: vault_core::provider::UnknownProvider| {
                        UsageError(format!("--provider: {e}"))
                    })?;
            let secret = read_secret(from_env.as_deref())?;
            let rec = admin
                .add_provider_key(&me, provider, name, project, secret)
                .await?;
            output::value(format, &views::provider_key(&rec), |v| {
                format!(
                    "added {} ({} {})\n",
                    v["id"].as_str().unwrap_or_default(),
                    v["provider"].as_str().unwrap_or_default(),
                    v["hint"].as_str().unwrap_or_default()
                )
            })?;
        }
        Command::ProviderKeys(ProviderKeysCommand::List) => {
            let list = admin.list_provider_keys(&me).await?;
            let v = json!({"data": list.iter().map(views::provider_key).collect::<Vec<_>>()});
            output::value(format, &v, output::provider_keys_text)?;
        }
        Command::ProviderKeys(ProviderKeysCommand::Remove { id }) => {
            let pk = ProviderKeyId::parse(&id)
                .ok_or_else(|| UsageError(format!("{id:?} is not a provider key id (pk_…)")))?;
            admin.remove_provider_key(&me, &pk).await?;
            output::value(format, &json!({"id": id, "deleted": true}), |_| {
                format!("removed {id}\n")
            })?;
        }
        Command::Usage { key, limit } => {
            let filter = UsageFilter {
                key_id: key.as_deref().map(key_id).transpose()?,
                limit: Some(limit),
                ..UsageFilter::default()
            };
            let records = admin.usage(&me, filter).await?;
            output::value(format, &views::usage(&records), output::usage_text)?;
        }
        Command::Audit(AuditCommand::Tail { lines }) => {
            let entries = vault_core::audit::tail(&opened.data_dir.join("audit.jsonl"), lines)
                .map_err(|e| anyhow!("{e}"))?;
            output::value(format, &json!({"data": entries}), output::lines_text)?;
        }
        Command::MasterKey(MasterKeyCommand::Rotate) => {
            let report =
                rotate_master_key(opened.ctx.store().as_ref(), opened.ctx.encryptor().as_ref())
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            output::value(
                format,
                &json!({"rewrapped": report.rewrapped, "already_current": report.already_current}),
                |v| {
                    format!(
                        "re-wrapped {} provider key(s); {} already current\n",
                        v["rewrapped"], v["already_current"]
                    )
                },
            )?;
        }
        Command::Serve { .. } | Command::Init | Command::Audit(AuditCommand::Verify) => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn refuse_argv_secret(given: bool) -> Result<()> {
    if given {
        return Err(UsageError(
            "provider keys are never taken from the command line; pipe the key on stdin or use --from-env VAR".to_owned(),
        )
        .into());
    }
    Ok(())
}

async fn remote(r: Remote, command: Command, format: Output) -> Result<ExitCode> {
    match command {
        Command::Keys(KeysCommand::Create(args)) => {
            let (_, body) = new_key_body(args)?;
            let v = r.call(Method::POST, "/v1/keys", Some(body)).await?;
            output::issued_key(format, &v);
        }
        Command::Keys(KeysCommand::List) => output::value(
            format,
            &r.call(Method::GET, "/v1/keys", None).await?,
            output::keys_text,
        )?,
        Command::Keys(KeysCommand::Show { id }) => {
            output::value(
                format,
                &r.call(Method::GET, &format!("/v1/keys/{}", key_id(&id)?), None)
                    .await?,
                output::key_text,
            )?;
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            let v = r
                .call(Method::DELETE, &format!("/v1/keys/{}", key_id(&id)?), None)
                .await?;
            output::value(format, &v, |_| format!("revoked {id}\n"))?;
        }
        Command::Keys(KeysCommand::Rotate { id, grace }) => {
            let body = grace.map(|g| json!({"grace": g}));
            let v = r
                .call(
                    Method::POST,
                    &format!("/v1/keys/{}/rotate", key_id(&id)?),
                    body,
                )
                .await?;
            output::issued_key(format, &v);
        }
        Command::ProviderKeys(ProviderKeysCommand::Add {
            provider,
            name,
            from_env,
            project,
            api_key,
            secret,
        }) => {
            refuse_argv_secret(api_key.is_some() || secret.is_some())?;
            let secret = read_secret(from_env.as_deref())?;
            let mut body =
                json!({"provider": provider, "api_key": secret.expose_secret(), "name": name});
            if let Some(p) = project {
                body["project"] = json!(p);
            }
            let v = r
                .call(Method::POST, "/v1/provider-keys", Some(body))
                .await?;
            output::value(format, &v, |v| {
                format!(
                    "added {} ({})\n",
                    v["id"].as_str().unwrap_or_default(),
                    v["hint"].as_str().unwrap_or_default()
                )
            })?;
        }
        Command::ProviderKeys(ProviderKeysCommand::List) => {
            output::value(
                format,
                &r.call(Method::GET, "/v1/provider-keys", None).await?,
                output::provider_keys_text,
            )?;
        }
        Command::ProviderKeys(ProviderKeysCommand::Remove { id }) => {
            let v = r
                .call(Method::DELETE, &format!("/v1/provider-keys/{id}"), None)
                .await?;
            output::value(format, &v, |_| format!("removed {id}\n"))?;
        }
        Command::Usage { key, limit } => {
            let mut path = format!("/v1/usage?limit={limit}");
            if let Some(k) = key {
                path.push_str(&format!("&key_id={}", key_id(&k)?));
            }
            output::value(
                format,
                &r.call(Method::GET, &path, None).await?,
                output::usage_text,
            )?;
        }
        Command::Audit(AuditCommand::Tail { lines }) => {
            output::value(
                format,
                &r.call(Method::GET, &format!("/v1/audit?limit={lines}"), None)
                    .await?,
                output::lines_text,
            )?;
        }
        Command::Serve { .. }
        | Command::Init
        | Command::Audit(AuditCommand::Verify)
        | Command::MasterKey(_) => {
            return Err(UsageError(
                "this command works on the data directory; drop --url".to_owned(),
            )
            .into());
        }
    }
    Ok(ExitCode::SUCCESS)
}
