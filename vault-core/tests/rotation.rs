//! Master-key rotation and the start-up master-key check, against every
//! store backend (docs/threat-model.md, D4, J2, K1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vault_core::clock::UnixMillis;
use vault_core::crypto::{
    Aad, AesGcmEncryptor, Encryptor, MasterKey, MasterKeyError, ProviderSecret, RotationError,
    RotationReport, Sealed, rotate_master_key, sealed_key_id, verify_master_keys,
};
use vault_core::key::ProviderKeyId;
use vault_core::provider::Provider;
use vault_core::record::ProviderKeyRecord;
use vault_core::store::{KeyStore, MemoryStore, SqliteStore};

type Store = Arc<dyn KeyStore>;

/// A backend under test plus whatever must live as long as it.
struct Backend {
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

fn memory() -> Backend {
    Backend {
        store: Arc::new(MemoryStore::new()),
        _dir: None,
    }
}

fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(&dir.path().join("data")).unwrap();
    Backend {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

/// A pair of master keys that can be loaded more than once (a `MasterKey`
/// is not `Clone`, as a secret should not be).
struct Keys {
    old: String,
    new: String,
}

impl Keys {
    fn generate() -> Self {
        Keys {
            old: MasterKey::generate().unwrap().to_base64().to_string(),
            new: MasterKey::generate().unwrap().to_base64().to_string(),
        }
    }

    fn key(b64: &str) -> MasterKey {
        MasterKey::from_base64(b64).unwrap()
    }

    fn old_only(&self) -> AesGcmEncryptor {
        AesGcmEncryptor::new(Self::key(&self.old)).unwrap()
    }

    fn new_only(&self) -> AesGcmEncryptor {
        AesGcmEncryptor::new(Self::key(&self.new)).unwrap()
    }

    /// New current, old previous: the rotation configuration.
    fn rotating(&self) -> AesGcmEncryptor {
        AesGcmEncryptor::with_previous(Self::key(&self.new), vec![Self::key(&self.old)]).unwrap()
    }
}

fn aad(r: &ProviderKeyRecord) -> Aad<'_> {
    Aad {
        record_id: r.id.as_str(),
        project: &r.project,
        provider: r.provider,
    }
}

fn plaintext(i: usize) -> String {
    format!("sk-rotation-{i:04}-abcdefghijklmnop")
}

/// Stores `n` provider keys sealed by `enc`, over several projects and
/// providers. Returns id → plaintext.
async fn seed(store: &Store, enc: &dyn Encryptor, n: usize) -> HashMap<ProviderKeyId, String> {
    let mut out = HashMap::new();
    for i in 0..n {
        let id = ProviderKeyId::generate().unwrap();
        let project = format!("project{}", i % 3);
        let provider = Provider::ALL[i % Provider::ALL.len()];
        let text = plaintext(i);
        let secret = ProviderSecret::new(text.clone());
        let sealed = enc
            .seal(
                &secret,
                &Aad {
                    record_id: id.as_str(),
                    project: &project,
                    provider,
                },
            )
            .unwrap();
        store
            .insert_provider_key(&ProviderKeyRecord {
                id: id.clone(),
                project,
                provider,
                name: format!("key {i}"),
                sealed,
                hint: secret.hint(),
                created_at: UnixMillis(1_000 + i as i64),
            })
            .await
            .unwrap();
        out.insert(id, text);
    }
    out
}

/// Asserts every record opens under `enc` to its plaintext; returns how
/// many are wrapped by `enc`'s current key.
async fn assert_all_open(
    store: &Store,
    enc: &dyn Encryptor,
    expected: &HashMap<ProviderKeyId, String>,
) -> usize {
    let records = store.list_provider_keys(None).await.unwrap();
    assert_eq!(records.len(), expected.len());
    let mut current = 0;
    for r in &records {
        let opened = enc.open(&r.sealed, &aad(r)).unwrap();
        assert_eq!(opened.expose_secret(), expected[&r.id]);
        if sealed_key_id(&r.sealed) == Some(enc.current_key_id()) {
            current += 1;
        }
    }
    current
}

#[path = "support/interfering_store.rs"]
mod interfering_store;
use interfering_store::{Interference, Interfering};

const N: usize = 24;

async fn rotation_rewraps_every_record(b: Backend) {
    let keys = Keys::generate();
    let expected = seed(&b.store, &keys.old_only(), N).await;
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();

    let rotating = keys.rotating();
    let report = rotate_master_key(&*b.store, &rotating).await.unwrap();
    assert_eq!(
        report,
        RotationReport {
            rewrapped: N,
            already_current: 0
        }
    );
    assert_eq!(
        assert_all_open(&b.store, &keys.new_only(), &expected).await,
        N
    );
    for r in b.store.list_provider_keys(None).await.unwrap() {
        assert!(keys.old_only().open(&r.sealed, &aad(&r)).is_err());
    }
    // A rerun is a no-op.
    let again = rotate_master_key(&*b.store, &rotating).await.unwrap();
    assert_eq!(
        again,
        RotationReport {
            rewrapped: 0,
            already_current: N
        }
    );
}

async fn lifecycle_rotation_resumes_after_crash(b: Backend) {
    let keys = Keys::generate();
    let expected = seed(&b.store, &keys.old_only(), N).await;
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();
    let rotating = keys.rotating();

    // Crash three times at different points, then finish.
    let mut done = 0;
    for crash_after in [0, 5, 11] {
        let crashing = Interfering::new(
            b.store.clone(),
            Interference::FailAfter(AtomicUsize::new(crash_after)),
        );
        let err = rotate_master_key(&crashing, &rotating).await.unwrap_err();
        assert!(matches!(err, RotationError::Store(_)), "{err:?}");
        done += crash_after;
        // Every record opens, each under the old or the new key, never neither.
        let under_new = assert_all_open(&b.store, &rotating, &expected).await;
        assert_eq!(under_new, done);
        for r in b.store.list_provider_keys(None).await.unwrap() {
            let id = sealed_key_id(&r.sealed).unwrap();
            let old_opens = keys.old_only().open(&r.sealed, &aad(&r)).is_ok();
            let new_opens = keys.new_only().open(&r.sealed, &aad(&r)).is_ok();
            assert!(old_opens ^ new_opens, "exactly one key opens {}", r.id);
            assert_eq!(new_opens, id == keys.new_only().current_key_id());
        }
        // A restart mid-rotation with both keys loaded passes the start-up check.
        verify_master_keys(&*b.store, &rotating).await.unwrap();
    }

    let report = rotate_master_key(&*b.store, &rotating).await.unwrap();
    assert_eq!(
        report,
        RotationReport {
            rewrapped: N - done,
            already_current: done
        }
    );
    assert_eq!(
        assert_all_open(&b.store, &keys.new_only(), &expected).await,
        N
    );
    let again = rotate_master_key(&*b.store, &rotating).await.unwrap();
    assert_eq!(again.rewrapped, 0);
}

async fn lifecycle_start_after_rotation_needs_the_new_key(b: Backend) {
    let keys = Keys::generate();
    seed(&b.store, &keys.old_only(), N).await;
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();
    rotate_master_key(&*b.store, &keys.rotating())
        .await
        .unwrap();

    // Only the new key: starts.
    verify_master_keys(&*b.store, &keys.new_only())
        .await
        .unwrap();
    // Both keys: starts.
    verify_master_keys(&*b.store, &keys.rotating())
        .await
        .unwrap();
    // Only the old key: refused with one clear sentence naming the key id.
    let err = verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap_err();
    assert!(matches!(err, MasterKeyError::NotLoaded { .. }), "{err:?}");
    let msg = err.to_string();
    let new_id = keys.new_only().current_key_id().to_hex();
    assert!(msg.starts_with("provider key pk_"), "{msg}");
    assert!(
        msg.contains(&format!(
            "is encrypted with master key id {new_id}, which is not loaded"
        )),
        "{msg}"
    );
    assert!(msg.contains("set VAULTGATE_MASTER_KEY"), "{msg}");
    for b64 in [&keys.old, &keys.new] {
        assert!(!msg.contains(b64.trim_end_matches('=')), "{msg}");
    }
    // A brand-new key (no key file, none given) is refused the same way.
    let stranger = AesGcmEncryptor::new(MasterKey::generate().unwrap()).unwrap();
    let err = verify_master_keys(&*b.store, &stranger).await.unwrap_err();
    assert!(matches!(err, MasterKeyError::NotLoaded { .. }), "{err:?}");
}

async fn lifecycle_wrong_master_key_detected_without_records(b: Backend) {
    let keys = Keys::generate();
    // First start stores the check value; later starts compare it.
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();
    assert!(
        b.store
            .get_meta("master_key_check")
            .await
            .unwrap()
            .is_some()
    );
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();
    let err = verify_master_keys(&*b.store, &keys.new_only())
        .await
        .unwrap_err();
    assert!(matches!(err, MasterKeyError::WrongMasterKey), "{err:?}");
    assert!(err.to_string().contains("does not match"), "{err}");
    // Rotating moves the check value to the new key.
    verify_master_keys(&*b.store, &keys.rotating())
        .await
        .unwrap();
    rotate_master_key(&*b.store, &keys.rotating())
        .await
        .unwrap();
    verify_master_keys(&*b.store, &keys.new_only())
        .await
        .unwrap();
    let err = verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap_err();
    assert!(matches!(err, MasterKeyError::WrongMasterKey), "{err:?}");
    // A damaged check value is refused, not overwritten.
    b.store.set_meta("master_key_check", "zz").await.unwrap();
    let err = verify_master_keys(&*b.store, &keys.new_only())
        .await
        .unwrap_err();
    assert!(matches!(err, MasterKeyError::DamagedCheck), "{err:?}");
}

async fn concurrency_record_changed_during_rotation_is_retried(b: Backend) {
    let keys = Keys::generate();
    let mut expected = seed(&b.store, &keys.old_only(), 6).await;
    // Every record is re-sealed (new plaintext, old key) just before the
    // rotation's first compare-and-swap on it.
    let old = keys.old_only();
    let mut changes = HashMap::new();
    for r in b.store.list_provider_keys(None).await.unwrap() {
        let text = format!("sk-changed-{}-qrstuvwxyz", r.id);
        let sealed = old
            .seal(&ProviderSecret::new(text.clone()), &aad(&r))
            .unwrap();
        changes.insert(r.id.clone(), sealed);
        expected.insert(r.id, text);
    }
    let store = Interfering::new(
        b.store.clone(),
        Interference::ChangeFirst(Mutex::new(changes)),
    );
    let report = rotate_master_key(&store, &keys.rotating()).await.unwrap();
    assert_eq!(report.rewrapped, 6);
    assert_eq!(store.calls.load(Ordering::SeqCst), 12);
    // The concurrent writes were not lost, and all ended under the new key.
    assert_eq!(
        assert_all_open(&b.store, &keys.new_only(), &expected).await,
        6
    );
}

async fn concurrency_record_removed_during_rotation_is_skipped(b: Backend) {
    let keys = Keys::generate();
    let mut expected = seed(&b.store, &keys.old_only(), 6).await;
    let store = Interfering::new(
        b.store.clone(),
        Interference::RemoveFirst(AtomicUsize::new(1)),
    );
    let report = rotate_master_key(&store, &keys.rotating()).await.unwrap();
    assert_eq!(
        report,
        RotationReport {
            rewrapped: 5,
            already_current: 0
        }
    );
    let remaining: Vec<ProviderKeyId> = b
        .store
        .list_provider_keys(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    expected.retain(|id, _| remaining.contains(id));
    assert_eq!(
        assert_all_open(&b.store, &keys.new_only(), &expected).await,
        5
    );
}

async fn concurrency_opens_succeed_while_rotating(b: Backend) {
    let keys = Keys::generate();
    let expected = Arc::new(seed(&b.store, &keys.old_only(), 40).await);
    let enc = Arc::new(keys.rotating());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (store, enc, stop, expected) =
            (b.store.clone(), enc.clone(), stop.clone(), expected.clone());
        readers.push(tokio::spawn(async move {
            let mut opened = 0usize;
            while !stop.load(Ordering::SeqCst) || opened == 0 {
                for id in expected.keys() {
                    let r = store.get_provider_key(id).await.unwrap().unwrap();
                    let s = enc.open(&r.sealed, &aad(&r)).unwrap();
                    assert_eq!(s.expose_secret(), expected[id]);
                    opened += 1;
                }
                tokio::task::yield_now().await;
            }
            opened
        }));
    }
    let report = rotate_master_key(&*b.store, &*enc).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    assert_eq!(report.rewrapped, 40);
    assert_eq!(
        assert_all_open(&b.store, &keys.new_only(), &expected).await,
        40
    );
}

async fn corruption_damaged_record_stops_rotation_and_is_named(b: Backend) {
    let keys = Keys::generate();
    let expected = seed(&b.store, &keys.old_only(), 3).await;
    let victim = b.store.list_provider_keys(None).await.unwrap().remove(1);
    let mut bytes = victim.sealed.as_bytes().to_vec();
    bytes[30] ^= 1; // inside the wrapped data key
    let damaged = Sealed::from_bytes(bytes);
    assert!(
        b.store
            .replace_sealed(&victim.id, &victim.sealed, &damaged)
            .await
            .unwrap()
    );
    // Start-up logs and skips a damaged record (requests using it fail).
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();

    let err = rotate_master_key(&*b.store, &keys.rotating())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RotationError::Damaged { record } if *record == victim.id),
        "{err:?}"
    );
    assert!(err.to_string().contains(victim.id.as_str()));
    // After removing it, the rotation completes.
    assert!(b.store.remove_provider_key(&victim.id).await.unwrap());
    let report = rotate_master_key(&*b.store, &keys.rotating())
        .await
        .unwrap();
    assert_eq!(report.rewrapped + report.already_current, 2);
    let mut expected = expected;
    expected.remove(&victim.id);
    assert_eq!(
        assert_all_open(&b.store, &keys.new_only(), &expected).await,
        2
    );
}

