//! The effective budget of an account (DESIGN.md §3a): additive increase,
//! multiplicative decrease over the account's windows, on the throttled
//! responses all its pods report. Pure: windows are numbers, throttling is
//! a predicate, and the state is a value the leader keeps between calls.
//!
//! When pods pace correctly and Sales Layer throttles anyway, someone outside
//! the cluster uses the account; the only safe answer is to send less, then
//! probe back up. So:
//! - the first throttled response of a window multiplies `effective` by
//!   `(100 − decreasePercent) / 100` at once (once per window), never below
//!   `minPercent` of usable;
//! - each window that ends without a throttled response adds
//!   `increasePerWindow`, never above usable;
//! - a window that had a decrease does not also increase.
//!
//! ```
//! use saleslayer_core::adaptation::Adaptation;
//! use saleslayer_core::api::AdaptivePolicy;
//!
//! let policy = AdaptivePolicy::default(); // −30 %, +1, floor 25 %
//! let mut state = Adaptation::start(40, 40, 100);
//! let throttled = |window: u64| window == 100;
//! state.step(&policy, 40, 100, throttled);
//! assert_eq!(state.effective(), 28); // 40 × 0.7
//! state.step(&policy, 40, 103, throttled);
//! assert_eq!(state.effective(), 30); // windows 101 and 102 were clean
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::api::AdaptivePolicy;

/// Windows of throttling kept per account: older ones count as clean.
pub const REMEMBERED_WINDOWS: usize = 64;

/// One account's adaptation, as of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptation {
    effective: u32,
    /// The window this state is as of.
    window: u64,
    /// Whether `effective` was already lowered in `window`.
    decreased: bool,
}

impl Adaptation {
    /// Start at `effective` (what the account's status said, clamped to
    /// `usable`) in `window`, as a new leader does.
    pub fn start(effective: u32, usable: u32, window: u64) -> Self {
        Self {
            effective: effective.min(usable),
            window,
            decreased: false,
        }
    }

    /// Requests per period the allocation splits now.
    pub fn effective(&self) -> u32 {
        self.effective
    }

    /// The window this state is as of.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Move to `now_window`: every window that ended since is judged by
    /// `throttled`, and so is the current one (a decrease at once).
    /// Returns whether `effective` changed. A `now_window` before the
    /// state's own changes nothing (the leader's clock never goes back).
    pub fn step(
        &mut self,
        policy: &AdaptivePolicy,
        usable: u32,
        now_window: u64,
        throttled: impl Fn(u64) -> bool,
    ) -> bool {
        let before = self.effective;
        if !policy.enabled {
            self.effective = usable;
            self.window = self.window.max(now_window);
            return before != self.effective;
        }
        let floor = floor_of(policy, usable);
        self.effective = self.effective.clamp(floor.min(usable), usable);
        // Windows that ended: only the last REMEMBERED_WINDOWS can have been
        // throttled; any before them were clean, and clean windows only add.
        while self.window < now_window {
            if throttled(self.window) {
                if !self.decreased {
                    self.effective = decrease(policy, self.effective, floor);
                }
            } else if !self.decreased {
                self.effective = increase(policy, self.effective, usable);
            }
            self.decreased = false;
            let remembered = now_window.saturating_sub(REMEMBERED_WINDOWS as u64);
            if self.window + 1 < remembered {
                // Skip a long quiet stretch in one step.
                let clean = remembered - (self.window + 1);
                let added = u64::from(policy.increase_per_window).saturating_mul(clean);
                let raised = u64::from(self.effective).saturating_add(added);
                self.effective = u32::try_from(raised.min(u64::from(usable))).unwrap_or(usable);
                self.window = remembered;
            } else {
                self.window += 1;
            }
        }
        if throttled(self.window) && !self.decreased {
            self.effective = decrease(policy, self.effective, floor);
            self.decreased = true;
        }
        before != self.effective
    }
}

/// The lowest effective budget: `minPercent` of usable, at least 1.
pub fn floor_of(policy: &AdaptivePolicy, usable: u32) -> u32 {
    let floor = (u64::from(usable) * u64::from(policy.min_percent.min(100))).div_ceil(100);
    u32::try_from(floor)
        .unwrap_or(usable)
        .max(1)
        .min(usable.max(1))
}

fn decrease(policy: &AdaptivePolicy, effective: u32, floor: u32) -> u32 {
    let kept = 100 - u64::from(policy.decrease_percent.min(100));
    let lowered = u64::from(effective) * kept / 100;
    u32::try_from(lowered).unwrap_or(effective).max(floor)
}

fn increase(policy: &AdaptivePolicy, effective: u32, usable: u32) -> u32 {
    effective
        .saturating_add(policy.increase_per_window)
        .min(usable)
}

/// The windows in which each account's pods reported throttled responses,
/// the last [`REMEMBERED_WINDOWS`] of each. Pure: the quota API records,
/// the account's reconcile reads.
#[derive(Debug, Default, Clone)]
pub struct AccountThrottling {
    windows: BTreeMap<String, BTreeSet<u64>>,
    last_throttled_millis: BTreeMap<String, u64>,
}

impl AccountThrottling {
    /// Count `throttled` responses on `account` at `now_millis` in `window`;
    /// true when this made the window throttled (its first such report).
    pub fn report(&mut self, account: &str, throttled: u64, window: u64, now_millis: u64) -> bool {
        if throttled == 0 {
            return false;
        }
        self.last_throttled_millis
            .insert(account.to_owned(), now_millis);
        let windows = self.windows.entry(account.to_owned()).or_default();
        let first = windows.insert(window);
        while windows.len() > REMEMBERED_WINDOWS {
            windows.pop_first();
        }
        first
    }

