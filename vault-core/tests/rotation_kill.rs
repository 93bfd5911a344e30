//! SIGKILL during master-key rotation (docs/threat-model.md, J2), in a real
//! child process.
//!
//! The parent seeds a SQLite store with 200 provider keys sealed under
//! master key A, then, for each round, gives a fresh copy to a child (this
//! test binary, re-run with the child's environment) that
//! rotates to master key B with A as previous and prints a line after each
//! record it re-wraps. The parent SIGKILLs the child after a chosen number
//! of lines (different in every round; some rounds kill a resumed rotation
//! a second time) and checks that with A and B loaded every record opens,
//! none is wrapped by a key other than A or B, every re-wrap the child
//! reported survived, and that rerunning the rotation completes and is
//! then idempotent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

#[path = "support/interfering_store.rs"]
mod interfering_store;

use interfering_store::{Interference, Interfering};
use vault_core::clock::UnixMillis;
use vault_core::crypto::{
    Aad, AesGcmEncryptor, Encryptor, MasterKey, ProviderSecret, rotate_master_key, sealed_key_id,
    verify_master_keys,
};
use vault_core::key::ProviderKeyId;
use vault_core::provider::Provider;
use vault_core::record::ProviderKeyRecord;
use vault_core::store::{KeyStore, SqliteStore};

/// The test the child process re-runs (with the child's environment set).
const CHILD_TEST: &str = "boundary_sigkill_at_any_point_of_a_rotation_loses_no_record";
/// Tells the child which data directory to rotate.
const CHILD_DIR_ENV: &str = "VAULTGATE_TEST_ROTATION_DIR";
/// The two master keys (base64), for the child.
const KEY_A_ENV: &str = "VAULTGATE_TEST_ROTATION_KEY_A";
const KEY_B_ENV: &str = "VAULTGATE_TEST_ROTATION_KEY_B";
/// What the child prints after each re-wrap, and when it is done.
const REWRAPPED: &str = "rotation-progress: rewrapped";
const DONE: &str = "rotation-progress: done";

const RECORDS: usize = 200;
const ROUNDS: usize = 12;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn key(b64: &str) -> MasterKey {
    MasterKey::from_base64(b64).unwrap()
}

fn aad(r: &ProviderKeyRecord) -> Aad<'_> {
    Aad {
        record_id: r.id.as_str(),
        project: &r.project,
        provider: r.provider,
    }
}

/// The rotation the child runs, and the parent reruns.
fn rotating(a: &str, b: &str) -> AesGcmEncryptor {
    AesGcmEncryptor::with_previous(key(b), vec![key(a)]).unwrap()
}

