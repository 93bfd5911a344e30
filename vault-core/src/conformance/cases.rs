//! The cases: each makes a fresh store with its factory and checks one
//! promise of [`KeyStore`](crate::store::KeyStore) that every backend must keep.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::Barrier;

use super::records::{child_of, fresh_hash, key, key_at, line, provider_key_at, usage_of};
use super::{Store, StoreFactory};
use crate::clock::UnixMillis;
use crate::crypto::Sealed;
use crate::key::{KeyEnv, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::policy::Policy;
use crate::record::{BudgetLine, KeyRecord, KeyStatus, Reservation, Settlement, UsageFilter};
use crate::store::StoreError;

const NOW: UnixMillis = UnixMillis(10_000);
const LATER: UnixMillis = UnixMillis(70_000);

async fn inserted(store: &Store, k: KeyRecord) -> KeyRecord {
    store.insert_key(&k, None).await.unwrap();
    k
}

async fn settled(store: &Store, l: &BudgetLine) -> u64 {
    store.budget_usage(l, NOW).await.unwrap().settled.0
}

async fn reserved(store: &Store, l: &BudgetLine) -> u64 {
    store.budget_usage(l, NOW).await.unwrap().reserved.0
}

async fn spend(store: &Store, id: &KeyId) -> u64 {
    store.get_key(id).await.unwrap().unwrap().spend.0
}

fn settlement(r: &Reservation, actual: u64) -> Settlement {
    Settlement {
        reservation: r.clone(),
        actual: Micros(actual),
    }
}

fn ids(keys: &[KeyRecord]) -> Vec<KeyId> {
    keys.iter().map(|k| k.id.clone()).collect()
}

// ---------------------------------------------------------------- keys

/// Keys round-trip every field; lookups by hash and id; listing is oldest first and filters by project.
pub async fn keys_insert_find_get_list(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let b = inserted(&store, key_at("beta", 3_000)).await;
    let a = inserted(&store, key_at("alpha", 1_000)).await;
    let mut c = key_at("alpha", 2_000);
    c.plan = None;
    c.policy = Policy::default();
    c.expires_at = None;
    c.provider_keys = vec![];
    c.env = KeyEnv::Test;
    let c = inserted(&store, c).await;

    assert_eq!(store.find_by_hash(&a.hash).await.unwrap(), Some(a.clone()));
    assert_eq!(store.find_by_hash(&c.hash).await.unwrap(), Some(c.clone()));
    assert_eq!(store.get_key(&b.id).await.unwrap(), Some(b.clone()));
    assert_eq!(store.find_by_hash(&fresh_hash()).await.unwrap(), None);
    assert_eq!(
        store.get_key(&KeyId::generate().unwrap()).await.unwrap(),
        None
    );

    let all = store.list_keys(None).await.unwrap();
    assert_eq!(all, vec![a.clone(), c.clone(), b.clone()], "oldest first");
    let alpha = store.list_keys(Some("alpha")).await.unwrap();
    assert_eq!(ids(&alpha), vec![a.id.clone(), c.id.clone()]);
    assert!(store.list_keys(Some("nobody")).await.unwrap().is_empty());
}

/// A key whose id or hash is taken (a previous hash in its grace period included) is a `Conflict` and inserts nothing.
pub async fn keys_conflicts_insert_nothing(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let a = inserted(&store, key()).await;
    let mut same_id = key();
    same_id.id = a.id.clone();
    assert!(matches!(
        store.insert_key(&same_id, None).await,
        Err(StoreError::Conflict)
    ));
    let mut same_hash = key();
    same_hash.hash = a.hash;
    assert!(matches!(
        store.insert_key(&same_hash, None).await,
        Err(StoreError::Conflict)
    ));

    // A hash still valid as another key's previous hash is taken too.
    let new_hash = fresh_hash();
    store
        .rotate_key(&a.id, &new_hash, &a.prefix, Some(LATER))
        .await
        .unwrap();
    let mut old_hash = key();
    old_hash.hash = a.hash;
    assert!(matches!(
        store.insert_key(&old_hash, None).await,
        Err(StoreError::Conflict)
    ));

    assert_eq!(store.list_keys(None).await.unwrap().len(), 1);
    assert_eq!(store.find_by_hash(&same_id.hash).await.unwrap(), None);
}

/// A child of an unknown parent, or a carve-out from an unknown key's line, is `NotFound` and inserts nothing.
pub async fn keys_child_of_unknown_parent_is_not_found(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let ghost = key();
    let child = child_of(&ghost);
    assert!(matches!(
        store.insert_key(&child, None).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.get_key(&child.id).await.unwrap(), None);
    // A carve-out from the line of a key that does not exist.
    let orphan = key();
    let ghost_line = line(&ghost, 1_000, 0);
    assert!(matches!(
        store
            .insert_key(&orphan, Some((&ghost_line, Micros(1))))
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.get_key(&orphan.id).await.unwrap(), None);
}

/// Revocation reaches children and grandchildren, not siblings; a second revocation keeps the first time (docs/threat-model.md, A5).
pub async fn lifecycle_revoke_cascades_to_grandchildren(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let root = inserted(&store, key()).await;
    let child = inserted(&store, child_of(&root)).await;
    let grandchild = inserted(&store, child_of(&child)).await;
    let sibling = inserted(&store, child_of(&root)).await;
    let stranger = inserted(&store, key()).await;

    let revoked = store.revoke_key(&child.id, NOW).await.unwrap();
    let got: BTreeSet<KeyId> = revoked.into_iter().collect();
    assert_eq!(
        got,
        BTreeSet::from([child.id.clone(), grandchild.id.clone()])
    );
    for k in [&child, &grandchild] {
        let found = store.find_by_hash(&k.hash).await.unwrap().unwrap();
        assert_eq!(found.status, KeyStatus::Revoked);
        assert_eq!(found.revoked_at, Some(NOW));
    }
    for k in [&root, &sibling, &stranger] {
        let found = store.get_key(&k.id).await.unwrap().unwrap();
        assert_eq!(found.status, KeyStatus::Active, "{}", k.id);
    }

    assert!(store.revoke_key(&child.id, LATER).await.unwrap().is_empty());
    assert_eq!(
        store.get_key(&child.id).await.unwrap().unwrap().revoked_at,
        Some(NOW),
        "a second revocation keeps the first time"
    );
    let revoked = store.revoke_key(&root.id, LATER).await.unwrap();
    let got: BTreeSet<KeyId> = revoked.into_iter().collect();
    assert_eq!(got, BTreeSet::from([root.id.clone(), sibling.id.clone()]));
    assert_eq!(
        store.get_key(&stranger.id).await.unwrap().unwrap().status,
        KeyStatus::Active
    );
    assert!(matches!(
        store.revoke_key(&KeyId::generate().unwrap(), NOW).await,
        Err(StoreError::NotFound)
    ));
}

/// Rotation keeps the previous hash valid for its grace period, refuses a taken hash and frees old hashes (docs/threat-model.md, K2).
pub async fn lifecycle_rotate_keeps_previous_hash_for_grace(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key()).await;
    let other = inserted(&store, key()).await;
    let h1 = fresh_hash();
    let p1 = KeyPrefix::new("vpx_live_Rot1");
    store
        .rotate_key(&k.id, &h1, &p1, Some(LATER))
        .await
        .unwrap();

    let by_new = store.find_by_hash(&h1).await.unwrap().unwrap();
    let by_old = store.find_by_hash(&k.hash).await.unwrap().unwrap();
    assert_eq!(by_new, by_old);
    assert_eq!(by_new.id, k.id);
    assert_eq!(by_new.hash, h1);
    assert_eq!(by_new.prefix, p1);
    assert_eq!(by_new.previous_hash, Some(k.hash));
    assert_eq!(by_new.previous_valid_until, Some(LATER));

    // A collision with another key's hash changes nothing.
    assert!(matches!(
        store.rotate_key(&k.id, &other.hash, &p1, None).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get_key(&k.id).await.unwrap().unwrap(), by_new);

    // Rotating without grace clears the previous hash.
    let h2 = fresh_hash();
    let p2 = KeyPrefix::new("vpx_live_Rot2");
    store.rotate_key(&k.id, &h2, &p2, None).await.unwrap();
    let now = store.get_key(&k.id).await.unwrap().unwrap();
    assert_eq!(
        (now.hash, now.previous_hash, now.previous_valid_until),
        (h2, None, None)
    );
    assert_eq!(store.find_by_hash(&h1).await.unwrap(), None);
    assert_eq!(store.find_by_hash(&k.hash).await.unwrap(), None);
    assert_eq!(store.find_by_hash(&h2).await.unwrap().unwrap().id, k.id);
    // The freed hashes can be used again.
    let mut reuse = key();
    reuse.hash = k.hash;
    store.insert_key(&reuse, None).await.unwrap();

    assert!(matches!(
        store
            .rotate_key(&KeyId::generate().unwrap(), &fresh_hash(), &p2, None)
            .await,
        Err(StoreError::NotFound)
    ));
}

// ---------------------------------------------------------------- provider keys

/// Provider keys: insert, conflicts, get, list by project, compare-and-swap of the sealed value, removal.
pub async fn provider_keys_crud_and_compare_and_swap(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let b = provider_key_at("beta", 2_000);
    let a = provider_key_at("alpha", 1_000);
    store.insert_provider_key(&b).await.unwrap();
    store.insert_provider_key(&a).await.unwrap();
    let mut dup = provider_key_at("alpha", 3_000);
    dup.id = a.id.clone();
    assert!(matches!(
        store.insert_provider_key(&dup).await,
        Err(StoreError::Conflict)
    ));

    assert_eq!(
        store.get_provider_key(&a.id).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store.list_provider_keys(None).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        store.list_provider_keys(Some("beta")).await.unwrap(),
        vec![b.clone()]
    );

    let new = Sealed::from_bytes(vec![9; 40]);
    assert!(
        !store.replace_sealed(&a.id, &new, &new).await.unwrap(),
        "stale expected"
    );
    assert_eq!(
        store.get_provider_key(&a.id).await.unwrap().unwrap().sealed,
        a.sealed
    );
    assert!(store.replace_sealed(&a.id, &a.sealed, &new).await.unwrap());
    assert_eq!(
        store.get_provider_key(&a.id).await.unwrap().unwrap().sealed,
        new
    );
    assert!(
        !store.replace_sealed(&a.id, &a.sealed, &new).await.unwrap(),
        "already swapped"
    );
    let ghost = ProviderKeyId::generate().unwrap();
    assert!(!store.replace_sealed(&ghost, &new, &a.sealed).await.unwrap());

    assert!(store.remove_provider_key(&a.id).await.unwrap());
    assert!(!store.remove_provider_key(&a.id).await.unwrap());
    assert_eq!(store.get_provider_key(&a.id).await.unwrap(), None);
    assert_eq!(store.list_provider_keys(None).await.unwrap(), vec![b]);
}

/// Children: the keys whose parent is the given key, oldest first, not their children.
pub async fn keys_children_listed_oldest_first(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let root = inserted(&store, key()).await;
    let mut second = child_of(&root);
    second.created_at = UnixMillis(root.created_at.0 + 5);
    // Inserted after the second, created before it.
    let second = inserted(&store, second).await;
    let first = inserted(&store, child_of(&root)).await;
    let grandchild = inserted(&store, child_of(&second)).await;
    inserted(&store, key()).await;
    assert_eq!(
        ids(&store.list_children(&root.id).await.unwrap()),
        vec![first.id.clone(), second.id.clone()]
    );
    assert_eq!(
        ids(&store.list_children(&second.id).await.unwrap()),
        vec![grandchild.id.clone()]
    );
    assert!(
        store
            .list_children(&grandchild.id)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Keys limited to named provider keys: only those, of one project or all, oldest first.
pub async fn keys_with_provider_keys_listed_by_project(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let pk = provider_key_at("alpha", 1);
    let limited = |project: &str, at: i64| {
        let mut k = key_at(project, at);
        k.provider_keys = vec![pk.id.clone()];
        k
    };
    let beta = inserted(&store, limited("beta", 1_000)).await;
    let alpha = inserted(&store, limited("alpha", 2_000)).await;
    let mut unlimited = key_at("alpha", 3_000);
    unlimited.provider_keys = Vec::new();
    inserted(&store, unlimited).await;
    assert_eq!(
        ids(&store.list_keys_with_provider_keys(None).await.unwrap()),
        vec![beta.id.clone(), alpha.id.clone()]
    );
    let in_alpha = store
        .list_keys_with_provider_keys(Some("alpha"))
        .await
        .unwrap();
    assert_eq!(in_alpha, vec![alpha]);
}

/// Projects: every project with a key or a provider key, each once, in byte order.
pub async fn projects_listed_once_in_byte_order(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    assert_eq!(store.list_projects().await.unwrap(), Vec::<String>::new());
    for (project, at) in [
        ("beta", 1_000),
        ("alpha", 2_000),
        ("alpha", 3_000),
        ("*", 4_000),
    ] {
        inserted(&store, key_at(project, at)).await;
    }
    for (project, at) in [("gamma", 1_000), ("alpha", 2_000), ("Team-B", 3_000)] {
        store
            .insert_provider_key(&provider_key_at(project, at))
            .await
            .unwrap();
    }
    assert_eq!(
        store.list_projects().await.unwrap(),
        ["*", "Team-B", "alpha", "beta", "gamma"]
    );
}

// ---------------------------------------------------------------- usage and meta

/// Usage records list newest first and filter by key, project, time (`since` inclusive, `until` exclusive) and limit; appending updates `request_count` and `last_used_at`.
pub async fn usage_append_list_filter_and_count(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let a = inserted(&store, key_at("alpha", 1)).await;
    let b = inserted(&store, key_at("beta", 2)).await;
    let mut denied = usage_of(&a, 300);
    denied.status = 403;
    denied.denial = Some("model_not_allowed".to_owned());
    denied.shadow = true;
    denied.provider = None;
    denied.model = None;
    store
        .append_usage(&[usage_of(&a, 100), usage_of(&b, 200), denied.clone()])
        .await
        .unwrap();
    // Out of order: `last_used_at` keeps the latest.
    store.append_usage(&[usage_of(&a, 50)]).await.unwrap();
    store.append_usage(&[]).await.unwrap();

    let all = store.list_usage(&UsageFilter::default()).await.unwrap();
    let times: Vec<i64> = all.iter().map(|r| r.at.0).collect();
    assert_eq!(times, vec![300, 200, 100, 50], "newest first");
    assert_eq!(all[0], denied);

    let only_a = UsageFilter {
        key_id: Some(a.id.clone()),
        ..UsageFilter::default()
    };
    assert_eq!(store.list_usage(&only_a).await.unwrap().len(), 3);
    let beta = UsageFilter {
        project: Some("beta".to_owned()),
        ..UsageFilter::default()
    };
    assert_eq!(
        store.list_usage(&beta).await.unwrap(),
        vec![usage_of(&b, 200)]
    );
    let since = UsageFilter {
        since: Some(UnixMillis(100)),
        limit: Some(2),
        ..UsageFilter::default()
    };
    let times: Vec<i64> = store
        .list_usage(&since)
        .await
        .unwrap()
        .iter()
        .map(|r| r.at.0)
        .collect();
    assert_eq!(times, vec![300, 200]);
    // `until` excludes its own instant: [100, 300) of key a.
    let between = UsageFilter {
        key_id: Some(a.id.clone()),
        since: Some(UnixMillis(100)),
        until: Some(UnixMillis(300)),
        ..UsageFilter::default()
    };
    let times: Vec<i64> = store
        .list_usage(&between)
        .await
        .unwrap()
        .iter()
        .map(|r| r.at.0)
        .collect();
    assert_eq!(times, vec![100]);

    let a_now = store.get_key(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (a_now.request_count, a_now.last_used_at),
        (3, Some(UnixMillis(300)))
    );
    let b_now = store.find_by_hash(&b.hash).await.unwrap().unwrap();
    assert_eq!(
        (b_now.request_count, b_now.last_used_at),
        (1, Some(UnixMillis(200)))
    );
}

/// Metadata values read back what was last written.
pub async fn meta_round_trip(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    assert_eq!(store.get_meta("rotation").await.unwrap(), None);
    store.set_meta("rotation", "step 1").await.unwrap();
    store.set_meta("other", "x").await.unwrap();
    assert_eq!(
        store.get_meta("rotation").await.unwrap().as_deref(),
        Some("step 1")
    );
    store.set_meta("rotation", "done").await.unwrap();
    assert_eq!(
        store.get_meta("rotation").await.unwrap().as_deref(),
        Some("done")
    );
    assert_eq!(store.get_meta("other").await.unwrap().as_deref(), Some("x"));
}

// ---------------------------------------------------------------- budgets

/// Reservations take as much as fits, settle once at their real cost and count in the line's usage and the key's spend (docs/budgets.md).
pub async fn budget_reserve_settle_and_usage(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key()).await;
    let l = line(&k, 1_000, 0);
    let exp = LATER;
    let r1 = store
        .reserve(&l, Micros(600), Micros(1), NOW, exp)
        .await
        .unwrap();
    assert_eq!(r1.amount, Micros(600));
    assert_eq!(r1.line, l);
    let r2 = store
        .reserve(&l, Micros(600), Micros(1), NOW, exp)
        .await
        .unwrap();
    assert_eq!(r2.amount, Micros(400), "as much as fits");
    assert!(r2.id > r1.id, "ids are monotonic");
    match store.reserve(&l, Micros(1), Micros(1), NOW, exp).await {
        Err(StoreError::BudgetExceeded { remaining }) => assert_eq!(remaining, Micros::ZERO),
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }
    let zero = store
        .reserve(&l, Micros::ZERO, Micros::ZERO, NOW, exp)
        .await
        .unwrap();
    assert_eq!(zero.amount, Micros::ZERO, "a zero reservation always fits");
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (0, 1_000)
    );

    store.settle(&[settlement(&r1, 100)]).await.unwrap();
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (100, 400)
    );
    assert_eq!(spend(&store, &k.id).await, 100);
    match store.reserve(&l, Micros(600), Micros(501), NOW, exp).await {
        Err(StoreError::BudgetExceeded { remaining }) => assert_eq!(remaining, Micros(500)),
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }

    // Settling twice is a no-op; so is settling an unknown reservation.
    store.settle(&[settlement(&r1, 100)]).await.unwrap();
    let mut ghost = r1.clone();
    ghost.id = crate::record::ReservationId(u64::MAX / 2);
    store.settle(&[settlement(&ghost, 999)]).await.unwrap();
    assert_eq!(
        (settled(&store, &l).await, spend(&store, &k.id).await),
        (100, 100)
    );

    // A batch settles several; actual may exceed the hold (provider error).
    store
        .settle(&[settlement(&r2, 450), settlement(&zero, 7)])
        .await
        .unwrap();
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (557, 0)
    );
    assert_eq!(spend(&store, &k.id).await, 557);
    assert_eq!(
        store
            .budget_usage(&l, NOW)
            .await
            .unwrap()
            .remaining(l.limit),
        Micros(443)
    );
}

/// Settling part of a reservation charges the part and keeps the rest held.
pub async fn budget_settle_part_keeps_the_rest_held(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key()).await;
    let l = line(&k, 1_000, 0);
    let r = store
        .reserve(&l, Micros(600), Micros(1), NOW, LATER)
        .await
        .unwrap();
    assert!(
        store
            .settle_part(&settlement(&r, 100), Micros(300))
            .await
            .unwrap()
    );
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (100, 300)
    );
    assert_eq!(spend(&store, &k.id).await, 100);
    // `keep` never raises what is held.
    assert!(
        store
            .settle_part(&settlement(&r, 0), Micros(900))
            .await
            .unwrap()
    );
    assert_eq!(reserved(&store, &l).await, 300);
    store.settle(&[settlement(&r, 250)]).await.unwrap();
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (350, 0)
    );
    // Once settled, settling part of it changes nothing.
    assert!(
        !store
            .settle_part(&settlement(&r, 50), Micros::ZERO)
            .await
            .unwrap()
    );
    assert_eq!(settled(&store, &l).await, 350);
}

