//! The effective budget of an account (DESIGN.md §3a): additive increase,
//! multiplicative decrease over the account's windows, on the throttled
//! responses all its pods report. Pure: windows are numbers, what the pods
//! reported per window is a function, and the state is a value the leader
//! keeps between calls.
//!
//! When pods pace correctly and Sales Layer throttles anyway, someone outside
//! the cluster uses the account; the only safe answer is to send less, then
//! probe back up. A window is one period of the limit; `settle` is the
//! windows the pods need to follow a new budget (one lease refresh). So:
//! - the first throttled response of a window lowers `effective` at once
//!   (once per window) to what got through: `effective × (1 − f)` less one
//!   request, where `f` is the excess share of what the pods' grants offered
//!   over the last `settle` windows. The excess is the throttled answers
//!   plus the sends their holds kept back (`Usage::held_back`): a sidecar
//!   holds its whole gate after a 429, so one refused request stands for a
//!   whole pause of the pod, and the 429s alone show a fraction of the
//!   excess. `decreasePercent` bounds the cut (`effective × (100 −
//!   decreasePercent) / 100` at the least), one request is the smallest cut,
//!   and `minPercent` of usable the floor. Cutting by the measured excess
//!   instead of always by `decreasePercent` is what lets the account use
//!   what the outside consumer leaves (issue 13's ≥ 90 %);
//! - when that window ends, the cut is sized again on all its reports alone
//!   (the windows before it were clean and would dilute the excess; a
//!   window's reports cover about a window of sending however they fall):
//!   lower if they show more excess, never higher, and so the ceiling;
//! - the `settle` windows after a decrease are the pods still sending under
//!   their older, larger grants: their throttling neither lowers again nor
//!   do they raise (TCP's one decrease per round trip);
//! - each settled window that ends without a throttled response adds
//!   `increasePerWindow`, never above usable;
//! - after a decrease, the level that was throttled is a ceiling: for
//!   `holdWindows` (30) windows the clean windows climb to just below it and
//!   hold there, then probe past it again by `increasePerWindow` a window
//!   (so the 429s stop instead of recurring at every probe, and the full
//!   budget is back within `holdWindows` + (usable − ceiling) windows after
//!   the outside consumer leaves);
//! - a window that had a decrease does not also increase.
//!
//! ```
//! use saleslayer_core::adaptation::{Adaptation, WindowCounts};
//! use saleslayer_core::api::AdaptivePolicy;
//!
//! let policy = AdaptivePolicy::default(); // at most −30 %, +1, floor 25 %
//! let mut state = Adaptation::start(40, 40, 100);
//! // In window 100 the pods sent 40 and 5 were throttled: 35 got through.
//! let counts = |window: u64| match window {
//!     100 => WindowCounts { sent: 40, throttled: 5, held_back: 0 },
//!     _ => WindowCounts { sent: 34, throttled: 0, held_back: 0 },
//! };
//! state.step(&policy, 40, 100, 1, counts);
//! assert_eq!(state.effective(), 34); // what got through, less one
//! // Window 101 settles; 102 and 103 end clean, but 35 is the limit's edge:
//! // the budget holds one below it.
//! state.step(&policy, 40, 104, 1, counts);
//! assert_eq!(state.effective(), 34);
//! ```

use std::collections::BTreeMap;

use crate::api::AdaptivePolicy;

/// Windows of reports kept per account: older ones count as clean.
pub const REMEMBERED_WINDOWS: usize = 64;

/// What an account's pods reported for one window.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowCounts {
    /// Requests sent upstream, retries included.
    pub sent: u64,
    /// Of those, answers that were throttling.
    pub throttled: u64,
    /// Sends the pods' grants allowed while a throttled answer held their
    /// gates (`Usage::held_back`): excess that never reached Sales Layer.
    pub held_back: u64,
}

