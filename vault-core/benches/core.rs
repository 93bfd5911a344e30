//! Hot-path costs of vault-core: key generation, parsing and hashing a
//! presented key, sealing and opening a provider key, and finding a key by
//! hash in SQLite with 1k and 1M keys stored, and reading usage from a
//! response. Results go in BENCHMARKS.md.
//!
//! Run: `cargo bench -p vault-core --bench core -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use vault_core::clock::UnixMillis;
use vault_core::crypto::{Aad, AesGcmEncryptor, Encryptor, MasterKey, ProviderSecret};
use vault_core::key::{KeyEnv, KeyFormat, KeyHash, KeyId, KeyPrefix};
use vault_core::meter::{BodyKind, UsageMeter};
use vault_core::money::Micros;
use vault_core::policy::Policy;
use vault_core::provider::Provider;
use vault_core::provider::UsageFormat;
use vault_core::record::{KeyRecord, KeyStatus};
use vault_core::scope::Scopes;
use vault_core::store::{KeyStore, SqliteStore};

fn aad() -> Aad<'static> {
    Aad {
        record_id: "pk_bench0000000000",
        project: "default",
        provider: Provider::OpenAi,
    }
}

fn keys_and_crypto(c: &mut Criterion) {
    let format = KeyFormat::default();
    let key = format.generate(KeyEnv::Live).unwrap();
    let presented = key.expose_secret().to_owned();
    let enc = AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap();
    let secret = ProviderSecret::new("sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEF".into());
    let sealed = enc.seal(&secret, &aad()).unwrap();

    c.bench_function("key_generate", |b| {
        b.iter(|| format.generate(KeyEnv::Live).unwrap())
    });
    c.bench_function("key_parse_hash", |b| {
        b.iter(|| format.parse(black_box(&presented)).unwrap().hash())
    });
    c.bench_function("seal", |b| b.iter(|| enc.seal(&secret, &aad()).unwrap()));
    c.bench_function("open", |b| {
        b.iter(|| enc.open(black_box(&sealed), &aad()).unwrap())
    });
    c.bench_function("parse_hash_open", |b| {
        b.iter(|| {
            let hash = format.parse(black_box(&presented)).unwrap().hash();
            let opened = enc.open(black_box(&sealed), &aad()).unwrap();
            (hash, opened)
        })
    });
}

fn template_key() -> KeyRecord {
    let id = KeyId::generate().unwrap();
    KeyRecord {
        hash: KeyHash::of(id.as_str()),
        prefix: KeyPrefix::new("vpx_live_Ab3x"),
        previous_hash: None,
        previous_valid_until: None,
        name: "bench".into(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: Some("pro".into()),
        policy: Policy::default(),
        parent: None,
        provider_keys: Vec::new(),
        created_at: UnixMillis(1),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    }
}

/// A store holding `n` keys: one inserted through the store API, the rest
/// copied from it in one SQL transaction (`SqliteStore::copy_key_for_bench`;
/// the store API commits and fsyncs every insert on its own, which for 1M
/// keys would take hours). Returns the store and 1024 stored hashes, spread
/// among the others.
fn store_with_keys(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    n: usize,
) -> (SqliteStore, Vec<KeyHash>) {
    let started = Instant::now();
    let store = SqliteStore::open_in_dir(dir).unwrap();
    let template = template_key();
    rt.block_on(store.insert_key(&template, None)).unwrap();
    let hashes: Vec<KeyHash> = (0..1024.min(n - 1))
        .map(|i| KeyHash::of(&format!("bench key {i}")))
        .collect();
    let known = hashes
        .iter()
        .map(|h| (*h, template.prefix.clone()))
        .collect();
    let random = n - 1 - hashes.len();
    let stored = rt
        .block_on(store.copy_key_for_bench(&template.id, known, random))
        .unwrap();
    assert_eq!(stored, n);
    eprintln!("stored {n} keys in {:.1?}", started.elapsed());
    (store, hashes)
}

fn find_by_hash(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("sqlite_find_by_hash");
    for (label, n) in [("1k", 1_000), ("1M", 1_000_000)] {
        let dir = tempfile::tempdir().unwrap();
        let (store, hashes) = store_with_keys(&rt, &dir.path().join("data"), n);
        let mut i = 0;
        group.bench_function(label, |b| {
            b.iter(|| {
                i = (i + 1) % hashes.len();
                let found = rt.block_on(store.find_by_hash(&hashes[i])).unwrap();
                assert!(found.is_some());
                found
            })
        });
        // A miss (an unknown key) costs the same index probe.
        group.bench_function(format!("{label}_miss"), |b| {
            let unknown = KeyHash::of("vpx_live_unknownunknownunknown");
            b.iter(|| rt.block_on(store.find_by_hash(&unknown)).unwrap())
        });
    }
    group.finish();
}

/// The OpenAI chat completion the layer bench's inner service returns.
const OPENAI_BODY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21},"system_fingerprint":"fp_bench"}"#;

/// An Anthropic stream: start, one text delta, the final usage, stop.
const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-3-5-haiku-20241022","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
    "\n\nevent: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello! How can I help you today?"}}"#,
    "\n\nevent: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
    "\n\nevent: message_stop\n",
    r#"data: {"type":"message_stop"}"#,
    "\n\n",
);

fn usage_meter(c: &mut Criterion) {
    c.bench_function("usage_meter_openai_json", |b| {
        b.iter(|| {
            let mut m = UsageMeter::new(UsageFormat::OpenAi, BodyKind::Json);
            m.feed(black_box(OPENAI_BODY.as_bytes()));
            m.finish().unwrap()
        })
    });
    c.bench_function("usage_meter_anthropic_sse", |b| {
        b.iter(|| {
            let mut m = UsageMeter::new(UsageFormat::Anthropic, BodyKind::Sse);
            m.feed(black_box(ANTHROPIC_STREAM.as_bytes()));
            m.finish().unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = usage_meter, keys_and_crypto, find_by_hash
}
criterion_main!(benches);
