//! Printing results: `text` for people, `json` for programs, `env` for CI.

use serde_json::Value;

use crate::Output;
use crate::app::UsageError;

/// Prints a created or rotated key (the secret is shown once).
pub(crate) fn issued_key(format: Output, v: &Value) {
    match format {
        Output::Json => json(v),
        Output::Env => {
            println!(
                "export VAULTGATE_KEY={}",
                v["key"].as_str().unwrap_or_default()
            );
            println!(
                "export VAULTGATE_KEY_ID={}",
                v["id"].as_str().unwrap_or_default()
            );
        }
        Output::Text => {
            println!("{}", v["key"].as_str().unwrap_or_default());
            eprintln!(
                "created {} ({}, {}); the key above is shown once, store it now",
                v["id"].as_str().unwrap_or_default(),
                v["name"].as_str().unwrap_or_default(),
                v["env"].as_str().unwrap_or_default()
            );
        }
    }
}

/// Prints any other result; `env` is refused where it means nothing.
pub(crate) fn value(
    format: Output,
    v: &Value,
    text: impl Fn(&Value) -> String,
) -> Result<(), UsageError> {
    match format {
        Output::Json => json(v),
        Output::Text => print!("{}", text(v)),
        Output::Env => {
            return Err(UsageError(
                "--output env is only for keys create and keys rotate".to_owned(),
            ));
        }
    }
    Ok(())
}

fn json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// One line per key.
pub(crate) fn keys_text(v: &Value) -> String {
    let mut out = format!(
        "{:<22} {:<15} {:<8} {:<24} {:<10} {:>8} {:<24}\n",
        "ID", "PREFIX", "STATUS", "NAME", "SPEND", "REQUESTS", "LAST USED"
    );
    for k in v["data"].as_array().into_iter().flatten() {
        out.push_str(&key_line(k));
    }
    out
}

fn key_line(k: &Value) -> String {
    format!(
        "{:<22} {:<15} {:<8} {:<24} {:<10} {:>8} {:<24}\n",
        s(&k["id"]),
        format!("{}…", s(&k["prefix"])),
        s(&k["status"]),
        s(&k["name"]),
        format!("${}", s(&k["spend_usd"])),
        s(&k["request_count"]),
        s(&k["last_used_at"])
    )
}

/// One key in full.
pub(crate) fn key_text(k: &Value) -> String {
    let mut out = String::new();
    for field in [
        "id",
        "name",
        "project",
        "prefix",
        "env",
        "status",
        "permissions",
        "plan",
        "parent",
        "created_at",
        "expires_at",
        "last_used_at",
        "request_count",
        "spend_usd",
        "policy",
    ] {
        out.push_str(&format!("{field:<14} {}\n", s(&k[field])));
    }
    out
}

/// One line per provider key.
pub(crate) fn provider_keys_text(v: &Value) -> String {
    let mut out = format!(
        "{:<22} {:<11} {:<12} {:<24} {}\n",
        "ID", "PROVIDER", "HINT", "NAME", "PROJECT"
    );
    for k in v["data"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<22} {:<11} {:<12} {:<24} {}\n",
            s(&k["id"]),
            s(&k["provider"]),
            s(&k["hint"]),
            s(&k["name"]),
            s(&k["project"])
        ));
    }
    out
}

/// Usage records and totals.
pub(crate) fn usage_text(v: &Value) -> String {
    let mut out = format!(
        "{:<24} {:<22} {:<34} {:<24} {:>7} {:>7} {:>10} {:>6}\n",
        "AT", "KEY", "ENDPOINT", "MODEL", "IN", "OUT", "COST", "STATUS"
    );
    for r in v["data"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<24} {:<22} {:<34} {:<24} {:>7} {:>7} {:>10} {:>6}\n",
            s(&r["at"]),
            s(&r["key_id"]),
            s(&r["endpoint"]),
            s(&r["model"]),
            s(&r["tokens_in"]),
            s(&r["tokens_out"]),
            format!("${}", s(&r["cost_usd"])),
            s(&r["status"])
        ));
    }
    let t = &v["totals"];
    out.push_str(&format!(
        "total: {} requests, {} tokens in, {} tokens out, ${}\n",
        s(&t["requests"]),
        s(&t["tokens_in"]),
        s(&t["tokens_out"]),
        s(&t["cost_usd"])
    ));
    out
}

/// Audit entries, one JSON line each.
pub(crate) fn lines_text(v: &Value) -> String {
    let mut out = String::new();
    for e in v["data"].as_array().into_iter().flatten() {
        out.push_str(&e.to_string());
        out.push('\n');
    }
    out
}
