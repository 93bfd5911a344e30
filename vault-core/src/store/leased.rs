//! [`LeasedStore`]: budget reservations in memory against a lease held in
//! the store, so that a call's reservation is not a store write.
//!
//! For each budget line this process spends on, the decorator holds a
//! **lease**: one ordinary reservation in the inner store, sized
//! `min(factor × growth × want, max(remaining / 4, want))` when it is taken
//! (never more than the store grants). Calls then
//! reserve against the lease's free part in memory (a `std::sync::Mutex` per
//! line, never held across an await) and settle back into it: the unspent
//! part of a call returns to the lease, its cost adds to the lease's `spent`.
//!
//! # How big a lease is
//! `growth` starts at 1 for each line. A line whose previous lease was taken
//! less than [`FAST_LEASE_MS`] before doubles it (up to [`MAX_LEASE_GROWTH`]);
//! a line that took longer halves it. So a key under heavy load takes a few
//! leases a second, not one per `factor` calls, and a quiet key goes back to
//! small leases. A lease never asks for more than a quarter of what the line
//! was last known to have left (but always at least the call's `want`), so
//! a busy process does not sit on the budget other processes share. A
//! line's first lease asks the store what is left first (one read), so it
//! too is sized to demand, never the whole remaining budget.
//!
//! # Why the cap still holds
//! A lease is held in the inner store exactly like a call's reservation, so
//! every other process sharing the store sees it as reserved and can never
//! spend it; this process grants calls only from a lease's free part. The
//! total held and spent on a line therefore never exceeds what the store
//! would have allowed call by call.
//!
//! # When the store is written
//! - A call that the current lease cannot cover in full (or whose expiry is
//!   past the lease's, or whose line has a new limit) first gives back to
//!   the store everything the line's leases hold but no call uses: leases
//!   with no call in flight are settled at what they spent; the others are
//!   settled in part ([`KeyStore::settle_part`]: their spend is charged,
//!   they keep holding exactly what their calls hold) and take no new
//!   calls. Then one new lease is reserved. So the store decides on the
//!   line's true remaining, and a call is refused, or granted less than it
//!   wants, exactly when the bare store would have done so.
//! - A retired lease is settled when its last call settles.
//! - [`sweep`](KeyStore::sweep) first settles dead processes' leases (see
//!   Crashes), then gives back every line's leases as above (idle ones
//!   settled, busy ones keep only what their calls hold), before the
//!   store's own sweep closes expired children's carve-outs;
//!   [`revoke_key`](KeyStore::revoke_key) does the same first: a closed
//!   carve-out keeps held on the parent exactly what the child's calls
//!   still hold (docs in `budget.rs`), and each lease, as its last call
//!   settles, passes its cost on to the parent. An `insert_key` that carves
//!   out of a line first gives back that line's unused lease.
//! - [`LeasedStore::flush`] settles every lease (graceful shutdown calls it
//!   once every call has settled).
//!
//! # What reads see
//! [`budget_usage`](KeyStore::budget_usage) combines the store's view with
//! the leases': `settled` adds what the leases spent, `reserved` counts what
//! calls hold in place of the leases themselves. Keys' `spend` adds what the
//! leases spent. A gate (a `tokio::sync::RwLock`, written around every
//! store call that changes a lease, read around these reads) keeps the two
//! views consistent. Within this process the figures are exact. A second
//! process sharing the store sees this process's spend only when a lease
//! is settled or charged (on replacement, at a sweep, on shutdown), and sees
//! the lease's free part as reserved.
//!
//! The remaining budget returned with a reservation
//! ([`reserve_reporting`](KeyStore::reserve_reporting)) is the store's
//! figure as of the lease, plus what the leases have free: exact within
//! this process, stale by what other processes spent since.
//!
//! # Crashes
//! With [`with_journal`](LeasedStore::with_journal) (as `vaultgate serve`
//! runs), every lease and call is appended to this process's lease journal
//! (one small `write(2)` per reservation and one per settled batch, no fsync:
//! a killed process loses no page-cache write) under an OS lock held for
//! the process's life (see `journal.rs`). Whoever next finds the lock free
//! (the next start, or any process's [`sweep`](KeyStore::sweep)) settles
//! each of the dead process's leases at once at what its calls spent plus
//! what its calls in flight hold (those may have reached the provider), so
//! the budget left is the cap less settled spend less the lost calls'
//! reservations. A lease taken in the store but not yet journaled when the
//! process died (a window of one store call), a damaged journal's unread
//! leases, and any lease of a process without a journal fall back to the
//! store's sweep, which charges a lease **in full** once it expires (the
//! expiry of the call that took it plus the lease window): never less
//! than was spent. A lease accepts only calls that expire before it does,
//! so the store never sweeps a live lease of a running process.
//!
//! # Replicas on several hosts
//! A journal is read only by processes on its host. Over a store that keeps
//! a registry of lease holders ([`KeyStore::lease_holders`], PostgreSQL),
//! this store registers as a holder, tags each lease with its id and a
//! *cover* (the most the lease's calls may have charged, spent and held),
//! admits calls only under a lease's recorded cover and while its last
//! heartbeat ([`KeyStore::heartbeat`], run every second by the
//! maintenance) is fresh, and closes other holders' leases once their
//! heartbeat is older than [`with_stale_after`](LeasedStore::with_stale_after)
//! (5 s): each is charged its cover — what its calls spent and hold, plus
//! at most a quarter of a second or so of its calls — and the rest
//! released. See `leased/replica.rs` and docs/replicas.md.
//!
//! # Reservation ids
//! Calls' reservations get ids from `2^63` up (one counter per store), kept
//! apart from the inner store's ids (SQLite row ids and `MemoryStore`'s
//! counter stay below `2^63`); ids below are the inner store's and are
//! passed through (a zero reservation is always the inner store's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::budget::reservable;
use super::journal::{Journal, Record, recover_lease_journals};
use super::{KeyPage, KeyPageQuery, KeyStatusFilter, KeyStore, StoreError, page_of};