/// The child's part: rotate the store named by the environment, printing
/// progress, until done or killed.
fn child_rotates_the_store_it_is_given(dir: &str) {
    let a = std::env::var(KEY_A_ENV).unwrap();
    let b = std::env::var(KEY_B_ENV).unwrap();
    runtime().block_on(async {
        let store = Interfering::new(
            Arc::new(SqliteStore::open_in_dir(Path::new(&dir)).unwrap()),
            Interference::Report(
                Box::new(|n| say(&format!("{REWRAPPED} {n}"))),
                AtomicUsize::new(0),
            ),
        );
        rotate_master_key(&store, &rotating(&a, &b)).await.unwrap();
        say(DONE);
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Seeds `dir` with [`RECORDS`] provider keys sealed under `a`; returns
/// id → plaintext.
async fn seed(dir: &Path, a: &str) -> HashMap<ProviderKeyId, String> {
    let store = SqliteStore::open_in_dir(dir).unwrap();
    let enc = AesGcmEncryptor::new(key(a)).unwrap();
    let mut out = HashMap::new();
    for i in 0..RECORDS {
        let id = ProviderKeyId::generate().unwrap();
        let project = format!("project{}", i % 3);
        let provider = Provider::ALL[i % Provider::ALL.len()];
        let text = format!("sk-rotation-kill-{i:04}-abcdefghijklmnop");
        let secret = ProviderSecret::new(text.clone());
        let record_aad = Aad {
            record_id: id.as_str(),
            project: &project,
            provider,
        };
        let sealed = enc.seal(&secret, &record_aad).unwrap();
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
    // The store's check value is A's, as after any start with A.
    verify_master_keys(&store, &enc).await.unwrap();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Runs the child on `dir` and SIGKILLs it `jitter` after it has reported
/// `kill_after` re-wraps (the jitter lands the kill anywhere inside the next
/// write). Returns how many it reported and whether it finished first.
fn run_child_and_kill(
    dir: &Path,
    a: &str,
    b: &str,
    kill_after: usize,
    jitter: Duration,
) -> (usize, bool) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture"])
        .env(CHILD_DIR_ENV, dir)
        .env(KEY_A_ENV, a)
        .env(KEY_B_ENV, b)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reported = 0;
    let mut finished = false;
    let stdout = child.stdout.take().unwrap();
    if kill_after == 0 {
        child.kill().unwrap();
    } else {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line.starts_with(REWRAPPED) {
                reported += 1;
                if reported == kill_after {
                    std::thread::sleep(jitter);
                    // std's kill is SIGKILL on unix.
                    child.kill().unwrap();
                    break;
                }
            } else if line == DONE {
                finished = true;
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    if !finished {
        use std::os::unix::process::ExitStatusExt;
        // Killed, or finished in the instant before the kill.
        assert!(
            status.signal() == Some(9) || status.success(),
            "the child failed: {status:?}"
        );
    }
    (reported, finished)
}

/// A small deterministic generator for the kill points.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Checks the state a killed rotation left: every record opens with A and
/// B loaded and is wrapped by one of them. Returns how many are under B.
async fn assert_every_record_opens(
    store: &dyn KeyStore,
    enc: &AesGcmEncryptor,
    a: &str,
    b: &str,
    expected: &HashMap<ProviderKeyId, String>,
) -> usize {
    let (id_a, id_b) = (key(a).id(), key(b).id());
    let records = store.list_provider_keys(None).await.unwrap();
    assert_eq!(records.len(), expected.len());
    let mut under_b = 0;
    for r in &records {
        let wrapped_by = sealed_key_id(&r.sealed);
        assert!(
            wrapped_by == Some(id_a) || wrapped_by == Some(id_b),
            "record {} is wrapped by neither key",
            r.id
        );
        under_b += usize::from(wrapped_by == Some(id_b));
        let opened = enc.open(&r.sealed, &aad(r)).unwrap();
        assert_eq!(opened.expose_secret(), expected[&r.id]);
    }
    under_b
}

#[test]
fn boundary_sigkill_at_any_point_of_a_rotation_loses_no_record() {
    // Re-run as the child process: rotate, and let the parent kill us.
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        child_rotates_the_store_it_is_given(&dir);
        return;
    }
    let a = MasterKey::generate().unwrap().to_base64().to_string();
    let b = MasterKey::generate().unwrap().to_base64().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("template");
    let rt = runtime();
    let expected = rt.block_on(seed(&template, &a));

    let mut rng = XorShift(0x5EED_0F20_47AB);
    for round in 0..ROUNDS {
        // The first rounds kill before any re-wrap and after the last one.
        let kill_after = match round {
            0 => 0,
            1 => RECORDS,
            _ => 1 + rng.below(RECORDS - 1),
        };
        let dir = tmp.path().join(format!("round{round}"));
        copy_dir(&template, &dir);

        let jitter = Duration::from_micros(rng.below(3_000) as u64);
        let (mut reported, finished) = run_child_and_kill(&dir, &a, &b, kill_after, jitter);
        assert!(
            !finished || kill_after == RECORDS,
            "round {round}: the child was not killed"
        );
        if round % 3 == 2 {
            // Kill the resumed rotation too.
            let again = 1 + rng.below(RECORDS - reported.min(RECORDS - 1));
            let jitter = Duration::from_micros(rng.below(3_000) as u64);
            let (resumed, _) = run_child_and_kill(&dir, &a, &b, again, jitter);
            reported += resumed;
        }

        rt.block_on(async {
            let store = SqliteStore::open_in_dir(&dir).unwrap();
            let both = rotating(&a, &b);
            // Starting with A and B loaded works, whatever the kill point.
            verify_master_keys(&store, &both).await.unwrap();
            let under_b = assert_every_record_opens(&store, &both, &a, &b, &expected).await;
            // Every re-wrap the child reported was durable.
            assert!(
                under_b >= reported.min(RECORDS),
                "round {round}: {reported} re-wraps reported, {under_b} on disk"
            );

            // Rerunning completes the rotation ...
            let report = rotate_master_key(&store, &both).await.unwrap();
            assert_eq!(report.rewrapped, RECORDS - under_b, "round {round}");
            assert_eq!(report.already_current, under_b, "round {round}");
            // ... and is then idempotent ...
            let again = rotate_master_key(&store, &both).await.unwrap();
            assert_eq!((again.rewrapped, again.already_current), (0, RECORDS));
            // ... and B alone now opens everything and passes the start-up check.
            let b_only = AesGcmEncryptor::new(key(&b)).unwrap();
            verify_master_keys(&store, &b_only).await.unwrap();
            let finally = assert_every_record_opens(&store, &b_only, &a, &b, &expected).await;
            assert_eq!(finally, RECORDS);
            println!(
                "round {round}: killed after {reported} reported re-wraps; resumed {}",
                report.rewrapped
            );
        });
    }
}
