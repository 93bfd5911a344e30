//! The usage meter on arbitrary response bytes cut at arbitrary points, for
//! every usage format and body kind: never panics, memory stays within the
//! caps, and no count exceeds `TOKEN_CAP`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_core::meter::{BodyKind, TOKEN_CAP, UsageMeter};
use vault_core::provider::UsageFormat;

const FORMATS: [UsageFormat; 4] = [
    UsageFormat::OpenAi,
    UsageFormat::Anthropic,
    UsageFormat::Google,
    UsageFormat::Cohere,
];
const KINDS: [BodyKind; 3] = [BodyKind::Json, BodyKind::Sse, BodyKind::JsonArrayStream];
/// Small caps, so the fuzzer reaches the oversize paths.
const EVENT_CAP: usize = 256;
const JSON_CAP: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks the format and kind, byte 1 seeds the split points.
    let [pick, seed, body @ ..] = data else {
        return;
    };
    let format = FORMATS[usize::from(pick & 3)];
    let kind = KINDS[usize::from(pick >> 2) % KINDS.len()];
    let mut meter = UsageMeter::with_caps(format, kind, EVENT_CAP, JSON_CAP);
    let cap = if kind == BodyKind::Json {
        JSON_CAP
    } else {
        EVENT_CAP
    };
    let mut rest = body;
    let mut state = u32::from(*seed) | 1;
    while !rest.is_empty() {
        // A small xorshift decides each chunk's length (1..=16 bytes, or the rest).
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = if state % 7 == 0 {
            rest.len()
        } else {
            (state as usize % 16 + 1).min(rest.len())
        };
        let (chunk, tail) = rest.split_at(len);
        meter.feed(chunk);
        rest = tail;
        assert!(
            meter.buffered_len() <= cap,
            "{} > {cap}",
            meter.buffered_len()
        );
    }
    if let Some(usage) = meter.finish() {
        assert!(usage.tokens_in <= TOKEN_CAP);
        assert!(usage.tokens_out <= TOKEN_CAP);
    }
});