/// Each budget period is its own line; the key's lifetime spend spans them.
pub async fn budget_periods_are_separate(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key()).await;
    let day1 = line(&k, 1_000, 0);
    let day2 = line(&k, 1_000, 86_400_000);
    let r = store
        .reserve(&day1, Micros(1_000), Micros(1_000), NOW, LATER)
        .await
        .unwrap();
    store.settle(&[settlement(&r, 1_000)]).await.unwrap();
    assert!(
        store
            .reserve(&day1, Micros(1), Micros(1), NOW, LATER)
            .await
            .is_err()
    );
    let usage2 = store.budget_usage(&day2, NOW).await.unwrap();
    assert_eq!(
        (usage2.settled, usage2.reserved),
        (Micros::ZERO, Micros::ZERO)
    );
    let r2 = store
        .reserve(&day2, Micros(1_000), Micros(1_000), NOW, LATER)
        .await
        .unwrap();
    store.settle(&[settlement(&r2, 300)]).await.unwrap();
    assert_eq!(
        (settled(&store, &day1).await, settled(&store, &day2).await),
        (1_000, 300)
    );
    assert_eq!(
        spend(&store, &k.id).await,
        1_300,
        "lifetime spend spans periods"
    );
}

/// A sweep charges expired reservations in full; a late settlement of one changes nothing (docs/threat-model.md, J3).
pub async fn budget_sweep_charges_expired_reservations(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key()).await;
    let l = line(&k, 1_000, 0);
    let early = store
        .reserve(&l, Micros(300), Micros(1), NOW, UnixMillis(20_000))
        .await
        .unwrap();
    let late = store
        .reserve(&l, Micros(200), Micros(1), NOW, UnixMillis(90_000))
        .await
        .unwrap();
    assert_eq!(store.sweep(UnixMillis(19_999)).await.unwrap(), 0);
    assert_eq!(store.sweep(UnixMillis(20_000)).await.unwrap(), 1);
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (300, 200)
    );
    assert_eq!(spend(&store, &k.id).await, 300, "charged in full");
    // A late settlement of a swept reservation changes nothing.
    store.settle(&[settlement(&early, 10)]).await.unwrap();
    assert_eq!(settled(&store, &l).await, 300);
    store.settle(&[settlement(&late, 50)]).await.unwrap();
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (350, 0)
    );
    assert_eq!(store.sweep(UnixMillis(1_000_000)).await.unwrap(), 0);
}

