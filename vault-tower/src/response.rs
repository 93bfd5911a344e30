//! Responses vaultgate writes itself: error bodies (docs/api.md#errors) and
//! limit headers (docs/api.md#headers).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use vault_core::denial::Denial;
use vault_core::policy::LimitHeaders;

/// `X-RateLimit-Limit`.
pub const RATE_LIMIT_LIMIT: &str = "x-ratelimit-limit";
/// `X-RateLimit-Remaining`.
pub const RATE_LIMIT_REMAINING: &str = "x-ratelimit-remaining";
/// `X-RateLimit-Reset` (unix seconds).
pub const RATE_LIMIT_RESET: &str = "x-ratelimit-reset";
/// `X-Budget-Remaining-USD`, for budgeted keys.
pub const BUDGET_REMAINING: &str = "x-budget-remaining-usd";
/// Set when the output limit was lowered to what the budget affords.
pub const OUTPUT_TOKENS_CLAMPED: &str = "x-vaultgate-max-output-tokens";
/// Set in shadow mode when a request would have been denied (the code).
pub const SHADOW_DENIAL: &str = "x-vaultgate-shadow-denial";

// The same names, parsed once (inserting by `&str` parses on every call).
const LIMIT: HeaderName = HeaderName::from_static(RATE_LIMIT_LIMIT);
const REMAINING: HeaderName = HeaderName::from_static(RATE_LIMIT_REMAINING);
const RESET: HeaderName = HeaderName::from_static(RATE_LIMIT_RESET);
const BUDGET: HeaderName = HeaderName::from_static(BUDGET_REMAINING);

/// The JSON error response for a denial (docs/api.md#errors).
pub fn denial_response(d: &Denial) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(d.to_json())));
    *resp.status_mut() =
        StatusCode::from_u16(d.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Denial::RateLimited {
        retry_after_secs, ..
    } = d
    {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    if matches!(d, Denial::StoreUnavailable) {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Adds `X-RateLimit-*` (and `X-Budget-Remaining-USD`, `Retry-After` where
/// known). Every value is numeric or the one word `unlimited` (a key with no
/// request limit), built by vaultgate, never from input (docs/threat-model.md,
/// F3).
pub fn add_limit_headers(headers: &mut HeaderMap, limits: &LimitHeaders) {
    if limits.limit == 0 {
        let unlimited = HeaderValue::from_static("unlimited");
        headers.insert(LIMIT, unlimited.clone());
        headers.insert(REMAINING, unlimited);
    } else {
        headers.insert(LIMIT, HeaderValue::from(limits.limit));
        headers.insert(REMAINING, HeaderValue::from(limits.remaining));
    }
    headers.insert(RESET, HeaderValue::from(limits.reset_unix_secs));
    if let Some(secs) = limits.retry_after_secs {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(left) = limits.budget_remaining
        && let Ok(v) = HeaderValue::from_str(&left.to_usd_string())
    {
        headers.insert(BUDGET, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vault_core::money::Micros;

    #[test]
    fn denial_and_headers() {
        let d = Denial::RateLimited {
            message: "60 requests per minute".into(),
            retry_after_secs: 7,
        };
        let mut r = denial_response(&d);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        add_limit_headers(
            r.headers_mut(),
            &LimitHeaders {
                limit: 120,
                remaining: 119,
                reset_unix_secs: 1_700_000_000,
                retry_after_secs: None,
                budget_remaining: Some(Micros(4_990_000)),
            },
        );
        assert_eq!(r.headers()["x-ratelimit-limit"], "120");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "119");
        assert_eq!(r.headers()["x-ratelimit-reset"], "1700000000");
        assert_eq!(r.headers()["x-budget-remaining-usd"], "4.990000");
    }
}
