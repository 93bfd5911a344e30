//! One trait for every management verb, with two implementations: direct
//! (a [`Manager`] on the data directory, as the operator) and remote (the
//! HTTP API of a running server, [`crate::remote::Remote`]). Both take and
//! return the same `vault_core::manage::wire` types, and [`run`] prints
//! each answer with one function per type, so the two modes print the same
//! thing (docs/api.md is the contract of both).

use std::process::ExitCode;

use anyhow::Result;
use vault_core::key::{KeyId, ProviderKeyId};
use vault_core::manage::wire::{
    AddProviderKeyRequest, AuditList, AuditQuery, CreateKeyRequest, IssuedKey, KeyView, List,
    ProviderKeyView, RemovedProviderKey, RevokedKey, RotateKeyRequest, UsageList, UsageQuery,
};
use vault_core::manage::{Actor, ManageError, Manager};

use crate::app::UsageError;
use crate::{AuditCommand, Command, KeysCommand, Output, ProviderKeysCommand, output, request};

/// The management operations of docs/api.md, as the CLI calls them.
pub(crate) trait Management {
    /// `POST /v1/keys`.
    async fn create_key(&self, req: CreateKeyRequest) -> Result<IssuedKey>;
    /// `GET /v1/keys`.
    async fn list_keys(&self) -> Result<List<KeyView>>;
    /// `GET /v1/keys/{id}`.
    async fn get_key(&self, id: &KeyId) -> Result<KeyView>;
    /// `DELETE /v1/keys/{id}`.
    async fn revoke_key(&self, id: &KeyId) -> Result<RevokedKey>;
    /// `POST /v1/keys/{id}/rotate`.
    async fn rotate_key(&self, id: &KeyId, req: RotateKeyRequest) -> Result<IssuedKey>;
    /// `POST /v1/provider-keys`.
    async fn add_provider_key(&self, req: AddProviderKeyRequest) -> Result<ProviderKeyView>;
    /// `GET /v1/provider-keys`.
    async fn list_provider_keys(&self) -> Result<List<ProviderKeyView>>;
    /// `DELETE /v1/provider-keys/{id}`.
    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<RemovedProviderKey>;
    /// `GET /v1/usage`.
    async fn usage(&self, q: UsageQuery) -> Result<UsageList>;
    /// `GET /v1/audit`.
    async fn audit(&self, q: AuditQuery) -> Result<AuditList>;
}

/// A refusal as the CLI reports it, the same in both modes: the message and
/// the status; a 4xx is the caller's fault (exit 2), anything else exit 1.
pub(crate) fn refused(status: u16, message: &str) -> anyhow::Error {
    let line = format!("{message} ({status})");
    if (400..500).contains(&status) {
        UsageError(line).into()
    } else {
        anyhow::anyhow!(line)
    }
}

fn direct_err(e: ManageError) -> anyhow::Error {
    refused(e.status(), &e.to_string())
}

/// Direct mode: the operator, on the data directory.
pub(crate) struct Direct {
    manager: Manager,
}

impl Direct {
    /// The operator's view through `manager`.
    pub(crate) fn new(manager: Manager) -> Direct {
        Direct { manager }
    }
}

const OPERATOR: Actor = Actor::Operator;

impl Management for Direct {
    async fn create_key(&self, req: CreateKeyRequest) -> Result<IssuedKey> {
        self.manager
            .create_key(&OPERATOR, req)
            .await
            .map_err(direct_err)
    }

    async fn list_keys(&self) -> Result<List<KeyView>> {
        self.manager.list_keys(&OPERATOR).await.map_err(direct_err)
    }

    async fn get_key(&self, id: &KeyId) -> Result<KeyView> {
        self.manager
            .get_key(&OPERATOR, id)
            .await
            .map_err(direct_err)
    }

    async fn revoke_key(&self, id: &KeyId) -> Result<RevokedKey> {
        self.manager
            .revoke_key(&OPERATOR, id)
            .await
            .map_err(direct_err)
    }