async fn lifecycle_rotation_needs_the_old_key_loaded(b: Backend) {
    let keys = Keys::generate();
    seed(&b.store, &keys.old_only(), 2).await;
    let err = rotate_master_key(&*b.store, &keys.new_only())
        .await
        .unwrap_err();
    let old_id = keys.old_only().current_key_id();
    assert!(
        matches!(&err, RotationError::UnknownMasterKey { key_id, .. } if *key_id == old_id),
        "{err:?}"
    );
    assert!(err.to_string().contains(&old_id.to_hex()));
    // Nothing changed, and the check value was not moved.
    verify_master_keys(&*b.store, &keys.old_only())
        .await
        .unwrap();
}

/// One module per backend, each running every case.
macro_rules! rotation_suite {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::memory()).await;
                }
            )*
        }
        mod sqlite_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::sqlite()).await;
                }
            )*
        }
    };
}

rotation_suite!(
    rotation_rewraps_every_record,
    lifecycle_rotation_resumes_after_crash,
    lifecycle_start_after_rotation_needs_the_new_key,
    lifecycle_wrong_master_key_detected_without_records,
    concurrency_record_changed_during_rotation_is_retried,
    concurrency_record_removed_during_rotation_is_skipped,
    concurrency_opens_succeed_while_rotating,
    corruption_damaged_record_stops_rotation_and_is_named,
    lifecycle_rotation_needs_the_old_key_loaded,
);
