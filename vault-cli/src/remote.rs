//! Remote mode (`--url`): the [`Management`] verbs over a running server's
//! HTTP API (docs/api.md), sending and reading the same wire types the
//! server parses and answers with.

use anyhow::{Result, anyhow};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use vault_core::key::{KeyId, ProviderKeyId};
use vault_core::manage::wire::{
    AddProviderKeyRequest, AuditList, AuditQuery, CreateKeyRequest, IssuedKey, KeyView, List,
    ProviderKeyView, RemovedProviderKey, RevokedKey, RotateKeyRequest, UsageList, UsageQuery,
};

use crate::app::UsageError;
use crate::manage::{Management, refused};

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

    /// Sends one request and reads the typed answer; an error status becomes
    /// the same error direct mode reports ([`refused`]).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let bytes = match body {
            Some(b) => Bytes::from(
                serde_json::to_vec(b).map_err(|_| anyhow!("the request could not be encoded"))?,
            ),
            None => Bytes::new(),
        };
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
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| anyhow!("the server's answer is not what docs/api.md says: {e}"));
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let message = v["detail"].as_str().unwrap_or("request failed");
        Err(refused(status.as_u16(), message))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }
}

impl Management for Remote {
    async fn create_key(&self, req: CreateKeyRequest) -> Result<IssuedKey> {
        self.call(Method::POST, "/v1/keys", Some(&req)).await
    }

    async fn list_keys(&self) -> Result<List<KeyView>> {
        self.get("/v1/keys").await
    }

    async fn get_key(&self, id: &KeyId) -> Result<KeyView> {
        self.get(&format!("/v1/keys/{id}")).await
    }

    async fn revoke_key(&self, id: &KeyId) -> Result<RevokedKey> {
        self.call(Method::DELETE, &format!("/v1/keys/{id}"), None::<&()>)
            .await
    }

    async fn rotate_key(&self, id: &KeyId, req: RotateKeyRequest) -> Result<IssuedKey> {
        self.call(Method::POST, &format!("/v1/keys/{id}/rotate"), Some(&req))
            .await
    }

    async fn add_provider_key(&self, req: AddProviderKeyRequest) -> Result<ProviderKeyView> {
        self.call(Method::POST, "/v1/provider-keys", Some(&req))
            .await
    }

    async fn list_provider_keys(&self) -> Result<List<ProviderKeyView>> {
        self.get("/v1/provider-keys").await
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<RemovedProviderKey> {
        self.call(
            Method::DELETE,
            &format!("/v1/provider-keys/{id}"),
            None::<&()>,
        )
        .await
    }

    async fn usage(&self, q: UsageQuery) -> Result<UsageList> {
        // Ids and numbers only: nothing here needs percent-encoding.
        let mut params = Vec::new();
        if let Some(k) = &q.key_id {
            params.push(format!("key_id={k}"));
        }
        if let Some(s) = q.since {
            params.push(format!("since={s}"));
        }
        if let Some(l) = q.limit {
            params.push(format!("limit={l}"));
        }
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        self.get(&format!("/v1/usage{query}")).await
    }

    async fn audit(&self, q: AuditQuery) -> Result<AuditList> {
        match q.limit {
            Some(l) => self.get(&format!("/v1/audit?limit={l}")).await,
            None => self.get("/v1/audit").await,
        }
    }
}
