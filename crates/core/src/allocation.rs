//! Divides one account's usable budget among its jobs, and each job's share among its
//! pods (DESIGN.md §4).
//!
//! This module owns the arithmetic of allocation and nothing else: it never talks to
//! the API server, never reads a clock, never logs and never reads a raw custom
//! resource. Data enters as a [`UsableBudget`] and a slice of [`JobRequest`]s — built by
//! the controller from validated specs, live pod counts and usage reports for *every*
//! integration on one account — and leaves as an [`AccountAllocation`], a plain value
//! the caller writes to status, pod annotations and the quota API.
//!
//! How a budget is divided:
//!
//! 1. **Floors first.** Each job gets its `min_requests`, clamped to its cap. If the
//!    floors sum above the usable budget they are scaled down proportionally to fit
//!    it exactly, [`AccountAllocation::overcommit`] is set, and nothing else is handed
//!    out.
//! 2. **Water-filling.** What remains is shared by weight on top of the floors
//!    (weighted max-min fairness): every job rises at the same level times its weight
//!    until it reaches its *effective cap*; what capped jobs cannot take goes to the
//!    rest. A job of weight 0 gets its floor only. The effective cap is the smaller of
//!    `max_requests` and the known `demand`, never below the floor.
//! 3. **Lending.** With `lend_idle`, a job with no live pods has its floor as effective
//!    cap; the rest of its share goes to busy jobs and comes back once the caller
//!    reports a live pod. A cap from `demand` is soft: when every job is at its
//!    effective cap and capacity is left, that rest is water-filled again by weight up
//!    to the hard caps (`max_requests`, and the floor of a lending job with no pods),
//!    so an account whose jobs all report little demand keeps its ordinary shares
//!    rather than granting nothing until demand is next reported.
//! 4. **Rounding.** Exact shares are rational; they are rounded down and the units left
//!    over go to the largest remainders, ties to the smaller [`JobKey`]. The total
//!    handed out is the floor of the exact total, a job whose exact share is a whole
//!    number is never rounded up, and no job ends above its cap.
//! 5. **Per pod.** A job's allocation is split evenly over its live pods; a share below
//!    one request per period stretches the period instead ([`pod_share`]).
//!
//! All arithmetic is on integers (shares are kept as numerators over a common
//! denominator), so the invariants hold exactly: Σ allocations ≤ usable; floors hold
//! unless overcommitted; hard caps hold, and demand caps too unless nothing else
//! wanted the capacity; if a job of positive weight sits below its hard cap, no usable
//! request is left idle; the same jobs in any order give the same result.
//!
//! # Worked examples
//!
//! The documented limit, 50 requests per 10 s, with 20 % headroom leaves 40. Three
//! jobs of weights 3, 1 and 1 without floors or caps share it 24 / 8 / 8:
//!
//! ```
//! use saleslayer_core::allocation::{allocate, JobKey, JobRequest, UsableBudget};
//!
//! fn job(name: &str, weight: u32) -> JobRequest {
//!     JobRequest {
//!         key: JobKey::new("shop", "catalog", name),
//!         weight,
//!         min_requests: 0,
//!         max_requests: None,
//!         max_concurrency: None,
//!         live_pods: 1,
//!         lend_idle: false,
//!         demand: None,
//!     }
//! }
//!
//! let budget = UsableBudget::from_limit(50, 10, 20);
//! assert_eq!(budget, UsableBudget { requests: 40, period_millis: 10_000 });
//!
//! let result = allocate(budget, &[job("a", 3), job("b", 1), job("c", 1)]);
//! let requests: Vec<u32> = result.jobs.iter().map(|j| j.requests).collect();
//! assert_eq!(requests, [24, 8, 8]);
//! assert_eq!(result.overcommit, None);
//! ```
//!
//! The example of DESIGN.md §3: `product-import` (weight 3, floor 10) and `price-sync`
//! (weight 1, cap 8) on 40. The floor leaves 30, shared 3 : 1 on top of the floors,
//! so the exact shares are 10 + 22.5 = 32.5 and 7.5 (below the cap of 8, so nothing
//! is redistributed). Both remainders are ½; the tie goes to the smaller key,
//! `price-sync`, which rounds up to exactly its cap:
//!
//! ```
//! # use saleslayer_core::allocation::{allocate, JobKey, JobRequest, UsableBudget};
//! # fn job(name: &str, weight: u32) -> JobRequest {
//! #     JobRequest { key: JobKey::new("shop", "catalog", name), weight, min_requests: 0,
//! #         max_requests: None, max_concurrency: None, live_pods: 1, lend_idle: false,
//! #         demand: None }
//! # }
//! let import = JobRequest { min_requests: 10, ..job("product-import", 3) };
//! let prices = JobRequest { max_requests: Some(8), ..job("price-sync", 1) };
//! let result = allocate(UsableBudget::from_limit(50, 10, 20), &[import, prices]);
//!
//! // Sorted by key: price-sync first.
//! assert_eq!(result.jobs[0].key.job, "price-sync");
//! assert_eq!(result.jobs[0].requests, 8);
//! assert_eq!(result.jobs[1].requests, 32);
//! ```
//!
//! Floors of 30 and 22 over a usable 40 are overcommitted. They are scaled by 40/52 to
//! 23.08 and 16.92; rounding down hands out 39 and the last unit goes to the larger
//! remainder:
//!
//! ```
//! # use saleslayer_core::allocation::{allocate, JobKey, JobRequest, Overcommit, UsableBudget};
//! # fn job(name: &str, weight: u32) -> JobRequest {
//! #     JobRequest { key: JobKey::new("shop", "catalog", name), weight, min_requests: 0,
//! #         max_requests: None, max_concurrency: None, live_pods: 1, lend_idle: false,
//! #         demand: None }
//! # }
//! let a = JobRequest { min_requests: 30, ..job("a", 1) };
//! let b = JobRequest { min_requests: 22, ..job("b", 1) };
//! let result = allocate(UsableBudget::from_limit(50, 10, 20), &[a, b]);
//!
//! let requests: Vec<u32> = result.jobs.iter().map(|j| j.requests).collect();
//! assert_eq!(requests, [23, 17]);
//! assert_eq!(result.overcommit, Some(Overcommit { floors: 52, usable: 40 }));
//! ```
//!
//! Lending: with `lend_idle`, a job without live pods (and without a floor) lends its
//! whole share; without it, its share stays reserved:
//!
//! ```
//! # use saleslayer_core::allocation::{allocate, JobKey, JobRequest, UsableBudget};
//! # fn job(name: &str, weight: u32) -> JobRequest {
//! #     JobRequest { key: JobKey::new("shop", "catalog", name), weight, min_requests: 0,
//! #         max_requests: None, max_concurrency: None, live_pods: 1, lend_idle: false,
//! #         demand: None }
//! # }
//! let budget = UsableBudget::from_limit(50, 10, 20);
//! let jobs = |lend_idle: bool| {
//!     let idle = JobRequest { live_pods: 0, ..job("c", 1) };
//!     [job("a", 3), job("b", 1), idle].map(|j| JobRequest { lend_idle, ..j })
//! };
//! let requests = |lend_idle| -> Vec<u32> {
//!     allocate(budget, &jobs(lend_idle)).jobs.iter().map(|j| j.requests).collect()
//! };
//! assert_eq!(requests(true), [30, 10, 0]);
//! assert_eq!(requests(false), [24, 8, 8]);
//! ```
//!
//! Per pod: 3 requests per 10 s over 4 pods is one request per 13 334 ms for each pod
//! (4 × 1/13 334 ≤ 3/10 000); 24 requests and a concurrency of 4 over 2 pods is 12
//! requests per 10 s and a concurrency of 2 each:
//!
//! ```
//! use saleslayer_core::allocation::{pod_share, PodShare};
//!
//! assert_eq!(
//!     pod_share(3, 10_000, 4, None),
//!     PodShare { requests: 1, period_millis: 13_334, max_concurrency: 1 },
//! );
//! assert_eq!(
//!     pod_share(24, 10_000, 2, Some(4)),
//!     PodShare { requests: 12, period_millis: 10_000, max_concurrency: 2 },
//! );
//! ```

