//! [`RedisLimiter`]: vault-core's [`SharedLimiter`] on Redis
//! (docs/redis.md).
//!
//! - `admit` is one `EVALSHA` of `admit.lua` (an `EVAL` only when Redis lost
//!   its script cache, e.g. after a restart): every window of every key of
//!   the chain and its `max_parallel` slots, checked and counted at once.
//! - `peek` is one pipeline of reads (`GET` per window, `ZCOUNT` of live
//!   slots per `max_parallel`): it writes nothing.
//! - `record_tokens` and a slot's release are sent in the background after
//!   the call (fire and forget: lost if Redis is down then; a lost release
//!   frees the slot when its lease ends).
//! - A task renews the leases of this replica's live slots every third of
//!   a lease, in one pipeline.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use vault_core::clock::{SharedClock, SystemClock, UnixMillis};
use vault_core::key::KeyId;
use vault_core::policy::{
    ChainLimit, LimiterError, SharedAdmission, SharedLimiter, WindowBounds, WindowCounts,
};

use crate::config::RedisConfig;
use crate::conn::Conn;
use crate::error::Error;

/// Counters and slot sets live this long past their window's end (or
/// their last lease), by the clock of the replica that wrote them, so that
/// a replica whose clock is slightly behind still finds them
/// (docs/redis.md#clocks).
const GRACE_MS: i64 = 60_000;

/// Lua numbers are doubles: limits above this are the same as this.
const MAX_EXACT: u64 = 1 << 53;

/// Rate limits and `max_parallel` slots in Redis, shared by every replica
/// that uses the same Redis and key prefix. Cheap to clone.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    prefix: String,
    script: redis::Script,
    slots: Arc<Slots>,
    /// This process's part of every slot member: unique per limiter.
    replica: String,
    next_slot: AtomicU64,
    slot_lease_ms: i64,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.inner.prefix)
            .field("replica", &self.inner.replica)
            .field("slot_lease_ms", &self.inner.slot_lease_ms)
            .finish_non_exhaustive()
    }
}

/// This replica's live slots, for renewal: member → the sets holding it.
struct Slots {
    conn: Conn,
    live: Mutex<HashMap<String, Vec<String>>>,
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<String>>> {
        // Plain data: usable after a panic elsewhere.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A call's slots; dropping it releases them (in the background).
struct SlotGuard {
    slots: Arc<Slots>,
    member: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let Some(keys) = self.slots.lock().remove(&self.member) else {
            return;
        };
        // Outside a runtime the lease frees the slot instead.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.slots.conn.clone();
        let member = std::mem::take(&mut self.member);
        handle.spawn(async move {
            let result = conn
                .run(|mut c| {
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("ZREM").arg(key).arg(&member).ignore();
                    }
                    async move { pipe.exec_async(&mut c).await }
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "releasing a max_parallel slot failed; its lease will free it");
            }
        });
    }
}

fn clamp(limit: Option<u64>) -> u64 {
    limit.map_or(0, |l| l.min(MAX_EXACT))
}

