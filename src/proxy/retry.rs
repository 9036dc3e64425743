//! The retry policy the webhook injects, as pure functions: which answers
//! are worth another attempt, and how long to wait first (exponential
//! backoff with full jitter, never before the upstream's `Retry-After`).

use std::time::Duration;

/// `SALESLAYER_RETRY_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

/// A `Retry-After` longer than this is not waited for: the caller gets the
/// 429 at once rather than a request that hangs for minutes.
pub const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What came back from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer, with its `Retry-After` when it had one.
    Answer {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused, reset, timed out.
    Unreachable,
}

/// Whether an answer may be retried unchanged: throttling and the
/// upstream's transient failures. Validation, malformed-request and
/// authentication errors (400, 401, 403, 404, 422 and every other 4xx) never
/// are: the same request would fail the same way.
pub fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`, after attempt `attempt`
    /// (1-based) ended in `outcome`; `None` when there is no next attempt.
    /// `unit` is a uniform draw from `[0, 1)`: the jitter, a parameter so
    /// tests choose it.
    pub fn next_delay(&self, attempt: u32, outcome: Outcome, unit: f64) -> Option<Duration> {
        if attempt >= self.max_attempts.max(1) {
            return None;
        }
        let retry_after = match outcome {
            Outcome::Answer { status, .. } if !retryable(status) => return None,
            Outcome::Answer { retry_after, .. } => retry_after,
            Outcome::Unreachable => None,
        };
        if retry_after.is_some_and(|wait| wait > LONGEST_RETRY_AFTER) {
            return None;
        }
        let jittered = self.backoff_ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0));
        Some(retry_after.map_or(jittered, |wait| wait.max(jittered)))
    }

    /// `min(max_delay, base_delay × 2^(attempt-1))`: the ceiling of the
    /// full-jitter draw after attempt `attempt`.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }
}

/// `Retry-After` in delta-seconds (what Sales Layer and the simulator send);
/// an HTTP-date or garbage reads as absent.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(1_000),
        max_delay: Duration::from_millis(8_000),
    };

    fn answer(status: u16) -> Outcome {
        Outcome::Answer {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_maximum() {
        let ceilings: Vec<u64> = (1..=6)
            .map(|a| POLICY.backoff_ceiling(a).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, vec![1_000, 2_000, 4_000, 8_000, 8_000, 8_000]);
    }

    #[test]
    fn client_errors_are_never_retried() {
        for status in [400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(POLICY.next_delay(1, answer(status), 0.5), None, "{status}");
        }
        for status in [200, 201, 204, 301, 304] {
            assert_eq!(POLICY.next_delay(1, answer(status), 0.5), None, "{status}");
        }
    }

    #[test]
    fn throttling_and_outages_are_retried_until_the_last_attempt() {
        for outcome in [answer(429), answer(503), Outcome::Unreachable] {
            assert_eq!(
                POLICY.next_delay(1, outcome, 0.5),
                Some(Duration::from_millis(500))
            );
            assert_eq!(
                POLICY.next_delay(3, outcome, 1.0),
                Some(Duration::from_millis(4_000))
            );
            assert_eq!(POLICY.next_delay(4, outcome, 0.5), None);
        }
        let once = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert_eq!(once.next_delay(1, answer(429), 0.5), None);
    }

    #[test]
    fn retry_after_is_a_floor_and_an_absurd_one_is_not_waited_for() {
        let throttled = |seconds| Outcome::Answer {
            status: 429,
            retry_after: Some(Duration::from_secs(seconds)),
        };
        assert_eq!(
            POLICY.next_delay(1, throttled(3), 0.1),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            POLICY.next_delay(3, throttled(1), 0.75),
            Some(Duration::from_secs(3))
        );
        assert_eq!(POLICY.next_delay(1, throttled(3_600), 0.1), None);
    }

    #[test]
    fn retry_after_reads_delta_seconds_only() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    proptest! {
        #[test]
        fn a_delay_stays_within_the_ceiling_or_retry_after(
            attempt in 1u32..12,
            unit in 0.0f64..1.0,
            base in 1u64..5_000,
            max in 1u64..60_000,
            retry_after in proptest::option::of(0u64..120),
        ) {
            let policy = RetryPolicy {
                max_attempts: 10,
                base_delay: Duration::from_millis(base),
                max_delay: Duration::from_millis(max),
            };
            let outcome = Outcome::Answer {
                status: 429,
                retry_after: retry_after.map(Duration::from_secs),
            };
            if let Some(delay) = policy.next_delay(attempt, outcome, unit) {
                let floor = retry_after.map_or(Duration::ZERO, Duration::from_secs);
                prop_assert!(delay >= floor);
                prop_assert!(delay <= policy.backoff_ceiling(attempt).max(floor));
                prop_assert!(policy.backoff_ceiling(attempt) <= Duration::from_millis(max));
            }
        }
    }
}