impl WindowCounts {
    /// What got through, as a share of what the pods' grants offered
    /// (sent, plus held back): `(through, offered)`, offered at least 1.
    fn through(self) -> (u64, u64) {
        let excess = self.throttled.saturating_add(self.held_back);
        let offered = self.sent.saturating_add(self.held_back).max(excess).max(1);
        (offered - excess, offered)
    }

    fn add(self, other: Self) -> Self {
        Self {
            sent: self.sent.saturating_add(other.sent),
            throttled: self.throttled.saturating_add(other.throttled),
            held_back: self.held_back.saturating_add(other.held_back),
        }
    }
}

/// A level that was throttled, and the window until which the budget stays
/// below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ceiling {
    level: u32,
    until: u64,
}

/// The last decrease: the window it came in, and the budget before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    window: u64,
    level: u32,
}

/// One account's adaptation, as of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptation {
    effective: u32,
    /// The window this state is as of.
    window: u64,
    /// Whether `effective` was already lowered in `window`.
    decreased: bool,
    /// Windows before this one settle the last decrease.
    settled_from: u64,
    ceiling: Option<Ceiling>,
    cut: Option<Cut>,
}

impl Adaptation {
    /// Start at `effective` (what the account's status said, clamped to
    /// `usable`) in `window`, as a new leader does.
    pub fn start(effective: u32, usable: u32, window: u64) -> Self {
        Self {
            effective: effective.min(usable),
            window,
            decreased: false,
            settled_from: 0,
            ceiling: None,
            cut: None,
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

    /// The level the budget stays below, while it holds one.
    pub fn ceiling(&self) -> Option<u32> {
        self.ceiling.map(|c| c.level)
    }

    /// Move to `now_window`: every window that ended since is judged by what
    /// `counts` says the pods reported in it, and so is the current one (a
    /// decrease at once). `settle` is the windows the pods take to follow a
    /// new budget (at least 1). Returns whether `effective` changed. A
    /// `now_window` before the state's own changes nothing (the leader's
    /// clock never goes back).
    pub fn step(
        &mut self,
        policy: &AdaptivePolicy,
        usable: u32,
        now_window: u64,
        settle: u64,
        counts: impl Fn(u64) -> WindowCounts,
    ) -> bool {
        let before = self.effective;
        if !policy.enabled {
            self.effective = usable;
            self.ceiling = None;
            self.window = self.window.max(now_window);
            return before != self.effective;
        }
        let settle = settle.max(1);
        let floor = floor_of(policy, usable);
        self.effective = self.effective.clamp(floor.min(usable), usable);
        // Windows that ended: only the last REMEMBERED_WINDOWS can have been
        // throttled; any before them were clean, and clean windows only add.
        while self.window < now_window {
            let window = self.window;
            if self.judges(window) {
                if counts(window).throttled > 0 {
                    self.decrease(policy, floor, window, settle, &counts);
                } else {
                    self.increase(policy, usable, window, 1);
                }
            }
            if self.cut.is_some_and(|cut| cut.window == window) {
                self.resize(policy, floor, counts(window));
            }
            self.decreased = false;
            let remembered = now_window.saturating_sub(REMEMBERED_WINDOWS as u64);
            if self.window + 1 < remembered {
                // Skip a long quiet stretch in one step.
                let clean = remembered - (self.window + 1);
                self.increase(policy, usable, self.window + 1, clean);
                self.window = remembered;
            } else {
                self.window += 1;
            }
        }
        let window = self.window;
        if self.judges(window) && counts(window).throttled > 0 {
            self.decrease(policy, floor, window, settle, &counts);
            self.decreased = true;
        }
        before != self.effective
    }

    /// Whether what the pods reported in `window` may move the budget: not
    /// once it was lowered in that window, nor while a decrease settles.
    fn judges(&self, window: u64) -> bool {
        !self.decreased && window >= self.settled_from
    }

    /// Lower the budget in `window` (at once: the window is still going)
    /// to what got through by the reports of the last `settle` windows,
    /// within the policy's bounds; remember the throttled level and settle.
    fn decrease(
        &mut self,
        policy: &AdaptivePolicy,
        floor: u32,
        window: u64,
        settle: u64,
        counts: &impl Fn(u64) -> WindowCounts,
    ) {
        let seen = (window.saturating_sub(settle - 1)..=window)
            .map(counts)
            .fold(WindowCounts::default(), WindowCounts::add);
        let level = self.effective;
        self.cut = Some(Cut { window, level });
        self.ceiling = None;
        self.settled_from = window.saturating_add(1 + settle);
        self.lower_to(policy, floor, level, seen, window);
    }

    /// Size the cut again once its window ended, on all that window's
    /// reports: the excess of that one window, when the pods all still
    /// sent at the level that was cut (the windows before it were clean, and
    /// a report covers about a window's sending however they fall). Lowers
    /// further, and the ceiling with it, when it shows more excess; never
    /// raises either (the window was throttled, and the first estimate saw
    /// an edge there).
    fn resize(&mut self, policy: &AdaptivePolicy, floor: u32, counts: WindowCounts) {
        if let Some(cut) = self.cut {
            self.lower_to(policy, floor, cut.level, counts, cut.window);
        }
    }

    /// Lower to what `counts` say got through at `level`, less one request:
    /// at most `decreasePercent` off `level`, at least one request, never
    /// below the floor nor above the budget now. The ceiling is what got
    /// through, held for `holdWindows` after `window`.
    fn lower_to(
        &mut self,
        policy: &AdaptivePolicy,
        floor: u32,
        level: u32,
        counts: WindowCounts,
        window: u64,
    ) {
        let (through, offered) = counts.through();
        let through = u64::from(level) * through / offered;
        let through = u32::try_from(through).unwrap_or(level);
        let lowered = through
            .saturating_sub(1)
            .max(bounded_decrease(policy, level))
            .min(level.saturating_sub(1))
            .max(floor);
        self.effective = self.effective.min(lowered);
        // What got through is the limit's edge: the hold stays one below it,
        // and below the lowest edge any estimate of this cut showed.
        // (A decrease clears the ceiling, so one still here is this cut's.)
        let mut level = through.max(self.effective.saturating_add(1));
        if let Some(ceiling) = self.ceiling {
            level = level.min(ceiling.level);
        }
        self.ceiling = Some(Ceiling {
            level,
            until: window.saturating_add(1 + u64::from(policy.hold_windows)),
        });
    }

    /// `clean` clean windows from `window` on: `increasePerWindow` each, up
    /// to usable, and below the ceiling while it holds.
    fn increase(&mut self, policy: &AdaptivePolicy, usable: u32, window: u64, clean: u64) {
        let added = u64::from(policy.increase_per_window).saturating_mul(clean);
        let mut cap = usable;
        if let Some(ceiling) = self.ceiling {
            if window.saturating_add(clean) <= ceiling.until {
                cap = cap.min(ceiling.level.saturating_sub(1).max(self.effective));
            } else {
                self.ceiling = None;
            }
        }
        let raised = u64::from(self.effective).saturating_add(added);
        self.effective = u32::try_from(raised.min(u64::from(cap))).unwrap_or(cap);
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

/// The lowest a single decrease goes: `decreasePercent` off `effective`.
fn bounded_decrease(policy: &AdaptivePolicy, effective: u32) -> u32 {
    let kept = 100 - u64::from(policy.decrease_percent.min(100));
    let lowered = u64::from(effective) * kept / 100;
    u32::try_from(lowered).unwrap_or(effective)
}

/// What each account's pods reported per window, the last
/// [`REMEMBERED_WINDOWS`] windows of each. Pure: the quota API records, the
/// account's reconcile reads.
#[derive(Debug, Default, Clone)]
pub struct AccountThrottling {
    windows: BTreeMap<String, BTreeMap<u64, WindowCounts>>,
    last_throttled_millis: BTreeMap<String, u64>,
}

impl AccountThrottling {
    /// Count a report (`reported`: what one pod sent, had throttled and held
    /// back) on `account` at `now_millis` in `window`; true when this made
    /// the window throttled (its first such report).
    pub fn report(
        &mut self,
        account: &str,
        reported: WindowCounts,
        window: u64,
        now_millis: u64,
    ) -> bool {
        if reported == WindowCounts::default() {
            return false;
        }
        if reported.throttled > 0 {
            self.last_throttled_millis
                .insert(account.to_owned(), now_millis);
        }
        let windows = self.windows.entry(account.to_owned()).or_default();
        let counts = windows.entry(window).or_default();
        let first = counts.throttled == 0 && reported.throttled > 0;
        *counts = counts.add(reported);
        while windows.len() > REMEMBERED_WINDOWS {
            windows.pop_first();
        }
        first
    }

    /// What `account`'s pods reported in `window`.
    pub fn counts(&self, account: &str, window: u64) -> WindowCounts {
        self.windows
            .get(account)
            .and_then(|windows| windows.get(&window))
            .copied()
            .unwrap_or_default()
    }

    /// Whether `account` had throttled responses in `window`.
    pub fn throttled(&self, account: &str, window: u64) -> bool {
        self.counts(account, window).throttled > 0
    }

    /// Consecutive throttled windows ending at `window` (or the one before
    /// it, when `window` has none yet).
    pub fn run(&self, account: &str, window: u64) -> u32 {
        let mut at = if self.throttled(account, window) {
            window
        } else {
            match window.checked_sub(1) {
                Some(previous) => previous,
                None => return 0,
            }
        };
        let mut run = 0u32;
        while self.throttled(account, at) {
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
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn policy() -> AdaptivePolicy {
        AdaptivePolicy::default()
    }

    /// `sent` a window, `throttled` of them in the windows of `throttled_in`.
    fn reports(sent: u64, throttled: u64, throttled_in: &[u64]) -> impl Fn(u64) -> WindowCounts {
        let throttled_in = throttled_in.to_vec();
        move |w| {
            pod(
                sent,
                if throttled_in.contains(&w) {
                    throttled
                } else {
                    0
                },
                0,
            )
        }
    }

    #[test]
    fn a_throttled_window_lowers_once_to_what_got_through() {
        let mut state = Adaptation::start(40, 40, 0);
        let counts = reports(40, 5, &[0]);
        assert!(state.step(&policy(), 40, 0, 1, &counts));
        assert_eq!(state.effective(), 34, "35 of 40 got through, less one");
        assert_eq!(state.ceiling(), Some(35));
        // More throttled reports in the same window: no second decrease.
        assert!(!state.step(&policy(), 40, 0, 1, &counts));
        assert_eq!(state.effective(), 34);
    }

    #[test]
    fn decrease_percent_bounds_the_cut_and_one_request_is_the_least() {
        // Half throttled: the cut stops at −30 %.
        let mut state = Adaptation::start(40, 40, 0);
        state.step(&policy(), 40, 0, 1, reports(40, 20, &[0]));
        assert_eq!(state.effective(), 28);
        // One of a thousand: 39 (of 39.96) got through, less one.
        let mut state = Adaptation::start(40, 40, 0);
        state.step(&policy(), 40, 0, 1, reports(1_000, 1, &[0]));
        assert_eq!(state.effective(), 38);
        // At the floor it stays there.
        let mut state = Adaptation::start(10, 40, 0);
        state.step(&policy(), 40, 0, 1, reports(10, 1, &[0]));
        assert_eq!(state.effective(), 10);
        // Throttled answers with nothing reported sent count as all throttled.
        let mut state = Adaptation::start(40, 40, 0);
        state.step(&policy(), 40, 0, 1, reports(0, 3, &[0]));
        assert_eq!(state.effective(), 28);
    }

    #[test]
    fn sends_held_back_count_as_excess() {
        // 37 sent, 1 throttled, and the holds after it kept 4 sends back:
        // 36 of the 41 offered got through, 40 × 36/41 = 35.
        let mut state = Adaptation::start(40, 40, 0);
        state.step(&policy(), 40, 0, 1, |_| pod(37, 1, 4));
        assert_eq!((state.effective(), state.ceiling()), (34, Some(35)));
        // Counting only the 429: 40 × 36/37 = 38, a cut of two.
        let mut state = Adaptation::start(40, 40, 0);
        state.step(&policy(), 40, 0, 1, |_| pod(37, 1, 0));
        assert_eq!(state.effective(), 37);
    }

    #[test]
    fn a_cut_is_sized_again_on_its_whole_window_once_it_ends() {
        let seen = std::cell::RefCell::new(BTreeMap::from([(9, pod(40, 0, 0))]));
        let counts = |w: u64| seen.borrow().get(&w).copied().unwrap_or_default();
        // The first throttled report of window 10, at once: windows 9 and
        // 10 so far show 1 of 44 offered throttled.
        seen.borrow_mut().insert(10, pod(3, 1, 1));
        let mut state = Adaptation::start(40, 40, 10);
        state.step(&policy(), 40, 10, 2, counts);
        assert_eq!(state.effective(), 37, "40 × 42/44 = 38, less one");
        // When window 10 ends, all of it: 38 sent, 2 throttled, 4 held back.
        seen.borrow_mut().insert(10, pod(38, 2, 4));
        state.step(&policy(), 40, 11, 2, counts);
        assert_eq!(
            (state.effective(), state.ceiling()),
            (33, Some(34)),
            "40 × 36/42 = 34 got through"
        );

        // A whole window with less excess than its first report raises
        // neither the budget nor its ceiling: the first report saw the edge.
        seen.borrow_mut().insert(20, pod(2, 1, 2));
        let mut state = Adaptation::start(40, 40, 20);
        state.step(&policy(), 40, 20, 1, counts);
        assert_eq!(state.effective(), 28, "3 of 4 offered: −30 % at most");
        seen.borrow_mut().insert(20, pod(40, 1, 2));
        state.step(&policy(), 40, 21, 1, counts);
        assert_eq!((state.effective(), state.ceiling()), (28, Some(29)));
        // Clean windows hold one below it until the hold ends.
        state.step(&policy(), 40, 40, 1, counts);
        assert_eq!(state.effective(), 28);
    }

    #[test]
    fn settling_windows_neither_lower_again_nor_raise() {
        let mut state = Adaptation::start(40, 40, 0);
        // Throttled in windows 0..=3; the pods need 3 windows to follow.
        let counts = reports(40, 5, &[0, 1, 2, 3]);
        state.step(&policy(), 40, 0, 3, &counts);
        assert_eq!(state.effective(), 34);
        state.step(&policy(), 40, 3, 3, &counts);
        assert_eq!(state.effective(), 34, "windows 1..=3 settle the decrease");
        // Throttled again in window 4, once settled: 4 windows of 40 sent, 5 throttled.
        let counts = reports(40, 5, &[4]);
        state.step(&policy(), 40, 4, 3, &counts);
        assert_eq!(
            state.effective(),
            31,
            "5 of the 120 sent in windows 2..=4 throttled: 34 × 115/120 = 32, less one"
        );
    }

    #[test]
    fn clean_windows_climb_below_the_ceiling_hold_then_probe() {
        let mut state = Adaptation::start(40, 40, 0);
        let counts = reports(40, 5, &[0]);
        state.step(&policy(), 40, 0, 1, &counts);
        assert_eq!((state.effective(), state.ceiling()), (34, Some(35)));
        // Window 1 settles, 2 and on are clean, held one below the 35 that
        // got through.
        state.step(&policy(), 40, 10, 1, &counts);
        assert_eq!(state.effective(), 34);
        let hold = u64::from(policy().hold_windows);
        state.step(&policy(), 40, hold, 1, &counts);
        assert_eq!(state.effective(), 34, "held below the ceiling");
        // After the hold: +1 a window, past the old ceiling, up to usable.
        state.step(&policy(), 40, hold + 3, 1, &counts);
        assert_eq!(state.effective(), 36);
        assert_eq!(state.ceiling(), None);
        state.step(&policy(), 40, hold + 20, 1, &counts);
        assert_eq!(state.effective(), 40);
    }

    #[test]
    fn never_below_the_floor_nor_above_usable() {
        let mut state = Adaptation::start(40, 40, 0);
        for window in 0..40 {
            state.step(&policy(), 40, window, 1, |_| pod(10, 10, 0));
        }
        assert_eq!(state.effective(), floor_of(&policy(), 40));
        assert_eq!(state.effective(), 10);
        state.step(&policy(), 40, 1_000, 1, |_| WindowCounts::default());
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
        state.step(&off, 40, 0, 1, reports(40, 40, &[0]));
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

    /// One pod's report: `sent`, `throttled` of them throttled, and
    /// `held_back` sends its holds kept back.
    fn pod(sent: u64, throttled: u64, held_back: u64) -> WindowCounts {
        WindowCounts {
            sent,
            throttled,
            held_back,
        }
    }

    #[test]
    fn account_throttling_counts_runs_of_windows() {
        let mut book = AccountThrottling::default();
        assert!(book.report("acme", pod(10, 2, 3), 10, 100_000));
        assert!(
            !book.report("acme", pod(5, 1, 0), 10, 100_500),
            "the window was already throttled"
        );
        assert_eq!(book.counts("acme", 10), pod(15, 3, 3));
        assert!(
            !book.report("acme", pod(8, 0, 0), 11, 110_000),
            "a clean report marks nothing"
        );
        assert!(book.report("acme", pod(0, 1, 0), 11, 111_000));
        assert_eq!(book.run("acme", 11), 2);
        assert_eq!(book.run("acme", 12), 2, "the current window has none yet");
        assert_eq!(book.run("acme", 13), 0);
        assert_eq!(book.run("other", 11), 0);
        assert_eq!(book.last_throttled_millis("acme"), Some(111_000));
        for window in 100..300 {
            book.report("acme", pod(1, 1, 0), window, 0);
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
            settle in 1u64..6,
            hold in 0u32..40,
            steps in proptest::collection::vec((0u64..4, any::<bool>(), 0u64..100, 0u64..100, 0u64..100), 1..60),
        ) {
            let policy = AdaptivePolicy {
                enabled: true,
                decrease_percent: decrease,
                increase_per_window: increase,
                min_percent,
                hold_windows: hold,
            };
            let floor = floor_of(&policy, usable);
            let mut state = Adaptation::start(start, usable, 0);
            let mut windows: BTreeMap<u64, WindowCounts> = BTreeMap::new();
            let mut throttled_windows = BTreeSet::new();
            let mut now = 0u64;
            for (advance, throttled_now, sent, throttled, held_back) in steps {
                now += advance;
                if throttled_now {
                    throttled_windows.insert(now);
                    windows.insert(now, WindowCounts { sent, throttled: throttled.max(1), held_back });
                }
                let before = state.effective();
                let window_before = state.window();
                state.step(&policy, usable, now, settle, |w| {
                    windows.get(&w).copied().unwrap_or_default()
                });
                prop_assert!(state.effective() <= usable);
                prop_assert!(state.effective() >= floor.min(usable));
                if let Some(ceiling) = state.ceiling() {
                    prop_assert!(
                        state.effective() < ceiling || state.effective() == floor.min(usable),
                        "{} at or above the ceiling {}",
                        state.effective(),
                        ceiling
                    );
                }
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
