//! The promises of a [`SessionStore`]: what it is told to keep it keeps,
//! purges what it is told to, and counts racing failed sign-ins exactly
//! (every replica counts into the same row).

use std::sync::Arc;

use crate::clock::UnixMillis;
use crate::key::KeyHash;
use crate::store::{SessionPurge, SessionRecord, SessionStore};

fn record(n: u8, at: i64) -> SessionRecord {
    SessionRecord {
        key_hash: KeyHash::of(&format!("vpx_test_key{n}")),
        csrf: hex::encode([n; 32]),
        project: None,
        created: UnixMillis(at),
        last_seen: UnixMillis(at),
    }
}

const KEEP_ALL: SessionPurge = SessionPurge {
    idle_before: UnixMillis(0),
    created_before: UnixMillis(0),
    keep: 1000,
};

/// Sessions round-trip, touch only moves `last_seen` forward, the project
/// is set and cleared, close removes; `open_session` purges idle, old and
/// least recently seen sessions; failed sign-ins count per client and
/// window, exactly under 50 racing writers.
pub async fn session_store_keeps_purges_and_counts(store: Arc<dyn SessionStore>) {
    let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    assert_eq!(store.session(&a).await.unwrap(), None);
    store
        .open_session(&a, &record(1, 1_000), KEEP_ALL)
        .await
        .unwrap();
    assert_eq!(store.session(&a).await.unwrap(), Some(record(1, 1_000)));

    store.touch_session(&a, UnixMillis(5_000)).await.unwrap();
    store.touch_session(&a, UnixMillis(4_000)).await.unwrap();
    let s = store.session(&a).await.unwrap().unwrap();
    assert_eq!(
        (s.created, s.last_seen),
        (UnixMillis(1_000), UnixMillis(5_000))
    );

    store.set_session_project(&a, Some("search")).await.unwrap();
    assert_eq!(
        store.session(&a).await.unwrap().unwrap().project.as_deref(),
        Some("search")
    );
    store.set_session_project(&a, None).await.unwrap();
    assert_eq!(store.session(&a).await.unwrap().unwrap().project, None);

    // Idle (last seen before 6 s) and old (created before 2 s) go; of the
    // rest, only the most recently seen `keep - 1` stay beside the new one.
    store
        .open_session(&b, &record(2, 7_000), KEEP_ALL)
        .await
        .unwrap();
    let purge = SessionPurge {
        idle_before: UnixMillis(6_000),
        created_before: UnixMillis(2_000),
        keep: 1000,
    };
    store
        .open_session(&c, &record(3, 8_000), purge)
        .await
        .unwrap();
    assert_eq!(store.session(&a).await.unwrap(), None, "idle and old");
    assert!(store.session(&b).await.unwrap().is_some());
    let crowded = SessionPurge { keep: 2, ..purge };
    store
        .open_session(&a, &record(1, 9_000), crowded)
        .await
        .unwrap();
    assert_eq!(
        store.session(&b).await.unwrap(),
        None,
        "least recently seen"
    );
    assert!(store.session(&c).await.unwrap().is_some());
    assert!(store.session(&a).await.unwrap().is_some());

    store.close_session(&c).await.unwrap();
    store.close_session(&c).await.unwrap();
    assert_eq!(store.session(&c).await.unwrap(), None);

    let w1 = UnixMillis(60_000);
    let w2 = UnixMillis(120_000);
    assert_eq!(store.sign_in_failures("10.0.0.1", w1).await.unwrap(), 0);
    let racers: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.count_sign_in_failure("10.0.0.1", w1).await })
        })
        .collect();
    for r in racers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(store.sign_in_failures("10.0.0.1", w1).await.unwrap(), 50);
    assert_eq!(store.sign_in_failures("10.0.0.2", w1).await.unwrap(), 0);
    store.count_sign_in_failure("10.0.0.1", w2).await.unwrap();
    assert_eq!(
        store.sign_in_failures("10.0.0.1", w2).await.unwrap(),
        1,
        "a new window starts at one"
    );
    assert_eq!(store.sign_in_failures("10.0.0.1", w1).await.unwrap(), 0);
}
