//! What each job wants, from what its pods report. Pure; time is a parameter.
//!
//! Each pod's report says what it sent since its previous one and what it
//! has waiting now. A pod's demand is the rate it sent at over the interval
//! its report covers, in requests per period of the account's limit, plus
//! its backlog (`queued` is a gauge: it counts once, however often the pod
//! reports). A job's demand is the sum over its pods that reported within
//! [`horizon`]; with none, the job has no known demand. Rates, not sums per
//! window, so that how often pods report (every 5 s) and how long the
//! limit's period is (10 s, or 1 s in a benchmark) do not change the figure.
//! A pod that says it has had nothing to do for [`idle_after`] of the period
//! wants nothing, whatever it sent earlier in the interval: its sidecar
//! renews as soon as it turns idle, so a job's demand drops within half a
//! period of its last request instead of a report later.
//!
//! With `lendIdleCapacity`, the allocation caps a job at its demand (never
//! below its floor), so capacity a job does not use goes to jobs that queue,
//! and returns as soon as the job reports queued work again.
//!
//! Demand is a rate that moves a little with nearly every report, and each
//! move re-plans the account (annotations, status, Events). So the book
//! plans with a *planned* figure that follows the measured one only when it
//! moves far enough ([`moves_the_plan`]: by [`STEP_PERCENT`] of the planned
//! figure and at least [`MIN_STEP`] requests, or to or from zero), or when
//! the job had no known demand before. Small wobbles are absorbed; a job that
//! goes idle or comes back with queued work moves the plan at once.

use std::collections::HashMap;

use crate::allocation::JobKey;

use crate::lease_book::DEFAULT_TTL_MILLIS;
pub use saleslayer_contract::{idle_after, is_idle};

/// A pod's report, as the demand book needs it.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    pub job: &'a JobKey,
    pub pod: &'a str,
    /// Requests sent since the pod's previous report.
    pub sent: u64,
    /// Requests waiting for capacity right now.
    pub queued: u64,
    /// How long the pod has had nothing to do (`Usage::idle_millis`).
    pub idle_millis: u64,
}

/// A pod's last report.
#[derive(Debug, Clone, Copy)]
struct PodDemand {
    at_millis: u64,
    sent: u64,
    /// The time that report covers (since the pod's previous one).
    over_millis: u64,
    queued: u64,
    /// A first report that sent nothing and has nothing waiting: the pod's
    /// sidecar just started, before its workload sent anything. It says
    /// nothing of the pod's rate, so it counts for nothing; it only dates
    /// the interval the pod's next report covers.
    opening: bool,
    /// Nothing to do for [`idle_after`] of the period: it wants nothing now.
    idle: bool,
}

impl PodDemand {
    /// Requests per `period_millis`, rounded up, plus the backlog; nothing
    /// for an idle pod.
    fn per_period(&self, period_millis: u64) -> u64 {
        if self.idle {
            return 0;
        }
        let rate = u128::from(self.sent) * u128::from(period_millis);
        let per_period = rate.div_ceil(u128::from(self.over_millis.max(1)));
        u64::try_from(per_period)
            .unwrap_or(u64::MAX)
            .saturating_add(self.queued)
    }
}

/// How long a report counts: two periods, and never less than a lease's TTL
/// (a pod that keeps its lease reports at least that often).
pub fn horizon(period_millis: u64) -> u64 {
    let ttl = DEFAULT_TTL_MILLIS;
    period_millis.saturating_mul(2).max(ttl)
}

/// A move of demand below this share of the planned figure does not re-plan.
pub const STEP_PERCENT: u64 = 10;

/// Nor does a move of fewer requests per period than this.
pub const MIN_STEP: u64 = 2;

/// Whether measured demand `wanted` is far enough from the `planned` figure to
/// re-plan: by at least [`STEP_PERCENT`] of it and [`MIN_STEP`] requests, or
/// to or from zero (a job going idle or coming back).
pub fn moves_the_plan(planned: u32, wanted: u32) -> bool {
    if (planned == 0) != (wanted == 0) {
        return true;
    }
    let step = (u64::from(planned) * STEP_PERCENT)
        .div_ceil(100)
        .max(MIN_STEP);
    u64::from(planned.abs_diff(wanted)) >= step
}

/// One job's pods' last reports, and the demand the plan uses.
#[derive(Debug, Default)]
struct JobDemand {
    pods: HashMap<String, PodDemand>,
    /// The figure last planned with; moves only by [`moves_the_plan`].
    planned: u32,
}

/// Demand per job.
#[derive(Debug, Default)]
pub struct DemandBook {
    jobs: HashMap<JobKey, JobDemand>,
}

