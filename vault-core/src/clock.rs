//! Time as the rest of the crate sees it: unix milliseconds from a [`Clock`]
//! that tests can control.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Serialize};

/// Milliseconds since the unix epoch, UTC.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// Adds milliseconds, saturating.
    pub fn plus_millis(self, ms: i64) -> UnixMillis {
        UnixMillis(self.0.saturating_add(ms))
    }

    /// Whole seconds since the epoch, rounded up (for `X-RateLimit-Reset`).
    pub fn ceil_secs(self) -> i64 {
        self.0.div_euclid(1000) + i64::from(self.0.rem_euclid(1000) != 0)
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-26T08:00:00.000Z`.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => {
                let fmt = time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                );
                t.format(&fmt).unwrap_or_else(|_| self.0.to_string())
            }
            Err(_) => self.0.to_string(),
        }
    }

    /// The start of the UTC day containing `self`.
    pub fn start_of_utc_day(self) -> UnixMillis {
        UnixMillis(self.0 - self.0.rem_euclid(86_400_000))
    }

    /// The start of the UTC calendar month containing `self`.
    pub fn start_of_utc_month(self) -> UnixMillis {
        let days = self.0.div_euclid(86_400_000);
        let (y, m, _) = civil_from_days(days);
        UnixMillis(days_from_civil(y, m, 1) * 86_400_000)
    }

    /// The start of the next UTC calendar month after `self`.
    pub fn start_of_next_utc_month(self) -> UnixMillis {
        let days = self.0.div_euclid(86_400_000);
        let (y, m, _) = civil_from_days(days);
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        UnixMillis(days_from_civil(y, m, 1) * 86_400_000)
    }
}

/// Proleptic Gregorian date from days since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in unix milliseconds.
    fn now(&self) -> UnixMillis;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to: for tests, with no sleeps.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: UnixMillis) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start.0)))
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, t: UnixMillis) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        UnixMillis(self.0.load(Ordering::SeqCst))
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_boundaries() {
        // 2026-11-26T08:18:54Z
        let t = UnixMillis(1_795_681_134_000);
        assert_eq!(t.to_rfc3339(), "2026-11-26T08:18:54.000Z");
        assert_eq!(
            t.start_of_utc_day().to_rfc3339(),
            "2026-11-26T00:00:00.000Z"
        );
        assert_eq!(
            t.start_of_utc_month().to_rfc3339(),
            "2026-11-01T00:00:00.000Z"
        );
        assert_eq!(
            t.start_of_next_utc_month().to_rfc3339(),
            "2026-12-01T00:00:00.000Z"
        );
        let dec = UnixMillis(1_798_675_200_000); // 2026-12-31T00:00:00Z
        assert_eq!(
            dec.start_of_next_utc_month().to_rfc3339(),
            "2027-01-01T00:00:00.000Z"
        );
        let feb29 = UnixMillis(1_709_164_800_000); // 2024-02-29T00:00:00Z
        assert_eq!(
            feb29.start_of_utc_month().to_rfc3339(),
            "2024-02-01T00:00:00.000Z"
        );
        assert_eq!(UnixMillis(1001).ceil_secs(), 2);
        assert_eq!(UnixMillis(1000).ceil_secs(), 1);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(UnixMillis(5));
        assert_eq!(c.now(), UnixMillis(5));
        c.advance(10);
        assert_eq!(c.now(), UnixMillis(15));
    }
}
