//! [`MemoryStore`]: every record in process memory, behind one
//! `std::sync::Mutex` that is never held across an await (no method awaits
//! while holding it). For tests and for embedding where nothing must persist.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::budget::{check_carve_out, close_carve_out, pass_through, reservable};
use super::{KeyStore, StoreError};
use crate::clock::UnixMillis;
use crate::crypto::Sealed;
use crate::key::{KeyHash, KeyId, KeyPrefix, ProviderKeyId};
use crate::money::Micros;
use crate::record::{
    BudgetLine, BudgetUsage, KeyRecord, KeyStatus, ProviderKeyRecord, Reservation, ReservationId,
    Settlement, UsageFilter, UsageRecord,
};

/// A store that keeps everything in memory; nothing survives the process.
///
/// ```
/// use vault_core::store::{KeyStore, MemoryStore};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// assert_eq!(store.get_meta("schema").await.unwrap(), None);
/// # });
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".to_owned()))
    }
}

/// A reservation as held: on which (key, period) and until when.
#[derive(Debug, Clone)]
struct Hold {
    key: KeyId,
    period_start: UnixMillis,
    amount: Micros,
    expires_at: UnixMillis,
}

/// A child's budget carved out of its parent's line.
#[derive(Debug, Clone)]
struct CarveOut {
    parent: KeyId,
    period_start: UnixMillis,
    /// Held on the parent's line (once closed, what the child's open calls
    /// hold).
    amount: Micros,
    /// `None` while the child lives; once closed, what its open calls may
    /// still charge the parent (see `budget.rs`).
    chargeable: Option<Micros>,
}

/// A budget line's running totals, kept as holds and carve-outs come and
/// go so that reading the line never scans them.
#[derive(Debug, Clone, Copy, Default)]
struct LineTotals {
    settled: Micros,
    /// Open holds plus carve-outs held on the line. Summed without
    /// saturation (it cannot reach `u128::MAX`), so a release undoes its
    /// hold exactly; read back saturated, as a saturating sum would be.
    reserved: u128,
}