use std::cmp::Ordering;

/// Identifies a job across the account: namespace, integration name, job name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobKey {
    /// Namespace of the `SalesLayerIntegration`.
    pub namespace: String,
    /// Name of the `SalesLayerIntegration`.
    pub integration: String,
    /// Name of the job within the integration.
    pub job: String,
}

impl JobKey {
    /// Builds a key from its namespace, integration name and job name.
    pub fn new(
        namespace: impl Into<String>,
        integration: impl Into<String>,
        job: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            integration: integration.into(),
            job: job.into(),
        }
    }
}

/// The account's usable budget: requests per period after headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsableBudget {
    /// Requests that may be sent per period, headroom already taken off.
    pub requests: u32,
    /// Length of the period in milliseconds.
    pub period_millis: u64,
}

impl UsableBudget {
    /// usable = floor(requests × (100 − headroom) / 100); headroom above 100 counts as 100.
    pub fn from_limit(requests: u32, period_seconds: u32, headroom_percent: u32) -> Self {
        let kept = 100u64.saturating_sub(u64::from(headroom_percent));
        Self {
            requests: narrow(u64::from(requests) * kept / 100),
            period_millis: u64::from(period_seconds) * 1000,
        }
    }
}

/// One job's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// Which job this is.
    pub key: JobKey,
    /// Relative share of what remains after the floors; 0 means the floor only.
    pub weight: u32,
    /// Requests per period guaranteed before any sharing (0 when unset).
    pub min_requests: u32,
    /// Requests per period the job never exceeds.
    pub max_requests: Option<u32>,
    /// In-flight requests the whole job may have, split over its pods.
    pub max_concurrency: Option<u32>,
    /// Pods of the job that are running now.
    pub live_pods: u32,
    /// The integration's `lendIdleCapacity`: lend this job's share while it has no pods.
    pub lend_idle: bool,
    /// Requests per period the job wants, where usage reports tell; `None` is unbounded.
    pub demand: Option<u32>,
}

/// The result for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountAllocation {
    /// The budget that was divided.
    pub budget: UsableBudget,
    /// One entry per input job, sorted by key.
    pub jobs: Vec<JobAllocation>,
    /// Set when the floors did not fit and were scaled down.
    pub overcommit: Option<Overcommit>,
}

/// Floors sum above the usable budget (they were scaled down proportionally).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overcommit {
    /// Sum of the floors (each clamped to its job's cap).
    pub floors: u64,
    /// The usable requests they had to fit in.
    pub usable: u32,
}

/// What one job gets: requests per budget period, and what each of its pods may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAllocation {
    /// Which job this is.
    pub key: JobKey,
    /// Requests per budget period for the whole job.
    pub requests: u32,
    /// Live pods the allocation was split over.
    pub pods: u32,
    /// The share of each pod (of a first pod, when `pods` is 0).
    pub per_pod: PodShare,
}

/// What one pod may send: `requests` per `period_millis`, with a concurrency cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodShare {
    /// Requests per period.
    pub requests: u32,
    /// Length of the pod's period in milliseconds; longer than the budget's when stretched.
    pub period_millis: u64,
    /// In-flight requests the pod may have (at least 1).
    pub max_concurrency: u32,
}

/// Divides `budget` among `jobs` (every job of one account); the result is sorted by key.
///
/// The result depends only on the multiset of jobs, not on their order. Two entries
/// with the same key are kept as two jobs and both appear in the result.
pub fn allocate(budget: UsableBudget, jobs: &[JobRequest]) -> AccountAllocation {
    // Sorting first makes every later tie-break (the rounding) a comparison of
    // positions, which is both cheap and independent of the caller's order.
    let mut order: Vec<&JobRequest> = jobs.iter().collect();
    order.sort_unstable_by(|a, b| canonical_order(a, b));

    let limits: Vec<Limits> = order.iter().map(|job| Limits::of(job)).collect();
    let floors: u64 = limits.iter().map(|l| u64::from(l.floor)).sum();
    let usable = budget.requests;

    let (requests, overcommit) = match u64::from(usable).checked_sub(floors) {
        Some(spare) => (fill(&limits, spare, usable), None),
        None => (
            scale_floors(&limits, floors, usable),
            Some(Overcommit { floors, usable }),
        ),
    };

    let jobs = order
        .iter()
        .zip(requests)
        .map(|(job, requests)| JobAllocation {
            key: job.key.clone(),
            requests,
            pods: job.live_pods,
            per_pod: pod_share(
                requests,
                budget.period_millis,
                job.live_pods,
                job.max_concurrency,
            ),
        })
        .collect();
    AccountAllocation {
        budget,
        jobs,
        overcommit,
    }
}

