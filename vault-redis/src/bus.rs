//! [`RevocationBus`]: revoked key ids broadcast to every replica over a
//! Redis channel (`{prefix}revoked`, docs/redis.md#revocation).
//!
//! Pub/sub delivers a message only to the subscribers connected when it is
//! published. A subscriber that lost its connection may have missed some,
//! so after every reconnection it calls its `resync` callback: the caller
//! then drops (or re-reads) every cached key, as if each had been revoked.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use vault_core::key::KeyId;

use crate::config::{Redactor, RedisConfig};
use crate::conn::Conn;
use crate::error::Error;

/// Ids per published message: a long revocation is sent in parts.
const IDS_PER_MESSAGE: usize = 1000;

/// How often a subscriber pings Redis, to notice a connection that died
/// silently (no FIN, e.g. a network partition).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Reconnection waits double from this up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Publishes revocations and subscribes to them. Cheap to clone.
#[derive(Clone)]
pub struct RevocationBus {
    conn: Conn,
    client: redis::Client,
    channel: String,
    timeout: Duration,
    redactor: Redactor,
}

impl fmt::Debug for RevocationBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationBus")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl RevocationBus {
    /// A bus on `config`'s Redis, channel `{prefix}revoked`. Connects on
    /// first use. Needs a Tokio runtime.
    pub fn new(config: &RedisConfig) -> Result<RevocationBus, Error> {
        Ok(RevocationBus {
            conn: Conn::new(config)?,
            client: config.client()?,
            channel: format!("{}revoked", config.key_prefix()),
            timeout: config.timeout(),
            redactor: config.redactor().clone(),
        })
    }

    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Tells every subscribed replica that `ids` are revoked (a key and its
    /// descendants: pass them all). Returns how many subscribers received
    /// the last part. Fails when Redis cannot be reached: the revocation is
    /// in the store all the same, and other replicas see it when their
    /// cache entry expires.
    pub async fn publish(&self, ids: &[KeyId]) -> Result<u64, Error> {
        let mut reached = 0;
        for part in ids.chunks(IDS_PER_MESSAGE) {
            let payload = part.iter().map(KeyId::as_str).collect::<Vec<_>>().join(" ");
            let channel = &self.channel;
            reached = self
                .conn
                .run(|mut c| {
                    let mut cmd = redis::cmd("PUBLISH");
                    cmd.arg(channel).arg(&payload);
                    async move { cmd.query_async::<u64>(&mut c).await }
                })
                .await?;
        }
        Ok(reached)
    }

    /// Subscribes in a background task until the returned [`Subscription`]
    /// is dropped: `on_revoked` is called with the ids of every message
    /// (quickly: it runs on the task that reads the channel), and `resync`
    /// after every reconnection, including a first connection that
    /// succeeded only after failed attempts, because messages published
    /// while disconnected are lost. The task reconnects on its own, with
    /// backoff from 50 ms to 2 s.
    pub fn subscribe<F, R>(&self, on_revoked: F, resync: R) -> Subscription
    where
        F: Fn(&[KeyId]) + Send + Sync + 'static,
        R: Fn() + Send + Sync + 'static,
    {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(subscriber(
            self.clone(),
            Arc::new(on_revoked),
            Arc::new(resync),
            tx,
        ));
        Subscription {
            task,
            connected: rx,
        }
    }
}

/// A running subscription; dropping it stops the task.
#[derive(Debug)]
pub struct Subscription {
    task: tokio::task::JoinHandle<()>,
    connected: watch::Receiver<bool>,
}

impl Subscription {
    /// Whether the subscription is established now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the subscription is established, at most `timeout`;
    /// returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type OnRevoked = Arc<dyn Fn(&[KeyId]) + Send + Sync>;
type OnResync = Arc<dyn Fn() + Send + Sync>;

async fn subscriber(
    bus: RevocationBus,
    on_revoked: OnRevoked,
    resync: OnResync,
    connected: watch::Sender<bool>,
) {
    let mut attempts: u64 = 0;
    let mut backoff = MIN_BACKOFF;
    loop {
        let subscribed = async {
            let mut pubsub = bus.client.get_async_pubsub().await?;
            pubsub.subscribe(&bus.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(bus.timeout.max(Duration::from_millis(500)), subscribed).await {
            Ok(Ok(pubsub)) => {
                if attempts > 0 {
                    tracing::info!(
                        channel = %bus.channel,
                        "revocation bus subscribed again; resynchronising"
                    );
                    resync();
                }
                // Connected once resynchronised: from here no message is lost.
                connected.send_replace(true);
                backoff = MIN_BACKOFF;
                listen(&bus, pubsub, &on_revoked).await;
                connected.send_replace(false);
                tracing::warn!(channel = %bus.channel, "revocation bus lost its connection; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %bus.redactor.describe(&e), "revocation bus cannot subscribe");
            }
            Err(_) => tracing::debug!("revocation bus: subscribing timed out"),
        }
        attempts = attempts.saturating_add(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads messages until the connection ends or stops answering pings.
async fn listen(bus: &RevocationBus, pubsub: redis::aio::PubSub, on_revoked: &OnRevoked) {
    let (mut sink, mut stream) = pubsub.split();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return };
                let Ok(payload) = msg.get_payload::<String>() else {
                    tracing::warn!("revocation bus: a message that is not text; ignored");
                    continue;
                };
                let ids: Vec<KeyId> = payload
                    .split_ascii_whitespace()
                    .filter_map(KeyId::parse)
                    .collect();
                if !ids.is_empty() {
                    on_revoked(&ids);
                }
            }
            _ = heartbeat.tick() => {
                let ping = tokio::time::timeout(
                    bus.timeout.max(Duration::from_secs(1)),
                    sink.ping::<redis::Value>(),
                );
                if !matches!(ping.await, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}