/// Many tasks race one line; only what fits is admitted.
async fn race_reservations(
    store: &Store,
    l: &BudgetLine,
    tasks: usize,
    each: u64,
) -> Vec<Reservation> {
    let barrier = Arc::new(Barrier::new(tasks));
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (store, l, barrier) = (store.clone(), l.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .reserve(&l, Micros(each), Micros(each), NOW, LATER)
                .await
        }));
    }
    let mut granted = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(r) => granted.push(r),
            Err(StoreError::BudgetExceeded { .. }) => {}
            Err(e) => panic!("unexpected store error: {e}"),
        }
    }
    granted
}

/// 200 racing reservations on one line never together exceed its limit (docs/threat-model.md, I1).
pub async fn concurrency_reserve_never_exceeds_limit(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key()).await;
    let l = line(&k, 500_000, 0); // $0.50
    let granted = race_reservations(&store, &l, 200, 10_000).await; // $0.01 each
    assert_eq!(granted.len(), 50);
    let held: u64 = granted.iter().map(|r| r.amount.0).sum();
    assert!(held <= l.limit.0);
    assert_eq!(reserved(&store, &l).await, 500_000);
    let ids: BTreeSet<u64> = granted.iter().map(|r| r.id.0).collect();
    assert_eq!(ids.len(), 50, "reservation ids are unique");
    let all: Vec<Settlement> = granted.iter().map(|r| settlement(r, r.amount.0)).collect();
    store.settle(&all).await.unwrap();
    assert_eq!(
        (settled(&store, &l).await, reserved(&store, &l).await),
        (500_000, 0)
    );
}

