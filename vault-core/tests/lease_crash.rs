//! A `LeasedStore` whose process dies (`kill -9`) must not lock the budget
//! until its leases expire, nor charge them in full: with a lease journal,
//! another process (or the next start) settles them at once at what their
//! calls spent and still hold (issue #12 item 4).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vault_core::clock::UnixMillis;
use vault_core::conformance::{child_of, key, line};
use vault_core::key::KeyId;
use vault_core::money::Micros;
use vault_core::record::{BudgetLine, Reservation, Settlement};
use vault_core::store::{KeyStore, LeasedStore, SqliteStore, StoreError, recover_lease_journals};

const NOW: UnixMillis = UnixMillis(10_000);
const LATER: UnixMillis = UnixMillis(70_000);
const CAP: u64 = 5_000_000;
/// Set in the child process: the data directory and the key id.
const CHILD_ENV: &str = "VAULTGATE_LEASE_CRASH_CHILD";

fn settle_at(r: &Reservation, actual: u64) -> Settlement {
    Settlement {
        reservation: r.clone(),
        actual: Micros(actual),
    }
}

fn journals(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.filter(|e| e.is_ok()).count())
        .unwrap_or(0)
}

/// Not a test of its own: the process `lifecycle_kill_9_...` starts and
/// kills. Without its environment variable it does nothing.
#[test]
fn crash_child_process() {
    let Ok(env) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (data, id) = env.split_once('|').unwrap();
    let data = PathBuf::from(data);
    let l = BudgetLine {
        key: KeyId::parse(id).unwrap(),
        limit: Micros(CAP),
        period_start: UnixMillis(0),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let leased = LeasedStore::new(SqliteStore::open(&data.join("v.db")).unwrap())
            .with_journal(&data.join("leases"))
            .unwrap();
        // One call settled at $0.40, two in flight ($0.30 and $0.20).
        let done = leased
            .reserve(&l, Micros(400_000), Micros(1), NOW, LATER)
            .await
            .unwrap();
        leased.settle(&[settle_at(&done, 400_000)]).await.unwrap();
        let _a = leased
            .reserve(&l, Micros(300_000), Micros(1), NOW, LATER)
            .await
            .unwrap();
        let _b = leased
            .reserve(&l, Micros(200_000), Micros(1), NOW, LATER)
            .await
            .unwrap();
        println!("ready");
        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
    });
}

#[tokio::test]
async fn lifecycle_kill_9_mid_calls_leaves_cap_minus_settled_minus_in_flight_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v.db");
    let journal_dir = dir.path().join("leases");
    let bare = SqliteStore::open(&db).unwrap();
    let k = key();
    bare.insert_key(&k, None).await.unwrap();
    let l = line(&k, CAP, 0);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child_process", "--exact", "--nocapture"])
        .env(
            CHILD_ENV,
            format!("{}|{}", dir.path().display(), k.id.as_str()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("ready") {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "child exited: {seen}");
        seen.push_str(&l);
    }
    // While its owner lives, a journal is left alone.
    assert_eq!(
        recover_lease_journals(&bare, &journal_dir).await.unwrap(),
        0
    );
    let held = bare.budget_usage(&l, NOW).await.unwrap();
    assert!(held.reserved.0 >= 500_000, "{held:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The next start (a leased store with a journal) recovers at once,
    // long before the dead leases expire; every process sees it.
    let restarted = LeasedStore::new(SqliteStore::open(&db).unwrap())
        .with_journal(&journal_dir)
        .unwrap();
    assert!(restarted.recover().await.unwrap() >= 1);
    let usage = bare.budget_usage(&l, NOW).await.unwrap();
    assert_eq!(
        (usage.settled, usage.reserved),
        (Micros(900_000), Micros::ZERO),
        "settled $0.40 plus the $0.50 in flight, not the whole lease"
    );
    assert_eq!(usage.remaining(Micros(CAP)), Micros(CAP - 900_000));
    assert_eq!(
        bare.get_key(&k.id).await.unwrap().unwrap().spend,
        Micros(900_000)
    );
    // The restarted store can spend the rest at once.
    let r = restarted
        .reserve(&l, Micros(CAP - 900_000), Micros(CAP - 900_000), NOW, LATER)
        .await
        .unwrap();
    restarted.settle(&[settle_at(&r, 0)]).await.unwrap();
    // Recovered once: the dead journal is gone, only the live one is left.
    assert_eq!(journals(&journal_dir), 1);
    assert_eq!(restarted.recover().await.unwrap(), 0);
}

#[tokio::test]
async fn lifecycle_dropped_owner_is_recovered_by_a_sibling_sweep_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v.db");
    let journal_dir = dir.path().join("leases");
    let sibling = LeasedStore::new(SqliteStore::open(&db).unwrap())
        .with_journal(&journal_dir)
        .unwrap();
    let k = key();
    sibling.insert_key(&k, None).await.unwrap();
    let l = line(&k, CAP, 0);
    {
        let owner = LeasedStore::new(SqliteStore::open(&db).unwrap())
            .with_journal(&journal_dir)
            .unwrap();
        let mut calls = Vec::new();
        for _ in 0..5 {
            calls.push(
                owner
                    .reserve(&l, Micros(100_000), Micros(1), NOW, LATER)
                    .await
                    .unwrap(),
            );
        }
        // Three settle (one in part first), two are lost in flight.
        owner
            .settle_part(&settle_at(&calls[0], 10_000), Micros(50_000))
            .await
            .unwrap();
        owner
            .settle(&[settle_at(&calls[0], 20_000), settle_at(&calls[1], 70_000)])
            .await
            .unwrap();
        owner.flush().await.unwrap(); // charged so far, calls still open
        // A new journal generation holds what is held now; the old is gone.
        let before = journals(&journal_dir);
        owner.compact_journal().await.unwrap();
        assert_eq!(journals(&journal_dir), before);
        owner.settle(&[settle_at(&calls[2], 5_000)]).await.unwrap();
        // Dropped without flush: the lock goes with the file, as on a kill.
    }
    // Before the sibling's sweep, the other process sees the lease held.
    let bare = SqliteStore::open(&db).unwrap();
    assert!(bare.budget_usage(&l, NOW).await.unwrap().reserved > Micros(200_000));
    sibling.sweep(NOW).await.unwrap();
    let usage = bare.budget_usage(&l, NOW).await.unwrap();
    assert_eq!(
        (usage.settled, usage.reserved),
        (
            Micros(10_000 + 20_000 + 70_000 + 5_000 + 200_000),
            Micros::ZERO
        )
    );
}

