//! Endpoint rules on arbitrary input: parsing never panics, a parsed rule
//! matches without panicking, reads back as written, and is within itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_core::policy::EndpointRule;

fuzz_target!(|text: &str| {
    // The rule, then a newline, then `METHOD path` to match it against.
    let (rule, request) = text
        .split_once('\n')
        .unwrap_or((text, "POST /v1/chat/completions"));
    let (method, path) = request.split_once(' ').unwrap_or(("GET", request));
    let Ok(parsed) = EndpointRule::parse(rule) else {
        return;
    };
    let _ = parsed.matches(method, path);
    assert_eq!(parsed.as_str(), rule);
    assert!(parsed.is_within(&parsed), "{rule}");
    if let Ok(other) = EndpointRule::parse(request) {
        // A rule within another admits only what the other admits.
        if parsed.is_within(&other) && parsed.matches(method, path) {
            assert!(other.matches(method, path), "{rule} within {request}");
        }
    }
});
