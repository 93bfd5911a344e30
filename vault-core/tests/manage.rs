//! The management rules below any transport (`vault_core::manage`): the same
//! value rules as policy files, the sub-agent depth limit at creation, audit
//! before mutation, and the hook told of every change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::{Arc, Mutex};

use vault_core::audit::AuditLog;
use vault_core::crypto::{AesGcmEncryptor, MasterKey};
use vault_core::manage::{
    Actor, AddProviderKeyRequest, Change, CreateKeyRequest, KeyListQuery, ManageError, ManageHook,
    Manager, RotateKeyRequest, UsageQuery,
};
use vault_core::record::MAX_CHAIN_DEPTH;
use vault_core::store::MemoryStore;

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl ManageHook for Recorder {
    fn changed(&self, change: Change<'_>) {
        let what = match change {
            Change::KeyCreated(_) => "created".to_owned(),
            Change::KeysRevoked(ids) => format!("revoked {}", ids.len()),
            Change::KeyRotated(_) => "rotated".to_owned(),
            Change::ProviderKeysChanged(p) => format!("provider keys of {p}"),
            _ => "other".to_owned(),
        };
        self.0.lock().unwrap().push(what);
    }
}

fn manager(hook: Option<Arc<Recorder>>, audit: Option<Arc<AuditLog>>) -> Manager {
    let store = Arc::new(MemoryStore::new());
    let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let mut b = Manager::builder(store, encryptor);
    if let Some(h) = hook {
        b = b.hook(h);
    }
    if let Some(a) = audit {
        b = b.audit(a);
    }
    b.build()
}

fn body(json: &str) -> CreateKeyRequest {
    serde_json::from_str(json).unwrap()
}

const OP: Actor = Actor::Operator;

