//! Phase 3, `authorise`: the key's chain, its policy (scopes, allowlists,
//! limits) and the reservation of the most the call can cost
//! (docs/policy.md, docs/budgets.md#reservation). From here the call
//! settles exactly once, even if the request future is dropped
//! (docs/budgets.md#settlement).

use std::sync::Arc;
use std::time::Instant;

use http::Method;
use vault_core::denial::Denial;
use vault_core::money::Micros;
use vault_core::policy::RequestFacts;
use vault_core::record::KeyRecord;

use super::{Admitted, Call, Caller, Payload};
use crate::context::VaultContext;
use crate::vault::refusal::Refusal;
use crate::vault::sink::{PendingCall, usage_record};

/// Admits `caller`'s request, or refuses it as the policy says. `started`
/// is when the request arrived (the call's latency counts from there).
pub(super) async fn authorise(
    ctx: &VaultContext,
    method: &Method,
    caller: Caller,
    mut payload: Payload,
    started: Instant,
) -> Result<Admitted, Refusal> {
    let model = payload.inspection.model.take();
    let chain = match ctx.chain(caller.key.clone()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "loading the key's ancestors failed");
            let who = caller.attribution(model.as_deref());
            return Err(Refusal::of_key(Denial::for_store_error(&e), who));
        }
    };
    let i = &payload.inspection;
    let facts = RequestFacts {
        method: method.as_str(),
        provider: caller.provider,
        path: &caller.path,
        model: model.as_deref(),
        max_output_tokens: i.max_output_tokens,
        body_chars: i.body_chars,
        stream: i.stream,
        input_tokens_bound: i.input_tokens_bound,
        input_unbounded: i.input_unbounded,
        output_multiplier: i.output_multiplier,
        multipart: payload.multipart,
    };
    let grant = match ctx.engine.check(&chain, &facts).await {
        Ok(g) => g,
        Err((d, mut limits)) => {
            if limits.budget_remaining.is_none() {
                limits.budget_remaining = budget_remaining(ctx, &chain).await;
            }
            let who = caller.attribution(model.as_deref());
            return Err(Refusal::by_policy(d, who, limits));
        }
    };
    let shadow = grant.shadow_denial.as_ref().map(Denial::code);
    let Caller {
        key,
        provider,
        path,
        endpoint,
    } = caller;
    let mut record = usage_record(ctx.clock.now(), &key, Some(provider), endpoint, model);
    if let Some(code) = shadow {
        // Shadow mode: the call goes ahead; its record says what would have
        // been denied.
        record.denial = Some(code.to_owned());
        record.shadow = true;
    }
    let call = Call {
        limits: grant.headers,
        clamp: grant.clamp_output_tokens,
        shadow,
        provider,
        stream: payload.inspection.stream,
        add_usage: payload.asks_usage(provider),
        pending: PendingCall::new(ctx.sink.clone(), grant, record, started),
    };
    Ok(Admitted {
        key,
        path,
        payload,
        call,
    })
}

/// What the nearest budget in `chain` has left, for the headers of a denial
/// the engine made before it reached the budget: docs/api.md#headers promises
/// `X-Budget-Remaining-USD` on every response to a budgeted key.
async fn budget_remaining(ctx: &VaultContext, chain: &[Arc<KeyRecord>]) -> Option<Micros> {
    let (key, budget) = chain
        .iter()
        .find_map(|k| k.policy.budget.map(|b| (&k.id, b)))?;
    let now = ctx.clock.now();
    let line = budget.line(key.clone(), now);
    match ctx.store.budget_usage(&line, now).await {
        Ok(u) => Some(u.remaining(budget.limit)),
        Err(e) => {
            tracing::warn!(error = %e, "reading the budget for a denial's headers failed");
            None
        }
    }
}