    /// Whether `account` had throttled responses in `window`.
    pub fn throttled(&self, account: &str, window: u64) -> bool {
        self.windows
            .get(account)
            .is_some_and(|windows| windows.contains(&window))
    }

    /// Consecutive throttled windows ending at `window` (or the one before
    /// it, when `window` has none yet).
    pub fn run(&self, account: &str, window: u64) -> u32 {
        let Some(windows) = self.windows.get(account) else {
            return 0;
        };
        let mut at = if windows.contains(&window) {
            window
        } else {
            match window.checked_sub(1) {
                Some(previous) => previous,
                None => return 0,
            }
        };
        let mut run = 0u32;
        while windows.contains(&at) {
            run = run.saturating_add(1);
            match at.checked_sub(1) {
                Some(previous) => at = previous,
                None => break,
            }
        }
        run
    }

    /// When a response on `account` was last throttled (ms since the epoch).
    pub fn last_throttled_millis(&self, account: &str) -> Option<u64> {
        self.last_throttled_millis.get(account).copied()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> AdaptivePolicy {
        AdaptivePolicy::default()
    }

    #[test]
    fn a_throttled_window_lowers_once_and_clean_windows_raise_by_one() {
        let mut state = Adaptation::start(40, 40, 0);
        let throttled = |w: u64| w == 0;
        assert!(state.step(&policy(), 40, 0, throttled));
        assert_eq!(state.effective(), 28);
        // More throttled reports in the same window: no second decrease.
        assert!(!state.step(&policy(), 40, 0, throttled));
        assert_eq!(state.effective(), 28);
        // Window 0 ends (already lowered), window 1 is current: nothing yet.
        assert!(!state.step(&policy(), 40, 1, throttled));
        // Windows 1..=4 end clean: +1 each.
        state.step(&policy(), 40, 5, throttled);
        assert_eq!(state.effective(), 32);
    }

    #[test]
    fn never_below_the_floor_nor_above_usable() {
        let mut state = Adaptation::start(40, 40, 0);
        for window in 0..20 {
            state.step(&policy(), 40, window, |_| true);
        }
        assert_eq!(state.effective(), floor_of(&policy(), 40));
        assert_eq!(state.effective(), 10);
        state.step(&policy(), 40, 1_000, |_| false);
        assert_eq!(
            state.effective(),
            40,
            "a long quiet stretch comes back to usable"
        );
    }

    #[test]
    fn disabled_adaptation_is_always_usable() {
        let off = AdaptivePolicy {
            enabled: false,
            ..policy()
        };
        let mut state = Adaptation::start(12, 40, 0);
        state.step(&off, 40, 0, |_| true);
        assert_eq!(state.effective(), 40);
    }

    #[test]
    fn a_new_leader_starts_from_the_status() {
        let state = Adaptation::start(28, 40, 7);
        assert_eq!((state.effective(), state.window()), (28, 7));
        // A status above a lowered usable is clamped.
        assert_eq!(Adaptation::start(50, 40, 7).effective(), 40);
    }

    #[test]
    fn the_floor_is_a_quarter_of_usable_and_at_least_one_request() {
        assert_eq!(floor_of(&policy(), 40), 10);
        assert_eq!(floor_of(&policy(), 3), 1);
        assert_eq!(floor_of(&policy(), 1), 1);
    }

    #[test]
    fn account_throttling_counts_runs_of_windows() {
        let mut book = AccountThrottling::default();
        assert!(book.report("acme", 2, 10, 100_000));
        assert!(
            !book.report("acme", 1, 10, 100_500),
            "the window was already throttled"
        );
        assert!(
            !book.report("acme", 0, 11, 110_000),
            "a clean report marks nothing"
        );
        assert!(book.report("acme", 1, 11, 111_000));
        assert_eq!(book.run("acme", 11), 2);
        assert_eq!(book.run("acme", 12), 2, "the current window has none yet");
        assert_eq!(book.run("acme", 13), 0);
        assert_eq!(book.run("other", 11), 0);
        assert_eq!(book.last_throttled_millis("acme"), Some(111_000));
        for window in 100..300 {
            book.report("acme", 1, window, 0);
        }
        assert!(!book.throttled("acme", 100), "old windows are forgotten");
        assert!(book.throttled("acme", 299));
    }

    proptest! {
        /// Effective stays within [floor, usable] and never rises while
        /// every window it steps through is throttled.
        #[test]
        fn effective_stays_in_bounds_and_never_rises_when_throttled(
            usable in 1u32..500,
            start in 0u32..600,
            decrease in 1u32..=90,
            increase in 0u32..50,
            min_percent in 1u32..=100,
            steps in proptest::collection::vec((0u64..4, any::<bool>()), 1..60),
        ) {
            let policy = AdaptivePolicy {
                enabled: true,
                decrease_percent: decrease,
                increase_per_window: increase,
                min_percent,
            };
            let floor = floor_of(&policy, usable);
            let mut state = Adaptation::start(start, usable, 0);
            let mut throttled_windows = BTreeSet::new();
            let mut now = 0u64;
            for (advance, throttled_now) in steps {
                now += advance;
                if throttled_now {
                    throttled_windows.insert(now);
                }
                let before = state.effective();
                let window_before = state.window();
                state.step(&policy, usable, now, |w| throttled_windows.contains(&w));
                prop_assert!(state.effective() <= usable);
                prop_assert!(state.effective() >= floor.min(usable));
                let all_throttled =
                    (window_before..=now).all(|w| throttled_windows.contains(&w));
                if all_throttled && before >= floor {
                    prop_assert!(
                        state.effective() <= before,
                        "rose from {} to {} in throttled windows",
                        before,
                        state.effective()
                    );
                }
            }
        }
    }
}