/// Splits a job's `job_requests` per `period_millis` evenly over `pods` (0 counts as 1).
///
/// Below one request per pod the period is stretched to `ceil(period × pods / requests)`
/// so every pod may still send and the pods together never exceed the job's rate
/// (unless that period overflows `u64`, when the pod gets 0 requests).
pub fn pod_share(
    job_requests: u32,
    period_millis: u64,
    pods: u32,
    max_concurrency: Option<u32>,
) -> PodShare {
    // A job without pods is asked what its first pod would get (the webhook admits
    // pods one at a time), so 0 pods is answered as 1.
    let pods = pods.max(1);
    let (requests, period_millis) = if job_requests >= pods {
        (job_requests / pods, period_millis)
    } else if job_requests == 0 {
        (0, period_millis)
    } else {
        let stretched =
            (u128::from(period_millis) * u128::from(pods)).div_ceil(u128::from(job_requests));
        match u64::try_from(stretched) {
            Ok(stretched) => (1, stretched),
            // A period past u64::MAX ms (half a billion years) cannot be written down;
            // a shorter one would break the job's rate, so the pod gets nothing.
            Err(_) => (0, period_millis),
        }
    };
    let max_concurrency = match max_concurrency {
        Some(total) => total / pods,
        None => requests,
    }
    .max(1);
    PodShare {
        requests,
        period_millis,
        max_concurrency,
    }
}

/// What allocation needs of a job: its floor, weight and effective cap.
#[derive(Debug, Clone, Copy)]
struct Limits {
    floor: u32,
    weight: u32,
    /// `None` is unbounded; when set it is never below `floor`.
    cap: Option<u32>,
    /// The cap without demand: `max_requests`, or the floor of a lending job
    /// with no pods. Never below `cap`'s floor; `None` is unbounded.
    hard_cap: Option<u32>,
}

impl Limits {
    fn of(job: &JobRequest) -> Self {
        // The schema keeps min ≤ max; clamping anyway keeps the function total.
        let floor = job
            .max_requests
            .map_or(job.min_requests, |max| job.min_requests.min(max));
        let idle = job.lend_idle && job.live_pods == 0;
        let hard_cap = if idle { Some(floor) } else { job.max_requests };
        let cap = match job.demand {
            // A job that wants less than its floor still keeps its floor.
            Some(demand) if !idle => {
                Some(hard_cap.map_or(demand, |max| max.min(demand)).max(floor))
            }
            _ => hard_cap,
        };
        Self {
            floor,
            weight: job.weight,
            cap,
            hard_cap,
        }
    }
}

/// A total order on whole requests: by key, then by every other field, so that
/// duplicates of a key still sort the same whatever order they came in.
fn canonical_order(a: &JobRequest, b: &JobRequest) -> Ordering {
    let rest = |j: &JobRequest| {
        (
            j.weight,
            j.min_requests,
            j.max_requests,
            j.max_concurrency,
            j.live_pods,
            j.lend_idle,
            j.demand,
        )
    };
    a.key.cmp(&b.key).then_with(|| rest(a).cmp(&rest(b)))
}

/// Floors scaled by `usable / floors` (which is below 1), rounded by largest remainder.
fn scale_floors(limits: &[Limits], floors: u64, usable: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(limits.len());
    let mut remainders = Vec::new();
    let mut handed_out = 0u64;
    for (position, limit) in limits.iter().enumerate() {
        // floor × usable < 2^64, so u64 holds the exact numerator over `floors`.
        let numerator = u64::from(limit.floor) * u64::from(usable);
        let (share, remainder) = (numerator / floors, numerator % floors);
        handed_out += share;
        out.push(narrow(share));
        if remainder != 0 {
            remainders.push((remainder, position));
        }
    }
    // The exact shares sum to `usable`, an integer, so this is what rounding down lost.
    hand_out_units(&mut out, &mut remainders, u64::from(usable) - handed_out);
    out
}

/// Water-filling under the effective caps; what is then left (every weighted job
/// at its effective cap) is water-filled again by weight up to the hard caps.
fn fill(limits: &[Limits], spare: u64, usable: u32) -> Vec<u32> {
    let first = water_fill(limits, spare);
    let total: u64 = first.iter().map(|&r| u64::from(r)).sum();
    let left = u64::from(usable).saturating_sub(total);
    if left == 0 || limits.iter().all(|l| l.cap == l.hard_cap) {
        return first;
    }
    let again: Vec<Limits> = limits
        .iter()
        .zip(&first)
        .map(|(limit, &got)| Limits {
            floor: got,
            weight: limit.weight,
            cap: limit.hard_cap.map(|cap| cap.max(got)),
            hard_cap: limit.hard_cap,
        })
        .collect();
    water_fill(&again, left)
}

/// Floors plus `spare` shared by weight up to each effective cap, rounded by largest
/// remainder.
fn water_fill(limits: &[Limits], spare: u64) -> Vec<u32> {
    let mut out: Vec<u32> = limits.iter().map(|l| l.floor).collect();

    // Every job of positive weight rises at `level × weight` above its floor. Jobs
    // with a cap stop at `headroom = cap − floor`, i.e. at level `headroom / weight`.
    let mut rising_weight = 0u64;
    let mut unbounded = Vec::new();
    let mut bounded = Vec::new();
    for (position, limit) in limits.iter().enumerate() {
        if limit.weight == 0 {
            continue;
        }
        match limit.cap {
            None => unbounded.push(position),
            // A job already at its cap never rises; leaving its weight out is exact.
            Some(cap) if cap == limit.floor => continue,
            Some(cap) => bounded.push((cap - limit.floor, limit.weight, position)),
        }
        rising_weight += u64::from(limit.weight);
    }

    // Visit capped jobs by the level at which they saturate, lowest first. Cross
    // multiplying (< 2^64) compares h₁/w₁ with h₂/w₂ without fractions.
    bounded.sort_unstable_by(|a, b| {
        (u64::from(a.0) * u64::from(b.1)).cmp(&(u64::from(b.0) * u64::from(a.1)))
    });
    let mut left = spare;
    let mut saturated = 0;
    for &(headroom, weight, position) in &bounded {
        // At this job's saturation level the rising jobs would take
        // headroom / weight × rising_weight; it saturates if that still fits in `left`.
        // (That also implies headroom ≤ left, as weight ≤ rising_weight.)
        if u128::from(headroom) * u128::from(rising_weight) > u128::from(left) * u128::from(weight)
        {
            break;
        }
        out[position] += headroom;
        left -= u64::from(headroom);
        rising_weight -= u64::from(weight);
        saturated += 1;
    }
    if rising_weight == 0 {
        // Every weighted job is at its cap: what is left stays idle.
        return out;
    }

    // The rest settle at level left / rising_weight: job i gets weight × left /
    // rising_weight, strictly below its headroom (else it would have saturated), so
    // rounding up cannot cross its cap.
    let mut remainders = Vec::new();
    let mut handed_out = 0u64;
    let rising = bounded[saturated..]
        .iter()
        .map(|&(_, weight, position)| (weight, position))
        .chain(unbounded.iter().map(|&p| (limits[p].weight, p)));
    for (weight, position) in rising {
        // weight × left < 2^64 since left ≤ usable ≤ u32::MAX.
        let numerator = u64::from(weight) * left;
        let (share, remainder) = (numerator / rising_weight, numerator % rising_weight);
        handed_out += share;
        out[position] += narrow(share);
        if remainder != 0 {
            remainders.push((remainder, position));
        }
    }
    // The exact shares sum to `left`, so the total handed out is exactly `usable`.
    hand_out_units(&mut out, &mut remainders, left - handed_out);
    out
}

