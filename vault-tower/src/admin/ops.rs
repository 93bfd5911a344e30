//! Management operations, shared by the HTTP API and the CLI's direct mode.
//!
//! Every mutation is authorised, validated in full (nothing is created on any
//! error), written to the audit log and fsync'd *before* it is applied — if the
//! audit log cannot be written, the mutation fails (docs/threat-model.md, L2).

use std::sync::Arc;
use std::time::Duration;

use vault_core::audit::{AuditEvent, AuditFilter, AuditKind, read_entries};
use vault_core::clock::UnixMillis;
use vault_core::crypto::{Aad, ProviderSecret};
use vault_core::key::{KeyEnv, KeyId, ProviderKeyId, VirtualKey};
use vault_core::money::Micros;
use vault_core::policy::{BudgetPeriod, PlanSet, Policy, check_child_policy};
use vault_core::provider::Provider;
use vault_core::record::{
    BudgetLine, DEFAULT_PROJECT, KeyRecord, KeyStatus, ProviderKeyRecord, UsageFilter, UsageRecord,
};
use vault_core::scope::{Permission, Scopes};
use vault_core::store::StoreError;

use crate::context::VaultContext;

/// Why a management operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// 400: the request is malformed; names the field.
    #[error("{0}")]
    Invalid(String),
    /// 413: the request body is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 403: the caller lacks the scope or the subset rule; names the field.
    #[error("{0}")]
    Forbidden(String),
    /// 403: the object belongs to another project.
    #[error("API key does not have permission to access this project")]
    ProjectMismatch,
    /// 404: no such object visible to the caller.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 402: a child's budget does not fit in the parent's remaining budget.
    #[error("{0}")]
    Budget(String),
    /// 409: a conflicting object exists.
    #[error("{0}")]
    Conflict(String),
    /// 500: the audit log could not be written, so nothing was changed.
    #[error("the audit log could not be written; nothing was changed")]
    AuditUnavailable,
    /// 500: the store failed.
    #[error("internal error")]
    Internal,
}

impl AdminError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::Invalid(_) => 400,
            AdminError::TooLarge(_) => 413,
            AdminError::Forbidden(_) | AdminError::ProjectMismatch => 403,
            AdminError::NotFound(_) => 404,
            AdminError::Budget(_) => 402,
            AdminError::Conflict(_) => 409,
            AdminError::AuditUnavailable | AdminError::Internal => 500,
        }
    }

    /// The error code (docs/api.md#errors).
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Invalid(_) => "invalid_request",
            AdminError::TooLarge(_) => "request_too_large",
            AdminError::Forbidden(_) => "permission_denied",
            AdminError::ProjectMismatch => "project_mismatch",
            AdminError::NotFound(_) => "not_found",
            AdminError::Budget(_) => "budget_exceeded",
            AdminError::Conflict(_) => "conflict",
            AdminError::AuditUnavailable => "audit_unavailable",
            AdminError::Internal => "internal_error",
        }
    }
}

fn store_err(e: StoreError) -> AdminError {
    match e {
        StoreError::NotFound => AdminError::NotFound("key"),
        StoreError::Conflict => {
            AdminError::Conflict("an object with that id already exists".to_owned())
        }
        StoreError::BudgetExceeded { remaining } => AdminError::Budget(format!(
            "budget: the parent has only ${} left to carve out",
            remaining.to_usd_string()
        )),
        other => {
            tracing::error!(error = %other, "store failure in a management operation");
            AdminError::Internal
        }
    }
}

/// Who is asking: a virtual key, or the local operator (CLI on the data
/// directory), who may do anything.
#[derive(Debug, Clone)]
pub enum Actor {
    /// The holder of this key.
    Key(Arc<KeyRecord>),
    /// Whoever can read the data directory and master key.
    Operator,
}

impl Actor {
    fn id(&self) -> Option<String> {
        match self {
            Actor::Key(k) => Some(k.id.to_string()),
            Actor::Operator => Some("operator".to_owned()),
        }
    }

    fn project(&self) -> Option<&str> {
        match self {
            Actor::Key(k) => Some(&k.project),
            Actor::Operator => None,
        }
    }

    pub(crate) fn require(&self, perm: Permission) -> Result<(), AdminError> {
        match self {
            Actor::Key(k) if !k.scopes.allows(perm) => Err(AdminError::Forbidden(format!(
                "this key lacks the {} scope",
                perm.as_str()
            ))),
            _ => Ok(()),
        }
    }

