//! Talking to a running server's management API (`--url`).

use anyhow::{Result, anyhow};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::app::UsageError;

/// A management API client authenticated with `VAULTGATE_ADMIN_KEY`.
pub(crate) struct Remote {
    base: String,
    admin_key: String,
}

impl Remote {
    /// A client for `url`; the admin key comes from the environment only.
    pub(crate) fn new(url: &str) -> Result<Remote> {
        if !url.starts_with("http://") {
            return Err(UsageError(format!(
                "--url {url:?}: expected http://HOST:PORT (put TLS in front of vaultgate with a reverse proxy)"
            ))
            .into());
        }
        let admin_key = std::env::var("VAULTGATE_ADMIN_KEY").map_err(|_| {
            UsageError(
                "--url needs an admin key in the VAULTGATE_ADMIN_KEY environment variable"
                    .to_owned(),
            )
        })?;
        Ok(Remote {
            base: url.trim_end_matches('/').to_owned(),
            admin_key,
        })
    }

    /// Sends one request and returns the JSON answer; an error status becomes
    /// an error carrying the server's message.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.admin_key))
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .map_err(|_| UsageError("--url: not a valid URL".to_owned()))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| anyhow!("cannot reach {}: {e}", self.base))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow!("reading the response failed: {e}"))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let message = v["detail"].as_str().unwrap_or("request failed").to_owned();
        if status.is_client_error() {
            Err(UsageError(format!("{} ({})", message, status.as_u16())).into())
        } else {
            Err(anyhow!("{} ({})", message, status.as_u16()))
        }
    }
}
