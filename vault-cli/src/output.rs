//! Printing answers: one function per response type, used by both modes.
//! `json` prints the answer as docs/api.md writes it; `text` is for
//! people; `env` (checked before the verb runs) is only for issued keys.

use serde::Serialize;
use vault_core::manage::wire::{
    AuditList, IssuedKey, KeyView, List, ProviderKeyView, RemovedProviderKey, RevokedKey, UsageList,
};

use crate::Output;

fn json(v: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints `v` as JSON, or `text(v)` for people.
fn print<T: Serialize>(format: Output, v: &T, text: impl FnOnce(&T) -> String) {
    match format {
        Output::Json => json(v),
        // `env` was refused before the verb ran (see `manage::run`).
        Output::Text | Output::Env => print!("{}", text(v)),
    }
}

fn or_dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

/// A created or rotated key (the secret is shown once).
pub(crate) fn issued_key(format: Output, k: &IssuedKey) {
    match format {
        Output::Json => json(k),
        Output::Env => {
            println!("export VAULTGATE_KEY={}", k.key.expose_secret());
            println!("export VAULTGATE_KEY_ID={}", k.record.id);
        }
        Output::Text => {
            println!("{}", k.key.expose_secret());
            eprintln!(
                "created {} ({}, {}); the key above is shown once, store it now",
                k.record.id,
                k.record.name,
                k.record.env.as_str()
            );
        }
    }
}

/// One line per key.
pub(crate) fn key_list(format: Output, list: &List<KeyView>) {
    print(format, list, |list| {
        let mut out = format!(
            "{:<22} {:<15} {:<8} {:<24} {:<10} {:>8} {:<24}\n",
            "ID", "PREFIX", "STATUS", "NAME", "SPEND", "REQUESTS", "LAST USED"
        );
        for k in &list.data {
            out.push_str(&format!(
                "{:<22} {:<15} {:<8} {:<24} {:<10} {:>8} {:<24}\n",
                k.id.as_str(),
                format!("{}…", k.prefix),
                k.status.as_str(),
                k.name,
                format!("${}", k.spend_usd),
                k.request_count,
                or_dash(k.last_used_at.as_deref())
            ));
        }
        out
    });
}

/// One key in full.
pub(crate) fn key(format: Output, k: &KeyView) {
    print(format, k, |k| {
        let fields: [(&str, String); 15] = [
            ("id", k.id.to_string()),
            ("name", k.name.clone()),
            ("project", k.project.clone()),
            ("prefix", k.prefix.to_string()),
            ("env", k.env.as_str().to_owned()),
            ("status", k.status.as_str().to_owned()),
            ("permissions", compact(&k.permissions)),
            ("plan", or_dash(k.plan.as_deref()).to_owned()),
            (
                "parent",
                k.parent
                    .as_ref()
                    .map_or("-".to_owned(), ToString::to_string),
            ),
            ("created_at", k.created_at.clone()),
            ("expires_at", or_dash(k.expires_at.as_deref()).to_owned()),
            (
                "last_used_at",
                or_dash(k.last_used_at.as_deref()).to_owned(),
            ),
            ("request_count", k.request_count.to_string()),
            ("spend_usd", k.spend_usd.clone()),
            ("policy", compact(&k.policy)),
        ];
        fields
            .iter()
            .map(|(name, value)| format!("{name:<14} {value}\n"))
            .collect()
    });
}

/// A revocation: the key and how many descendants went with it.
pub(crate) fn revoked(format: Output, r: &RevokedKey) {
    print(format, r, |r| {
        if r.revoked.is_empty() {
            format!("{} was already revoked\n", r.id)
        } else {
            format!(
                "revoked {} and {} descendant(s)\n",
                r.id,
                r.revoked.len().saturating_sub(1)
            )
        }
    });
}

/// A stored provider key: its id, provider and hint.
pub(crate) fn provider_key(format: Output, p: &ProviderKeyView) {
    print(format, p, |p| {
        format!("added {} ({} {})\n", p.id, p.provider, p.hint.as_str())
    });
}

/// One line per provider key.
pub(crate) fn provider_key_list(format: Output, list: &List<ProviderKeyView>) {
    print(format, list, |list| {
        let mut out = format!(
            "{:<22} {:<11} {:<12} {:<24} {}\n",
            "ID", "PROVIDER", "HINT", "NAME", "PROJECT"
        );
        for k in &list.data {
            out.push_str(&format!(
                "{:<22} {:<11} {:<12} {:<24} {}\n",
                k.id.as_str(),
                k.provider.as_str(),
                k.hint.as_str(),
                k.name,
                k.project
            ));
        }
        out
    });
}

/// A removed provider key.
pub(crate) fn removed_provider_key(format: Output, r: &RemovedProviderKey) {
    print(format, r, |r| format!("removed {}\n", r.id));
}

/// Usage records and totals.
pub(crate) fn usage(format: Output, u: &UsageList) {
    print(format, u, |u| {
        let mut out = format!(
            "{:<24} {:<22} {:<34} {:<24} {:>7} {:>7} {:>10} {:>6}\n",
            "AT", "KEY", "ENDPOINT", "MODEL", "IN", "OUT", "COST", "STATUS"
        );
        for r in &u.data {
            out.push_str(&format!(
                "{:<24} {:<22} {:<34} {:<24} {:>7} {:>7} {:>10} {:>6}\n",
                r.at,
                r.key_id.as_str(),
                r.endpoint,
                or_dash(r.model.as_deref()),
                r.tokens_in,
                r.tokens_out,
                format!("${}", r.cost_usd),
                r.status
            ));
        }
        let t = &u.totals;
        out.push_str(&format!(
            "total: {} requests, {} tokens in, {} tokens out, ${}\n",
            t.requests, t.tokens_in, t.tokens_out, t.cost_usd
        ));
        out
    });
}

/// Audit entries: JSON as `GET /v1/audit` answers (newest first); text one
/// entry per line, oldest first, as `tail` shows a file.
pub(crate) fn audit(format: Output, list: &AuditList) {
    print(format, list, |list| {
        list.data.iter().rev().map(|e| format!("{e}\n")).collect()
    });
}

/// Compact JSON of a field, for `keys show`.
fn compact(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
