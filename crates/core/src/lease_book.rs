//! The lease book of the quota API (DESIGN.md §6): what each pod may send until its
//! lease runs out.
//!
//! Pods renew a lease every `refreshMillis`; each answer is a [`Grant`] that holds for
//! one TTL. The book owns the leases alive at this instant and decides every grant:
//! the job's allocation split over the job's *live* pods ([`pod_target`]), cut down to
//! what the *other* live grants and the static shares of the job's pods without a
//! lease leave of the job's allocation, and to what the other live grants leave of
//! the account's usable budget. Capacity one pod gives up reaches another only once
//! the first pod's older lease has expired or been renewed at the lower figure.
//!
//! A fleet may mix pods that lease with pods that pace by their limit file or env
//! (they never lease, were refused, or their lease lapsed): each of those sends its
//! static share, so the book reserves that share for every live pod of the job that
//! holds no lease with it, and counts each lease at no less than the static share its
//! pod falls back to when the lease lapses. So what every pod of a job may send (its
//! grant, or else its static share) adds up to no more than the job's allocation.
//!
//! After a restart (or a leader change) the book cannot see what the previous leader
//! granted. For one TTL it grants no more than each pod's static share, and it
//! reserves the static share for every live pod that has not leased with it yet. The
//! previous leader granted a pod at most its target: the static share, plus one
//! request for `allocation % pods` of the pods. New grants capped at the static share
//! leave those requests unused, so old and new grants together stay within the
//! allocation too.
//!
//! The book never reads a clock, never talks to the API server, never authenticates
//! and never logs. The quota API's handler resolves the pod's account, usable budget,
//! job allocation and static share, calls [`LeaseBook::lease`] with the time, and
//! encodes the [`Grant`] it gets back; pod deletions come in through
//! [`LeaseBook::release`]. Only the leader keeps a book, behind one lock.
//!
//! # How rates are reckoned
//!
//! A grant is `requests` per `period_millis`, and periods differ from pod to pod once
//! they are stretched, so the book keeps every sum in one unit per account:
//! `1 / (P × SCALE)` requests per millisecond, P being the account's usable period.
//! A grant is rounded *up* to whole units and what is left of a budget *down*, so the
//! reckoning can only overstate what is out, never understate it. SCALE is
//! lcm(1..=46): a share of P-periods is a whole number of units, and so is a job's
//! allocation split over up to 46 pods with a stretched period, so pods that all hold
//! their targets fit exactly. (Past that the rounding can leave the last pod a period a
//! few milliseconds longer than its target; it never lets the sum exceed the budget.)
//!
//! What the book guarantees, at every instant: for any figure `a`, the live grants on
//! an account that were made under a usable rate of at most `a` add up to at most `a`,
//! and the same holds for a job's grants and its allocation. So while an account's
//! budget does not change its live grants never exceed it, and while a job's plan (its
//! allocation and live pods) does not change, its grants plus the static shares of its
//! pods without a live grant do not exceed its allocation, across leader changes too.
//! When a figure drops, grants made under the higher one stay live until their pods
//! renew or their leases lapse (one TTL at most), and until then new grants get only
//! what they leave. The caller passes consistent figures: the static share is the
//! allocation split over `live_pods` (a larger one is reserved only up to the pod's
//! target: the book's own split wins over a stale count).
//!
//! Leases expire in the order they were made, because the TTL is fixed and the book's
//! clock never goes back (an earlier `now` counts as the latest one seen). So each job
//! waits in a queue under the expiry of its oldest lease; a call first prunes the jobs
//! that are due and then works on the sums of one account and one job, never on all
//! leases.
//!
//! # Example
//!
//! ```
//! use saleslayer_core::allocation::{pod_share, JobKey, UsableBudget};
//! use saleslayer_core::lease_book::{LeaseBook, LeaseRequest};
//!
//! let job = JobKey::new("shop", "catalog", "price-sync");
//! let ask = |pod, live_pods| LeaseRequest {
//!     account: "acme",
//!     usable: UsableBudget { requests: 40, period_millis: 10_000 },
//!     job: &job,
//!     pod,
//!     job_requests: 24,
//!     max_concurrency: None,
//!     live_pods,
//!     static_share: pod_share(24, 10_000, live_pods, None),
//! };
//! let mut book = LeaseBook::new(0, 15_000, 5_000);
//!
//! // Within one TTL of the start the static share caps the grant: 12 of the job's 24.
//! assert_eq!(book.lease(0, &ask("a", 2)).share.requests, 12);
//! // Later a lone pod gets the whole allocation…
//! assert_eq!(book.lease(15_000, &ask("a", 1)).share.requests, 24);
//! // …so a second pod gets nothing until the first renews at half.
//! assert_eq!(book.lease(15_001, &ask("b", 2)).share.requests, 0);
//! assert_eq!(book.lease(20_000, &ask("a", 2)).share.requests, 12);
//! assert_eq!(book.lease(20_001, &ask("b", 2)).share.requests, 12);
//! // A third pod that paces by its file (24 ÷ 3 = 8) is reserved its share though
//! // it never asks: while b still holds 12, a gets 4; then both settle at 8.
//! assert_eq!(book.lease(25_000, &ask("a", 3)).share.requests, 4);
//! assert_eq!(book.lease(25_001, &ask("b", 3)).share.requests, 8);
//! assert_eq!(book.lease(30_000, &ask("a", 3)).share.requests, 8);
//! ```

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use crate::allocation::{JobKey, PodShare, UsableBudget, pod_share};

/// The lease TTL the operator uses: a pod that misses two renewals falls back to its file.
pub const DEFAULT_TTL_MILLIS: u64 = 15_000;

/// How often the operator asks pods to renew, at most.
pub const DEFAULT_REFRESH_MILLIS: u64 = 5_000;

/// The shortest refresh a grant asks for in the ordinary case: the pods'
/// steady renewal load stays at one call per pod per two seconds.
pub const MIN_REFRESH_MILLIS: u64 = 2_000;

/// The shortest refresh of a pod asked to come back sooner (below): twice the
/// quota API's least accepted interval between a pod's calls.
pub const MIN_SOON_REFRESH_MILLIS: u64 = 2 * saleslayer_contract::MIN_RENEWAL_INTERVAL_MILLIS;

/// How soon a pod whose requests wait for capacity renews, on an account that
/// lends idle capacity: half its refresh. Such a pod holds all it was
/// granted, so it takes capacity that another job stopped using within half a
/// refresh, and gives back capacity lent to it within half a refresh of the
/// lender's return.
pub fn waiting_refresh(refresh_millis: u64) -> u64 {
    (refresh_millis / 2).max(MIN_SOON_REFRESH_MILLIS)
}

/// How soon a pod renews whose grant was cut below its target because other
/// pods still hold the capacity: a quarter of its refresh. The others give it
/// up at their next renewal; this pod takes it at the one after.
pub fn cut_refresh(refresh_millis: u64) -> u64 {
    (refresh_millis / 4).max(MIN_SOON_REFRESH_MILLIS)
}

/// How soon a pod renews under a limit of `period_millis`: half a period, so
/// the pods follow a new budget within the window after it, kept between
/// [`MIN_REFRESH_MILLIS`] and the book's `max_refresh_millis` (5 s under the
/// documented 10 s period; 2 s under the benchmarks' 1 s one).
pub fn refresh_for(period_millis: u64, max_refresh_millis: u64) -> u64 {
    (period_millis / 2).clamp(
        MIN_REFRESH_MILLIS.min(max_refresh_millis),
        max_refresh_millis,
    )
}

/// The windows of `period_millis` the pods take to follow a new budget: one
/// refresh, at least one window.
pub fn settle_windows(period_millis: u64, refresh_millis: u64) -> u64 {
    refresh_millis.div_ceil(period_millis.max(1)).max(1)
}

/// Units per request per usable period: lcm(1..=46), the largest lcm(1..=n) below
/// 2^64, so `P × SCALE` fits a `u128` for every `u64` period, and `usable × SCALE`
/// (< 2^96) leaves room for the sums of billions of grants.
const SCALE: u128 = 9_419_588_158_802_421_600;

/// One pod asking to renew its lease, with what the caller knows of its job and account.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    /// The Sales Layer account the job's integration uses.
    pub account: &'a str,
    /// The account's usable budget.
    pub usable: UsableBudget,
    /// The pod's job.
    pub job: &'a JobKey,
    /// The pod's name.
    pub pod: &'a str,
    /// The job's allocation, in requests per `usable.period_millis`.
    pub job_requests: u32,
    /// The job's `maxConcurrency`.
    pub max_concurrency: Option<u32>,
    /// The job's live pods as the controller counts them, leasing or not.
    pub live_pods: u32,
    /// The share each of the job's pods paces by without a lease (its limit file or
    /// env): reserved for every live pod without a lease, the least a lease counts
    /// for, and the cap for one TTL after a restart.
    pub static_share: PodShare,
}