    /// Whether the actor may see objects of `project`.
    fn sees(&self, project: &str) -> bool {
        self.project().is_none_or(|p| p == project)
    }
}

/// What a new key should be.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Human name.
    pub name: String,
    /// Project; the caller's when absent.
    pub project: Option<String>,
    /// Scopes as written; `chat:write` when empty.
    pub scopes: Vec<String>,
    /// `live` (default) or `test`.
    pub env: Option<KeyEnv>,
    /// A plan preset to start from.
    pub plan: Option<String>,
    /// Explicit policy fields (over the plan).
    pub policy: Policy,
    /// Time to live.
    pub ttl: Option<Duration>,
    /// The parent, for a sub-agent key.
    pub parent: Option<KeyId>,
    /// Provider keys the key may use; any of its project when empty.
    pub provider_keys: Vec<ProviderKeyId>,
}

/// A freshly made secret and its record. The secret is shown once.
#[derive(Debug)]
pub struct IssuedKey {
    /// The full key.
    pub key: VirtualKey,
    /// Its record.
    pub record: KeyRecord,
}

/// Which file a path names: device and inode on Unix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
}

#[cfg(unix)]
fn file_identity(path: &std::path::Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.is_file().then(|| FileIdentity {
        dev: m.dev(),
        ino: m.ino(),
    })
}

#[cfg(not(unix))]
fn file_identity(_path: &std::path::Path) -> Option<FileIdentity> {
    None
}

/// Management operations over a [`VaultContext`].
#[derive(Debug, Clone)]
pub struct Admin {
    ctx: Arc<VaultContext>,
    plans: Arc<PlanSet>,
    /// The audit file as it was when the log was opened. The log holds its
    /// file open, so if the path is removed or replaced (by a directory, say)
    /// appends would still succeed into a file nobody can read any more:
    /// every append first checks the path still names this file (L2).
    audit_file: Option<FileIdentity>,
}

impl Admin {
    /// Operations over `ctx`, resolving plans from `plans`.
    pub fn new(ctx: Arc<VaultContext>, plans: Arc<PlanSet>) -> Self {
        let audit_file = ctx.audit().and_then(|log| file_identity(log.path()));
        Admin {
            ctx,
            plans,
            audit_file,
        }
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<VaultContext> {
        &self.ctx
    }

    fn now(&self) -> UnixMillis {
        self.ctx.clock().now()
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), AdminError> {
        let Some(log) = self.ctx.audit().cloned() else {
            return Ok(());
        };
        let expected = self.audit_file;
        let result = tokio::task::spawn_blocking(move || {
            if expected.is_some() && file_identity(log.path()) != expected {
                tracing::error!(path = %log.path().display(), "the audit log was moved, removed or replaced");
                return false;
            }
            log.append(event).is_ok()
        })
        .await;
        match result {
            Ok(true) => Ok(()),
            _ => {
                self.ctx
                    .metrics()
                    .audit_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!("the audit log could not be written; refusing the mutation");
                Err(AdminError::AuditUnavailable)
            }
        }
    }

    fn event(
        &self,
        actor: &Actor,
        kind: AuditKind,
        target: String,
        project: &str,
        detail: serde_json::Value,
    ) -> AuditEvent {
        AuditEvent {
            kind,
            actor: actor.id(),
            target: Some(target),
            project: Some(project.to_owned()),
            detail,
        }
    }

    /// A key visible to `actor` with `keys:manage` (or an ancestor of it);
    /// Another project's key is 403 `project_mismatch`, a missing one 404
    /// (docs/api.md#errors); ids are random, so the 403 reveals nothing a
    /// caller could guess.
    async fn visible_key(&self, actor: &Actor, id: &KeyId) -> Result<KeyRecord, AdminError> {
        let rec = self
            .ctx
            .store()
            .get_key(id)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::NotFound("key"))?;
        if !actor.sees(&rec.project) {
            return Err(AdminError::ProjectMismatch);
        }
        if let Actor::Key(k) = actor
            && !k.scopes.allows(Permission::KeysManage)
            && !self.is_ancestor(&k.id, &rec).await?
        {
            return Err(AdminError::Forbidden(
                "this key lacks the keys:manage scope".to_owned(),
            ));
        }
        Ok(rec)
    }

