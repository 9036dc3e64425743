//! How often the quota API lets one pod renew, and how often what pods report
//! may ask the controller to plan an account again.
//!
//! Both are pure books with time as a parameter, kept by [`super::Quota`]
//! behind a lock. [`RenewalPace`] refuses a pod that calls again sooner than
//! [`MIN_RENEWAL_INTERVAL`] after its last accepted call (429 `TooFrequent`
//! with `Retry-After`), so a pod that loops on `/v1/leases` with alternating
//! `queued` cannot move demand, or anything else, faster than a sidecar
//! renews. [`ReplanGate`] lets demand re-plan each account at most once per
//! window (the period of its limit): a move inside a window that already
//! re-planned waits for the next report in a later window. Neither ever
//! talks to the API server; both forget what can no longer matter, so their
//! memory follows the pods and accounts that are active, not those that ever
//! were.

use std::collections::HashMap;
use std::time::Duration;

/// The least time between two accepted lease calls of one pod (250 ms). A
/// sidecar leaves twice that between its calls, even when it renews early
/// (it turned idle, or work waits again), so it never meets this; a client
/// in a loop does.
pub const MIN_RENEWAL_INTERVAL: Duration =
    Duration::from_millis(saleslayer_contract::MIN_RENEWAL_INTERVAL_MILLIS);

/// Below this many pods the book is never pruned (it is small anyway).
const PRUNE_FLOOR: usize = 64;

/// When each pod's last lease call was accepted.
#[derive(Debug)]
pub struct RenewalPace {
    min_interval_millis: u64,
    /// `namespace/pod` → the time of its last accepted call.
    last: HashMap<String, u64>,
    /// Entries after the last pruning: the book prunes again once it doubled,
    /// or once an interval has passed since.
    pruned_len: usize,
    pruned_at: u64,
}

impl Default for RenewalPace {
    fn default() -> Self {
        Self::new(MIN_RENEWAL_INTERVAL)
    }
}

impl RenewalPace {
    /// A book that lets each pod call once per `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval_millis: u64::try_from(min_interval.as_millis()).unwrap_or(u64::MAX),
            last: HashMap::new(),
            pruned_len: 0,
            pruned_at: 0,
        }
    }

    /// Accept a call of `namespace/pod` at `now_millis`, or say how many
    /// milliseconds it must wait. A refused call does not count as a call.
    pub fn admit(&mut self, namespace: &str, pod: &str, now_millis: u64) -> Result<(), u64> {
        let key = format!("{namespace}/{pod}");
        if let Some(&at) = self.last.get(&key) {
            let allowed = at.saturating_add(self.min_interval_millis);
            if now_millis < allowed {
                return Err(allowed - now_millis);
            }
        }
        self.last.insert(key, now_millis);
        let interval = self.min_interval_millis;
        let grown = self.last.len() > PRUNE_FLOOR.max(2 * self.pruned_len);
        let stale =
            self.last.len() > PRUNE_FLOOR && now_millis.saturating_sub(self.pruned_at) >= interval;
        if grown || stale {
            // An entry older than the interval refuses nothing: pods that were
            // deleted (or stopped calling) drop out here.
            self.last
                .retain(|_, at| now_millis.saturating_sub(*at) < interval);
            self.pruned_len = self.last.len();
            self.pruned_at = now_millis;
        }
        Ok(())
    }

    /// Pods remembered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether no pod is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Per account, the window of its last demand re-plan and whether another
/// move waits for the next window.
#[derive(Debug, Default)]
pub struct ReplanGate {
    accounts: HashMap<String, Replan>,
}

#[derive(Debug, Clone, Copy)]
struct Replan {
    window: u64,
    pending: bool,
}

impl ReplanGate {
    /// Whether to re-plan `account` now, at a report in `window` that did
    /// (`moved`) or did not move its demand: at the first move of a window,
    /// and at the first report of a later window after a move that waited.
    pub fn replan(&mut self, account: &str, moved: bool, window: u64) -> bool {
        match self.accounts.get_mut(account) {
            // A window already re-planned (or a clock that stepped back): wait.
            Some(state) if window <= state.window => {
                state.pending |= moved;
                false
            }
            Some(state) if moved || state.pending => {
                *state = Replan {
                    window,
                    pending: false,
                };
                true
            }
            Some(_) => {
                // Nothing waits and the window is over: nothing to remember.
                self.accounts.remove(account);
                false
            }
            None if moved => {
                self.accounts.insert(
                    account.to_owned(),
                    Replan {
                        window,
                        pending: false,
                    },
                );
                true
            }
            None => false,
        }
    }

    /// Accounts remembered (for tests).
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Whether no account is remembered.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_calling_sooner_than_the_interval_is_told_how_long_to_wait() {
        let mut pace = RenewalPace::default();
        assert_eq!(MIN_RENEWAL_INTERVAL, Duration::from_millis(250));
        assert_eq!(pace.admit("shop", "a", 10_000), Ok(()));
        assert_eq!(pace.admit("shop", "a", 10_100), Err(150));
        // A refused call does not restart the wait; other pods are not held up.
        assert_eq!(pace.admit("shop", "a", 10_249), Err(1));
        assert_eq!(pace.admit("shop", "b", 10_249), Ok(()));
        assert_eq!(pace.admit("other", "a", 10_249), Ok(()));
        assert_eq!(pace.admit("shop", "a", 10_250), Ok(()));
        // A sidecar renewing every refresh, or early at twice the interval, is
        // never refused.
        for step in 1..10 {
            assert_eq!(pace.admit("shop", "a", 10_250 + step * 500), Ok(()));
        }
    }

    #[test]
    fn pods_that_stopped_calling_are_forgotten() {
        let mut pace = RenewalPace::default();
        for pod in 0..1_000 {
            assert_eq!(pace.admit("shop", &format!("old-{pod}"), 0), Ok(()));
        }
        // Those pods are gone; the live ones keep calling every refresh.
        for round in 1..=3u64 {
            for pod in 0..10 {
                let at = round * 5_000 + pod;
                assert_eq!(pace.admit("shop", &format!("live-{pod}"), at), Ok(()));
            }
        }
        assert!(pace.len() <= PRUNE_FLOOR, "{} remembered", pace.len());
    }

    #[test]
    fn demand_re_plans_an_account_at_most_once_per_window() {
        let mut gate = ReplanGate::default();
        // Window 7: the first move re-plans, the next ones wait.
        assert!(gate.replan("acme", true, 7));
        assert!(!gate.replan("acme", true, 7));
        assert!(!gate.replan("acme", false, 7));
        // Another account is not held up.
        assert!(gate.replan("globex", true, 7));
        // Window 8: the waiting move goes out at the first report, moved or not.
        assert!(gate.replan("acme", false, 8));
        assert!(!gate.replan("acme", true, 8));
        // Window 9 carries 8's move; then a quiet window forgets the account.
        assert!(gate.replan("acme", false, 9));
        assert!(!gate.replan("acme", false, 10));
        assert!(!gate.replan("globex", false, 10));
        assert!(gate.is_empty());
        // Nothing moved: nothing to do and nothing remembered.
        assert!(!gate.replan("initech", false, 11));
        assert!(gate.is_empty());
    }
}
