//! [`Conn`]: one multiplexed, self-reconnecting connection with a timeout
//! on every operation and a breaker that fails calls at once for a moment
//! after Redis failed (docs/redis.md#failure).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{Redactor, RedisConfig};
use crate::error::Error;

/// A cheap handle (clones share one connection).
#[derive(Clone)]
pub(crate) struct Conn {
    inner: Arc<Inner>,
}

struct Inner {
    manager: ConnectionManager,
    timeout: Duration,
    retry_interval_ms: u64,
    redactor: Redactor,
    epoch: Instant,
    /// Milliseconds since `epoch` until which calls fail at once; 0: closed.
    open_until: AtomicU64,
}

impl Conn {
    /// A connection to `config`'s Redis, made on first use (so a replica
    /// starts while Redis is down, and recovers when it is back).
    pub(crate) fn new(config: &RedisConfig) -> Result<Conn, Error> {
        let client = config.client()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout()))
            .set_response_timeout(Some(config.timeout()))
            // Our breaker paces the retries; the manager only tries once
            // more, so no call waits on a long backoff.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| Error::Config(config.redactor().describe(&e)))?;
        Ok(Conn {
            inner: Arc::new(Inner {
                manager,
                timeout: config.timeout(),
                retry_interval_ms: u64::try_from(config.retry_interval().as_millis())
                    .unwrap_or(u64::MAX),
                redactor: config.redactor().clone(),
                epoch: Instant::now(),
                open_until: AtomicU64::new(0),
            }),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this call may try Redis: the breaker is closed, or it has
    /// been open long enough and this call is the one that probes.
    fn may_try(&self) -> bool {
        let until = self.inner.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.elapsed_ms().max(1);
        now >= until
            && self
                .inner
                .open_until
                .compare_exchange(
                    until,
                    now.saturating_add(self.inner.retry_interval_ms),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    fn trip(&self) {
        let until = self
            .elapsed_ms()
            .max(1)
            .saturating_add(self.inner.retry_interval_ms);
        self.inner.open_until.store(until, Ordering::Release);
    }

    /// Runs `op` on the connection within the timeout. A dropped
    /// connection is retried once (the manager reconnects); failures to
    /// reach Redis open the breaker.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.may_try() {
            return Err(Error::Unavailable(
                "redis failed a moment ago; not retried yet".to_owned(),
            ));
        }
        let attempt = async {
            match op(self.inner.manager.clone()).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    op(self.inner.manager.clone()).await
                }
                other => other,
            }
        };
        let result = match tokio::time::timeout(self.inner.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                self.trip();
                return Err(Error::Unavailable(format!(
                    "no answer within {} ms",
                    self.inner.timeout.as_millis()
                )));
            }
        };
        match result {
            Ok(v) => {
                self.inner.open_until.store(0, Ordering::Release);
                Ok(v)
            }
            Err(e) => {
                let message = self.inner.redactor.describe(&e);
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                {
                    self.trip();
                    Err(Error::Unavailable(message))
                } else {
                    Err(Error::Protocol(message))
                }
            }
        }
    }
}
