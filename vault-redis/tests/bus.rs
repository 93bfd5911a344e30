//! The revocation bus across replicas, and secrets kept out of every
//! message (docs/redis.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vault_core::clock::UnixMillis;
use vault_core::key::KeyId;
use vault_core::policy::{ChainLimit, RateLimit, SharedLimiter};
use vault_redis::testing::TestRedis;
use vault_redis::{RedisConfig, RedisLimiter, RevocationBus, Subscription};

macro_rules! redis_or_skip {
    ($start:expr) => {
        match $start.unwrap() {
            Some(r) => r,
            None => return,
        }
    };
}

struct Replica {
    revoked: Arc<Mutex<Vec<(KeyId, Instant)>>>,
    resyncs: Arc<AtomicUsize>,
    subscription: Subscription,
}

fn replica(bus: &RevocationBus) -> Replica {
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let resyncs = Arc::new(AtomicUsize::new(0));
    let (r, s) = (Arc::clone(&revoked), Arc::clone(&resyncs));
    let subscription = bus.subscribe(
        move |ids| {
            let now = Instant::now();
            r.lock()
                .unwrap()
                .extend(ids.iter().map(|id| (id.clone(), now)));
        },
        move || {
            s.fetch_add(1, Ordering::SeqCst);
        },
    );
    Replica {
        revoked,
        resyncs,
        subscription,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_revocations_reach_every_replica_within_a_second() {
    let redis = redis_or_skip!(TestRedis::start());
    let config = redis.config().unwrap();
    // Each replica its own bus (its own connections).
    let buses: Vec<RevocationBus> = (0..3)
        .map(|_| RevocationBus::new(&config).unwrap())
        .collect();
    let replicas: Vec<Replica> = buses.iter().map(replica).collect();
    for r in &replicas {
        assert!(r.subscription.wait_connected(Duration::from_secs(5)).await);
    }
    let ids = [
        KeyId::parse("key_parent").unwrap(),
        KeyId::parse("key_child").unwrap(),
    ];
    let sent = Instant::now();
    assert_eq!(buses[0].publish(&ids).await.unwrap(), 3);
    for r in &replicas {
        loop {
            let got = r.revoked.lock().unwrap().clone();
            if got.len() == 2 {
                let names: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
                assert_eq!(names, ["key_parent", "key_child"]);
                assert!(got[1].1.duration_since(sent) < Duration::from_secs(1));
                break;
            }
            assert!(sent.elapsed() < Duration::from_secs(1), "not delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Connected on the first try: nothing was missed.
        assert_eq!(r.resyncs.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_reconnected_subscriber_resyncs() {
    let mut redis = redis_or_skip!(TestRedis::start());
    let config = redis.config().unwrap();
    let bus = RevocationBus::new(&config).unwrap();
    let r = replica(&bus);
    assert!(r.subscription.wait_connected(Duration::from_secs(5)).await);
    redis.stop();
    // Publishing while Redis is down fails (the store still holds the
    // revocation); the subscriber notices the lost connection.
    assert!(
        bus.publish(&[KeyId::parse("key_lost").unwrap()])
            .await
            .is_err()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.subscription.is_connected() {
        assert!(Instant::now() < deadline, "the loss went unnoticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.restart().unwrap();
    assert!(r.subscription.wait_connected(Duration::from_secs(10)).await);
    assert_eq!(r.resyncs.load(Ordering::SeqCst), 1);
    // And messages flow again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if bus.publish(&[KeyId::parse("key_after").unwrap()]).await == Ok(1) {
            break;
        }
        assert!(Instant::now() < deadline, "publish never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while r.revoked.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(r.revoked.lock().unwrap()[0].0.as_str(), "key_after");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn leak_the_redis_password_is_in_no_debug_error_or_log() {
    const PASSWORD: &str = "pw-7d1c0ffee-secret";
    let redis = redis_or_skip!(TestRedis::start_with_password(PASSWORD));
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The right password works.
    let good = redis.config().unwrap();
    let limiter = RedisLimiter::new(&good).unwrap();
    limiter.ping().await.unwrap();
    // A wrong one fails, and says nothing of either.
    let wrong_url = format!("redis://:wrong-{PASSWORD}@127.0.0.1:{}", redis.port());
    let wrong = RedisConfig::new(wrong_url)
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let bad = RedisLimiter::new(&wrong).unwrap();
    let e = bad.ping().await.unwrap_err();
    let id = KeyId::parse("key_a").unwrap();
    let rate = RateLimit {
        requests_per_minute: Some(1),
        ..RateLimit::default()
    };
    let chain = [ChainLimit {
        id: &id,
        rate,
        max_parallel: None,
    }];
    let admit = bad.admit(&chain, UnixMillis(0), false).await.unwrap_err();
    let bus = RevocationBus::new(&wrong).unwrap();
    let publish = bus.publish(std::slice::from_ref(&id)).await.unwrap_err();
    let sub = bus.subscribe(|_| {}, || {});
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(sub);
    let unreachable = RedisConfig::new(format!("redis://:{PASSWORD}@127.0.0.1:1"))
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let down = RedisLimiter::new(&unreachable)
        .unwrap()
        .ping()
        .await
        .unwrap_err();
    let bad_url = RedisConfig::new(format!("redis://:{PASSWORD}@[::1:6379")).unwrap_err();

    let texts = [
        format!("{good:?} {wrong:?} {unreachable:?}"),
        format!("{limiter:?} {bad:?} {bus:?}"),
        format!("{e} {e:?} {admit} {admit:?} {publish} {down} {bad_url} {bad_url:?}"),
        String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned(),
    ];
    for t in &texts {
        assert!(!t.contains(PASSWORD), "{t}");
        assert!(!t.contains("wrong-pw"), "{t}");
    }
    assert!(texts[0].contains("redis://***@127.0.0.1"), "{}", texts[0]);
}
