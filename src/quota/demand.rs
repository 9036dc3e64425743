//! What each job wants, from what its pods report: requests sent plus
//! requests still queued, summed per window of the account's period. Pure;
//! time is a parameter.
//!
//! With `lendIdleCapacity`, the allocation caps a job at its demand (never
//! below its floor), so capacity a job does not use goes to jobs that queue,
//! and returns as soon as the job reports queued work again. A job that has
//! not reported in the last two windows has no known demand.

use std::collections::HashMap;

use crate::allocation::JobKey;

use super::throttle::window_of;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DemandWindow {
    window: u64,
    current: u64,
    previous: u64,
}

/// Demand per job.
#[derive(Debug, Default)]
pub struct DemandBook {
    jobs: HashMap<JobKey, DemandWindow>,
}

impl DemandBook {
    /// Add a pod's report (`sent + queued` since its last call) at `now`.
    /// Returns whether the job's known demand changed.
    pub fn report(
        &mut self,
        job: &JobKey,
        wanted: u64,
        now_millis: u64,
        period_millis: u64,
    ) -> bool {
        let before = self.demand(job, now_millis, period_millis);
        let window = window_of(now_millis, period_millis);
        let entry = self.jobs.entry(job.clone()).or_insert(DemandWindow {
            window,
            ..DemandWindow::default()
        });
        if window > entry.window {
            entry.previous = if window == entry.window + 1 {
                entry.current
            } else {
                0
            };
            entry.current = 0;
            entry.window = window;
        }
        entry.current = entry.current.saturating_add(wanted);
        before != self.demand(job, now_millis, period_millis)
    }

    /// Requests per period the job wants, if it reported recently: the larger
    /// of the last complete window and the current one so far.
    pub fn demand(&self, job: &JobKey, now_millis: u64, period_millis: u64) -> Option<u32> {
        let entry = self.jobs.get(job)?;
        let window = window_of(now_millis, period_millis);
        let wanted = match window.checked_sub(entry.window)? {
            0 => entry.current.max(entry.previous),
            1 => entry.current,
            _ => return None,
        };
        Some(u32::try_from(wanted).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 10_000;

    fn job() -> JobKey {
        JobKey {
            namespace: "shop".into(),
            integration: "catalog".into(),
            job: "import".into(),
        }
    }

    #[test]
    fn demand_sums_a_window_and_keeps_the_last_one() {
        let mut book = DemandBook::default();
        assert_eq!(book.demand(&job(), 0, P), None);
        assert!(book.report(&job(), 3, 100, P));
        assert!(book.report(&job(), 4, 5_000, P));
        assert_eq!(book.demand(&job(), 6_000, P), Some(7));
        // Next window: the last complete one still counts until outgrown.
        assert!(!book.report(&job(), 2, P + 100, P));
        assert_eq!(book.demand(&job(), P + 200, P), Some(7));
        book.report(&job(), 9, P + 300, P);
        assert_eq!(book.demand(&job(), P + 400, P), Some(11));
    }

    #[test]
    fn silence_forgets_demand() {
        let mut book = DemandBook::default();
        book.report(&job(), 5, 0, P);
        assert_eq!(book.demand(&job(), P + 1, P), Some(5));
        assert_eq!(book.demand(&job(), 2 * P + 1, P), None);
        book.report(&job(), 1, 3 * P, P);
        assert_eq!(
            book.demand(&job(), 3 * P, P),
            Some(1),
            "a gap resets the last window"
        );
    }
}
