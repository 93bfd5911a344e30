//! Pure logic of the request path: reading and editing request bodies,
//! parsing response streams and metering token usage. No HTTP types here;
//! `vault-tower` feeds these with the bytes it forwards.
//!
//! - [`sse`]: an incremental Server-Sent Events parser with bounded memory.
//! - [`usage`]: [`UsageMeter`], the provider's token counts from a JSON
//!   body, an SSE stream or a streamed JSON array.
//! - [`request`]: [`inspect_request`] (model, output limit, stream, size,
//!   refusing ambiguous bodies) and [`rewrite_request`] (clamp the output
//!   limit, ask for stream usage) by byte edits.
//! - [`multipart`]: one text field (the `model`) of a `multipart/form-data`
//!   upload, which is otherwise forwarded unread.
//! - [`hide_usage`]: [`HideUsageChunk`], which removes the usage chunk the
//!   proxy asked for on the client's behalf.
//!
//! ```
//! use vault_core::meter::{BodyKind, UsageMeter};
//! use vault_core::provider::Provider;
//!
//! let mut meter = UsageMeter::new(Provider::Anthropic.usage_format(), BodyKind::Sse);
//! meter.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n");
//! meter.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n");
//! let usage = meter.finish().unwrap();
//! assert_eq!((usage.tokens_in, usage.tokens_out), (12, 40));
//! ```

pub mod hide_usage;
pub mod multipart;
pub mod request;
pub mod sse;
pub mod usage;

pub use hide_usage::{Filtered, HideUsageChunk};
pub use request::{
    BodyError, Endpoint, MAX_DEPTH, MAX_MULTIPLIER, RequestInspection, count_chars,
    inspect_request, rewrite_request, rewrite_request_at,
};
pub use sse::{DEFAULT_EVENT_CAP, SseEvent, SseParser};
pub use usage::{BodyKind, DEFAULT_JSON_CAP, TOKEN_CAP, Usage, UsageMeter};
