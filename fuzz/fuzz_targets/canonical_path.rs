//! The proxy path canonicaliser on arbitrary input: never panics; whatever it
//! accepts is a verbatim suffix with no dot segment and no encoded separator.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((provider, upstream)) = vault_core::policy::split_proxy_path(path) {
        assert!(path.ends_with(upstream));
        assert!(path[1..].starts_with(provider.as_str()));
        assert!(upstream.starts_with('/'));
        assert!(upstream.is_ascii());
        let lower = upstream.to_ascii_lowercase();
        for bad in ["%2e", "%2f", "%5c", "%00", "%25", "\\"] {
            assert!(!lower.contains(bad), "{upstream}");
        }
        assert!(upstream[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
    }
});
