//! The audit chain in PostgreSQL (docs/replicas.md#the-audit-chain):
//! three replicas append at once and the chain verifies; an edited, a
//! deleted or a cut-off entry is found and named; a chain made by the file
//! format verifies identically once copied.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod audit {
    use std::sync::Arc;

    use tokio::sync::Barrier;
    use vault_core::audit::{
        AuditEvent, AuditFilter, AuditKind, AuditLog, AuditTrail, Problem, VerifyError,
    };
    use vault_postgres::testing::TestPostgres;
    use vault_postgres::{PostgresAudit, PostgresStore};

    const WRITERS: usize = 3;
    const PER_WRITER: usize = 100;

    fn event(writer: usize, i: usize) -> AuditEvent {
        AuditEvent {
            target: Some(format!("key_w{writer}_{i}")),
            project: Some(format!("p{writer}")),
            actor: Some("key_admin".to_owned()),
            ..AuditEvent::new(AuditKind::KeyCreated)
        }
    }

    async fn sql(url: &str, statement: &str) -> u64 {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.execute(statement, &[]).await.unwrap()
    }

    /// Three replicas (three pools) append 100 entries each, all at once;
    /// the chain has 300 entries without a gap.
    async fn written_by_three_replicas() -> (String, Vec<PostgresAudit>) {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let mut trails = Vec::new();
        for _ in 0..WRITERS {
            let store = PostgresStore::connect(&url, 4).await.unwrap();
            trails.push(PostgresAudit::new(&store));
        }
        let barrier = Arc::new(Barrier::new(WRITERS * 4));
        let mut tasks = Vec::new();
        for (w, trail) in trails.iter().enumerate() {
            // Four tasks per replica: appends race inside a replica too.
            for lane in 0..4 {
                let (trail, barrier) = (trail.clone(), barrier.clone());
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let mut seqs = Vec::new();
                    for i in (lane..PER_WRITER).step_by(4) {
                        seqs.push(trail.append(event(w, i)).await.unwrap().seq);
                    }
                    seqs
                }));
            }
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.extend(t.await.unwrap());
        }
        seqs.sort_unstable();
        let expected: Vec<u64> = (1..=(WRITERS * PER_WRITER) as u64).collect();
        assert_eq!(seqs, expected, "every append got its own seq, none lost");
        (url, trails)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_three_replicas_append_and_the_chain_verifies() {
        let (_url, trails) = written_by_three_replicas().await;
        for trail in &trails {
            let report = trail.verify().await.unwrap();
            assert_eq!(report.entries, (WRITERS * PER_WRITER) as u64);
        }
        // Read and tail as the file does: newest first, filtered by project.
        let filter = AuditFilter {
            project: Some("p1".to_owned()),
            ..AuditFilter::default()
        };
        let p1 = trails[0].read(&filter).await.unwrap();
        assert_eq!(p1.len(), PER_WRITER);
        assert!(p1.iter().all(|e| e["project"] == "p1"));
        assert!(p1[0]["seq"].as_u64() > p1[1]["seq"].as_u64());
        let tail = trails[2].tail(5).await.unwrap();
        let seqs: Vec<u64> = tail.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [296, 297, 298, 299, 300]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn corruption_an_edited_entry_is_found_and_named() {
        let (url, trails) = written_by_three_replicas().await;
        sql(
            &url,
            "UPDATE audit_entries SET entry = replace(entry, '\"kind\":\"key.created\"', \
             '\"kind\":\"key.revoked\"') WHERE seq = 137",
        )
        .await;
        let err = trails[1].verify().await.unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BadRow {
                    row: 137,
                    seq: Some(137),
                    problem: Problem::HashMismatch
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("seq 137"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn corruption_a_deleted_entry_is_found_and_named() {
        let (url, trails) = written_by_three_replicas().await;
        sql(&url, "DELETE FROM audit_entries WHERE seq = 42").await;
        let err = trails[0].verify().await.unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BadRow {
                    row: 42,
                    seq: Some(43),
                    problem: Problem::SeqGap {
                        expected: 42,
                        found: 43
                    }
                }
            ),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn corruption_a_cut_off_tail_and_an_edited_column_are_found() {
        let (url, trails) = written_by_three_replicas().await;
        sql(
            &url,
            "UPDATE audit_entries SET project = 'p9' WHERE seq = 7",
        )
        .await;
        let err = trails[0].verify().await.unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BadRow {
                    row: 7,
                    problem: Problem::RowMismatch,
                    ..
                }
            ),
            "{err}"
        );
        // Reads check the entry's own project: the edited column shows no
        // other project's entry.
        let p9 = AuditFilter {
            project: Some("p9".to_owned()),
            ..AuditFilter::default()
        };
        assert!(trails[0].read(&p9).await.unwrap().is_empty());
        sql(
            &url,
            "UPDATE audit_entries SET project = entry::json->>'project' WHERE seq = 7",
        )
        .await;
        assert!(trails[0].verify().await.is_ok());
        sql(
            &url,
            "UPDATE audit_entries SET hash = repeat('a', 64) WHERE seq = 9",
        )
        .await;
        let err = trails[0].verify().await.unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BadRow {
                    row: 9,
                    problem: Problem::RowMismatch,
                    ..
                }
            ),
            "{err}"
        );
        let url2 = written_by_three_replicas().await.0;
        sql(&url2, "DELETE FROM audit_entries WHERE seq > 290").await;
        let store = PostgresStore::connect(&url2, 1).await.unwrap();
        let err = PostgresAudit::new(&store).verify().await.unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::HeadMismatch {
                    head_seq: 300,
                    last_seq: 290
                }
            ),
            "{err}"
        );
    }

    /// The same entries written by the file log and the table are the same
    /// bytes: seq 1's hash is the same on both when the clock is.
    #[tokio::test]
    async fn lifecycle_entries_are_the_file_formats_bytes() {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let url = pg.fresh_database();
        let store = PostgresStore::connect(&url, 2).await.unwrap();
        let clock = Arc::new(vault_core::clock::ManualClock::new(
            vault_core::clock::UnixMillis(1_764_000_000_000),
        ));
        let trail = PostgresAudit::with_clock(&store, clock.clone());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open_with_clock(&path, clock).unwrap();
        for i in 0..3 {
            let a = AuditTrail::append(&log, event(0, i)).await.unwrap();
            let b = trail.append(event(0, i)).await.unwrap();
            assert_eq!(a, b);
        }
        assert_eq!(
            AuditTrail::verify(&log).await.unwrap(),
            trail.verify().await.unwrap()
        );
    }

    /// A chain written by the file log, copied into the table, verifies
    /// identically; a second copy changes nothing; a table holding another
    /// chain is refused and left as it was.
    #[tokio::test]
    async fn lifecycle_a_copied_file_chain_verifies_identically() {
        let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..20 {
            log.append(event(i % 3, i)).unwrap();
        }
        let file = vault_core::audit::verify(&path).unwrap();
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();

        let store = PostgresStore::connect(&pg.fresh_database(), 2)
            .await
            .unwrap();
        let trail = PostgresAudit::new(&store);
        assert_eq!(trail.copy_chain(&lines).await.unwrap(), (20, 0));
        assert_eq!(trail.verify().await.unwrap(), file);
        assert_eq!(trail.copy_chain(&lines).await.unwrap(), (0, 20));
        // Appends continue the copied chain.
        assert_eq!(trail.append(event(0, 99)).await.unwrap().seq, 21);
        assert_eq!(trail.copy_chain(&lines).await.unwrap(), (0, 20));
        assert_eq!(trail.verify().await.unwrap().entries, 21);

        let other = PostgresStore::connect(&pg.fresh_database(), 2)
            .await
            .unwrap();
        let other = PostgresAudit::new(&other);
        other.append(event(2, 0)).await.unwrap();
        let err = other.copy_chain(&lines).await.unwrap_err();
        assert!(
            err.to_string().contains("differs from the file at seq 1"),
            "{err}"
        );
        assert_eq!(other.verify().await.unwrap().entries, 1);
    }
}
