#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Key-validation timing (docs/threat-model.md, B1): the latency of rejecting a
//! well-formed unknown key and of rejecting a key that shares a real key's
//! shown prefix (its first 13 characters) with a different secret have the
//! same distribution, by a two-sample Kolmogorov–Smirnov statistic over
//! 10,000 interleaved samples each. Lookup is by SHA-256 of the whole key,
//! so nothing compares a presented secret with a stored one.
//!
//! The requests go straight into the `Vault` service with
//! `ServiceExt::oneshot` (no sockets) to keep the noise low.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::{GatewayOptions, budget_policy};
use tower::ServiceExt;
use vault_core::clock::{SharedClock, SystemClock};
use vault_core::crypto::{AesGcmEncryptor, MasterKey};
use vault_core::key::{KeyEnv, KeyFormat};
use vault_core::manage::CreateKeyRequest;
use vault_core::policy::{DefaultEngine, PlanSet};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::store::{KeyStore, MemoryStore};
use vault_tower::admin::{Actor, Admin};
use vault_tower::{Upstream, Upstreams, Vault, VaultContext};

/// Samples per class (the test runs unoptimised in CI: ~10 µs each).
const SAMPLES: usize = 10_000;
const WARM_UP: usize = 1_000;
/// Loose enough that CI noise cannot trip it; a real difference in the code
/// path (a prefix index, a byte-by-byte compare) separates the
/// distributions far more (compare the (a)–(b) and (d)–(b) statistics
/// printed).
const MAX_D: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// (a) Structurally invalid: refused by the parser.
    Invalid,
    /// (b) Valid shape, unknown.
    Unknown,
    /// (c) A real key's first 13 characters, then a different secret.
    KnownPrefix,
    /// (d) A revoked key.
    Revoked,
}

const CLASSES: [Class; 4] = [
    Class::Invalid,
    Class::Unknown,
    Class::KnownPrefix,
    Class::Revoked,
];

type Inner = tower::util::ServiceFn<
    fn(Request<Full<Bytes>>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
>;

fn never_called(
    _: Request<Full<Bytes>>,
) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    panic!("a rejected key reached the inner service")
}

/// A `Vault` over a service that must never be called, with one live key
/// and one revoked key; returns the service and both secrets.
async fn vault() -> (Vault<Inner>, String, String) {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let clock: SharedClock = Arc::new(SystemClock);
    let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let engine = Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(PriceTable::builtin()),
        clock.clone(),
    ));
    let mut upstreams = Upstreams::none();
    let timeouts = GatewayOptions::all_at("http://127.0.0.1:9").timeouts;
    upstreams.set(
        Provider::OpenAi,
        Upstream::new("http://127.0.0.1:9", timeouts).unwrap(),
    );
    let ctx = VaultContext::builder(store, encryptor, engine)
        .clock(clock)
        .upstreams(upstreams)
        .build();
    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    let new_key = || {
        CreateKeyRequest {
            name: Some("timing".into()),
            permissions: Some(vec!["chat:write".into()]),
            env: Some(KeyEnv::Live),
            ..CreateKeyRequest::default()
        }
        .with_policy(budget_policy(1.0))
    };
    let live = admin
        .manager()
        .create_key(&Actor::Operator, new_key())
        .await
        .unwrap();
    let revoked = admin
        .manager()
        .create_key(&Actor::Operator, new_key())
        .await
        .unwrap();
    admin
        .manager()
        .revoke_key(&Actor::Operator, &revoked.record.id)
        .await
        .unwrap();
    let inner: Inner = tower::service_fn(never_called as fn(_) -> _);
    (
        Vault::new(inner, ctx),
        live.key.expose_secret().to_owned(),
        revoked.key.expose_secret().to_owned(),
    )
}

