//! The cases of [`KeyStore::list_keys_page`](crate::store::KeyStore::list_keys_page):
//! order, paging, total, search and status filters, as
//! [`page_of`](crate::store::page_of) defines them.

use super::records::key_at;
use super::{Store, StoreFactory};
use crate::clock::UnixMillis;
use crate::key::{KeyId, KeyPrefix};
use crate::money::Micros;
use crate::policy::{Budget, BudgetPeriod};
use crate::record::KeyRecord;
use crate::store::{KeyPageQuery, KeyStatusFilter};

const NOW: UnixMillis = UnixMillis(50_000);

fn query(project: Option<&str>) -> KeyPageQuery {
    KeyPageQuery {
        project: project.map(str::to_owned),
        search: None,
        status: None,
        now: NOW,
        offset: 0,
        limit: 100,
    }
}

async fn page_ids(store: &Store, q: &KeyPageQuery) -> (Vec<KeyId>, u64) {
    let page = store.list_keys_page(q).await.unwrap();
    (page.keys.iter().map(|k| k.id.clone()).collect(), page.total)
}

async fn named(store: &Store, name: &str, prefix: &str, created_at: i64) -> KeyRecord {
    let mut k = key_at("alpha", created_at);
    k.name = name.to_owned();
    k.prefix = KeyPrefix::new(prefix.to_owned());
    k.expires_at = None;
    store.insert_key(&k, None).await.unwrap();
    k
}

/// Pages are newest first, the id breaking ties (descending); offset and
/// limit slice them, the total counts every match, the project filters,
/// and each row round-trips every field.
pub async fn keys_page_newest_first_with_offset_limit_and_total(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let mut alpha = Vec::new();
    for t in [1_000, 3_000, 2_000, 3_000, 4_000] {
        let k = key_at("alpha", t);
        store.insert_key(&k, None).await.unwrap();
        alpha.push(k);
    }
    let beta = key_at("beta", 9_000);
    store.insert_key(&beta, None).await.unwrap();
    alpha.sort_by(|a, b| (b.created_at, b.id.as_str()).cmp(&(a.created_at, a.id.as_str())));

    let mut q = query(Some("alpha"));
    let whole = store.list_keys_page(&q).await.unwrap();
    assert_eq!(whole.keys, alpha, "newest first, id descending on ties");
    assert_eq!(whole.total, 5);
    q.limit = 2;
    q.offset = 2;
    let (ids, total) = page_ids(&store, &q).await;
    assert_eq!(ids, vec![alpha[2].id.clone(), alpha[3].id.clone()]);
    assert_eq!(total, 5, "the total counts every page");
    q.offset = 4;
    assert_eq!(page_ids(&store, &q).await.0, vec![alpha[4].id.clone()]);
    q.offset = 9;
    assert_eq!(page_ids(&store, &q).await, (vec![], 5), "past the end");

    let (ids, total) = page_ids(&store, &query(None)).await;
    assert_eq!(total, 6);
    assert_eq!(ids[0], beta.id, "every project's keys without a project");
    assert_eq!(page_ids(&store, &query(Some("nobody"))).await, (vec![], 0));
}

/// Search matches part of the name (ASCII letters in any case, nothing
/// else folded, `%` and `_` literal) or the start of the prefix (exactly);
/// a blank search matches everything.
pub async fn keys_page_search_by_name_and_prefix(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let agent = named(&store, "Prod Agent", "vpx_live_Qa1z", 1_000).await;
    let batch = named(&store, "prod-batch", "vpx_live_Rb2y", 2_000).await;
    let sale = named(&store, "50%_off", "vpx_test_AbCd", 3_000).await;
    let umlaut = named(&store, "Ärger", "vpx_test_Zz9x", 4_000).await;
    let slash = named(&store, r"back\slash", "vpx_test_Yy8w", 5_000).await;
    let search = |s: &str| KeyPageQuery {
        search: Some(s.to_owned()),
        ..query(Some("alpha"))
    };
    let found = |ids: &[&KeyRecord]| ids.iter().map(|k| k.id.clone()).collect::<Vec<_>>();

    let (ids, total) = page_ids(&store, &search("PROD")).await;
    assert_eq!((ids, total), (found(&[&batch, &agent]), 2));
    assert_eq!(
        page_ids(&store, &search("  agent ")).await.0,
        found(&[&agent])
    );
    assert_eq!(page_ids(&store, &search("%")).await.0, found(&[&sale]));
    assert_eq!(page_ids(&store, &search(r"K\S")).await.0, found(&[&slash]));
    assert_eq!(page_ids(&store, &search("%_o")).await.0, found(&[&sale]));
    assert_eq!(page_ids(&store, &search("_")).await.0, found(&[&sale]));
    assert_eq!(
        page_ids(&store, &search("vpx_test_Ab")).await.0,
        found(&[&sale])
    );
    assert!(
        page_ids(&store, &search("vpx_test_ab")).await.0.is_empty(),
        "prefix is exact"
    );
    assert!(
        page_ids(&store, &search("test_AbCd")).await.0.is_empty(),
        "prefix start only"
    );
    assert_eq!(page_ids(&store, &search("vpx_live_")).await.1, 2);
    assert_eq!(page_ids(&store, &search("Ärg")).await.0, found(&[&umlaut]));
    assert!(
        page_ids(&store, &search("ärg")).await.0.is_empty(),
        "only ASCII is folded"
    );
    assert_eq!(
        page_ids(&store, &search("   ")).await.1,
        5,
        "blank: no search"
    );
    assert!(page_ids(&store, &search("nothing")).await.0.is_empty());
}

