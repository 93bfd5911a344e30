//! Promise 5 of docs/replicas.md: a replica that dies without a word
//! (`kill -9`, a lost host) leaves the others serving; its calls in flight
//! are charged their reservations, and its unused budget leases are free
//! again within seconds, not at their expiry. Each replica is a
//! `LeasedStore` over its own `PostgresStore` pool on one database; a
//! replica dies by having its heartbeat task aborted and its store leaked
//! (`mem::forget`), or — in the SIGKILL test — is a child process (this
//! test binary run again) killed with `kill -9`: nothing is drained or
//! settled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod replica_failure {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use tokio::task::JoinHandle;
    use vault_core::clock::UnixMillis;
    use vault_core::conformance::{key, line};
    use vault_core::money::Micros;
    use vault_core::record::{BudgetLine, Reservation, Settlement};
    use vault_core::store::{KeyStore, LeasedStore, StoreError};
    use vault_postgres::PostgresStore;
    use vault_postgres::testing::TestPostgres;

    const NOW: UnixMillis = UnixMillis(10_000);
    const LATER: UnixMillis = UnixMillis(600_000);
    /// A call's reservation ($0.01) and what a settled call costs.
    const WANT: u64 = 10_000;
    const COST: u64 = 4_000;
    /// Every replica's `stale_after` in these tests (5 s by default).
    const STALE: Duration = Duration::from_secs(1);
    /// How often each replica's maintenance heartbeat runs here.
    const BEAT: Duration = Duration::from_millis(200);

    type Store = LeasedStore<PostgresStore>;

    struct Replica {
        store: Arc<Store>,
        heart: JoinHandle<()>,
    }

    async fn replica(url: &str) -> Replica {
        let pg = PostgresStore::connect(url, 4).await.unwrap();
        let store = Arc::new(LeasedStore::new(pg).with_stale_after(STALE));
        let beating = store.clone();
        let heart = tokio::spawn(async move {
            loop {
                let _ = beating.heartbeat().await;
                tokio::time::sleep(BEAT).await;
            }
        });
        Replica { store, heart }
    }

    /// What one load task did: settled spend, calls, and the calls it left
    /// in flight (reserved, never settled).
    #[derive(Default)]
    struct Done {
        spent: u64,
        calls: usize,
        open: Vec<Reservation>,
    }

    /// Calls on `store` until `stop`: each reserves `WANT` and settles at
    /// `COST`, except every seventh, left in flight. Any refusal or error
    /// fails the test: the budget is ample.
    fn load(store: Arc<Store>, l: BudgetLine, stop: Arc<AtomicBool>) -> JoinHandle<Done> {
        tokio::spawn(async move {
            let mut done = Done::default();
            while !stop.load(Ordering::Relaxed) {
                let r = match store
                    .reserve(&l, Micros(WANT), Micros(WANT), NOW, LATER)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let u = store.get_ref().budget_usage(&l, NOW).await;
                        panic!("a call was refused after {} calls: {e}; {u:?}", done.calls)
                    }
                };
                done.calls += 1;
                if done.calls.is_multiple_of(7) {
                    done.open.push(r);
                } else {
                    store
                        .settle(&[Settlement {
                            reservation: r,
                            actual: Micros(COST),
                        }])
                        .await
                        .unwrap();
                    done.spent += COST;
                }
                // A call takes a while: about a thousand a second per task.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            done
        })
    }

    async fn finish(tasks: Vec<JoinHandle<Done>>) -> Done {
        let mut all = Done::default();
        for t in tasks {
            let d = t.await.unwrap();
            all.spent += d.spent;
            all.calls += d.calls;
            all.open.extend(d.open);
        }
        all
    }

    fn held(open: &[Reservation]) -> u64 {
        open.iter().map(|r| r.amount.0).sum()
    }

    /// How many leases the store still has for `holder`, what they hold,
    /// and what closing them would charge.
    async fn leases_of(url: &str, holder: &str) -> (i64, i64, i64) {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(*), COALESCE(sum(amount), 0)::BIGINT,
                        COALESCE(sum(LEAST(amount, cover - charged)), 0)::BIGINT
                   FROM reservations WHERE holder = $1",
                &[&holder],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_replica_killed_mid_load_others_serve_and_its_unused_leases_return_within_seconds()
     {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let bare = PostgresStore::connect(&url, 2).await.unwrap();
        let k = key();
        bare.insert_key(&k, None).await.unwrap();
        let l = line(&k, 1_000_000_000, 0);
        let replicas = [
            replica(&url).await,
            replica(&url).await,
            replica(&url).await,
        ];
        let (stop_victim, stop_others) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut victim_tasks = Vec::new();
        let mut other_tasks = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            for _ in 0..2 {
                if i == 2 {
                    victim_tasks.push(load(r.store.clone(), l.clone(), stop_victim.clone()));
                } else {
                    other_tasks.push(load(r.store.clone(), l.clone(), stop_others.clone()));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The victim dies between two calls, with calls in flight: no
        // drain, no settlement, its heartbeat gone.
        stop_victim.store(true, Ordering::Relaxed);
        let victim = finish(victim_tasks).await;
        let [a, b, v] = replicas;
        v.heart.abort();
        let _ = v.heart.await;
        let exposure = v.store.exposure().unwrap().0;
        let holder = v.store.holder_id().unwrap().to_owned();
        std::mem::forget(v.store);
        let killed = Instant::now();
        let (count, leased, charge) = leases_of(&url, &holder).await;
        assert!(count > 0, "the victim held leases");

        // The others keep serving; one of them closes the victim's leases.
        while leases_of(&url, &holder).await.0 > 0 {
            assert!(
                killed.elapsed() < STALE * 3,
                "the dead replica's leases were not closed within {:?}",
                STALE * 3
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed_after = killed.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_others.store(true, Ordering::Relaxed);
        let others = finish(other_tasks).await;
        assert!(others.calls > 0);

        // The survivors settle their calls in flight and give back their
        // leases: what is left charged is exactly what every call cost,
        // what the victim's calls in flight held, and the victim's
        // exposure (its covers beyond what its calls spent and held).
        let mut survivors_spent = others.spent;
        for (i, r) in others.open.iter().enumerate() {
            let s = if i % 2 == 0 { &a.store } else { &b.store };
            // Settling on the other replica is a no-op: only the one that
            // holds a call's lease knows it. Settle on both.
            for s in [s, if i % 2 == 0 { &b.store } else { &a.store }] {
                s.settle(&[Settlement {
                    reservation: r.clone(),
                    actual: Micros(COST),
                }])
                .await
                .unwrap();
            }
            survivors_spent += COST;
        }
        a.heart.abort();
        b.heart.abort();
        a.store.flush().await.unwrap();
        b.store.flush().await.unwrap();
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        eprintln!(
            "victim: {} calls, {} µ$ settled, {} µ$ in flight, {leased} µ$ leased, \
             closed at {charge} µ$, exposure {exposure} µ$; its leases closed {closed_after:?} after the kill; \
             survivors: {} calls",
            victim.calls,
            victim.spent,
            held(&victim.open),
            others.calls
        );
        assert!(
            charge < leased,
            "part of the dead replica's leases was released, not charged"
        );
        assert_eq!(usage.reserved, Micros(0), "nothing is left held");
        assert_eq!(
            usage.settled.0,
            survivors_spent + victim.spent + held(&victim.open) + exposure,
            "charged: every settled call, the dead replica's calls in flight, its exposure"
        );
        let spend = bare.get_key(&k.id).await.unwrap().unwrap().spend;
        assert_eq!(spend, usage.settled);
    }

    /// The child replica's environment: the database and the key.
    const CHILD_URL: &str = "VAULTGATE_TEST_CHILD_REPLICA_URL";
    const CHILD_KEY: &str = "VAULTGATE_TEST_CHILD_REPLICA_KEY";
    /// The budget of the SIGKILL test.
    const CHILD_CAP: u64 = 1_000_000_000;

    /// The replica that `lifecycle_replica_sigkilled_mid_load…` runs as a
    /// child process (the same test, re-executed with [`CHILD_URL`] and
    /// [`CHILD_KEY`] set) and kills. It prints its holder id, then one line
    /// per call once the call is settled (`vg-settled COST`) or left in
    /// flight (`vg-open HOLD`), and serves until killed.
    async fn child_replica_serves_until_killed(url: String, key: String) {
        // Never outlive the parent: it holds our standard input.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        let r = replica(&url).await;
        let l = BudgetLine {
            key: vault_core::key::KeyId::parse(&key).unwrap(),
            limit: Micros(CHILD_CAP),
            period_start: UnixMillis(0),
        };
        println!("vg-holder {}", r.store.holder_id().unwrap());
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (store, l) = (r.store.clone(), l.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    // Refused or failing: the parent is gone, or the test
                    // failed; the parent sees no more lines either way.
                    let Ok(res) = store
                        .reserve(&l, Micros(WANT), Micros(WANT), NOW, LATER)
                        .await
                    else {
                        break;
                    };
                    n += 1;
                    if n.is_multiple_of(7) {
                        println!("vg-open {}", res.amount.0);
                    } else {
                        store
                            .settle(&[Settlement {
                                reservation: res,
                                actual: Micros(COST),
                            }])
                            .await
                            .unwrap();
                        println!("vg-settled {COST}");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// What the child printed: its holder id, and what its calls that it
    /// reported spent and held.
    #[derive(Default, Debug)]
    struct Acknowledged {
        holder: String,
        spent: u64,
        open: u64,
        calls: usize,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_replica_sigkilled_mid_load_is_charged_at_least_what_it_acknowledged() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};

        if let (Ok(url), Ok(key)) = (std::env::var(CHILD_URL), std::env::var(CHILD_KEY)) {
            return child_replica_serves_until_killed(url, key).await;
        }

        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let bare = PostgresStore::connect(&url, 2).await.unwrap();
        let k = key();
        bare.insert_key(&k, None).await.unwrap();
        let l = line(&k, CHILD_CAP, 0);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "replica_failure::lifecycle_replica_sigkilled_mid_load_is_charged_at_least_what_it_acknowledged",
                "--nocapture",
            ])
            .env(CHILD_URL, &url)
            .env(CHILD_KEY, k.id.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let acked = Arc::new(std::sync::Mutex::new(Acknowledged::default()));
        let reading = acked.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut a = reading.lock().unwrap();
                match line.split_once(' ') {
                    Some(("vg-holder", id)) => a.holder = id.to_owned(),
                    Some(("vg-settled", c)) => {
                        a.spent += c.parse::<u64>().unwrap();
                        a.calls += 1;
                    }
                    Some(("vg-open", h)) => {
                        a.open += h.parse::<u64>().unwrap();
                        a.calls += 1;
                    }
                    _ => {}
                }
            }
        });
        let survivors = [replica(&url).await, replica(&url).await];
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = survivors
            .iter()
            .map(|r| load(r.store.clone(), l.clone(), stop.clone()))
            .collect();
        let started = Instant::now();
        while acked.lock().unwrap().calls < 1_000 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the child made no calls"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // SIGKILL, mid-load.
        child.kill().unwrap();
        let killed = Instant::now();
        child.wait().unwrap();
        reader.join().unwrap();
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let (count, leased, closing) = leases_of(&url, &acked.holder).await;
        assert!(count > 0, "the child held leases");
        while leases_of(&url, &acked.holder).await.0 > 0 {
            assert!(
                killed.elapsed() < STALE * 3,
                "the killed replica's leases were not closed within {:?}",
                STALE * 3
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed_after = killed.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let others = finish(tasks).await;
        assert!(others.calls > 0, "the others kept serving");
        let [a, b] = survivors;
        let mut survivors_spent = others.spent;
        for r in &others.open {
            for s in [&a.store, &b.store] {
                s.settle(&[Settlement {
                    reservation: r.clone(),
                    actual: Micros(COST),
                }])
                .await
                .unwrap();
            }
            survivors_spent += COST;
        }
        a.heart.abort();
        b.heart.abort();
        a.store.flush().await.unwrap();
        b.store.flush().await.unwrap();
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        let charged = usage.settled.0 - survivors_spent;
        let acknowledged = acked.spent + acked.open;
        eprintln!(
            "child: {} calls acknowledged ({} µ$ spent, {} µ$ in flight); at the kill its \
             leases held {leased} µ$ and closing them charged {closing} µ$; closed \
             {closed_after:?} after the kill; charged {charged} µ$ in all, {} µ$ beyond \
             what it acknowledged; survivors: {} calls",
            acked.calls,
            acked.spent,
            acked.open,
            charged - acknowledged,
            others.calls
        );
        assert_eq!(usage.reserved, Micros(0), "nothing is left held");
        assert!(
            charged >= acknowledged,
            "the killed replica was charged {charged} µ$, less than its calls spent and held ({acknowledged} µ$)"
        );
        // Beyond that: its exposure (at most a cover step per lease, never
        // more than the leases it held) and the calls it made but had not
        // printed when it died (one per task at most).
        assert!(
            charged - acknowledged <= u64::try_from(leased).unwrap() + 2 * WANT,
            "charged {} µ$ beyond what it acknowledged, more than its leases held",
            charged - acknowledged
        );
        assert!(closing <= leased);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lifecycle_replica_taken_for_dead_while_alive_never_spends_past_the_cap() {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let bare = PostgresStore::connect(&url, 2).await.unwrap();
        let k = key();
        bare.insert_key(&k, None).await.unwrap();
        // Room for 100 calls of $0.01.
        let cap = 100 * WANT;
        let l = line(&k, cap, 0);
        let new = |url: String| async move {
            let pg = PostgresStore::connect(&url, 4).await.unwrap();
            Arc::new(LeasedStore::new(pg).with_stale_after(STALE))
        };
        let (a, b) = (new(url.clone()).await, new(url.clone()).await);
        // A takes others for dead only once its own heartbeats have held
        // for `STALE`.
        a.heartbeat().await.unwrap();
        // B takes a lease and leaves three calls in flight, then stalls
        // (no heartbeat) until A takes it for dead and closes its leases.
        let mut b_open = Vec::new();
        for _ in 0..3 {
            b_open.push(
                b.reserve(&l, Micros(WANT), Micros(WANT), NOW, LATER)
                    .await
                    .unwrap(),
            );
        }
        let exposure = b.exposure().unwrap().0;
        tokio::time::sleep(STALE + Duration::from_millis(200)).await;
        assert!(a.heartbeat().await.unwrap() > 0, "A closed B's lease");
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        assert_eq!(usage.settled.0, 3 * WANT + exposure, "charged at its cover");
        assert_eq!(usage.reserved, Micros(0), "the rest released");
        // B wakes up: its calls in flight settle as no-ops (charged
        // already), and it takes new leases for new calls.
        b.settle(
            &b_open
                .iter()
                .map(|r| Settlement {
                    reservation: r.clone(),
                    actual: Micros(COST),
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        // Both race for what is left; every call charged its whole hold.
        let mut granted = 0u64;
        loop {
            let mut progressed = false;
            for s in [&a, &b] {
                match s.reserve(&l, Micros(WANT), Micros(1), NOW, LATER).await {
                    Ok(r) => {
                        granted += r.amount.0;
                        s.settle(&[Settlement {
                            actual: r.amount,
                            reservation: r,
                        }])
                        .await
                        .unwrap();
                        progressed = true;
                    }
                    Err(StoreError::BudgetExceeded { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            if !progressed {
                break;
            }
        }
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        let usage = bare.budget_usage(&l, NOW).await.unwrap();
        assert_eq!(usage.reserved, Micros(0));
        assert_eq!(
            usage.settled.0,
            3 * WANT + exposure + granted,
            "the closed lease's charge plus every later call, nothing twice"
        );
        assert_eq!(
            usage.settled.0, cap,
            "the budget is used up to the cap and not past it"
        );
    }
}
