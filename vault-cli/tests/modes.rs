//! Direct mode (the data directory) and remote mode (`--url`, the HTTP API
//! of docs/api.md) are one set of verbs: every management verb, run the
//! same way on two freshly initialised data directories — one directly, one
//! through a `vaultgate serve` — prints the same text and the same JSON, and
//! fails with the same line and exit code. Only what legitimately differs is
//! normalised: ids, secrets and prefixes (random), timestamps, audit hashes
//! and the audit `actor` (`operator` directly, the admin key's id remotely).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::path::Path;

use support::*;

/// Replaces the parts of an output that differ between two vaults.
fn normalise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &s[i..];
        // Random ids, keys and prefixes: a known head and base62 after it.
        let head = ["key_", "pk_", "vpx_live_", "vpx_test_"]
            .into_iter()
            .find(|h| rest.starts_with(h));
        if let Some(h) = head {
            let tail = rest[h.len()..]
                .bytes()
                .take_while(u8::is_ascii_alphanumeric)
                .count();
            out.push_str(h);
            out.push_str("<random>");
            i += h.len() + tail;
            continue;
        }
        // RFC 3339 timestamps: 2026-01-02T03:04:05.678Z.
        // (All ASCII up to the `Z`, so the slices are on char boundaries.)
        let time = rest.len() >= 24
            && rest.as_bytes()[4] == b'-'
            && rest.as_bytes()[10] == b'T'
            && rest[..4].bytes().all(|b| b.is_ascii_digit());
        if let Some(z) = time
            .then(|| rest.bytes().take(40).position(|b| b == b'Z'))
            .flatten()
        {
            out.push_str("<time>");
            i += z + 1;
            continue;
        }
        // Audit hashes: 64 hex digits.
        let hex = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
        if hex == 64 {
            out.push_str("<hash>");
            i += 64;
            continue;
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    // Who acted: the operator directly, the admin key remotely.
    out.replace("\"actor\":\"operator\"", "\"actor\":\"key_<random>\"")
        .replace("\"actor\": \"operator\"", "\"actor\": \"key_<random>\"")
}

/// Where a verb runs: directly on a data directory, or through a server.
enum Mode<'a> {
    Direct(&'a Path),
    Remote {
        dir: &'a Path,
        url: String,
        admin: String,
    },
}

impl Mode<'_> {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> CliOutput {
        match self {
            Mode::Direct(dir) => cli_with(dir, args, stdin, &[]),
            Mode::Remote { dir, url, admin } => {
                let mut all = vec!["--url", url.as_str()];
                all.extend_from_slice(args);
                cli_with(dir, &all, stdin, &[("VAULTGATE_ADMIN_KEY", admin.as_str())])
            }
        }
    }
}

/// One verb in one mode, normalised: (exit code, stdout, stderr).
fn outcome(mode: &Mode<'_>, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let out = mode.run(args, stdin);
    (out.code, normalise(&out.stdout), normalise(&out.stderr))
}

/// The id in a JSON answer.
fn id_of(out: &CliOutput) -> String {
    out.json()["id"].as_str().unwrap().to_owned()
}

