//! Command-line arguments to management requests: the same
//! `vault_core::manage::wire` values whichever mode sends them. What the
//! arguments get wrong is a usage error (exit 2) before anything is sent.

use std::io::Read as _;

use anyhow::Result;
use vault_core::crypto::ProviderSecret;
use vault_core::key::{KeyEnv, KeyId, ProviderKeyId};
use vault_core::manage::wire::{AddProviderKeyRequest, CreateKeyRequest, RotateKeyRequest, Ttl};
use vault_core::money::Micros;
use vault_core::policy::{Budget, BudgetPeriod, load_policy_file};
use vault_core::provider::{Provider, UnknownProvider};

use crate::CreateArgs;
use crate::app::UsageError;

/// A key id argument.
pub(crate) fn key_id(s: &str) -> Result<KeyId> {
    KeyId::parse(s).ok_or_else(|| UsageError(format!("{s:?} is not a key id (key_…)")).into())
}

/// A provider key id argument.
pub(crate) fn provider_key_id(s: &str) -> Result<ProviderKeyId> {
    ProviderKeyId::parse(s)
        .ok_or_else(|| UsageError(format!("{s:?} is not a provider key id (pk_…)")).into())
}

fn ttl(flag: &str, s: &str) -> Result<Ttl> {
    s.parse()
        .map_err(|e| UsageError(format!("{flag}: {e}")).into())
}

/// `keys create`: the policy file, then each flag over it
/// (docs/policy.md#inline-the-api-and-the-cli).
pub(crate) fn create_key(args: CreateArgs) -> Result<CreateKeyRequest> {
    let CreateArgs {
        name,
        policy,
        scopes,
        plan,
        ttl: ttl_flag,
        budget_usd,
        test,
        project,
        parent,
    } = args;
    let mut req = CreateKeyRequest::default();
    if let Some(path) = policy {
        let file = load_policy_file(&path).map_err(|e| UsageError(e.to_string()))?;
        req = req.with_policy(file.policy);
        req.name = file.name;
        req.ttl = match file.ttl {
            Some(d) => Some(ttl("ttl", &format!("{}s", d.as_secs()))?),
            None => None,
        };
        req.permissions = file
            .scopes
            .map(|s| s.iter().map(|x| x.to_string_lossless()).collect());
        req.plan = file.plan;
    }
    if name.is_some() {
        req.name = name;
    }
    if !scopes.is_empty() {
        req.permissions = Some(scopes);
    }
    if plan.is_some() {
        req.plan = plan;
    }
    if let Some(t) = ttl_flag {
        req.ttl = Some(ttl("--ttl", &t)?);
    }
    if let Some(usd) = budget_usd {
        let limit = Micros::from_usd(usd).map_err(|e| UsageError(format!("--budget-usd: {e}")))?;
        req.budget = Some(Budget {
            limit,
            period: BudgetPeriod::Total,
            clamp_explicit_limits: false,
        });
    }
    if test {
        req.env = Some(KeyEnv::Test);
    }
    req.project = project;
    if let Some(p) = parent {
        req.parent = Some(key_id(&p)?);
    }
    Ok(req)
}

/// `keys rotate [--grace 60s]`.
pub(crate) fn rotate_key(grace: Option<&str>) -> Result<RotateKeyRequest> {
    Ok(RotateKeyRequest {
        grace: grace.map(|g| ttl("--grace", g)).transpose()?,
        grace_seconds: None,
    })
}

/// `provider-keys add`: the key from stdin or `--from-env`, never argv.
pub(crate) fn add_provider_key(
    provider: &str,
    name: String,
    from_env: Option<&str>,
    project: Option<String>,
) -> Result<AddProviderKeyRequest> {
    let provider: Provider = provider
        .parse()
        .map_err(|e: UnknownProvider| UsageError(format!("--provider: {e}")))?;
    let api_key = read_secret(from_env)?;
    Ok(AddProviderKeyRequest {
        provider,
        api_key,
        name: Some(name),
        project,
    })
}

/// Refuses a provider key given on the command line
/// (docs/threat-model.md, C7).
pub(crate) fn refuse_argv_secret(given: bool) -> Result<()> {
    if given {
        return Err(UsageError(
            "provider keys are never taken from the command line; pipe the key on stdin or use --from-env VAR".to_owned(),
        )
        .into());
    }
    Ok(())
}

fn read_secret(from_env: Option<&str>) -> Result<ProviderSecret> {
    let raw = match from_env {
        Some(var) => std::env::var(var)
            .map_err(|_| UsageError(format!("--from-env {var}: the variable is not set")))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut s)
                .map_err(|_| {
                    UsageError("the provider key on stdin is not UTF-8 text".to_owned())
                })?;
            s
        }
    };
    let secret = ProviderSecret::new(raw);
    if secret.expose_secret().is_empty() {
        return Err(UsageError(
            "no provider key given: pipe it on stdin or use --from-env VAR".to_owned(),
        )
        .into());
    }
    Ok(secret)
}
