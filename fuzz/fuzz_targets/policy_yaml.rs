//! Policy YAML on arbitrary UTF-8: never panics, and every error names its origin.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = vault_core::policy::parse_policy_yaml(text, "fuzz.yaml") {
        let msg = e.to_string();
        assert!(msg.starts_with("fuzz.yaml"), "{msg}");
    }
});