mod replica;

use crate::clock::UnixMillis;
use crate::crypto::Sealed;
use crate::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::record::{
    BudgetLine, BudgetUsage, KeyRecord, ProviderKeyRecord, Reservation, ReservationId, Settlement,
    UsageFilter, UsageRecord,
};
pub use replica::FAST_COVER_MS;
use replica::Holder;

/// How many times a call's `want` a new lease asks for.
pub const DEFAULT_LEASE_FACTOR: u64 = 16;

/// How long after the call that took it a lease accepts calls (its expiry
/// in the store is that call's expiry plus this).
pub const DEFAULT_LEASE_WINDOW: Duration = Duration::from_secs(30);

/// A line whose leases are taken closer together than this takes bigger ones.
pub const FAST_LEASE_MS: i64 = 1_000;

/// The most a lease grows beyond `factor × want`.
pub const MAX_LEASE_GROWTH: u64 = 256;

/// A sweep compacts the lease journal once this much was appended to it.
pub const JOURNAL_COMPACT_BYTES: u64 = 1 << 20;

/// The first id of calls' reservations; the inner store's stay below.
const LOCAL_IDS: u64 = 1 << 63;

/// A line as the inner store keys its money: (key, period start).
type LineKey = (KeyId, UnixMillis);

/// One line's leases, shared between the map and the calls on it.
type SharedLine = Arc<Mutex<Line>>;

/// Lines by key, then period: a key's lines are found without a scan.
type LinesByKey = HashMap<KeyId, HashMap<UnixMillis, SharedLine>>;

/// A [`KeyStore`] that reserves budgets in memory against leases held in
/// `S` (see the module documentation in `vault-core/src/store/leased.rs`);
/// everything else goes straight to `S`.
///
/// ```
/// use vault_core::store::{KeyStore, LeasedStore, MemoryStore};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = LeasedStore::new(MemoryStore::new()).with_lease_factor(8);
/// assert_eq!(store.get_meta("schema").await.unwrap(), None);
/// store.flush().await.unwrap();
/// # });
/// ```
pub struct LeasedStore<S> {
    inner: S,
    factor: u64,
    window_ms: i64,
    lines: Mutex<LinesByKey>,
    /// Written around every inner-store call that takes, charges or settles
    /// a lease (and around the local change that goes with it); read around
    /// reads that combine the store's view with the leases'.
    gate: tokio::sync::RwLock<()>,
    next_id: AtomicU64,
    /// This process's lease journal and the directory of every process's
    /// (see [`with_journal`](Self::with_journal)).
    journal: Option<(Journal, PathBuf)>,
    /// This store as a registered lease holder, when the inner store keeps
    /// a registry of them (module docs, "Replicas on several hosts").
    holder: Option<Holder>,
}

impl<S> std::fmt::Debug for LeasedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedStore")
            .field("factor", &self.factor)
            .field("window_ms", &self.window_ms)
            .finish_non_exhaustive()
    }
}

/// The leases of one line; at most one (the last) is not retired.
#[derive(Debug, Default)]
struct Line {
    leases: Vec<Lease>,
    /// What the inner store said the line had left after the last lease was
    /// taken, adjusted by what this store gave back since (signed: a lease
    /// may be settled above its amount).
    inner_remaining: Option<i128>,
    /// When the last lease was taken.
    last_taken: Option<UnixMillis>,
    /// The multiplier of the next lease (see the module docs); 0 means 1.
    growth: u64,
    /// The cover step's multiplier (replicas only; see `replica.rs`).
    cover_growth: u64,
    /// When a cover was last raised for a call (replicas only).
    last_raise: Option<std::time::Instant>,
    /// The last call's `want` (replicas only: sizes the cover step).
    last_want: Micros,
}

