//! The usage worker: settles calls and writes usage records and denial audit
//! events in batches, off the request path. Records reach the store as soon
//! as the worker drains its queue (well within SPEC §5's one second).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use vault_core::audit::{AuditEvent, AuditLog};
use vault_core::policy::{CallOutcome, Grant, PolicyEngine};
use vault_core::record::UsageRecord;
use vault_core::store::KeyStore;

use crate::metrics::Metrics;

/// Most records written in one store call.
const BATCH: usize = 512;
/// Most jobs queued before denial records are dropped (and counted).
const QUEUE: usize = 65_536;
/// Pause after each batch. Calls finishing meanwhile queue up without waking
/// the worker: one wake-up per batch instead of one per request (a wake-up is
/// a syscall and a context switch, more than the rest of the layer costs).
/// Longer pauses also mean fewer, bigger store transactions for the usage
/// rows (at 13k calls/s, 1 ms pauses made `append_usage` a tenth of the
/// proxy's CPU). Far inside SPEC §5's one second.
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
}

/// A forwarded call waiting to be settled when its body ends or is dropped.
pub(crate) struct PendingCall {
    pub(crate) sink: UsageSink,
    pub(crate) grant: Option<Grant>,
    pub(crate) record: UsageRecord,
    pub(crate) started: Instant,
}

impl PendingCall {
    /// Sends the call to the worker. `cut` marks a body that did not finish
    /// (client disconnect or upstream failure mid-body).
    pub(crate) fn finish(mut self, outcome: CallOutcome, cut: bool) {
        self.record.latency_ms =
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if cut {
            tracing::debug!(key_id = %self.record.key_id, "response body ended early");
        }
        self.sink.send(Job::Settle {
            grant: self.grant,
            outcome,
            record: self.record,
        });
    }
}

impl UsageSink {
    /// Starts the worker on the current tokio runtime.
    pub(crate) fn start(
        store: Arc<dyn KeyStore>,
        engine: Arc<dyn PolicyEngine>,
        audit: Option<Arc<AuditLog>>,
        metrics: Arc<Metrics>,
    ) -> UsageSink {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, store, engine, audit, metrics.clone()));
        UsageSink { tx, metrics }
    }

    fn send(&self, job: Job) {
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                // Settlements must not be lost: hand them over asynchronously.
                if matches!(job, Job::Settle { .. }) {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
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

    /// Records a call that needs no body to finish (e.g. an empty response).
    pub(crate) fn settle_now(
        &self,
        grant: Option<Grant>,
        outcome: CallOutcome,
        record: UsageRecord,
    ) {
        self.send(Job::Settle {
            grant,
            outcome,
            record,
        });
    }

    /// Waits until everything queued before this call is settled and written.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<dyn KeyStore>,
    engine: Arc<dyn PolicyEngine>,
    audit: Option<Arc<AuditLog>>,
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
                    } else if let CallOutcome::Metered {
                        tokens_in,
                        tokens_out,
                    } = outcome
                    {
                        record.tokens_in = tokens_in;
                        record.tokens_out = tokens_out;
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
            // One settlement call (one store transaction) per batch.
            let indices: Vec<usize> = granted.iter().map(|(_, _, i)| *i).collect();
            let calls = granted
                .into_iter()
                .map(|(grant, outcome, i)| (grant, outcome, records[i].model.as_deref()))
                .collect();
            let charges = engine.settle_many(calls).await;
            for (i, charge) in indices.into_iter().zip(charges) {
                let record = &mut records[i];
                record.cost = charge.cost;
                record.tokens_in = charge.tokens_in;
                record.tokens_out = charge.tokens_out;
            }
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
        if !records.is_empty()
            && let Err(e) = store.append_usage(&records).await
        {
            metrics.usage_write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, records = records.len(), "writing usage records failed");
        }
        if let (Some(log), false) = (&audit, events.is_empty()) {
            let log = log.clone();
            let failed = tokio::task::spawn_blocking(move || {
                events
                    .into_iter()
                    .filter(|e| log.append(e.clone()).is_err())
                    .count()
            })
            .await
            .unwrap_or(1);
            if failed > 0 {
                metrics
                    .audit_failures
                    .fetch_add(failed as u64, Ordering::Relaxed);
                tracing::error!(failed, "writing denial audit events failed");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
        tokio::time::sleep(BATCH_INTERVAL).await;
    }
}
