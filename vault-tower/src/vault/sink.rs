//! The usage worker: settles calls and writes usage records and denial audit
//! events in batches, off the request path. Records reach the store as soon as
//! the worker drains its queue (well within a second; docs/api.md#usage says
//! about every 10 ms).
//!
//! When the store is unavailable ([`StoreError::Unavailable`]: PostgreSQL
//! stopped), the worker keeps the batch and retries it — settlements first,
//! then the usage records — with a growing pause (up to a second) until the
//! store takes it, and takes no new job meanwhile: the queue is the buffer.
//! It holds [`DEFAULT_USAGE_BUFFER`] jobs (or what
//! [`usage_buffer`](crate::VaultContextBuilder::usage_buffer) says); once
//! that many wait, [`UsageSink::accepting`] turns false and new calls are
//! refused with 503 `store_unavailable` rather than any record dropped. A
//! quarter more is kept for the settlements of calls already admitted.
//! (docs/replicas.md#when-postgresql-stops)

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use vault_core::audit::{AuditEvent, AuditTrail};
use vault_core::clock::UnixMillis;
use vault_core::meter::Usage;
use vault_core::money::Micros;
use vault_core::policy::{CallOutcome, Grant, PolicyEngine};
use vault_core::provider::Provider;
use vault_core::record::{KeyRecord, SettledBy, UsageRecord};
use vault_core::store::{KeyStore, StoreError};

use crate::metrics::Metrics;

/// Most records written in one store call.
const BATCH: usize = 512;
/// Jobs queued before new calls are refused (503 `store_unavailable`).
pub const DEFAULT_USAGE_BUFFER: usize = 65_536;
/// The first pause before retrying a write the store could not take.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
/// The longest pause between two retries.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// Pause after each batch. Calls finishing meanwhile queue up without waking
/// the worker: one wake-up per batch instead of one per request (a wake-up is
/// a syscall and a context switch, more than the rest of the layer costs).
/// Longer pauses also mean fewer, bigger store transactions for the usage
/// rows (at 13k calls/s, 1 ms pauses made `append_usage` a tenth of the
/// proxy's CPU). Far inside a second.
const BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

enum Job {
    Settle {
        grant: Option<Grant>,
        outcome: CallOutcome,
        record: UsageRecord,
    },
    Denied {
        record: UsageRecord,
        audit: Option<AuditEvent>,
    },
    Flush(oneshot::Sender<()>),
}

/// Handle to the worker; cheap to clone.
#[derive(Clone)]
pub(crate) struct UsageSink {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    /// Free slots kept for calls already admitted: below this many, new
    /// calls are refused.
    headroom: usize,
}

/// An admitted call, from its grant until it is settled: exactly once,
/// however it ends (docs/budgets.md#settlement). Dropped unsettled — the
/// request future abandoned before the answer's headers (client gone, an
/// outer timeout), or the inner service failing — it settles itself: a
/// call not yet handed to the upstream releases its reservation, one
/// handed over is charged it, and either way leaves a usage record.
pub(crate) struct PendingCall {
    sink: UsageSink,
    grant: Option<Grant>,
    /// `None` once settled.
    record: Option<UsageRecord>,
    started: Instant,
    /// Whether the request may have reached the provider.
    sent: bool,
}

/// The status recorded for a call abandoned before its answer's headers
/// (nginx's "client closed request").
const ABANDONED: u16 = 499;

impl PendingCall {
    /// A call that arrived at `started`, admitted with `grant`, to be
    /// recorded as `record`.
    pub(crate) fn new(
        sink: UsageSink,
        grant: Grant,
        record: UsageRecord,
        started: Instant,
    ) -> Self {
        PendingCall {
            sink,
            grant: Some(grant),
            record: Some(record),
            started,
            sent: false,
        }
    }

    /// Marks the request as handed to the upstream: from now on an
    /// unsettled drop charges the reservation.
    pub(crate) fn mark_sent(&mut self) {
        self.sent = true;
    }

    /// The status the record will carry.
    pub(crate) fn status(&self) -> u16 {
        self.record.as_ref().map_or(0, |r| r.status)
    }

    /// Sets the status the record will carry.
    pub(crate) fn set_status(&mut self, status: u16) {
        if let Some(r) = self.record.as_mut() {
            r.status = status;
        }
    }

