//! The outside consumer, pure: someone the cluster does not know about (a
//! person in the UI, another system, a partner) sending `requests` per
//! period with the same API key, evenly spaced from when it started. The
//! simulator asks it which of its sends fell due up to `now` and runs each
//! through the limiter at its own instant, before it handles a request or
//! answers `/stats`, so a manual clock drives it as exactly as any client.

use std::time::Duration;

/// At most this many of its sends are played in one catch-up (more than a
/// day at 1 per ms); older ones are dropped unplayed and uncounted.
const MAX_CATCH_UP: u64 = 100_000;

/// One outside consumer of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideConsumer {
    requests: u32,
    period: Duration,
    started: Duration,
    /// The index of its next send not yet played (send `i` is at `started + i × spacing`).
    next: u64,
}

impl OutsideConsumer {
    /// `requests` per `period` from `now` on (its first send at `now`).
    pub fn new(requests: u32, period: Duration, now: Duration) -> Self {
        Self {
            requests: requests.max(1),
            period: period.max(Duration::from_millis(1)),
            started: now,
            next: 0,
        }
    }

    /// Requests per period it sends.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    fn spacing(&self) -> Duration {
        (self.period / self.requests).max(Duration::from_nanos(1))
    }

    /// The instants of its sends due by `now` and not yet played, oldest first.
    pub fn due(&mut self, now: Duration) -> Vec<Duration> {
        let spacing = self.spacing().as_nanos();
        let elapsed = now.saturating_sub(self.started).as_nanos();
        let last = u64::try_from(elapsed / spacing).unwrap_or(u64::MAX);
        if now < self.started || last < self.next {
            return Vec::new();
        }
        let first = self.next.max(last.saturating_sub(MAX_CATCH_UP - 1));
        self.next = last.saturating_add(1);
        (first..=last)
            .map(|i| {
                let offset =
                    u64::try_from(spacing.saturating_mul(u128::from(i))).unwrap_or(u64::MAX);
                self.started.saturating_add(Duration::from_nanos(offset))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn sends_are_spread_evenly_from_the_start() {
        let mut consumer = OutsideConsumer::new(5, secs(10), secs(100));
        assert_eq!(consumer.due(secs(99)), Vec::<Duration>::new());
        assert_eq!(consumer.due(secs(100)), vec![secs(100)]);
        assert_eq!(consumer.due(secs(105)), vec![secs(102), secs(104)]);
        assert_eq!(consumer.due(secs(105)), Vec::<Duration>::new());
        assert_eq!(consumer.due(secs(110)).len(), 3);
    }

    #[test]
    fn a_long_idle_catch_up_is_bounded() {
        let mut consumer = OutsideConsumer::new(1_000, Duration::from_millis(1), secs(0));
        let due = consumer.due(secs(1_000_000));
        assert_eq!(due.len() as u64, MAX_CATCH_UP);
        assert_eq!(due.last(), Some(&secs(1_000_000)));
        let far = consumer.due(Duration::MAX);
        assert!(far.len() as u64 <= MAX_CATCH_UP);
    }
}
