//! Throttling per job and window (DESIGN.md §6), pure: reports go in with
//! the time they arrived, and out come each job's consecutive throttled
//! windows and whether throttling is persistent.
//!
//! A window is one period of the account's limit, aligned to the epoch. A
//! window with at least one throttled response is throttled; a window with
//! none (including one with no reports at all) is clean and ends a run.
//! No clock: `now_millis` is a parameter everywhere.

use std::collections::HashMap;

use crate::allocation::JobKey;

/// One job's throttling history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleWindow {
    /// Index of the window `throttled_now` counts for.
    window: u64,
    /// Throttled responses reported in that window.
    throttled_now: u64,
    /// Consecutive throttled windows that ended before `window`.
    run: u32,
    /// When a throttled response was last reported (ms since the epoch).
    pub last_throttled_millis: Option<u64>,
    /// Throttled responses in the current run, for notifications.
    pub run_throttled: u64,
}

impl ThrottleWindow {
    /// Consecutive throttled windows as of `now`, the current one counted
    /// once it has throttled responses.
    pub fn throttled_windows(&self, now_window: u64) -> u32 {
        let ended = self.ended_run(now_window);
        if now_window == self.window && self.throttled_now > 0 {
            ended.saturating_add(1)
        } else {
            ended
        }
    }

    /// The run of throttled windows that ended before `now_window`.
    fn ended_run(&self, now_window: u64) -> u32 {
        if now_window <= self.window {
            return self.run;
        }
        // The recorded window has ended: it extends the run if throttled,
        // and any window after it without reports was clean.
        let through_recorded = if self.throttled_now > 0 {
            self.run.saturating_add(1)
        } else {
            0
        };
        if now_window == self.window + 1 {
            through_recorded
        } else {
            0
        }
    }

    fn roll(&mut self, now_window: u64) {
        if now_window > self.window {
            self.run = self.ended_run(now_window);
            if self.run == 0 {
                self.run_throttled = 0;
            }
            self.window = now_window;
            self.throttled_now = 0;
        }
    }
}

/// Every job's throttling, keyed like the allocation.
#[derive(Debug, Default)]
pub struct ThrottleBook {
    jobs: HashMap<JobKey, ThrottleWindow>,
}

impl ThrottleBook {
    /// Record `throttled` responses of `job` reported at `now` in windows of `period_millis`.
    pub fn report(&mut self, job: &JobKey, throttled: u64, now_millis: u64, period_millis: u64) {
        let window = window_of(now_millis, period_millis);
        let entry = self.jobs.entry(job.clone()).or_insert(ThrottleWindow {
            window,
            ..ThrottleWindow::default()
        });
        entry.roll(window);
        if throttled > 0 {
            entry.throttled_now = entry.throttled_now.saturating_add(throttled);
            entry.run_throttled = entry.run_throttled.saturating_add(throttled);
            entry.last_throttled_millis = Some(now_millis);
        }
    }

    /// The job's history, if it ever reported.
    pub fn job(&self, job: &JobKey) -> Option<&ThrottleWindow> {
        self.jobs.get(job)
    }

    /// Forget jobs that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(&JobKey) -> bool) {
        self.jobs.retain(|key, _| keep(key));
    }
}

/// The window index of `now` for windows of `period_millis`.
pub fn window_of(now_millis: u64, period_millis: u64) -> u64 {
    now_millis / period_millis.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 10_000;

    fn job() -> JobKey {
        JobKey::new("shop", "catalog", "import")
    }

    #[test]
    fn consecutive_throttled_windows_count_up() {
        let mut book = ThrottleBook::default();
        for w in 0..6 {
            book.report(&job(), 2, w * P + 100, P);
            let state = book.job(&job()).expect("reported");
            assert_eq!(
                state.throttled_windows(w),
                u32::try_from(w + 1).unwrap_or(0)
            );
        }
        assert_eq!(book.job(&job()).map(|s| s.run_throttled), Some(12));
    }

    #[test]
    fn one_clean_window_resets_the_run() {
        let mut book = ThrottleBook::default();
        for w in 0..4 {
            book.report(&job(), 1, w * P, P);
        }
        // Window 4: a clean report.
        book.report(&job(), 0, 4 * P + 5, P);
        let state = *book.job(&job()).expect("reported");
        assert_eq!(state.throttled_windows(4), 4, "window 4 has not ended yet");
        assert_eq!(state.throttled_windows(5), 0, "window 4 ended clean");
        book.report(&job(), 3, 5 * P, P);
        assert_eq!(book.job(&job()).map(|s| s.throttled_windows(5)), Some(1));
        assert_eq!(book.job(&job()).map(|s| s.run_throttled), Some(3));
    }

    #[test]
    fn a_window_without_reports_is_clean() {
        let mut book = ThrottleBook::default();
        book.report(&job(), 1, 0, P);
        book.report(&job(), 1, P, P);
        let state = *book.job(&job()).expect("reported");
        assert_eq!(state.throttled_windows(1), 2);
        assert_eq!(
            state.throttled_windows(2),
            2,
            "window 1 was throttled and just ended"
        );
        assert_eq!(state.throttled_windows(3), 0, "window 2 had no reports");
        assert_eq!(state.last_throttled_millis, Some(P));
    }

    #[test]
    fn zero_period_does_not_panic() {
        let mut book = ThrottleBook::default();
        book.report(&job(), 1, 5, 0);
        assert_eq!(book.job(&job()).map(|s| s.throttled_windows(5)), Some(1));
    }
}