/// One lease: a reservation in the inner store and the calls held on it.
#[derive(Debug)]
struct Lease {
    /// As held in the inner store (its `amount` is what the store holds).
    reservation: Reservation,
    expires_at: UnixMillis,
    /// Spent by settled calls and not yet charged to the inner store.
    spent: Micros,
    /// Held by calls in flight (the sum of `open`).
    held: Micros,
    open: HashMap<u64, Hold>,
    /// Takes no new calls; settled when its last call settles.
    retired: bool,
    /// Charged so far by partial settlements (cumulative, for the cover).
    charged: Micros,
    /// The most `charged + spent + held` may reach: what the store has
    /// recorded as this lease's cover (replicas; never above the recorded
    /// figure), or `u64::MAX` without a registry of holders.
    cover: Micros,
}

/// A call's reservation on a lease.
#[derive(Debug, Clone, Copy)]
struct Hold {
    amount: Micros,
    expires_at: UnixMillis,
}

impl Lease {
    fn free(&self) -> Micros {
        self.reservation
            .amount
            .saturating_sub(self.spent.saturating_add(self.held))
    }

    fn idle(&self) -> bool {
        self.open.is_empty()
    }

    /// What the cover bounds: charged, spent and held together.
    fn basis(&self) -> Micros {
        self.charged
            .saturating_add(self.spent)
            .saturating_add(self.held)
    }

    /// Whether a call of `want` fits in the free part and under the cover.
    fn admits(&self, want: Micros) -> bool {
        self.free() >= want && self.basis().saturating_add(want) <= self.cover
    }

    fn settlement(&self) -> Settlement {
        Settlement {
            reservation: self.reservation.clone(),
            actual: self.spent,
        }
    }
}

impl Line {
    /// Sums over the leases: (amount held in the store, spent, held by calls).
    fn totals(&self) -> (Micros, Micros, Micros) {
        self.leases.iter().fold(
            (Micros::ZERO, Micros::ZERO, Micros::ZERO),
            |(a, s, h), l| {
                (
                    a.saturating_add(l.reservation.amount),
                    s.saturating_add(l.spent),
                    h.saturating_add(l.held),
                )
            },
        )
    }

    /// What the line has left as this process sees it, if known.
    fn remaining(&self) -> Option<Micros> {
        let (amount, spent, held) = self.totals();
        let r =
            self.inner_remaining? + i128::from(amount.0) - i128::from(spent.0) - i128::from(held.0);
        Some(Micros(u64::try_from(r.max(0)).unwrap_or(u64::MAX)))
    }

    /// What the leases have free.
    fn free(&self) -> Micros {
        self.leases
            .iter()
            .fold(Micros::ZERO, |acc, l| acc.saturating_add(l.free()))
    }

    /// What the next lease asks for, taken at `now` for a call of `want`
    /// (see the module docs); updates the line's growth.
    fn next_wish(&mut self, want: Micros, factor: u64, now: UnixMillis) -> Micros {
        let growth = self.growth.max(1);
        self.growth = match self.last_taken {
            Some(t) if now.0.saturating_sub(t.0) < FAST_LEASE_MS => {
                (growth * 2).min(MAX_LEASE_GROWTH)
            }
            Some(_) => (growth / 2).max(1),
            None => 1,
        };
        self.last_taken = Some(now);
        let base = want.0.saturating_mul(factor);
        let grown = base.saturating_mul(self.growth);
        let share = self.inner_remaining.map_or(u64::MAX, |r| {
            u64::try_from(r.max(0) / 4).unwrap_or(u64::MAX)
        });
        Micros(grown.min(share.max(want.0)))
    }

    fn adjust_remaining(&mut self, by: i128) {
        if let Some(r) = self.inner_remaining.as_mut() {
            *r += by;
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::Backend("lease lock poisoned".to_owned())
}

fn lock_line(line: &Mutex<Line>) -> Result<MutexGuard<'_, Line>, StoreError> {
    line.lock().map_err(|_| poisoned())
}

impl<S: KeyStore> LeasedStore<S> {
    /// Leases over `inner`, with the default factor and window.
    pub fn new(inner: S) -> Self {
        LeasedStore {
            inner,
            factor: DEFAULT_LEASE_FACTOR,
            window_ms: i64::try_from(DEFAULT_LEASE_WINDOW.as_millis()).unwrap_or(i64::MAX),
            lines: Mutex::new(HashMap::new()),
            gate: tokio::sync::RwLock::new(()),
            next_id: AtomicU64::new(LOCAL_IDS),
            journal: None,
            holder: None,
        }
        .with_registry()
    }

    /// Journals this store's leases in a new file in `dir` (locked for the
    /// store's life), so that if the process dies they are settled at what
    /// their calls spent and hold, not in full (module docs, "Crashes").
    /// Every store sharing the inner store should use the same `dir`; call
    /// [`recover`](Self::recover) once open ([`sweep`](KeyStore::sweep)
    /// recovers too).
    pub fn with_journal(mut self, dir: &Path) -> Result<Self, StoreError> {
        self.journal = Some((Journal::create(dir)?, dir.to_owned()));
        Ok(self)
    }

