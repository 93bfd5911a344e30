//! The budget cases of docs/threat-model.md (I1–I4, I7), through
//! [`DefaultEngine`] over a store under test: racing requests never pass a
//! cap, carve-outs of child keys, calls that would escape their bound, and
//! periods rolling over at UTC midnight. The engine's clock is a
//! [`ManualClock`]; stores take every time from the caller.

use std::sync::Arc;

use tokio::sync::Barrier;

use super::StoreFactory;
use crate::clock::{Clock, ManualClock, UnixMillis};
use crate::denial::Denial;
use crate::key::{KeyEnv, KeyHash, KeyId, KeyPrefix};
use crate::money::Micros;
use crate::policy::{
    Budget, BudgetPeriod, CallOutcome, DefaultEngine, Policy, PolicyEngine, RequestFacts,
};
use crate::pricing::{ModelPrice, PriceTable};
use crate::provider::Provider;
use crate::record::{BudgetLine, KeyRecord, KeyStatus};
use crate::scope::Scopes;
use crate::store::StoreError;

/// 2026-11-26T08:00:00Z.
const T0: i64 = 1_795_680_000_000;

/// Input free, output $10 per million, at most 1000 output tokens: a call
/// with `max_tokens: 1000` and an empty body reserves exactly $0.01.
fn price() -> ModelPrice {
    ModelPrice::from_usd_per_million(0.0, 10.0, 1000).unwrap()
}

const CENT: Micros = Micros(10_000);

fn engine(store: &super::Store, clock: &ManualClock) -> Arc<DefaultEngine> {
    let prices = PriceTable::builtin().with_override(Provider::OpenAi, "test-model", price());
    Arc::new(DefaultEngine::new(
        store.clone(),
        Arc::new(prices),
        Arc::new(clock.clone()),
    ))
}

fn budget_key(budget: Micros, period: BudgetPeriod, parent: Option<&KeyRecord>) -> KeyRecord {
    let id = KeyId::generate().unwrap();
    KeyRecord {
        hash: KeyHash::of(id.as_str()),
        prefix: KeyPrefix::new("vpx_live_test"),
        previous_hash: None,
        previous_valid_until: None,
        name: id.to_string(),
        project: "default".into(),
        env: KeyEnv::Live,
        scopes: Scopes::parse(&["chat:write"]).unwrap(),
        plan: None,
        policy: Policy {
            budget: Some(Budget {
                limit: budget,
                period,
                clamp_explicit_limits: false,
            }),
            ..Policy::default()
        },
        parent: parent.map(|p| p.id.clone()),
        provider_keys: vec![],
        created_at: UnixMillis(T0 - 1000),
        expires_at: None,
        last_used_at: None,
        request_count: 0,
        status: KeyStatus::Active,
        revoked_at: None,
        spend: Micros::ZERO,
        id,
    }
}

fn facts(model: &str, max_tokens: Option<u64>) -> RequestFacts<'_> {
    RequestFacts {
        method: "POST",
        provider: Provider::OpenAi,
        path: "/v1/chat/completions",
        model: Some(model),
        max_output_tokens: max_tokens,
        body_chars: 0,
        stream: false,
        input_tokens_bound: 0,
        input_unbounded: false,
        output_multiplier: 1,
        multipart: false,
    }
}

fn line_of(k: &KeyRecord, period_start: i64) -> BudgetLine {
    let b = k.policy.budget.unwrap();
    BudgetLine {
        key: k.id.clone(),
        limit: b.limit,
        period_start: UnixMillis(period_start),
    }
}