/// Gives one unit to each of the `units` largest remainders, ties to the smaller
/// position (that is, the smaller key). All remainders share one denominator.
fn hand_out_units(out: &mut [u32], remainders: &mut [(u64, usize)], units: u64) {
    // The remainders sum to `units` × denominator and each is below the denominator,
    // so when `units` > 0 there are more than `units` of them; `min` only keeps this
    // function total.
    let units = usize::try_from(units)
        .unwrap_or(usize::MAX)
        .min(remainders.len());
    if units == 0 {
        return;
    }
    let rank = |a: &(u64, usize), b: &(u64, usize)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if units < remainders.len() {
        // Only which remainders win matters, not their order: selection is linear.
        remainders.select_nth_unstable_by(units - 1, rank);
    }
    for &(_, position) in &remainders[..units] {
        out[position] += 1;
    }
}

/// Narrows a value the caller has bounded by some `u32`; saturates rather than wraps.
fn narrow(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn job(name: &str, weight: u32) -> JobRequest {
        JobRequest {
            key: JobKey::new("shop", "catalog", name),
            weight,
            min_requests: 0,
            max_requests: None,
            max_concurrency: None,
            live_pods: 1,
            lend_idle: false,
            demand: None,
        }
    }

    fn budget(requests: u32) -> UsableBudget {
        UsableBudget {
            requests,
            period_millis: 10_000,
        }
    }

    fn requests(result: &AccountAllocation) -> Vec<u32> {
        result.jobs.iter().map(|j| j.requests).collect()
    }

    fn run(usable: u32, jobs: &[JobRequest]) -> Vec<u32> {
        requests(&allocate(budget(usable), jobs))
    }

    // ---- UsableBudget ----

    #[test]
    fn usable_budget_takes_headroom_off_the_documented_limit() {
        assert_eq!(
            UsableBudget::from_limit(50, 10, 20),
            UsableBudget {
                requests: 40,
                period_millis: 10_000
            }
        );
    }

    #[test]
    fn usable_budget_rounds_down() {
        // 7 × 85 / 100 = 5.95
        assert_eq!(UsableBudget::from_limit(7, 1, 15).requests, 5);
        assert_eq!(UsableBudget::from_limit(50, 10, 0).requests, 50);
        assert_eq!(UsableBudget::from_limit(50, 10, 90).requests, 5);
    }

    #[test]
    fn usable_budget_is_total_for_out_of_range_input() {
        assert_eq!(UsableBudget::from_limit(50, 10, 100).requests, 0);
        assert_eq!(UsableBudget::from_limit(50, 10, u32::MAX).requests, 0);
        let big = UsableBudget::from_limit(u32::MAX, u32::MAX, 0);
        assert_eq!(big.requests, u32::MAX);
        assert_eq!(big.period_millis, u64::from(u32::MAX) * 1000);
        assert_eq!(
            UsableBudget::from_limit(u32::MAX, 1, 50).requests,
            u32::MAX / 2
        );
    }

    // ---- the worked examples ----

    #[test]
    fn weights_share_the_usable_budget() {
        let b = UsableBudget::from_limit(50, 10, 20);
        let result = allocate(b, &[job("a", 3), job("b", 1), job("c", 1)]);
        assert_eq!(requests(&result), [24, 8, 8]);
        assert_eq!(result.overcommit, None);
        assert_eq!(result.budget, b);
    }

    #[test]
    fn design_example_floor_then_weight_with_a_cap() {
        let import = JobRequest {
            min_requests: 10,
            max_concurrency: Some(4),
            ..job("product-import", 3)
        };
        let prices = JobRequest {
            max_requests: Some(8),
            ..job("price-sync", 1)
        };
        let result = allocate(budget(40), &[import, prices]);
        // Exact 7.5 / 32.5: the tie of remainders goes to the smaller key.
        assert_eq!(result.jobs[0].key.job, "price-sync");
        assert_eq!(requests(&result), [8, 32]);
    }

    #[test]
    fn overcommitted_floors_are_scaled_to_fit() {
        let a = JobRequest {
            min_requests: 30,
            ..job("a", 1)
        };
        let b = JobRequest {
            min_requests: 22,
            ..job("b", 1)
        };
        let result = allocate(budget(40), &[a, b]);
        assert_eq!(requests(&result), [23, 17]);
        assert_eq!(
            result.overcommit,
            Some(Overcommit {
                floors: 52,
                usable: 40
            })
        );
    }

    #[test]
    fn idle_job_lends_its_share_when_lending_is_on() {
        let jobs = |lend_idle: bool| {
            let idle = JobRequest {
                live_pods: 0,
                ..job("c", 1)
            };
            [job("a", 3), job("b", 1), idle].map(|j| JobRequest { lend_idle, ..j })
        };
        assert_eq!(run(40, &jobs(true)), [30, 10, 0]);
        assert_eq!(run(40, &jobs(false)), [24, 8, 8]);
    }

    #[test]
    fn pod_share_examples() {
        assert_eq!(
            pod_share(3, 10_000, 4, None),
            PodShare {
                requests: 1,
                period_millis: 13_334,
                max_concurrency: 1
            }
        );
        assert_eq!(
            pod_share(24, 10_000, 2, Some(4)),
            PodShare {
                requests: 12,
                period_millis: 10_000,
                max_concurrency: 2
            }
        );
    }

    // ---- floors ----

    #[test]
    fn no_jobs_gives_an_empty_allocation() {
        let result = allocate(budget(40), &[]);
        assert!(result.jobs.is_empty());
        assert_eq!(result.overcommit, None);
    }

    #[test]
    fn floors_fitting_exactly_are_not_overcommitted() {
        let a = JobRequest {
            min_requests: 25,
            ..job("a", 1)
        };
        let b = JobRequest {
            min_requests: 15,
            ..job("b", 1)
        };
        let result = allocate(budget(40), &[a, b]);
        assert_eq!(requests(&result), [25, 15]);
        assert_eq!(result.overcommit, None);
    }

    #[test]
    fn weight_zero_gets_its_floor_only() {
        let a = JobRequest {
            min_requests: 5,
            ..job("a", 0)
        };
        assert_eq!(run(40, &[a, job("b", 1)]), [5, 35]);
    }

    #[test]
    fn all_weights_zero_leave_the_rest_idle() {
        let a = JobRequest {
            min_requests: 5,
            ..job("a", 0)
        };
        let b = job("b", 0);
        let result = allocate(budget(40), &[a, b]);
        assert_eq!(requests(&result), [5, 0]);
        assert_eq!(result.overcommit, None);
    }

    #[test]
    fn floor_is_clamped_to_the_cap() {
        let a = JobRequest {
            min_requests: 30,
            max_requests: Some(10),
            ..job("a", 1)
        };
        let b = JobRequest {
            min_requests: 25,
            ..job("b", 0)
        };
        // Clamped floors 10 + 25 fit in 40: no overcommit, and a stays at its cap.
        let result = allocate(budget(40), &[a, b]);
        assert_eq!(requests(&result), [10, 25]);
        assert_eq!(result.overcommit, None);
    }

    #[test]
    fn overcommit_reports_the_clamped_floors() {
        let a = JobRequest {
            min_requests: 100,
            max_requests: Some(30),
            ..job("a", 1)
        };
        let b = JobRequest {
            min_requests: 30,
            ..job("b", 1)
        };
        let result = allocate(budget(40), &[a, b]);
        assert_eq!(requests(&result), [20, 20]);
        assert_eq!(
            result.overcommit,
            Some(Overcommit {
                floors: 60,
                usable: 40
            })
        );
    }

    #[test]
    fn usable_zero_gives_nothing() {
        assert_eq!(run(0, &[job("a", 1), job("b", 2)]), [0, 0]);
        let a = JobRequest {
            min_requests: 3,
            ..job("a", 1)
        };
        let result = allocate(budget(0), &[a]);
        assert_eq!(requests(&result), [0]);
        assert_eq!(
            result.overcommit,
            Some(Overcommit {
                floors: 3,
                usable: 0
            })
        );
    }

    #[test]
    fn overcommit_hands_out_nothing_beyond_the_scaled_floors() {
        let a = JobRequest {
            min_requests: 50,
            ..job("a", 1)
        };
        // b has weight but no floor: in an overcommitted account it gets nothing.
        assert_eq!(run(40, &[a, job("b", 5)]), [40, 0]);
    }

    #[test]
    fn overcommit_ties_go_to_the_smaller_key() {
        let jobs: Vec<JobRequest> = ["c", "a", "b"]
            .iter()
            .map(|n| JobRequest {
                min_requests: 10,
                ..job(n, 1)
            })
            .collect();
        // 3 × 10 over 20: 6.67 each, rounded 6 + 6 + 6 and two units for a and b.
        assert_eq!(run(20, &jobs), [7, 7, 6]);
    }

    #[test]
    fn floors_above_u32_are_summed_without_overflow() {
        let jobs: Vec<JobRequest> = (0..3)
            .map(|i| JobRequest {
                min_requests: u32::MAX,
                ..job(&format!("j{i}"), 1)
            })
            .collect();
        let result = allocate(budget(u32::MAX), &jobs);
        assert_eq!(
            result.overcommit,
            Some(Overcommit {
                floors: 3 * u64::from(u32::MAX),
                usable: u32::MAX
            })
        );
        let total: u64 = result.jobs.iter().map(|j| u64::from(j.requests)).sum();
        assert_eq!(total, u64::from(u32::MAX));
        assert_eq!(requests(&result), [1_431_655_765; 3]);
    }

    // ---- water-filling ----

    #[test]
    fn extra_is_shared_on_top_of_the_floors() {
        let a = JobRequest {
            min_requests: 10,
            ..job("a", 1)
        };
        // 30 left, 15 each on top of the floors.
        assert_eq!(run(40, &[a, job("b", 1)]), [25, 15]);
    }

    #[test]
    fn what_a_capped_job_cannot_take_goes_to_the_others() {
        let a = JobRequest {
            max_requests: Some(10),
            ..job("a", 1)
        };
        assert_eq!(run(100, &[a, job("b", 1), job("c", 2)]), [10, 30, 60]);
    }

    #[test]
    fn caps_saturate_in_cascade() {
        let capped = |name: &str, weight, cap| JobRequest {
            max_requests: Some(cap),
            ..job(name, weight)
        };
        // Level 10 would give a 10 (cap 5), so a saturates; 95 over weights 1+2+3:
        // level 15.8 gives b 31.7 (cap 20), so b saturates; 75 over weight 3 to c.
        let jobs = [capped("a", 1, 5), capped("b", 2, 20), capped("c", 3, 1000)];
        assert_eq!(run(100, &jobs), [5, 20, 75]);
    }

    #[test]
    fn everyone_capped_leaves_the_rest_idle() {
        let a = JobRequest {
            max_requests: Some(10),
            ..job("a", 1)
        };
        let b = JobRequest {
            max_requests: Some(5),
            ..job("b", 3)
        };
        let result = allocate(budget(40), &[a, b]);
        assert_eq!(requests(&result), [10, 5]);
        assert_eq!(result.overcommit, None);
    }

    #[test]
    fn known_demand_caps_the_share() {
        let a = JobRequest {
            demand: Some(4),
            ..job("a", 1)
        };
        assert_eq!(run(40, &[a, job("b", 1)]), [4, 36]);
    }

    #[test]
    fn when_no_job_wants_the_rest_it_is_shared_anyway() {
        let quiet = |name, weight, demand| JobRequest {
            demand: Some(demand),
            ..job(name, weight)
        };
        // Nobody reports demand yet (or the account is quiet): ordinary shares,
        // not nothing until the next report.
        assert_eq!(run(40, &[quiet("a", 1, 0), quiet("b", 3, 0)]), [10, 30]);
        // Demand below the share: each gets its demand, the rest by weight.
        assert_eq!(run(40, &[quiet("a", 1, 2), quiet("b", 1, 6)]), [18, 22]);
        // A busy job still takes what a quiet one leaves.
        assert_eq!(run(40, &[quiet("a", 1, 0), job("b", 1)]), [0, 40]);
        // Hard caps still hold on the second pass.
        let capped = JobRequest {
            max_requests: Some(5),
            ..quiet("c", 1, 0)
        };
        assert_eq!(run(40, &[quiet("a", 1, 0), capped]), [35, 5]);
    }

    #[test]
    fn demand_below_the_floor_keeps_the_floor() {
        let a = JobRequest {
            demand: Some(2),
            min_requests: 10,
            ..job("a", 1)
        };
        assert_eq!(run(40, &[a, job("b", 1)]), [10, 30]);
    }

    #[test]
    fn demand_above_the_cap_leaves_the_cap() {
        let a = JobRequest {
            demand: Some(30),
            max_requests: Some(12),
            ..job("a", 1)
        };
        assert_eq!(run(100, &[a, job("b", 0)]), [12, 0]);
    }

    #[test]
    fn idle_job_keeps_its_floor_when_lending() {
        let idle = JobRequest {
            live_pods: 0,
            lend_idle: true,
            min_requests: 4,
            ..job("c", 1)
        };
        assert_eq!(run(40, &[job("a", 1), job("b", 1), idle]), [18, 18, 4]);
    }

    #[test]
    fn lent_share_returns_when_pods_appear() {
        let c = |live_pods| JobRequest {
            live_pods,
            lend_idle: true,
            ..job("c", 1)
        };
        assert_eq!(run(40, &[job("a", 3), job("b", 1), c(0)]), [30, 10, 0]);
        assert_eq!(run(40, &[job("a", 3), job("b", 1), c(1)]), [24, 8, 8]);
    }

    // ---- rounding ----

    #[test]
    fn rounding_ties_go_to_the_smaller_key_whatever_the_input_order() {
        let forward = [job("a", 1), job("b", 1), job("c", 1)];
        let mut backward = forward.clone();
        backward.reverse();
        assert_eq!(run(10, &forward), [4, 3, 3]);
        assert_eq!(run(10, &backward), [4, 3, 3]);
        assert_eq!(run(11, &backward), [4, 4, 3]);
    }

    #[test]
    fn the_largest_remainder_wins_over_the_smaller_key() {
        // 10 over 1:2 is 3.33 / 6.67: b has the larger remainder.
        assert_eq!(run(10, &[job("a", 1), job("b", 2)]), [3, 7]);
    }

    #[test]
    fn a_job_with_a_whole_exact_share_is_never_rounded_up() {
        let a = JobRequest {
            max_requests: Some(2),
            ..job("a", 1)
        };
        // a saturates at exactly 2; 9 over three equal weights gives b, c, d 3 each.
        // With 10, the spare unit goes among b, c, d, never to a.
        assert_eq!(
            run(10, &[a.clone(), job("b", 1), job("c", 1), job("d", 1)]),
            [2, 3, 3, 2]
        );
        assert_eq!(
            run(12, &[a, job("b", 1), job("c", 1), job("d", 1)]),
            [2, 4, 3, 3]
        );
    }

    #[test]
    fn output_is_sorted_by_namespace_integration_then_job() {
        let jobs = [
            JobRequest {
                key: JobKey::new("b", "a", "a"),
                ..job("x", 1)
            },
            JobRequest {
                key: JobKey::new("a", "b", "a"),
                ..job("x", 1)
            },
            JobRequest {
                key: JobKey::new("a", "a", "b"),
                ..job("x", 1)
            },
        ];
        let keys: Vec<JobKey> = allocate(budget(3), &jobs)
            .jobs
            .into_iter()
            .map(|j| j.key)
            .collect();
        assert_eq!(
            keys,
            [
                JobKey::new("a", "a", "b"),
                JobKey::new("a", "b", "a"),
                JobKey::new("b", "a", "a")
            ]
        );
    }

    #[test]
    fn duplicate_keys_are_kept_as_separate_jobs() {
        let light = job("a", 1);
        let heavy = job("a", 3);
        let one = allocate(budget(40), &[light.clone(), heavy.clone()]);
        let other = allocate(budget(40), &[heavy, light]);
        assert_eq!(requests(&one), [10, 30]);
        assert_eq!(one, other);
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        let jobs: Vec<JobRequest> = (0..5)
            .map(|i| JobRequest {
                weight: u32::MAX - i,
                min_requests: u32::MAX / 8,
                max_requests: (i % 2 == 0).then_some(u32::MAX - 1),
                max_concurrency: Some(u32::MAX),
                live_pods: u32::MAX,
                demand: (i == 3).then_some(u32::MAX),
                ..job(&format!("j{i}"), 0)
            })
            .collect();
        let b = UsableBudget {
            requests: u32::MAX,
            period_millis: u64::MAX,
        };
        let result = allocate(b, &jobs);
        let total: u64 = result.jobs.iter().map(|j| u64::from(j.requests)).sum();
        assert_eq!(total, u64::from(u32::MAX));
        assert_eq!(result.overcommit, None);
    }

    // ---- per pod ----

    #[test]
    fn pod_share_divides_evenly_and_rounds_down() {
        assert_eq!(pod_share(10, 10_000, 3, None).requests, 3);
        assert_eq!(pod_share(10, 10_000, 3, None).period_millis, 10_000);
    }

    #[test]
    fn pod_share_of_no_pods_is_the_share_of_a_first_pod() {
        assert_eq!(pod_share(8, 10_000, 0, None), pod_share(8, 10_000, 1, None));
        assert_eq!(pod_share(8, 10_000, 0, None).requests, 8);
    }

    #[test]
    fn pod_share_of_nothing_is_nothing() {
        assert_eq!(
            pod_share(0, 10_000, 3, Some(6)),
            PodShare {
                requests: 0,
                period_millis: 10_000,
                max_concurrency: 2
            }
        );
        assert_eq!(pod_share(0, 10_000, 3, None).max_concurrency, 1);
    }

    #[test]
    fn pod_share_concurrency_is_at_least_one() {
        assert_eq!(pod_share(40, 10_000, 8, Some(3)).max_concurrency, 1);
        assert_eq!(pod_share(40, 10_000, 8, Some(0)).max_concurrency, 1);
        assert_eq!(pod_share(40, 10_000, 8, None).max_concurrency, 5);
    }

    #[test]
    fn pod_share_stretch_past_u64_gives_nothing_rather_than_too_much() {
        assert_eq!(
            pod_share(1, u64::MAX, u32::MAX, None),
            PodShare {
                requests: 0,
                period_millis: u64::MAX,
                max_concurrency: 1
            }
        );
        let longest = pod_share(1, u64::MAX / 2, 2, None);
        assert_eq!((longest.requests, longest.period_millis), (1, u64::MAX - 1));
    }

    #[test]
    fn allocate_fills_in_pods_and_per_pod_shares() {
        let import = JobRequest {
            live_pods: 2,
            max_concurrency: Some(4),
            ..job("a", 3)
        };
        let result = allocate(budget(40), &[import, job("b", 1), job("c", 1)]);
        let first = &result.jobs[0];
        assert_eq!((first.requests, first.pods), (24, 2));
        assert_eq!(first.per_pod, pod_share(24, 10_000, 2, Some(4)));
        assert_eq!(
            first.per_pod,
            PodShare {
                requests: 12,
                period_millis: 10_000,
                max_concurrency: 2
            }
        );
    }

    // ---- properties ----

    /// The effective cap as the rules state it, written independently of `Limits`.
    fn floor_and_cap(job: &JobRequest) -> (u32, Option<u32>) {
        let floor = match job.max_requests {
            Some(max) if max < job.min_requests => max,
            _ => job.min_requests,
        };
        if job.lend_idle && job.live_pods == 0 {
            return (floor, Some(floor));
        }
        let cap = match (job.max_requests, job.demand) {
            (None, None) => None,
            (Some(max), None) => Some(max),
            (None, Some(demand)) => Some(demand.max(floor)),
            (Some(max), Some(demand)) => Some(max.min(demand.max(floor))),
        };
        (floor, cap)
    }

    /// The cap without demand, as the rules state it.
    fn hard_cap(job: &JobRequest) -> Option<u32> {
        let (floor, _) = floor_and_cap(job);
        if job.lend_idle && job.live_pods == 0 {
            Some(floor)
        } else {
            job.max_requests
        }
    }

    /// What water-filling can hand out under `cap`: the floors plus every weighted
    /// job's room up to its cap, or everything when one is unbounded.
    fn reachable(
        sorted: &[&JobRequest],
        cap: impl Fn(&JobRequest) -> Option<u32>,
        usable: u64,
    ) -> u64 {
        let mut total = 0u64;
        for job in sorted {
            let (floor, _) = floor_and_cap(job);
            total += u64::from(floor);
            if job.weight > 0 {
                match cap(job) {
                    Some(cap) => total += u64::from(cap.max(floor) - floor),
                    None => return usable,
                }
            }
        }
        total.min(usable)
    }

    /// Whether the second pass ran: the first left capacity and some cap was soft.
    fn refilled(sorted: &[&JobRequest], usable: u64) -> bool {
        reachable(sorted, |j| floor_and_cap(j).1, usable) < usable
            && sorted.iter().any(|j| floor_and_cap(j).1 != hard_cap(j))
    }

    fn key() -> impl Strategy<Value = JobKey> {
        // A small key space, so duplicates and shared prefixes are common.
        (0..2u8, 0..2u8, 0..4u8).prop_map(|(n, i, j)| {
            JobKey::new(format!("ns{n}"), format!("int{i}"), format!("job{j}"))
        })
    }

    fn small_job() -> impl Strategy<Value = JobRequest> {
        (
            key(),
            prop_oneof![3 => 0..6u32, 1 => Just(0u32), 1 => 0..1000u32],
            prop_oneof![2 => Just(0u32), 1 => 0..40u32],
            proptest::option::weighted(0.4, 0..60u32),
            proptest::option::of(0..10u32),
            0..4u32,
            any::<bool>(),
            proptest::option::weighted(0.3, 0..60u32),
        )
            .prop_map(
                |(key, weight, min, max, conc, live_pods, lend_idle, demand)| JobRequest {
                    key,
                    weight,
                    min_requests: min,
                    max_requests: max,
                    max_concurrency: conc,
                    live_pods,
                    lend_idle,
                    demand,
                },
            )
    }

    fn huge_job() -> impl Strategy<Value = JobRequest> {
        (
            key(),
            any::<u32>(),
            prop_oneof![Just(0u32), any::<u32>()],
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            any::<u32>(),
            any::<bool>(),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(
                |(key, weight, min, max, conc, live_pods, lend_idle, demand)| JobRequest {
                    key,
                    weight,
                    min_requests: min,
                    max_requests: max,
                    max_concurrency: conc,
                    live_pods,
                    lend_idle,
                    demand,
                },
            )
    }

    fn small_budget() -> impl Strategy<Value = UsableBudget> {
        (0..200u32, 1..20_000u64).prop_map(|(requests, period_millis)| UsableBudget {
            requests,
            period_millis,
        })
    }

    fn huge_budget() -> impl Strategy<Value = UsableBudget> {
        (any::<u32>(), any::<u64>()).prop_map(|(requests, period_millis)| UsableBudget {
            requests,
            period_millis,
        })
    }

    fn account() -> impl Strategy<Value = (UsableBudget, Vec<JobRequest>)> {
        prop_oneof![
            4 => (small_budget(), proptest::collection::vec(small_job(), 0..12)),
            1 => (huge_budget(), proptest::collection::vec(huge_job(), 0..12)),
        ]
    }

    /// Checks every invariant of DESIGN.md §4 on one result.
    fn check_invariants(budget: UsableBudget, jobs: &[JobRequest], result: &AccountAllocation) {
        let mut sorted: Vec<&JobRequest> = jobs.iter().collect();
        sorted.sort_by(|a, b| canonical_order(a, b));
        assert_eq!(result.budget, budget);
        assert_eq!(result.jobs.len(), jobs.len());
        assert!(result.jobs.is_sorted_by(|a, b| a.key <= b.key));

        let usable = u64::from(budget.requests);
        let total: u64 = result.jobs.iter().map(|j| u64::from(j.requests)).sum();
        let floors: u64 = sorted.iter().map(|j| u64::from(floor_and_cap(j).0)).sum();
        // Σ allocations ≤ usable.
        assert!(total <= usable);

        match result.overcommit {
            Some(overcommit) => {
                assert_eq!(
                    overcommit,
                    Overcommit {
                        floors,
                        usable: budget.requests
                    }
                );
                assert!(floors > usable);
                // Scaled floors fill the budget exactly; each is within one unit of
                // its exact share floor × usable / floors.
                assert_eq!(total, usable);
                for (job, got) in sorted.iter().zip(&result.jobs) {
                    let floor = u128::from(floor_and_cap(job).0);
                    let scaled = u128::from(got.requests) * u128::from(floors);
                    let exact = floor * u128::from(usable);
                    assert!(scaled.abs_diff(exact) < u128::from(floors));
                    assert!(u128::from(got.requests) <= floor);
                }
            }
            None => {
                assert!(floors <= usable);
                // No usable capacity idle while a weighted job is below its hard cap.
                assert_eq!(total, reachable(&sorted, hard_cap, usable));
                // Demand caps hold when the first pass used everything; otherwise
                // every weighted job reached its demand cap before the rest was shared.
                let soft_filled = reachable(&sorted, |j| floor_and_cap(j).1, usable) == usable;
                for (job, got) in sorted.iter().zip(&result.jobs) {
                    let (floor, cap) = floor_and_cap(job);
                    // Floors hold.
                    assert!(got.requests >= floor);
                    if job.weight == 0 {
                        assert_eq!(got.requests, floor);
                    }
                    if total < usable && job.weight > 0 {
                        assert_eq!(Some(got.requests), hard_cap(job));
                    }
                    match cap {
                        Some(cap) if soft_filled => assert!(got.requests <= cap),
                        Some(cap) if job.weight > 0 => assert!(got.requests >= cap),
                        _ => {}
                    }
                }
            }
        }

        for (job, got) in sorted.iter().zip(&result.jobs) {
            assert_eq!(got.key, job.key);
            // Hard caps hold in every case: max and lending.
            let floor = floor_and_cap(job).0;
            if let Some(cap) = hard_cap(job) {
                assert!(got.requests <= cap.max(floor));
            }
            if let Some(max) = job.max_requests {
                assert!(got.requests <= max);
            }
            if job.lend_idle && job.live_pods == 0 {
                assert!(got.requests <= floor);
            }
            assert_eq!(got.pods, job.live_pods);
            assert_eq!(
                got.per_pod,
                pod_share(
                    got.requests,
                    budget.period_millis,
                    job.live_pods,
                    job.max_concurrency
                )
            );
        }
    }

    /// Weighted max-min fairness, within rounding: a weighted job below its cap has
    /// extra/weight within one unit of the common level L, and no weighted job is
    /// more than one unit above it, so (extra_j − 1)/w_j < L < (extra_i + 1)/w_i.
    fn check_fairness(jobs: &[JobRequest], result: &AccountAllocation) {
        if result.overcommit.is_some() {
            return;
        }
        let mut sorted: Vec<&JobRequest> = jobs.iter().collect();
        sorted.sort_by(|a, b| canonical_order(a, b));
        // After a second pass the levels are those of the rest over the demand caps.
        if refilled(&sorted, u64::from(result.budget.requests)) {
            return;
        }
        let extras: Vec<(i128, i128, bool)> = sorted
            .iter()
            .zip(&result.jobs)
            .filter(|(job, _)| job.weight > 0)
            .map(|(job, got)| {
                let (floor, cap) = floor_and_cap(job);
                let below_cap = cap.is_none_or(|cap| got.requests < cap);
                (
                    i128::from(got.requests - floor),
                    i128::from(job.weight),
                    below_cap,
                )
            })
            .collect();
        for &(extra_i, weight_i, below_cap) in &extras {
            if !below_cap {
                continue;
            }
            for &(extra_j, weight_j, _) in &extras {
                assert!((extra_j - 1) * weight_i < (extra_i + 1) * weight_j);
            }
        }
    }

    proptest! {
        #[test]
        fn allocation_keeps_every_invariant((budget, jobs) in account()) {
            let result = allocate(budget, &jobs);
            check_invariants(budget, &jobs, &result);
            check_fairness(&jobs, &result);
        }

        #[test]
        fn input_order_does_not_change_the_output(
            (budget, jobs, shuffled) in account().prop_flat_map(|(budget, jobs)| {
                let shuffled = Just(jobs.clone()).prop_shuffle();
                (Just(budget), Just(jobs), shuffled)
            })
        ) {
            prop_assert_eq!(allocate(budget, &jobs), allocate(budget, &shuffled));
        }

        #[test]
        fn same_input_gives_the_same_output((budget, jobs) in account()) {
            prop_assert_eq!(allocate(budget, &jobs), allocate(budget, &jobs));
        }

        #[test]
        fn pod_shares_never_exceed_the_job_rate(
            requests in prop_oneof![0..100u32, any::<u32>()],
            period_millis in prop_oneof![1..100_000u64, any::<u64>()],
            pods in prop_oneof![0..10u32, any::<u32>()],
            max_concurrency in proptest::option::of(any::<u32>()),
        ) {
            let share = pod_share(requests, period_millis, pods, max_concurrency);
            let pods = u128::from(pods.max(1));
            // pods × share.requests / share.period ≤ requests / period.
            prop_assert!(
                pods * u128::from(share.requests) * u128::from(period_millis)
                    <= u128::from(requests) * u128::from(share.period_millis)
            );
            prop_assert!(share.max_concurrency >= 1);
            let needed = (u128::from(period_millis) * pods).div_ceil(u128::from(requests.max(1)));
            if u128::from(requests) >= pods {
                prop_assert_eq!(u128::from(share.requests), u128::from(requests) / pods);
                prop_assert_eq!(share.period_millis, period_millis);
            } else if requests > 0 && needed <= u128::from(u64::MAX) {
                // Every pod may send, and the period is stretched no more than needed.
                prop_assert_eq!(share.requests, 1);
                prop_assert_eq!(u128::from(share.period_millis), needed);
            } else {
                prop_assert_eq!(share.requests, 0);
                prop_assert_eq!(share.period_millis, period_millis);
            }
        }
    }
}