    /// Sets the denial code the record will carry (a refusal after
    /// admission, e.g. no provider key).
    pub(crate) fn set_denial(&mut self, code: &str) {
        if let Some(r) = self.record.as_mut() {
            r.denial = Some(code.to_owned());
            r.shadow = false;
        }
    }

    /// Settles the call by `rule` and sends it to the worker.
    pub(crate) fn finish(mut self, outcome: CallOutcome, rule: SettledBy) {
        self.settle(outcome, rule);
    }

    /// Settles a call the provider did not answer: released if the request
    /// never left (`sent` false), charged its reservation if it may have
    /// reached the provider (docs/budgets.md#settlement).
    pub(crate) fn finish_unanswered(mut self, sent: bool) {
        self.settle_unanswered(sent);
    }

    fn settle_unanswered(&mut self, sent: bool) {
        if sent {
            self.settle(CallOutcome::Unmetered, SettledBy::CutReserved);
        } else {
            self.settle(CallOutcome::NotSent, SettledBy::NotSent);
        }
    }

    fn settle(&mut self, outcome: CallOutcome, rule: SettledBy) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        record.latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        record.settlement = Some(rule);
        if matches!(rule, SettledBy::CutReserved | SettledBy::CutAfterFinalCount) {
            tracing::debug!(key_id = %record.key_id, "call ended early");
        }
        self.sink.send(Job::Settle {
            grant: self.grant.take(),
            outcome,
            record,
        });
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if self.record.is_none() {
            return;
        }
        if self.status() == 0 {
            self.set_status(ABANDONED);
        }
        self.settle_unanswered(self.sent);
    }
}

/// A usage record of `key`'s call to `endpoint` at `at`, with no usage or
/// cost yet: a refusal's as it is, an admitted call's until it settles.
pub(crate) fn usage_record(
    at: UnixMillis,
    key: &KeyRecord,
    provider: Option<Provider>,
    endpoint: String,
    model: Option<String>,
) -> UsageRecord {
    UsageRecord {
        at,
        key_id: key.id.clone(),
        project: key.project.clone(),
        provider,
        endpoint,
        model,
        tokens_in: 0,
        tokens_out: 0,
        cost: Micros::ZERO,
        latency_ms: 0,
        status: 0,
        denial: None,
        shadow: false,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        audio_tokens: 0,
        settlement: None,
    }
}

impl UsageSink {
    /// Starts the worker on the current tokio runtime.
    /// `buffer` jobs may wait before new calls are refused.
    pub(crate) fn start(
        store: Arc<dyn KeyStore>,
        engine: Arc<dyn PolicyEngine>,
        audit: Option<Arc<dyn AuditTrail>>,
        metrics: Arc<Metrics>,
        buffer: usize,
    ) -> UsageSink {
        let buffer = buffer.max(1);
        let headroom = (buffer / 4).max(16);
        let (tx, rx) = mpsc::channel(buffer.saturating_add(headroom));
        tokio::spawn(run(rx, store, engine, audit, metrics.clone()));
        UsageSink {
            tx,
            metrics,
            headroom,
        }
    }

    /// Whether new calls may be admitted: fewer than the buffer's jobs
    /// wait (the store keeps up, or was down only briefly).
    pub(crate) fn accepting(&self) -> bool {
        self.tx.capacity() > self.headroom
    }

