#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The hash-chained audit log (docs/threat-model.md, L1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use vault_core::audit::{
    AuditEvent, AuditFilter, AuditKind, AuditLog, GENESIS_PREV, Problem, VerifyError, read_entries,
    tail, verify,
};
use vault_core::clock::{ManualClock, UnixMillis};

fn event(kind: AuditKind, project: &str, target: &str) -> AuditEvent {
    AuditEvent {
        kind,
        actor: Some("key_admin".into()),
        target: Some(target.into()),
        project: Some(project.into()),
        detail: json!({"name": "Production Backend"}),
    }
}

/// A log of five entries.
fn five_entries(dir: &Path) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let clock = ManualClock::new(UnixMillis(1_795_681_134_000));
    let log = AuditLog::open_with_clock(&path, Arc::new(clock.clone())).unwrap();
    let kinds = [
        AuditKind::KeyCreated,
        AuditKind::ProviderKeyAdded,
        AuditKind::RequestDenied,
        AuditKind::KeyRotated,
        AuditKind::KeyRevoked,
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        let project = if i % 2 == 0 { "default" } else { "research" };
        log.append(event(kind, project, &format!("key_{i}")))
            .unwrap();
        clock.advance(1000);
    }
    path
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn bad_entry(path: &Path) -> (u64, Option<u64>, Problem) {
    match verify(path) {
        Err(VerifyError::BadEntry { line, seq, problem }) => (line, seq, problem),
        other => panic!("expected a bad entry, got {other:?}"),
    }
}

#[test]
fn intact_log_verifies_and_entries_have_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let report = verify(&path).unwrap();
    assert_eq!(report.entries, 5);

    let all = lines(&path);
    let first: serde_json::Value = serde_json::from_str(&all[0]).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["at"], "2026-11-26T08:18:54.000Z");
    assert_eq!(first["kind"], "key.created");
    assert_eq!(first["actor"], "key_admin");
    assert_eq!(first["prev"], GENESIS_PREV);
    assert!(all[0].starts_with(r#"{"seq":1,"at":"#));
    assert!(all[0].ends_with(&format!(
        r#","hash":"{}"}}"#,
        first["hash"].as_str().unwrap()
    )));
    let second: serde_json::Value = serde_json::from_str(&all[1]).unwrap();
    assert_eq!(second["prev"], first["hash"]);
    assert_eq!(second["kind"], "provider_key.added");
    assert_eq!(
        report.last_hash,
        serde_json::from_str::<serde_json::Value>(&all[4]).unwrap()["hash"]
    );
}

#[test]
fn corruption_edited_field_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let mut all = lines(&path);
    all[2] = all[2].replace("key_2", "key_9");
    write_lines(&path, &all);
    assert_eq!(bad_entry(&path), (3, Some(3), Problem::HashMismatch));
}

#[test]
fn corruption_edited_and_rehashed_entry_is_found_at_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let mut all = lines(&path);
    // The attacker edits entry 2 and recomputes its hash.
    let edited = all[1].replace("research", "default");
    let split = edited.len() - 75;
    let mut canonical = edited.as_bytes()[..split].to_vec();
    canonical.push(b'}');
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, &canonical));
    all[1] = format!(r#"{},"hash":"{hash}"}}"#, &edited[..split]);
    write_lines(&path, &all);
    assert_eq!(bad_entry(&path), (3, Some(3), Problem::PrevMismatch));
}

#[test]
fn corruption_deleted_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let mut all = lines(&path);
    all.remove(1);
    write_lines(&path, &all);
    assert_eq!(
        bad_entry(&path),
        (
            2,
            Some(3),
            Problem::SeqGap {
                expected: 2,
                found: 3
            }
        )
    );
}

#[test]
fn corruption_swapped_lines_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let mut all = lines(&path);
    all.swap(2, 3);
    write_lines(&path, &all);
    assert_eq!(
        bad_entry(&path),
        (
            3,
            Some(4),
            Problem::SeqGap {
                expected: 3,
                found: 4
            }
        )
    );
}

