//! How long allocation takes for large accounts (DESIGN.md §4: 10 000 jobs in under 1 ms).
//!
//! Inputs are generated from a fixed seed, so every run measures the same accounts:
//! varied weights, some floors, caps and known demands, and integrations that lend the
//! share of jobs with no live pods. About half of the time for one large account goes
//! to cloning the keys (three `String`s a job) into the result; sorting unordered
//! input by key costs about as much again.

use std::hint::black_box;

use divan::Bencher;
use saleslayer_core::allocation::{JobKey, JobRequest, UsableBudget, allocate};

fn main() {
    divan::main();
    // divan prints its table; the headline figures again as one line to compare runs.
    // Like divan, the result is dropped outside the timed part.
    let median_us = |run: &dyn Fn() -> Vec<saleslayer_core::allocation::AccountAllocation>| {
        let mut samples: Vec<f64> = (0..101)
            .map(|_| {
                let start = std::time::Instant::now();
                let result = run();
                let took = start.elapsed().as_secs_f64() * 1e6;
                drop(black_box(result));
                took
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2].round()
    };
    let mut seed = fastrand::Rng::with_seed(1);
    let sorted = jobs(&mut seed, 1_000, 10);
    let unsorted = shuffled(sorted.clone(), &mut seed);
    let budget = large_budget();
    let mut seed = fastrand::Rng::with_seed(2);
    let accounts: Vec<Vec<JobRequest>> = (0..1_000).map(|_| jobs(&mut seed, 1, 10)).collect();
    let small = UsableBudget::from_limit(50, 10, 20);
    let line = serde_json::json!({
        "bench": "allocation",
        "one_account_10k_jobs_median_us": median_us(&|| {
            vec![allocate(budget, black_box(&sorted))]
        }),
        "one_account_10k_jobs_unsorted_median_us": median_us(&|| {
            vec![allocate(budget, black_box(&unsorted))]
        }),
        "thousand_accounts_of_10_jobs_median_us": median_us(&|| {
            accounts
                .iter()
                .map(|jobs| allocate(small, black_box(jobs)))
                .collect()
        }),
    });
    println!("BENCH {line}");
}

/// `integrations × jobs_each` jobs, in key order (as a controller reading a sorted
/// cache would pass them).
fn jobs(seed: &mut fastrand::Rng, integrations: usize, jobs_each: usize) -> Vec<JobRequest> {
    let mut jobs = Vec::with_capacity(integrations * jobs_each);
    for integration in 0..integrations {
        let lend_idle = seed.u32(0..100) < 30;
        for job in 0..jobs_each {
            let min_requests = if seed.u32(0..100) < 20 {
                1 + seed.u32(0..5)
            } else {
                0
            };
            jobs.push(JobRequest {
                key: JobKey::new(
                    format!("team-{:03}", integration % 100),
                    format!("integration-{integration:04}"),
                    format!("job-{job:02}"),
                ),
                weight: seed.u32(0..11),
                min_requests,
                max_requests: (seed.u32(0..100) < 30).then(|| min_requests + 20 + seed.u32(0..200)),
                max_concurrency: (seed.u32(0..100) < 50).then(|| 1 + seed.u32(0..16)),
                live_pods: if seed.u32(0..100) < 20 {
                    0
                } else {
                    1 + seed.u32(0..8)
                },
                lend_idle,
                demand: (seed.u32(0..100) < 25).then(|| seed.u32(0..300)),
            });
        }
    }
    jobs.sort_by(|a, b| a.key.cmp(&b.key));
    jobs
}

/// Fisher–Yates with the bench's own generator.
fn shuffled(mut jobs: Vec<JobRequest>, seed: &mut fastrand::Rng) -> Vec<JobRequest> {
    for i in (1..jobs.len()).rev() {
        let j = seed.usize(0..=i);
        jobs.swap(i, j);
    }
    jobs
}

/// A budget large enough that the floors fit and water-filling does the work.
fn large_budget() -> UsableBudget {
    UsableBudget::from_limit(1_000_000, 10, 20)
}

#[divan::bench]
fn one_account_10k_jobs(bencher: Bencher) {
    let jobs = jobs(&mut fastrand::Rng::with_seed(1), 1_000, 10);
    let budget = large_budget();
    bencher.bench(|| allocate(black_box(budget), black_box(&jobs)));
}

#[divan::bench]
fn one_account_10k_jobs_unsorted_input(bencher: Bencher) {
    let mut seed = fastrand::Rng::with_seed(1);
    let jobs = jobs(&mut seed, 1_000, 10);
    let jobs = shuffled(jobs, &mut seed);
    let budget = large_budget();
    bencher.bench(|| allocate(black_box(budget), black_box(&jobs)));
}

#[divan::bench]
fn one_account_10k_jobs_overcommitted(bencher: Bencher) {
    // The documented 50 per 10 s cannot hold ~2 000 floors: the scaling path.
    let jobs = jobs(&mut fastrand::Rng::with_seed(1), 1_000, 10);
    let budget = UsableBudget::from_limit(50, 10, 20);
    bencher.bench(|| allocate(black_box(budget), black_box(&jobs)));
}

#[divan::bench]
fn thousand_accounts_of_10_jobs(bencher: Bencher) {
    let mut seed = fastrand::Rng::with_seed(2);
    let accounts: Vec<Vec<JobRequest>> = (0..1_000).map(|_| jobs(&mut seed, 1, 10)).collect();
    let budget = UsableBudget::from_limit(50, 10, 20);
    bencher.bench(|| {
        accounts
            .iter()
            .map(|jobs| allocate(black_box(budget), black_box(jobs)))
            .collect::<Vec<_>>()
    });
}
