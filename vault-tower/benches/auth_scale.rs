//! Authentication of a presented key as the proxy does it
//! (`VaultContext::presented_record`: take the credential from the headers,
//! strict parse, SHA-256, moka cache, else `SqliteStore::find_by_hash`) on
//! stores of 1k, 100k and 1M keys:
//!
//! - `hit`: the key's record is in the cache (1,000 keys cycled; the cache is
//!   refilled, untimed, before its 0.9 s TTL can expire any of them);
//! - `miss`: an existing key not in the cache (the cache is emptied, untimed,
//!   before each lookup; the H = min(10,000, N − 1) keys made with
//!   `KeyFormat` are cycled), so every lookup reads SQLite and finds it;
//! - `unknown`: a well-formed key that is not stored (1,024 cycled);
//! - `miss_leased`: `miss` with the store behind `LeasedStore`, as
//!   `vaultgate serve` runs it, and each of the H keys holding a budget
//!   lease (as after a call on it): what a cache miss costs once H keys
//!   have been used.
//!
//! One key is created through `Admin::create_key` with
//! `bench/bench.policy.yaml`; the store is filled by copying it
//! (`SqliteStore::copy_key_for_bench`). Before measuring, each size checks
//! that a cached record is served without the store and that an emptied
//! cache reads the store. First of all, the bench prints how much the
//! process grows when 10,000 key records are cached. Setting up 1M keys
//! takes about 15 s.
//!
//! Each sample runs inside one `block_on`, so the timed lookups are awaited
//! as on the server, without entering the runtime per lookup.
//!
//! Run: `cargo bench -p vault-tower --bench auth_scale -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderValue};
use tokio::runtime::Runtime;
use vault_core::clock::{Clock, SystemClock, UnixMillis};
use vault_core::crypto::{AesGcmEncryptor, MasterKey};
use vault_core::denial::Denial;
use vault_core::key::{KeyEnv, KeyFormat, KeyHash, KeyId};
use vault_core::manage::CreateKeyRequest;
use vault_core::money::Micros;
use vault_core::policy::{DefaultEngine, PlanSet, parse_policy_yaml};
use vault_core::pricing::PriceTable;
use vault_core::record::{BudgetLine, KeyRecord, KeyStatus};
use vault_core::store::{KeyStore, LeasedStore, SqliteStore};
use vault_tower::VaultContext;
use vault_tower::admin::{Actor, Admin};

/// The benchmark key's policy, as `bench/scale.sh` and `bench/run.sh` use.
const POLICY: &str = include_str!("../../bench/bench.policy.yaml");

/// Keys whose plaintext is known (the rest get random hashes).
const KNOWN: usize = 10_000;
/// Keys cycled by the `hit` bench.
const HIT_SET: usize = 1_000;
/// Unknown keys cycled by the `unknown` bench.
const UNKNOWN: usize = 1_024;
/// Refill the cache for `hit` once this much time has passed since the last
/// refill began: well inside `KEY_CACHE_TTL` (0.9 s), so no timed lookup
/// meets an expired entry.
const REFILL_AFTER: Duration = Duration::from_millis(400);
/// Hits timed together between refill checks.
const CHUNK: u64 = 256;

struct Scale {
    _dir: tempfile::TempDir,
    ctx: Arc<VaultContext>,
    store: Arc<SqliteStore>,
    template: KeyId,
    template_key: HeaderMap,
    known: Vec<HeaderMap>,
    known_hashes: Vec<KeyHash>,
    unknown: Vec<HeaderMap>,
}

fn bearer(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    h
}

/// A context over `store`, as the server builds it (no audit log).
fn context(store: Arc<dyn KeyStore>) -> Arc<VaultContext> {
    let enc = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        Arc::new(SystemClock),
    ));
    VaultContext::builder(store, enc, engine).build()
}

async fn setup(n: usize) -> Scale {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open_in_dir(&dir.path().join("data")).unwrap());
    let ctx = context(store.clone());
    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    let issued = admin
        .manager()
        .create_key(
            &Actor::Operator,
            CreateKeyRequest {
                name: Some("bench".to_owned()),
                permissions: Some(vec!["chat:write".to_owned()]),
                ..CreateKeyRequest::default()
            }
            .with_policy(
                parse_policy_yaml(POLICY, "bench.policy.yaml")
                    .unwrap()
                    .policy,
            ),
        )
        .await
        .unwrap();

    let format = KeyFormat::default();
    let known: Vec<_> = (0..KNOWN.min(n - 1))
        .map(|_| format.generate(KeyEnv::Live).unwrap())
        .collect();
    let stored = store
        .copy_key_for_bench(
            &issued.record.id,
            known.iter().map(|k| (k.hash(), k.prefix())).collect(),
            n - 1 - known.len(),
        )
        .await
        .unwrap();
    assert_eq!(stored, n);
    let unknown = (0..UNKNOWN)
        .map(|_| bearer(format.generate(KeyEnv::Live).unwrap().expose_secret()))
        .collect();
    eprintln!("auth_scale: stored {n} keys in {:.1?}", started.elapsed());
    Scale {
        _dir: dir,
        ctx,
        store,
        template: issued.record.id,
        template_key: bearer(issued.key.expose_secret()),
        known: known.iter().map(|k| bearer(k.expose_secret())).collect(),
        known_hashes: known.iter().map(|k| k.hash()).collect(),
        unknown,
    }
}