#[test]
fn lifecycle_every_verb_prints_the_same_directly_and_remotely() {
    let direct_dir = tempdir();
    init(direct_dir.path());
    let remote_dir = tempdir();
    let server = Server::start(remote_dir.path());
    let client_dir = tempdir();
    let direct = Mode::Direct(direct_dir.path());
    let remote = Mode::Remote {
        dir: client_dir.path(),
        url: server.url(),
        admin: server.admin().to_owned(),
    };
    let modes = [&direct, &remote];

    // Runs `args` (with `{id}`/`{pk}` filled per mode) both ways and
    // compares; returns each mode's raw output for ids.
    let same = |label: &str, args: &[&str], stdin: Option<&str>, ids: [&[(&str, String)]; 2]| {
        let results: Vec<_> = modes
            .iter()
            .zip(ids)
            .map(|(m, ids)| {
                let args: Vec<String> = args
                    .iter()
                    .map(|a| {
                        ids.iter()
                            .fold((*a).to_owned(), |acc, (k, v)| acc.replace(k, v))
                    })
                    .collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                outcome(m, &args, stdin)
            })
            .collect();
        assert_eq!(
            results[0], results[1],
            "{label}: direct (left) and remote (right) differ"
        );
        results[0].clone()
    };
    let none: [&[(&str, String)]; 2] = [&[], &[]];

    // Keys: create (text and json), list, show, rotate, a child, revoke.
    for output in ["text", "json"] {
        let (code, stdout, stderr) = same(
            &format!("keys create --output {output}"),
            &[
                "keys",
                "create",
                "--name",
                "ci",
                "--scopes",
                "chat:write,usage:read",
                "--ttl",
                "1h",
                "--budget-usd",
                "5",
                "--test",
                "--output",
                output,
            ],
            None,
            none,
        );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("vpx_test_<random>"), "{stdout}");
    }
    let (code, _, stderr) = same(
        "keys create --output env",
        &["keys", "create", "--name", "env", "--output", "env"],
        None,
        none,
    );
    assert_eq!(code, 0, "{stderr}");

    let create = [
        "keys",
        "create",
        "--name",
        "parent",
        "--test",
        "--budget-usd",
        "2",
        "--output",
        "json",
    ];
    let parents: Vec<String> = modes.iter().map(|m| id_of(&m.run(&create, None))).collect();
    let ids: [Vec<(&str, String)>; 2] = [
        vec![("{id}", parents[0].clone())],
        vec![("{id}", parents[1].clone())],
    ];
    let ids_ref: [&[(&str, String)]; 2] = [&ids[0], &ids[1]];
    for output in ["text", "json"] {
        same(
            &format!("keys list --output {output}"),
            &["keys", "list", "--output", output],
            None,
            none,
        );
        same(
            &format!("keys show --output {output}"),
            &["keys", "show", "{id}", "--output", output],
            None,
            ids_ref,
        );
    }
    let (code, stdout, _) = same(
        "keys rotate",
        &[
            "keys", "rotate", "{id}", "--grace", "60s", "--output", "json",
        ],
        None,
        ids_ref,
    );
    assert_eq!(code, 0);
    assert!(
        stdout.contains("\"rotation_grace_until\": \"<time>\""),
        "{stdout}"
    );
    same(
        "a sub-agent key",
        &[
            "keys",
            "create",
            "--name",
            "child",
            "--parent",
            "{id}",
            "--budget-usd",
            "1",
            "--output",
            "json",
        ],
        None,
        ids_ref,
    );
    let (code, stdout, _) = same("keys revoke", &["keys", "revoke", "{id}"], None, ids_ref);
    assert_eq!(code, 0);
    assert_eq!(stdout, "revoked key_<random> and 1 descendant(s)\n");
    same(
        "keys revoke, again",
        &["keys", "revoke", "{id}", "--output", "json"],
        None,
        ids_ref,
    );

    // Provider keys: add (stdin), list, remove.
    let secret = "sk-proj-modes0000000000wxyz\n";
    for output in ["text", "json"] {
        same(
            &format!("provider-keys add --output {output}"),
            &[
                "provider-keys",
                "add",
                "--provider",
                "openai",
                "--name",
                "prod",
                "--output",
                output,
            ],
            Some(secret),
            none,
        );
        same(
            &format!("provider-keys list --output {output}"),
            &["provider-keys", "list", "--output", output],
            None,
            none,
        );
    }
    let add = [
        "provider-keys",
        "add",
        "--provider",
        "anthropic",
        "--output",
        "json",
    ];
    let pks: Vec<String> = modes
        .iter()
        .map(|m| id_of(&m.run(&add, Some("sk-ant-modes000000000000abcd"))))
        .collect();
    let pk_ids: [Vec<(&str, String)>; 2] = [
        vec![("{pk}", pks[0].clone())],
        vec![("{pk}", pks[1].clone())],
    ];
    for output in ["text", "json"] {
        let (code, _, stderr) = same(
            &format!("provider-keys remove --output {output}"),
            &["provider-keys", "remove", "{pk}", "--output", output],
            None,
            [&pk_ids[0], &pk_ids[1]],
        );
        // The second removal finds nothing, the same way in both modes.
        assert_eq!(code, if output == "text" { 0 } else { 2 }, "{stderr}");
    }

    // Usage and audit.
    for output in ["text", "json"] {
        same(
            &format!("usage --output {output}"),
            &["usage", "--limit", "5", "--output", output],
            None,
            none,
        );
        same(
            &format!("audit tail --output {output}"),
            &["audit", "tail", "-n", "4", "--output", output],
            None,
            none,
        );
    }

    // Refusals: the same line and exit code.
    for (label, args) in [
        ("no such key", &["keys", "show", "key_ZZZZZZZZZZZZZZZZ"][..]),
        ("unknown plan", &["keys", "create", "--plan", "gold"][..]),
        ("plan in capitals", &["keys", "create", "--plan", "PRO"][..]),
        ("bad key id", &["keys", "revoke", "nope"][..]),
        (
            "env where it means nothing",
            &["keys", "list", "--output", "env"][..],
        ),
    ] {
        let (code, stdout, stderr) = same(label, args, None, none);
        assert_eq!(code, 2, "{label}: {stderr}");
        assert!(stdout.is_empty(), "{label}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{label}: {stderr}");
    }
}