impl LineTotals {
    fn usage(self) -> BudgetUsage {
        BudgetUsage {
            settled: self.settled,
            reserved: Micros(u64::try_from(self.reserved).unwrap_or(u64::MAX)),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Keys in insertion order (oldest first).
    keys: Vec<KeyRecord>,
    key_index: HashMap<KeyId, usize>,
    /// Current and previous hashes, both pointing at the key's position.
    hash_index: HashMap<KeyHash, usize>,
    provider_keys: Vec<ProviderKeyRecord>,
    /// Running totals per budget line: key, then period start.
    lines: HashMap<KeyId, HashMap<UnixMillis, LineTotals>>,
    holds: HashMap<u64, Hold>,
    /// Carve-outs by child key id.
    carve_outs: HashMap<KeyId, CarveOut>,
    next_reservation: u64,
    usage: Vec<UsageRecord>,
    meta: HashMap<String, String>,
}

impl State {
    /// A line's usage, in constant time.
    fn usage_of(&self, key: &KeyId, period_start: UnixMillis) -> BudgetUsage {
        self.lines
            .get(key)
            .and_then(|periods| periods.get(&period_start))
            .copied()
            .unwrap_or_default()
            .usage()
    }

    /// Updates a line's totals in one lookup (cloning the key id only for
    /// a key not seen before).
    fn update_line<T>(
        &mut self,
        key: &KeyId,
        period_start: UnixMillis,
        update: impl FnOnce(&mut LineTotals) -> T,
    ) -> T {
        if let Some(periods) = self.lines.get_mut(key) {
            update(periods.entry(period_start).or_default())
        } else {
            let mut periods = HashMap::new();
            let out = update(periods.entry(period_start).or_default());
            self.lines.insert(key.clone(), periods);
            out
        }
    }

    /// Closes a hold of `held`, charging `actual` to its line and key.
    fn close_hold(&mut self, key: &KeyId, period_start: UnixMillis, held: Micros, actual: Micros) {
        self.update_line(key, period_start, |line| {
            line.reserved = line.reserved.saturating_sub(u128::from(held.0));
            line.settled = line.settled.saturating_add(actual);
        });
        self.add_spend(key, actual);
        self.pass_up(key, held, actual);
    }

    /// Passes a hold of `held` closed at `actual` on `key`'s lines up the
    /// chain of closed carve-outs above it (docs in `budget.rs`).
    fn pass_up(&mut self, key: &KeyId, mut held: Micros, mut actual: Micros) {
        let mut child = key.clone();
        for _ in 0..=self.keys.len() {
            let Some(carve) = self.carve_outs.get_mut(&child) else {
                return;
            };
            let Some(chargeable) = carve.chargeable else {
                return;
            };
            let p = pass_through(carve.amount, chargeable, held, actual);
            carve.amount = p.residual;
            carve.chargeable = Some(p.chargeable);
            let (parent, period) = (carve.parent.clone(), carve.period_start);
            if p.residual == Micros::ZERO {
                self.carve_outs.remove(&child);
            }
            self.release(&parent, period, p.release);
            self.charge(&parent, period, p.charge);
            (child, held, actual) = (parent, p.release, p.charge);
        }
    }

    /// What a key's lines hold: its open reservations and its children's
    /// carve-outs, in every period.
    fn open_on(&self, key: &KeyId) -> Micros {
        let total: u128 = self
            .lines
            .get(key)
            .map_or(0, |periods| periods.values().map(|l| l.reserved).sum());
        Micros(u64::try_from(total).unwrap_or(u64::MAX))
    }

    /// Counts `amount` as reserved on a line (a hold or a carve-out).
    fn hold(&mut self, key: &KeyId, period_start: UnixMillis, amount: Micros) {
        self.update_line(key, period_start, |line| {
            line.reserved = line.reserved.saturating_add(u128::from(amount.0));
        });
    }

    /// Undoes [`hold`](Self::hold) of the same amount.
    fn release(&mut self, key: &KeyId, period_start: UnixMillis, amount: Micros) {
        self.update_line(key, period_start, |line| {
            line.reserved = line.reserved.saturating_sub(u128::from(amount.0));
        });
    }

    /// Adds `amount` to the period's settled spend and the key's lifetime spend.
    fn charge(&mut self, key: &KeyId, period_start: UnixMillis, amount: Micros) {
        self.update_line(key, period_start, |line| {
            line.settled = line.settled.saturating_add(amount);
        });
        self.add_spend(key, amount);
    }

    /// Adds `amount` to a key's lifetime spend.
    fn add_spend(&mut self, key: &KeyId, amount: Micros) {
        if let Some(&i) = self.key_index.get(key) {
            let k = &mut self.keys[i];
            k.spend = k.spend.saturating_add(amount);
        }
    }

    /// Closes a child's carve-out: charges its parent the child's spend
    /// (capped at the carved amount) and keeps held only what the child's
    /// open calls hold (docs in `budget.rs`). `false` if there was no open
    /// carve-out.
    fn settle_carve_out(&mut self, child: &KeyId) -> bool {
        let open = self.open_on(child);
        let Some(carve) = self.carve_outs.get_mut(child) else {
            return false;
        };
        if carve.chargeable.is_some() {
            return false;
        }
        let spent = self
            .key_index
            .get(child)
            .map_or(Micros::ZERO, |&i| self.keys[i].spend);
        let carved = carve.amount;
        let closed = close_carve_out(carved, spent, open);
        carve.amount = closed.residual;
        carve.chargeable = Some(closed.chargeable);
        let (parent, period) = (carve.parent.clone(), carve.period_start);
        if closed.residual == Micros::ZERO {
            self.carve_outs.remove(child);
        }
        let released = carved.saturating_sub(closed.residual);
        self.release(&parent, period, released);
        self.charge(&parent, period, closed.charge);
        self.pass_up(&parent, released, closed.charge);
        true
    }

    fn hash_taken(&self, hash: &KeyHash, except: Option<usize>) -> bool {
        self.hash_index
            .get(hash)
            .is_some_and(|&i| Some(i) != except)
    }

    /// How deep a key sits under its root (roots are 0).
    fn depth(&self, id: &KeyId) -> usize {
        let mut depth = 0;
        let mut cur = self
            .key_index
            .get(id)
            .and_then(|&i| self.keys[i].parent.clone());
        while let Some(p) = cur {
            depth += 1;
            if depth > self.keys.len() {
                break; // a cycle cannot be inserted, but never loop forever
            }
            cur = self
                .key_index
                .get(&p)
                .and_then(|&i| self.keys[i].parent.clone());
        }
        depth
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        carve: Option<(&BudgetLine, Micros)>,
    ) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        if s.key_index.contains_key(&key.id)
            || s.hash_taken(&key.hash, None)
            || key
                .previous_hash
                .is_some_and(|h| h == key.hash || s.hash_taken(&h, None))
        {
            return Err(StoreError::Conflict);
        }
        if key
            .parent
            .as_ref()
            .is_some_and(|p| !s.key_index.contains_key(p))
        {
            return Err(StoreError::NotFound);
        }
        if let Some((line, amount)) = carve {
            if !s.key_index.contains_key(&line.key) {
                return Err(StoreError::NotFound);
            }
            let usage = s.usage_of(&line.key, line.period_start);
            let remaining = usage.remaining(line.limit);
            check_carve_out(remaining, amount)?;
            s.hold(&line.key, line.period_start, amount);
            s.carve_outs.insert(
                key.id.clone(),
                CarveOut {
                    parent: line.key.clone(),
                    period_start: line.period_start,
                    amount,
                    chargeable: None,
                },
            );
        }
        let i = s.keys.len();
        s.keys.push(key.clone());
        s.key_index.insert(key.id.clone(), i);
        s.hash_index.insert(key.hash, i);
        if let Some(prev) = key.previous_hash {
            s.hash_index.insert(prev, i);
        }
        Ok(())
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let s = self.lock()?;
        Ok(s.hash_index.get(hash).map(|&i| s.keys[i].clone()))
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let s = self.lock()?;
        Ok(s.key_index.get(id).map(|&i| s.keys[i].clone()))
    }

    async fn list_keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let s = self.lock()?;
        let mut out: Vec<KeyRecord> = s
            .keys
            .iter()
            .filter(|k| project.is_none_or(|p| k.project == p))
            .cloned()
            .collect();
        // Stable: insertion order breaks ties, as `rowid` does in SQL.
        out.sort_by_key(|k| k.created_at);
        Ok(out)
    }

