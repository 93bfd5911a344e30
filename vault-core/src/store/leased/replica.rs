//! A [`LeasedStore`] as a registered lease holder, for stores that
//! replicas on several hosts share (`KeyStore::lease_holders`;
//! docs/replicas.md#when-a-replica-dies).
//!
//! Each lease carries a **cover**: the most its calls may have charged,
//! spent and hold together (`charged + spent + held`, cumulative since
//! the lease was taken), as the store has recorded it. A call is admitted
//! on a lease only if it fits under the cover, and only while this
//! holder's last heartbeat is younger than half of `stale_after` (by this
//! host's monotonic clock, counted from before the heartbeat was sent, so
//! it ends before the store — by its own clock — takes the holder for
//! dead). So whatever a replica dies holding, its leases owe at most their
//! cover: the others charge that and release the rest.
//!
//! Covers are written by heartbeats, never per call:
//! - the maintenance heartbeat ([`KeyStore::heartbeat`], every second or
//!   so) sets each lease's cover to what it holds now plus one **step**;
//! - a call that does not fit under its lease's cover (but fits in the
//!   lease) raises it in one heartbeat on its own path, as it would take a
//!   new lease.
//!
//! A step is `last want × max(factor / 4, 1) × growth`: growth doubles
//! while a line's covers are raised less than [`FAST_COVER_MS`] apart (up
//! to [`MAX_LEASE_GROWTH`]) and halves at each heartbeat otherwise, so a
//! busy line raises its cover about four times a second and an idle one
//! goes back to small steps: a step is about a quarter of a second of the
//! line's calls, never less than four calls. A cover is lowered in memory before the write
//! that lowers it, and raised in memory only once the write that raises it
//! returned; writes are serialised. The memory figure is therefore never
//! above the one stored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{KeyStore, LeasedStore, Line, LineKey, MAX_LEASE_GROWTH, lock_line};
use crate::money::Micros;
use crate::record::ReservationId;
use crate::store::journal::Record;
use crate::store::{DEFAULT_STALE_AFTER, LeaseHolders, StoreError};

/// A line whose covers are raised closer together than this takes bigger
/// cover steps.
pub const FAST_COVER_MS: u64 = 250;

/// This store as a lease holder: its id and whether it may admit calls.
#[derive(Debug)]
pub(super) struct Holder {
    id: String,
    stale_after: Duration,
    base: Instant,
    /// Nanoseconds after `base` until which leases admit calls (0: none).
    live_until: AtomicU64,
    /// Nanoseconds after `base` of the first heartbeat since the last one
    /// that failed (0: the last one failed, or none was sent yet).
    alive_since: AtomicU64,
    registered: AtomicBool,
    /// One cover write at a time (see the module docs).
    writes: tokio::sync::Mutex<()>,
}

