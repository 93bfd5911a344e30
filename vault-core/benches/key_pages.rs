//! The dashboard's key list with 100,000 keys in SQLite: one page (the
//! first and the last), a search by name and each status filter, through
//! `Manager::list_keys_page` as the API Keys page calls it
//! (docs/dashboard.md#api-keys); and what every dashboard request adds:
//! the session read and touch, and the project switcher's list. Results go
//! in BENCHMARKS.md.
//!
//! Run: `cargo bench -p vault-core --bench key_pages -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use vault_core::clock::UnixMillis;
use vault_core::crypto::{AesGcmEncryptor, MasterKey};
use vault_core::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
use vault_core::manage::{Actor, KeyListQuery, Manager};
use vault_core::money::Micros;
use vault_core::policy::{Budget, BudgetPeriod, Policy};
use vault_core::record::{ALL_PROJECTS, KeyRecord, KeyStatus};
use vault_core::scope::Scopes;
use vault_core::store::{KeyStore, SessionPurge, SessionRecord, SessionStore, SqliteStore};

const KEYS: usize = 100_000;
const NEEDLES: usize = 10;

fn key(name: &str, created_at: i64) -> KeyRecord {
    let id = KeyId::generate().unwrap();
    KeyRecord {
        hash: KeyHash::of(id.as_str()),
        prefix: KeyPrefix::new(format!("vpx_live_{}", &id.as_str()[4..8])),
        previous_hash: None,
        previous_valid_until: None,
        name: name.to_owned(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: None,
        // A lifetime budget, so the status filters evaluate it on every row.
        policy: Policy {
            budget: Some(Budget {
                limit: Micros(5_000_000),
                period: BudgetPeriod::Total,
                clamp_explicit_limits: false,
            }),
            ..Policy::default()
        },
        parent: None,
        provider_keys: Vec::new(),
        created_at: UnixMillis(created_at),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    }
}

/// 100,000 keys of one project: a template copied in one SQL transaction
/// (`SqliteStore::copy_key_for_bench`; inserting each through the store API
/// fsyncs each), plus ten `needle-<n>` keys inserted through the API.
fn manager_with_keys(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> (Manager, SqliteStore) {
    let started = Instant::now();
    let store = SqliteStore::open_in_dir(dir).unwrap();
    let mut template = key("bench template", 1);
    // Some spend, under the budget: the status filters compare it on every
    // row (a key that spent nothing cannot be exhausted).
    template.spend = Micros(1_000_000);
    rt.block_on(store.insert_key(&template, None)).unwrap();
    let copies = KEYS - 1 - NEEDLES;
    let stored = rt
        .block_on(store.copy_key_for_bench(&template.id, Vec::new(), copies))
        .unwrap();
    for i in 0..NEEDLES {
        let k = key(&format!("needle-{i}"), 2 + i as i64);
        rt.block_on(store.insert_key(&k, None)).unwrap();
    }
    assert_eq!(stored + NEEDLES, KEYS);
    eprintln!("stored {KEYS} keys in {:.1?}", started.elapsed());
    let enc = AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap();
    let m = Manager::builder(Arc::new(store.clone()), Arc::new(enc)).build();
    (m, store)
}

fn lead() -> Actor {
    let mut k = key("lead", 0);
    k.scopes = Scopes::parse(&["keys:manage"]).unwrap();
    Actor::Key(Arc::new(k))
}

fn key_pages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (m, store) = manager_with_keys(&rt, &dir.path().join("data"));
    let actor = lead();
    let page = |offset: u64| KeyListQuery {
        limit: Some(50),
        offset: Some(offset),
        ..KeyListQuery::default()
    };
    let cases: Vec<(&str, KeyListQuery, u64)> = vec![
        ("first_page", page(0), KEYS as u64),
        ("last_page", page(KEYS as u64 - 50), KEYS as u64),
        (
            "search_name",
            KeyListQuery {
                search: Some("Needle-7".into()),
                ..page(0)
            },
            1,
        ),
        (
            "status_active",
            KeyListQuery {
                status: Some("active".into()),
                ..page(0)
            },
            KEYS as u64,
        ),
        (
            "status_exhausted",
            KeyListQuery {
                status: Some("exhausted".into()),
                ..page(0)
            },
            0,
        ),
    ];
    let mut group = c.benchmark_group("key_page_100k");
    for (label, query, total) in cases {
        group.bench_function(label, |b| {
            b.iter(|| {
                let found = rt.block_on(m.list_keys_page(&actor, &query)).unwrap();
                assert_eq!(found.total, total, "{label}");
                found
            })
        });
    }
    group.finish();

    // What a dashboard request adds on top of its page
    // (docs/dashboard.md#sessions): reading its session (written at most
    // once a minute), and for an organisation-wide key the switcher's
    // project list, over 100,000 keys and 1,000 open sessions.
    let org = {
        let mut k = key("org", 0);
        k.project = ALL_PROJECTS.into();
        k.scopes = Scopes::parse(&["*"]).unwrap();
        Actor::Key(Arc::new(k))
    };
    let keep_all = SessionPurge {
        idle_before: UnixMillis(0),
        created_before: UnixMillis(0),
        keep: 10_000,
    };
    for i in 0..1000u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let s = SessionRecord {
            key_hash: KeyHash::of(&i.to_string()),
            csrf: "0".repeat(64),
            project: None,
            created: UnixMillis(1),
            last_seen: UnixMillis(1),
        };
        rt.block_on(store.open_session(&id, &s, keep_all)).unwrap();
    }
    let mut id = [0u8; 32];
    id[..4].copy_from_slice(&500u32.to_be_bytes());
    let mut group = c.benchmark_group("dashboard_request_100k");
    group.bench_function("list_projects", |b| {
        b.iter(|| {
            let projects = rt.block_on(m.list_projects(&org)).unwrap();
            assert_eq!(projects.data, ["default"]);
            projects
        })
    });
    group.bench_function("session_read", |b| {
        b.iter(|| rt.block_on(store.session(&id)).unwrap().unwrap())
    });
    let mut now = 1;
    group.bench_function("session_touch", |b| {
        b.iter(|| {
            now += 1;
            rt.block_on(store.touch_session(&id, UnixMillis(now)))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, key_pages);
criterion_main!(benches);