/// The credential presented for one sample of `class`.
fn credential(class: Class, format: &KeyFormat, live: &str, revoked: &str) -> String {
    let fresh = format.generate(KeyEnv::Live).unwrap();
    let fresh = fresh.expose_secret();
    match class {
        // The right length and prefix, one character outside the alphabet.
        Class::Invalid => format!("{}-", &fresh[..fresh.len() - 1]),
        Class::Unknown => fresh.to_owned(),
        Class::KnownPrefix => format!("{}{}", &live[..13], &fresh[13..]),
        Class::Revoked => revoked.to_owned(),
    }
}

fn request(credential: &str) -> Request<Full<Bytes>> {
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    Request::builder()
        .method("POST")
        .uri("/openai/v1/chat/completions")
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// One rejection's latency in nanoseconds (the response is checked and
/// dropped outside the timed part).
async fn sample(svc: &Vault<Inner>, req: Request<Full<Bytes>>) -> u64 {
    let svc = svc.clone();
    let started = Instant::now();
    let resp = svc.oneshot(req).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    u64::try_from(elapsed.as_nanos()).unwrap()
}

/// The two-sample Kolmogorov–Smirnov statistic: the largest distance
/// between the two empirical distribution functions.
fn ks_statistic(a: &[u64], b: &[u64]) -> f64 {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0_f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] == x {
            i += 1;
        }
        while j < b.len() && b[j] == x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn ks_statistic_sees_equal_and_different_distributions() {
    let a: Vec<u64> = (0..1000).collect();
    assert_eq!(ks_statistic(&a, &a), 0.0);
    let shifted: Vec<u64> = (500..1500).collect();
    assert!((ks_statistic(&a, &shifted) - 0.5).abs() < 1e-9);
    let disjoint: Vec<u64> = (5000..6000).collect();
    assert_eq!(ks_statistic(&a, &disjoint), 1.0);
}

#[tokio::test]
async fn leak_unknown_and_known_prefix_keys_are_rejected_in_indistinguishable_time() {
    let (svc, live, revoked) = vault().await;
    let format = KeyFormat::default();
    assert!(
        format
            .parse(&credential(Class::Invalid, &format, &live, &revoked))
            .is_err()
    );

    // Every request is built before timing starts.
    let rounds = WARM_UP + SAMPLES;
    let mut requests: Vec<[Request<Full<Bytes>>; 4]> = (0..rounds)
        .map(|_| CLASSES.map(|c| request(&credential(c, &format, &live, &revoked))))
        .collect();

    let mut samples: [Vec<u64>; 4] = Default::default();
    // Interleave the classes, in an order that changes every round, so
    // drift and ordering effects fall on all of them alike.
    let mut state = 0x9E37_79B9_u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as usize
    };
    for (round, reqs) in requests.drain(..).enumerate() {
        // Fisher–Yates: every class precedes every other equally often.
        let mut order = [0usize, 1, 2, 3];
        for i in (1..order.len()).rev() {
            order.swap(i, next() % (i + 1));
        }
        let mut reqs = reqs.map(Some);
        for idx in order {
            let ns = sample(&svc, reqs[idx].take().unwrap()).await;
            if round >= WARM_UP {
                samples[idx].push(ns);
            }
        }
    }

    let [invalid, unknown, known_prefix, revoked_s] = &samples;
    let d_unknown_prefix = ks_statistic(unknown, known_prefix);
    let d_invalid_unknown = ks_statistic(invalid, unknown);
    let d_revoked_unknown = ks_statistic(revoked_s, unknown);
    println!(
        "medians (ns): invalid {}, unknown {}, known prefix {}, revoked {}",
        median(invalid),
        median(unknown),
        median(known_prefix),
        median(revoked_s)
    );
    println!(
        "KS D: unknown vs known prefix {d_unknown_prefix:.4}; invalid vs unknown {d_invalid_unknown:.4}; revoked vs unknown {d_revoked_unknown:.4}"
    );
    assert!(
        d_unknown_prefix < MAX_D,
        "an unknown key and a known prefix with a wrong secret are told apart by timing: D = {d_unknown_prefix:.4}"
    );
}
