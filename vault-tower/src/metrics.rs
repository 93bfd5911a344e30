//! Counters for `/metrics` (Prometheus text format). Updated by the usage
//! worker, off the request path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vault_core::record::UsageRecord;

/// Upper bounds of the latency histogram, in milliseconds.
const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

/// A counter kept by something else (the policy engine, a revocation
/// bus) and read when `/metrics` is rendered.
type ReadCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One registered counter: name, help text, how to read it.
struct Registered {
    name: &'static str,
    help: &'static str,
    read: ReadCounter,
}

/// Everything `/metrics` reports.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    /// Usage or audit records dropped because the worker's queue was full.
    pub dropped_records: AtomicU64,
    /// Audit writes that failed.
    pub audit_failures: AtomicU64,
    /// Usage batches the store refused.
    pub usage_write_failures: AtomicU64,
    /// Writes of the usage worker retried because the store was
    /// unavailable (docs/replicas.md#when-postgresql-stops).
    pub store_write_retries: AtomicU64,
    /// Budget leases of dead replicas this replica closed
    /// (docs/replicas.md#when-a-replica-dies).
    pub dead_replica_leases_closed: AtomicU64,
    /// Counters kept elsewhere ([`register_counter`](Metrics::register_counter)).
    registered: Mutex<Vec<Registered>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: BTreeMap<(String, u16), u64>,
    denials: BTreeMap<String, u64>,
    shadow_denials: BTreeMap<String, u64>,
    latency_buckets: [u64; LATENCY_BUCKETS_MS.len()],
    latency_count: u64,
    latency_sum_ms: u64,
    spend_micros: BTreeMap<String, u64>,
}

impl Metrics {
    /// Counts one finished or denied call.
    pub fn observe(&self, r: &UsageRecord) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let provider = r.provider.map_or("none", |p| p.as_str()).to_owned();
        *c.requests.entry((provider, r.status)).or_default() += 1;
        if let Some(code) = &r.denial {
            let map = if r.shadow {
                &mut c.shadow_denials
            } else {
                &mut c.denials
            };
            *map.entry(code.clone()).or_default() += 1;
        }
        if r.denial.is_none() || r.shadow {
            for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
                if r.latency_ms <= *le {
                    c.latency_buckets[i] += 1;
                }
            }
            c.latency_count += 1;
            c.latency_sum_ms = c.latency_sum_ms.saturating_add(r.latency_ms);
        }
        if r.cost.0 > 0 {
            let e = c.spend_micros.entry(r.key_id.to_string()).or_default();
            *e = e.saturating_add(r.cost.0);
        }
    }

    /// Adds a counter that something else keeps (e.g. the engine's
    /// `limiter_fallbacks`), rendered as `name` with `help` by reading
    /// `read`. `name` must be a valid Prometheus metric name.
    pub fn register_counter(
        &self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let mut r = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        r.push(Registered {
            name,
            help,
            read: Arc::new(read),
        });
    }

    /// Counts a denial that no key can be blamed for (no or unknown key).
    pub fn observe_unattributed(&self, denial: &vault_core::denial::Denial) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.requests
            .entry(("none".to_owned(), denial.status()))
            .or_default() += 1;
        *c.denials.entry(denial.code().to_owned()).or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP vaultgate_requests_total Proxied requests by provider and status.\n# TYPE vaultgate_requests_total counter\n");
        for ((provider, status), n) in &c.requests {
            let _ = writeln!(
                out,
                "vaultgate_requests_total{{provider=\"{provider}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP vaultgate_denials_total Denied requests by code.\n# TYPE vaultgate_denials_total counter\n");
        for (code, n) in &c.denials {
            let _ = writeln!(out, "vaultgate_denials_total{{code=\"{code}\"}} {n}");
        }
        out.push_str("# HELP vaultgate_shadow_denials_total Requests shadow mode would have denied, by code.\n# TYPE vaultgate_shadow_denials_total counter\n");
        for (code, n) in &c.shadow_denials {
            let _ = writeln!(out, "vaultgate_shadow_denials_total{{code=\"{code}\"}} {n}");
        }
        out.push_str("# HELP vaultgate_request_duration_seconds Time from request to end of response body.\n# TYPE vaultgate_request_duration_seconds histogram\n");
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                out,
                "vaultgate_request_duration_seconds_bucket{{le=\"{}\"}} {}",
                *le as f64 / 1000.0,
                c.latency_buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "vaultgate_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            c.latency_count
        );
        let _ = writeln!(
            out,
            "vaultgate_request_duration_seconds_sum {}",
            c.latency_sum_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "vaultgate_request_duration_seconds_count {}",
            c.latency_count
        );
        out.push_str("# HELP vaultgate_spend_usd_total Settled spend by key, in USD.\n# TYPE vaultgate_spend_usd_total counter\n");
        for (key, micros) in &c.spend_micros {
            let _ = writeln!(
                out,
                "vaultgate_spend_usd_total{{key_id=\"{key}\"}} {}.{:06}",
                micros / 1_000_000,
                micros % 1_000_000
            );
        }
        for (name, help, v) in [
            (
                "vaultgate_dropped_records_total",
                "Usage or audit records dropped because the queue was full.",
                &self.dropped_records,
            ),
            (
                "vaultgate_audit_failures_total",
                "Audit writes that failed.",
                &self.audit_failures,
            ),
            (
                "vaultgate_usage_write_failures_total",
                "Usage batches the store refused.",
                &self.usage_write_failures,
            ),
            (
                "vaultgate_store_write_retries_total",
                "Usage and settlement writes retried because the store was unavailable.",
                &self.store_write_retries,
            ),
            (
                "vaultgate_dead_replica_leases_closed_total",
                "Budget leases of dead replicas this replica closed.",
                &self.dead_replica_leases_closed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        drop(c);
        let registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        for r in registered.iter() {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                (r.read)(),
                name = r.name,
                help = r.help
            );
        }
        out
    }
}