    fn send(&self, job: Job) {
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                // Settlements must not be lost: hand them over asynchronously
                // (a drop outside the runtime, at shutdown, cannot: counted).
                let runtime = tokio::runtime::Handle::try_current();
                if let (Job::Settle { .. }, Ok(runtime)) = (&job, runtime) {
                    let tx = self.tx.clone();
                    runtime.spawn(async move {
                        let _ = tx.send(job).await;
                    });
                } else {
                    self.metrics.dropped_records.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.dropped_records.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records a denied request (usage record, metric and audit event).
    pub(crate) fn denied(&self, record: UsageRecord, audit: Option<AuditEvent>) {
        self.send(Job::Denied { record, audit });
    }

    /// Waits until everything queued before this call is settled and written.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Writes a call's token counts, by class, into its usage record.
fn record_usage(record: &mut UsageRecord, usage: &Usage) {
    record.tokens_in = usage.tokens_in;
    record.tokens_out = usage.tokens_out;
    record.cached_tokens = usage.cached_in;
    record.cache_write_tokens = usage.cache_write_in.saturating_add(usage.cache_write_1h_in);
    record.reasoning_tokens = usage.reasoning_out;
    record.audio_tokens = usage.audio_in.saturating_add(usage.audio_out);
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<dyn KeyStore>,
    engine: Arc<dyn PolicyEngine>,
    audit: Option<Arc<dyn AuditTrail>>,
    metrics: Arc<Metrics>,
) {
    let mut jobs = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
        let mut records = Vec::with_capacity(jobs.len());
        let mut events = Vec::new();
        let mut flushes = Vec::new();
        // Granted calls, settled together below: (grant, outcome, record index).
        let mut granted = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Settle {
                    grant,
                    outcome,
                    mut record,
                } => {
                    if let Some(grant) = grant {
                        granted.push((grant, outcome, records.len()));
                    } else if let CallOutcome::Metered(usage) = outcome {
                        record_usage(&mut record, &usage);
                    }
                    records.push(record);
                }
                Job::Denied { record, audit } => {
                    records.push(record);
                    events.extend(audit);
                }
                Job::Flush(done) => flushes.push(done),
            }
        }
        if !granted.is_empty() {
            settle(engine.as_ref(), granted, &mut records).await;
        }
        for r in &records {
            metrics.observe(r);
            tracing::debug!(
                key_id = %r.key_id,
                provider = r.provider.map_or("none", |p| p.as_str()),
                endpoint = %r.endpoint,
                model = r.model.as_deref().unwrap_or("-"),
                status = r.status,
                tokens_in = r.tokens_in,
                tokens_out = r.tokens_out,
                cost_usd = %r.cost.to_usd_string(),
                latency_ms = r.latency_ms,
                denial = r.denial.as_deref().unwrap_or("-"),
                "call"
            );
        }
        write(store.as_ref(), engine.as_ref(), &records, &metrics).await;
        if let (Some(log), false) = (&audit, events.is_empty()) {
            append_events(log.clone(), events, &metrics).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
        tokio::time::sleep(BATCH_INTERVAL).await;
    }
}

/// Writes what settlements owe and the batch's usage records, retrying
/// while the store is unavailable (module docs). Other failures are
/// logged and counted, not retried.
async fn write(
    store: &dyn KeyStore,
    engine: &dyn PolicyEngine,
    records: &[UsageRecord],
    metrics: &Metrics,
) {
    let mut written = records.is_empty();
    let mut pause = RETRY_FIRST;
    let mut failing_since: Option<Instant> = None;
    loop {
        let owed = engine.write_owed().await;
        let mut unavailable = owed.err();
        if !written {
            match store.append_usage(records).await {
                Ok(()) => written = true,
                Err(e @ StoreError::Unavailable(_)) => unavailable = Some(e),
                Err(e) => {
                    written = true;
                    metrics.usage_write_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, records = records.len(), "writing usage records failed");
                }
            }
        }
        let Some(e) = unavailable else {
            if let Some(since) = failing_since {
                tracing::info!(after = ?since.elapsed(), "the store took the buffered usage records and settlements");
            }
            return;
        };
        if failing_since.is_none() {
            failing_since = Some(Instant::now());
            tracing::warn!(error = %e, records = records.len(), "the store is unavailable; keeping usage records and settlements in memory until it is back");
        }
        metrics.store_write_retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Settles a batch's granted calls in one settlement call (one store
/// transaction), writing each charge into its record: `granted` holds
/// (grant, outcome, index into `records`).
async fn settle(
    engine: &dyn PolicyEngine,
    granted: Vec<(Grant, CallOutcome, usize)>,
    records: &mut [UsageRecord],
) {
    let indices: Vec<usize> = granted.iter().map(|(_, _, i)| *i).collect();
    let calls = granted
        .into_iter()
        .map(|(grant, outcome, i)| (grant, outcome, records[i].model.as_deref()))
        .collect();
    let charges = engine.settle_many(calls).await;
    for (i, charge) in indices.into_iter().zip(charges) {
        let record = &mut records[i];
        record.cost = charge.cost;
        record_usage(record, &charge.usage);
    }
}

/// Appends denial audit events (a file backend does so off the runtime's
/// worker threads), counting those that could not be written.
async fn append_events(log: Arc<dyn AuditTrail>, events: Vec<AuditEvent>, metrics: &Metrics) {
    let mut failed = 0usize;
    for event in events {
        if log.append(event).await.is_err() {
            failed += 1;
        }
    }
    if failed > 0 {
        metrics
            .audit_failures
            .fetch_add(failed as u64, Ordering::Relaxed);
        tracing::error!(failed, "writing denial audit events failed");
    }
}