    async fn rotate_key(&self, id: &KeyId, req: RotateKeyRequest) -> Result<IssuedKey> {
        self.manager
            .rotate_key(&OPERATOR, id, req)
            .await
            .map_err(direct_err)
    }

    async fn add_provider_key(&self, req: AddProviderKeyRequest) -> Result<ProviderKeyView> {
        self.manager
            .add_provider_key(&OPERATOR, req)
            .await
            .map_err(direct_err)
    }

    async fn list_provider_keys(&self) -> Result<List<ProviderKeyView>> {
        self.manager
            .list_provider_keys(&OPERATOR)
            .await
            .map_err(direct_err)
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<RemovedProviderKey> {
        self.manager
            .remove_provider_key(&OPERATOR, id)
            .await
            .map_err(direct_err)
    }

    async fn usage(&self, q: UsageQuery) -> Result<UsageList> {
        self.manager.usage(&OPERATOR, q).await.map_err(direct_err)
    }

    async fn audit(&self, q: AuditQuery) -> Result<AuditList> {
        self.manager
            .audit_entries(&OPERATOR, q)
            .await
            .map_err(direct_err)
    }
}

/// Runs one management verb through `m` and prints the answer. Everything
/// the arguments can get wrong is found before anything is sent or changed.
pub(crate) async fn run(m: &impl Management, command: Command, format: Output) -> Result<ExitCode> {
    let issues_key = matches!(
        command,
        Command::Keys(KeysCommand::Create(_) | KeysCommand::Rotate { .. })
    );
    if format == Output::Env && !issues_key {
        return Err(
            UsageError("--output env is only for keys create and keys rotate".to_owned()).into(),
        );
    }
    match command {
        Command::Keys(KeysCommand::Create(args)) => {
            let req = request::create_key(args)?;
            output::issued_key(format, &m.create_key(req).await?);
        }
        Command::Keys(KeysCommand::List) => output::key_list(format, &m.list_keys().await?),
        Command::Keys(KeysCommand::Show { id }) => {
            output::key(format, &m.get_key(&request::key_id(&id)?).await?);
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            output::revoked(format, &m.revoke_key(&request::key_id(&id)?).await?);
        }
        Command::Keys(KeysCommand::Rotate { id, grace }) => {
            let id = request::key_id(&id)?;
            let req = request::rotate_key(grace.as_deref())?;
            output::issued_key(format, &m.rotate_key(&id, req).await?);
        }
        Command::ProviderKeys(ProviderKeysCommand::Add {
            provider,
            name,
            from_env,
            project,
            api_key,
            secret,
        }) => {
            request::refuse_argv_secret(api_key.is_some() || secret.is_some())?;
            let req = request::add_provider_key(&provider, name, from_env.as_deref(), project)?;
            output::provider_key(format, &m.add_provider_key(req).await?);
        }
        Command::ProviderKeys(ProviderKeysCommand::List) => {
            output::provider_key_list(format, &m.list_provider_keys().await?);
        }
        Command::ProviderKeys(ProviderKeysCommand::Remove { id }) => {
            let id = request::provider_key_id(&id)?;
            output::removed_provider_key(format, &m.remove_provider_key(&id).await?);
        }
        Command::Usage {
            key,
            project,
            limit,
        } => {
            let q = UsageQuery {
                key_id: key.as_deref().map(request::key_id).transpose()?,
                project,
                limit: Some(limit),
                ..UsageQuery::default()
            };
            output::usage(format, &m.usage(q).await?);
        }
        Command::Audit(AuditCommand::Tail { lines, project }) => {
            let q = AuditQuery {
                limit: Some(lines),
                project,
            };
            output::audit(format, &m.audit(q).await?);
        }
        Command::Serve { .. }
        | Command::Init
        | Command::Audit(AuditCommand::Verify)
        | Command::MasterKey(_)
        | Command::Migrate(_) => {
            return Err(UsageError(
                "this command works on the data directory; drop --url".to_owned(),
            )
            .into());
        }
    }
    Ok(ExitCode::SUCCESS)
}
