#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The library owns its maintenance: an app assembled like
//! `examples/axum_app.rs` (`VaultContext::start_maintenance`) gets stuck
//! reservations swept without any code of its own, and its shutdown writes
//! what is queued.

use std::sync::Arc;
use std::time::Duration;

use vault_core::clock::{SystemClock, UnixMillis};
use vault_core::crypto::{AesGcmEncryptor, MasterKey};
use vault_core::key::KeyEnv;
use vault_core::manage::CreateKeyRequest;
use vault_core::money::Micros;
use vault_core::policy::{
    Budget, BudgetPeriod, DefaultEngine, PlanSet, Policy, PolicyEngine, RequestFacts,
};
use vault_core::pricing::PriceTable;
use vault_core::provider::Provider;
use vault_core::record::BudgetLine;
use vault_core::store::{KeyStore, MemoryStore};
use vault_tower::VaultContext;
use vault_tower::admin::{Actor, Admin};

#[tokio::test]
async fn lifecycle_an_embedded_vault_sweeps_an_abandoned_reservation() {
    let store = Arc::new(MemoryStore::new());
    let engine = Arc::new(
        DefaultEngine::new(
            store.clone(),
            Arc::new(PriceTable::builtin()),
            Arc::new(SystemClock),
        )
        .with_reservation_ttl(Duration::from_millis(100)),
    );
    let encryptor = Arc::new(AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap());
    let ctx = VaultContext::builder(store.clone(), encryptor, engine.clone())
        .sweep_interval(Duration::from_millis(20))
        .build();
    let maintenance = ctx.start_maintenance();

    let admin = Admin::new(ctx.clone(), Arc::new(PlanSet::seeded()));
    let limit = Micros::from_usd(5.0).unwrap();
    let issued = admin
        .manager()
        .create_key(
            &Actor::Operator,
            CreateKeyRequest {
                name: Some("embedded".into()),
                permissions: Some(vec!["chat:write".into()]),
                env: Some(KeyEnv::Live),
                ..CreateKeyRequest::default()
            }
            .with_policy(Policy {
                budget: Some(Budget {
                    limit,
                    period: BudgetPeriod::Total,
                    clamp_explicit_limits: false,
                }),
                ..Policy::default()
            }),
        )
        .await
        .unwrap();
    let record = ctx
        .store()
        .get_key(&issued.record.id)
        .await
        .unwrap()
        .unwrap();
    let chain = vec![Arc::new(record)];
    let facts = RequestFacts {
        method: "POST",
        provider: Provider::OpenAi,
        path: "/v1/chat/completions",
        model: Some("gpt-4o-mini"),
        max_output_tokens: Some(1000),
        body_chars: 100,
        stream: false,
        input_tokens_bound: 100,
        input_unbounded: false,
        output_multiplier: 1,
        multipart: false,
    };
    // A call admitted and then lost: its grant is never settled.
    let grant = engine.check(&chain, &facts).await.unwrap();
    let held = grant.reservation.as_ref().unwrap().amount;
    std::mem::forget(grant);
    let line = BudgetLine {
        key: issued.record.id.clone(),
        limit,
        period_start: UnixMillis(0),
    };
    let now = || vault_core::clock::Clock::now(&SystemClock);
    assert_eq!(
        store.budget_usage(&line, now()).await.unwrap().reserved,
        held
    );

    // Past its expiry, the maintenance the library runs charges it (it may
    // have reached the provider) and holds nothing more.
    let swept = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let usage = store.budget_usage(&line, now()).await.unwrap();
            if usage.reserved == Micros::ZERO {
                return usage;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the maintenance never swept the abandoned reservation");
    assert_eq!(swept.settled, held);
    maintenance.shutdown().await;
}