    async fn is_ancestor(&self, ancestor: &KeyId, rec: &KeyRecord) -> Result<bool, AdminError> {
        let mut cur = rec.parent.clone();
        let mut depth = 0;
        while let Some(id) = cur {
            if &id == ancestor {
                return Ok(true);
            }
            depth += 1;
            if depth > 16 {
                break;
            }
            cur = self
                .ctx
                .store()
                .get_key(&id)
                .await
                .map_err(store_err)?
                .and_then(|k| k.parent);
        }
        Ok(false)
    }

    /// Creates a key (docs/api.md#post-v1keys).
    pub async fn create_key(&self, actor: &Actor, req: NewKey) -> Result<IssuedKey, AdminError> {
        let now = self.now();
        // The parent, when minting a sub-agent key: its holder or a keys:manage
        // key of its project may do it.
        let parent = match &req.parent {
            Some(pid) => {
                let p = self
                    .ctx
                    .store()
                    .get_key(pid)
                    .await
                    .map_err(store_err)?
                    .filter(|p| actor.sees(&p.project))
                    .ok_or_else(|| {
                        AdminError::Forbidden("parent: no such key in your project".to_owned())
                    })?;
                if p.status_at(now) != KeyStatus::Active {
                    return Err(AdminError::Forbidden(
                        "parent: the parent key is not active".to_owned(),
                    ));
                }
                let is_self = matches!(actor, Actor::Key(k) if k.id == p.id);
                if !is_self {
                    actor.require(Permission::KeysManage)?;
                }
                Some(p)
            }
            None => {
                actor.require(Permission::KeysManage)?;
                None
            }
        };

        let project = match (&req.project, &parent, actor.project()) {
            (Some(p), Some(par), _) if *p != par.project => {
                return Err(AdminError::ProjectMismatch);
            }
            (Some(p), _, Some(mine)) if p != mine => return Err(AdminError::ProjectMismatch),
            (Some(p), _, _) => p.clone(),
            (None, Some(par), _) => par.project.clone(),
            (None, None, Some(mine)) => mine.to_owned(),
            (None, None, None) => DEFAULT_PROJECT.to_owned(),
        };
        if project.is_empty()
            || project.len() > 64
            || !project
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AdminError::Invalid(
                "project: 1 to 64 letters, digits, - or _".to_owned(),
            ));
        }
        if req.name.len() > 200 || req.name.chars().any(char::is_control) {
            return Err(AdminError::Invalid(
                "name: at most 200 characters, no control characters".to_owned(),
            ));
        }
        let scopes = if req.scopes.is_empty() {
            Scopes::parse(&["chat:write"])
                .map_err(|e| AdminError::Invalid(format!("permissions: {e}")))?
        } else {
            Scopes::parse(&req.scopes)
                .map_err(|e| AdminError::Invalid(format!("permissions: {e}")))?
        };
        if let Actor::Key(k) = actor
            && !scopes.is_subset_of(&k.scopes)
        {
            return Err(AdminError::Forbidden(
                "permissions: a key cannot grant scopes it does not hold".to_owned(),
            ));
        }
        let env = req
            .env
            .or(parent.as_ref().map(|p| p.env))
            .unwrap_or(KeyEnv::Live);
        // Test keys get the `free` plan's lower limits unless told otherwise.
        let plan = match (&req.plan, env) {
            (None, KeyEnv::Test) if req.policy.rate_limit.is_none() => Some("free".to_owned()),
            (p, _) => p.clone(),
        };
        let policy = self
            .plans
            .resolve(plan.as_deref(), &req.policy)
            .map_err(|e| AdminError::Invalid(format!("plan: {e}")))?;
        let ttl_ms = match req.ttl {
            Some(d) => Some(
                i64::try_from(d.as_millis())
                    .map_err(|_| AdminError::Invalid("ttl: too long".to_owned()))?,
            ),
            None => None,
        };
        let expires_at = ttl_ms.map(|ms| now.plus_millis(ms));
        for pk in &req.provider_keys {
            let found = self
                .ctx
                .store()
                .get_provider_key(pk)
                .await
                .map_err(store_err)?;
            if found.is_none_or(|f| f.project != project) {
                return Err(AdminError::Forbidden(format!(
                    "provider_keys: {pk} is not a provider key of project {project}"
                )));
            }
        }
        let mut carve = None;
        if let Some(p) = &parent {
            if p.env != env {
                return Err(AdminError::Forbidden(
                    "env: a child key has its parent's environment".to_owned(),
                ));
            }
            check_child_policy(p, &scopes, &policy, expires_at)
                .map_err(|e| AdminError::Forbidden(e.to_string()))?;
            if let (Some(pb), Some(cb)) = (p.policy.budget, policy.budget) {
                let period_start = match pb.period {
                    BudgetPeriod::Total => UnixMillis(0),
                    BudgetPeriod::Daily => now.start_of_utc_day(),
                    BudgetPeriod::Monthly => now.start_of_utc_month(),
                };
                carve = Some((
                    BudgetLine {
                        key: p.id.clone(),
                        limit: pb.limit,
                        period_start,
                    },
                    cb.limit,
                ));
            }
        }

        let key = self
            .ctx
            .key_format()
            .generate(env)
            .map_err(|_| AdminError::Internal)?;
        let record = KeyRecord {
            id: KeyId::generate().map_err(|_| AdminError::Internal)?,
            hash: key.hash(),
            prefix: key.prefix(),
            previous_hash: None,
            previous_valid_until: None,
            name: req.name,
            project: project.clone(),
            env,
            scopes,
            plan,
            policy,
            parent: parent.as_ref().map(|p| p.id.clone()),
            provider_keys: req.provider_keys,
            created_at: now,
            expires_at,
            last_used_at: None,
            request_count: 0,
            status: KeyStatus::Active,
            revoked_at: None,
            spend: Micros::ZERO,
        };
        self.audit(self.event(
            actor,
            AuditKind::KeyCreated,
            record.id.to_string(),
            &project,
            serde_json::json!({"name": record.name, "prefix": record.prefix.as_str(), "parent": record.parent,
                               "env": env.as_str(), "plan": record.plan}),
        ))
        .await?;
        self.ctx
            .store()
            .insert_key(&record, carve.as_ref().map(|(l, a)| (l, *a)))
            .await
            .map_err(store_err)?;
        Ok(IssuedKey { key, record })
    }

    /// Keys of the caller's project (all, for the operator).
    pub async fn list_keys(&self, actor: &Actor) -> Result<Vec<KeyRecord>, AdminError> {
        actor.require(Permission::KeysManage)?;
        self.ctx
            .store()
            .list_keys(actor.project())
            .await
            .map_err(store_err)
    }

    /// One key.
    pub async fn get_key(&self, actor: &Actor, id: &KeyId) -> Result<KeyRecord, AdminError> {
        self.visible_key(actor, id).await
    }

    /// Revokes a key and its descendants; returns every id revoked.
    pub async fn revoke_key(&self, actor: &Actor, id: &KeyId) -> Result<Vec<KeyId>, AdminError> {
        let rec = self.visible_key(actor, id).await?;
        self.audit(self.event(
            actor,
            AuditKind::KeyRevoked,
            id.to_string(),
            &rec.project,
            serde_json::json!({"cascade": true}),
        ))
        .await?;
        let revoked = self
            .ctx
            .store()
            .revoke_key(id, self.now())
            .await
            .map_err(store_err)?;
        self.ctx.invalidate_keys();
        Ok(revoked)
    }

    /// Gives a key a new secret, same id and policy; the old secret keeps
    /// working for `grace` if given.
    pub async fn rotate_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        grace: Option<Duration>,
    ) -> Result<IssuedKey, AdminError> {
        let rec = self.visible_key(actor, id).await?;
        if rec.status_at(self.now()) != KeyStatus::Active {
            return Err(AdminError::Invalid(
                "only an active key can be rotated".to_owned(),
            ));
        }
        let key = self
            .ctx
            .key_format()
            .generate(rec.env)
            .map_err(|_| AdminError::Internal)?;
        let grace_until = match grace {
            Some(g) => Some(
                self.now().plus_millis(
                    i64::try_from(g.as_millis())
                        .map_err(|_| AdminError::Invalid("grace: too long".to_owned()))?,
                ),
            ),
            None => None,
        };
        self.audit(self.event(
            actor,
            AuditKind::KeyRotated,
            id.to_string(),
            &rec.project,
            serde_json::json!({"prefix": key.prefix().as_str(), "grace_seconds": grace.map(|g| g.as_secs())}),
        ))
        .await?;
        self.ctx
            .store()
            .rotate_key(id, &key.hash(), &key.prefix(), grace_until)
            .await
            .map_err(store_err)?;
        self.ctx.invalidate_keys();
        let record = self
            .ctx
            .store()
            .get_key(id)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::NotFound("key"))?;
        Ok(IssuedKey { key, record })
    }

    /// Stores a provider key, sealed.
    pub async fn add_provider_key(
        &self,
        actor: &Actor,
        provider: Provider,
        name: String,
        project: Option<String>,
        secret: ProviderSecret,
    ) -> Result<ProviderKeyRecord, AdminError> {
        actor.require(Permission::KeysManage)?;
        let project = match (project, actor.project()) {
            (Some(p), Some(mine)) if p != mine => return Err(AdminError::ProjectMismatch),
            (Some(p), _) => p,
            (None, Some(mine)) => mine.to_owned(),
            (None, None) => DEFAULT_PROJECT.to_owned(),
        };
        if !secret.is_well_formed() {
            return Err(AdminError::Invalid(
                "api_key: 8 to 4096 visible ASCII characters, no spaces".to_owned(),
            ));
        }
        if name.len() > 200 || name.chars().any(char::is_control) {
            return Err(AdminError::Invalid(
                "name: at most 200 characters, no control characters".to_owned(),
            ));
        }
        let id = ProviderKeyId::generate().map_err(|_| AdminError::Internal)?;
        let aad = Aad {
            record_id: id.as_str(),
            project: &project,
            provider,
        };
        let sealed = self
            .ctx
            .encryptor()
            .seal(&secret, &aad)
            .map_err(|_| AdminError::Internal)?;
        let record = ProviderKeyRecord {
            id,
            project: project.clone(),
            provider,
            name,
            sealed,
            hint: secret.hint(),
            created_at: self.now(),
        };
        self.audit(self.event(
            actor,
            AuditKind::ProviderKeyAdded,
            record.id.to_string(),
            &project,
            serde_json::json!({"provider": provider.as_str(), "name": record.name, "hint": record.hint.as_str()}),
        ))
        .await?;
        self.ctx
            .store()
            .insert_provider_key(&record)
            .await
            .map_err(store_err)?;
        self.ctx.invalidate_provider_keys();
        Ok(record)
    }

    /// Provider keys of the caller's project, as hints.
    pub async fn list_provider_keys(
        &self,
        actor: &Actor,
    ) -> Result<Vec<ProviderKeyRecord>, AdminError> {
        actor.require(Permission::KeysManage)?;
        self.ctx
            .store()
            .list_provider_keys(actor.project())
            .await
            .map_err(store_err)
    }

    /// Removes a provider key.
    pub async fn remove_provider_key(
        &self,
        actor: &Actor,
        id: &ProviderKeyId,
    ) -> Result<(), AdminError> {
        actor.require(Permission::KeysManage)?;
        let rec = self
            .ctx
            .store()
            .get_provider_key(id)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::NotFound("provider key"))?;
        if !actor.sees(&rec.project) {
            return Err(AdminError::ProjectMismatch);
        }
        self.audit(self.event(
            actor,
            AuditKind::ProviderKeyRemoved,
            id.to_string(),
            &rec.project,
            serde_json::json!({"provider": rec.provider.as_str()}),
        ))
        .await?;
        self.ctx
            .store()
            .remove_provider_key(id)
            .await
            .map_err(store_err)?;
        self.ctx.invalidate_provider_keys();
        Ok(())
    }

    /// Usage records of the caller's project.
    pub async fn usage(
        &self,
        actor: &Actor,
        mut filter: UsageFilter,
    ) -> Result<Vec<UsageRecord>, AdminError> {
        actor.require(Permission::UsageRead)?;
        if let Some(p) = actor.project() {
            filter.project = Some(p.to_owned());
        }
        self.ctx
            .store()
            .list_usage(&filter)
            .await
            .map_err(store_err)
    }

    /// Audit entries visible to the caller (its project's), newest first.
    pub async fn audit_entries(
        &self,
        actor: &Actor,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, AdminError> {
        actor.require(Permission::AuditRead)?;
        let Some(log) = self.ctx.audit() else {
            return Ok(Vec::new());
        };
        let path = log.path().to_owned();
        let filter = AuditFilter {
            project: actor.project().map(str::to_owned),
            before_seq: None,
            limit,
        };
        match tokio::task::spawn_blocking(move || read_entries(&path, &filter)).await {
            Ok(Ok(entries)) => Ok(entries),
            _ => Err(AdminError::Internal),
        }
    }
}
