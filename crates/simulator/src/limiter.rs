//! The rate limit, sans-IO: at most `requests` accepted requests per API key
//! in *any* window of length `period`, a true sliding window over the
//! instants of accepted requests (not fixed buckets, which allow a double
//! burst across a boundary). Time is a parameter, so tests need no sleeps.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// How long a throttled client must wait before a request can be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter {
    /// Exact time until the oldest accepted request leaves the window.
    pub wait: Duration,
}

impl RetryAfter {
    /// `wait` in whole seconds for the `Retry-After` header: rounded up, so a
    /// client that obeys it is accepted, and at least 1.
    pub fn seconds(&self) -> u64 {
        let whole = self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0);
        whole.max(1)
    }
}

/// At most `requests` accepted requests per key in any window of `period`.
///
/// Time is a parameter (`now`, measured from any fixed origin), so the
/// limiter does no I/O and tests need no sleeps.
#[derive(Debug)]
pub struct SlidingWindowLimiter {
    requests: u32,
    period: Duration,
    /// Instants of the accepted requests still in each key's window, oldest first.
    accepted: HashMap<String, VecDeque<Duration>>,
    last_sweep: Duration,
}

impl SlidingWindowLimiter {
    /// A limiter with no request seen yet.
    pub fn new(requests: u32, period: Duration) -> Self {
        Self {
            requests,
            period,
            accepted: HashMap::new(),
            last_sweep: Duration::ZERO,
        }
    }

    /// Accept the request of `key` at `now` (and count it), or say how long to wait.
    ///
    /// The window at `now` holds the accepted requests after `now - period`,
    /// so a request exactly one period after an accepted one no longer sees it.
    pub fn check(&mut self, key: &str, now: Duration) -> Result<(), RetryAfter> {
        self.sweep(now);
        if self.requests == 0 {
            return Err(RetryAfter { wait: self.period });
        }
        if let Some(window) = self.accepted.get_mut(key) {
            return admit(window, self.requests, self.period, now);
        }
        // Looked up first so the common case does not allocate a key.
        self.accepted.insert(key.to_owned(), VecDeque::from([now]));
        Ok(())
    }

    /// Change the limit from now on: the accepted requests already in a
    /// key's window still count against the new figure.
    pub fn set_limit(&mut self, requests: u32, period: Duration) {
        self.requests = requests;
        self.period = period;
    }

    /// The limit in force: requests per period.
    pub fn limit(&self) -> (u32, Duration) {
        (self.requests, self.period)
    }

    /// Keys that currently hold accepted requests (memory in use).
    pub fn tracked_keys(&self) -> usize {
        self.accepted.len()
    }

    /// Drop keys whose window has emptied. Runs at most once per period so
    /// its cost stays O(keys) per period, and a key idle for two periods
    /// holds no memory.
    fn sweep(&mut self, now: Duration) {
        if now.saturating_sub(self.last_sweep) < self.period {
            return;
        }
        let period = self.period;
        self.accepted.retain(|_, window| {
            window
                .back()
                .is_some_and(|&t| t.saturating_add(period) > now)
        });
        self.last_sweep = now;
    }
}