impl DemandBook {
    /// Fold a pod's report in at `now`. Returns whether the job's planned
    /// demand changed (and the account should be planned again).
    pub fn report(&mut self, report: Report<'_>, now_millis: u64, period_millis: u64) -> bool {
        let horizon = horizon(period_millis);
        let job = self.jobs.entry(report.job.clone()).or_default();
        job.pods
            .retain(|_, pod| now_millis.saturating_sub(pod.at_millis) <= horizon);
        // Without a recent report the plan had no demand for the job: any figure moves it.
        let known = job.pods.values().any(|pod| !pod.opening);
        let idle = is_idle(report.queued, report.idle_millis, period_millis);
        let opening =
            !job.pods.contains_key(report.pod) && report.sent == 0 && report.queued == 0 && !idle;
        // A first report (or one after a long silence) covers one period.
        let over_millis = job
            .pods
            .get(report.pod)
            .map(|previous| now_millis.saturating_sub(previous.at_millis))
            .filter(|&over| over > 0)
            .unwrap_or(period_millis);
        job.pods.insert(
            report.pod.to_owned(),
            PodDemand {
                at_millis: now_millis,
                sent: report.sent,
                over_millis,
                queued: report.queued,
                opening,
                idle,
            },
        );
        if opening {
            return false;
        }
        let wanted = measured(job.pods.values(), period_millis);
        let moved = !known || moves_the_plan(job.planned, wanted);
        if moved {
            job.planned = wanted;
        }
        moved
    }

    /// Requests per period the plan gives the job as its demand, if one of its
    /// pods reported recently: the measured figure as of its last big move.
    pub fn demand(&self, job: &JobKey, now_millis: u64, period_millis: u64) -> Option<u32> {
        let job = self.jobs.get(job)?;
        let horizon = horizon(period_millis);
        job.pods
            .values()
            .any(|pod| !pod.opening && now_millis.saturating_sub(pod.at_millis) <= horizon)
            .then_some(job.planned)
    }

    /// Requests per period the job's pods want as measured right now, if one
    /// of them reported recently (what [`DemandBook::demand`] follows).
    pub fn wanted(&self, job: &JobKey, now_millis: u64, period_millis: u64) -> Option<u32> {
        let horizon = horizon(period_millis);
        let mut recent = self
            .jobs
            .get(job)?
            .pods
            .values()
            .filter(|pod| !pod.opening && now_millis.saturating_sub(pod.at_millis) <= horizon)
            .peekable();
        recent.peek()?;
        Some(measured(recent, period_millis))
    }
}

