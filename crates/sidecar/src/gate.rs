//! Where every upstream attempt waits its turn: a bounded queue, the
//! concurrency cap and the pacer, under the grant in force. A throttled
//! answer holds the whole gate until its retry is due, so the pod stops
//! sending instead of having its other requests throttled in turn. It also
//! counts what the quota API is told at each renewal.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::limits::{Limits, Source};
use crate::pacer::{Limit, Pacer};
use saleslayer_contract::Usage;
use saleslayer_runtime::clock::Clock;

/// The queue is full: the caller is told at once instead of waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the proxy's queue of {0} waiting requests is full")]
pub struct QueueFull(pub usize);

/// The gate of one sidecar.
#[derive(Debug)]
pub struct Gate {
    clock: Arc<dyn Clock>,
    queue_limit: usize,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug)]
struct State {
    pacer: Pacer,
    limits: Limits,
    in_flight: u32,
    waiting: usize,
    usage: Usage,
    /// No attempt starts before this instant (after a throttled answer).
    held_until: Duration,
    /// Sends the holds since the last report kept back, in thousandths (the
    /// fraction carries over to the next report).
    held_back_milli: u64,
    /// The last instant the gate had work: a request waiting, starting or
    /// in flight (the gate's creation, before any).
    busy_at: Duration,
}

impl State {
    /// How long the gate has had nothing to do at `now` (zero while it works).
    fn idle_for(&self, now: Duration) -> Duration {
        if self.in_flight > 0 || self.waiting > 0 {
            Duration::ZERO
        } else {
            now.saturating_sub(self.busy_at)
        }
    }
}

/// Whether the pod works, as the renewer watches it between renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Requests waiting for capacity now.
    pub waiting: usize,
    /// How long the gate has had nothing to do (zero while it works).
    pub idle_for: Duration,
    /// Throttled answers since the last report.
    pub throttled: u64,
}

/// The right to send one attempt now; dropping it frees its concurrency slot.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let now = self.gate.clock.now();
            let mut state = self.gate.state();
            state.in_flight = state.in_flight.saturating_sub(1);
            state.busy_at = state.busy_at.max(now);
        }
        self.gate.changed.notify_waiters();
    }
}

/// Counts a waiter out of the queue however its wait ends (cancelled included).
struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let now = self.0.clock.now();
        let mut state = self.0.state();
        state.waiting = state.waiting.saturating_sub(1);
        state.busy_at = state.busy_at.max(now);
    }
}

/// What the gate holds right now, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub waiting: usize,
    pub in_flight: u32,
    pub limit: Limit,
    pub source: Source,
}

