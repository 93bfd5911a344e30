//! A store written outside the workspace runs the public conformance suite:
//! `tests/external-store` (not a workspace member) wraps `MemoryStore` in a
//! `KeyStore` of its own and invokes `store_conformance_tests!` and
//! `threat_conformance_tests!`; this test
//! runs its `cargo test`, offline and locked, and checks that every case ran
//! and passed (docs/conformance.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use vault_core::conformance::{CASES, THREAT_CASES};

/// The suite's cases when this test was written: it may grow, not shrink.
const AT_LEAST: usize = 23;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vault-core lives in the workspace root")
        .to_path_buf()
}

/// `<target>/external-store`: a target directory of its own (the outer
/// `cargo test` may hold the lock on the workspace's), kept between runs so
/// that only what changed is rebuilt.
fn target_dir(workspace: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace.join(t)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    target.join("external-store")
}

/// `(name, version)` of every package a `Cargo.lock` pins.
fn pinned(lock: &Path) -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(lock).unwrap();
    let mut pins = BTreeSet::new();
    let mut name = None;
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_owned());
        } else if let (Some(v), Some(n)) = (l.strip_prefix("version = "), name.take()) {
            pins.insert((n, v.trim_matches('"').to_owned()));
        }
    }
    pins
}

/// Offline works on a clean clone only if the external crate pins nothing
/// the workspace's own build has not already fetched.
#[test]
fn lifecycle_external_lock_pins_only_what_the_workspace_pins() {
    let ws = workspace();
    let ours = pinned(&ws.join("Cargo.lock"));
    let theirs = pinned(&ws.join("tests/external-store/Cargo.lock"));
    let extra: Vec<_> = theirs
        .iter()
        .filter(|(n, _)| n != "external-store")
        .filter(|p| !ours.contains(*p))
        .collect();
    assert!(
        extra.is_empty(),
        "tests/external-store/Cargo.lock pins {extra:?}, which Cargo.lock does not; \
         regenerate it: cp Cargo.lock tests/external-store/ && \
         cargo test --offline --manifest-path tests/external-store/Cargo.toml"
    );
}

#[test]
fn lifecycle_a_store_outside_the_workspace_passes_every_case() {
    let ws = workspace();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["test", "--offline", "--locked", "--manifest-path"])
        .arg(ws.join("tests/external-store/Cargo.toml"))
        .args(["--test", "conformance"])
        .env("CARGO_TARGET_DIR", target_dir(&ws))
        .current_dir(ws.join("tests/external-store"))
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cargo test in tests/external-store failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let passed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... ok"))
        .collect();
    assert!(CASES.len() >= AT_LEAST, "the suite lost cases: {CASES:?}");
    assert!(
        passed.len() >= CASES.len() + THREAT_CASES.len(),
        "{} of {} cases passed:\n{stdout}",
        passed.len(),
        CASES.len() + THREAT_CASES.len()
    );
    for case in CASES.iter().chain(THREAT_CASES) {
        assert!(passed.contains(case), "{case} did not pass:\n{stdout}");
    }
}