    async fn revoke_key(&self, id: &KeyId, at: UnixMillis) -> Result<Vec<KeyId>, StoreError> {
        let mut s = self.lock()?;
        if !s.key_index.contains_key(id) {
            return Err(StoreError::NotFound);
        }
        // Breadth-first: every key appears after its parent.
        let mut order = vec![id.clone()];
        let mut queue = VecDeque::from([id.clone()]);
        while let Some(parent) = queue.pop_front() {
            for k in &s.keys {
                if k.parent.as_ref() == Some(&parent) && !order.contains(&k.id) {
                    order.push(k.id.clone());
                    queue.push_back(k.id.clone());
                }
            }
        }
        let mut revoked = Vec::new();
        for key_id in &order {
            let Some(&i) = s.key_index.get(key_id) else {
                continue;
            };
            let k = &mut s.keys[i];
            if k.status != KeyStatus::Revoked {
                k.status = KeyStatus::Revoked;
                k.revoked_at = Some(at);
                revoked.push(key_id.clone());
            }
        }
        // Deepest first, so a grandchild's spend reaches its parent before
        // the parent's own carve-out is settled.
        for key_id in revoked.iter().rev() {
            s.settle_carve_out(key_id);
        }
        Ok(revoked)
    }

    async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &KeyHash,
        new_prefix: &KeyPrefix,
        grace_until: Option<UnixMillis>,
    ) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        let i = *s.key_index.get(id).ok_or(StoreError::NotFound)?;
        if s.hash_taken(new_hash, Some(i)) {
            return Err(StoreError::Conflict);
        }
        let old_hash = s.keys[i].hash;
        if let Some(prev) = s.keys[i].previous_hash.take() {
            s.hash_index.remove(&prev);
        }
        s.hash_index.remove(&old_hash);
        let k = &mut s.keys[i];
        k.hash = *new_hash;
        k.prefix = new_prefix.clone();
        match grace_until {
            Some(until) if old_hash != *new_hash => {
                k.previous_hash = Some(old_hash);
                k.previous_valid_until = Some(until);
            }
            _ => {
                k.previous_hash = None;
                k.previous_valid_until = None;
            }
        }
        let previous = k.previous_hash;
        s.hash_index.insert(*new_hash, i);
        if let Some(prev) = previous {
            s.hash_index.insert(prev, i);
        }
        Ok(())
    }

    async fn insert_provider_key(&self, key: &ProviderKeyRecord) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        if s.provider_keys.iter().any(|p| p.id == key.id) {
            return Err(StoreError::Conflict);
        }
        s.provider_keys.push(key.clone());
        Ok(())
    }

    async fn get_provider_key(
        &self,
        id: &ProviderKeyId,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        let s = self.lock()?;
        Ok(s.provider_keys.iter().find(|p| &p.id == id).cloned())
    }

    async fn list_provider_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        let s = self.lock()?;
        let mut out: Vec<ProviderKeyRecord> = s
            .provider_keys
            .iter()
            .filter(|p| project.is_none_or(|want| p.project == want))
            .cloned()
            .collect();
        out.sort_by_key(|p| p.created_at);
        Ok(out)
    }

    async fn remove_provider_key(&self, id: &ProviderKeyId) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let before = s.provider_keys.len();
        s.provider_keys.retain(|p| &p.id != id);
        Ok(s.provider_keys.len() != before)
    }

    async fn replace_sealed(
        &self,
        id: &ProviderKeyId,
        expected: &Sealed,
        new: &Sealed,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        match s.provider_keys.iter_mut().find(|p| &p.id == id) {
            Some(p) if &p.sealed == expected => {
                p.sealed = new.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn reserve_reporting(
        &self,
        line: &BudgetLine,
        want: Micros,
        at_least: Micros,
        _now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(Reservation, Option<Micros>), StoreError> {
        let mut s = self.lock()?;
        // Read the line and hold on it in one lookup.
        let (remaining, amount) = s.update_line(&line.key, line.period_start, |totals| {
            let remaining = totals.usage().remaining(line.limit);
            let amount = reservable(remaining, want, at_least)?;
            totals.reserved = totals.reserved.saturating_add(u128::from(amount.0));
            Ok::<_, StoreError>((remaining, amount))
        })?;
        s.next_reservation += 1;
        let id = s.next_reservation;
        s.holds.insert(
            id,
            Hold {
                key: line.key.clone(),
                period_start: line.period_start,
                amount,
                expires_at,
            },
        );
        let reservation = Reservation {
            id: ReservationId(id),
            line: line.clone(),
            amount,
        };
        Ok((reservation, Some(remaining.saturating_sub(amount))))
    }

    async fn settle(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        for st in settlements {
            if let Some(hold) = s.holds.remove(&st.reservation.id.0) {
                s.close_hold(&hold.key, hold.period_start, hold.amount, st.actual);
            }
        }
        Ok(())
    }

    async fn settle_part(&self, settlement: &Settlement, keep: Micros) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let Some(hold) = s.holds.get_mut(&settlement.reservation.id.0) else {
            return Ok(false);
        };
        let kept = hold.amount.min(keep);
        let given_back = hold.amount.saturating_sub(kept);
        hold.amount = kept;
        let (key, period_start) = (hold.key.clone(), hold.period_start);
        s.release(&key, period_start, given_back);
        s.charge(&key, period_start, settlement.actual);
        s.pass_up(&key, given_back, settlement.actual);
        Ok(true)
    }

    async fn budget_usage(
        &self,
        line: &BudgetLine,
        _now: UnixMillis,
    ) -> Result<BudgetUsage, StoreError> {
        let s = self.lock()?;
        Ok(s.usage_of(&line.key, line.period_start))
    }

    async fn sweep(&self, now: UnixMillis) -> Result<usize, StoreError> {
        let mut s = self.lock()?;
        let mut expired: Vec<u64> = s
            .holds
            .iter()
            .filter(|(_, h)| h.expires_at <= now)
            .map(|(&id, _)| id)
            .collect();
        expired.sort_unstable();
        let mut swept = 0;
        for id in expired {
            if let Some(hold) = s.holds.remove(&id) {
                s.close_hold(&hold.key, hold.period_start, hold.amount, hold.amount);
                swept += 1;
            }
        }
        let mut children: Vec<(usize, KeyId)> = s
            .carve_outs
            .iter()
            .filter(|(_, c)| c.chargeable.is_none())
            .map(|(child, _)| child)
            .filter(|child| {
                s.key_index
                    .get(*child)
                    .and_then(|&i| s.keys[i].expires_at)
                    .is_some_and(|e| e <= now)
            })
            .map(|child| (s.depth(child), child.clone()))
            .collect();
        // Deepest first, as in `revoke_key`.
        children.sort_by(|a, b| b.cmp(a));
        for (_, child) in children {
            if s.settle_carve_out(&child) {
                swept += 1;
            }
        }
        Ok(swept)
    }

    async fn add_spend(&self, charges: &[(KeyId, Micros)]) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        for (key, amount) in charges {
            if let Some(&i) = s.key_index.get(key) {
                let k = &mut s.keys[i];
                k.spend = k.spend.saturating_add(*amount);
            }
        }
        Ok(())
    }

    async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        for r in records {
            if let Some(&i) = s.key_index.get(&r.key_id) {
                let k = &mut s.keys[i];
                k.request_count = k.request_count.saturating_add(1);
                k.last_used_at = Some(k.last_used_at.map_or(r.at, |t| t.max(r.at)));
            }
            s.usage.push(r.clone());
        }
        Ok(())
    }

    async fn list_usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        let s = self.lock()?;
        let mut out: Vec<UsageRecord> = s
            .usage
            .iter()
            .rev()
            .filter(|r| filter.project.as_ref().is_none_or(|p| &r.project == p))
            .filter(|r| filter.key_id.as_ref().is_none_or(|k| &r.key_id == k))
            .filter(|r| filter.since.is_none_or(|t| r.at >= t))
            .filter(|r| filter.until.is_none_or(|t| r.at < t))
            .cloned()
            .collect();
        // Newest first; among equal times, the later append first (stable sort
        // over the reversed list).
        out.sort_by_key(|r| std::cmp::Reverse(r.at));
        if let Some(limit) = filter.limit {
            out.truncate(limit);
        }
        Ok(out)
    }

    async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.meta.get(name).cloned())
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.lock()?.meta.insert(name.to_owned(), value.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyEnv;
    use crate::policy::Policy;
    use crate::record::Settlement;
    use crate::scope::Scopes;

    fn key(id: &str, parent: Option<&str>, expires_at: Option<i64>) -> KeyRecord {
        KeyRecord {
            id: KeyId::parse(id).unwrap(),
            hash: KeyHash::of(id),
            prefix: KeyPrefix::new("vpx_live_abcd"),
            previous_hash: None,
            previous_valid_until: None,
            name: id.into(),
            project: "default".into(),
            env: KeyEnv::Live,
            scopes: Scopes::parse(&["chat:write"]).unwrap(),
            plan: None,
            policy: Policy::default(),
            parent: parent.map(|p| KeyId::parse(p).unwrap()),
            provider_keys: vec![],
            created_at: UnixMillis(0),
            expires_at: expires_at.map(UnixMillis),
            last_used_at: None,
            request_count: 0,
            status: KeyStatus::Active,
            revoked_at: None,
            spend: Micros::ZERO,
        }
    }

    /// What is reserved on a line, summed from scratch.
    fn scanned(s: &State, key: &KeyId, period_start: UnixMillis) -> Micros {
        let held = s
            .holds
            .values()
            .filter(|h| &h.key == key && h.period_start == period_start)
            .fold(Micros::ZERO, |acc, h| acc.saturating_add(h.amount));
        let carved = s
            .carve_outs
            .values()
            .filter(|c| &c.parent == key && c.period_start == period_start)
            .fold(Micros::ZERO, |acc, c| acc.saturating_add(c.amount));
        held.saturating_add(carved)
    }

    #[test]
    fn running_totals_match_a_scan_through_every_change() {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                let store = MemoryStore::new();
                let root = key("key_root", None, None);
                store.insert_key(&root, None).await.unwrap();
                let lines: Vec<BudgetLine> = [0, 1]
                    .map(|p| BudgetLine {
                        key: root.id.clone(),
                        limit: Micros(1_000_000),
                        period_start: UnixMillis(p),
                    })
                    .into();
                let check = |store: &MemoryStore| {
                    let s = store.state.lock().unwrap();
                    for l in &lines {
                        let usage = s.usage_of(&l.key, l.period_start);
                        assert_eq!(usage.reserved, scanned(&s, &l.key, l.period_start));
                    }
                };
                let mut open = Vec::new();
                for i in 0..40u64 {
                    let l = &lines[usize::from(i % 3 == 0)];
                    let r = store
                        .reserve(
                            l,
                            Micros(100 + i),
                            Micros(1),
                            UnixMillis(0),
                            UnixMillis(i as i64),
                        )
                        .await
                        .unwrap();
                    open.push(r);
                    check(&store);
                    if i % 4 == 1 {
                        let r = open.remove(0);
                        let settlement = Settlement {
                            actual: Micros(7),
                            reservation: r,
                        };
                        store
                            .settle(std::slice::from_ref(&settlement))
                            .await
                            .unwrap();
                        // Settling twice changes nothing.
                        store.settle(&[settlement]).await.unwrap();
                        check(&store);
                    }
                    if i % 4 == 3
                        && let Some(r) = open.last()
                    {
                        // A partial settlement keeps part of the hold.
                        let keep = Micros(r.amount.0 / 2);
                        let settlement = Settlement {
                            actual: Micros(3),
                            reservation: r.clone(),
                        };
                        assert!(store.settle_part(&settlement, keep).await.unwrap());
                        check(&store);
                    }
                }
                // Carve-outs: one revoked, one expiring, one left held.
                for (id, expires) in [("key_c1", None), ("key_c2", Some(5)), ("key_c3", None)] {
                    let child = key(id, Some("key_root"), expires);
                    store
                        .insert_key(&child, Some((&lines[0], Micros(1_000))))
                        .await
                        .unwrap();
                    check(&store);
                }
                store
                    .revoke_key(&KeyId::parse("key_c1").unwrap(), UnixMillis(1))
                    .await
                    .unwrap();
                check(&store);
                assert!(store.sweep(UnixMillis(20)).await.unwrap() > 0);
                check(&store);
                store.sweep(UnixMillis(1_000)).await.unwrap();
                check(&store);
                let s = store.state.lock().unwrap();
                assert!(s.holds.is_empty());
                assert_eq!(
                    s.usage_of(&root.id, UnixMillis(0)).reserved,
                    Micros(1_000),
                    "only key_c3's carve-out is left"
                );
            });
    }
}
