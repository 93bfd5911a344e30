//! Phase 2, `read_body`: the body, bounded in size and time, never
//! compressed, read whole and inspected (model, output limit, input bound,
//! stream; docs/budgets.md#reservation).

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use vault_core::denial::Denial;
use vault_core::meter::{RequestInspection, count_chars, inspect_request, multipart};

use super::{Caller, Payload};
use crate::context::VaultContext;
use crate::vault::body::BoxError;
use crate::vault::refusal::Refusal;

/// The body of `caller`'s request, read and inspected.
pub(super) async fn read_body<B>(
    ctx: &VaultContext,
    parts: &Parts,
    body: B,
    caller: &Caller,
) -> Result<Payload, Refusal>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let refuse = |d| Refusal::of_key(d, caller.attribution(None));
    if parts
        .headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        let d = Denial::InvalidRequest("compressed request bodies are not accepted".to_owned());
        return Err(refuse(d));
    }
    let max = ctx.limits.max_body_bytes;
    let too_large =
        || Denial::RequestTooLarge(format!("the request body is larger than {max} bytes"));
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(refuse(too_large()));
    }
    let read = tokio::time::timeout(ctx.limits.body_timeout, Limited::new(body, max).collect());
    let bytes = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(refuse(too_large()));
        }
        Ok(Err(_)) => {
            let d = Denial::InvalidRequest("the request body could not be read".to_owned());
            return Err(refuse(d));
        }
        Err(_) => return Err(refuse(Denial::RequestTimeout)),
    };
    match inspect(parts, caller, &bytes) {
        Ok((inspection, multipart)) => Ok(Payload {
            bytes,
            inspection,
            multipart,
        }),
        Err(e) => Err(refuse(Denial::InvalidRequest(e.to_string()))),
    }
}

/// What the body says, and whether it is a multipart upload. Multipart
/// uploads (audio, files) are forwarded unread: only a `model` field is
/// read, for model allowlists; the policy refuses them for budgeted keys, as
/// their cost cannot be bounded in advance.
fn inspect(
    parts: &Parts,
    caller: &Caller,
    bytes: &Bytes,
) -> Result<(RequestInspection, bool), vault_core::meter::BodyError> {
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !multipart::is_multipart(content_type) {
        return inspect_request(caller.provider, &caller.path, bytes).map(|i| (i, false));
    }
    let inspection = RequestInspection {
        model: multipart::form_field(content_type, bytes, "model"),
        body_chars: count_chars(bytes),
        input_tokens_bound: bytes.len() as u64,
        input_unbounded: true,
        ..RequestInspection::default()
    };
    Ok((inspection, true))
}
