//! The retry policy the webhook injects, as pure functions: which answers
//! are worth another attempt, and how long to wait first.
//!
//! - A throttled answer (a status of the account's `throttleStatuses`, 429
//!   by default: DESIGN.md §3a) is retried for every method: the upstream
//!   refused the request, it did not process it.
//! - A transient failure (no answer, a timeout, 408, 500, 502, 503, 504) is
//!   retried only when the request may be replayed: an idempotent method
//!   (GET, HEAD, OPTIONS, PUT, DELETE) or an `Idempotency-Key` header. A POST
//!   that timed out may already have been applied upstream (issue 12, item 4).
//! - Anything else (validation, malformed request, authentication) never is.
//!
//! The n-th wait lies within [base·2^(n−1), 2·base·2^(n−1)], capped at the
//! maximum: about 1, 2, 4 s with jitter, as Sales Layer asks, never an almost
//! immediate retry. `Retry-After` (delta-seconds or an HTTP date) is a floor;
//! without one the backoff alone decides (issue 12, item 5).

use std::time::{Duration, SystemTime};

/// The statuses that mean "throttled" on this account (400–599), as a set.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ThrottleStatuses {
    /// Bit `code - 400` is set for each throttle status.
    bits: [u64; 4],
}

impl Default for ThrottleStatuses {
    /// 429 alone.
    fn default() -> Self {
        Self::from_codes(&saleslayer_contract::DEFAULT_THROTTLE_STATUSES)
            .unwrap_or(Self { bits: [0; 4] })
    }
}

impl std::fmt::Debug for ThrottleStatuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.codes()).finish()
    }
}

impl ThrottleStatuses {
    /// The set of `codes`, each from 400 to 599; `None` if one is not.
    pub fn from_codes(codes: &[u16]) -> Option<Self> {
        let mut bits = [0u64; 4];
        for &code in codes {
            let index = usize::from(code.checked_sub(400).filter(|i| *i < 200)?);
            bits[index / 64] |= 1 << (index % 64);
        }
        Some(Self { bits })
    }

    /// `SALESLAYER_THROTTLE_STATUSES`: codes separated by commas, e.g. `429,503`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let codes = saleslayer_contract::parse_throttle_statuses(text)?;
        Self::from_codes(&codes).ok_or_else(|| "a status is out of range".into())
    }

    /// Whether `status` means throttled.
    pub fn contains(&self, status: u16) -> bool {
        match status.checked_sub(400).map(usize::from) {
            Some(index) if index < 200 => self.bits[index / 64] & (1 << (index % 64)) != 0,
            _ => false,
        }
    }

    /// The codes, ascending.
    pub fn codes(&self) -> Vec<u16> {
        (400..600).filter(|&code| self.contains(code)).collect()
    }
}

/// `SALESLAYER_RETRY_*` and `SALESLAYER_THROTTLE_STATUSES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub throttle_statuses: ThrottleStatuses,
}

/// A `Retry-After` longer than this is not waited for: the caller gets the
/// throttled answer at once rather than a request that hangs for minutes.
pub const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What came back from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer, with its `Retry-After` when it had one.
    Answer {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused, reset, timed out, body cut short.
    Unreachable,
}

/// Whether a request may be sent again after a failure that may have
/// reached the upstream: an idempotent method, or an `Idempotency-Key`.
pub fn replayable(method: &str, has_idempotency_key: bool) -> bool {
    has_idempotency_key || matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE")
}

/// Failures after which the upstream may or may not have acted.
fn transient(status: u16) -> bool {
    matches!(status, 408 | 500 | 502 | 503 | 504)
}

impl RetryPolicy {
    /// Whether `status` is throttling on this account.
    pub fn throttled(&self, status: u16) -> bool {
        self.throttle_statuses.contains(status)
    }

    /// The wait before attempt `attempt + 1`, after attempt `attempt`
    /// (1-based) of a request (`replayable`: see [`replayable`]) ended in
    /// `outcome`; `None` when there is no next attempt. `unit` is a uniform
    /// draw from `[0, 1)`: the jitter, a parameter so tests choose it.
    pub fn next_delay(
        &self,
        attempt: u32,
        outcome: Outcome,
        replayable: bool,
        unit: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts.max(1) {
            return None;
        }
        let retry_after = match outcome {
            Outcome::Answer {
                status,
                retry_after,
            } if self.throttled(status) => retry_after,
            Outcome::Answer {
                status,
                retry_after,
            } if transient(status) && replayable => retry_after,
            Outcome::Unreachable if replayable => None,
            _ => return None,
        };
        if retry_after.is_some_and(|wait| wait > LONGEST_RETRY_AFTER) {
            return None;
        }
        let backoff = self.backoff(attempt, unit);
        Some(retry_after.map_or(backoff, |floor| floor.max(backoff)))
    }

    /// `base × 2^(attempt-1)`, saturating: the shortest wait after attempt
    /// `attempt` (before the cap).
    pub fn backoff_floor(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base_delay.saturating_mul(1u32 << doublings)
    }

