//! Provider keys are encrypted at rest: the SQLite files never hold one in
//! clear, nor in an encoding of it (docs/api.md#provider-keys;
//! docs/threat-model.md, C1, D1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use vault_core::clock::UnixMillis;
use vault_core::crypto::{
    Aad, AesGcmEncryptor, Encryptor, MasterKey, ProviderSecret, rotate_master_key,
    verify_master_keys,
};
use vault_core::key::ProviderKeyId;
use vault_core::provider::Provider;
use vault_core::record::ProviderKeyRecord;
use vault_core::store::{KeyStore, SqliteStore};

/// The plaintext, hex (both cases) and base64 (standard and url-safe, at
/// offsets 0, 1 and 2, without the last characters that depend on what
/// follows) of `secret`.
fn encodings(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("raw".to_owned(), secret.to_vec()),
        ("hex".to_owned(), hex::encode(secret).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(secret).into_bytes()),
    ];
    for off in 0..3 {
        for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
            let text = engine.encode(&secret[off..]);
            let keep = text.trim_end_matches('=').len() - 3;
            out.push((format!("{name}@{off}"), text.as_bytes()[..keep].to_vec()));
        }
    }
    out
}

fn db_files(db: &Path) -> Vec<PathBuf> {
    let name = db.file_name().unwrap().to_str().unwrap();
    ["", "-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| db.with_file_name(format!("{name}{suffix}")))
        .filter(|p| p.exists())
        .collect()
}

/// Asserts no encoding of any secret occurs in any file; returns the
/// number of bytes scanned.
fn assert_absent(files: &[PathBuf], secrets: &[(&str, &[u8])]) -> usize {
    let mut scanned = 0;
    for file in files {
        let bytes = std::fs::read(file).unwrap();
        scanned += bytes.len();
        for (what, secret) in secrets {
            for (encoding, needle) in encodings(secret) {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "{what} found as {encoding} in {}",
                    file.display()
                );
            }
        }
    }
    scanned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_provider_keys_never_reach_the_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = SqliteStore::open_in_dir(&data).unwrap();
    let db = store.path().to_owned();

    let old = MasterKey::generate().unwrap();
    let old_b64 = old.to_base64();
    let old_bytes = STANDARD.decode(old_b64.as_bytes()).unwrap();
    let enc = AesGcmEncryptor::new(old).unwrap();
    verify_master_keys(&store, &enc).await.unwrap();

    let canary = format!(
        "sk-CANARY-{}",
        hex::encode(
            STANDARD
                .decode(MasterKey::generate().unwrap().to_base64().as_bytes())
                .unwrap()
        )
    );
    let id = ProviderKeyId::generate().unwrap();
    let aad = Aad {
        record_id: id.as_str(),
        project: "default",
        provider: Provider::OpenAi,
    };
    let secret = ProviderSecret::new(canary.clone());
    store
        .insert_provider_key(&ProviderKeyRecord {
            id: id.clone(),
            project: "default".to_owned(),
            provider: Provider::OpenAi,
            name: "OpenAI Production".to_owned(),
            sealed: enc.seal(&secret, &aad).unwrap(),
            hint: secret.hint(),
            created_at: UnixMillis(1),
        })
        .await
        .unwrap();

    // The record is really there and opens.
    let stored = store.get_provider_key(&id).await.unwrap().unwrap();
    assert_eq!(
        enc.open(&stored.sealed, &aad).unwrap().expose_secret(),
        canary
    );
    assert_eq!(
        stored.hint.as_str(),
        &format!("sk-...{}", &canary[canary.len() - 4..])
    );

    // Rotate too, so the WAL holds both envelopes.
    let new = MasterKey::generate().unwrap();
    let new_bytes = STANDARD.decode(new.to_base64().as_bytes()).unwrap();
    let rotating =
        AesGcmEncryptor::with_previous(new, vec![MasterKey::from_base64(&old_b64).unwrap()])
            .unwrap();
    assert_eq!(
        rotate_master_key(&store, &rotating)
            .await
            .unwrap()
            .rewrapped,
        1
    );

    let secrets: [(&str, &[u8]); 3] = [
        ("the provider key", canary.as_bytes()),
        ("the old master key", &old_bytes),
        ("the new master key", &new_bytes),
    ];
    // While the store is open: the db file, its WAL and shared memory.
    let files = db_files(&db);
    assert!(
        files.iter().any(|f| f.to_string_lossy().ends_with("-wal")),
        "{files:?}"
    );
    let scanned = assert_absent(&files, &secrets);
    assert!(scanned > 0);

    // The sealed bytes themselves are in the files (so the scan looks at
    // the right place).
    let sealed = store.get_provider_key(&id).await.unwrap().unwrap().sealed;
    let all: Vec<u8> = files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    let tail = &sealed.as_bytes()[sealed.as_bytes().len() - 32..];
    assert!(all.windows(32).any(|w| w == tail));

    // After closing (a checkpoint folds the WAL into the db file).
    drop(store);
    assert_absent(&db_files(&db), &secrets);
}