#[test]
fn corruption_inserted_forged_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let original = lines(&path);

    // A forged entry with a hash the attacker computed correctly, but over a
    // wrong prev, numbered to fit in as entry 3.
    let forge = |prev: &str| {
        let canonical = format!(
            r#"{{"seq":3,"at":"2026-11-26T08:18:56.000Z","kind":"key.created","actor":"key_attacker","prev":"{prev}"}}"#
        );
        let hash = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ));
        format!(r#"{},"hash":"{hash}"}}"#, &canonical[..canonical.len() - 1])
    };
    let mut all = original.clone();
    all.insert(2, forge(&"ab".repeat(32)));
    write_lines(&path, &all);
    assert_eq!(bad_entry(&path), (3, Some(3), Problem::PrevMismatch));

    // Even with the right prev, the original entry 3 after it no longer fits.
    let prev2 = serde_json::from_str::<serde_json::Value>(&original[1]).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut all = original.clone();
    all.insert(2, forge(&prev2));
    write_lines(&path, &all);
    assert_eq!(
        bad_entry(&path),
        (
            4,
            Some(3),
            Problem::SeqGap {
                expected: 4,
                found: 3
            }
        )
    );

    // A line with no hash at all.
    let mut all = original;
    all.insert(1, r#"{"seq":2,"kind":"key.created"}"#.to_owned());
    write_lines(&path, &all);
    assert_eq!(bad_entry(&path).0, 2);
}

#[test]
fn corruption_truncated_mid_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
    assert_eq!(bad_entry(&path), (5, None, Problem::Truncated));
    // An interrupted log cannot be appended to.
    assert!(AuditLog::open(&path).is_err());
    // Nor does an empty line in the middle pass.
    let mut all = String::from_utf8(bytes).unwrap();
    all.insert(all.find('\n').unwrap(), '\n');
    std::fs::write(&path, all).unwrap();
    assert_eq!(bad_entry(&path), (2, None, Problem::EmptyLine));
}

#[test]
fn corruption_missing_file_does_not_verify() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        verify(&dir.path().join("nope.jsonl")),
        Err(VerifyError::Io { .. })
    ));
}

#[test]
fn lifecycle_reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let log = AuditLog::open(&path).unwrap();
    let entry = log
        .append(AuditEvent::new(AuditKind::MasterKeyRotated))
        .unwrap();
    assert_eq!(entry.seq, 6);
    let fifth: serde_json::Value = serde_json::from_str(&lines(&path)[4]).unwrap();
    assert_eq!(entry.prev, fifth["hash"]);
    drop(log);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(
        log.append(AuditEvent::new(AuditKind::ProviderKeyRemoved))
            .unwrap()
            .seq,
        7
    );
    assert_eq!(verify(&path).unwrap().entries, 7);
}

#[test]
fn concurrency_appends_from_many_threads_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::open(&path).unwrap());
    std::thread::scope(|s| {
        for t in 0..8 {
            let log = Arc::clone(&log);
            s.spawn(move || {
                for i in 0..10 {
                    log.append(event(
                        AuditKind::RequestDenied,
                        "default",
                        &format!("key_{t}_{i}"),
                    ))
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(verify(&path).unwrap().entries, 80);
}

#[cfg(unix)]
#[test]
fn leak_file_is_created_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    AuditLog::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn tail_and_read_entries_filter_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = five_entries(dir.path());
    let last_two = tail(&path, 2).unwrap();
    assert_eq!(
        last_two
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 5]
    );

    let filter = AuditFilter {
        project: Some("default".into()),
        ..AuditFilter::default()
    };
    let seqs: Vec<u64> = read_entries(&path, &filter)
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [5, 3, 1]);

    let filter = AuditFilter {
        project: None,
        before_seq: Some(4),
        limit: 2,
    };
    let seqs: Vec<u64> = read_entries(&path, &filter)
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 2]);

    assert!(
        read_entries(&dir.path().join("absent"), &AuditFilter::default())
            .unwrap()
            .is_empty()
    );
}

/// Two handles on one file (the server and the CLI) keep one chain.
#[test]
fn concurrency_two_handles_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let a = AuditLog::open(&path).unwrap();
    let b = AuditLog::open(&path).unwrap();
    for i in 0..6 {
        let log = if i % 2 == 0 { &a } else { &b };
        log.append(AuditEvent::new(AuditKind::KeyCreated)).unwrap();
    }
    assert_eq!(verify(&path).unwrap().entries, 6);
}
