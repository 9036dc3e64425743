//! What each job wants, from what its pods report. Pure; time is a parameter.
//!
//! A job's demand is what its pods sent in a window of the account's period
//! (the larger of the last complete window and the current one so far) plus
//! the backlog its pods reported last (`queued` is a gauge: counting it once
//! per report would make demand grow with how often pods report).
//!
//! With `lendIdleCapacity`, the allocation caps a job at its demand (never
//! below its floor), so capacity a job does not use goes to jobs that queue,
//! and returns as soon as the job reports queued work again. A job that has
//! not reported in the last two windows has no known demand; a pod's backlog
//! counts for two windows after its last report.

use std::collections::HashMap;

use crate::allocation::JobKey;

use super::throttle::window_of;

#[derive(Debug, Default)]
struct JobDemand {
    window: u64,
    current: u64,
    previous: u64,
    /// Per pod: its last reported backlog and the window it reported in.
    backlog: HashMap<String, (u64, u64)>,
}

impl JobDemand {
    fn sent(&self, window: u64) -> Option<u64> {
        match window.checked_sub(self.window)? {
            0 => Some(self.current.max(self.previous)),
            1 => Some(self.current),
            _ => None,
        }
    }

    fn backlog(&self, window: u64) -> u64 {
        self.backlog
            .values()
            .filter(|(_, at)| window.saturating_sub(*at) <= 1)
            .fold(0u64, |sum, (queued, _)| sum.saturating_add(*queued))
    }
}

/// A pod's report, as the demand book needs it.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    pub job: &'a JobKey,
    pub pod: &'a str,
    /// Requests sent since the pod's previous report.
    pub sent: u64,
    /// Requests waiting for capacity right now.
    pub queued: u64,
}

/// Demand per job.
#[derive(Debug, Default)]
pub struct DemandBook {
    jobs: HashMap<JobKey, JobDemand>,
}

impl DemandBook {
    /// Fold a pod's report in at `now`. Returns whether the job's known
    /// demand changed.
    pub fn report(&mut self, report: Report<'_>, now_millis: u64, period_millis: u64) -> bool {
        let before = self.demand(report.job, now_millis, period_millis);
        let window = window_of(now_millis, period_millis);
        let entry = self
            .jobs
            .entry(report.job.clone())
            .or_insert_with(|| JobDemand {
                window,
                ..JobDemand::default()
            });
        if window > entry.window {
            entry.previous = if window == entry.window + 1 {
                entry.current
            } else {
                0
            };
            entry.current = 0;
            entry.window = window;
            entry
                .backlog
                .retain(|_, (_, at)| window.saturating_sub(*at) <= 1);
        }
        entry.current = entry.current.saturating_add(report.sent);
        entry
            .backlog
            .insert(report.pod.to_owned(), (report.queued, window));
        before != self.demand(report.job, now_millis, period_millis)
    }

    /// Requests per period the job wants, if it reported recently.
    pub fn demand(&self, job: &JobKey, now_millis: u64, period_millis: u64) -> Option<u32> {
        let entry = self.jobs.get(job)?;
        let window = window_of(now_millis, period_millis);
        let wanted = entry.sent(window)?.saturating_add(entry.backlog(window));
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

    fn sent<'a>(job: &'a JobKey, pod: &'a str, sent: u64, queued: u64) -> Report<'a> {
        Report {
            job,
            pod,
            sent,
            queued,
        }
    }

    #[test]
    fn demand_sums_a_window_and_keeps_the_last_one() {
        let job = job();
        let mut book = DemandBook::default();
        assert_eq!(book.demand(&job, 0, P), None);
        assert!(book.report(sent(&job, "a", 3, 0), 100, P));
        assert!(book.report(sent(&job, "a", 4, 0), 5_000, P));
        assert_eq!(book.demand(&job, 6_000, P), Some(7));
        // Next window: the last complete one still counts until outgrown.
        assert!(!book.report(sent(&job, "a", 2, 0), P + 100, P));
        assert_eq!(book.demand(&job, P + 200, P), Some(7));
        book.report(sent(&job, "a", 9, 0), P + 300, P);
        assert_eq!(book.demand(&job, P + 400, P), Some(11));
    }

    #[test]
    fn backlog_is_a_gauge_per_pod_not_a_sum_of_reports() {
        let job = job();
        let mut book = DemandBook::default();
        for at in 0..50 {
            book.report(sent(&job, "a", 0, 20), at * 100, P);
        }
        assert_eq!(book.demand(&job, 5_000, P), Some(20), "fifty reports of 20");
        book.report(sent(&job, "b", 0, 5), 5_100, P);
        assert_eq!(book.demand(&job, 5_200, P), Some(25), "two pods add up");
        book.report(sent(&job, "a", 0, 0), 5_300, P);
        assert_eq!(book.demand(&job, 5_400, P), Some(5), "a drained pod");
    }

    #[test]
    fn silence_forgets_demand() {
        let job = job();
        let mut book = DemandBook::default();
        book.report(sent(&job, "a", 5, 3), 0, P);
        assert_eq!(book.demand(&job, P + 1, P), Some(8));
        assert_eq!(book.demand(&job, 2 * P + 1, P), None);
        book.report(sent(&job, "b", 1, 0), 3 * P, P);
        assert_eq!(
            book.demand(&job, 3 * P, P),
            Some(1),
            "a gap resets the last window and the silent pod's backlog"
        );
    }
}