/// docs/policy.md#fields: what a policy file refuses, the API refuses too,
/// naming the field, and creates nothing.
#[tokio::test]
async fn corruption_empty_lists_zero_limits_and_bad_names_are_refused() {
    let m = manager(None, None);
    for (json, field) in [
        (r#"{"models": []}"#, "models"),
        (r#"{"providers": []}"#, "providers"),
        (r#"{"endpoints": []}"#, "endpoints"),
        (r#"{"permissions": []}"#, "permissions"),
        (r#"{"rate_limit": {}}"#, "rate_limit"),
        (
            r#"{"rate_limit": {"requests_per_minute": 0}}"#,
            "rate_limit.requests_per_minute",
        ),
        (r#"{"max_request_chars": 0}"#, "max_request_chars"),
        (r#"{"max_parallel": 0}"#, "max_parallel"),
        (r#"{"plan": "Pro"}"#, "plan"),
        (r#"{"name": "a\nb"}"#, "name"),
    ] {
        let e = m.create_key(&OP, body(json)).await.unwrap_err();
        assert!(
            matches!(&e, ManageError::Invalid(msg) if msg.starts_with(field)),
            "{json}: {e:?}"
        );
        assert_eq!(e.status(), 400);
    }
    let long = format!(r#"{{"name": "{}"}}"#, "é".repeat(101));
    let e = m.create_key(&OP, body(&long)).await.unwrap_err();
    assert_eq!(e.code(), "invalid_request", "{e:?}");
    assert!(m.list_keys(&OP).await.unwrap().data.is_empty());
}

/// A chain one deeper than `MAX_CHAIN_DEPTH` would answer 500 on every
/// call; it is refused at creation instead, with a 400 naming `parent`.
#[tokio::test]
async fn boundary_sub_agent_depth_is_refused_at_creation() {
    let m = manager(None, None);
    let mut parent = m
        .create_key(&OP, body(r#"{"name": "root"}"#))
        .await
        .unwrap()
        .record
        .id;
    for depth in 1..=MAX_CHAIN_DEPTH {
        let req = CreateKeyRequest {
            name: Some(format!("depth {depth}")),
            parent: Some(parent.clone()),
            ..CreateKeyRequest::default()
        };
        parent = m.create_key(&OP, req).await.unwrap().record.id;
    }
    let req = CreateKeyRequest {
        parent: Some(parent),
        ..CreateKeyRequest::default()
    };
    let e = m.create_key(&OP, req).await.unwrap_err();
    assert_eq!(e.status(), 400, "{e:?}");
    assert!(e.to_string().starts_with("parent:"), "{e}");
    assert_eq!(
        m.list_keys(&OP).await.unwrap().data.len(),
        MAX_CHAIN_DEPTH + 1
    );
}

/// The hook hears of each change after it is stored; an audit log that
/// cannot be written refuses the mutation and changes nothing.
#[tokio::test]
async fn lifecycle_hook_and_audit_before_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&path).unwrap());
    let hook = Arc::new(Recorder::default());
    let m = manager(Some(hook.clone()), Some(audit));
    let parent = m.create_key(&OP, body(r#"{"name": "p"}"#)).await.unwrap();
    let child = CreateKeyRequest {
        parent: Some(parent.record.id.clone()),
        ..CreateKeyRequest::default()
    };
    m.create_key(&OP, child).await.unwrap();
    m.rotate_key(&OP, &parent.record.id, RotateKeyRequest::default())
        .await
        .unwrap();
    let revoked = m.revoke_key(&OP, &parent.record.id).await.unwrap();
    assert_eq!(revoked.revoked.len(), 2);
    assert_eq!(
        *hook.0.lock().unwrap(),
        ["created", "created", "rotated", "revoked 2"]
    );
    let entries = m.audit_entries(&OP, Default::default()).await.unwrap().data;
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0]["kind"], "key.revoked");

    // The audit file replaced by a directory: nothing is created.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = m
        .create_key(&OP, body(r#"{"name": "x"}"#))
        .await
        .unwrap_err();
    assert_eq!(e, ManageError::AuditUnavailable);
    assert_eq!(m.list_keys(&OP).await.unwrap().data.len(), 2);
    assert_eq!(hook.0.lock().unwrap().len(), 4);
}

/// docs/api.md#get-v1keys: a page of keys keeps `list_keys`'s rules — a
/// project's key sees its project only, `keys:manage` is required — and a
/// bad `limit` or `status` is the caller's 400.
#[tokio::test]
async fn boundary_key_pages_keep_the_project_and_permission_rules() {
    let m = manager(None, None);
    let mut ids = Vec::new();
    for json in [
        r#"{"name": "lead", "project": "alpha", "permissions": ["keys:manage"]}"#,
        r#"{"name": "chatter", "project": "alpha", "permissions": ["chat:write"]}"#,
        r#"{"name": "Alpha One", "project": "alpha"}"#,
        r#"{"name": "beta one", "project": "beta"}"#,
    ] {
        ids.push(m.create_key(&OP, body(json)).await.unwrap().record.id);
    }
    let store = m.store().clone();
    let lead = Actor::Key(Arc::new(store.get_key(&ids[0]).await.unwrap().unwrap()));
    let chatter = Actor::Key(Arc::new(store.get_key(&ids[1]).await.unwrap().unwrap()));
    let all = KeyListQuery::default();
    let page = m.list_keys_page(&lead, &all).await.unwrap();
    assert_eq!(page.total, 3);
    assert!(page.data.iter().all(|k| k.project == "alpha"));
    assert_eq!((page.offset, page.limit), (0, 50));
    assert_eq!(m.list_keys_page(&OP, &all).await.unwrap().total, 4);

    let one = |q: &str| KeyListQuery {
        search: Some(q.to_owned()),
        ..KeyListQuery::default()
    };
    let found = m.list_keys_page(&lead, &one("ONE")).await.unwrap();
    assert_eq!(found.data.len(), 1, "beta one is another project's");
    assert_eq!(found.data[0].name, "Alpha One");
    let second = KeyListQuery {
        limit: Some(1),
        offset: Some(1),
        ..KeyListQuery::default()
    };
    let p = m.list_keys_page(&lead, &second).await.unwrap();
    assert_eq!((p.data.len(), p.total), (1, 3));

    let e = m.list_keys_page(&chatter, &all).await.unwrap_err();
    assert_eq!(e.status(), 403, "{e:?}");
    for bad in [
        KeyListQuery {
            limit: Some(0),
            ..KeyListQuery::default()
        },
        KeyListQuery {
            limit: Some(1001),
            ..KeyListQuery::default()
        },
        KeyListQuery {
            status: Some("gone".into()),
            ..KeyListQuery::default()
        },
    ] {
        let e = m.list_keys_page(&lead, &bad).await.unwrap_err();
        assert!(matches!(e, ManageError::Invalid(_)), "{bad:?}: {e:?}");
    }
}

/// docs/api.md#projects: an organisation-wide key (project `*`) is made
/// only by the operator or another such key; it lists, narrows to and acts
/// in every project, while a project's key may name only its own; no
/// provider key belongs to `*`.
#[tokio::test]
async fn boundary_organisation_wide_keys_see_every_project_and_project_keys_only_theirs() {
    let m = manager(None, None);
    let store = m.store().clone();
    let actor = |id| {
        let store = store.clone();
        async move { Actor::Key(Arc::new(store.get_key(&id).await.unwrap().unwrap())) }
    };
    let org_id = m
        .create_key(
            &OP,
            body(r#"{"name": "org", "project": "*", "permissions": ["*"]}"#),
        )
        .await
        .unwrap()
        .record
        .id;
    let org = actor(org_id).await;
    let lead_id = m
        .create_key(
            &org,
            body(r#"{"name": "lead", "project": "alpha", "permissions": ["keys:manage", "usage:read", "audit:read"]}"#),
        )
        .await
        .unwrap()
        .record
        .id;
    let lead = actor(lead_id).await;
    m.create_key(&org, body(r#"{"name": "b", "project": "beta"}"#))
        .await
        .unwrap();
    // Without a project, an organisation-wide key's new key is `default`'s.
    let plain = m.create_key(&org, body(r#"{"name": "d"}"#)).await.unwrap();
    assert_eq!(plain.record.project, "default");

    // A project's key cannot make one, nor reach another project.
    for json in [
        r#"{"name": "x", "project": "*"}"#,
        r#"{"name": "x", "project": "beta"}"#,
    ] {
        let e = m.create_key(&lead, body(json)).await.unwrap_err();
        assert_eq!(e, ManageError::ProjectMismatch, "{json}");
    }
    let in_beta = |project: &str| KeyListQuery {
        project: Some(project.to_owned()),
        ..KeyListQuery::default()
    };
    let e = m.list_keys_page(&lead, &in_beta("beta")).await.unwrap_err();
    assert_eq!(e, ManageError::ProjectMismatch);
    let e = m
        .usage(
            &lead,
            UsageQuery {
                project: Some("beta".into()),
                ..UsageQuery::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e, ManageError::ProjectMismatch);
    assert_eq!(
        m.list_keys_page(&lead, &in_beta("alpha"))
            .await
            .unwrap()
            .total,
        1
    );
    assert_eq!(m.list_projects(&lead).await.unwrap().data, ["alpha"]);

    // The organisation-wide key sees every project and narrows to one.
    assert_eq!(
        m.list_keys_page(&org, &KeyListQuery::default())
            .await
            .unwrap()
            .total,
        4
    );
    let beta = m.list_keys_page(&org, &in_beta("beta")).await.unwrap();
    assert_eq!(beta.total, 1);
    assert_eq!(beta.data[0].name, "b");
    assert_eq!(
        m.list_projects(&org).await.unwrap().data,
        ["alpha", "beta", "default"],
        "`*` itself is not a project to switch to"
    );
    let revoked = m.revoke_key(&org, &beta.data[0].id).await.unwrap();
    assert_eq!(revoked.revoked.len(), 1);

    // No provider key belongs to `*`.
    let pk: AddProviderKeyRequest = serde_json::from_str(
        r#"{"provider": "openai", "api_key": "sk-test-1234567890", "project": "*"}"#,
    )
    .unwrap();
    let e = m.add_provider_key(&org, pk).await.unwrap_err();
    assert!(
        matches!(&e, ManageError::Invalid(msg) if msg.starts_with("project")),
        "{e:?}"
    );
    assert!(m.list_provider_keys(&OP).await.unwrap().data.is_empty());
}

/// A key's page lists its sub-agent keys through the parent index: the
/// whole subtree, each after its parent, and nothing of other trees; another
/// project's key is 403 as for `get_key`.
#[tokio::test]
async fn boundary_a_key_tree_is_its_descendants_only() {
    let m = manager(None, None);
    let id = |r: vault_core::manage::IssuedKey| r.record.id;
    let root = id(m
        .create_key(&OP, body(r#"{"name": "root"}"#))
        .await
        .unwrap());
    let child = id(m
        .create_key(
            &OP,
            body(&format!(r#"{{"name": "child", "parent": "{root}"}}"#)),
        )
        .await
        .unwrap());
    let grandchild = id(m
        .create_key(
            &OP,
            body(&format!(r#"{{"name": "grandchild", "parent": "{child}"}}"#)),
        )
        .await
        .unwrap());
    let other = id(m
        .create_key(&OP, body(r#"{"name": "other"}"#))
        .await
        .unwrap());
    m.create_key(
        &OP,
        body(&format!(
            r#"{{"name": "other-child", "parent": "{other}"}}"#
        )),
    )
    .await
    .unwrap();
    let tree: Vec<_> = m
        .key_tree(&OP, &root)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(tree, [child.clone(), grandchild.clone()]);
    assert!(m.key_tree(&OP, &grandchild).await.unwrap().is_empty());

    let outsider = id(m
        .create_key(
            &OP,
            body(r#"{"name": "x", "project": "beta", "permissions": ["keys:manage"]}"#),
        )
        .await
        .unwrap());
    let outsider = Actor::Key(Arc::new(
        m.store().get_key(&outsider).await.unwrap().unwrap(),
    ));
    assert_eq!(
        m.key_tree(&outsider, &root).await.unwrap_err(),
        ManageError::ProjectMismatch
    );
}
