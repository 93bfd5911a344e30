//! Policy files: the example of docs/policy.md loads, and malformed files are
//! refused with a message naming the file, the line and the field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_core::money::Micros;
use vault_core::policy::{BudgetPeriod, PolicyError, load_policy_file, parse_policy_yaml};
use vault_core::provider::Provider;

const ORIGIN: &str = "agent.policy.yaml";

/// Parses `text`, expects an error on `line` naming `field`, returns the message.
fn refused(text: &str, line: u64, field: &str) -> String {
    let err = parse_policy_yaml(text, ORIGIN).expect_err(text);
    let msg = err.to_string();
    let PolicyError::Invalid {
        line: got_line,
        field: got_field,
        ..
    } = &err
    else {
        panic!("not an Invalid error: {msg}");
    };
    assert_eq!(*got_line, Some(line), "wrong line in {msg:?} for\n{text}");
    assert!(
        msg.starts_with(&format!("{ORIGIN}:{line}")),
        "no file:line prefix in {msg:?}"
    );
    assert!(msg.contains(field), "{msg:?} does not name {field:?}");
    assert!(
        got_field.contains(field.trim_matches('"')),
        "field {got_field:?} is not {field:?} ({msg})"
    );
    msg
}

#[test]
fn corruption_unknown_top_level_field() {
    let text = "name: eval\nttl: 1h\nscopes: [chat:write]\nproviders: [openai]\nmodels: [gpt-4o-mini]\nmax_request_chars: 10\nbudjet:\n  limit_usd: 5\n";
    let msg = refused(text, 7, "\"budjet\"");
    assert!(
        msg.starts_with(
            "agent.policy.yaml:7:1: unknown field \"budjet\"; expected one of: name, ttl,"
        ),
        "{msg}"
    );
}

#[test]
fn corruption_unknown_nested_field() {
    let msg = refused("name: a\nbudget:\n  limit: 5\n", 3, "\"limit\"");
    assert!(
        msg.contains("in budget") && msg.contains("limit_usd, period"),
        "{msg}"
    );
    refused(
        "rate_limit:\n  requests_per_hour: 5\n",
        2,
        "\"requests_per_hour\"",
    );
}

#[test]
fn corruption_bad_ttl() {
    refused("name: a\nttl: 1w\n", 2, "ttl");
    refused("name: a\nttl: 0s\n", 2, "ttl");
    refused("name: a\nttl: -5m\n", 2, "ttl");
}

#[test]
fn corruption_negative_budget() {
    refused("name: a\nbudget:\n  limit_usd: -1\n", 3, "budget.limit_usd");
}

#[test]
fn corruption_nan_and_infinite_budget() {
    refused("budget:\n  limit_usd: .nan\n", 2, "budget.limit_usd");
    refused("budget:\n  limit_usd: .inf\n", 2, "budget.limit_usd");
    refused("budget:\n  limit_usd: 1e12\n", 2, "budget.limit_usd");
}

#[test]
fn corruption_budget_not_a_number() {
    refused(
        "name: a\nbudget:\n  limit_usd: five\n",
        3,
        "budget.limit_usd",
    );
}

#[test]
fn corruption_unknown_budget_period() {
    refused(
        "budget:\n  limit_usd: 1\n  period: weekly\n",
        3,
        "budget.period",
    );
}

#[test]
fn corruption_unknown_scope() {
    let msg = refused(
        "name: a\nscopes:\n  - chat:write\n  - chat:read\n",
        4,
        "scopes",
    );
    assert!(msg.contains("chat:read"), "{msg}");
}

#[test]
fn corruption_unknown_provider() {
    let msg = refused("providers: [openai, OpenAI]\n", 1, "providers");
    assert!(msg.contains("OpenAI"), "{msg}");
}

#[test]
fn corruption_bad_endpoint_pattern() {
    refused(
        "endpoints:\n  - POST /v1/chat/completions\n  - post /v1/../files\n",
        3,
        "endpoints",
    );
    refused("endpoints:\n  - /v1/chat/completions\n", 2, "endpoints");
}

#[test]
fn corruption_bad_model_pattern() {
    refused("models: [gpt-4o-mini, \"gpt 4o\"]\n", 1, "models");
}

#[test]
fn corruption_zero_rate_limit() {
    refused(
        "rate_limit:\n  requests_per_minute: 0\n",
        2,
        "rate_limit.requests_per_minute",
    );
    refused(
        "name: a\nrate_limit:\n  tokens_per_minute: 0\n",
        3,
        "rate_limit.tokens_per_minute",
    );
}

#[test]
fn corruption_negative_rate_limit() {
    refused(
        "name: a\nrate_limit:\n  requests_per_day: -5\n",
        3,
        "rate_limit.requests_per_day",
    );
}

#[test]
fn corruption_zero_max_request_chars_and_parallel() {
    refused("max_request_chars: 0\n", 1, "max_request_chars");
    refused("name: a\nmax_parallel: 0\n", 2, "max_parallel");
    refused("name: a\nmax_parallel: 5000000000\n", 2, "max_parallel");
}