/// Runs `n` concurrent checks of `chain` released together, settles every
/// grant at its reservation (`Unmetered`), and returns how many were
/// admitted. Every refusal must be `budget_exceeded`.
async fn race(engine: &Arc<DefaultEngine>, chain: Vec<Arc<KeyRecord>>, n: usize) -> usize {
    let chain = Arc::new(chain);
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (engine, chain, barrier) = (engine.clone(), chain.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match engine.check(&chain, &facts("test-model", Some(1000))).await {
                Ok(grant) => {
                    assert_eq!(grant.reservation.as_ref().unwrap().amount, CENT);
                    assert_eq!(grant.clamp_output_tokens, None);
                    let charge = engine.settle(grant, CallOutcome::Unmetered, None).await;
                    assert_eq!(charge.cost, CENT);
                    true
                }
                Err((d, h)) => {
                    assert_eq!(d.code(), "budget_exceeded", "{d:?}");
                    assert!(h.budget_remaining.is_some_and(|r| r < CENT));
                    false
                }
            }
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    admitted
}

/// I1: 200 checks racing a $0.50 cap at $0.01 each admit exactly 50, a hundred
/// rounds over; nothing stays reserved and spend never passes the cap.
pub async fn concurrency_i1_racing_the_cap_admits_exactly_what_fits(factory: impl StoreFactory) {
    let under_test = factory.fresh();
    let store = under_test.store();
    let clock = ManualClock::new(UnixMillis(T0));
    let engine = engine(&store, &clock);
    for round in 0..100 {
        let k = budget_key(Micros(500_000), BudgetPeriod::Total, None);
        store.insert_key(&k, None).await.unwrap();
        let admitted = race(&engine, vec![Arc::new(k.clone())], 200).await;
        assert_eq!(admitted, 50, "round {round}");
        let usage = store
            .budget_usage(&line_of(&k, 0), clock.now())
            .await
            .unwrap();
        assert_eq!(usage.settled, Micros(500_000));
        assert_eq!(usage.reserved, Micros::ZERO);
        let stored = store.get_key(&k.id).await.unwrap().unwrap();
        assert!(stored.spend <= Micros(500_000));
    }
}

/// I2: checks racing the first reservations of a key or child created just now
/// admit exactly what fits (7 of 100, then 5 of 100).
pub async fn concurrency_i2_racing_a_fresh_key_and_a_fresh_child(factory: impl StoreFactory) {
    let under_test = factory.fresh();
    let store = under_test.store();
    let clock = ManualClock::new(UnixMillis(T0));
    let engine = engine(&store, &clock);
    // A key created just now: no counter row exists before the race.
    let fresh = budget_key(Micros(70_000), BudgetPeriod::Daily, None);
    store.insert_key(&fresh, None).await.unwrap();
    assert_eq!(race(&engine, vec![Arc::new(fresh)], 100).await, 7);

    // A child carved out of its parent just now.
    let parent = budget_key(Micros(1_000_000), BudgetPeriod::Total, None);
    store.insert_key(&parent, None).await.unwrap();
    let child = budget_key(Micros(50_000), BudgetPeriod::Total, Some(&parent));
    store
        .insert_key(&child, Some((&line_of(&parent, 0), Micros(50_000))))
        .await
        .unwrap();
    let chain = vec![Arc::new(child.clone()), Arc::new(parent.clone())];
    assert_eq!(race(&engine, chain, 100).await, 5);
    let usage = store
        .budget_usage(&line_of(&child, 0), clock.now())
        .await
        .unwrap();
    assert_eq!(usage.settled, Micros(50_000));
}

/// I3: two concurrent $3 children of a $5 parent, exactly one created; children
/// spending at once never push the parent past its cap; revoking the parent
/// stops its children and settles their carve-outs at what they spent.
pub async fn concurrency_i3_child_carve_outs(factory: impl StoreFactory) {
    let under_test = factory.fresh();
    let store = under_test.store();
    let clock = ManualClock::new(UnixMillis(T0));
    let engine = engine(&store, &clock);

    // Two concurrent $3 children of a $5 parent: exactly one is created.
    let parent = budget_key(Micros(5_000_000), BudgetPeriod::Total, None);
    store.insert_key(&parent, None).await.unwrap();
    let parent_line = line_of(&parent, 0);
    let mut tasks = Vec::new();
    let barrier = Arc::new(Barrier::new(2));
    for _ in 0..2 {
        let (store, line, barrier) = (store.clone(), parent_line.clone(), barrier.clone());
        let child = budget_key(Micros(3_000_000), BudgetPeriod::Total, Some(&parent));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .insert_key(&child, Some((&line, Micros(3_000_000))))
                .await
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => created += 1,
            Err(StoreError::BudgetExceeded { remaining }) => {
                assert_eq!(remaining, Micros(2_000_000));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created, 1);

    // Children spending concurrently never push the parent over its cap.
    let parent = budget_key(Micros(100_000), BudgetPeriod::Total, None);
    store.insert_key(&parent, None).await.unwrap();
    let parent_line = line_of(&parent, 0);
    let a = budget_key(Micros(60_000), BudgetPeriod::Total, Some(&parent));
    let c = budget_key(Micros(40_000), BudgetPeriod::Total, Some(&parent));
    store
        .insert_key(&a, Some((&parent_line, Micros(60_000))))
        .await
        .unwrap();
    store
        .insert_key(&c, Some((&parent_line, Micros(40_000))))
        .await
        .unwrap();
    let late = budget_key(Micros(1), BudgetPeriod::Total, Some(&parent));
    assert!(matches!(
        store
            .insert_key(&late, Some((&parent_line, Micros(1))))
            .await,
        Err(StoreError::BudgetExceeded { .. })
    ));
    // The parent itself cannot spend what its children hold.
    let parent_chain = vec![Arc::new(parent.clone())];
    assert_eq!(
        engine
            .check(&parent_chain, &facts("test-model", Some(1000)))
            .await
            .unwrap_err()
            .0
            .code(),
        "budget_exceeded"
    );
    let pa = tokio::spawn({
        let engine = engine.clone();
        let chain = vec![Arc::new(a.clone()), Arc::new(parent.clone())];
        async move { race(&engine, chain, 50).await }
    });
    let pc = tokio::spawn({
        let engine = engine.clone();
        let chain = vec![Arc::new(c.clone()), Arc::new(parent.clone())];
        async move { race(&engine, chain, 50).await }
    });
    assert_eq!((pa.await.unwrap(), pc.await.unwrap()), (6, 4));
    let usage = store.budget_usage(&parent_line, clock.now()).await.unwrap();
    assert!(
        usage.settled.saturating_add(usage.reserved) <= Micros(100_000),
        "{usage:?}"
    );

    // Revoking the parent stops its children at once and settles their
    // carve-outs at what they spent: the parent's spend stays under its cap.
    store.revoke_key(&parent.id, clock.now()).await.unwrap();
    let child_now = store.get_key(&a.id).await.unwrap().unwrap();
    let parent_now = store.get_key(&parent.id).await.unwrap().unwrap();
    let chain = vec![Arc::new(child_now), Arc::new(parent_now)];
    let (d, _) = engine
        .check(&chain, &facts("test-model", Some(1)))
        .await
        .unwrap_err();
    assert_eq!(d, Denial::KeyRevoked);
    let usage = store.budget_usage(&parent_line, clock.now()).await.unwrap();
    assert_eq!(usage.settled, Micros(100_000));
    assert_eq!(usage.reserved, Micros::ZERO);
}

/// I4: a call without an output limit reserves the model's maximum output (and
/// its bounded input) at the dearest price; a model without a price is refused,
/// never reserved at zero.
pub async fn boundary_i4_no_output_limit_reserves_the_model_maximum(factory: impl StoreFactory) {
    let under_test = factory.fresh();
    let store = under_test.store();
    let clock = ManualClock::new(UnixMillis(T0));
    let engine = engine(&store, &clock);
    let k = budget_key(Micros(5_000_000), BudgetPeriod::Total, None);
    store.insert_key(&k, None).await.unwrap();
    let chain = vec![Arc::new(k.clone())];

    let grant = engine
        .check(&chain, &facts("test-model", None))
        .await
        .unwrap();
    assert_eq!(grant.reservation.as_ref().unwrap().amount, CENT);
    engine.settle(grant, CallOutcome::NotSent, None).await;

    // A built-in model: 16,384 output tokens of gpt-4o-mini at its
    // dearest output price, plus a 397-byte body's at most 397 prompt
    // tokens at its dearest input price, each rounded up.
    let mut f = facts("gpt-4o-mini-2024-07-18", None);
    f.body_chars = 397;
    f.input_tokens_bound = 397;
    let grant = engine.check(&chain, &f).await.unwrap();
    let p = *PriceTable::builtin()
        .lookup(Provider::OpenAi, "gpt-4o-mini-2024-07-18")
        .unwrap();
    assert_eq!(p.max_output_tokens, 16_384);
    let expected = Micros::for_tokens(16_384, p.output_ceiling_per_million()).saturating_add(
        Micros::for_tokens(397, p.input_ceiling_per_million(Provider::OpenAi)),
    );
    assert_eq!(grant.reservation.as_ref().unwrap().amount, expected);
    engine.settle(grant, CallOutcome::NotSent, None).await;

    // An unknown model with no price: refused, never a zero reservation.
    for model in ["no-such-model", "o3-pro"] {
        let (d, _) = engine
            .check(&chain, &facts(model, Some(10)))
            .await
            .unwrap_err();
        assert_eq!(d.code(), "model_not_allowed");
        assert!(d.message().contains("has no price"), "{}", d.message());
    }
    let usage = store
        .budget_usage(&line_of(&k, 0), clock.now())
        .await
        .unwrap();
    assert_eq!(usage.settled.saturating_add(usage.reserved), Micros::ZERO);
}

/// Starts of the UTC day and month that `t` is in.
fn starts(t: UnixMillis) -> (i64, i64) {
    (t.start_of_utc_day().0, t.start_of_utc_month().0)
}

/// I7: daily and monthly budgets roll over at UTC midnight exactly; a call
/// reserved before midnight settles into the old period.
pub async fn boundary_i7_daily_and_monthly_budgets_roll_over_at_utc_midnight(
    factory: impl StoreFactory,
) {
    // 2026-11-30T23:59:59.000Z: both a day and a month end a second later.
    let before = UnixMillis(1_796_083_199_000);
    let midnight = UnixMillis(before.0 + 1000);
    assert_eq!(midnight.to_rfc3339(), "2026-12-01T00:00:00.000Z");
    for period in [BudgetPeriod::Daily, BudgetPeriod::Monthly] {
        let under_test = factory.fresh();
        let store = under_test.store();
        let clock = ManualClock::new(before);
        let engine = engine(&store, &clock);
        let k = budget_key(Micros(30_000), period, None);
        store.insert_key(&k, None).await.unwrap();
        let chain = vec![Arc::new(k.clone())];
        let f = facts("test-model", Some(1000));

        // Fill the old period; one call stays in flight across midnight.
        let in_flight = engine.check(&chain, &f).await.unwrap();
        let old_start = in_flight.reservation.as_ref().unwrap().line.period_start;
        for _ in 0..2 {
            let g = engine.check(&chain, &f).await.unwrap();
            engine.settle(g, CallOutcome::Unmetered, None).await;
        }
        clock.set(UnixMillis(midnight.0 - 1));
        assert_eq!(
            engine.check(&chain, &f).await.unwrap_err().0.code(),
            "budget_exceeded"
        );

        // At midnight exactly the new period starts with the full budget.
        clock.set(midnight);
        let mut new_grants = Vec::new();
        for _ in 0..3 {
            new_grants.push(engine.check(&chain, &f).await.unwrap());
        }
        assert_eq!(
            engine.check(&chain, &f).await.unwrap_err().0.code(),
            "budget_exceeded"
        );

        // The call reserved before midnight settles into the old period.
        engine
            .settle(
                in_flight,
                CallOutcome::Metered(crate::meter::Usage {
                    tokens_in: 0,
                    tokens_out: 500,
                    ..Default::default()
                }),
                None,
            )
            .await;
        for g in new_grants {
            engine.settle(g, CallOutcome::Unmetered, None).await;
        }
        let (old_day, old_month) = starts(before);
        let (new_day, new_month) = starts(midnight);
        let (old, new) = match period {
            BudgetPeriod::Daily => (old_day, new_day),
            _ => (old_month, new_month),
        };
        assert_eq!(old_start, UnixMillis(old));
        assert_ne!(old, new);
        let old_usage = store
            .budget_usage(&line_of(&k, old), clock.now())
            .await
            .unwrap();
        let new_usage = store
            .budget_usage(&line_of(&k, new), clock.now())
            .await
            .unwrap();
        assert_eq!(old_usage.settled, Micros(25_000), "{period:?}");
        assert_eq!(new_usage.settled, Micros(30_000), "{period:?}");
    }
}

/// I7: checks racing a UTC midnight are bounded per period: at most the budget
/// in each, settled where they were reserved.
pub async fn concurrency_i7_requests_racing_the_rollover_are_bounded_per_period(
    factory: impl StoreFactory,
) {
    let before = UnixMillis(1_796_083_199_990); // 10 ms before a UTC midnight
    let under_test = factory.fresh();
    let store = under_test.store();
    let clock = ManualClock::new(before);
    let engine = engine(&store, &clock);
    let k = budget_key(Micros(50_000), BudgetPeriod::Daily, None);
    store.insert_key(&k, None).await.unwrap();
    let chain = Arc::new(vec![Arc::new(k.clone())]);
    let barrier = Arc::new(Barrier::new(41));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (engine, chain, barrier) = (engine.clone(), chain.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match engine.check(&chain, &facts("test-model", Some(1000))).await {
                Ok(g) => {
                    let start = g.reservation.as_ref().unwrap().line.period_start;
                    engine.settle(g, CallOutcome::Unmetered, None).await;
                    Some(start)
                }
                Err(_) => None,
            }
        }));
    }
    barrier.wait().await;
    clock.advance(10); // midnight, while the checks run
    let mut per_period = std::collections::BTreeMap::<i64, u64>::new();
    for t in tasks {
        if let Some(start) = t.await.unwrap() {
            *per_period.entry(start.0).or_default() += 1;
        }
    }
    for (start, admitted) in &per_period {
        assert!(*admitted <= 5, "{admitted} in period {start}");
        let usage = store
            .budget_usage(&line_of(&k, *start), clock.now())
            .await
            .unwrap();
        assert_eq!(usage.settled, Micros(admitted * 10_000));
    }
    let total: u64 = per_period.values().sum();
    assert!((5..=10).contains(&total), "{per_period:?}");
}