impl Holder {
    fn new(stale_after: Duration) -> Holder {
        Holder {
            id: new_holder_id(),
            stale_after,
            base: Instant::now(),
            live_until: AtomicU64::new(0),
            alive_since: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// The id the store knows this holder by.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Whether leases may admit calls now.
    pub(super) fn live(&self) -> bool {
        nanos(self.base.elapsed()) < self.live_until.load(Ordering::Acquire)
    }

    /// A heartbeat sent at `sent` was recorded.
    fn heard(&self, sent: Instant) {
        let since = sent.saturating_duration_since(self.base);
        let until = since + self.stale_after / 2;
        self.live_until.store(nanos(until), Ordering::Release);
        let _ = self.alive_since.compare_exchange(
            0,
            nanos(since).max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// A heartbeat failed.
    fn failed(&self) {
        self.alive_since.store(0, Ordering::Release);
    }

    /// The store no longer knows this holder.
    fn lost(&self) {
        self.live_until.store(0, Ordering::Release);
        self.alive_since.store(0, Ordering::Release);
        self.registered.store(false, Ordering::Release);
    }

    /// Whether this holder's heartbeats have succeeded for `stale_after`
    /// without a failure: only then does it take others for dead. After
    /// an outage of the store that every replica saw, each waits that long
    /// once it is back, so that the others have beaten again meanwhile.
    fn may_close(&self) -> bool {
        let since = self.alive_since.load(Ordering::Acquire);
        since != 0 && nanos(self.base.elapsed()).saturating_sub(since) >= nanos(self.stale_after)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `host.pid.random`: unique among replicas, and says where one ran.
fn new_holder_id() -> String {
    use ring::rand::SecureRandom;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(char::is_ascii_graphic)
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let mut random = [0u8; 8];
    let nonce = match ring::rand::SystemRandom::new().fill(&mut random) {
        Ok(()) => u64::from_le_bytes(random),
        Err(_) => nanos(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        ),
    };
    format!("{host}.{}.{nonce:016x}", std::process::id())
}

impl Line {
    /// The cover step of this line (module docs).
    pub(super) fn cover_step(&self, factor: u64) -> Micros {
        Micros(
            self.last_want
                .0
                .saturating_mul((factor / 4).max(1))
                .saturating_mul(self.cover_growth.max(1)),
        )
    }

    /// A cover of this line is raised at `now`: grows the step if the last
    /// raise was recent.
    fn raised(&mut self, now: Instant) {
        let growth = self.cover_growth.max(1);
        let fast = Duration::from_millis(FAST_COVER_MS);
        self.cover_growth = match self.last_raise {
            Some(t) if now.saturating_duration_since(t) < fast => {
                (growth * 2).min(MAX_LEASE_GROWTH)
            }
            Some(_) => (growth / 2).max(1),
            None => growth,
        };
        self.last_raise = Some(now);
    }
}

/// A cover to record: the lease's line, id and new cover.
type Cover = (LineKey, ReservationId, Micros);

impl<S: KeyStore> LeasedStore<S> {
    /// Makes this store a holder when the inner store keeps a registry.
    pub(super) fn with_registry(mut self) -> Self {
        if self.inner.lease_holders().is_some() {
            self.holder = Some(Holder::new(DEFAULT_STALE_AFTER));
        }
        self
    }

    /// How long after its last heartbeat a replica is taken for dead and
    /// its leases closed (default [`DEFAULT_STALE_AFTER`], 5 s; every
    /// replica sharing the store must use the same). Leases admit calls
    /// only during the first half of it after each heartbeat, so the
    /// maintenance heartbeat must run well within that (every second). Only
    /// meaningful over a store with [`KeyStore::lease_holders`].
    pub fn with_stale_after(mut self, stale_after: Duration) -> Self {
        if let Some(h) = self.holder.as_mut() {
            h.stale_after = stale_after.max(Duration::from_millis(10));
        }
        self
    }

    /// The id this store is registered under as a lease holder, when the
    /// inner store keeps a registry of them.
    pub fn holder_id(&self) -> Option<&str> {
        self.holder.as_ref().map(Holder::id)
    }

    fn registry(&self) -> Option<(&Holder, &dyn LeaseHolders)> {
        Some((self.holder.as_ref()?, self.inner.lease_holders()?))
    }

    /// Whether a call of `want` on `line` needs a heartbeat first: this
    /// holder's last one is stale, or the line's current lease would take
    /// the call but for its cover.
    pub(super) fn needs_refresh(
        &self,
        key: &LineKey,
        line: &crate::record::BudgetLine,
        want: Micros,
        expires_at: crate::clock::UnixMillis,
    ) -> Result<bool, StoreError> {
        let Some(holder) = self.holder.as_ref() else {
            return Ok(false);
        };
        if !holder.live() {
            return Ok(true);
        }
        let Some(state) = self.line(key)? else {
            return Ok(false);
        };
        let s = lock_line(&state)?;
        Ok(s.leases.last().is_some_and(|lease| {
            !lease.retired
                && lease.reservation.line.limit == line.limit
                && expires_at <= lease.expires_at
                && lease.free() >= want
                && !lease.admits(want)
        }))
    }

    /// On a call's path, gate written: one heartbeat that also raises the
    /// cover of `key`'s current lease to take a call of `want`. When the
    /// store had taken this holder for dead, its leases are forgotten (the
    /// others closed them) and it registers again.
    pub(super) async fn refresh_for(&self, key: &LineKey, want: Micros) -> Result<(), StoreError> {
        let Some((_, registry)) = self.registry() else {
            return Ok(());
        };
        if self.beat(registry, Some((key, want))).await? {
            return Ok(());
        }
        self.forget_leases()?;
        if self.beat(registry, None).await? {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "this replica's registration was closed again at once".to_owned(),
            ))
        }
    }

    /// The maintenance heartbeat: records this holder alive and its covers,
    /// then closes dead holders' leases; returns how many were closed.
    pub(super) async fn beat_and_close(&self) -> Result<usize, StoreError> {
        let Some((_, registry)) = self.registry() else {
            return Ok(0);
        };
        self.decay_cover_growth()?;
        if !self.beat(registry, None).await? {
            let _gate = self.gate.write().await;
            self.forget_leases()?;
        }
        self.close_dead().await
    }

    /// Closes the leases of holders whose heartbeat stopped, once this
    /// holder's own heartbeats have succeeded for `stale_after`.
    pub(super) async fn close_dead(&self) -> Result<usize, StoreError> {
        match self.registry() {
            Some((holder, registry)) if holder.may_close() => {
                registry.close_dead(holder.stale_after).await
            }
            _ => Ok(0),
        }
    }

    /// Removes this holder from the registry (graceful shutdown).
    pub(super) async fn deregister(&self) -> Result<(), StoreError> {
        let Some((holder, registry)) = self.registry() else {
            return Ok(());
        };
        let _writes = holder.writes.lock().await;
        if holder.registered.load(Ordering::Acquire) {
            registry.deregister(holder.id()).await?;
            holder.lost();
        }
        Ok(())
    }

    /// One heartbeat (registering first if needed), setting every current
    /// lease's cover to what it holds plus a step (and `raise`'s line's to
    /// take its call too). `false` when the store no longer knows this
    /// holder.
    async fn beat(
        &self,
        registry: &dyn LeaseHolders,
        raise: Option<(&LineKey, Micros)>,
    ) -> Result<bool, StoreError> {
        let Some(holder) = self.holder.as_ref() else {
            return Ok(true);
        };
        let _writes = holder.writes.lock().await;
        let sent = Instant::now();
        let recorded = self.send_beat(holder, registry, raise, sent).await;
        match recorded {
            Ok(Some(covers)) => {
                self.apply_covers(&covers)?;
                holder.heard(sent);
                Ok(true)
            }
            Ok(None) => {
                holder.lost();
                Ok(false)
            }
            Err(e) => {
                holder.failed();
                Err(e)
            }
        }
    }

    /// Registers if needed and records the covers; the covers recorded, or
    /// `None` when the store no longer knows this holder.
    async fn send_beat(
        &self,
        holder: &Holder,
        registry: &dyn LeaseHolders,
        raise: Option<(&LineKey, Micros)>,
        sent: Instant,
    ) -> Result<Option<Vec<Cover>>, StoreError> {
        if !holder.registered.load(Ordering::Acquire) {
            registry.register(holder.id()).await?;
            holder.registered.store(true, Ordering::Release);
        }
        let covers = self.next_covers(raise, sent)?;
        let recorded: Vec<(ReservationId, Micros)> =
            covers.iter().map(|(_, id, c)| (*id, *c)).collect();
        if registry.record(holder.id(), &recorded).await? {
            Ok(Some(covers))
        } else {
            Ok(None)
        }
    }

    /// The covers to record, each already lowered in memory to at most it.
    fn next_covers(
        &self,
        raise: Option<(&LineKey, Micros)>,
        now: Instant,
    ) -> Result<Vec<Cover>, StoreError> {
        let mut covers = Vec::new();
        for (key, state) in self.all_lines()? {
            let mut s = lock_line(&state)?;
            let mut want = Micros::ZERO;
            if let Some((k, w)) = raise
                && *k == key
            {
                s.last_want = w;
                s.raised(now);
                want = w;
            }
            let step = s.cover_step(self.factor);
            let Some(lease) = s.leases.last_mut().filter(|l| !l.retired) else {
                continue;
            };
            let target = lease
                .reservation
                .amount
                .min(lease.basis().saturating_add(want).saturating_add(step));
            lease.cover = lease.cover.min(target);
            covers.push((key, lease.reservation.id, target));
        }
        Ok(covers)
    }

    /// Raises covers in memory to what was recorded.
    fn apply_covers(&self, covers: &[Cover]) -> Result<(), StoreError> {
        for (key, id, cover) in covers {
            let Some(state) = self.line(key)? else {
                continue;
            };
            let mut s = lock_line(&state)?;
            if let Some(lease) = s.leases.iter_mut().find(|l| l.reservation.id == *id) {
                lease.cover = *cover;
            }
        }
        Ok(())
    }

    /// Halves the cover step of lines whose covers were not raised lately.
    fn decay_cover_growth(&self) -> Result<(), StoreError> {
        let fast = Duration::from_millis(FAST_COVER_MS);
        for (_, state) in self.all_lines()? {
            let mut s = lock_line(&state)?;
            if s.last_raise.is_none_or(|t| t.elapsed() >= fast) {
                s.cover_growth = (s.cover_growth / 2).max(1);
            }
        }
        Ok(())
    }

    /// Drops every lease: the store took this holder for dead and closed
    /// them at their covers. Their calls settle as no-ops, like calls the
    /// store swept. Call with the gate written.
    fn forget_leases(&self) -> Result<(), StoreError> {
        let mut forgotten = 0usize;
        for (_, state) in self.all_lines()? {
            let mut s = lock_line(&state)?;
            for lease in s.leases.drain(..) {
                self.journal_after(&[Record::Done {
                    lease: lease.reservation.id.0,
                }]);
                forgotten += 1;
            }
            s.inner_remaining = None;
        }
        tracing::warn!(
            leases = forgotten,
            "this replica's heartbeat was late enough for the others to close its leases; taking new ones"
        );
        Ok(())
    }
}

impl<S: KeyStore> LeasedStore<S> {
    /// What the store would charge this replica's leases beyond what their
    /// calls spent and hold, were it to die now: for each lease, what it
    /// would be closed at (`min(amount, cover − charged)`) less what its
    /// calls spent and hold. Zero without a registry of holders. The bound
    /// of docs/replicas.md#when-a-replica-dies, for metrics and tests.
    pub fn exposure(&self) -> Result<Micros, StoreError> {
        if self.holder.is_none() {
            return Ok(Micros::ZERO);
        }
        let mut total = Micros::ZERO;
        for (_, state) in self.all_lines()? {
            let s = lock_line(&state)?;
            for lease in &s.leases {
                let closed_at = lease
                    .reservation
                    .amount
                    .min(lease.cover.saturating_sub(lease.charged));
                let owed = lease.spent.saturating_add(lease.held);
                total = total.saturating_add(closed_at.saturating_sub(owed));
            }
        }
        Ok(total)
    }
}
