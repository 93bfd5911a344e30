//! [`Manager`]: the management rules, below any transport.
//!
//! Every mutation is authorised, validated in full (nothing is created on any
//! error), written to the audit log and fsync'd *before* it is applied — if the
//! audit log cannot be written, the mutation fails (docs/threat-model.md, L2).

use std::sync::Arc;

use crate::audit::{AuditEvent, AuditFilter, AuditKind, AuditTrail};
use crate::clock::{SharedClock, SystemClock, UnixMillis};
use crate::crypto::{Aad, Encryptor};
use crate::key::{KeyEnv, KeyFormat, KeyId, ProviderKeyId};
use crate::money::Micros;
use crate::policy::{
    LimitStatus, PlanSet, PolicyEngine, check_child_policy, validate_name, validate_plan_name,
    validate_policy,
};
use crate::record::{
    ALL_PROJECTS, DEFAULT_PROJECT, KeyRecord, KeyStatus, MAX_CHAIN_DEPTH, ProviderKeyRecord,
    UsageFilter,
};
use crate::scope::{Permission, Scopes};
use crate::store::{KeyPageQuery, KeyStatusFilter, KeyStore, MAX_PAGE_LIMIT};

use super::error::ManageError;
use super::wire::{
    AddProviderKeyRequest, AuditList, AuditQuery, CreateKeyRequest, IssuedKey, KeyLimits,
    KeyListQuery, KeyPageView, KeyView, List, ProviderKeyView, RemovedProviderKey, RevokedKey,
    RotateKeyRequest, UsageList, UsageQuery,
};

/// Records returned by a usage query without `limit`, and the most with one
/// (docs/api.md#get-v1usage).
const USAGE_LIMIT: (usize, usize) = (1000, 10_000);
/// Entries returned by an audit query without `limit`, and the most with one
/// (docs/api.md#get-v1audit).
const AUDIT_LIMIT: (usize, usize) = (100, 10_000);
/// Keys on a page without `limit` (docs/api.md#get-v1keys); at most
/// [`MAX_PAGE_LIMIT`] with one.
const KEY_PAGE_LIMIT: u64 = 50;

/// Who is asking: a virtual key, or the local operator (the CLI on the data
/// directory), who may do anything in every project.
#[derive(Debug, Clone)]
pub enum Actor {
    /// The holder of this key (already authenticated, chain active).
    Key(Arc<KeyRecord>),
    /// Whoever can read the data directory and master key.
    Operator,
}

impl Actor {
    /// The id written as the audit entry's `actor`.
    fn id(&self) -> String {
        match self {
            Actor::Key(k) => k.id.to_string(),
            Actor::Operator => "operator".to_owned(),
        }
    }

    /// The actor's project; `None` for the operator and an
    /// organisation-wide key (every project, docs/api.md#projects).
    pub fn project(&self) -> Option<&str> {
        match self {
            Actor::Key(k) if k.project != ALL_PROJECTS => Some(&k.project),
            Actor::Key(_) | Actor::Operator => None,
        }
    }

    /// The project a listing covers: the one `requested`, which a project's
    /// key may name only if it is its own (403 `project_mismatch`
    /// otherwise); else the actor's (`None`: every project).
    fn narrow(&self, requested: Option<&str>) -> Result<Option<String>, ManageError> {
        match (requested, self.project()) {
            (Some(want), Some(mine)) if want != mine => Err(ManageError::ProjectMismatch),
            (Some(want), _) => Ok(Some(want.to_owned())),
            (None, mine) => Ok(mine.map(str::to_owned)),
        }
    }