/// Racing the first reservations of a brand-new key admits exactly what fits (docs/threat-model.md, I2).
pub async fn concurrency_first_reservations_on_fresh_key(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    for round in 0..5 {
        let k = key();
        // The key and its line are brand new: no counter rows exist yet.
        store.insert_key(&k, None).await.unwrap();
        let l = line(&k, 250_000, 86_400_000 * round);
        let granted = race_reservations(&store, &l, 60, 10_000).await;
        assert_eq!(granted.len(), 25, "round {round}");
        assert_eq!(reserved(&store, &l).await, 250_000);
    }
}

/// Two racing $3 children of a $5 parent: exactly one is inserted (docs/threat-model.md, I3).
pub async fn concurrency_two_children_of_parent_exactly_one_fits(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    for _ in 0..10 {
        let parent = inserted(&store, key()).await;
        let pl = line(&parent, 5_000_000, 0);
        let children = [child_of(&parent), child_of(&parent)];
        let barrier = Arc::new(Barrier::new(2));
        let mut handles = Vec::new();
        for c in children.clone() {
            let (store, pl, barrier) = (store.clone(), pl.clone(), barrier.clone());
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                store.insert_key(&c, Some((&pl, Micros(3_000_000)))).await
            }));
        }
        let mut ok = 0;
        for (h, c) in handles.into_iter().zip(&children) {
            match h.await.unwrap() {
                Ok(()) => {
                    ok += 1;
                    assert!(store.get_key(&c.id).await.unwrap().is_some());
                }
                Err(StoreError::BudgetExceeded { remaining }) => {
                    assert_eq!(remaining, Micros(2_000_000));
                    assert_eq!(
                        store.get_key(&c.id).await.unwrap(),
                        None,
                        "nothing inserted"
                    );
                    assert_eq!(store.find_by_hash(&c.hash).await.unwrap(), None);
                }
                Err(e) => panic!("unexpected store error: {e}"),
            }
        }
        assert_eq!(ok, 1);
        assert_eq!(reserved(&store, &pl).await, 3_000_000);
    }
}

