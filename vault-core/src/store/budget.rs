//! The budget arithmetic every backend shares, so that `MemoryStore`,
//! `SqliteStore` and stores outside this crate (`PostgresStore`) decide
//! identically; the conformance suite holds them to the same answers.
//!
//! The rules, as both backends implement them:
//! - A line is (key, limit, period start). `settled` is kept per (key,
//!   period start); `reserved` is every unsettled reservation on it plus the
//!   carve-outs of children held on it; remaining = limit − settled − reserved.
//! - A reservation past its `expires_at` still counts as reserved until it is
//!   settled or swept: the sweep will charge it in full, so freeing it earlier
//!   would let new reservations and the late charge together pass the limit.
//! - Settling adds the real cost to the line's period and to the key's
//!   lifetime `spend`. Settling a child's carve-out (on revocation or expiry)
//!   charges the parent's line, and the parent's `spend`, with the child's
//!   lifetime spend capped at the amount carved, deepest descendants first so
//!   that grandchildren's spend reaches the root.
//! - Closing a carve-out (revocation or expiry) does not give back what the
//!   child's calls still hold: the carve-out shrinks to the child's *open*
//!   amount (what its reservations and its own children's carve-outs hold,
//!   [`close_carve_out`]) and stays on the parent's line until those calls
//!   settle. Each of them, as it settles, charges its cost to the parent
//!   (still capped at the amount carved) and releases its part of the
//!   carve-out ([`pass_through`]), up the chain of closed carve-outs.

use super::StoreError;
use crate::money::Micros;

/// How much a reservation may hold given what is `remaining` on its line:
/// as much of `want` as fits, but at least `at_least` (at least one
/// micro-dollar when `want` is not zero), else [`StoreError::BudgetExceeded`].
/// A zero `want` is a zero reservation, which always fits.
pub fn reservable(remaining: Micros, want: Micros, at_least: Micros) -> Result<Micros, StoreError> {
    if want == Micros::ZERO {
        return Ok(Micros::ZERO);
    }
    if remaining < floor(want, at_least) {
        return Err(StoreError::BudgetExceeded { remaining });
    }
    Ok(want.min(remaining))
}

/// The least a reservation of `want` may be granted: `at_least`, at least
/// one micro-dollar, never above `want` (zero for a zero `want`, which
/// always fits).
pub fn floor(want: Micros, at_least: Micros) -> Micros {
    if want == Micros::ZERO {
        return Micros::ZERO;
    }
    at_least.max(Micros(1)).min(want)
}

/// Whether a carve-out of `amount` fits in `remaining`, else the error.
pub fn check_carve_out(remaining: Micros, amount: Micros) -> Result<(), StoreError> {
    if remaining < amount {
        return Err(StoreError::BudgetExceeded { remaining });
    }
    Ok(())
}

/// What closing a child's carve-out of `carved` does, given the child's
/// lifetime `spent` and the `open` amount its calls and carve-outs hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// Charged to the parent now: the spend, capped at the carve-out.
    pub charge: Micros,
    /// Still held on the parent's line for the open calls (0: the
    /// carve-out is gone).
    pub residual: Micros,
    /// What the open calls may still charge the parent in all.
    pub chargeable: Micros,
}

/// Closes a carve-out of `carved` (see the module docs).
pub fn close_carve_out(carved: Micros, spent: Micros, open: Micros) -> Closed {
    let charge = spent.min(carved);
    let chargeable = carved.saturating_sub(charge);
    Closed {
        charge,
        residual: open.min(chargeable),
        chargeable,
    }
}

/// What a hold of `held` settled at `actual` on a child whose carve-out is
/// closed (holding `residual`, `chargeable` left) does to the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passed {
    /// Charged to the parent's line and spend.
    pub charge: Micros,
    /// Released from the parent's line (what the carve-out holds less).
    pub release: Micros,
    /// The carve-out's new residual (0: it is gone).
    pub residual: Micros,
    /// What is left chargeable.
    pub chargeable: Micros,
}

/// Passes a settled hold through a closed carve-out (see the module docs).
/// Once nothing more is chargeable, or nothing is held, the carve-out goes.
pub fn pass_through(residual: Micros, chargeable: Micros, held: Micros, actual: Micros) -> Passed {
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
        assert_eq!(reservable(m(3), m(5), m(3)).unwrap(), m(3));
        assert!(reservable(m(2), m(5), m(3)).is_err());
        // A zero floor with a non-zero want still needs one micro-dollar.
        assert!(reservable(m(0), m(5), m(0)).is_err());
        // A floor above `want` is capped at `want`.
        assert_eq!(reservable(m(5), m(5), m(9)).unwrap(), m(5));
        assert_eq!(floor(m(5), m(9)), m(5));
        assert_eq!(floor(m(0), m(9)), m(0));
        assert!(check_carve_out(m(4), m(5)).is_err());
        assert!(check_carve_out(m(5), m(5)).is_ok());
    }

    #[test]
    fn boundary_closed_carve_outs_keep_what_open_calls_hold() {
        let m = Micros;
        // $3 carved, nothing spent, $2.90 held by a call: $2.90 stays held.
        let c = close_carve_out(m(3_000), m(0), m(2_900));
        assert_eq!(
            (c.charge, c.residual, c.chargeable),
            (m(0), m(2_900), m(3_000))
        );
        // Spend past the carve-out is capped; nothing more is chargeable.
        let c = close_carve_out(m(3_000), m(3_500), m(100));
        assert_eq!((c.charge, c.residual, c.chargeable), (m(3_000), m(0), m(0)));
        // The call settles: charged in full, the carve-out is gone.
        let p = pass_through(m(2_900), m(3_000), m(2_900), m(2_900));
        assert_eq!(
            (p.charge, p.release, p.residual),
            (m(2_900), m(2_900), m(0))
        );
        // One of two calls settles at less than it held.
        let p = pass_through(m(300), m(3_000), m(100), m(40));
        assert_eq!((p.charge, p.release, p.residual), (m(40), m(100), m(200)));
        // Billed past the cap: charged the cap, everything released.
        let p = pass_through(m(300), m(50), m(100), m(80));
        assert_eq!((p.charge, p.release, p.residual), (m(50), m(300), m(0)));
    }
}