    /// Refuses with 403 `permission_denied` unless the actor holds `perm`.
    pub fn require(&self, perm: Permission) -> Result<(), ManageError> {
        match self {
            Actor::Key(k) if !k.scopes.allows(perm) => Err(ManageError::Forbidden(format!(
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

/// What changed, for a [`ManageHook`]. Reported after the store applied it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Change<'a> {
    /// A key was created.
    KeyCreated(&'a KeyId),
    /// These keys were revoked (a key and its descendants).
    KeysRevoked(&'a [KeyId]),
    /// A key was given a new secret.
    KeyRotated(&'a KeyId),
    /// A provider key of this project was added or removed.
    ProviderKeysChanged(&'a str),
}

/// Told about every change a [`Manager`] makes, once it is stored: a proxy
/// drops cached key records (vault-tower's `VaultContext` implements it),
/// and the same hook can broadcast revocations to other replicas or feed a
/// dashboard.
pub trait ManageHook: Send + Sync {
    /// `change` was applied to the store.
    fn changed(&self, change: Change<'_>);

    /// An audit entry could not be written (the mutation was refused).
    fn audit_failed(&self) {}
}

/// The management operations of docs/api.md over a store: who may do what,
/// project checks, validation, audit before mutation. The HTTP routes and
/// the CLI's direct mode both call it. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    store: Arc<dyn KeyStore>,
    encryptor: Arc<dyn Encryptor>,
    audit: Option<Arc<dyn AuditTrail>>,
    plans: Arc<PlanSet>,
    clock: SharedClock,
    format: KeyFormat,
    hook: Option<Arc<dyn ManageHook>>,
    /// Reads keys' live limits; `None`: [`Manager::key_limits`] shows none.
    engine: Option<Arc<dyn PolicyEngine>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("format", &self.format)
            .field("plans", &self.plans)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Manager`].
pub struct ManagerBuilder {
    store: Arc<dyn KeyStore>,
    encryptor: Arc<dyn Encryptor>,
    audit: Option<Arc<dyn AuditTrail>>,
    plans: Arc<PlanSet>,
    clock: SharedClock,
    format: KeyFormat,
    hook: Option<Arc<dyn ManageHook>>,
    engine: Option<Arc<dyn PolicyEngine>>,
}

impl ManagerBuilder {
    /// The audit trail mutations are written to first (none: not
    /// audited): the data directory's file, or a table shared by replicas.
    pub fn audit(mut self, log: Arc<dyn AuditTrail>) -> Self {
        self.audit = Some(log);
        self
    }

    /// The plans keys resolve from (default: the seeds).
    pub fn plans(mut self, plans: Arc<PlanSet>) -> Self {
        self.plans = plans;
        self
    }

    /// The clock (tests pass a `ManualClock`).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The virtual-key format new secrets are made in.
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Told about every change (see [`ManageHook`]).
    pub fn hook(mut self, hook: Arc<dyn ManageHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The engine that enforces keys' limits, read by
    /// [`Manager::key_limits`] (none: no live limits are shown).
    pub fn engine(mut self, engine: Arc<dyn PolicyEngine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The manager.
    pub fn build(self) -> Manager {
        Manager {
            store: self.store,
            encryptor: self.encryptor,
            audit: self.audit,
            plans: self.plans,
            clock: self.clock,
            format: self.format,
            hook: self.hook,
            engine: self.engine,
        }
    }
}

impl Manager {
    /// Starts a builder over `store`, sealing provider keys with `encryptor`.
    pub fn builder(store: Arc<dyn KeyStore>, encryptor: Arc<dyn Encryptor>) -> ManagerBuilder {
        ManagerBuilder {
            store,
            encryptor,
            audit: None,
            plans: Arc::new(PlanSet::seeded()),
            clock: Arc::new(SystemClock),
            format: KeyFormat::default(),
            hook: None,
            engine: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    fn changed(&self, change: Change<'_>) {
        if let Some(h) = &self.hook {
            h.changed(change);
        }
    }

    /// Writes `event` (fsync'd) or refuses the mutation.
    async fn audit(
        &self,
        actor: &Actor,
        kind: AuditKind,
        target: &str,
        project: &str,
        detail: serde_json::Value,
    ) -> Result<(), ManageError> {
        let Some(log) = self.audit.clone() else {
            return Ok(());
        };
        let event = AuditEvent {
            kind,
            actor: Some(actor.id()),
            target: Some(target.to_owned()),
            project: Some(project.to_owned()),
            detail,
        };
        match log.append(event).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Some(h) = &self.hook {
                    h.audit_failed();
                }
                tracing::error!(error = %e, "the audit log could not be written; refusing the mutation");
                Err(ManageError::AuditUnavailable)
            }
        }
    }

    /// A key visible to `actor` with `keys:manage`, or of which the actor
    /// is an ancestor. Another project's key is 403 `project_mismatch`, a
    /// missing one 404 (docs/api.md#errors); ids are random, so the 403
    /// reveals nothing a caller could guess.
    async fn visible_key(&self, actor: &Actor, id: &KeyId) -> Result<KeyRecord, ManageError> {
        let rec = self
            .store
            .get_key(id)
            .await?
            .ok_or(ManageError::NotFound("key"))?;
        if !actor.sees(&rec.project) {
            return Err(ManageError::ProjectMismatch);
        }
        if let Actor::Key(k) = actor
            && !k.scopes.allows(Permission::KeysManage)
            && !self.is_ancestor(&k.id, &rec).await?
        {
            return Err(ManageError::Forbidden(
                "this key lacks the keys:manage scope".to_owned(),
            ));
        }
        Ok(rec)
    }

    async fn is_ancestor(&self, ancestor: &KeyId, rec: &KeyRecord) -> Result<bool, ManageError> {
        let mut cur = rec.parent.clone();
        let mut depth = 0;
        while let Some(id) = cur {
            if &id == ancestor {
                return Ok(true);
            }
            depth += 1;
            if depth > MAX_CHAIN_DEPTH {
                break;
            }
            cur = self.store.get_key(&id).await?.and_then(|k| k.parent);
        }
        Ok(false)
    }

    /// How many ancestors `key` has (at most `MAX_CHAIN_DEPTH + 1`: past
    /// that the walk stops).
    async fn ancestors(&self, key: &KeyRecord) -> Result<usize, ManageError> {
        let mut cur = key.parent.clone();
        let mut n = 0;
        while let Some(id) = cur {
            n += 1;
            if n > MAX_CHAIN_DEPTH {
                break;
            }
            cur = self.store.get_key(&id).await?.and_then(|k| k.parent);
        }
        Ok(n)
    }

    /// Creates a key (docs/api.md#post-v1keys).
    pub async fn create_key(
        &self,
        actor: &Actor,
        req: CreateKeyRequest,
    ) -> Result<IssuedKey, ManageError> {
        let now = self.now();
        // The parent, when minting a sub-agent key: its holder or a
        // keys:manage key of its project may do it.
        let parent = match &req.parent {
            Some(pid) => {
                let p = self
                    .store
                    .get_key(pid)
                    .await?
                    .filter(|p| actor.sees(&p.project))
                    .ok_or_else(|| {
                        ManageError::Forbidden("parent: no such key in your project".to_owned())
                    })?;
                if p.status_at(now) != KeyStatus::Active {
                    return Err(ManageError::Forbidden(
                        "parent: the parent key is not active".to_owned(),
                    ));
                }
                let is_self = matches!(actor, Actor::Key(k) if k.id == p.id);
                if !is_self {
                    actor.require(Permission::KeysManage)?;
                }
                // docs/policy.md#sub-agent-keys: a chain deeper than this
                // would be refused on every call; refuse it here instead.
                if self.ancestors(&p).await? >= MAX_CHAIN_DEPTH {
                    return Err(ManageError::Invalid(format!(
                        "parent: sub-agent keys nest at most {MAX_CHAIN_DEPTH} deep, and this parent is at the limit"
                    )));
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
                return Err(ManageError::ProjectMismatch);
            }
            (Some(p), _, Some(mine)) if p != mine => return Err(ManageError::ProjectMismatch),
            (Some(p), _, _) => p.clone(),
            (None, Some(par), _) => par.project.clone(),
            (None, None, Some(mine)) => mine.to_owned(),
            (None, None, None) => DEFAULT_PROJECT.to_owned(),
        };
        if project != ALL_PROJECTS {
            validate_project(&project)?;
        }
        let name = req.name.clone().unwrap_or_default();
        validate_name(&name)?;
        let scopes = match &req.permissions {
            None => Scopes::parse(&["chat:write"]),
            Some(list) if list.is_empty() => {
                return Err(ManageError::Invalid(
                    "permissions: an empty list would grant nothing; list at least one scope, or omit the field for chat:write".to_owned(),
                ));
            }
            Some(list) => Scopes::parse(list),
        }
        .map_err(|e| ManageError::Invalid(format!("permissions: {e}")))?;
        if let Actor::Key(k) = actor
            && !scopes.is_subset_of(&k.scopes)
        {
            return Err(ManageError::Forbidden(
                "permissions: a key cannot grant scopes it does not hold".to_owned(),
            ));
        }
        let env = req
            .env
            .or(parent.as_ref().map(|p| p.env))
            .unwrap_or(KeyEnv::Live);
        let explicit = req.policy();
        validate_policy(&explicit)?;
        // Test keys get the `free` plan's lower limits unless told otherwise.
        let plan = match (&req.plan, env) {
            (None, KeyEnv::Test) if explicit.rate_limit.is_none() => Some("free".to_owned()),
            (p, _) => p.clone(),
        };
        if let Some(p) = &plan {
            validate_plan_name(p)?;
        }
        let policy = self
            .plans
            .resolve(plan.as_deref(), &explicit)
            .map_err(|e| ManageError::Invalid(format!("plan: {e}")))?;
        let expires_at = match req.ttl {
            Some(t) => Some(
                now.plus_millis(
                    i64::try_from(t.get().as_millis())
                        .map_err(|_| ManageError::Invalid("ttl: too long".to_owned()))?,
                ),
            ),
            None => None,
        };
        let provider_keys = req.provider_keys.clone().unwrap_or_default();
        for pk in &provider_keys {
            let found = self.store.get_provider_key(pk).await?;
            if found.is_none_or(|f| f.project != project) {
                return Err(ManageError::Forbidden(format!(
                    "provider_keys: {pk} is not a provider key of project {project}"
                )));
            }
        }
        let mut carve = None;
        if let Some(p) = &parent {
            if p.env != env {
                return Err(ManageError::Forbidden(
                    "env: a child key has its parent's environment".to_owned(),
                ));
            }
            check_child_policy(p, &scopes, &policy, expires_at)
                .map_err(|e| ManageError::Forbidden(e.to_string()))?;
            if let (Some(pb), Some(cb)) = (p.policy.budget, policy.budget) {
                carve = Some((pb.line(p.id.clone(), now), cb.limit));
            }
        }

        let key = self
            .format
            .generate(env)
            .map_err(|_| ManageError::Internal)?;
        let record = KeyRecord {
            id: KeyId::generate().map_err(|_| ManageError::Internal)?,
            hash: key.hash(),
            prefix: key.prefix(),
            previous_hash: None,
            previous_valid_until: None,
            name,
            project: project.clone(),
            env,
            scopes,
            plan,
            policy,
            parent: parent.as_ref().map(|p| p.id.clone()),
            provider_keys,
            created_at: now,
            expires_at,
            last_used_at: None,
            request_count: 0,
            status: KeyStatus::Active,
            revoked_at: None,
            spend: Micros::ZERO,
        };
        self.audit(
            actor,
            AuditKind::KeyCreated,
            record.id.as_str(),
            &project,
            serde_json::json!({"name": record.name, "prefix": record.prefix.as_str(), "parent": record.parent,
                               "env": env.as_str(), "plan": record.plan}),
        )
        .await?;
        self.store
            .insert_key(&record, carve.as_ref().map(|(l, a)| (l, *a)))
            .await?;
        self.changed(Change::KeyCreated(&record.id));
        Ok(IssuedKey {
            record: KeyView::of(&record, now),
            key: key.into(),
        })
    }

    /// The projects the caller may look at, sorted: every project with a
    /// key or a provider key for the operator and an organisation-wide key
    /// (not `*` itself), else the caller's own. Needs `keys:manage`,
    /// `usage:read` or `audit:read` (docs/api.md#get-v1projects).
    pub async fn list_projects(&self, actor: &Actor) -> Result<List<String>, ManageError> {
        if let Actor::Key(k) = actor
            && !k.scopes.allows_any(&Permission::MANAGEMENT)
        {
            return Err(ManageError::Forbidden(
                "this key lacks keys:manage, usage:read and audit:read".to_owned(),
            ));
        }
        if let Some(mine) = actor.project() {
            return Ok(List::of(vec![mine.to_owned()]));
        }
        let mut projects = self.store.list_projects().await?;
        projects.retain(|p| p != ALL_PROJECTS);
        Ok(List::of(projects))
    }

    /// Keys of the caller's project (every project's, for the operator),
    /// oldest first (docs/api.md#get-v1keys).
    pub async fn list_keys(&self, actor: &Actor) -> Result<List<KeyView>, ManageError> {
        actor.require(Permission::KeysManage)?;
        let now = self.now();
        let keys = self.store.list_keys(actor.project()).await?;
        Ok(List::of(keys.iter().map(|k| KeyView::of(k, now)).collect()))
    }

    /// One page of the caller's project's keys (every project's, for the
    /// operator), newest first, with how many match: the store answers it
    /// without reading the other pages (docs/api.md#get-v1keys).
    pub async fn list_keys_page(
        &self,
        actor: &Actor,
        query: &KeyListQuery,
    ) -> Result<KeyPageView, ManageError> {
        actor.require(Permission::KeysManage)?;
        let limit = query.limit.unwrap_or(KEY_PAGE_LIMIT);
        if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
            return Err(ManageError::Invalid(format!(
                "limit: must be between 1 and {MAX_PAGE_LIMIT}"
            )));
        }
        let status = match query.status.as_deref() {
            None => None,
            Some(s) => Some(KeyStatusFilter::parse(s).ok_or_else(|| {
                ManageError::Invalid(
                    "status: must be active, revoked, expired or exhausted".to_owned(),
                )
            })?),
        };
        let now = self.now();
        let page = self
            .store
            .list_keys_page(&KeyPageQuery {
                project: actor.narrow(query.project.as_deref())?,
                search: query.search.clone(),
                status,
                now,
                offset: query.offset.unwrap_or(0),
                limit,
            })
            .await?;
        Ok(KeyPageView {
            object: "list".to_owned(),
            data: page.keys.iter().map(|k| KeyView::of(k, now)).collect(),
            total: page.total,
            offset: query.offset.unwrap_or(0),
            limit,
        })
    }

    /// Every key below `id` (its sub-agent keys, theirs, and so on), each
    /// after its parent, read through the parent index: what a key's page
    /// and its revoke confirmation show, without reading the project's
    /// other keys. The same rules as [`Manager::get_key`].
    pub async fn key_tree(&self, actor: &Actor, id: &KeyId) -> Result<Vec<KeyView>, ManageError> {
        self.visible_key(actor, id).await?;
        let now = self.now();
        let mut below = Vec::new();
        let mut level = vec![id.clone()];
        for _ in 0..=MAX_CHAIN_DEPTH {
            let mut next = Vec::new();
            for parent in &level {
                for child in self.store.list_children(parent).await? {
                    next.push(child.id.clone());
                    below.push(KeyView::of(&child, now));
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Ok(below)
    }

    /// One key (docs/api.md#get-v1keysid).
    pub async fn get_key(&self, actor: &Actor, id: &KeyId) -> Result<KeyView, ManageError> {
        let rec = self.visible_key(actor, id).await?;
        Ok(KeyView::of(&rec, self.now()))
    }

    /// Revokes a key and its descendants (docs/api.md#delete-v1keysid).
    pub async fn revoke_key(&self, actor: &Actor, id: &KeyId) -> Result<RevokedKey, ManageError> {
        let rec = self.visible_key(actor, id).await?;
        self.audit(
            actor,
            AuditKind::KeyRevoked,
            id.as_str(),
            &rec.project,
            serde_json::json!({"cascade": true}),
        )
        .await?;
        let revoked = self.store.revoke_key(id, self.now()).await?;
        self.changed(Change::KeysRevoked(&revoked));
        Ok(RevokedKey {
            id: id.clone(),
            status: KeyStatus::Revoked,
            revoked,
        })
    }

    /// Gives a key a new secret, same id and policy; the old secret keeps
    /// working for the grace period if one is given
    /// (docs/api.md#post-v1keysidrotate).
    pub async fn rotate_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        req: RotateKeyRequest,
    ) -> Result<IssuedKey, ManageError> {
        let grace = match (req.grace, req.grace_seconds) {
            (Some(_), Some(_)) => {
                return Err(ManageError::Invalid(
                    "grace: give grace or grace_seconds, not both".to_owned(),
                ));
            }
            (Some(g), None) => Some(g.get()),
            (None, Some(s)) => Some(std::time::Duration::from_secs(s)),
            (None, None) => None,
        };
        let rec = self.visible_key(actor, id).await?;
        let now = self.now();
        if rec.status_at(now) != KeyStatus::Active {
            return Err(ManageError::Invalid(
                "only an active key can be rotated".to_owned(),
            ));
        }
        let grace_until = match grace {
            Some(g) => Some(
                now.plus_millis(
                    i64::try_from(g.as_millis())
                        .map_err(|_| ManageError::Invalid("grace: too long".to_owned()))?,
                ),
            ),
            None => None,
        };
        let key = self
            .format
            .generate(rec.env)
            .map_err(|_| ManageError::Internal)?;
        self.audit(
            actor,
            AuditKind::KeyRotated,
            id.as_str(),
            &rec.project,
            serde_json::json!({"prefix": key.prefix().as_str(), "grace_seconds": grace.map(|g| g.as_secs())}),
        )
        .await?;
        self.store
            .rotate_key(id, &key.hash(), &key.prefix(), grace_until)
            .await?;
        self.changed(Change::KeyRotated(id));
        let record = self
            .store
            .get_key(id)
            .await?
            .ok_or(ManageError::NotFound("key"))?;
        Ok(IssuedKey {
            record: KeyView::of(&record, self.now()),
            key: key.into(),
        })
    }

    /// Stores a provider key, sealed (docs/api.md#post-v1provider-keys).
    pub async fn add_provider_key(
        &self,
        actor: &Actor,
        req: AddProviderKeyRequest,
    ) -> Result<ProviderKeyView, ManageError> {
        actor.require(Permission::KeysManage)?;
        let AddProviderKeyRequest {
            provider,
            api_key,
            name,
            project,
        } = req;
        let project = match (project, actor.project()) {
            (Some(p), Some(mine)) if p != mine => return Err(ManageError::ProjectMismatch),
            (Some(p), _) => p,
            (None, Some(mine)) => mine.to_owned(),
            (None, None) => DEFAULT_PROJECT.to_owned(),
        };
        if project == ALL_PROJECTS {
            return Err(ManageError::Invalid(
                "project: a provider key belongs to one project, not *".to_owned(),
            ));
        }
        validate_project(&project)?;
        if !api_key.is_well_formed() {
            return Err(ManageError::Invalid(
                "api_key: 8 to 4096 visible ASCII characters, no spaces".to_owned(),
            ));
        }
        let name = name.unwrap_or_default();
        validate_name(&name)?;
        let id = ProviderKeyId::generate().map_err(|_| ManageError::Internal)?;
        let aad = Aad {
            record_id: id.as_str(),
            project: &project,
            provider,
        };
        let sealed = self
            .encryptor
            .seal(&api_key, &aad)
            .map_err(|_| ManageError::Internal)?;
        let record = ProviderKeyRecord {
            id,
            project: project.clone(),
            provider,
            name,
            sealed,
            hint: api_key.hint(),
            created_at: self.now(),
        };
        drop(api_key);
        self.audit(
            actor,
            AuditKind::ProviderKeyAdded,
            record.id.as_str(),
            &project,
            serde_json::json!({"provider": provider.as_str(), "name": record.name, "hint": record.hint.as_str()}),
        )
        .await?;
        self.store.insert_provider_key(&record).await?;
        self.changed(Change::ProviderKeysChanged(&project));
        Ok(ProviderKeyView::of(&record))
    }

    /// Provider keys of the caller's project, as hints
    /// (docs/api.md#get-v1provider-keys).
    pub async fn list_provider_keys(
        &self,
        actor: &Actor,
    ) -> Result<List<ProviderKeyView>, ManageError> {
        actor.require(Permission::KeysManage)?;
        let list = self.store.list_provider_keys(actor.project()).await?;
        Ok(List::of(list.iter().map(ProviderKeyView::of).collect()))
    }

    /// Keys of the caller's project (every project's, for the operator and
    /// an organisation-wide key) limited to named provider keys: what the
    /// dashboard counts per provider key and lists before a removal,
    /// without reading the other keys.
    pub async fn list_keys_with_provider_keys(
        &self,
        actor: &Actor,
    ) -> Result<List<KeyView>, ManageError> {
        actor.require(Permission::KeysManage)?;
        let now = self.now();
        let keys = self
            .store
            .list_keys_with_provider_keys(actor.project())
            .await?;
        Ok(List::of(keys.iter().map(|k| KeyView::of(k, now)).collect()))
    }

    /// Removes a provider key (docs/api.md#delete-v1provider-keysid).
    pub async fn remove_provider_key(
        &self,
        actor: &Actor,
        id: &ProviderKeyId,
    ) -> Result<RemovedProviderKey, ManageError> {
        actor.require(Permission::KeysManage)?;
        let rec = self
            .store
            .get_provider_key(id)
            .await?
            .ok_or(ManageError::NotFound("provider key"))?;
        if !actor.sees(&rec.project) {
            return Err(ManageError::ProjectMismatch);
        }
        self.audit(
            actor,
            AuditKind::ProviderKeyRemoved,
            id.as_str(),
            &rec.project,
            serde_json::json!({"provider": rec.provider.as_str()}),
        )
        .await?;
        self.store.remove_provider_key(id).await?;
        self.changed(Change::ProviderKeysChanged(&rec.project));
        Ok(RemovedProviderKey {
            id: id.clone(),
            deleted: true,
        })
    }

    /// Usage records of the caller's project, newest first
    /// (docs/api.md#get-v1usage).
    pub async fn usage(&self, actor: &Actor, q: UsageQuery) -> Result<UsageList, ManageError> {
        actor.require(Permission::UsageRead)?;
        let filter = UsageFilter {
            project: actor.narrow(q.project.as_deref())?,
            key_id: q.key_id,
            since: q.since.map(UnixMillis),
            until: q.until.map(UnixMillis),
            limit: Some(q.limit.unwrap_or(USAGE_LIMIT.0).min(USAGE_LIMIT.1)),
        };
        let records = self.store.list_usage(&filter).await?;
        Ok(UsageList::of(&records))
    }

    /// The live state of a key's limits and those of its ancestors, read
    /// from the engine without counting anything; the same rules as
    /// [`Manager::get_key`] (docs/api.md#get-v1keysidlimits).
    pub async fn key_limits(&self, actor: &Actor, id: &KeyId) -> Result<KeyLimits, ManageError> {
        let rec = self.visible_key(actor, id).await?;
        let status = match &self.engine {
            Some(engine) => engine.limit_status(&self.chain_of(rec).await?).await?,
            None => LimitStatus::default(),
        };
        Ok(KeyLimits::of(id, &status, self.now()))
    }

    /// `key` and its ancestors, nearest first (as the proxy checks them).
    async fn chain_of(&self, key: KeyRecord) -> Result<Vec<Arc<KeyRecord>>, ManageError> {
        let mut cur = key.parent.clone();
        let mut chain = vec![Arc::new(key)];
        while let Some(id) = cur {
            if chain.len() > MAX_CHAIN_DEPTH {
                break;
            }
            let Some(k) = self.store.get_key(&id).await? else {
                break;
            };
            cur = k.parent.clone();
            chain.push(Arc::new(k));
        }
        Ok(chain)
    }

    /// Audit entries of the caller's project (every project's, for the
    /// operator), newest first (docs/api.md#get-v1audit).
    pub async fn audit_entries(
        &self,
        actor: &Actor,
        q: AuditQuery,
    ) -> Result<AuditList, ManageError> {
        actor.require(Permission::AuditRead)?;
        let Some(log) = &self.audit else {
            return Ok(List::of(Vec::new()));
        };
        let filter = AuditFilter {
            project: actor.narrow(q.project.as_deref())?,
            before_seq: None,
            limit: q.limit.unwrap_or(AUDIT_LIMIT.0).min(AUDIT_LIMIT.1),
        };
        match log.read(&filter).await {
            Ok(entries) => Ok(List::of(entries)),
            Err(e) => {
                tracing::error!(error = %e, "reading the audit log failed");
                Err(ManageError::Internal)
            }
        }
    }
}

/// A project name: 1 to 64 letters, digits, `-` and `_`
/// (docs/api.md#post-v1keys).
fn validate_project(project: &str) -> Result<(), ManageError> {
    let ok = !project.is_empty()
        && project.len() <= 64
        && project
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ManageError::Invalid(
            "project: 1 to 64 letters, digits, - or _".to_owned(),
        ))
    }
}