/// A child's carve-out is held on its parent's line and settled at the child's spend when it is revoked.
pub async fn budget_carve_out_settles_on_revoke(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let parent = inserted(&store, key()).await;
    let pl = line(&parent, 5_000_000, 0);
    let child = child_of(&parent);
    store
        .insert_key(&child, Some((&pl, Micros(3_000_000))))
        .await
        .unwrap();
    assert_eq!(reserved(&store, &pl).await, 3_000_000);
    assert!(matches!(
        store
            .reserve(&pl, Micros(2_000_001), Micros(2_000_001), NOW, LATER)
            .await,
        Err(StoreError::BudgetExceeded {
            remaining: Micros(2_000_000)
        })
    ));

    let cl = line(&child, 3_000_000, 0);
    let r = store
        .reserve(&cl, Micros(1_500_000), Micros(1), NOW, LATER)
        .await
        .unwrap();
    store.settle(&[settlement(&r, 1_000_000)]).await.unwrap();

    assert_eq!(
        store.revoke_key(&child.id, NOW).await.unwrap(),
        vec![child.id.clone()]
    );
    assert_eq!(
        (settled(&store, &pl).await, reserved(&store, &pl).await),
        (1_000_000, 0)
    );
    assert_eq!(
        spend(&store, &parent.id).await,
        1_000_000,
        "a child's spend counts against its parent"
    );
    // Revoking again settles nothing twice.
    assert!(store.revoke_key(&child.id, NOW).await.unwrap().is_empty());
    assert_eq!(settled(&store, &pl).await, 1_000_000);
}