fn random_u64() -> u64 {
    // std seeds each RandomState from the OS's randomness.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl RedisLimiter {
    /// A limiter on `config`'s Redis with the system clock. Connects on
    /// first use, so it starts while Redis is down. Needs a Tokio runtime
    /// (it starts the slot-renewal task).
    pub fn new(config: &RedisConfig) -> Result<RedisLimiter, Error> {
        RedisLimiter::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`RedisLimiter::new`], with the clock that renews slot leases
    /// (the engine's, so tests with a manual clock agree).
    pub fn with_clock(config: &RedisConfig, clock: SharedClock) -> Result<RedisLimiter, Error> {
        let conn = Conn::new(config)?;
        let slots = Arc::new(Slots {
            conn: conn.clone(),
            live: Mutex::new(HashMap::new()),
        });
        let lease = config.slot_lease();
        let slot_lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let renewal = tokio::spawn(renew_slots(
            Arc::downgrade(&slots),
            clock,
            lease / 3,
            slot_lease_ms,
        ));
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                conn,
                prefix: config.key_prefix().to_owned(),
                script: redis::Script::new(include_str!("admit.lua")),
                slots,
                replica: format!("{:016x}", random_u64()),
                next_slot: AtomicU64::new(0),
                slot_lease_ms,
                renewal,
            }),
        })
    }

    /// Checks that Redis answers (and loads the admission script), e.g. at
    /// startup.
    pub async fn ping(&self) -> Result<(), Error> {
        let script = self.inner.script.clone();
        self.inner
            .conn
            .run(|mut c| {
                let script = script.clone();
                async move {
                    redis::cmd("PING").query_async::<String>(&mut c).await?;
                    script.load_async(&mut c).await.map(|_| ())
                }
            })
            .await
    }

    /// The four window keys of `id` at `b`: minute, day, month, tokens.
    fn window_keys(&self, id: &KeyId, b: &WindowBounds) -> [String; 4] {
        let p = &self.inner.prefix;
        [
            format!("{p}rl:{id}:m:{}", b.minute.0),
            format!("{p}rl:{id}:d:{}", b.day.0),
            format!("{p}rl:{id}:mo:{}", b.month.0),
            format!("{p}rl:{id}:t:{}", b.minute.0),
        ]
    }

    fn slots_key(&self, id: &KeyId) -> String {
        format!("{}slots:{id}", self.inner.prefix)
    }

    /// Slots of this replica still held (not yet released), for tests and
    /// metrics.
    pub fn held_slots(&self) -> usize {
        self.inner.slots.lock().len()
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[async_trait]
impl SharedLimiter for RedisLimiter {
    async fn admit(
        &self,
        chain: &[ChainLimit<'_>],
        now: UnixMillis,
        shadow: bool,
    ) -> Result<SharedAdmission, LimiterError> {
        let b = WindowBounds::at(now);
        let member = format!(
            "{}:{}",
            self.inner.replica,
            self.inner.next_slot.fetch_add(1, Ordering::Relaxed)
        );
        let slot_expiry = now.0.saturating_add(self.inner.slot_lease_ms);
        let mut keys = Vec::with_capacity(chain.len() * 5);
        let mut args: Vec<String> = Vec::with_capacity(8 + chain.len() * 5);
        args.extend([
            now.0.to_string(),
            if shadow { "1" } else { "0" }.to_owned(),
            member.clone(),
            slot_expiry.to_string(),
            GRACE_MS.to_string(),
            b.minute.1.to_string(),
            b.day.1.to_string(),
            b.month.1.to_string(),
        ]);
        let mut slot_keys = Vec::new();
        for c in chain {
            keys.extend(self.window_keys(c.id, &b));
            let slots_key = self.slots_key(c.id);
            if c.max_parallel.is_some() {
                slot_keys.push(slots_key.clone());
            }
            keys.push(slots_key);
            args.extend(
                [
                    clamp(c.rate.requests_per_minute),
                    clamp(c.rate.requests_per_day),
                    clamp(c.rate.requests_per_month),
                    clamp(c.rate.tokens_per_minute),
                    u64::from(c.max_parallel.unwrap_or(0)),
                ]
                .map(|n| n.to_string()),
            );
        }
        let script = &self.inner.script;
        let reply: Vec<i64> = self
            .inner
            .conn
            .run(|mut c| {
                let mut invocation = script.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                for a in &args {
                    invocation.arg(a);
                }
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        if reply.len() != 3 + chain.len() * 5 {
            return Err(LimiterError::Backend(format!(
                "the admission script returned {} values for {} keys",
                reply.len(),
                chain.len()
            )));
        }
        let counts = reply[3..]
            .chunks_exact(5)
            .map(|c| WindowCounts {
                minute: to_u64(c[0]),
                day: to_u64(c[1]),
                month: to_u64(c[2]),
                tokens: to_u64(c[3]),
                in_flight: to_u64(c[4]),
            })
            .collect();
        let slots = (reply[2] == 1).then(|| {
            self.inner.slots.lock().insert(member.clone(), slot_keys);
            Box::new(SlotGuard {
                slots: Arc::clone(&self.inner.slots),
                member,
            }) as vault_core::policy::HeldSlots
        });
        Ok(SharedAdmission {
            counts,
            counted: reply[0] == 1,
            parallel_full: u32::try_from(reply[1]).ok().filter(|m| *m > 0),
            slots,
        })
    }

    async fn peek(
        &self,
        chain: &[ChainLimit<'_>],
        now: UnixMillis,
    ) -> Result<Vec<WindowCounts>, LimiterError> {
        let b = WindowBounds::at(now);
        let keys: Vec<String> = chain
            .iter()
            .flat_map(|c| self.window_keys(c.id, &b))
            .collect();
        // Live slots of the keys with a `max_parallel`: those whose lease
        // ends after `now` (what `admit.lua` counts, without removing the
        // expired ones: a peek writes nothing).
        let slot_keys: Vec<Option<String>> = chain
            .iter()
            .map(|c| c.max_parallel.map(|_| self.slots_key(c.id)))
            .collect();
        let live_slots = slot_keys.iter().flatten().count();
        // One pipeline, one round trip: a GET per window, a ZCOUNT per
        // `max_parallel`; every reply reads as an optional integer.
        let mut values: Vec<Option<u64>> = self
            .inner
            .conn
            .run(|mut c| {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("GET").arg(k);
                }
                for k in slot_keys.iter().flatten() {
                    pipe.cmd("ZCOUNT")
                        .arg(k)
                        .arg(format!("({}", now.0))
                        .arg("+inf");
                }
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        if values.len() != keys.len() + live_slots {
            return Err(LimiterError::Backend(format!(
                "the peek returned {} values for {} reads",
                values.len(),
                keys.len() + live_slots
            )));
        }
        let live: Vec<u64> = values
            .split_off(keys.len())
            .into_iter()
            .map(|v| v.unwrap_or(0))
            .collect();
        let mut live = live.into_iter();
        Ok(values
            .chunks_exact(4)
            .zip(&slot_keys)
            .map(|(v, slots)| WindowCounts {
                minute: v[0].unwrap_or(0),
                day: v[1].unwrap_or(0),
                month: v[2].unwrap_or(0),
                tokens: v[3].unwrap_or(0),
                in_flight: slots.as_ref().and_then(|_| live.next()).unwrap_or(0),
            })
            .collect())
    }

    fn record_tokens(&self, keys: &[KeyId], tokens: u64, now: UnixMillis) {
        if keys.is_empty() || tokens == 0 {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("record_tokens outside a runtime; the tokens are not counted");
            return;
        };
        let b = WindowBounds::at(now);
        let ttl = b.minute.1.saturating_sub(now.0).saturating_add(GRACE_MS);
        let names: Vec<String> = keys
            .iter()
            .map(|id| {
                let [_, _, _, t] = self.window_keys(id, &b);
                t
            })
            .collect();
        let conn = self.inner.conn.clone();
        handle.spawn(async move {
            let result = conn
                .run(|mut c| {
                    let mut pipe = redis::pipe();
                    for k in &names {
                        pipe.cmd("INCRBY").arg(k).arg(tokens).ignore();
                        pipe.cmd("PEXPIRE").arg(k).arg(ttl).ignore();
                    }
                    async move { pipe.exec_async(&mut c).await }
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "recording tokens per minute failed; they are not counted");
            }
        });
    }
}

/// Renews the leases of this replica's live slots every `every`, until the
/// limiter is dropped.
async fn renew_slots(
    slots: Weak<Slots>,
    clock: SharedClock,
    every: std::time::Duration,
    lease_ms: i64,
) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(slots) = slots.upgrade() else { return };
        let live: Vec<(String, Vec<String>)> = slots
            .lock()
            .iter()
            .map(|(m, k)| (m.clone(), k.clone()))
            .collect();
        if live.is_empty() {
            continue;
        }
        let expiry = clock.now().0.saturating_add(lease_ms);
        let result = slots
            .conn
            .run(|mut c| {
                let mut pipe = redis::pipe();
                for (member, keys) in &live {
                    for k in keys {
                        // XX: never bring back a slot released meanwhile.
                        pipe.cmd("ZADD")
                            .arg(k)
                            .arg("XX")
                            .arg(expiry)
                            .arg(member)
                            .ignore();
                        pipe.cmd("PEXPIRE")
                            .arg(k)
                            .arg(lease_ms.saturating_add(GRACE_MS))
                            .ignore();
                    }
                }
                async move { pipe.exec_async(&mut c).await }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, slots = live.len(), "renewing max_parallel slot leases failed");
        }
    }
}