fn lookup(rt: &Runtime, ctx: &VaultContext, key: &HeaderMap) -> Arc<KeyRecord> {
    rt.block_on(ctx.presented_record(key, None)).unwrap()
}

/// This process's resident set, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What the benches rely on: a cached record is served without the store,
/// and after `invalidate_keys` the store is read. The template key is
/// revoked behind the cache's back: the cache still says active, the store
/// says revoked.
fn check_cache(rt: &Runtime, s: &Scale) {
    s.ctx.invalidate_keys();
    assert_eq!(
        lookup(rt, &s.ctx, &s.template_key).status,
        KeyStatus::Active
    );
    rt.block_on(s.store.revoke_key(&s.template, UnixMillis(2)))
        .unwrap();
    assert_eq!(
        lookup(rt, &s.ctx, &s.template_key).status,
        KeyStatus::Active,
        "a cached record must not read the store"
    );
    s.ctx.invalidate_keys();
    assert_eq!(
        lookup(rt, &s.ctx, &s.template_key).status,
        KeyStatus::Revoked,
        "an emptied cache must read the store"
    );
}

/// How much the process grows when 10,000 key records are cached (moka
/// entries in both key caches and the records they share). The cost does not
/// depend on the store's size, so it is measured once, first, before other
/// stores' freed memory can be reused: SQLite's page caches are filled
/// first by reading every key straight from the store, then RSS is read
/// around caching them.
fn report_cache_memory(rt: &Runtime) {
    let s = rt.block_on(setup(KNOWN + 1));
    rt.block_on(async {
        for hash in &s.known_hashes {
            assert!(s.store.find_by_hash(hash).await.unwrap().is_some());
        }
        let before = rss_kb();
        for k in &s.known {
            s.ctx.presented_record(k, None).await.unwrap();
        }
        let grew = rss_kb().saturating_sub(before);
        eprintln!(
            "auth_scale: caching {} key records grew RSS by {grew} kB ({} B per key)",
            s.known.len(),
            grew * 1024 / s.known.len() as u64
        );
    });
}

/// The same store behind `LeasedStore`, as `vaultgate serve` runs it, with
/// a budget lease on each known key's line (one call's reservation open on
/// it, as in the middle of a call).
async fn leased_context(s: &Scale) -> Arc<VaultContext> {
    let started = Instant::now();
    let leased = Arc::new(LeasedStore::new(s.store.as_ref().clone()));
    let ctx = context(leased.clone());
    let now = SystemClock.now();
    for k in &s.known {
        let line = BudgetLine {
            key: s.ctx.presented_record(k, None).await.unwrap().id.clone(),
            limit: Micros(1_000_000_000_000),
            period_start: UnixMillis(0),
        };
        let want = Micros(1_000);
        let expires = UnixMillis(now.0 + 600_000);
        leased
            .reserve(&line, want, want, now, expires)
            .await
            .unwrap();
    }
    eprintln!(
        "auth_scale: leased {} budget lines in {:.1?}",
        s.known.len(),
        started.elapsed()
    );
    ctx
}

/// Times lookups of `keys`, cycled, each on an emptied cache.
fn bench_miss(
    rt: &Runtime,
    ctx: &VaultContext,
    keys: &[HeaderMap],
    b: &mut criterion::Bencher<'_>,
) {
    let mut i = 0;
    b.iter_custom(|iters| {
        rt.block_on(async {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                i = (i + 1) % keys.len();
                ctx.invalidate_keys();
                let t = Instant::now();
                black_box(ctx.presented_record(&keys[i], None).await.unwrap());
                timed += t.elapsed();
            }
            timed
        })
    })
}

fn auth_scale(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    report_cache_memory(&rt);
    let mut group = c.benchmark_group("auth_scale");
    for (label, n) in [("1k", 1_000), ("100k", 100_000), ("1M", 1_000_000)] {
        let s = rt.block_on(setup(n));
        check_cache(&rt, &s);

        let hot = &s.known[..HIT_SET.min(s.known.len())];
        group.bench_function(BenchmarkId::new("hit", label), |b| {
            let mut i = 0;
            let mut refilled: Option<Instant> = None;
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        if refilled.is_none_or(|at| at.elapsed() > REFILL_AFTER) {
                            let at = Instant::now();
                            s.ctx.invalidate_keys();
                            for k in hot {
                                s.ctx.presented_record(k, None).await.unwrap();
                            }
                            refilled = Some(at);
                        }
                        let chunk = left.min(CHUNK);
                        let t = Instant::now();
                        for _ in 0..chunk {
                            i = (i + 1) % hot.len();
                            black_box(s.ctx.presented_record(&hot[i], None).await.unwrap());
                        }
                        timed += t.elapsed();
                        left -= chunk;
                    }
                    timed
                })
            })
        });

        group.bench_function(BenchmarkId::new("miss", label), |b| {
            bench_miss(&rt, &s.ctx, &s.known, b)
        });

        group.bench_function(BenchmarkId::new("unknown", label), |b| {
            let mut i = 0;
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        i = (i + 1) % s.unknown.len();
                        let got = s.ctx.presented_record(&s.unknown[i], None).await;
                        assert_eq!(got.err(), Some(Denial::InvalidApiKey));
                    }
                    t.elapsed()
                })
            })
        });

        let leased = rt.block_on(leased_context(&s));
        group.bench_function(BenchmarkId::new("miss_leased", label), |b| {
            bench_miss(&rt, &leased, &s.known, b)
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = auth_scale
}
criterion_main!(benches);