#[tokio::test]
async fn boundary_a_first_lease_is_sized_to_demand_not_the_whole_budget() {
    let leased = LeasedStore::new(vault_core::store::MemoryStore::new());
    let k = key();
    leased.insert_key(&k, None).await.unwrap();
    let l = line(&k, CAP, 0);
    let r = leased
        .reserve(&l, Micros(400_000), Micros(1), NOW, LATER)
        .await
        .unwrap();
    let held = leased
        .get_ref()
        .budget_usage(&l, NOW)
        .await
        .unwrap()
        .reserved;
    // 16 × $0.40 would be $6.40 (all of the $5); a quarter of what is left.
    assert_eq!(held, Micros(CAP / 4));
    assert_eq!(r.amount, Micros(400_000));
}

/// A tiny seeded generator (no dependency): xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One randomized run: reserve, settle, revoke the child, crash and
/// recover, in a seeded order. Settled spend never passes the cap, never
/// goes down, and ends exactly at what the calls cost (lost calls at their
/// reservation), the child's capped at its carve-out.
async fn random_interleaving(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v.db");
    let journal_dir = dir.path().join("leases");
    let open = || {
        LeasedStore::new(SqliteStore::open(&db).unwrap())
            .with_lease_factor(4)
            .with_journal(&journal_dir)
            .unwrap()
    };
    let bare = SqliteStore::open(&db).unwrap();
    let parent = key();
    bare.insert_key(&parent, None).await.unwrap();
    let pl = line(&parent, CAP, 0);
    let child = child_of(&parent);
    const CARVE: u64 = 2_000_000;
    bare.insert_key(&child, Some((&pl, Micros(CARVE))))
        .await
        .unwrap();
    let cl = line(&child, CARVE, 0);

    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut store = open();
    // Open calls: (reservation, of the child).
    let mut open_calls: Vec<(Reservation, bool)> = Vec::new();
    let (mut parent_cost, mut child_cost) = (0u64, 0u64);
    let mut child_revoked = false;
    let mut last_settled = 0;
    for _ in 0..200 {
        match rng.below(10) {
            0..=3 => {
                let of_child = !child_revoked && rng.below(2) == 0;
                let l = if of_child { &cl } else { &pl };
                let want = Micros(1 + rng.below(300_000));
                match store.reserve(l, want, Micros(1), NOW, LATER).await {
                    Ok(r) => open_calls.push((r, of_child)),
                    Err(StoreError::BudgetExceeded { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            4..=7 if !open_calls.is_empty() => {
                let i = usize::try_from(rng.below(open_calls.len() as u64)).unwrap();
                let (r, of_child) = open_calls.swap_remove(i);
                let actual = rng.below(r.amount.0 + 1);
                store.settle(&[settle_at(&r, actual)]).await.unwrap();
                *(if of_child {
                    &mut child_cost
                } else {
                    &mut parent_cost
                }) += actual;
            }
            8 if !child_revoked => {
                store.revoke_key(&child.id, NOW).await.unwrap();
                child_revoked = true;
            }
            8 => store.compact_journal().await.unwrap(),
            9 => {
                // kill -9: calls in flight are lost, charged what they hold.
                for (r, of_child) in open_calls.drain(..) {
                    *(if of_child {
                        &mut child_cost
                    } else {
                        &mut parent_cost
                    }) += r.amount.0;
                }
                drop(store);
                store = open();
                store.recover().await.unwrap();
            }
            _ => {}
        }
        let usage = bare.budget_usage(&pl, NOW).await.unwrap();
        assert!(
            usage.settled.0 + usage.reserved.0 <= CAP,
            "seed {seed}: {usage:?} over the cap"
        );
        assert!(usage.settled.0 >= last_settled, "seed {seed}: spend lost");
        last_settled = usage.settled.0;
    }
    for (r, of_child) in open_calls.drain(..) {
        store.settle(&[settle_at(&r, r.amount.0)]).await.unwrap();
        *(if of_child {
            &mut child_cost
        } else {
            &mut parent_cost
        }) += r.amount.0;
    }
    if !child_revoked {
        store.revoke_key(&child.id, NOW).await.unwrap();
    }
    store.flush().await.unwrap();
    let usage = bare.budget_usage(&pl, NOW).await.unwrap();
    assert_eq!(
        (usage.settled.0, usage.reserved.0),
        (parent_cost + child_cost.min(CARVE), 0),
        "seed {seed}"
    );
}

#[tokio::test]
async fn concurrency_random_reserve_settle_revoke_crash_never_passes_the_cap() {
    for seed in 0..8 {
        random_interleaving(seed).await;
    }
}
