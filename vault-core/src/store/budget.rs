//! The budget arithmetic every backend shares, so that `MemoryStore` and
//! `SqliteStore` decide identically.
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

use super::StoreError;
use crate::money::Micros;

/// How much a reservation may hold given what is `remaining` on its line:
/// as much of `want` as fits, but at least `at_least` (at least one
/// micro-dollar when `want` is not zero), else [`StoreError::BudgetExceeded`].
/// A zero `want` is a zero reservation, which always fits.
pub(super) fn reservable(
    remaining: Micros,
    want: Micros,
    at_least: Micros,
) -> Result<Micros, StoreError> {
    if want == Micros::ZERO {
        return Ok(Micros::ZERO);
    }
    let floor = at_least.max(Micros(1)).min(want);
    if remaining < floor {
        return Err(StoreError::BudgetExceeded { remaining });
    }
    Ok(want.min(remaining))
}

/// Whether a carve-out of `amount` fits in `remaining`, else the error.
pub(super) fn check_carve_out(remaining: Micros, amount: Micros) -> Result<(), StoreError> {
    if remaining < amount {
        return Err(StoreError::BudgetExceeded { remaining });
    }
    Ok(())
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
        assert!(check_carve_out(m(4), m(5)).is_err());
        assert!(check_carve_out(m(5), m(5)).is_ok());
    }
}