/// One key's decision; `requests` is at least 1.
fn admit(
    window: &mut VecDeque<Duration>,
    requests: u32,
    period: Duration,
    now: Duration,
) -> Result<(), RetryAfter> {
    // Time never goes backwards for a key: an earlier `now` (a caller's clock
    // stepping back) counts as the newest instant, which keeps the deque sorted.
    let now = window.back().map_or(now, |&newest| now.max(newest));
    while window
        .front()
        .is_some_and(|&oldest| oldest.saturating_add(period) <= now)
    {
        window.pop_front();
    }
    // After a lowered limit the window may hold more than `requests`: the
    // send that must leave first is `requests` back from the newest.
    let excess = window.len().checked_sub(requests as usize);
    match excess.and_then(|index| window.get(index)) {
        Some(&blocking) => Err(RetryAfter {
            wait: blocking.saturating_add(period).saturating_sub(now),
        }),
        _ => {
            window.push_back(now);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    #[test]
    fn accepts_n_in_a_window_then_throttles() {
        let mut limiter = SlidingWindowLimiter::new(3, secs(10));
        for t in [0, 1, 2] {
            assert_eq!(limiter.check("k", secs(t)), Ok(()));
        }
        assert_eq!(
            limiter.check("k", secs(3)),
            Err(RetryAfter { wait: secs(7) })
        );
    }

    #[test]
    fn the_window_slides_one_request_at_a_time() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        assert!(limiter.check("k", secs(0)).is_ok());
        assert!(limiter.check("k", secs(4)).is_ok());
        assert!(limiter.check("k", ms(9_999)).is_err());
        // Exactly one period after the first accepted request, it has left.
        assert!(limiter.check("k", secs(10)).is_ok());
        // The one at 4 s is still inside until 14 s.
        assert_eq!(
            limiter.check("k", secs(13)),
            Err(RetryAfter { wait: secs(1) })
        );
        assert!(limiter.check("k", secs(14)).is_ok());
    }

    #[test]
    fn a_full_burst_is_allowed_again_after_idle() {
        let mut limiter = SlidingWindowLimiter::new(5, secs(10));
        for _ in 0..5 {
            assert!(limiter.check("k", secs(0)).is_ok());
        }
        assert!(limiter.check("k", secs(0)).is_err());
        for _ in 0..5 {
            assert!(limiter.check("k", secs(3600)).is_ok());
        }
        assert!(limiter.check("k", secs(3600)).is_err());
    }

    #[test]
    fn throttled_requests_do_not_extend_the_window() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        assert!(limiter.check("k", secs(0)).is_ok());
        assert!(limiter.check("k", secs(0)).is_ok());
        for t in 1..10 {
            assert!(limiter.check("k", secs(t)).is_err());
        }
        // Both slots free up at 10 s despite the nine throttled attempts.
        assert!(limiter.check("k", secs(10)).is_ok());
        assert!(limiter.check("k", secs(10)).is_ok());
        assert!(limiter.check("k", secs(10)).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut limiter = SlidingWindowLimiter::new(1, secs(10));
        assert!(limiter.check("a", secs(0)).is_ok());
        assert!(limiter.check("a", secs(1)).is_err());
        assert!(limiter.check("b", secs(1)).is_ok());
        assert!(limiter.check("b", secs(2)).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_at_least_one() {
        let wait = |wait| RetryAfter { wait }.seconds();
        assert_eq!(wait(secs(10)), 10);
        assert_eq!(wait(ms(9_500)), 10);
        assert_eq!(wait(ms(9_001)), 10);
        assert_eq!(wait(Duration::from_nanos(1)), 1);
        assert_eq!(wait(Duration::ZERO), 1);

        let mut limiter = SlidingWindowLimiter::new(1, ms(300));
        assert!(limiter.check("k", ms(0)).is_ok());
        let retry = limiter.check("k", ms(100)).unwrap_err();
        assert_eq!((retry.wait, retry.seconds()), (ms(200), 1));
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        for key in ["a", "b", "c"] {
            assert!(limiter.check(key, secs(0)).is_ok());
        }
        assert_eq!(limiter.tracked_keys(), 3);
        assert!(limiter.check("a", secs(25)).is_ok());
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[test]
    fn time_going_backwards_never_admits_more() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        assert!(limiter.check("k", secs(5)).is_ok());
        assert!(limiter.check("k", secs(1)).is_ok());
        assert!(limiter.check("k", secs(0)).is_err());
        assert!(limiter.check("k", secs(14)).is_err());
        assert!(limiter.check("k", secs(15)).is_ok());
    }

    #[test]
    fn zero_requests_throttles_everything_without_keeping_keys() {
        let mut limiter = SlidingWindowLimiter::new(0, secs(10));
        assert_eq!(
            limiter.check("k", secs(0)),
            Err(RetryAfter { wait: secs(10) })
        );
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[test]
    fn a_lowered_limit_counts_what_the_window_already_holds() {
        let mut limiter = SlidingWindowLimiter::new(4, secs(10));
        for t in 0..3 {
            assert!(limiter.check("k", secs(t)).is_ok());
        }
        limiter.set_limit(2, secs(10));
        assert_eq!(limiter.limit(), (2, secs(10)));
        // Three are in the window: nothing more until two have left it.
        assert_eq!(
            limiter.check("k", secs(5)),
            Err(RetryAfter { wait: secs(6) })
        );
        assert!(limiter.check("k", secs(11)).is_ok());
        limiter.set_limit(5, secs(10));
        assert!(limiter.check("k", secs(11)).is_ok());
    }

    proptest! {
        #[test]
        fn never_more_than_n_in_any_window(
            requests in 1u32..8,
            period_ms in 1u64..3_000,
            mut times in vec(0u64..10_000, 0..200),
        ) {
            times.sort_unstable();
            let n = requests as usize;
            let mut limiter = SlidingWindowLimiter::new(requests, ms(period_ms));
            let mut accepted: Vec<u64> = Vec::new();
            for &t in &times {
                // Accepted requests in (t - period, t].
                let recent = accepted.iter().filter(|&&a| a + period_ms > t).count();
                match limiter.check("k", ms(t)) {
                    Ok(()) => {
                        prop_assert!(recent < n, "accepted at {t} with {recent} in the window");
                        accepted.push(t);
                    }
                    Err(retry) => {
                        prop_assert_eq!(recent, n, "throttled at {} with {} in the window", t, recent);
                        let oldest = accepted[accepted.len() - n];
                        prop_assert_eq!(retry.wait, ms(oldest + period_ms - t));
                    }
                }
            }
            for &start in &accepted {
                let inside = accepted.iter().filter(|&&a| a >= start && a < start + period_ms).count();
                prop_assert!(inside <= n, "{inside} accepted in [{start}, {start}+{period_ms})");
            }
        }

        #[test]
        fn keys_never_affect_each_other(
            requests in 1u32..5,
            period_ms in 1u64..2_000,
            mut calls in vec((0u64..5_000, 0usize..3), 0..150),
        ) {
            calls.sort_unstable();
            let keys = ["a", "b", "c"];
            let mut shared = SlidingWindowLimiter::new(requests, ms(period_ms));
            let mut alone: Vec<_> = keys
                .iter()
                .map(|_| SlidingWindowLimiter::new(requests, ms(period_ms)))
                .collect();
            for (t, key) in calls {
                prop_assert_eq!(
                    shared.check(keys[key], ms(t)),
                    alone[key].check(keys[key], ms(t))
                );
            }
        }
    }
}
