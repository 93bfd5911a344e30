//! Money as integer micro-dollars. Prices round up; arithmetic saturates.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of US dollars in millionths (micro-dollars). Never a float.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Micros(pub u64);

/// Dollars that cannot be represented: negative, not finite, or above
/// $1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a dollar amount must be a finite number between 0 and 1000000000")]
pub struct BadAmount;

impl Micros {
    /// Zero dollars.
    pub const ZERO: Micros = Micros(0);
    /// The largest amount.
    pub const MAX: Micros = Micros(u64::MAX);

    /// Converts a dollar figure from a config or policy file, rounding to the
    /// nearest micro-dollar. This is the only place a float becomes money.
    pub fn from_usd(usd: f64) -> Result<Micros, BadAmount> {
        if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
            return Err(BadAmount);
        }
        Ok(Micros((usd * 1e6).round() as u64))
    }

    /// Adds, saturating at the maximum.
    pub fn saturating_add(self, o: Micros) -> Micros {
        Micros(self.0.saturating_add(o.0))
    }

    /// Subtracts, saturating at zero.
    pub fn saturating_sub(self, o: Micros) -> Micros {
        Micros(self.0.saturating_sub(o.0))
    }

    /// The cost of `tokens` at `per_million` micro-dollars per million
    /// tokens, rounded up, saturating.
    pub fn for_tokens(tokens: u64, per_million: Micros) -> Micros {
        let product = u128::from(tokens) * u128::from(per_million.0);
        let cost = product.div_ceil(1_000_000);
        Micros(u64::try_from(cost).unwrap_or(u64::MAX))
    }

    /// How many whole tokens `self` buys at `per_million`, rounding down.
    /// `None` when the price is zero (unbounded).
    pub fn tokens_affordable(self, per_million: Micros) -> Option<u64> {
        if per_million.0 == 0 {
            return None;
        }
        let t = u128::from(self.0) * 1_000_000 / u128::from(per_million.0);
        Some(u64::try_from(t).unwrap_or(u64::MAX))
    }

    /// Dollars with six decimals, e.g. `4.990000`: a numeric header value.
    pub fn to_usd_string(self) -> String {
        format!("{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.to_usd_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(Micros::from_usd(5.0).unwrap(), Micros(5_000_000));
        assert_eq!(Micros::from_usd(0.15).unwrap(), Micros(150_000));
        assert!(Micros::from_usd(-1.0).is_err());
        assert!(Micros::from_usd(f64::NAN).is_err());
        assert!(Micros::from_usd(f64::INFINITY).is_err());
        assert_eq!(Micros(4_990_000).to_usd_string(), "4.990000");
        assert_eq!(Micros(1).to_usd_string(), "0.000001");
    }

    #[test]
    fn token_costs_round_up_and_saturate() {
        // 1 token at $0.15/M = 0.15 micro-dollars → 1.
        assert_eq!(Micros::for_tokens(1, Micros(150_000)), Micros(1));
        assert_eq!(
            Micros::for_tokens(1_000_000, Micros(150_000)),
            Micros(150_000)
        );
        assert_eq!(Micros::for_tokens(u64::MAX, Micros(u64::MAX)), Micros::MAX);
        assert_eq!(
            Micros(150_000).tokens_affordable(Micros(150_000)),
            Some(1_000_000)
        );
        assert_eq!(Micros(1).tokens_affordable(Micros(0)), None);
        assert_eq!(Micros::MAX.saturating_add(Micros(1)), Micros::MAX);
        assert_eq!(Micros(1).saturating_sub(Micros(2)), Micros::ZERO);
    }
}
