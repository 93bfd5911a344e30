//! The `vaultgate` command line: exit codes, one-line errors, secrets only from
//! stdin or the environment (docs/threat-model.md, C7), configuration and
//! master-key checks at start (docs/threat-model.md, D4).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// Stderr is one line (a trailing newline allowed).
fn assert_one_line(what: &str, stderr: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: stderr should be one line: {stderr:?}"
    );
}

/// Bad flags and bad subcommands exit 2
/// (docs/configuration.md#errors-in-the-file) with one line on stderr.
#[test]
fn boundary_bad_usage_exits_2_with_one_line() {
    let dir = tempdir();
    init(dir.path());
    for args in [
        &["--bogus"][..],
        &["keys"][..],
        &["keys", "frobnicate"][..],
        &["keys", "list", "--output", "yaml"][..],
        &["usage", "--limit", "many"][..],
        &["serve", "--listen", "not-an-address"][..],
        &["keys", "show", "not-a-key-id"][..],
    ] {
        let out = cli(dir.path(), args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert_one_line(&format!("{args:?}"), &out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    // --help and --version are not errors.
    let out = cli(dir.path(), &["--help"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("provider-keys"), "{out:?}");
}

/// docs/threat-model.md, C7: a provider key on the command line is refused
/// (exit 2, "stdin or --from-env"), whatever the spelling, and never echoed
/// back.
#[test]
fn leak_provider_key_in_argv_is_refused_and_not_echoed() {
    let dir = tempdir();
    let secret = format!("sk-ARGV-{}", random_alnum(24));
    let eq = format!("--api-key={secret}");
    for (i, args) in [
        vec![
            "provider-keys",
            "add",
            "--provider",
            "openai",
            "--api-key",
            &secret,
        ],
        vec!["provider-keys", "add", "--provider", "openai", &eq],
        vec!["provider-keys", "add", "--provider", "openai", &secret],
        vec!["provider-keys", "add", "--api-key", &secret],
        vec![
            "provider-keys",
            "add",
            "--provider",
            "openai",
            &secret,
            &secret,
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let out = cli(dir.path(), &args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert_one_line("argv secret", &out.stderr);
        assert_absent("stderr", &out.stderr, &encodings(&secret));
        assert_absent("stdout", &out.stdout, &encodings(&secret));
        if i < 3 {
            assert!(
                out.stderr.contains("stdin") && out.stderr.contains("--from-env"),
                "{args:?}: {out:?}"
            );
        }
    }
    // Nothing was stored.
    let out = cli(dir.path(), &["provider-keys", "list", "--output", "json"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["data"].as_array().unwrap().len(), 0);
}

/// docs/threat-model.md, C7: from stdin the trailing newline is trimmed (the
/// hint ends with the real last four characters); `--from-env` works; `--output
/// json` parses; `--output env` is refused where it means nothing.
#[test]
fn boundary_provider_key_from_stdin_and_env_and_output_formats() {
    let dir = tempdir();
    let out = cli_with(
        dir.path(),
        &[
            "provider-keys",
            "add",
            "--provider",
            "openai",
            "--name",
            "prod",
            "--output",
            "json",
        ],
        Some("sk-proj-stdin0000000000wxyz\n"),
        &[],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!(v["hint"], "sk-...wxyz", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("pk_"));
    assert!(!out.stdout.contains("stdin0000000000"), "{out:?}");

    let out = cli_with(
        dir.path(),
        &[
            "provider-keys",
            "add",
            "--provider",
            "anthropic",
            "--from-env",
            "MY_KEY",
        ],
        None,
        &[("MY_KEY", "sk-ant-fromenv000000000abcd\r\n")],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("sk-...abcd"), "{out:?}");
    assert!(!out.stdout.contains("fromenv"), "{out:?}");

    // An empty stdin is a usage error.
    let out = cli_with(
        dir.path(),
        &["provider-keys", "add", "--provider", "openai"],
        Some(""),
        &[],
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert_one_line("empty stdin", &out.stderr);

    for args in [
        &["keys", "list", "--output", "json"][..],
        &["provider-keys", "list", "--output", "json"][..],
        &["usage", "--output", "json"][..],
        &["audit", "tail", "--output", "json"][..],
    ] {
        let out = cli(dir.path(), args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        out.json();
    }
    let listed = cli(dir.path(), &["provider-keys", "list", "--output", "json"]).json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");

    for args in [
        &["keys", "list", "--output", "env"][..],
        &["provider-keys", "list", "--output", "env"][..],
        &["usage", "--output", "env"][..],
    ] {
        let out = cli(dir.path(), args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert_one_line("--output env", &out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    // Where env does mean something, it is the CI shape.
    let out = cli(
        dir.path(),
        &["keys", "create", "--name", "ci", "--output", "env"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("export VAULTGATE_KEY=vpx_live_"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("\nexport VAULTGATE_KEY_ID=key_"),
        "{out:?}"
    );
}

/// docs/configuration.md#errors-in-the-file: a bad `vaultgate.toml` stops
/// start-up with exit 2 and a message naming the file and the field.
#[test]
fn boundary_bad_config_names_file_and_field() {
    for (toml, field) in [
        (
            "listen = \"127.0.0.1:8080\"\nfrobnicate = 1\n",
            "frobnicate",
        ),
        ("[providers.openai]\nbase_url = \"not a url\"\n", "base_url"),
        (
            "[providers.openai]\nbase_url = \"ftp://example.com\"\n",
            "base_url",
        ),
        (
            "[upstream]\nconnect_timeout = \"soon\"\n",
            "connect_timeout",
        ),
        (
            "[providers.skynet]\nbase_url = \"http://127.0.0.1:1\"\n",
            "skynet",
        ),
    ] {
        let dir = tempdir();
        std::fs::write(dir.path().join("vaultgate.toml"), toml).unwrap();
        for args in [
            &["keys", "list"][..],
            &["serve", "--listen", "127.0.0.1:0"][..],
        ] {
            let out = cli(dir.path(), args);
            assert_eq!(out.code, 2, "{toml:?} {args:?}: {out:?}");
            assert_one_line(toml, &out.stderr);
            assert!(
                out.stderr.contains("vaultgate.toml"),
                "names the file: {out:?}"
            );
            assert!(out.stderr.contains(field), "names {field}: {out:?}");
        }
        // Nothing was served or initialised.
        assert!(!dir.path().join("vaultgate.db").exists(), "{toml:?}");
    }
}

/// docs/threat-model.md, C7: a master key file readable by group or others →
/// refuse to start, naming the path and the mode; the fresh file is created
/// 0600.
#[test]
fn leak_group_readable_master_key_is_refused() {
    let dir = tempdir();
    // A data directory vaultgate creates is its owner's alone.
    let fresh = dir.path().join("fresh");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vaultgate"))
        .env_clear()
        .arg("--data-dir")
        .arg(&fresh)
        .args(["init", "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory created 0700");
    init(dir.path());
    let path = dir.path().join("master.key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "created 0600");
    for bad in [0o640, 0o604, 0o660] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
        let err = Server::try_start(dir.path(), ServerOptions::default())
            .err()
            .unwrap_or_else(|| panic!("started with a {bad:o} master key"));
        assert!(
            err.contains(&path.display().to_string()),
            "names the path: {err}"
        );
        assert!(
            err.contains(&format!("{bad:04o}")),
            "names the mode {bad:o}: {err}"
        );
        let out = cli(dir.path(), &["keys", "list"]);
        assert_ne!(out.code, 0, "{out:?}");
        assert_one_line("master key mode", &out.stderr);
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = cli(dir.path(), &["keys", "list"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// docs/threat-model.md, D4: after initialisation, a different, malformed or
/// short `VAULTGATE_MASTER_KEY` refuses to start with one sentence, exit 1 or
/// 2, and the key material is not echoed.
#[test]
fn corruption_wrong_master_key_refuses_to_start() {
    use base64::Engine as _;
    let dir = tempdir();
    let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let out = cli_with(
        dir.path(),
        &["init"],
        None,
        &[("VAULTGATE_MASTER_KEY", &good)],
    );
    assert_eq!(out.code, 0, "{out:?}");
    // A provider key, so a wrong master key has something it cannot open.
    let out = cli_with(
        dir.path(),
        &["provider-keys", "add", "--provider", "openai"],
        Some("sk-proj-masterkeytest0000"),
        &[("VAULTGATE_MASTER_KEY", &good)],
    );
    assert_eq!(out.code, 0, "{out:?}");

    let wrong = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let short = base64::engine::general_purpose::STANDARD.encode([9u8; 16]);
    for bad in [wrong.as_str(), short.as_str(), "not base64 at all!"] {
        let started = Instant::now();
        let mut child = command(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("VAULTGATE_MASTER_KEY", bad)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("served with a wrong master key {bad:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = status.code().unwrap_or(-1);
        assert!(code == 1 || code == 2, "{bad:?}: exit {code}: {stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
        assert_one_line(bad, &stderr);
        assert!(stderr.to_lowercase().contains("master key"), "{stderr}");
        assert_absent("stderr", &stderr, &[bad.to_owned()]);
    }
    // The right key still works, and the file was never touched.
    let out = cli_with(
        dir.path(),
        &["keys", "list"],
        None,
        &[("VAULTGATE_MASTER_KEY", &good)],
    );
    assert_eq!(out.code, 0, "{out:?}");
}