/// Revoking a root settles the carve-outs of its children and grandchildren, each into its parent's line.
pub async fn budget_carve_outs_settle_through_grandchildren(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let root = inserted(&store, key()).await;
    let rl = line(&root, 10_000_000, 0);
    let child = child_of(&root);
    store
        .insert_key(&child, Some((&rl, Micros(6_000_000))))
        .await
        .unwrap();
    let cl = line(&child, 6_000_000, 0);
    let grandchild = child_of(&child);
    store
        .insert_key(&grandchild, Some((&cl, Micros(4_000_000))))
        .await
        .unwrap();
    assert_eq!(reserved(&store, &cl).await, 4_000_000);
    let gl = line(&grandchild, 4_000_000, 0);

    let g = store
        .reserve(&gl, Micros(1_000_000), Micros(1), NOW, LATER)
        .await
        .unwrap();
    let c = store
        .reserve(&cl, Micros(2_000_000), Micros(1), NOW, LATER)
        .await
        .unwrap();
    store
        .settle(&[settlement(&g, 1_000_000), settlement(&c, 2_000_000)])
        .await
        .unwrap();

    let revoked: BTreeSet<KeyId> = store
        .revoke_key(&root.id, NOW)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        revoked,
        BTreeSet::from([root.id.clone(), child.id.clone(), grandchild.id.clone()])
    );
    // The grandchild's $1 reaches the child's line, and the child's $3 the root's.
    assert_eq!(
        (settled(&store, &cl).await, reserved(&store, &cl).await),
        (3_000_000, 0)
    );
    assert_eq!(
        (settled(&store, &rl).await, reserved(&store, &rl).await),
        (3_000_000, 0)
    );
}

