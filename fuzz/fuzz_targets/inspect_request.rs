//! Request inspection on arbitrary bodies for every provider: never panics,
//! and what it accepts has its characters counted exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_core::meter::inspect_request;
use vault_core::provider::Provider;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let provider = Provider::ALL[usize::from(pick) % Provider::ALL.len()];
    let path = match provider {
        Provider::Google if pick & 0x80 != 0 => {
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
        }
        Provider::Google => "/v1beta/models/gemini-2.0-flash:generateContent",
        Provider::Anthropic => "/v1/messages",
        _ => "/v1/chat/completions",
    };
    if let Ok(inspection) = inspect_request(provider, path, body) {
        let chars = std::str::from_utf8(body).map_or(body.len(), |s| s.chars().count());
        assert_eq!(inspection.body_chars, chars as u64);
    }
});