/// Σ per-period demand of `pods`, saturating at `u32::MAX`.
fn measured<'a>(pods: impl Iterator<Item = &'a PodDemand>, period_millis: u64) -> u32 {
    let wanted = pods.filter(|pod| !pod.opening).fold(0u64, |sum, pod| {
        sum.saturating_add(pod.per_period(period_millis))
    });
    u32::try_from(wanted).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 10_000;

    fn job() -> JobKey {
        JobKey::new("shop", "catalog", "import")
    }

    fn sent<'a>(job: &'a JobKey, pod: &'a str, sent: u64, queued: u64) -> Report<'a> {
        Report {
            job,
            pod,
            sent,
            queued,
            idle_millis: 0,
        }
    }

    #[test]
    fn a_pod_idle_for_half_a_period_wants_nothing_whatever_it_sent_before() {
        let job = job();
        let mut book = DemandBook::default();
        assert!(book.report(sent(&job, "a", 20, 0), 0, P));
        book.report(sent(&job, "a", 20, 0), 10_000, P);
        assert_eq!(book.demand(&job, 10_000, P), Some(20));
        // It sent 10 in the 6 s since, then nothing for the last 4 s: not yet idle
        // (half of 10 s is 5 s), so its rate over the interval counts.
        let quiet = |idle_millis| Report {
            idle_millis,
            ..sent(&job, "a", 10, 0)
        };
        assert!(book.report(quiet(4_000), 16_000, P));
        assert_eq!(book.demand(&job, 16_000, P), Some(17));
        // Idle for 5 s: the same report wants nothing, and that moves the plan.
        assert!(book.report(quiet(5_000), 17_000, P));
        assert_eq!(book.demand(&job, 17_000, P), Some(0));
        // Work waiting is never idle, whatever the gauge says.
        let waiting = Report {
            idle_millis: 9_000,
            ..sent(&job, "a", 0, 3)
        };
        assert!(book.report(waiting, 18_000, P));
        assert_eq!(book.demand(&job, 18_000, P), Some(3));
        // A pod that opens idle is known at once to want nothing.
        let other = JobKey::new("shop", "catalog", "prices");
        let opens_idle = Report {
            idle_millis: 5_000,
            ..sent(&other, "b", 0, 0)
        };
        assert!(book.report(opens_idle, 18_000, P));
        assert_eq!(book.demand(&other, 18_000, P), Some(0));
        // At a 1 s period half a second of nothing is idle.
        assert_eq!(idle_after(1_000), 500);
        assert_eq!(idle_after(10_000), 5_000);
        assert_eq!(idle_after(60_000), 5_000);
    }

    #[test]
    fn a_first_empty_report_counts_for_nothing_and_the_next_one_does() {
        let job = job();
        let mut book = DemandBook::default();
        assert!(!book.report(sent(&job, "a", 0, 0), 0, P));
        assert_eq!(book.demand(&job, 1_000, P), None);
        // A first report with work waiting counts at once.
        let other = JobKey::new("shop", "catalog", "prices");
        assert!(book.report(sent(&other, "b", 0, 3), 1_000, P));
        assert_eq!(book.demand(&other, 1_000, P), Some(3));
        // The idle pod's next report covers the 5 s since its first: demand 0,
        // known now, which moves the plan (the job may lend its share).
        assert!(book.report(sent(&job, "a", 0, 0), 5_000, P));
        assert_eq!(book.demand(&job, 5_000, P), Some(0));
    }

    #[test]
    fn demand_is_the_rate_sent_per_period_whatever_the_report_interval() {
        let job = job();
        let mut book = DemandBook::default();
        assert_eq!(book.wanted(&job, 0, P), None);
        // A sidecar's first report, before its workload sent anything, says
        // nothing of the job's rate: still no known demand, nothing to re-plan.
        assert!(!book.report(sent(&job, "a", 0, 0), 0, P));
        assert_eq!(book.wanted(&job, 0, P), None);
        assert_eq!(book.demand(&job, 0, P), None);
        // 6 requests in 5 s is 12 per 10 s.
        book.report(sent(&job, "a", 6, 0), 5_000, P);
        assert_eq!(book.wanted(&job, 6_000, P), Some(12));
        // Reporting ten times as often at the same rate changes nothing.
        for step in 1..=10 {
            book.report(sent(&job, "a", 1, 0), 5_000 + step * 833, P);
        }
        assert_eq!(
            book.wanted(&job, 14_000, P),
            Some(13),
            "1 per 833 ms, rounded up"
        );
        // The same rate against a 1 s period.
        assert_eq!(book.wanted(&job, 14_000, 1_000), Some(2));
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
    fn silence_forgets_demand_after_the_horizon() {
        let job = job();
        let mut book = DemandBook::default();
        book.report(sent(&job, "a", 5, 3), 0, P);
        assert_eq!(book.demand(&job, 20_000, P), Some(8));
        assert_eq!(book.demand(&job, 20_001, P), None);
        // With a 1 s period a report still counts for a lease TTL.
        book.report(sent(&job, "b", 1, 0), 30_000, 1_000);
        assert_eq!(book.demand(&job, 45_000, 1_000), Some(1));
        assert_eq!(book.demand(&job, 45_001, 1_000), None);
        // The silent pod's old report no longer counts once it reports again late.
        book.report(sent(&job, "b", 2, 0), 100_000, 1_000);
        assert_eq!(book.demand(&job, 100_000, 1_000), Some(2));
    }

    #[test]
    fn small_moves_of_demand_do_not_re_plan_and_big_ones_do() {
        let job = job();
        let mut book = DemandBook::default();
        // 20 queued: the first figure plans at once.
        assert!(book.report(sent(&job, "a", 0, 20), 0, P));
        // Steady reporting that wobbles by a request or two (under 10 %) does not.
        for (at, queued) in [(1_000, 21), (2_000, 19), (3_000, 20), (4_000, 21)] {
            assert!(!book.report(sent(&job, "a", 0, queued), at, P), "{queued}");
            assert_eq!(book.demand(&job, at, P), Some(20));
        }
        assert_eq!(book.wanted(&job, 4_000, P), Some(21));
        // A move of 10 % or more does, and becomes the planned figure.
        assert!(book.report(sent(&job, "a", 0, 23), 5_000, P));
        assert_eq!(book.demand(&job, 5_000, P), Some(23));
        // Going idle and coming back always re-plan, however small the figure.
        assert!(book.report(sent(&job, "a", 0, 0), 6_000, P));
        assert_eq!(book.demand(&job, 6_000, P), Some(0));
        assert!(book.report(sent(&job, "a", 0, 1), 7_000, P));
        assert_eq!(book.demand(&job, 7_000, P), Some(1));
    }

    #[test]
    fn a_job_heard_again_after_silence_re_plans_even_at_its_old_figure() {
        let job = job();
        let mut book = DemandBook::default();
        assert!(book.report(sent(&job, "a", 0, 20), 0, P));
        assert_eq!(book.demand(&job, 30_000, P), None);
        assert!(book.report(sent(&job, "a", 0, 20), 30_000, P));
        assert_eq!(book.demand(&job, 30_000, P), Some(20));
    }

    #[test]
    fn the_step_is_ten_percent_and_at_least_two_requests() {
        assert!(!moves_the_plan(10, 11));
        assert!(moves_the_plan(10, 12));
        assert!(!moves_the_plan(100, 91));
        assert!(moves_the_plan(100, 90));
        assert!(moves_the_plan(0, 1));
        assert!(moves_the_plan(u32::MAX, 0));
        assert!(!moves_the_plan(u32::MAX, u32::MAX - 1));
    }
}