/// A sweep settles the carve-out of an expired child at its spend, charging the parent at most the carve-out (docs/threat-model.md, J3).
pub async fn budget_carve_out_settles_when_child_expires(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let parent = inserted(&store, key()).await;
    let pl = line(&parent, 5_000_000, 0);
    let mut child = child_of(&parent);
    child.expires_at = Some(UnixMillis(50_000));
    store
        .insert_key(&child, Some((&pl, Micros(1_000_000))))
        .await
        .unwrap();
    let mut spender = child_of(&parent);
    spender.expires_at = Some(UnixMillis(60_000));
    store
        .insert_key(&spender, Some((&pl, Micros(1_000_000))))
        .await
        .unwrap();
    assert_eq!(reserved(&store, &pl).await, 2_000_000);

    let r = store
        .reserve(
            &line(&child, 1_000_000, 0),
            Micros(700_000),
            Micros(1),
            NOW,
            LATER,
        )
        .await
        .unwrap();
    store.settle(&[settlement(&r, 700_000)]).await.unwrap();
    // The provider billed more than held: the parent is charged at most the carve-out.
    let r = store
        .reserve(
            &line(&spender, 1_000_000, 0),
            Micros(1_000_000),
            Micros(1),
            NOW,
            LATER,
        )
        .await
        .unwrap();
    store.settle(&[settlement(&r, 1_200_000)]).await.unwrap();

    assert_eq!(store.sweep(UnixMillis(49_999)).await.unwrap(), 0);
    assert_eq!(store.sweep(UnixMillis(50_000)).await.unwrap(), 1);
    assert_eq!(
        (settled(&store, &pl).await, reserved(&store, &pl).await),
        (700_000, 1_000_000)
    );
    assert_eq!(store.sweep(UnixMillis(60_000)).await.unwrap(), 1);
    assert_eq!(
        (settled(&store, &pl).await, reserved(&store, &pl).await),
        (1_700_000, 0)
    );
    assert_eq!(store.sweep(UnixMillis(99_000)).await.unwrap(), 0);
    // The expired child was never revoked: sweeping changes only money.
    assert_eq!(
        store.get_key(&child.id).await.unwrap().unwrap().status,
        KeyStatus::Active
    );
}

/// Parent $5 with a child carved $3 whose call holds $2.90 open; `end`
/// ends the child (revocation or expiry). The parent must keep the $2.90
/// held until the call settles, then be charged it: never $5.40 of $5.
async fn child_with_open_call_ends(store: Store, expires_at: Option<i64>, end: EndChild) {
    let parent = inserted(&store, key()).await;
    let pl = line(&parent, 5_000_000, 0);
    let mut child = child_of(&parent);
    child.expires_at = expires_at.map(UnixMillis);
    store
        .insert_key(&child, Some((&pl, Micros(3_000_000))))
        .await
        .unwrap();
    let cl = line(&child, 3_000_000, 0);
    let call = store
        .reserve(&cl, Micros(2_900_000), Micros(2_900_000), NOW, LATER)
        .await
        .unwrap();
    match end {
        EndChild::Revoke => {
            store.revoke_key(&child.id, NOW).await.unwrap();
        }
        EndChild::Expire(at) => {
            store.sweep(UnixMillis(at)).await.unwrap();
        }
    }
    assert_eq!(
        (settled(&store, &pl).await, reserved(&store, &pl).await),
        (0, 2_900_000),
        "the child's open call still holds its $2.90 on the parent"
    );
    assert!(matches!(
        store
            .reserve(&pl, Micros(2_500_000), Micros(2_500_000), NOW, LATER)
            .await,
        Err(StoreError::BudgetExceeded {
            remaining: Micros(2_100_000)
        })
    ));
    let own = store
        .reserve(&pl, Micros(2_100_000), Micros(2_100_000), NOW, LATER)
        .await
        .unwrap();
    store.settle(&[settlement(&call, 2_900_000)]).await.unwrap();
    assert_eq!(
        (settled(&store, &pl).await, reserved(&store, &pl).await),
        (2_900_000, 2_100_000),
        "the call's cost reaches the parent and its hold is released"
    );
    assert_eq!(spend(&store, &parent.id).await, 2_900_000);
    store.settle(&[settlement(&own, 2_100_000)]).await.unwrap();
    assert_eq!(
        (settled(&store, &pl).await, reserved(&store, &pl).await),
        (5_000_000, 0),
        "settled spend stays within the cap"
    );
    // Ending the child again changes nothing.
    store.sweep(UnixMillis(99_000)).await.unwrap();
    assert_eq!(settled(&store, &pl).await, 5_000_000);
}