#[test]
fn corruption_empty_allowlist() {
    refused("name: a\nmodels: []\n", 2, "models");
    refused("providers: []\n", 1, "providers");
}

#[test]
fn corruption_duplicate_field() {
    refused(
        "name: a\nmodels: [gpt-4o-mini]\nmodels: [gpt-4o]\n",
        3,
        "models",
    );
}

#[test]
fn corruption_wrong_types() {
    refused("name: a\nshadow: maybe\n", 2, "shadow");
    refused("name: a\nproviders: openai\n", 2, "providers");
    refused("name: a\nmax_request_chars: 1.5\n", 2, "max_request_chars");
}

#[test]
fn corruption_name_with_control_characters() {
    refused("name: \"bad\\r\\nX-Injected: 1\"\n", 1, "name");
}

#[test]
fn corruption_bad_plan_name() {
    refused("plan: Pro Plan\n", 1, "plan");
}

#[test]
fn corruption_not_a_mapping_or_empty() {
    for text in ["", "~\n", "# only a comment\n"] {
        let e = parse_policy_yaml(text, ORIGIN).unwrap_err();
        assert!(e.to_string().starts_with(ORIGIN), "{e}");
    }
    let e = parse_policy_yaml("- a\n- b\n", ORIGIN).unwrap_err();
    assert!(e.to_string().starts_with("agent.policy.yaml:1"), "{e}");
    let e = parse_policy_yaml("name: [unclosed\n", ORIGIN).unwrap_err();
    assert!(e.to_string().starts_with("agent.policy.yaml:"), "{e}");
}

#[test]
fn the_spec_example_loads_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.policy.yaml");
    std::fs::write(
        &path,
        "name: nightly-eval\nttl: 1h\nscopes: [chat:write]\nproviders: [openai, anthropic]\nendpoints:\n  - POST /v1/chat/completions\n  - POST /v1/messages\nmodels: [gpt-4o-mini, \"claude-3-5-haiku-*\"]\nbudget:\n  limit_usd: 5.00\n  period: daily\nrate_limit:\n  requests_per_minute: 60\n  requests_per_day: 500\n  tokens_per_minute: 200000\nmax_request_chars: 3000\nmax_parallel: 4\nshadow: true\nplan: pro\n",
    )
    .unwrap();
    let f = load_policy_file(&path).unwrap();
    assert_eq!(f.plan.as_deref(), Some("pro"));
    let b = f.policy.budget.unwrap();
    assert_eq!(
        (b.limit, b.period),
        (Micros(5_000_000), BudgetPeriod::Daily)
    );
    assert_eq!(
        f.policy.providers.unwrap(),
        [Provider::OpenAi, Provider::Anthropic]
    );
    assert_eq!(f.policy.max_parallel, Some(4));
    assert!(f.policy.shadow);

    let missing = load_policy_file(&dir.path().join("nope.yaml")).unwrap_err();
    assert!(missing.to_string().contains("nope.yaml"), "{missing}");
    std::fs::write(&path, "name: a\nbudjet: 1\n").unwrap();
    let e = load_policy_file(&path).unwrap_err().to_string();
    assert!(
        e.contains("agent.policy.yaml:2:1: unknown field \"budjet\""),
        "{e}"
    );
}

#[test]
fn corruption_aliases_cannot_blow_up() {
    let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 {
            "a".to_owned()
        } else {
            format!("l{}", i - 1)
        };
        text.push_str(&format!(
            "l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    assert!(parse_policy_yaml(&text, ORIGIN).is_err());
}

#[test]
fn budget_clamp_explicit_limits_is_read_and_defaults_off() {
    let f = parse_policy_yaml(
        "budget:\n  limit_usd: 5\n  clamp_explicit_limits: true\n",
        ORIGIN,
    )
    .unwrap();
    assert!(f.policy.budget.unwrap().clamp_explicit_limits);
    let f = parse_policy_yaml("budget:\n  limit_usd: 5\n", ORIGIN).unwrap();
    assert!(!f.policy.budget.unwrap().clamp_explicit_limits);
    refused(
        "budget:\n  limit_usd: 5\n  clamp_explicit_limits: sometimes\n",
        3,
        "clamp_explicit_limits",
    );
    // The stored (and management API) JSON form: absent means off.
    let b: vault_core::policy::Budget =
        serde_json::from_str(r#"{"limit_usd":5,"clamp_explicit_limits":true}"#).unwrap();
    assert!(b.clamp_explicit_limits);
    let b: vault_core::policy::Budget = serde_json::from_str(r#"{"limit_usd":5}"#).unwrap();
    assert!(!b.clamp_explicit_limits);
    assert_eq!(
        serde_json::to_string(&b).unwrap(),
        r#"{"limit_usd":5.0,"period":"total"}"#
    );
}