    /// The wait after attempt `attempt` for the draw `unit`: the floor times
    /// `1 + unit`, capped at `max_delay`.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let floor = self.backoff_floor(attempt);
        let jitter = floor.mul_f64(unit.clamp(0.0, 1.0));
        floor.saturating_add(jitter).min(self.max_delay)
    }
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3), the
/// wait from `now`; a date in the past is no wait; garbage reads as absent.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A number too large for u64 is still "very long".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(1_000),
        max_delay: Duration::from_millis(8_000),
        throttle_statuses: ThrottleStatuses { bits: [0; 4] },
    };

    fn policy(throttle: &[u16]) -> RetryPolicy {
        RetryPolicy {
            throttle_statuses: ThrottleStatuses::from_codes(throttle).expect("codes"),
            ..POLICY
        }
    }

    fn answer(status: u16) -> Outcome {
        Outcome::Answer {
            status,
            retry_after: None,
        }
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn throttle_statuses_parse_from_the_injected_variable() {
        let parsed = ThrottleStatuses::parse(" 429, 503 ,").expect("valid");
        assert_eq!(parsed.codes(), vec![429, 503]);
        assert!(parsed.contains(503) && !parsed.contains(500) && !parsed.contains(200));
        assert_eq!(ThrottleStatuses::default().codes(), vec![429]);
        for bad in ["", "abc", "200", "600", "429,70000", "-1"] {
            assert!(ThrottleStatuses::parse(bad).is_err(), "{bad:?}");
        }
        assert!(!parsed.contains(u16::MAX) && !parsed.contains(0));
        assert_eq!(format!("{parsed:?}"), "{429, 503}");
    }

    #[test]
    fn the_nth_wait_lies_between_one_and_two_floors_capped_at_the_maximum() {
        let p = policy(&[429]);
        let waits = |unit| -> Vec<u64> {
            (1..=3)
                .map(|n| p.next_delay(n, answer(429), false, unit))
                .map(|d| d.map_or(0, |d| d.as_millis() as u64))
                .collect()
        };
        // Never an almost immediate retry: the least draw waits the floor.
        assert_eq!(waits(0.0), [1_000, 2_000, 4_000]);
        assert_eq!(waits(0.5), [1_500, 3_000, 6_000]);
        let capped: Vec<u64> = (1..=5)
            .map(|n| p.backoff(n, 0.99).as_millis() as u64)
            .collect();
        assert_eq!(capped, vec![1_990, 3_980, 7_960, 8_000, 8_000]);
        assert_eq!(p.backoff(u32::MAX, 1.0), ms(8_000));
    }

    #[test]
    fn writes_are_retried_only_when_refused_or_replayable() {
        let p = policy(&[429, 503]);
        // Throttled: refused, not processed, so every method goes again.
        for status in [429, 503] {
            assert!(
                p.next_delay(1, answer(status), false, 0.0).is_some(),
                "{status}"
            );
        }
        // It may have been applied: a POST without an Idempotency-Key is not replayed.
        for outcome in [
            answer(500),
            answer(502),
            answer(504),
            answer(408),
            Outcome::Unreachable,
        ] {
            assert_eq!(p.next_delay(1, outcome, false, 0.0), None, "{outcome:?}");
            assert_eq!(
                p.next_delay(1, outcome, true, 0.0),
                Some(ms(1_000)),
                "{outcome:?}"
            );
        }
        assert!(
            replayable("GET", false) && replayable("PUT", false) && replayable("DELETE", false)
        );
        assert!(replayable("HEAD", false) && replayable("OPTIONS", false));
        assert!(!replayable("POST", false) && !replayable("PATCH", false));
        assert!(replayable("POST", true) && replayable("PATCH", true));
    }

    #[test]
    fn client_errors_and_successes_are_never_retried() {
        let p = policy(&[429]);
        for status in [200, 201, 204, 301, 304, 400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(p.next_delay(1, answer(status), true, 0.5), None, "{status}");
        }
        // 503 is a transient failure unless the account names it throttling.
        assert_eq!(p.next_delay(1, answer(503), false, 0.0), None);
    }

    #[test]
    fn attempts_run_out() {
        let p = policy(&[429]);
        assert_eq!(p.next_delay(3, answer(429), true, 1.0), Some(ms(8_000)));
        assert_eq!(p.next_delay(4, answer(429), true, 0.5), None);
        let once = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert_eq!(once.next_delay(1, answer(429), true, 0.5), None);
    }

    #[test]
    fn retry_after_is_a_floor_and_an_absurd_one_is_not_waited_for() {
        let p = policy(&[429]);
        let throttled = |seconds| Outcome::Answer {
            status: 429,
            retry_after: Some(Duration::from_secs(seconds)),
        };
        assert_eq!(
            p.next_delay(1, throttled(3), false, 0.1),
            Some(Duration::from_secs(3))
        );
        assert_eq!(p.next_delay(2, throttled(1), false, 0.75), Some(ms(3_500)));
        assert_eq!(p.next_delay(1, throttled(3_600), false, 0.1), None);
    }

    #[test]
    fn retry_after_reads_delta_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").expect("date");
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past: no wait"
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    proptest! {
        #[test]
        fn a_wait_stays_within_its_band_or_at_retry_after(
            attempt in 1u32..12,
            unit in 0.0f64..1.0,
            base in 1u64..5_000,
            max in 1u64..60_000,
            retry_after in proptest::option::of(0u64..120),
        ) {
            let p = RetryPolicy {
                max_attempts: 12,
                base_delay: ms(base),
                max_delay: ms(max),
                throttle_statuses: ThrottleStatuses::default(),
            };
            let outcome = Outcome::Answer {
                status: 429,
                retry_after: retry_after.map(Duration::from_secs),
            };
            if let Some(wait) = p.next_delay(attempt, outcome, false, unit) {
                let floor = p.backoff_floor(attempt);
                let band_low = floor.min(ms(max));
                let band_high = floor.saturating_mul(2).min(ms(max));
                let retry_after = retry_after.map_or(Duration::ZERO, Duration::from_secs);
                prop_assert!(wait >= band_low.max(retry_after), "{wait:?} below the band");
                prop_assert!(wait <= band_high.max(retry_after), "{wait:?} above the band");
            }
        }

        #[test]
        fn any_retry_after_parses_or_reads_absent_without_panicking(value in ".{0,64}") {
            let _ = parse_retry_after(&value, SystemTime::UNIX_EPOCH);
        }
    }
}