/// What a pod may send until its lease expires, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Requests per period and concurrency the pod may use.
    pub share: PodShare,
    /// How long the grant holds from the moment it was made.
    pub ttl_millis: u64,
    /// How soon the pod should renew.
    pub refresh_millis: u64,
}

/// The live leases of every pod that asks the quota API, and the sums they add up to.
#[derive(Debug, Clone)]
pub struct LeaseBook {
    started_millis: u64,
    ttl_millis: u64,
    refresh_millis: u64,
    /// The latest time seen; time never runs backwards inside the book.
    clock_millis: u64,
    accounts: Vec<Account>,
    account_ids: HashMap<Box<str>, usize>,
    /// Jobs by the expiry of their oldest lease, when they must be pruned. An entry is
    /// current only while it matches its job's `due_millis`; others are skipped.
    due: BinaryHeap<Reverse<(u64, usize, JobKey)>>,
}

/// The leases on one account.
#[derive(Debug, Clone)]
struct Account {
    /// The usable period P the units are counted in.
    base_millis: u64,
    /// Σ units of every lease on the account.
    granted: u128,
    jobs: HashMap<JobKey, Job>,
}

/// The leases of one job on one account.
#[derive(Debug, Clone, Default)]
struct Job {
    /// Σ units of the job's leases.
    granted: u128,
    /// When the oldest lease expires (the job's entry in the due queue).
    due_millis: Option<u64>,
    pods: HashMap<Box<str>, Lease>,
}

/// One pod's lease: what it reserves (its grant, or the static share it falls back
/// to when that is more) and when that lapses. Units are not stored (they follow
/// from the share and the account's period), to keep a lease small.
#[derive(Debug, Clone, Copy)]
struct Lease {
    expires_millis: u64,
    period_millis: u64,
    requests: u32,
}

impl Lease {
    fn units(&self, base_millis: u64) -> u128 {
        units(self.requests, self.period_millis, base_millis)
    }
}

impl LeaseBook {
    /// An empty book for a process started at `started_millis`, handing out leases of
    /// `ttl_millis` to be renewed every `refresh_millis`.
    pub fn new(started_millis: u64, ttl_millis: u64, refresh_millis: u64) -> Self {
        Self {
            started_millis,
            ttl_millis,
            refresh_millis,
            clock_millis: started_millis,
            accounts: Vec::new(),
            account_ids: HashMap::new(),
            due: BinaryHeap::new(),
        }
    }

    /// Renews (or opens) the lease of `request.pod` at `now_millis` and returns its grant.
    ///
    /// The grant is the pod's target, [`pod_target`] of the job's allocation over the
    /// job's live pods (at least those with a live lease, the requester included),
    /// capped by the static share within one TTL of the start, then cut to what the
    /// job's allocation leaves once the other live grants and the reserve for the
    /// job's pods without a lease are taken, and to what the other live grants leave
    /// of the account's usable rate. What is left below one request per period is
    /// granted as one request per a stretched period; a budget with a zero period
    /// grants nothing.
    pub fn lease(&mut self, now_millis: u64, request: &LeaseRequest<'_>) -> Grant {
        let now = self.advance(now_millis);
        let restarting = now < self.started_millis.saturating_add(self.ttl_millis);
        let expires_millis = now.saturating_add(self.ttl_millis);
        let account_id = self.account_id(request.account, request.usable.period_millis);
        let account = &mut self.accounts[account_id];
        account.rebase(request.usable.period_millis);
        let (share, first, cut) = account.lease(request, expires_millis, restarting);
        if first {
            self.due
                .push(Reverse((expires_millis, account_id, request.job.clone())));
        }
        let refresh = self.ordinary_refresh(request.usable.period_millis);
        Grant {
            share,
            ttl_millis: self.ttl_millis,
            refresh_millis: if cut {
                cut_refresh(refresh).min(refresh)
            } else {
                refresh
            },
        }
    }

    /// The refresh a grant asks for under a limit of `period_millis` when
    /// nothing calls for a sooner one ([`refresh_for`] with the book's maximum).
    pub fn ordinary_refresh(&self, period_millis: u64) -> u64 {
        refresh_for(period_millis, self.refresh_millis)
    }

    /// Drops the lease of `pod` of `job` at once, on every account, and hands its
    /// capacity on: only for a pod that can no longer send (it was deleted).
    pub fn release(&mut self, job: &JobKey, pod: &str) {
        for account in &mut self.accounts {
            let base = account.base_millis;
            let Some(leases) = account.jobs.get_mut(job) else {
                continue;
            };
            let Some(lease) = leases.pods.remove(pod) else {
                continue;
            };
            let units = lease.units(base);
            leases.granted = leases.granted.saturating_sub(units);
            account.granted = account.granted.saturating_sub(units);
            if leases.pods.is_empty() {
                // Its entry in the due queue goes stale and is skipped.
                account.jobs.remove(job);
            }
        }
    }

    /// How many leases are live at `now_millis` (for metrics).
    pub fn live_leases(&self, now_millis: u64) -> usize {
        let now = now_millis.max(self.clock_millis);
        self.accounts
            .iter()
            .flat_map(|account| account.jobs.values())
            .map(|job| job.live_count(now))
            .sum()
    }

    /// The rate reserved by the live leases of `account` at `now_millis`, as
    /// `(numerator, denominator)` in requests per millisecond, reduced.
    ///
    /// This is the book's own reckoning: each lease at its grant (or at the static
    /// share its pod falls back to, when more), rounded up to whole units, so it is
    /// never below the exact sum of the grants and equals it unless periods are
    /// stretched or a pod waits below its static share.
    pub fn live_rate(&self, now_millis: u64, account: &str) -> (u128, u128) {
        let now = now_millis.max(self.clock_millis);
        let Some(account) = self.account_ids.get(account).map(|&id| &self.accounts[id]) else {
            return (0, 1);
        };
        let base = account.base_millis;
        let numerator = account
            .jobs
            .values()
            .flat_map(|job| job.live(now))
            .map(|lease| lease.units(base))
            .fold(0, u128::saturating_add);
        let denominator = u128::from(base) * SCALE;
        match gcd(numerator, denominator) {
            0 => (0, 1),
            divisor => (numerator / divisor, denominator / divisor),
        }
    }

    /// Moves the clock to `now_millis` (never back) and prunes the leases that lapsed.
    fn advance(&mut self, now_millis: u64) -> u64 {
        self.clock_millis = self.clock_millis.max(now_millis);
        let now = self.clock_millis;
        while self
            .due
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= now)
        {
            let Some(Reverse((at, account_id, key))) = self.due.pop() else {
                break;
            };
            let Some(account) = self.accounts.get_mut(account_id) else {
                continue;
            };
            let base = account.base_millis;
            let Some(job) = account.jobs.get_mut(&key) else {
                continue;
            };
            if job.due_millis != Some(at) {
                continue;
            }
            let mut freed = 0u128;
            let mut oldest = u64::MAX;
            job.pods.retain(|_, lease| {
                let live = lease.expires_millis > now;
                if live {
                    oldest = oldest.min(lease.expires_millis);
                } else {
                    freed = freed.saturating_add(lease.units(base));
                }
                live
            });
            job.granted = job.granted.saturating_sub(freed);
            account.granted = account.granted.saturating_sub(freed);
            if job.pods.is_empty() {
                account.jobs.remove(&key);
                continue;
            }
            // A job that shrank a lot gives its memory back, at a cost paid once.
            if job.pods.capacity() > 4 * job.pods.len() {
                job.pods.shrink_to(2 * job.pods.len());
            }
            job.due_millis = Some(oldest);
            self.due.push(Reverse((oldest, account_id, key)));
        }
        now
    }

    fn account_id(&mut self, name: &str, period_millis: u64) -> usize {
        if let Some(&id) = self.account_ids.get(name) {
            return id;
        }
        let id = self.accounts.len();
        self.accounts.push(Account {
            base_millis: period_millis,
            granted: 0,
            jobs: HashMap::new(),
        });
        self.account_ids.insert(Box::from(name), id);
        id
    }
}

impl Account {
    /// Counts every lease in units of a new usable period (a limit was edited).
    fn rebase(&mut self, period_millis: u64) {
        // A zero period grants nothing, so the old base keeps counting what is out.
        if period_millis == 0 || period_millis == self.base_millis {
            return;
        }
        self.base_millis = period_millis;
        self.granted = 0;
        for job in self.jobs.values_mut() {
            job.granted = job
                .pods
                .values()
                .map(|lease| lease.units(period_millis))
                .fold(0, u128::saturating_add);
            self.granted = self.granted.saturating_add(job.granted);
        }
    }

