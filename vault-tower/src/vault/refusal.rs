//! `Refusal`: every way the request path says no, and [`Refusal::respond`],
//! the one place a refusal becomes its answer (docs/api.md#errors), its
//! usage record or settlement (docs/budgets.md#settlement), its audit event
//! and its limit headers (docs/api.md#headers). A check added to a phase
//! returns a `Refusal` and gets all four.

use std::sync::Arc;

use http::Response;
use vault_core::audit::{AuditEvent, AuditKind};
use vault_core::denial::Denial;
use vault_core::policy::LimitHeaders;
use vault_core::provider::Provider;
use vault_core::record::KeyRecord;

use super::body::MeteredBody;
use super::sink::{PendingCall, usage_record};
use crate::context::VaultContext;
use crate::response::{add_limit_headers, denial_response};

/// A request the layer answers itself, with what it must record. Small:
/// phases return it in a `Result` on the hot path, so an admitted call (a
/// few hundred bytes) is boxed here, on the rare refusals after admission
/// (no provider key, a panicking inner service), not moved with every
/// `Result`. Never
/// reaches the inner service (or, for [`cut`](Refusal::cut), no longer
/// waits for it).
pub(crate) struct Refusal {
    denial: Denial,
    of: Refused,
}

/// Whose request was refused and how far it got: what the refusal records.
enum Refused {
    /// No key was found (or none looked for): counted in the metrics only.
    Anonymous,
    /// A key's request refused before admission: a usage record and an
    /// audit event; the limits the policy engine reported, if it got there.
    Key {
        who: Attribution,
        limits: LimitHeaders,
    },
    /// An admitted call refused before anything was sent: its reservation
    /// is released and its record carries the denial.
    NotSent {
        call: Box<PendingCall>,
        limits: LimitHeaders,
    },
    /// An admitted call that failed after the request may have reached the
    /// provider: it is charged its reservation.
    Cut {
        call: Box<PendingCall>,
        limits: LimitHeaders,
    },
}

/// The key a refused request presented and what it asked for, for its
/// usage record and audit event.
pub(crate) struct Attribution {
    key: Arc<KeyRecord>,
    provider: Option<Provider>,
    endpoint: String,
    model: Option<String>,
}

impl Attribution {
    /// `key`'s request to `endpoint` (`METHOD /path`).
    pub(crate) fn new(
        key: Arc<KeyRecord>,
        provider: Option<Provider>,
        endpoint: String,
        model: Option<String>,
    ) -> Self {
        Attribution {
            key,
            provider,
            endpoint,
            model,
        }
    }
}

impl Refusal {
    /// A request refused before any key was found.
    pub(crate) fn anonymous(denial: Denial) -> Self {
        Refusal {
            denial,
            of: Refused::Anonymous,
        }
    }

    /// A key's request refused before the policy engine was asked.
    pub(crate) fn of_key(denial: Denial, who: Attribution) -> Self {
        Self::by_policy(denial, who, LimitHeaders::default())
    }

    /// A key's request refused by (or while asking) the policy engine, with
    /// the limits it reported.
    pub(crate) fn by_policy(denial: Denial, who: Attribution, limits: LimitHeaders) -> Self {
        Refusal {
            denial,
            of: Refused::Key { who, limits },
        }
    }

    /// An admitted call refused before it was sent.
    pub(crate) fn not_sent(denial: Denial, call: PendingCall, limits: LimitHeaders) -> Self {
        Refusal {
            denial,
            of: Refused::NotSent {
                call: Box::new(call),
                limits,
            },
        }
    }

    /// An admitted call that failed after it may have been sent.
    pub(crate) fn cut(denial: Denial, call: PendingCall, limits: LimitHeaders) -> Self {
        Refusal {
            denial,
            of: Refused::Cut {
                call: Box::new(call),
                limits,
            },
        }
    }

    /// The answer: the denial's JSON error and limit headers, with its usage
    /// record and audit event queued or its call settled.
    pub(crate) fn respond<B>(self, ctx: &VaultContext) -> Response<MeteredBody<B>> {
        let Refusal { denial, of } = self;
        let limits = match of {
            Refused::Anonymous => {
                ctx.metrics.observe_unattributed(&denial);
                tracing::debug!(code = denial.code(), "unauthenticated request denied");
                LimitHeaders::default()
            }
            Refused::Key { who, limits } => {
                record_denial(ctx, &denial, who);
                limits
            }
            Refused::NotSent { mut call, limits } => {
                call.set_status(denial.status());
                call.set_denial(denial.code());
                call.finish_unanswered(false);
                limits
            }
            Refused::Cut { mut call, limits } => {
                call.set_status(denial.status());
                call.finish_unanswered(true);
                limits
            }
        };
        let mut resp = denial_response(&denial).map(MeteredBody::full);
        add_limit_headers(resp.headers_mut(), &limits);
        resp
    }
}

/// Queues a refused key's usage record and `request_denied` audit event.
fn record_denial(ctx: &VaultContext, denial: &Denial, who: Attribution) {
    let Attribution {
        key,
        provider,
        endpoint,
        model,
    } = who;
    let mut record = usage_record(ctx.clock.now(), &key, provider, endpoint, model);
    record.status = denial.status();
    record.denial = Some(denial.code().to_owned());
    let event = AuditEvent {
        kind: AuditKind::RequestDenied,
        actor: Some(key.id.to_string()),
        target: Some(record.endpoint.clone()),
        project: Some(key.project.clone()),
        detail: serde_json::json!({"code": denial.code(), "status": denial.status(), "message": denial.message()}),
    };
    ctx.sink.denied(record, Some(event));
}