/// How [`child_with_open_call_ends`] ends the child.
enum EndChild {
    Revoke,
    Expire(i64),
}

/// A revoked child's open call keeps holding on its parent's line until it settles (docs/threat-model.md, I3).
pub async fn budget_revoking_a_child_keeps_what_its_open_calls_hold(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    child_with_open_call_ends(store, None, EndChild::Revoke).await;
}

/// An expired child's open call keeps holding on its parent's line until it settles (docs/threat-model.md, I3).
pub async fn budget_expiring_a_child_keeps_what_its_open_calls_hold(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    child_with_open_call_ends(store, Some(50_000), EndChild::Expire(50_000)).await;
}

/// The same through a grandchild: its open call keeps held on the child's
/// line and, once the child is revoked too, on the root's.
pub async fn budget_revoked_grandchild_open_call_reaches_the_root(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let root = inserted(&store, key()).await;
    let rl = line(&root, 10_000_000, 0);
    let child = child_of(&root);
    store
        .insert_key(&child, Some((&rl, Micros(6_000_000))))
        .await
        .unwrap();
    let cl = line(&child, 6_000_000, 0);
    let grandchild = child_of(&child);
    store
        .insert_key(&grandchild, Some((&cl, Micros(4_000_000))))
        .await
        .unwrap();
    let gl = line(&grandchild, 4_000_000, 0);
    let g = store
        .reserve(&gl, Micros(3_000_000), Micros(3_000_000), NOW, LATER)
        .await
        .unwrap();
    let c = store
        .reserve(&cl, Micros(1_000_000), Micros(1_000_000), NOW, LATER)
        .await
        .unwrap();
    store.settle(&[settlement(&c, 500_000)]).await.unwrap();
    store.revoke_key(&root.id, NOW).await.unwrap();
    // The child spent $0.50; the grandchild's call holds $3.
    assert_eq!(
        (settled(&store, &rl).await, reserved(&store, &rl).await),
        (500_000, 3_000_000)
    );
    store.settle(&[settlement(&g, 2_000_000)]).await.unwrap();
    assert_eq!(
        (settled(&store, &cl).await, reserved(&store, &cl).await),
        (2_500_000, 0)
    );
    assert_eq!(
        (settled(&store, &rl).await, reserved(&store, &rl).await),
        (2_500_000, 0)
    );
    assert_eq!(spend(&store, &root.id).await, 2_500_000);
}

/// A carve-out one micro-dollar too big inserts nothing; exactly what remains fits.
pub async fn boundary_carve_out_that_does_not_fit_inserts_nothing(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let parent = inserted(&store, key()).await;
    let pl = line(&parent, 5_000_000, 0);
    let r = store
        .reserve(&pl, Micros(4_000_000), Micros(1), NOW, LATER)
        .await
        .unwrap();
    let child = child_of(&parent);
    assert!(matches!(
        store
            .insert_key(&child, Some((&pl, Micros(1_000_001))))
            .await,
        Err(StoreError::BudgetExceeded {
            remaining: Micros(1_000_000)
        })
    ));
    assert_eq!(store.get_key(&child.id).await.unwrap(), None);
    assert_eq!(reserved(&store, &pl).await, 4_000_000);
    // Exactly what remains fits.
    store
        .insert_key(&child, Some((&pl, Micros(1_000_000))))
        .await
        .unwrap();
    assert_eq!(reserved(&store, &pl).await, 5_000_000);
    store.settle(&[settlement(&r, 0)]).await.unwrap();
    assert_eq!(reserved(&store, &pl).await, 1_000_000);
}

/// Spend without a reservation (keys with no budget) adds to the key's
/// lifetime spend, saturating; unknown keys are skipped.
pub async fn budget_add_spend_without_reservation(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let k = inserted(&store, key_at("alpha", 1_000)).await;
    store
        .add_spend(&[
            (k.id.clone(), Micros(250)),
            (KeyId::generate().unwrap(), Micros(9)),
        ])
        .await
        .unwrap();
    store
        .add_spend(&[(k.id.clone(), Micros(50))])
        .await
        .unwrap();
    assert_eq!(
        store.get_key(&k.id).await.unwrap().unwrap().spend,
        Micros(300)
    );
    store
        .add_spend(&[(k.id.clone(), Micros::MAX)])
        .await
        .unwrap();
    assert!(store.get_key(&k.id).await.unwrap().unwrap().spend >= Micros(i64::MAX as u64));
    store.add_spend(&[]).await.unwrap();
}