    /// Decides and records the grant; also says whether the job is new and must be
    /// queued for pruning, and whether the grant was cut below what the pod wanted
    /// because other live grants hold the room. Every lease left in the account is
    /// live (just pruned).
    fn lease(
        &mut self,
        request: &LeaseRequest<'_>,
        expires_millis: u64,
        restarting: bool,
    ) -> (PodShare, bool, bool) {
        let base = self.base_millis;
        let job = match self.jobs.get_mut(request.job) {
            Some(job) => job,
            None => self.jobs.entry(request.job.clone()).or_default(),
        };
        let leasing = job.pods.len() + usize::from(!job.pods.contains_key(request.pod));
        let leasing = u32::try_from(leasing).unwrap_or(u32::MAX);
        // The split is over the job's live pods, of which some may pace by their file.
        let pods = leasing.max(request.live_pods);
        // The pod's place among the job's leasing pods, by name: only an uneven
        // split needs it, so an even one does not scan the job's pods.
        let rank = if request.job_requests.is_multiple_of(pods.max(1)) {
            0
        } else {
            job.pods
                .keys()
                .filter(|name| name.as_ref() < request.pod)
                .count()
        };
        let previous = job.pods.get_mut(request.pod);
        // A renewal replaces the pod's lease: its own grant does not count against it.
        let own = previous.as_ref().map_or(0, |lease| lease.units(base));
        job.granted = job.granted.saturating_sub(own);
        self.granted = self.granted.saturating_sub(own);

        let target = pod_target(
            request.job_requests,
            request.usable.period_millis,
            pods,
            rank,
            request.max_concurrency,
        );
        let wanted = if restarting {
            slower(target, request.static_share)
        } else {
            target
        };
        // Each live pod without a lease here sends its static share. Within a TTL of
        // a restart it may instead hold a grant of the previous leader: at most its
        // target, which is the static share plus one request for `job_requests % pods`
        // of the pods, and new grants capped at the static share leave exactly those
        // requests unused.
        let reserve = units(
            request.static_share.requests,
            request.static_share.period_millis,
            base,
        )
        .saturating_mul(u128::from(pods - leasing));
        let room = if request.usable.period_millis == 0 {
            0
        } else {
            let job_room = (u128::from(request.job_requests) * SCALE)
                .saturating_sub(job.granted)
                .saturating_sub(reserve);
            let account_room =
                (u128::from(request.usable.requests) * SCALE).saturating_sub(self.granted);
            job_room.min(account_room)
        };
        let share = fit(wanted, room, request.usable.period_millis);
        // Cut: fewer requests, or a period stretched by more than the rounding of a
        // split over many pods (a few milliseconds).
        let cut = share.requests < wanted.requests
            || share.period_millis
                > wanted
                    .period_millis
                    .saturating_add(wanted.period_millis / 100);

        // When the lease lapses the pod falls back to its static share: the lease
        // counts for at least that (but never above the target, see the module docs).
        let kept = faster(share, slower(request.static_share, target));
        let units = units(kept.requests, kept.period_millis, base);
        job.granted = job.granted.saturating_add(units);
        self.granted = self.granted.saturating_add(units);
        let lease = Lease {
            expires_millis,
            period_millis: kept.period_millis,
            requests: kept.requests,
        };
        match previous {
            Some(previous) => *previous = lease,
            None => {
                job.pods.insert(Box::from(request.pod), lease);
            }
        }
        // Later leases expire later, so a queued job's entry stays its oldest expiry.
        let first = job.due_millis.is_none();
        if first {
            job.due_millis = Some(expires_millis);
        }
        (share, first, cut)
    }
}

impl Job {
    /// Whether some lease may have lapsed by `now`; if not, every lease is live.
    fn due(&self, now: u64) -> bool {
        self.due_millis.is_some_and(|at| at <= now)
    }

    /// The leases still live at `now`.
    fn live(&self, now: u64) -> impl Iterator<Item = &Lease> {
        let due = self.due(now);
        self.pods
            .values()
            .filter(move |lease| !due || lease.expires_millis > now)
    }

    fn live_count(&self, now: u64) -> usize {
        if self.due(now) {
            self.live(now).count()
        } else {
            self.pods.len()
        }
    }
}

/// The grant a pod aims at: [`pod_share`] of the job's allocation over its
/// `pods` leasing pods, plus one request for the first `allocation % pods` of
/// them by name (`rank` counts the leasing pods named before it). An even
/// split rounds down (10 over 3 pods is 3 each, 9 in all); with the remainder
/// handed out the targets add up to the job's allocation exactly.
pub fn pod_target(
    job_requests: u32,
    period_millis: u64,
    pods: u32,
    rank: usize,
    max_concurrency: Option<u32>,
) -> PodShare {
    let pods = pods.max(1);
    let mut target = pod_share(job_requests, period_millis, pods, max_concurrency);
    if job_requests >= pods && u32::try_from(rank).is_ok_and(|rank| rank < job_requests % pods) {
        target.requests += 1;
    }
    target
}

/// `requests / period_millis` in units of `1 / (base_millis × SCALE)` per ms, rounded
/// up; a zero period with requests is unbounded (`u128::MAX`).
fn units(requests: u32, period_millis: u64, base_millis: u64) -> u128 {
    if requests == 0 {
        return 0;
    }
    if period_millis == 0 {
        return u128::MAX;
    }
    // requests × whole / period = requests × quotient + requests × remainder / period,
    // where requests × remainder < 2^96: exact without a wider type.
    let whole = u128::from(base_millis) * SCALE;
    let period = u128::from(period_millis);
    let requests = u128::from(requests);
    let (quotient, remainder) = (whole / period, whole % period);
    requests
        .checked_mul(quotient)
        .and_then(|units| units.checked_add((requests * remainder).div_ceil(period)))
        .unwrap_or(u128::MAX)
}

/// `wanted`, or the largest share below it whose units fit in `room`, counted against
/// a usable period of `period_millis`.
fn fit(wanted: PodShare, room: u128, period_millis: u64) -> PodShare {
    let nothing = PodShare {
        requests: 0,
        period_millis,
        ..wanted
    };
    if wanted.requests == 0 {
        return wanted;
    }
    // Checked first: with a zero period every units() would be 0.
    if room == 0 {
        return nothing;
    }
    if units(wanted.requests, wanted.period_millis, period_millis) <= room {
        return wanted;
    }
    // `wanted` is faster than `room`, so whole requests per period that fit in `room`
    // are fewer than wanted; room ≤ job_requests × SCALE keeps them within u32.
    let requests = room / SCALE;
    if requests > 0 {
        return PodShare {
            requests: u32::try_from(requests).unwrap_or(u32::MAX),
            period_millis,
            ..wanted
        };
    }
    // Less than one request per period is left: stretch the period so that one fits.
    let stretched = (u128::from(period_millis) * SCALE).div_ceil(room);
    match u64::try_from(stretched) {
        Ok(period_millis) => PodShare {
            requests: 1,
            period_millis,
            ..wanted
        },
        Err(_) => nothing,
    }
}

/// The slower of two shares by rate, with the smaller concurrency of the two.
fn slower(a: PodShare, b: PodShare) -> PodShare {
    let slowest = if rate_cmp(a, b) == Ordering::Greater {
        b
    } else {
        a
    };
    PodShare {
        max_concurrency: a.max_concurrency.min(b.max_concurrency).max(1),
        ..slowest
    }
}

/// The faster of two shares by rate (the concurrency of that one).
fn faster(a: PodShare, b: PodShare) -> PodShare {
    if rate_cmp(a, b) == Ordering::Less {
        b
    } else {
        a
    }
}

