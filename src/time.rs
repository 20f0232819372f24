//! RFC 3339 timestamps (UTC, microseconds) without going through
//! `fmt::Display`: two of them go into every published event, so this is
//! on the hot path.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall-clock time as nanoseconds since the Unix epoch: 8 bytes where
/// `SystemTime` takes 16, for the store's records (1970 to 2554).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixNanos(u64);

impl UnixNanos {
    /// The current time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Nanoseconds since the Unix epoch.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// The time `nanos` nanoseconds after the Unix epoch.
    pub fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl From<SystemTime> for UnixNanos {
    fn from(time: SystemTime) -> Self {
        let nanos = time.duration_since(UNIX_EPOCH).map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        });
        Self(nanos)
    }
}

impl From<UnixNanos> for SystemTime {
    fn from(time: UnixNanos) -> Self {
        UNIX_EPOCH + Duration::from_nanos(time.0)
    }
}

/// Length of `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
const LEN: usize = 27;

/// A formatted timestamp.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339([u8; LEN]);

impl Rfc3339 {
    /// The timestamp as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01T00:00:00.000000Z")
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn put(buf: &mut [u8], mut value: u64) {
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Formats `time` as RFC 3339 in UTC with microseconds, e.g.
/// `2023-11-14T22:13:20.123000Z`. Times before 1970 or after 9999 are
/// clamped to those bounds.
pub fn rfc3339_micros(time: SystemTime) -> Rfc3339 {
    let (secs, micros) = clamped(time);
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    with_second(secs, |second| {
        out[..SECOND_LEN].copy_from_slice(second.as_bytes())
    });
    put(&mut out[20..26], micros);
    Rfc3339(out)
}

/// Appends `time` to `out` as [`rfc3339_micros`] formats it (the
/// serializer of published events writes straight into its line).
pub fn push_rfc3339_micros(out: &mut String, time: SystemTime) {
    let (secs, micros) = clamped(time);
    with_second(secs, |second| out.push_str(second));
    let mut digits = *b".000000Z";
    put(&mut digits[1..7], micros);
    out.extend(digits.iter().map(|&b| char::from(b)));
}

/// Seconds and microseconds since the epoch, within 1970..=9999.
fn clamped(time: SystemTime) -> (u64, u64) {
    const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    if since.as_secs() > MAX_SECS {
        (MAX_SECS, 999_999)
    } else {
        (since.as_secs(), u64::from(since.subsec_micros()))
    }
}

/// Length of `YYYY-MM-DDTHH:MM:SS`.
const SECOND_LEN: usize = 19;

thread_local! {
    /// The second this thread formatted last. Timestamps formatted one
    /// after another mostly share their second, and the calendar arithmetic
    /// is most of the cost.
    static LAST_SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Calls `f` with `secs` formatted as `YYYY-MM-DDTHH:MM:SS`.
fn with_second<R>(secs: u64, f: impl FnOnce(&str) -> R) -> R {
    LAST_SECOND.with_borrow_mut(|(cached_secs, cached)| {
        // The initial `u64::MAX` is past any clamped second, so it never matches.
        if *cached_secs != secs {
            let (year, month, day) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            let mut out = *b"0000-00-00T00:00:00";
            put(&mut out[0..4], year as u64);
            put(&mut out[5..7], u64::from(month));
            put(&mut out[8..10], u64::from(day));
            put(&mut out[11..13], rem / 3600);
            put(&mut out[14..16], rem % 3600 / 60);
            put(&mut out[17..19], rem % 60);
            cached.clear();
            cached.extend(out.iter().map(|&b| char::from(b)));
            *cached_secs = secs;
        }
        f(cached)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unix_nanos_round_trips_and_subtracts() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let nanos = UnixNanos::from(t);
        assert_eq!(SystemTime::from(nanos), t);
        let later = UnixNanos::from(t + Duration::from_micros(1500));
        assert_eq!(later.since(nanos), Duration::from_micros(1500));
        assert_eq!(nanos.since(later), Duration::ZERO, "never negative");
        assert_eq!(SystemTime::from(UnixNanos::from(UNIX_EPOCH)), UNIX_EPOCH);
    }

    #[test]
    fn matches_humantime_across_the_calendar() {
        let mut secs: u64 = 0;
        // Every ~3.7 days for 400+ years, plus leap days and ends of months.
        while secs < 13_000_000_000 {
            for micros in [0_u64, 1, 123_456, 999_999] {
                let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
                assert_eq!(
                    rfc3339_micros(t).as_str(),
                    humantime::format_rfc3339_micros(t).to_string(),
                    "{secs}.{micros}"
                );
            }
            secs += 317_123;
        }
        for date in [
            "2000-02-29T23:59:59.999999Z",
            "2024-02-29T00:00:00.000000Z",
            "1970-01-01T00:00:00.000000Z",
        ] {
            let t = humantime::parse_rfc3339(date).unwrap();
            assert_eq!(rfc3339_micros(t).as_str(), date);
        }
    }

    #[test]
    fn the_cached_second_is_only_reused_within_its_second() {
        let second = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let next = second + Duration::from_secs(1);
        for (t, expected) in [
            (second, "2023-11-14T22:13:20.000000Z"),
            (
                second + Duration::from_micros(999_999),
                "2023-11-14T22:13:20.999999Z",
            ),
            (next, "2023-11-14T22:13:21.000000Z"),
            (
                second + Duration::from_micros(5),
                "2023-11-14T22:13:20.000005Z",
            ),
        ] {
            assert_eq!(rfc3339_micros(t).as_str(), expected);
            let mut pushed = String::from("at ");
            push_rfc3339_micros(&mut pushed, t);
            assert_eq!(pushed, format!("at {expected}"));
        }
    }

    #[test]
    fn out_of_range_is_clamped() {
        assert_eq!(
            rfc3339_micros(UNIX_EPOCH - Duration::from_secs(5)).as_str(),
            "1970-01-01T00:00:00.000000Z"
        );
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339_micros(far).as_str(), "9999-12-31T23:59:59.999999Z");
    }
}
