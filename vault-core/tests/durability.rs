//! docs/threat-model.md, J1: an acknowledged key, provider key or
//! revocation survives `kill -9`. The test binary re-runs itself as a writer process, kills it
//! with SIGKILL after a random number of acknowledged writes, reopens the
//! database and checks that every acknowledged write is there.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use ring::rand::{SecureRandom, SystemRandom};
use vault_core::clock::UnixMillis;
use vault_core::conformance;
use vault_core::key::{KeyHash, KeyId, ProviderKeyId};
use vault_core::record::KeyStatus;
use vault_core::store::{KeyStore, SqliteStore};

/// Set (to the database path) only in the child process.
const WRITER_ENV: &str = "VAULTGATE_TEST_DURABILITY_WRITER_DB";
const ROUNDS: usize = 20;

/// The writer half: does nothing unless run as the child of
/// `durability_kill_9_loses_nothing_acknowledged`. Prints one `ACK` line
/// after each write returns, until it is killed.
#[tokio::test]
async fn durability_writer_child() {
    let Ok(db) = std::env::var(WRITER_ENV) else {
        return;
    };
    let store = SqliteStore::open(Path::new(&db)).unwrap();
    // Bounded, so an orphaned writer stops by itself.
    for i in 0..5_000u32 {
        let k = conformance::key_at("durable", i64::from(i));
        store.insert_key(&k, None).await.unwrap();
        println!("ACK key {} {}", k.id, k.hash.to_hex());
        let pk = conformance::provider_key_at("durable", i64::from(i));
        store.insert_provider_key(&pk).await.unwrap();
        println!("ACK pk {}", pk.id);
        if i % 3 == 1 {
            store.revoke_key(&k.id, UnixMillis(1)).await.unwrap();
            println!("ACK revoke {}", k.id);
        }
        if i % 4 == 2 {
            let name = format!("m-{}", k.id);
            store.set_meta(&name, "written").await.unwrap();
            println!("ACK meta {name}");
        }
    }
}

/// What the parent has seen acknowledged over all rounds.
#[derive(Default)]
struct Acked {
    keys: BTreeMap<KeyId, KeyHash>,
    revoked: Vec<KeyId>,
    provider_keys: Vec<ProviderKeyId>,
    meta: Vec<String>,
}

impl Acked {
    fn record(&mut self, line: &str) -> bool {
        // The harness may print `test … ... ` on the same line as the first ack.
        let Some(at) = line.find("ACK ") else {
            return false;
        };
        let rest = &line[at + 4..];
        let parts: Vec<&str> = rest.split(' ').collect();
        match parts.as_slice() {
            ["key", id, hash] => {
                self.keys
                    .insert(KeyId::parse(id).unwrap(), KeyHash::from_hex(hash).unwrap());
            }
            ["pk", id] => self.provider_keys.push(ProviderKeyId::parse(id).unwrap()),
            ["revoke", id] => self.revoked.push(KeyId::parse(id).unwrap()),
            ["meta", name] => self.meta.push((*name).to_owned()),
            _ => panic!("unexpected line from the writer: {line}"),
        }
        true
    }

    async fn check(&self, store: &SqliteStore) {
        for (id, hash) in &self.keys {
            let k = store.find_by_hash(hash).await.unwrap();
            assert_eq!(
                k.map(|k| k.id),
                Some(id.clone()),
                "acknowledged key {id} lost"
            );
        }
        for id in &self.revoked {
            let k = store.get_key(id).await.unwrap().unwrap();
            assert_eq!(
                k.status,
                KeyStatus::Revoked,
                "acknowledged revocation of {id} lost"
            );
        }
        for id in &self.provider_keys {
            assert!(
                store.get_provider_key(id).await.unwrap().is_some(),
                "acknowledged provider key {id} lost"
            );
        }
        for name in &self.meta {
            assert_eq!(
                store.get_meta(name).await.unwrap().as_deref(),
                Some("written")
            );
        }
    }
}

fn random_below(n: u8) -> u8 {
    let mut b = [0u8; 1];
    SystemRandom::new().fill(&mut b).unwrap();
    b[0] % n
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_kill_9_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vaultgate.db");
    let exe = std::env::current_exe().unwrap();
    let mut acked = Acked::default();

    for round in 0..ROUNDS {
        let stop_after = 1 + usize::from(random_below(40));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "durability_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < stop_after {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("round {round}: the writer exited after {seen} acks"))
                .unwrap();
            if acked.record(&line) {
                seen += 1;
            }
        }
        // SIGKILL, right after the last acknowledgement we count.
        child.kill().unwrap();
        child.wait().unwrap();
        // Anything already printed was acknowledged too.
        for line in lines.map_while(Result::ok) {
            acked.record(&line);
        }

        let store = SqliteStore::open(&db).unwrap();
        acked.check(&store).await;
        drop(store);
        let check: String = rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "round {round}");
    }
    eprintln!(
        "{} keys, {} provider keys, {} revocations, {} meta acknowledged",
        acked.keys.len(),
        acked.provider_keys.len(),
        acked.revoked.len(),
        acked.meta.len()
    );
    assert!(acked.keys.len() >= ROUNDS);
}