/// Compares the rates of two shares exactly; no requests is zero whatever the period,
/// a zero period with requests is unbounded.
fn rate_cmp(a: PodShare, b: PodShare) -> Ordering {
    let rate = |share: PodShare| match (share.requests, share.period_millis) {
        (0, _) => (0u128, 1u128),
        (_, 0) => (1, 0),
        (requests, period) => (u128::from(requests), u128::from(period)),
    };
    let ((a_requests, a_period), (b_requests, b_period)) = (rate(a), rate(b));
    (a_requests * b_period).cmp(&(b_requests * a_period))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const P: u64 = 10_000;
    const TTL: u64 = DEFAULT_TTL_MILLIS;
    const REFRESH: u64 = DEFAULT_REFRESH_MILLIS;
    /// The first instant past the restart window of a book started at 0.
    const SETTLED: u64 = TTL;

    fn key(job: &str) -> JobKey {
        JobKey::new("shop", "catalog", job)
    }

    fn share(requests: u32, period_millis: u64) -> PodShare {
        PodShare {
            requests,
            period_millis,
            max_concurrency: requests.max(1),
        }
    }

    /// A request on account `acme` (usable 40 per 10 s) of a job whose pods all lease
    /// and which the controller has not counted yet: the lease rules alone.
    fn ask<'a>(job: &'a JobKey, pod: &'a str, job_requests: u32) -> LeaseRequest<'a> {
        LeaseRequest {
            account: "acme",
            usable: UsableBudget {
                requests: 40,
                period_millis: P,
            },
            job,
            pod,
            job_requests,
            max_concurrency: None,
            live_pods: 0,
            static_share: share(0, P),
        }
    }

    /// requests / period as `live_rate` writes it.
    fn reduced(requests: u32, period: u64) -> (u128, u128) {
        let divisor = gcd(requests.into(), period.into());
        (u128::from(requests) / divisor, u128::from(period) / divisor)
    }

    fn book() -> LeaseBook {
        LeaseBook::new(0, TTL, REFRESH)
    }

    fn requests(book: &mut LeaseBook, now: u64, request: &LeaseRequest<'_>) -> u32 {
        book.lease(now, request).share.requests
    }

    /// Σ live rate of `account` ≤ requests / period, by the book's reckoning.
    fn within(book: &LeaseBook, now: u64, account: &str, requests: u32, period: u64) -> bool {
        let (numerator, denominator) = book.live_rate(now, account);
        numerator * u128::from(period) <= u128::from(requests) * denominator
    }

    // ---- rule 2: the target ----

    #[test]
    fn pods_renew_every_half_period_between_two_and_five_seconds() {
        assert_eq!(refresh_for(10_000, DEFAULT_REFRESH_MILLIS), 5_000);
        assert_eq!(refresh_for(60_000, DEFAULT_REFRESH_MILLIS), 5_000);
        assert_eq!(refresh_for(6_000, DEFAULT_REFRESH_MILLIS), 3_000);
        assert_eq!(refresh_for(1_000, DEFAULT_REFRESH_MILLIS), 2_000);
        assert_eq!(refresh_for(1_000, 500), 500, "a book's own maximum wins");
        assert_eq!(settle_windows(10_000, 5_000), 1);
        assert_eq!(settle_windows(1_000, 2_000), 2);
        assert_eq!(settle_windows(0, 2_000), 2_000, "no division by zero");
    }

    #[test]
    fn a_lone_pod_gets_the_whole_allocation_with_the_book_defaults() {
        let job = key("a");
        let mut book = book();
        let grant = book.lease(SETTLED, &ask(&job, "a-1", 24));
        assert_eq!(
            grant,
            Grant {
                share: share(24, P),
                ttl_millis: 15_000,
                refresh_millis: 5_000,
            }
        );
        assert_eq!(book.live_rate(SETTLED, "acme"), reduced(24, P));
    }

    #[test]
    fn a_pod_cut_below_its_target_is_asked_back_sooner() {
        let job = key("a");
        let mut book = book();
        assert_eq!(
            book.lease(SETTLED, &ask(&job, "a-1", 24)).refresh_millis,
            5_000
        );
        // The second pod gets nothing while the first holds all 24: it is asked
        // back in a quarter of the refresh, to take its half once the first renewed.
        let cut = book.lease(SETTLED + 1, &ask(&job, "a-2", 24));
        assert_eq!(cut.share.requests, 0);
        assert_eq!(cut.refresh_millis, 1_250);
        assert_eq!(
            book.lease(SETTLED + 5_000, &ask(&job, "a-1", 24))
                .refresh_millis,
            5_000
        );
        let whole = book.lease(SETTLED + 6_250, &ask(&job, "a-2", 24));
        assert_eq!((whole.share.requests, whole.refresh_millis), (12, 5_000));
        assert_eq!(cut_refresh(2_000), 500);
        assert_eq!(cut_refresh(1_000), MIN_SOON_REFRESH_MILLIS);
        assert_eq!(waiting_refresh(5_000), 2_500);
        assert_eq!(waiting_refresh(2_000), 1_000);
    }

    #[test]
    fn two_pods_share_a_job_once_the_first_renews() {
        let job = key("a");
        let mut book = book();
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-1", 24)), 24);
        // The first pod still holds all 24: the second waits with nothing.
        assert_eq!(requests(&mut book, SETTLED + 1, &ask(&job, "a-2", 24)), 0);
        assert_eq!(
            requests(&mut book, SETTLED + 5_000, &ask(&job, "a-1", 24)),
            12
        );
        assert_eq!(
            requests(&mut book, SETTLED + 5_001, &ask(&job, "a-2", 24)),
            12
        );
        assert_eq!(book.live_leases(SETTLED + 5_001), 2);
    }

    #[test]
    fn the_target_uses_the_jobs_concurrency() {
        let job = key("a");
        let mut book = book();
        let request = LeaseRequest {
            max_concurrency: Some(4),
            ..ask(&job, "a-1", 24)
        };
        book.lease(SETTLED, &request);
        let request = LeaseRequest {
            pod: "a-2",
            ..request
        };
        let grant = book.lease(SETTLED, &request);
        assert_eq!(grant.share.max_concurrency, 2);
    }

    // ---- rule 3: never overcommit ----

    #[test]
    fn a_third_pod_gets_only_what_is_left_until_the_others_renew_lower() {
        let job = key("a");
        let mut book = book();
        let mut t = SETTLED;
        for pod in ["a-1", "a-2", "a-1", "a-2"] {
            book.lease(t, &ask(&job, pod, 24));
            t += 1;
        }
        // 12 + 12 out of 24: the newcomer's target is 8, but nothing is left.
        assert_eq!(requests(&mut book, t, &ask(&job, "a-3", 24)), 0);
        assert_eq!(requests(&mut book, t + 1, &ask(&job, "a-1", 24)), 8);
        // a-2 still holds 12: 24 − 8 − 12 leaves 4.
        assert_eq!(requests(&mut book, t + 2, &ask(&job, "a-3", 24)), 4);
        assert_eq!(requests(&mut book, t + 3, &ask(&job, "a-2", 24)), 8);
        assert_eq!(requests(&mut book, t + 4, &ask(&job, "a-3", 24)), 8);
        assert_eq!(book.live_rate(t + 4, "acme"), reduced(24, P));
    }

    #[test]
    fn the_remainder_of_an_uneven_split_goes_to_the_first_pods_by_name() {
        let job = key("a");
        let mut book = book();
        let mut t = SETTLED;
        let mut last = Vec::new();
        // Two rounds: in the first the earlier pods' targets count fewer pods.
        for _ in 0..3 {
            last.clear();
            for pod in ["a-3", "a-1", "a-2"] {
                last.push(requests(&mut book, t, &ask(&job, pod, 10)));
                t += 1;
            }
        }
        assert_eq!(last, vec![3, 4, 3], "a-1 takes the tenth request");
        assert_eq!(book.live_rate(t, "acme"), reduced(10, P));
    }

    #[test]
    fn the_account_caps_jobs_whose_allocations_overlap() {
        // A caller whose allocations momentarily sum above the budget still gets
        // no more than the budget out.
        let (a, b) = (key("a"), key("b"));
        let mut book = book();
        assert_eq!(requests(&mut book, SETTLED, &ask(&a, "a-1", 30)), 30);
        assert_eq!(requests(&mut book, SETTLED, &ask(&b, "b-1", 30)), 10);
        assert!(within(&book, SETTLED, "acme", 40, P));
    }

    #[test]
    fn allocation_moving_from_one_job_to_another_never_overcommits_the_account() {
        let (a, b) = (key("a"), key("b"));
        let mut book = book();
        let mut t = SETTLED;
        assert_eq!(requests(&mut book, t, &ask(&a, "a-1", 30)), 30);
        assert_eq!(requests(&mut book, t, &ask(&b, "b-1", 10)), 10);
        // The controller moves 20 from a to b. b asks first: a still holds 30.
        t += 1_000;
        assert_eq!(requests(&mut book, t, &ask(&b, "b-1", 30)), 10);
        assert!(within(&book, t, "acme", 40, P));
        t += 1_000;
        assert_eq!(requests(&mut book, t, &ask(&a, "a-1", 10)), 10);
        t += 1_000;
        assert_eq!(requests(&mut book, t, &ask(&b, "b-1", 30)), 30);
        assert_eq!(book.live_rate(t, "acme"), reduced(40, P));
    }

    #[test]
    fn what_is_left_below_one_request_per_period_stretches_the_period() {
        let job = key("a");
        let mut book = book();
        let mut t = SETTLED;
        // 3 requests per 10 s over 4 pods: one per 13 334 ms each once all renewed.
        for round in 0..3 {
            for pod in ["a-1", "a-2", "a-3", "a-4"] {
                let grant = book.lease(t, &ask(&job, pod, 3)).share;
                if round == 2 {
                    assert_eq!(grant, share(1, 13_334));
                }
                assert!(within(&book, t, "acme", 3, P));
                t += 1;
            }
        }
        // A fifth pod's target is one per 16 667 ms; 4/13 334 of 3/10 000 is out, so
        // it gets what is left: exactly one per 66 670 000 ms, less the rounding up
        // of the others' stretched grants.
        let grant = book.lease(t, &ask(&job, "a-5", 3)).share;
        assert_eq!(grant.requests, 1);
        assert!((66_670_000..=66_670_001).contains(&grant.period_millis));
        assert!(within(&book, t, "acme", 3, P));
    }

    #[test]
    fn a_stretched_remainder_of_whole_requests_is_granted_per_usable_period() {
        let (a, b) = (key("a"), key("b"));
        let mut book = book();
        let usable = UsableBudget {
            requests: 40,
            period_millis: P,
        };
        // b holds 35; a wants 10 but only 5 are left on the account.
        assert_eq!(requests(&mut book, SETTLED, &ask(&b, "b-1", 35)), 35);
        let request = LeaseRequest {
            usable,
            ..ask(&a, "a-1", 10)
        };
        assert_eq!(
            book.lease(SETTLED, &request).share,
            PodShare {
                requests: 5,
                period_millis: P,
                max_concurrency: 10,
            }
        );
    }

    #[test]
    fn another_accounts_leases_do_not_count() {
        let job = key("a");
        let mut book = book();
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-1", 40)), 40);
        let elsewhere = LeaseRequest {
            account: "globex",
            ..ask(&job, "a-2", 40)
        };
        // The same job key on another account is another job with its own pods.
        assert_eq!(requests(&mut book, SETTLED, &elsewhere), 40);
        assert_eq!(book.live_rate(SETTLED, "globex"), reduced(40, P));
        assert_eq!(book.live_rate(SETTLED, "initech"), (0, 1));
    }

    // ---- rule 1: expiry ----

    #[test]
    fn expiry_frees_capacity_exactly_one_ttl_after_the_grant() {
        let job = key("a");
        let mut book = book();
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-1", 24)), 24);
        assert_eq!(
            requests(&mut book, SETTLED + TTL - 1, &ask(&job, "a-2", 24)),
            0
        );
        assert_eq!(book.live_leases(SETTLED + TTL - 1), 2);
        assert_eq!(book.live_leases(SETTLED + TTL), 1);
        // a-1 never renewed: its lease lapses and a-2 is alone.
        assert_eq!(
            requests(&mut book, SETTLED + TTL, &ask(&job, "a-2", 24)),
            24
        );
        assert_eq!(book.live_leases(SETTLED + 3 * TTL), 0);
        assert_eq!(book.live_rate(SETTLED + 3 * TTL, "acme"), (0, 1));
    }

    #[test]
    fn lapsed_leases_are_pruned_by_the_next_call() {
        let (a, b) = (key("a"), key("b"));
        let mut book = book();
        for pod in 0..100 {
            book.lease(SETTLED, &ask(&a, &format!("a-{pod}"), 40));
        }
        book.lease(SETTLED + TTL, &ask(&b, "b-1", 1));
        let account = &book.accounts[0];
        assert_eq!(account.jobs.len(), 1);
        assert_eq!(account.granted, SCALE);
        assert_eq!(book.due.len(), 1);
    }

    #[test]
    fn a_clock_that_steps_back_neither_revives_nor_extends_a_lease() {
        let job = key("a");
        let mut book = book();
        book.lease(SETTLED + TTL, &ask(&job, "a-1", 24));
        // Asked "earlier", a-2 is answered at the latest time seen: a-1 still holds all.
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-2", 24)), 0);
        assert_eq!(book.live_leases(0), 2);
        assert_eq!(book.live_leases(SETTLED + 2 * TTL), 0);
    }

    // ---- rule 4: restart ----

    #[test]
    fn after_a_restart_the_static_share_caps_grants_for_one_ttl() {
        let job = key("a");
        let started = 1_000_000;
        let mut book = LeaseBook::new(started, TTL, REFRESH);
        let request = LeaseRequest {
            max_concurrency: Some(6),
            static_share: pod_share(24, P, 3, Some(6)),
            ..ask(&job, "a-1", 24)
        };
        assert_eq!(
            book.lease(started, &request).share,
            PodShare {
                requests: 8,
                period_millis: P,
                max_concurrency: 2,
            }
        );
        assert_eq!(book.lease(started + TTL - 1, &request).share.requests, 8);
        // One TTL on, whatever the previous leader granted has lapsed.
        assert_eq!(
            book.lease(started + TTL, &request).share,
            PodShare {
                requests: 24,
                period_millis: P,
                max_concurrency: 6,
            }
        );
    }

    #[test]
    fn the_restart_cap_compares_rates_across_periods() {
        let job = key("a");
        let mut book = book();
        // 1 per 13 334 ms (static) is slower than the lone pod's target of 3 per 10 s.
        let request = LeaseRequest {
            static_share: pod_share(3, P, 4, None),
            ..ask(&job, "a-1", 3)
        };
        assert_eq!(book.lease(0, &request).share, share(1, 13_334));
        // A static share faster than the target does not raise it.
        let request = LeaseRequest {
            static_share: share(100, 1_000),
            ..request
        };
        assert_eq!(book.lease(1, &request).share, share(3, P));
    }

    #[test]
    fn a_call_before_the_start_counts_as_the_start() {
        let job = key("a");
        let mut book = LeaseBook::new(50_000, TTL, REFRESH);
        let request = LeaseRequest {
            static_share: share(5, P),
            ..ask(&job, "a-1", 24)
        };
        assert_eq!(book.lease(0, &request).share.requests, 5);
        assert_eq!(book.live_leases(50_000 + TTL - 1), 1);
        assert_eq!(book.live_leases(50_000 + TTL), 0);
    }

    // ---- rules 5 and 6: renewal and release ----

    #[test]
    fn a_renewal_replaces_the_pods_own_lease() {
        let job = key("a");
        let mut book = book();
        for step in 0..100 {
            let now = SETTLED + step * REFRESH;
            assert_eq!(requests(&mut book, now, &ask(&job, "a-1", 24)), 24);
            assert_eq!(book.live_leases(now), 1);
        }
        // Renewals do not pile up in the due queue either.
        assert_eq!(book.due.len(), 1);
    }

    #[test]
    fn release_frees_capacity_at_once() {
        let job = key("a");
        let mut book = book();
        book.lease(SETTLED, &ask(&job, "a-1", 24));
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-2", 24)), 0);
        book.release(&job, "a-1");
        assert_eq!(book.live_leases(SETTLED), 1);
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-2", 24)), 24);
        // Unknown pods and jobs are no-ops; the last pod's release empties the book.
        book.release(&job, "a-9");
        book.release(&key("z"), "a-2");
        book.release(&job, "a-2");
        assert_eq!(book.live_leases(SETTLED), 0);
        assert_eq!(book.live_rate(SETTLED, "acme"), (0, 1));
        assert!(book.accounts[0].jobs.is_empty());
        // The job's stale due entry is skipped, also once the job leases again.
        book.lease(SETTLED + 1, &ask(&job, "a-3", 24));
        assert_eq!(book.live_leases(SETTLED + TTL), 1);
        assert_eq!(requests(&mut book, SETTLED + TTL, &ask(&job, "a-4", 24)), 0);
        assert_eq!(
            requests(&mut book, SETTLED + TTL + 1, &ask(&job, "a-4", 24)),
            24
        );
    }

    // ---- odd inputs ----

    #[test]
    fn a_budget_without_a_period_grants_nothing() {
        let job = key("a");
        let mut book = book();
        let request = LeaseRequest {
            usable: UsableBudget {
                requests: 40,
                period_millis: 0,
            },
            ..ask(&job, "a-1", 24)
        };
        let grant = book.lease(SETTLED, &request).share;
        assert_eq!((grant.requests, grant.period_millis), (0, 0));
        assert_eq!(book.live_leases(SETTLED), 1);
    }

    #[test]
    fn a_zero_period_leaves_earlier_grants_counted() {
        let job = key("a");
        let mut book = book();
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-1", 40)), 40);
        let broken = LeaseRequest {
            usable: UsableBudget {
                requests: 40,
                period_millis: 0,
            },
            ..ask(&job, "a-2", 40)
        };
        assert_eq!(requests(&mut book, SETTLED, &broken), 0);
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-3", 40)), 0);
        assert_eq!(book.live_rate(SETTLED, "acme"), reduced(40, P));
    }

    #[test]
    fn zero_allocation_grants_zero_requests_and_still_counts_the_pod() {
        let job = key("a");
        let mut book = book();
        let grant = book.lease(SETTLED, &ask(&job, "a-1", 0)).share;
        assert_eq!(grant, share(0, P));
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-2", 24)), 12);
    }

    #[test]
    fn a_new_usable_period_recounts_what_is_out() {
        let job = key("a");
        let mut book = book();
        assert_eq!(requests(&mut book, SETTLED, &ask(&job, "a-1", 20)), 20);
        // The limit becomes 40 per 20 s: a-1 still holds 20 per 10 s, all of it.
        let request = LeaseRequest {
            usable: UsableBudget {
                requests: 40,
                period_millis: 20_000,
            },
            ..ask(&job, "a-2", 40)
        };
        assert_eq!(requests(&mut book, SETTLED, &request), 0);
        assert_eq!(book.live_rate(SETTLED, "acme"), (1, 500));
        let request = LeaseRequest {
            pod: "a-1",
            ..request
        };
        assert_eq!(book.lease(SETTLED + 1, &request).share, share(20, 20_000));
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let job = key("a");
        // Expiries saturate at u64::MAX, which is still after `now`.
        let mut book = LeaseBook::new(u64::MAX - 10, u64::MAX, u64::MAX);
        let request = LeaseRequest {
            usable: UsableBudget {
                requests: u32::MAX,
                period_millis: u64::MAX,
            },
            job_requests: u32::MAX,
            max_concurrency: Some(u32::MAX),
            static_share: share(u32::MAX, 1),
            ..ask(&job, "a-1", 0)
        };
        assert_eq!(requests(&mut book, u64::MAX - 1, &request), u32::MAX);
        let request = LeaseRequest {
            pod: "a-2",
            ..request
        };
        assert_eq!(requests(&mut book, 0, &request), 0);
        assert_eq!(book.live_leases(u64::MAX - 1), 2);
        assert_eq!(book.live_leases(u64::MAX), 0);
        // The tiniest room left over stretches past u64: nothing rather than too much.
        assert_eq!(fit(share(1, 1), 1, u64::MAX).requests, 0);
    }

    // ---- the arithmetic ----

    #[test]
    fn scale_is_the_largest_lcm_of_one_to_n_below_two_to_the_64() {
        let lcm = (1..=46u128).fold(1, |lcm, n| lcm / gcd(lcm, n) * n);
        assert_eq!(SCALE, lcm);
        assert!(u64::try_from(SCALE).is_ok());
        assert!(u64::try_from(SCALE * 47).is_err());
    }

    #[test]
    fn units_round_up_and_saturate() {
        assert_eq!(units(12, P, P), 12 * SCALE);
        assert_eq!(units(1, 3 * P, P), SCALE / 3);
        assert_eq!(
            units(1, 13_334, P),
            (u128::from(P) * SCALE).div_ceil(13_334)
        );
        assert_eq!(units(0, 0, P), 0);
        assert_eq!(units(1, 0, P), u128::MAX);
        assert_eq!(units(1, 1, u64::MAX), u128::from(u64::MAX) * SCALE);
        assert_eq!(
            units(u32::MAX, u64::MAX, u64::MAX),
            u128::from(u32::MAX) * SCALE
        );
        assert_eq!(units(u32::MAX, 1, u64::MAX), u128::MAX);
    }

    #[test]
    fn rates_compare_exactly() {
        assert_eq!(rate_cmp(share(1, 3), share(3, 9)), Ordering::Equal);
        assert_eq!(rate_cmp(share(1, 13_334), share(3, P)), Ordering::Less);
        assert_eq!(rate_cmp(share(0, 0), share(0, 5)), Ordering::Equal);
        assert_eq!(rate_cmp(share(1, 0), share(u32::MAX, 1)), Ordering::Greater);
        // The slower rate, with the smaller concurrency of the two.
        assert_eq!(
            slower(share(5, 1), share(1, 0)),
            PodShare {
                max_concurrency: 1,
                ..share(5, 1)
            }
        );
    }

    // ---- properties ----

    /// An unsigned integer of any size (little-endian u64 limbs): just enough to sum
    /// rates exactly whatever their periods.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Big(Vec<u64>);

    impl Big {
        fn new(value: u128) -> Self {
            let mut big = Big(vec![value as u64, (value >> 64) as u64]);
            big.trim();
            big
        }

        fn trim(&mut self) {
            while self.0.last() == Some(&0) {
                self.0.pop();
            }
        }

        fn times(&self, factor: u64) -> Self {
            let mut carry = 0u128;
            let mut limbs = Vec::with_capacity(self.0.len() + 1);
            for &limb in &self.0 {
                let product = u128::from(limb) * u128::from(factor) + carry;
                limbs.push(product as u64);
                carry = product >> 64;
            }
            limbs.push(carry as u64);
            let mut big = Big(limbs);
            big.trim();
            big
        }

        fn wide(&self, factor: u128) -> Self {
            let mut high = self.times((factor >> 64) as u64);
            high.0.insert(0, 0);
            high.trim();
            self.times(factor as u64).plus(&high)
        }

        fn plus(&self, other: &Self) -> Self {
            let mut carry = 0u128;
            let mut limbs = Vec::new();
            for i in 0..self.0.len().max(other.0.len()) {
                let sum = u128::from(self.0.get(i).copied().unwrap_or(0))
                    + u128::from(other.0.get(i).copied().unwrap_or(0))
                    + carry;
                limbs.push(sum as u64);
                carry = sum >> 64;
            }
            limbs.push(carry as u64);
            let mut big = Big(limbs);
            big.trim();
            big
        }

        fn cmp(&self, other: &Self) -> Ordering {
            self.0
                .len()
                .cmp(&other.0.len())
                .then_with(|| self.0.iter().rev().cmp(other.0.iter().rev()))
        }
    }

    /// Σ requests / period of `shares`, exactly, as (numerator, denominator).
    fn exact_sum(shares: &[PodShare]) -> (Big, Big) {
        let mut numerator = Big::new(0);
        let mut denominator = Big::new(1);
        for share in shares.iter().filter(|s| s.requests > 0) {
            assert!(share.period_millis > 0, "unbounded grant {share:?}");
            // a/b + r/q = (a × q + r × b) / (b × q)
            numerator = numerator
                .times(share.period_millis)
                .plus(&denominator.times(share.requests.into()));
            denominator = denominator.times(share.period_millis);
        }
        (numerator, denominator)
    }

    /// Σ `shares` ≤ requests / period, exactly.
    fn fits(shares: &[PodShare], requests: u32, period: u64) -> bool {
        let (numerator, denominator) = exact_sum(shares);
        numerator
            .times(period)
            .cmp(&denominator.times(requests.into()))
            != Ordering::Greater
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Pod `pod` of job `job` renews; the controller counts `counted` pods of the job.
        Lease {
            job: usize,
            pod: usize,
            counted: u32,
        },
        Release {
            job: usize,
            pod: usize,
        },
        Wait(u64),
        /// The controller re-divides the accounts by these weights.
        Reallocate(Vec<u32>),
        /// An account's limit is edited.
        Budget {
            account: usize,
            requests: u32,
            period_millis: u64,
        },
    }

    const JOBS: usize = 4;

    fn period() -> impl Strategy<Value = u64> {
        prop_oneof![Just(10_000u64), Just(1_000), Just(60_000), 1..100_000u64]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0..JOBS, 0..6usize, 0..5u32)
                .prop_map(|(job, pod, counted)| Step::Lease { job, pod, counted }),
            1 => (0..JOBS, 0..6usize).prop_map(|(job, pod)| Step::Release { job, pod }),
            3 => prop_oneof![0..2_000u64, 0..20_000u64].prop_map(Step::Wait),
            1 => proptest::collection::vec(0..5u32, JOBS).prop_map(Step::Reallocate),
            1 => (0..2usize, 0..80u32, period()).prop_map(|(account, requests, period_millis)| {
                Step::Budget { account, requests, period_millis }
            }),
        ]
    }

    /// What the test knows independently of the book.
    struct Model {
        now: u64,
        budgets: Vec<UsableBudget>,
        weights: Vec<u32>,
        /// Account of each job.
        homes: Vec<usize>,
        concurrency: Vec<Option<u32>>,
        /// (job, pod) → the grant, its expiry, and the figures it was made under.
        leases: HashMap<(usize, usize), Granted>,
    }

    #[derive(Debug, Clone, Copy)]
    struct Granted {
        share: PodShare,
        expires: u64,
        /// The job's allocation at the time, as a share of the usable period.
        allocation: PodShare,
        /// The account's usable budget at the time.
        usable: PodShare,
    }

    impl Model {
        /// The allocation of every job: its account's usable split by weight, rounded down.
        fn allocation(&self, job: usize) -> u32 {
            let home = self.homes[job];
            let total: u64 = (0..JOBS)
                .filter(|&j| self.homes[j] == home)
                .map(|j| u64::from(self.weights[j]))
                .sum();
            if total == 0 {
                return 0;
            }
            let usable = u64::from(self.budgets[home].requests);
            u32::try_from(usable * u64::from(self.weights[job]) / total).unwrap_or(u32::MAX)
        }

        fn live(&self, job: usize) -> Vec<Granted> {
            self.leases
                .iter()
                .filter(|&(&(j, _), granted)| j == job && granted.expires > self.now)
                .map(|(_, &granted)| granted)
                .collect()
        }
    }

    const ACCOUNTS: [&str; 2] = ["acme", "globex"];

    /// For every figure `a` some live grant was made under: the live grants made under
    /// a figure of at most `a` add up to at most `a`, exactly.
    fn check_figures(grants: &[Granted], figure: impl Fn(&Granted) -> PodShare) {
        for a in grants.iter().map(&figure) {
            if a.period_millis == 0 {
                // A budget without a period grants nothing; there is no rate to keep.
                continue;
            }
            let under: Vec<PodShare> = grants
                .iter()
                .filter(|g| rate_cmp(figure(g), a) != Ordering::Greater)
                .map(|g| g.share)
                .collect();
            assert!(
                fits(&under, a.requests, a.period_millis),
                "{under:?} over {a:?}"
            );
        }
    }

    fn check(book: &LeaseBook, model: &Model) {
        let live: usize = (0..JOBS).map(|job| model.live(job).len()).sum();
        assert_eq!(book.live_leases(model.now), live);
        for job in 0..JOBS {
            check_figures(&model.live(job), |g| g.allocation);
        }
        for (account, name) in ACCOUNTS.iter().enumerate() {
            let grants: Vec<Granted> = (0..JOBS)
                .filter(|&job| model.homes[job] == account)
                .flat_map(|job| model.live(job))
                .collect();
            check_figures(&grants, |g| g.usable);
            // The book's own reckoning never understates the exact sum.
            let shares: Vec<PodShare> = grants.iter().map(|g| g.share).collect();
            let (exact, exact_denominator) = exact_sum(&shares);
            let (numerator, denominator) = book.live_rate(model.now, name);
            assert_ne!(
                exact
                    .wide(denominator)
                    .cmp(&exact_denominator.wide(numerator)),
                Ordering::Greater
            );
        }
    }

    fn run(started: u64, steps: &[Step], homes: Vec<usize>, budgets: Vec<UsableBudget>) {
        let mut book = LeaseBook::new(started, TTL, REFRESH);
        let keys: Vec<JobKey> = (0..JOBS).map(|j| key(&format!("job{j}"))).collect();
        let pods: Vec<String> = (0..6).map(|p| format!("pod{p}")).collect();
        let mut model = Model {
            now: started,
            budgets,
            weights: vec![1; JOBS],
            concurrency: (0..JOBS).map(|j| [None, Some(3)][j % 2]).collect(),
            homes,
            leases: HashMap::new(),
        };
        for step in steps {
            match *step {
                Step::Lease { job, pod, counted } => {
                    let home = model.homes[job];
                    let usable = model.budgets[home];
                    let job_requests = model.allocation(job);
                    let max_concurrency = model.concurrency[job];
                    let static_share =
                        pod_share(job_requests, usable.period_millis, counted, max_concurrency);
                    let request = LeaseRequest {
                        account: ACCOUNTS[home],
                        usable,
                        job: &keys[job],
                        pod: &pods[pod],
                        job_requests,
                        max_concurrency,
                        live_pods: counted,
                        static_share,
                    };
                    let grant = book.lease(model.now, &request).share;
                    let others = model
                        .leases
                        .iter()
                        .filter(|&(&(j, p), granted)| {
                            j == job && p != pod && granted.expires > model.now
                        })
                        .count();
                    let before = model
                        .leases
                        .iter()
                        .filter(|&(&(j, p), granted)| {
                            j == job && p < pod && granted.expires > model.now
                        })
                        .count();
                    let target = pod_target(
                        job_requests,
                        usable.period_millis,
                        u32::try_from(others + 1).unwrap().max(counted),
                        before,
                        max_concurrency,
                    );
                    assert_ne!(rate_cmp(grant, target), Ordering::Greater);
                    if model.now < started + TTL {
                        assert_ne!(rate_cmp(grant, static_share), Ordering::Greater);
                    }
                    let granted = Granted {
                        share: grant,
                        expires: model.now + TTL,
                        allocation: share(job_requests, usable.period_millis),
                        usable: share(usable.requests, usable.period_millis),
                    };
                    model.leases.insert((job, pod), granted);
                }
                Step::Release { job, pod } => {
                    book.release(&keys[job], &pods[pod]);
                    model.leases.remove(&(job, pod));
                }
                Step::Wait(millis) => model.now += millis,
                Step::Reallocate(ref weights) => model.weights.clone_from(weights),
                Step::Budget {
                    account,
                    requests,
                    period_millis,
                } => {
                    model.budgets[account] = UsableBudget {
                        requests,
                        period_millis,
                    }
                }
            }
            check(&book, &model);
        }
    }

    fn budget() -> impl Strategy<Value = UsableBudget> {
        (0..80u32, period()).prop_map(|(requests, period_millis)| UsableBudget {
            requests,
            period_millis,
        })
    }

    /// Pods of jobs that all renew every refresh, in a fixed order, until the restart
    /// window is over and the book has settled.
    fn renew_in_rounds(
        book: &mut LeaseBook,
        now: &mut u64,
        rounds: u32,
        requests: &[LeaseRequest<'_>],
    ) -> Vec<PodShare> {
        let step = REFRESH / u64::try_from(requests.len()).unwrap();
        let mut last = Vec::new();
        for _ in 0..rounds {
            last.clear();
            for request in requests {
                last.push(book.lease(*now, request).share);
                *now += step;
            }
        }
        last
    }

    // ---- mixed fleets and leader changes ----

    /// One step of a fleet whose pods may or may not lease.
    #[derive(Debug, Clone)]
    enum FleetStep {
        /// A live pod that leases asks (again); others ignore it.
        Lease {
            job: usize,
            pod: usize,
        },
        Wait(u64),
        /// The controller re-divides the budget by these weights.
        Reallocate(Vec<u32>),
        /// A pod is admitted: it sends its static share until (unless) it leases.
        Start {
            job: usize,
            pod: usize,
        },
        /// A pod is deleted: it sends nothing more and the book releases it.
        Delete {
            job: usize,
            pod: usize,
        },
        /// Another replica takes over with a fresh book; the old grants stay live.
        LeaderChange,
    }

    const FLEET_JOBS: usize = 3;
    const FLEET_PODS: usize = 4;

    fn fleet_step() -> impl Strategy<Value = FleetStep> {
        prop_oneof![
            10 => (0..FLEET_JOBS, 0..FLEET_PODS)
                .prop_map(|(job, pod)| FleetStep::Lease { job, pod }),
            4 => prop_oneof![0..2_000u64, 0..20_000u64].prop_map(FleetStep::Wait),
            1 => proptest::collection::vec(0..5u32, FLEET_JOBS).prop_map(FleetStep::Reallocate),
            1 => (0..FLEET_JOBS, 0..FLEET_PODS).prop_map(|(job, pod)| FleetStep::Start { job, pod }),
            1 => (0..FLEET_JOBS, 0..FLEET_PODS).prop_map(|(job, pod)| FleetStep::Delete { job, pod }),
            1 => Just(FleetStep::LeaderChange),
        ]
    }

    /// A grant as the pod holds it: the newest one it got, from whichever book.
    #[derive(Debug, Clone, Copy)]
    struct Held {
        share: PodShare,
        expires: u64,
        /// The plan it was made under.
        plan: u64,
    }

    /// The fleet as the test sees it, apart from the book.
    struct Fleet {
        now: u64,
        usable: UsableBudget,
        weights: Vec<u32>,
        /// Which pods are live, and which of them ever lease.
        live: Vec<Vec<bool>>,
        leases: Vec<Vec<bool>>,
        held: HashMap<(usize, usize), Held>,
        /// Bumped whenever allocations or live pods change.
        plan: u64,
    }

    impl Fleet {
        fn allocation(&self, job: usize) -> u32 {
            let total: u64 = self.weights.iter().copied().map(u64::from).sum();
            if total == 0 {
                return 0;
            }
            let share = u64::from(self.usable.requests) * u64::from(self.weights[job]) / total;
            u32::try_from(share).unwrap_or(u32::MAX)
        }

        fn live_pods(&self, job: usize) -> u32 {
            u32::try_from(self.live[job].iter().filter(|&&live| live).count()).unwrap_or(0)
        }

        /// What the pods of `job` pace by without a lease: the plan's per-pod share.
        fn static_share(&self, job: usize) -> PodShare {
            pod_share(
                self.allocation(job),
                self.usable.period_millis,
                self.live_pods(job),
                None,
            )
        }

        /// What every live pod of `job` may send now: its live grant, else its static share.
        fn may_send(&self, job: usize) -> Vec<PodShare> {
            (0..FLEET_PODS)
                .filter(|&pod| self.live[job][pod])
                .map(|pod| match self.held.get(&(job, pod)) {
                    Some(held) if held.expires > self.now => held.share,
                    _ => self.static_share(job),
                })
                .collect()
        }

        /// Σ what every pod may send ≤ each job's allocation ≤ usable, while every live
        /// grant was made under the plan in force (older ones last one TTL at most).
        fn check(&self) {
            let stale = self
                .held
                .values()
                .any(|held| held.expires > self.now && held.plan != self.plan);
            if stale {
                return;
            }
            let mut all = Vec::new();
            for job in 0..FLEET_JOBS {
                let sends = self.may_send(job);
                assert!(
                    fits(&sends, self.allocation(job), self.usable.period_millis),
                    "job {job} may send {sends:?} over its allocation {} at {}",
                    self.allocation(job),
                    self.now
                );
                all.extend(sends);
            }
            assert!(
                fits(&all, self.usable.requests, self.usable.period_millis),
                "{all:?} over {:?}",
                self.usable
            );
        }
    }

    fn run_fleet(
        started: u64,
        usable: UsableBudget,
        leases: Vec<Vec<bool>>,
        live: Vec<Vec<bool>>,
        steps: &[FleetStep],
    ) {
        let keys: Vec<JobKey> = (0..FLEET_JOBS).map(|j| key(&format!("job{j}"))).collect();
        let names: Vec<String> = (0..FLEET_PODS).map(|p| format!("pod{p}")).collect();
        let mut book = LeaseBook::new(started, TTL, REFRESH);
        let mut fleet = Fleet {
            now: started,
            usable,
            weights: vec![1; FLEET_JOBS],
            live,
            leases,
            held: HashMap::new(),
            plan: 0,
        };
        for step in steps {
            match *step {
                FleetStep::Lease { job, pod } => {
                    if fleet.live[job][pod] && fleet.leases[job][pod] {
                        let request = LeaseRequest {
                            account: "acme",
                            usable: fleet.usable,
                            job: &keys[job],
                            pod: &names[pod],
                            job_requests: fleet.allocation(job),
                            max_concurrency: None,
                            live_pods: fleet.live_pods(job),
                            static_share: fleet.static_share(job),
                        };
                        let share = book.lease(fleet.now, &request).share;
                        let held = Held {
                            share,
                            expires: fleet.now + TTL,
                            plan: fleet.plan,
                        };
                        fleet.held.insert((job, pod), held);
                    }
                }
                FleetStep::Wait(millis) => fleet.now += millis,
                FleetStep::Reallocate(ref weights) => {
                    fleet.weights.clone_from(weights);
                    fleet.plan += 1;
                }
                FleetStep::Start { job, pod } => {
                    if !fleet.live[job][pod] {
                        fleet.live[job][pod] = true;
                        fleet.plan += 1;
                    }
                }
                FleetStep::Delete { job, pod } => {
                    if fleet.live[job][pod] {
                        fleet.live[job][pod] = false;
                        fleet.held.remove(&(job, pod));
                        book.release(&keys[job], &names[pod]);
                        fleet.plan += 1;
                    }
                }
                FleetStep::LeaderChange => {
                    book = LeaseBook::new(fleet.now, TTL, REFRESH);
                }
            }
            fleet.check();
        }
    }

    #[test]
    fn a_pod_that_paces_by_its_file_is_reserved_its_share() {
        // The issue's example: allocation 24, a leases, b sends its file's 12.
        let job = key("a");
        let mut book = book();
        let request = LeaseRequest {
            live_pods: 2,
            static_share: pod_share(24, P, 2, None),
            ..ask(&job, "a", 24)
        };
        assert_eq!(requests(&mut book, SETTLED, &request), 12);
        // Still 12 once the restart window is long over, renewal after renewal.
        assert_eq!(requests(&mut book, SETTLED + 10 * TTL, &request), 12);
    }

    #[test]
    fn old_and_new_leaders_grants_together_stay_within_the_allocation() {
        let job = key("a");
        // 10 over 3 pods: targets 4, 3, 3; the static share is 3.
        let request = |pod| LeaseRequest {
            live_pods: 3,
            static_share: pod_share(10, P, 3, None),
            ..ask(&job, pod, 10)
        };
        let mut old = book();
        let mut t = SETTLED;
        for pod in ["a", "b", "c", "a", "b", "c"] {
            old.lease(t, &request(pod));
            t += 1;
        }
        assert_eq!(requests(&mut old, t, &request("a")), 4);
        // A new leader takes over while a holds 4: b and c renew at their static 3,
        // which leaves a's extra request unused.
        let mut new = LeaseBook::new(t, TTL, REFRESH);
        assert_eq!(requests(&mut new, t + 1, &request("b")), 3);
        assert_eq!(requests(&mut new, t + 2, &request("c")), 3);
        assert_eq!(requests(&mut new, t + 3, &request("a")), 3);
        // One TTL on, no old grant can be live: a gets its full target.
        assert_eq!(requests(&mut new, t + TTL, &request("a")), 4);
    }

    proptest! {
        #[test]
        fn live_grants_never_exceed_the_last_budget_or_allocation(
            started in prop_oneof![Just(0u64), 0..40_000u64],
            homes in proptest::collection::vec(0..2usize, JOBS),
            budgets in proptest::collection::vec(budget(), 2),
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            run(started, &steps, homes, budgets);
        }

        /// Leases, renewals, expiry, reallocation, pods that never lease and leader
        /// changes: what every pod may send (its live grant, else its static share)
        /// never adds up to more than its job's allocation or the usable budget.
        #[test]
        fn what_every_pod_may_send_stays_within_the_plan(
            started in prop_oneof![Just(0u64), 0..40_000u64],
            usable in (0..80u32, period()).prop_map(|(requests, period_millis)| {
                UsableBudget { requests, period_millis }
            }),
            leases in proptest::collection::vec(
                proptest::collection::vec(any::<bool>(), FLEET_PODS),
                FLEET_JOBS,
            ),
            live in proptest::collection::vec(
                proptest::collection::vec(any::<bool>(), FLEET_PODS),
                FLEET_JOBS,
            ),
            steps in proptest::collection::vec(fleet_step(), 1..100),
        ) {
            run_fleet(started, usable, leases, live, &steps);
        }

        #[test]
        fn pods_that_keep_renewing_settle_on_their_targets(
            usable in (1..200u32, 1..100_000u64).prop_map(|(requests, period_millis)| {
                UsableBudget { requests, period_millis }
            }),
            jobs in proptest::collection::vec(
                (0..10u32, 1..=8u32, proptest::option::of(0..20u32), 1..10u32),
                1..4,
            ),
        ) {
            let total: u32 = jobs.iter().map(|j| j.0).sum::<u32>().max(1);
            let keys: Vec<JobKey> = (0..jobs.len()).map(|j| key(&format!("job{j}"))).collect();
            let names: Vec<Vec<String>> = jobs
                .iter()
                .enumerate()
                .map(|(j, job)| (0..job.1).map(|p| format!("job{j}-{p}")).collect())
                .collect();
            let mut requests = Vec::new();
            let mut targets = Vec::new();
            for (j, &(weight, pods, max_concurrency, counted)) in jobs.iter().enumerate() {
                // Allocations that sum to no more than the budget.
                let job_requests = usable.requests / total * weight;
                for (rank, pod) in names[j].iter().enumerate() {
                    requests.push(LeaseRequest {
                        account: "acme",
                        usable,
                        job: &keys[j],
                        pod,
                        job_requests,
                        max_concurrency,
                        live_pods: pods,
                        // The controller's count may lag: a share that is too big.
                        static_share: pod_share(job_requests, usable.period_millis, counted, max_concurrency),
                    });
                    targets.push(pod_target(job_requests, usable.period_millis, pods, rank, max_concurrency));
                }
            }
            let mut book = book();
            let mut now = 0;
            // Three rounds cover the restart window; three more settle every pod.
            let settled = renew_in_rounds(&mut book, &mut now, 6, &requests);
            prop_assert_eq!(&settled, &targets);

            // All but one pod are deleted: once their leases lapse, the last one alone
            // gets its job's whole allocation.
            let last = LeaseRequest {
                live_pods: 1,
                ..requests[requests.len() - 1]
            };
            let alone = renew_in_rounds(&mut book, &mut now, 4, &[last]);
            prop_assert_eq!(
                alone[0],
                pod_share(last.job_requests, usable.period_millis, 1, last.max_concurrency)
            );
            prop_assert_eq!(book.live_leases(now), 1);
        }

        #[test]
        fn no_input_makes_the_book_panic(
            started in any::<u64>(),
            ttl in prop_oneof![Just(0u64), any::<u64>(), 0..20_000u64],
            calls in proptest::collection::vec(
                (
                    any::<u64>(),
                    (any::<u32>(), prop_oneof![Just(0u64), any::<u64>()]),
                    0..3usize,
                    (any::<u32>(), any::<u32>()),
                    proptest::option::of(any::<u32>()),
                    (any::<u32>(), prop_oneof![Just(0u64), any::<u64>()], any::<u32>()),
                    any::<bool>(),
                ),
                1..20,
            ),
        ) {
            let mut book = LeaseBook::new(started, ttl, 1);
            let job = key("a");
            for (now, (requests, period_millis), pod, (job_requests, live_pods), max_concurrency, fixed, release) in calls {
                let pod = ["a", "b", "c"][pod];
                if release {
                    book.release(&job, pod);
                    continue;
                }
                let request = LeaseRequest {
                    account: "acme",
                    usable: UsableBudget { requests, period_millis },
                    job: &job,
                    pod,
                    job_requests,
                    max_concurrency,
                    live_pods,
                    static_share: PodShare {
                        requests: fixed.0,
                        period_millis: fixed.1,
                        max_concurrency: fixed.2,
                    },
                };
                let share = book.lease(now, &request).share;
                // Never an unbounded grant.
                prop_assert!(share.requests == 0 || share.period_millis > 0);
                prop_assert!(share.max_concurrency >= 1);
                book.live_leases(now);
                book.live_rate(now, "acme");
            }
        }
    }
}