impl Gate {
    pub fn new(clock: Arc<dyn Clock>, limits: Limits, queue_limit: usize) -> Arc<Self> {
        let busy_at = clock.now();
        Arc::new(Self {
            clock,
            queue_limit,
            state: Mutex::new(State {
                pacer: Pacer::default(),
                limits,
                in_flight: 0,
                waiting: 0,
                usage: Usage::default(),
                held_until: Duration::ZERO,
                held_back_milli: 0,
                busy_at,
            }),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics under this lock; a poisoned one still holds good counts.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until one more attempt keeps both the concurrency cap and every
    /// window of the grant, then take it.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, QueueFull> {
        {
            let mut state = self.state();
            if state.waiting >= self.queue_limit {
                return Err(QueueFull(self.queue_limit));
            }
            state.waiting = state.waiting.saturating_add(1);
        }
        let _waiting = Waiting(self);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait = {
                let mut state = self.state();
                let now = self.clock.now();
                let (limit, _) = state.limits.current(now);
                if state.in_flight >= limit.max_concurrency.max(1) {
                    None
                } else {
                    let ready = state.pacer.ready_at(limit, now).max(state.held_until);
                    if ready <= now {
                        state.pacer.record(now);
                        state.in_flight = state.in_flight.saturating_add(1);
                        let in_flight = u64::from(state.in_flight);
                        state.usage.peak_concurrency = state.usage.peak_concurrency.max(in_flight);
                        return Ok(Permit { gate: self.clone() });
                    }
                    Some(ready - now)
                }
            };
            match wait {
                None => changed.await,
                Some(wait) => {
                    tokio::select! {
                        () = self.clock.sleep(wait) => {}
                        () = &mut changed => {}
                    }
                }
            }
        }
    }

    /// Count an attempt's answer (`None`: the upstream was unreachable),
    /// `throttled` by the account's throttle statuses.
    pub fn record_attempt(&self, status: Option<u16>, throttled: bool) {
        let mut state = self.state();
        let usage = &mut state.usage;
        usage.requests = usage.requests.saturating_add(1);
        if let Some(status) = status {
            let count = usage.by_status.entry(status.to_string()).or_default();
            *count = count.saturating_add(1);
        }
        if throttled {
            usage.throttled = usage.throttled.saturating_add(1);
        }
    }

    /// Count a retry.
    pub fn record_retry(&self) {
        let mut state = self.state();
        state.usage.retries = state.usage.retries.saturating_add(1);
    }

    /// What happened since the last report, with the queue as it is now; the
    /// counters start again from zero (peak concurrency from what is in flight).
    pub fn take_usage(&self) -> Usage {
        let now = self.clock.now();
        let mut state = self.state();
        let idle_millis = u64::try_from(state.idle_for(now).as_millis()).unwrap_or(u64::MAX);
        let in_flight = u64::from(state.in_flight);
        let mut usage = std::mem::replace(
            &mut state.usage,
            Usage {
                peak_concurrency: in_flight,
                ..Usage::default()
            },
        );
        usage.queued = state.waiting as u64;
        usage.idle_millis = idle_millis;
        usage.held_back = state.held_back_milli / 1_000;
        state.held_back_milli %= 1_000;
        usage
    }

    /// The gate's clock, now.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// What the renewer watches between renewals: work waiting, or how long
    /// there has been none.
    pub fn activity(&self) -> Activity {
        let now = self.clock.now();
        let state = self.state();
        Activity {
            waiting: state.waiting,
            idle_for: state.idle_for(now),
            throttled: state.usage.throttled,
        }
    }

    /// Put back a report that could not be delivered, so the next one carries it.
    pub fn restore_usage(&self, undelivered: Usage) {
        let mut state = self.state();
        let usage = &mut state.usage;
        usage.requests = usage.requests.saturating_add(undelivered.requests);
        usage.throttled = usage.throttled.saturating_add(undelivered.throttled);
        usage.retries = usage.retries.saturating_add(undelivered.retries);
        usage.peak_concurrency = usage.peak_concurrency.max(undelivered.peak_concurrency);
        for (status, count) in undelivered.by_status {
            let kept = usage.by_status.entry(status).or_default();
            *kept = kept.saturating_add(count);
        }
        state.held_back_milli = state
            .held_back_milli
            .saturating_add(undelivered.held_back.saturating_mul(1_000));
    }

    /// A lease granted `limit` for `ttl` from now.
    pub fn set_lease(&self, limit: Limit, ttl: Duration) {
        let expires = self.clock.now().saturating_add(ttl);
        self.state().limits.set_lease(limit, expires);
        self.changed.notify_waiters();
    }

    /// The upstream throttled: start no attempt for `wait` from now. What
    /// the hold adds to one already running counts as held back at the
    /// grant's rate.
    pub fn hold(&self, wait: Duration) {
        let now = self.clock.now();
        let until = now.saturating_add(wait);
        let mut state = self.state();
        let added = until.saturating_sub(state.held_until.max(now));
        let (limit, _) = state.limits.current(now);
        let held_back_milli =
            u128::from(limit.requests) * added.as_micros() / u128::from(limit.period_millis.max(1));
        state.held_back_milli = state
            .held_back_milli
            .saturating_add(u64::try_from(held_back_milli).unwrap_or(u64::MAX));
        state.held_until = state.held_until.max(until);
    }

    /// The limit file as last read.
    pub fn set_file(&self, file: Option<Limit>) {
        self.state().limits.set_file(file);
        self.changed.notify_waiters();
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.state();
        let (limit, source) = state.limits.current(self.clock.now());
        Snapshot {
            waiting: state.waiting,
            in_flight: state.in_flight,
            limit,
            source,
        }
    }

    /// Sends in the window of the grant's period ending now (tests, metrics).
    pub fn sent_in_window(&self) -> usize {
        let state = self.state();
        let now = self.clock.now();
        let (limit, _) = state.limits.current(now);
        state.pacer.in_window(crate::pacer::period(limit), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saleslayer_runtime::clock::ManualClock;

    fn limit(requests: u32, max_concurrency: u32) -> Limit {
        Limit {
            requests,
            period_millis: 1_000,
            max_concurrency,
        }
    }

    #[tokio::test]
    async fn the_grant_paces_and_the_queue_is_bounded() {
        let clock = ManualClock::default();
        let gate = Gate::new(Arc::new(clock.clone()), Limits::new(limit(2, 5)), 1);
        let a = gate.acquire().await.expect("first");
        let b = gate.acquire().await.expect("second");
        // The third waits for the window: the manual clock jumps a period.
        let c = gate.acquire().await.expect("third");
        assert_eq!(clock.now(), Duration::from_secs(1));
        drop((a, b, c));
        let usage = gate.take_usage();
        assert_eq!(usage.peak_concurrency, 3);
        assert_eq!(usage.queued, 0);
    }

    #[tokio::test]
    async fn concurrency_is_capped_and_freed_on_drop() {
        let clock = ManualClock::default();
        let gate = Gate::new(Arc::new(clock), Limits::new(limit(100, 1)), 8);
        let first = gate.acquire().await.expect("first");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(gate.snapshot().waiting, 1);
        assert_eq!(
            gate.take_usage().queued,
            1,
            "a waiting request is reported queued"
        );
        drop(first);
        waiter
            .await
            .expect("join")
            .expect("acquired after the drop");
        assert_eq!(gate.snapshot().in_flight, 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let clock = ManualClock::default();
        let gate = Gate::new(Arc::new(clock), Limits::new(limit(100, 1)), 1);
        let _held = gate.acquire().await.expect("held");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(gate.acquire().await.err(), Some(QueueFull(1)));
        waiter.abort();
    }

    #[tokio::test]
    async fn the_gate_says_how_long_it_has_had_nothing_to_do() {
        let clock = ManualClock::default();
        let gate = Gate::new(Arc::new(clock.clone()), Limits::new(limit(100, 1)), 8);
        clock.advance(Duration::from_millis(700));
        // Nothing since it opened.
        assert_eq!(gate.activity().idle_for, Duration::from_millis(700));
        let permit = gate.acquire().await.expect("a permit");
        clock.advance(Duration::from_secs(3));
        // A request in flight is work, however long it takes.
        let working = Activity {
            waiting: 0,
            idle_for: Duration::ZERO,
            throttled: 0,
        };
        assert_eq!(gate.activity(), working);
        assert_eq!(gate.take_usage().idle_millis, 0);
        drop(permit);
        clock.advance(Duration::from_millis(400));
        assert_eq!(gate.activity().idle_for, Duration::from_millis(400));
        assert_eq!(gate.take_usage().idle_millis, 400);
        // A waiting request is work too.
        let _held = gate.acquire().await.expect("held");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            gate.activity(),
            Activity {
                waiting: 1,
                ..working
            }
        );
        gate.record_attempt(Some(429), true);
        assert_eq!(gate.activity().throttled, 1);
        waiter.abort();
    }

    #[test]
    fn undelivered_usage_rides_with_the_next_report() {
        let gate = Gate::new(
            Arc::new(ManualClock::default()),
            Limits::new(limit(1, 1)),
            1,
        );
        gate.record_attempt(Some(200), false);
        gate.record_attempt(Some(503), true);
        gate.record_retry();
        let lost = gate.take_usage();
        assert_eq!((lost.requests, lost.throttled, lost.retries), (2, 1, 1));
        gate.record_attempt(None, false);
        gate.restore_usage(lost);
        let next = gate.take_usage();
        assert_eq!((next.requests, next.throttled, next.retries), (3, 1, 1));
        assert_eq!(next.by_status.get("503"), Some(&1));
    }

    #[test]
    fn a_hold_counts_the_sends_it_keeps_back_at_the_grants_rate() {
        let clock = ManualClock::default();
        // 10 per second: a hold of 250 ms keeps 2.5 sends back.
        let gate = Gate::new(Arc::new(clock.clone()), Limits::new(limit(10, 4)), 8);
        gate.hold(Duration::from_millis(250));
        // Within the running hold: only what it adds counts.
        gate.hold(Duration::from_millis(100));
        gate.hold(Duration::from_millis(300));
        assert_eq!(gate.take_usage().held_back, 3, "300 ms at 10/s");
        clock.advance(Duration::from_secs(1));
        gate.hold(Duration::from_millis(50));
        assert_eq!(gate.take_usage().held_back, 0, "0.5 carries over");
        clock.advance(Duration::from_secs(1));
        gate.hold(Duration::from_millis(50));
        let lost = gate.take_usage();
        assert_eq!(lost.held_back, 1, "the two halves make one");
        gate.restore_usage(lost);
        assert_eq!(gate.take_usage().held_back, 1, "undelivered rides along");
    }

    #[tokio::test]
    async fn a_hold_delays_every_attempt_until_it_ends() {
        let clock = ManualClock::default();
        let gate = Gate::new(Arc::new(clock.clone()), Limits::new(limit(100, 4)), 8);
        drop(gate.acquire().await.expect("first"));
        gate.hold(Duration::from_secs(3));
        gate.hold(Duration::from_secs(1));
        drop(gate.acquire().await.expect("after the hold"));
        assert_eq!(clock.sleeps(), vec![Duration::from_secs(3)]);
        drop(gate.acquire().await.expect("no longer held"));
        assert_eq!(
            clock.sleeps().len(),
            2,
            "only the pacer's spacing: {:?}",
            clock.sleeps()
        );
    }

    #[test]
    fn usage_counters_saturate_instead_of_wrapping() {
        let gate = Gate::new(
            Arc::new(ManualClock::default()),
            Limits::new(limit(1, 1)),
            1,
        );
        let huge = Usage {
            requests: u64::MAX,
            by_status: [("200".to_owned(), u64::MAX)].into(),
            throttled: u64::MAX,
            retries: u64::MAX,
            peak_concurrency: u64::MAX,
            queued: u64::MAX,
            idle_millis: u64::MAX,
            held_back: u64::MAX,
        };
        gate.restore_usage(huge.clone());
        gate.restore_usage(huge);
        gate.record_attempt(Some(200), true);
        gate.record_retry();
        let usage = gate.take_usage();
        assert_eq!(
            (usage.requests, usage.throttled, usage.retries),
            (u64::MAX, u64::MAX, u64::MAX)
        );
        assert_eq!(usage.by_status.get("200"), Some(&u64::MAX));
    }
}