/// Status filters at the query's `now`: revoked wins, then expiry (at
/// `expires_at` itself the key has expired), then a spent non-zero `total`
/// budget makes an active key budget exhausted.
pub async fn keys_page_filters_by_status_at_now(factory: impl StoreFactory) {
    let fresh = factory.fresh();
    let store = fresh.store();
    let total = |usd_micros: u64, period: BudgetPeriod| {
        Some(Budget {
            limit: Micros(usd_micros),
            period,
            clamp_explicit_limits: false,
        })
    };
    let mut made = Vec::new();
    // (expires_at, revoked, budget, spend)
    let cases = [
        (None, false, None, 0), // 0 active
        (
            Some(NOW.0 + 1),
            false,
            total(1_000_000, BudgetPeriod::Total),
            999_999,
        ), // 1 active
        (Some(NOW.0), false, None, 0), // 2 expired at now
        (Some(NOW.0 - 1), true, None, 0), // 3 revoked
        (None, false, total(100_000, BudgetPeriod::Total), 100_000), // 4 exhausted
        (
            None,
            false,
            total(1_000_000, BudgetPeriod::Daily),
            2_000_000,
        ), // 5 active
        (None, false, total(0, BudgetPeriod::Total), 0), // 6 active
        (None, true, total(100_000, BudgetPeriod::Total), 200_000), // 7 revoked
        (Some(1), false, total(100_000, BudgetPeriod::Total), 200_000), // 8 expired
    ];
    for (i, (expires_at, revoked, budget, spend)) in cases.into_iter().enumerate() {
        let mut k = key_at("alpha", 1_000 + i as i64);
        k.expires_at = expires_at.map(UnixMillis);
        k.policy.budget = budget;
        store.insert_key(&k, None).await.unwrap();
        if spend > 0 {
            store
                .add_spend(&[(k.id.clone(), Micros(spend))])
                .await
                .unwrap();
        }
        if revoked {
            store.revoke_key(&k.id, UnixMillis(2_000)).await.unwrap();
        }
        made.push(k.id);
    }
    let pick = |is: &[usize]| {
        is.iter()
            .rev()
            .map(|&i| made[i].clone())
            .collect::<Vec<_>>()
    };
    let by = |s: KeyStatusFilter| KeyPageQuery {
        status: Some(s),
        ..query(Some("alpha"))
    };
    let expect = [
        (KeyStatusFilter::Active, pick(&[0, 1, 5, 6])),
        (KeyStatusFilter::Expired, pick(&[2, 8])),
        (KeyStatusFilter::Revoked, pick(&[3, 7])),
        (KeyStatusFilter::BudgetExhausted, pick(&[4])),
    ];
    for (status, want) in expect {
        let n = want.len() as u64;
        assert_eq!(page_ids(&store, &by(status)).await, (want, n), "{status:?}");
    }
    let before = KeyPageQuery {
        now: UnixMillis(NOW.0 - 1),
        ..by(KeyStatusFilter::Expired)
    };
    assert_eq!(
        page_ids(&store, &before).await.0,
        pick(&[8]),
        "expiry is at `now`"
    );
    let mut searched = by(KeyStatusFilter::Active);
    searched.search = Some(made[3].as_str().to_owned());
    assert_eq!(page_ids(&store, &searched).await.1, 0, "filters combine");
}
