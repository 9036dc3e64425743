//! Time as a parameter for the parts that wait (the sidecar's pacing and
//! retries, the simulator's window): the real clock in production, a manual
//! one in tests, so no assertion depends on a real sleep. [`wall_millis`] is
//! the one wall-clock read the operator's parts share (the pure core takes
//! its result as a parameter).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// A duration in whole milliseconds, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A sleep that can be sent across tasks.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A monotonic clock with its own origin.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Time since this clock's origin.
    fn now(&self) -> Duration;
    /// Resolves once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// Tokio's clock, counted from when this value was made.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: tokio::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that moves only when told to, or when someone sleeps on it: a
/// sleep returns at once, having moved time forward by its length, and is
/// recorded so a test can read back every wait.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    inner: Arc<Mutex<Manual>>,
}

#[derive(Debug, Default)]
struct Manual {
    now: Duration,
    sleeps: Vec<Duration>,
}

impl ManualClock {
    fn manual(&self) -> std::sync::MutexGuard<'_, Manual> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Move time forward.
    pub fn advance(&self, by: Duration) {
        let mut manual = self.manual();
        manual.now = manual.now.saturating_add(by);
    }

    /// Every sleep taken so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.manual().sleeps.clone()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.manual().now
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        {
            let mut manual = self.manual();
            manual.now = manual.now.saturating_add(duration);
            manual.sleeps.push(duration);
        }
        Box::pin(tokio::task::yield_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_sleep_moves_time_and_is_recorded() {
        let clock = ManualClock::default();
        clock.advance(Duration::from_millis(5));
        clock.sleep(Duration::from_secs(2)).await;
        assert_eq!(clock.now(), Duration::from_millis(2_005));
        assert_eq!(clock.sleeps(), vec![Duration::from_secs(2)]);
    }
}
