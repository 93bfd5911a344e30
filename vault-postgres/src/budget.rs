//! The budget arithmetic of vault-core's `store/budget.rs` (private to
//! vault-core), repeated here so that `PostgresStore` decides exactly as
//! `MemoryStore` and `SqliteStore` do; the conformance suite holds the
//! three to the same answers.

use vault_core::money::Micros;
use vault_core::store::StoreError;

/// The least a reservation of `want` may be granted: `at_least`, at least
/// one micro-dollar, never above `want` (zero for a zero `want`, which
/// always fits).
pub(crate) fn floor(want: Micros, at_least: Micros) -> Micros {
    if want == Micros::ZERO {
        return Micros::ZERO;
    }
    at_least.max(Micros(1)).min(want)
}

/// How much a reservation may hold given what is `remaining` on its line.
pub(crate) fn reservable(
    remaining: Micros,
    want: Micros,
    at_least: Micros,
) -> Result<Micros, StoreError> {
    if want == Micros::ZERO {
        return Ok(Micros::ZERO);
    }
    if remaining < floor(want, at_least) {
        return Err(StoreError::BudgetExceeded { remaining });
    }
    Ok(want.min(remaining))
}

/// What closing a child's carve-out does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed {
    /// Charged to the parent now: the child's spend, capped at the carve-out.
    pub(crate) charge: Micros,
    /// Still held on the parent's line for the child's open calls.
    pub(crate) residual: Micros,
    /// What the open calls may still charge the parent in all.
    pub(crate) chargeable: Micros,
}

/// Closes a carve-out of `carved` whose child spent `spent` and whose open
/// calls and carve-outs hold `open`.
pub(crate) fn close_carve_out(carved: Micros, spent: Micros, open: Micros) -> Closed {
    let charge = spent.min(carved);
    let chargeable = carved.saturating_sub(charge);
    Closed {
        charge,
        residual: open.min(chargeable),
        chargeable,
    }
}

/// What a hold settled through a closed carve-out does to the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Passed {
    /// Charged to the parent's line and spend.
    pub(crate) charge: Micros,
    /// Released from the parent's line.
    pub(crate) release: Micros,
    /// The carve-out's new residual (0: it is gone).
    pub(crate) residual: Micros,
    /// What is left chargeable.
    pub(crate) chargeable: Micros,
}

/// Passes a hold of `held` settled at `actual` through a closed carve-out
/// holding `residual` with `chargeable` left.
pub(crate) fn pass_through(
    residual: Micros,
    chargeable: Micros,
    held: Micros,
    actual: Micros,
) -> Passed {
    let charge = actual.min(chargeable);
    let chargeable = chargeable.saturating_sub(charge);
    let mut release = held.min(residual);
    let mut residual = residual.saturating_sub(release);
    if chargeable == Micros::ZERO {
        release = release.saturating_add(residual);
        residual = Micros::ZERO;
    }
    Passed {
        charge,
        release,
        residual,
        chargeable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_reservable() {
        let m = Micros;
        assert_eq!(reservable(m(0), m(0), m(0)).unwrap(), m(0));
        assert_eq!(reservable(m(10), m(5), m(1)).unwrap(), m(5));
        assert_eq!(reservable(m(3), m(5), m(1)).unwrap(), m(3));
        assert!(reservable(m(2), m(5), m(3)).is_err());
        assert!(reservable(m(0), m(5), m(0)).is_err());
        assert_eq!(reservable(m(5), m(5), m(9)).unwrap(), m(5));
        assert_eq!(floor(m(5), m(9)), m(5));
        assert_eq!(floor(m(0), m(9)), m(0));
    }

    #[test]
    fn boundary_closed_carve_outs() {
        let m = Micros;
        let c = close_carve_out(m(3_000), m(3_500), m(100));
        assert_eq!((c.charge, c.residual, c.chargeable), (m(3_000), m(0), m(0)));
        let p = pass_through(m(300), m(50), m(100), m(80));
        assert_eq!((p.charge, p.release, p.residual), (m(50), m(300), m(0)));
    }
}