    /// Settles the leases of dead processes' journals (see
    /// [`recover_lease_journals`]); returns how many. A no-op without a
    /// journal.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        match &self.journal {
            Some((_, dir)) => recover_lease_journals(&self.inner, dir).await,
            None => Ok(0),
        }
    }

    /// Starts a new generation of the lease journal holding only what the
    /// leases hold now, and deletes the old one (a sweep does it once the
    /// journal passes [`JOURNAL_COMPACT_BYTES`]). A no-op without a journal.
    pub async fn compact_journal(&self) -> Result<(), StoreError> {
        let _gate = self.gate.write().await;
        self.compact_locked()
    }

    /// [`compact_journal`](Self::compact_journal) with the gate written.
    /// Every line is locked meanwhile, so no record is written between the
    /// snapshot and the switch to the new file.
    fn compact_locked(&self) -> Result<(), StoreError> {
        let Some((journal, _)) = &self.journal else {
            return Ok(());
        };
        let lines = self.all_lines()?;
        let guards = lines
            .iter()
            .map(|(_, l)| lock_line(l))
            .collect::<Result<Vec<_>, _>>()?;
        let mut records = Vec::new();
        for line in &guards {
            for lease in &line.leases {
                let id = lease.reservation.id.0;
                records.push(Record::Lease {
                    id,
                    line: &lease.reservation.line,
                    amount: lease.reservation.amount,
                });
                if lease.spent > Micros::ZERO {
                    // What settled calls spent, as one settled call.
                    let spent = self.next_id.fetch_add(1, Ordering::Relaxed);
                    records.push(Record::Hold {
                        id: spent,
                        lease: id,
                        amount: Micros::ZERO,
                    });
                    records.push(Record::Settled {
                        id: spent,
                        actual: lease.spent,
                    });
                }
                for (&hold, h) in &lease.open {
                    records.push(Record::Hold {
                        id: hold,
                        lease: id,
                        amount: h.amount,
                    });
                }
            }
        }
        journal.compact(&records)
    }

    /// Journals `records` (before the caller's change is visible).
    fn journal(&self, records: &[Record<'_>]) -> Result<(), StoreError> {
        match &self.journal {
            Some((j, _)) => j.write(records),
            None => Ok(()),
        }
    }

    /// Journals `records` after a change already made: a failure is logged
    /// (a crash then charges more than was spent, never less).
    fn journal_after(&self, records: &[Record<'_>]) {
        if let Err(e) = self.journal(records) {
            tracing::warn!(error = %e, "lease journal write failed");
        }
    }

    /// How many times a call's `want` a new lease asks for (default 16; 1
    /// makes every call that does not fit the current lease a store write).
    pub fn with_lease_factor(mut self, factor: u64) -> Self {
        self.factor = factor.max(1);
        self
    }

    /// How long after the call that took it a lease accepts calls (default
    /// 30 s). Longer means fewer leases; a crashed process's leases are
    /// charged this much later.
    pub fn with_lease_window(mut self, window: Duration) -> Self {
        self.window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// The inner store.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Settles every lease with no call in flight at what it spent, and
    /// charges the others' spend (they keep holding what their calls hold).
    /// Call on shutdown once every call has settled: then nothing is left
    /// held in the store.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _gate = self.gate.write().await;
        self.flush_all().await
    }

    fn lines(&self) -> Result<MutexGuard<'_, LinesByKey>, StoreError> {
        self.lines.lock().map_err(|_| poisoned())
    }

    fn line(&self, (key, period): &LineKey) -> Result<Option<SharedLine>, StoreError> {
        Ok(self.lines()?.get(key).and_then(|l| l.get(period)).cloned())
    }

    /// The line, made empty if it is new.
    fn line_or_new(&self, (key, period): &LineKey) -> Result<SharedLine, StoreError> {
        Ok(self
            .lines()?
            .entry(key.clone())
            .or_default()
            .entry(*period)
            .or_default()
            .clone())
    }

    fn all_lines(&self) -> Result<Vec<(LineKey, SharedLine)>, StoreError> {
        Ok(self
            .lines()?
            .iter()
            .flat_map(|(k, periods)| {
                periods
                    .iter()
                    .map(|(p, line)| ((k.clone(), *p), line.clone()))
            })
            .collect())
    }

    /// Grants `want` from the line's current lease if it covers all of it.
    fn reserve_locally(
        &self,
        line: &BudgetLine,
        want: Micros,
        expires_at: UnixMillis,
    ) -> Result<Option<(Reservation, Option<Micros>)>, StoreError> {
        let Some(shared) = self.line(&(line.key.clone(), line.period_start))? else {
            return Ok(None);
        };
        if self.holder.as_ref().is_some_and(|h| !h.live()) {
            return Ok(None); // a heartbeat first (replica.rs)
        }
        let mut state = lock_line(&shared)?;
        let Some(lease) = state.leases.last_mut() else {
            return Ok(None);
        };
        if lease.retired
            || lease.reservation.line.limit != line.limit
            || expires_at > lease.expires_at
            || !lease.admits(want)
        {
            return Ok(None);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lease_id = lease.reservation.id.0;
        lease.open.insert(
            id,
            Hold {
                amount: want,
                expires_at,
            },
        );
        lease.held = lease.held.saturating_add(want);
        let remaining = state.remaining();
        drop(state);
        // Journaled before the reservation is returned (so before the call
        // can reach the provider), but outside the line's lock: calls on one
        // line do not queue behind each other's write(2). Replay keys holds
        // by id, so the order against other records does not matter, and a
        // compaction (which holds every line's lock) either saw this hold in
        // its snapshot or happens after this write.
        let hold = Record::Hold {
            id,
            lease: lease_id,
            amount: want,
        };
        if let Err(e) = self.journal(&[hold]) {
            let mut state = lock_line(&shared)?;
            if let Some(lease) = state
                .leases
                .iter_mut()
                .find(|l| l.reservation.id.0 == lease_id)
                && let Some(h) = lease.open.remove(&id)
            {
                lease.held = lease.held.saturating_sub(h.amount);
            }
            return Err(e);
        }
        let reservation = Reservation {
            id: ReservationId(id),
            line: line.clone(),
            amount: want,
        };
        Ok(Some((reservation, remaining)))
    }

    /// Gives back to the inner store what the line's leases hold but no call
    /// uses, and charges what they spent: idle leases are settled, busy ones
    /// settled in part and retired. Call with the gate written.
    async fn release_line(&self, key: &LineKey) -> Result<(), StoreError> {
        let Some(state) = self.line(key)? else {
            return Ok(());
        };
        // (settlement, what was kept) per busy lease given back in part.
        let mut parts = Vec::new();
        let idle: Vec<Lease> = {
            let mut s = lock_line(&state)?;
            let (idle, busy): (Vec<Lease>, Vec<Lease>) = s.leases.drain(..).partition(Lease::idle);
            s.leases = busy;
            for lease in &mut s.leases {
                lease.retired = true;
                if lease.spent > Micros::ZERO || lease.free() > Micros::ZERO {
                    parts.push((lease.settlement(), lease.held));
                    lease.reservation.amount = lease.held;
                    lease.charged = lease.charged.saturating_add(lease.spent);
                    lease.spent = Micros::ZERO;
                }
            }
            idle
        };
        self.settle_leases(&state, idle).await?;
        self.settle_parts(&state, parts).await
    }

    /// Settles busy leases in part in the inner store: each `(settlement,
    /// keep)` was already applied locally (amount lowered to `keep`, spent
    /// cleared) and is undone if the store fails. Call with the gate written.
    async fn settle_parts(
        &self,
        state: &Mutex<Line>,
        parts: Vec<(Settlement, Micros)>,
    ) -> Result<(), StoreError> {
        for (settlement, keep) in parts {
            let result = self.inner.settle_part(&settlement, keep).await;
            let mut s = lock_line(state)?;
            let id = settlement.reservation.id;
            let Some(pos) = s.leases.iter().position(|l| l.reservation.id == id) else {
                continue;
            };
            match result {
                Ok(true) => {
                    self.journal_after(&[Record::Charged {
                        lease: id.0,
                        charged: settlement.actual,
                        keep,
                    }]);
                    let given_back = i128::from(settlement.reservation.amount.0)
                        - i128::from(keep.0)
                        - i128::from(settlement.actual.0);
                    s.adjust_remaining(given_back);
                }
                // Swept by another process: charged in full there, so its
                // calls settle as no-ops, like the store's own swept ones.
                Ok(false) => {
                    s.leases.remove(pos);
                    self.journal_after(&[Record::Done { lease: id.0 }]);
                }
                Err(e) => {
                    let lease = &mut s.leases[pos];
                    lease.reservation.amount = settlement.reservation.amount;
                    lease.spent = lease.spent.saturating_add(settlement.actual);
                    lease.charged = lease.charged.saturating_sub(settlement.actual);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Settles leases taken off `state` (idle ones) in the inner store,
    /// putting them back if that fails. Call with the gate written.
    async fn settle_leases(
        &self,
        state: &Mutex<Line>,
        leases: Vec<Lease>,
    ) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let settlements: Vec<Settlement> = leases.iter().map(Lease::settlement).collect();
        let result = self.inner.settle(&settlements).await;
        let mut s = lock_line(state)?;
        match result {
            Ok(()) => {
                for st in &settlements {
                    self.journal_after(&[Record::Done {
                        lease: st.reservation.id.0,
                    }]);
                    s.adjust_remaining(
                        i128::from(st.reservation.amount.0) - i128::from(st.actual.0),
                    );
                }
                Ok(())
            }
            Err(e) => {
                s.leases.splice(0..0, leases);
                Err(e)
            }
        }
    }

    /// [`release_line`](Self::release_line) on every line. Call with the
    /// gate written.
    async fn release_all(&self) -> Result<(), StoreError> {
        let mut first_error = None;
        for (key, _) in self.all_lines()? {
            if let Err(e) = self.release_line(&key).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Settles every idle lease and charges the busy ones' spend, keeping
    /// them (and their free part) as they are. Call with the gate written.
    async fn flush_all(&self) -> Result<(), StoreError> {
        let mut first_error = None;
        for (_, state) in self.all_lines()? {
            let mut parts = Vec::new();
            let idle: Vec<Lease> = {
                let mut s = lock_line(&state)?;
                let (idle, busy): (Vec<Lease>, Vec<Lease>) =
                    s.leases.drain(..).partition(Lease::idle);
                s.leases = busy;
                for lease in &mut s.leases {
                    if lease.spent > Micros::ZERO {
                        // Calls in flight stay covered even past an overdraw.
                        let keep = lease
                            .reservation
                            .amount
                            .saturating_sub(lease.spent)
                            .max(lease.held);
                        parts.push((lease.settlement(), keep));
                        lease.reservation.amount = keep;
                        lease.charged = lease.charged.saturating_add(lease.spent);
                        lease.spent = Micros::ZERO;
                    }
                }
                idle
            };
            if let Err(e) = self.settle_leases(&state, idle).await {
                first_error.get_or_insert(e);
            }
            if let Err(e) = self.settle_parts(&state, parts).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// What the leases of `key`'s lines spent and the store has not been
    /// charged yet.
    fn unsettled_spend(&self, key: &KeyId) -> Result<Micros, StoreError> {
        let lines: Vec<SharedLine> = match self.lines()?.get(key) {
            Some(periods) => periods.values().cloned().collect(),
            None => return Ok(Micros::ZERO),
        };
        let mut total = Micros::ZERO;
        for state in lines {
            total = total.saturating_add(lock_line(&state)?.totals().1);
        }
        Ok(total)
    }

    /// Whether any line holds spend charged here but not yet settled in
    /// the inner store.
    fn has_unsettled_spend(&self) -> Result<bool, StoreError> {
        for (_, state) in self.all_lines()? {
            if lock_line(&state)?.totals().1 > Micros::ZERO {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn with_unsettled_spend(&self, mut key: KeyRecord) -> Result<KeyRecord, StoreError> {
        key.spend = key.spend.saturating_add(self.unsettled_spend(&key.id)?);
        Ok(key)
    }
}

#[async_trait]
impl<S: KeyStore> KeyStore for LeasedStore<S> {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        let Some((line, _)) = carve else {
            return self.inner.insert_key(key, None).await;
        };
        // The carve-out is decided on the line's true remaining.
        let _gate = self.gate.write().await;
        self.release_line(&(line.key.clone(), line.period_start))
            .await?;
        self.inner.insert_key(key, carve).await
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let _gate = self.gate.read().await;
        match self.inner.find_by_hash(hash).await? {
            Some(k) => self.with_unsettled_spend(k).map(Some),
            None => Ok(None),
        }
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let _gate = self.gate.read().await;
        match self.inner.get_key(id).await? {
            Some(k) => self.with_unsettled_spend(k).map(Some),
            None => Ok(None),
        }
    }

    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let _gate = self.gate.read().await;
        let keys = self.inner.list_keys(project).await?;
        let mut spent: HashMap<KeyId, Micros> = HashMap::new();
        for ((k, _), state) in self.all_lines()? {
            let s = spent.entry(k).or_default();
            *s = s.saturating_add(lock_line(&state)?.totals().1);
        }
        Ok(keys
            .into_iter()
            .map(|mut k| {
                if let Some(s) = spent.get(&k.id) {
                    k.spend = k.spend.saturating_add(*s);
                }
                k
            })
            .collect())
    }

    async fn list_projects(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_projects().await
    }

    async fn list_keys_with_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let _gate = self.gate.read().await;
        let mut keys = self.inner.list_keys_with_provider_keys(project).await?;
        for k in &mut keys {
            k.spend = k.spend.saturating_add(self.unsettled_spend(&k.id)?);
        }
        Ok(keys)
    }

    async fn list_children(&self, parent: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let _gate = self.gate.read().await;
        let mut keys = self.inner.list_children(parent).await?;
        for k in &mut keys {
            k.spend = k.spend.saturating_add(self.unsettled_spend(&k.id)?);
        }
        Ok(keys)
    }

    async fn list_keys_page(&self, query: &KeyPageQuery) -> Result<KeyPage, StoreError> {
        // Budget exhaustion counts what leases charged but the store has not
        // settled yet; while any such spend exists, those filters are
        // answered over every key (as `list_keys` reports them).
        let by_spend = matches!(
            query.status,
            Some(KeyStatusFilter::Active | KeyStatusFilter::BudgetExhausted)
        );
        if by_spend && self.has_unsettled_spend()? {
            let keys = self.list_keys(query.project.as_deref()).await?;
            return Ok(page_of(keys, query));
        }
        let _gate = self.gate.read().await;
        let mut page = self.inner.list_keys_page(query).await?;
        for k in &mut page.keys {
            k.spend = k.spend.saturating_add(self.unsettled_spend(&k.id)?);
        }
        Ok(page)
    }

    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
        // Carve-outs are settled at the children's spend as the store has
        // it, and keep held what the leases' calls hold, no more.
        let _gate = self.gate.write().await;
        self.release_all().await?;
        self.inner.revoke_key(id, at).await
    }

    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError> {
        self.inner
            .rotate_key(id, new_hash, new_prefix, grace_until)
            .await
    }

    async fn insert_provider_key(&self, key: &ProviderKeyRecord) -> Result<(), StoreError> {
        self.inner.insert_provider_key(key).await
    }

    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        self.inner.get_provider_key(id).await
    }

    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        self.inner.list_provider_keys(project).await
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError> {
        self.inner.remove_provider_key(id).await
    }

    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError> {
        self.inner.replace_sealed(id, expected, new).await
    }

    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        if want == Micros::ZERO {
            // Always fits; the inner store's, so that its cost is charged.
            return self
                .inner
                .reserve_reporting(line, want, at_least, now, expires_at)
                .await;
        }
        if let Some(granted) = self.reserve_locally(line, want, expires_at)? {
            return Ok(granted);
        }
        let _gate = self.gate.write().await;
        if let Some(granted) = self.reserve_locally(line, want, expires_at)? {
            return Ok(granted);
        }
        let key = (line.key.clone(), line.period_start);
        if self.needs_refresh(&key, line, want, expires_at)? {
            // A stale heartbeat, or a cover too low for this call: one
            // heartbeat raising the cover may be all it takes (replica.rs).
            self.refresh_for(&key, want).await?;
            if let Some(granted) = self.reserve_locally(line, want, expires_at)? {
                return Ok(granted);
            }
        }
        self.release_line(&key).await?;
        let known = self
            .line(&key)?
            .map(|state| lock_line(&state).map(|s| s.inner_remaining.is_some()))
            .transpose()?
            .unwrap_or(false);
        if !known {
            // A first lease is sized to what is left, never all of it.
            let left = self
                .inner
                .budget_usage(line, now)
                .await?
                .remaining(line.limit);
            let state = self.line_or_new(&key)?;
            let mut state = lock_line(&state)?;
            if state.inner_remaining.is_none() {
                state.inner_remaining = Some(i128::from(left.0));
            }
        }
        let (wish, cover) = {
            let state = self.line_or_new(&key)?;
            let mut state = lock_line(&state)?;
            state.last_want = want;
            let cover = want.saturating_add(state.cover_step(self.factor));
            (state.next_wish(want, self.factor, now), cover)
        };
        // The floor the bare store would apply to `want`, not to `wish`.
        let floor = at_least.min(want);
        let lease_expiry = expires_at.plus_millis(self.window_ms);
        let taken = match (&self.holder, self.inner.lease_holders()) {
            (Some(holder), Some(registry)) => {
                registry
                    .reserve_lease(holder.id(), cover, line, wish, floor, now, lease_expiry)
                    .await
            }
            _ => {
                self.inner
                    .reserve_reporting(line, wish, floor, now, lease_expiry)
                    .await
            }
        };
        let state = self.line_or_new(&key)?;
        let mut state = lock_line(&state)?;
        let (lease, inner_remaining) = match taken {
            Ok(t) => t,
            Err(StoreError::BudgetExceeded { remaining }) => {
                return Err(StoreError::BudgetExceeded {
                    remaining: remaining.saturating_add(state.free()),
                });
            }
            Err(e) => return Err(e),
        };
        let amount = reservable(lease.amount, want, floor)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let journaled = self.journal(&[
            Record::Lease {
                id: lease.id.0,
                line: &lease.line,
                amount: lease.amount,
            },
            Record::Hold {
                id,
                lease: lease.id.0,
                amount,
            },
        ]);
        if let Err(e) = journaled {
            // Not journaled: given back at once rather than held unrecorded.
            drop(state);
            let given_back = self
                .inner
                .settle(&[Settlement {
                    reservation: lease,
                    actual: Micros::ZERO,
                }])
                .await;
            if let Err(g) = given_back {
                tracing::warn!(error = %g, "giving back an unjournaled lease failed; the sweep will charge it");
            }
            return Err(e);
        }
        let cover = match self.holder {
            Some(_) => cover.min(lease.amount),
            None => Micros(u64::MAX),
        };
        state.leases.push(Lease {
            open: HashMap::from([(id, Hold { amount, expires_at })]),
            held: amount,
            spent: Micros::ZERO,
            expires_at: lease_expiry,
            retired: false,
            charged: Micros::ZERO,
            cover,
            reservation: lease,
        });
        state.inner_remaining = inner_remaining.map(|r| i128::from(r.0));
        let reservation = Reservation {
            id: ReservationId(id),
            line: line.clone(),
            amount,
        };
        Ok((reservation, state.remaining()))
    }

    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        let mut forward = Vec::new();
        let mut finished = Vec::new();
        // Journaled in one write once the batch is applied: a crash before
        // it charges those calls what they held (see `journal.rs`).
        let mut journaled = Vec::new();
        for st in settlements {
            let id = st.reservation.id.0;
            if id < LOCAL_IDS {
                forward.push(st.clone());
                continue;
            }
            let line = &st.reservation.line;
            let Some(state) = self.line(&(line.key.clone(), line.period_start))? else {
                continue; // unknown: already settled or swept
            };
            let mut s = lock_line(&state)?;
            for lease in &mut s.leases {
                if let Some(hold) = lease.open.remove(&id) {
                    journaled.push(Record::Settled {
                        id,
                        actual: st.actual,
                    });
                    lease.held = lease.held.saturating_sub(hold.amount);
                    lease.spent = lease.spent.saturating_add(st.actual);
                    if lease.retired && lease.idle() {
                        finished.push(state.clone());
                    }
                    break;
                }
            }
        }
        if !journaled.is_empty() {
            self.journal_after(&journaled);
        }
        if finished.is_empty() {
            if forward.is_empty() {
                return Ok(());
            }
            return self.inner.settle(&forward).await;
        }
        let _gate = self.gate.write().await;
        let mut done: Vec<(SharedLine, Vec<Lease>)> = Vec::new();
        for state in finished {
            let mut s = lock_line(&state)?;
            let (idle, rest): (Vec<Lease>, Vec<Lease>) =
                s.leases.drain(..).partition(|l| l.retired && l.idle());
            s.leases = rest;
            drop(s);
            for l in &idle {
                forward.push(l.settlement());
            }
            done.push((state, idle));
        }
        let result = self.inner.settle(&forward).await;
        for (state, leases) in done {
            let mut s = lock_line(&state)?;
            if result.is_ok() {
                for l in &leases {
                    self.journal_after(&[Record::Done {
                        lease: l.reservation.id.0,
                    }]);
                    s.adjust_remaining(i128::from(l.reservation.amount.0) - i128::from(l.spent.0));
                }
            } else {
                s.leases.splice(0..0, leases);
            }
        }
        result
    }

    async fn settle_part(&self, settlement: &Settlement, keep: Micros) -> Result<bool, StoreError> {
        let id = settlement.reservation.id.0;
        if id < LOCAL_IDS {
            return self.inner.settle_part(settlement, keep).await;
        }
        let line = &settlement.reservation.line;
        let Some(state) = self.line(&(line.key.clone(), line.period_start))? else {
            return Ok(false);
        };
        let mut s = lock_line(&state)?;
        for lease in &mut s.leases {
            if let Some(hold) = lease.open.get_mut(&id) {
                self.journal_after(&[Record::HoldPart {
                    id,
                    actual: settlement.actual,
                    keep,
                }]);
                let kept = hold.amount.min(keep);
                lease.held = lease.held.saturating_sub(hold.amount.saturating_sub(kept));
                hold.amount = kept;
                lease.spent = lease.spent.saturating_add(settlement.actual);
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        self.inner.add_spend(charges).await
    }

    async fn budget_usage(
        &self,
        line: &BudgetLine,
        now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError> {
        let _gate = self.gate.read().await;
        let usage = self.inner.budget_usage(line, now).await?;
        let Some(state) = self.line(&(line.key.clone(), line.period_start))? else {
            return Ok(usage);
        };
        let (amount, spent, held) = lock_line(&state)?.totals();
        Ok(BudgetUsage {
            settled: usage.settled.saturating_add(spent),
            reserved: usage.reserved.saturating_sub(amount).saturating_add(held),
        })
    }

    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError> {
        // Dead processes' leases first, before the store's sweep could
        // charge them in full: those journaled on this host, then those of
        // replicas whose heartbeat stopped.
        let mut swept = self.recover().await?;
        swept += self.close_dead().await?;
        // Calls past their expiry are charged in full, as the store does.
        for (_, state) in self.all_lines()? {
            let mut s = lock_line(&state)?;
            for lease in &mut s.leases {
                let expired: Vec<u64> = lease
                    .open
                    .iter()
                    .filter(|(_, h)| h.expires_at <= now)
                    .map(|(&id, _)| id)
                    .collect();
                for id in expired {
                    if let Some(hold) = lease.open.remove(&id) {
                        self.journal_after(&[Record::Settled {
                            id,
                            actual: hold.amount,
                        }]);
                        lease.held = lease.held.saturating_sub(hold.amount);
                        lease.spent = lease.spent.saturating_add(hold.amount);
                        swept += 1;
                    }
                }
            }
        }
        {
            let _gate = self.gate.write().await;
            // Busy leases keep only what their calls hold, so that a child
            // expiring now keeps held on its parent just that.
            self.release_all().await?;
            if let Some((journal, _)) = &self.journal
                && journal.written() > JOURNAL_COMPACT_BYTES
                && let Err(e) = self.compact_locked()
            {
                tracing::warn!(error = %e, "compacting the lease journal failed");
            }
            let mut lines = self.lines()?;
            for periods in lines.values_mut() {
                periods.retain(|_, state| state.lock().map_or(true, |s| !s.leases.is_empty()));
            }
            lines.retain(|_, periods| !periods.is_empty());
        }
        Ok(swept + self.inner.sweep(now).await?)
    }

    async fn drain(&self) -> Result<(), StoreError> {
        self.flush().await?;
        self.deregister().await
    }

    async fn heartbeat(&self) -> Result<usize, StoreError> {
        self.beat_and_close().await
    }

    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        self.inner.append_usage(records).await
    }

    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        self.inner.list_usage(filter).await
    }

    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_meta(name).await
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.inner.set_meta(name, value).await
    }
}
