//! A key's **Limits** section on its detail page: each rate-limit window
//! of the key and of the ancestors its calls count against, with its use, a
//! bar and its reset time; calls in flight against `max_parallel`; and what
//! the budget line has left. Read through
//! [`Manager::key_limits`](vault_core::manage::Manager::key_limits), which
//! counts nothing.

use maud::{Markup, html};

use super::keys::when;
use vault_core::manage::ManageError;
use vault_core::manage::wire::{KeyLimits, LimitWindowView};
use vault_core::policy::BudgetPeriod;

/// The section for `limits`, or one line saying why they cannot be shown.
pub(crate) fn limits_section(limits: &Result<KeyLimits, ManageError>) -> Markup {
    html! {
        h2 { "Limits" }
        @match limits {
            Err(e) => p.warn { "Limits cannot be read now: " (e) }
            Ok(l) if l.windows.is_empty() && l.budget.is_none() => p { "No rate limit, max_parallel or budget." }
            Ok(l) => {
                @if !l.windows.is_empty() {
                    table.limits {
                        thead { tr { th { "Limit" } th { "Set by" } th { "Used" } th { "Use" } th { "Resets at" } } }
                        tbody { @for w in &l.windows { (window_row(w)) } }
                    }
                }
                @if let Some(b) = &l.budget {
                    p.budget {
                        "Budget (" (period_name(b.period)) (if b.inherited { ", a parent's" } else { "" }) "): $"
                        (b.remaining_usd) " remaining of $" (b.limit_usd)
                        " ($" (b.settled_usd) " settled, $" (b.reserved_usd) " reserved)"
                        @if let Some(r) = &b.resets_at { "; resets at " (when(Some(r))) " UTC" }
                    }
                }
                p.note { "Read at " (l.at) "." }
            }
        }
    }
}

/// One window: name, whose, `used / limit`, a bar, the reset.
fn window_row(w: &LimitWindowView) -> Markup {
    // A limit of 0 admits nothing: its bar is full.
    let pct = w
        .used
        .saturating_mul(100)
        .checked_div(w.limit)
        .map_or(100, |p| p.min(100));
    html! {
        tr {
            td { (w.name.replace('_', " ")) }
            td { @if w.inherited { a href={"/ui/keys/" (w.key_id.as_str())} { "parent " (w.key_id.as_str()) } } @else { "this key" } }
            td { (w.used) " / " (w.limit) }
            td { meter min="0" max="100" value=(pct) aria-label={(w.name) " used"} {} }
            td { (match w.resets_at.as_deref() {
                Some(r) => format!("{} UTC", when(Some(r))),
                None if w.name == "max_parallel" => "in flight now".to_owned(),
                None => "—".to_owned(),
            }) }
        }
    }
}

fn period_name(p: BudgetPeriod) -> &'static str {
    match p {
        BudgetPeriod::Total => "total",
        BudgetPeriod::Daily => "daily",
        BudgetPeriod::Monthly => "monthly",
    }
}
