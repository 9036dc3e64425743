//! The pacing rule, pure: no window of the grant's period ever holds more
//! sends than the grant allows, bursts after idle included (a sliding-window
//! log of the recent sends, as a strict upstream counts), and sends are
//! spread evenly, at least `period / requests` apart. Without the spacing a
//! pod sends its whole grant at the start of each window; pods that start
//! together then burst together, and when one burst reaches the upstream
//! late it shares a window with the next one (the fleet benchmark saw 429s
//! that way at 72 % of the limit). Time is a parameter.

use std::collections::VecDeque;
use std::time::Duration;

pub use saleslayer_contract::Limit;

/// Sends are kept at least this long, so a grant whose period grows (a
/// stretched share, a new lease) still sees the sends inside its window.
pub const RETENTION: Duration = Duration::from_secs(60);
/// At most this many sends are kept, whatever the rate.
const MAX_KEPT: usize = 100_000;

/// The recent sends, oldest first.
#[derive(Debug, Clone)]
pub struct Pacer {
    sent: VecDeque<Duration>,
    /// How long sends are kept: [`RETENTION`], or the longest period seen.
    horizon: Duration,
}

impl Default for Pacer {
    fn default() -> Self {
        Self {
            sent: VecDeque::new(),
            horizon: RETENTION,
        }
    }
}

/// The gap between two sends under `limit`: its period over its requests.
pub fn spacing(limit: Limit) -> Duration {
    period(limit) / limit.requests.max(1)
}

/// The period of `limit`, at least one millisecond.
pub fn period(limit: Limit) -> Duration {
    Duration::from_millis(limit.period_millis.max(1))
}

impl Pacer {
    /// The earliest instant (`>= now`) at which one more send keeps every
    /// window of `limit`'s period within `limit.requests` and comes at least
    /// `period / requests` after the previous send.
    ///
    /// A window at `t` holds the sends after `t - period`, as the simulator
    /// counts: a send exactly one period after another no longer sees it.
    pub fn ready_at(&mut self, limit: Limit, now: Duration) -> Duration {
        let window = self.window_ready_at(limit, now);
        let spaced = match self.sent.back() {
            Some(&last) if limit.requests > 0 => last.saturating_add(spacing(limit)),
            _ => now,
        };
        window.max(spaced)
    }

    fn window_ready_at(&mut self, limit: Limit, now: Duration) -> Duration {
        let period = period(limit);
        self.horizon = self.horizon.max(period);
        self.forget(now);
        if limit.requests == 0 {
            // Nothing may go; look again a period from now.
            return now.saturating_add(period);
        }
        let in_window = self
            .sent
            .iter()
            .rev()
            .take_while(|&&at| at.saturating_add(period) > now)
            .count();
        let allowed = limit.requests as usize;
        if in_window < allowed {
            return now;
        }
        // The send that must leave the window first: `allowed` back from the newest.
        let index = self.sent.len() - allowed;
        self.sent
            .get(index)
            .map_or(now, |&at| at.saturating_add(period).max(now))
    }

    /// Count a send at `at` (never earlier than the newest one recorded).
    pub fn record(&mut self, at: Duration) {
        let at = self.sent.back().map_or(at, |&newest| at.max(newest));
        if self.sent.len() >= MAX_KEPT {
            self.sent.pop_front();
        }
        self.sent.push_back(at);
    }

    /// Sends in the window of `period` ending at `now`.
    pub fn in_window(&self, period: Duration, now: Duration) -> usize {
        self.sent
            .iter()
            .filter(|&&at| at <= now && at.saturating_add(period) > now)
            .count()
    }

    fn forget(&mut self, now: Duration) {
        while self
            .sent
            .front()
            .is_some_and(|&at| at.saturating_add(self.horizon) <= now)
        {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(requests: u32, period_millis: u64) -> Limit {
        Limit {
            requests,
            period_millis,
            max_concurrency: 1,
        }
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Send as soon as allowed from each wish time; returns the send times.
    fn drive(limits: &[(u64, Limit)], wishes: &[u64]) -> Vec<(Duration, Limit)> {
        let mut pacer = Pacer::default();
        let mut now = Duration::ZERO;
        let mut sent = Vec::new();
        for &wish in wishes {
            now = now.max(ms(wish));
            let current = limits
                .iter()
                .rev()
                .find(|(from, _)| ms(*from) <= now)
                .map_or(limits[0].1, |(_, l)| *l);
            let at = pacer.ready_at(current, now);
            pacer.record(at);
            now = at;
            sent.push((at, current));
        }
        sent
    }

    #[test]
    fn a_burst_is_spread_over_the_period() {
        let mut pacer = Pacer::default();
        let grant = limit(4, 1_000);
        let mut sent = Vec::new();
        for _ in 0..6 {
            let at = pacer.ready_at(grant, ms(10));
            pacer.record(at);
            sent.push(at.as_millis() as u64);
        }
        assert_eq!(sent, vec![10, 260, 510, 760, 1_010, 1_260]);
    }

    #[test]
    fn after_idle_the_next_send_goes_at_once() {
        let sent = drive(&[(0, limit(5, 1_000))], &[0, 0, 5_000, 5_000, 5_000]);
        let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
        assert_eq!(times, vec![0, 200, 5_000, 5_200, 5_400]);
    }

    #[test]
    fn the_window_still_holds_when_spacing_alone_would_not() {
        // 3 per 1 000 ms spaces sends 333 ms apart: 0, 333, 666, then 999 would
        // put four in the window (0, 999]; the window waits for 1 000.
        let sent = drive(&[(0, limit(3, 1_000))], &[0, 0, 0, 0]);
        let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
        assert_eq!(times, vec![0, 333, 666, 1_000]);
    }

    #[test]
    fn a_stretched_period_spaces_single_requests() {
        let sent = drive(&[(0, limit(1, 13_334))], &[0, 0, 0]);
        let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
        assert_eq!(times, vec![0, 13_334, 26_668]);
    }

    #[test]
    fn a_lower_grant_waits_for_the_sends_already_made() {
        let mut pacer = Pacer::default();
        for at in 0..10 {
            pacer.record(ms(at * 10));
        }
        // Cut from 10 to 4 per second: the next send waits until only 3 remain.
        assert_eq!(pacer.ready_at(limit(4, 1_000), ms(100)), ms(1_060));
        // A zero grant sends nothing.
        assert_eq!(pacer.ready_at(limit(0, 1_000), ms(100)), ms(1_100));
    }

    proptest! {
        /// Whatever the arrivals and however the grant changes, no window of
        /// a grant's period holds more sends than that grant (counted from
        /// the moment it applies).
        #[test]
        fn no_window_exceeds_the_grant(
            wishes in proptest::collection::vec(0u64..20_000, 1..300),
            grants in proptest::collection::vec((0u64..20_000, 1u32..20, 100u64..5_000), 1..4),
        ) {
            let mut wishes = wishes;
            wishes.sort_unstable();
            let mut limits: Vec<(u64, Limit)> =
                grants.iter().map(|&(from, r, p)| (from, limit(r, p))).collect();
            limits.sort_by_key(|(from, _)| *from);
            limits[0].0 = 0;
            let sent = drive(&limits, &wishes);
            for (i, &(at, grant)) in sent.iter().enumerate() {
                let period = period(grant);
                let count = sent[..=i]
                    .iter()
                    .filter(|(t, _)| t.saturating_add(period) > at)
                    .count();
                prop_assert!(
                    count <= grant.requests as usize,
                    "{count} sends in the {period:?} window ending {at:?} under {grant:?}"
                );
            }
        }

        /// The pacer never holds a send back that both the window and the
        /// spacing would allow.
        #[test]
        fn sends_go_as_soon_as_the_window_allows(
            wishes in proptest::collection::vec(0u64..5_000, 1..100),
            requests in 1u32..10,
            period_millis in 100u64..2_000,
        ) {
            let mut wishes = wishes;
            wishes.sort_unstable();
            let grant = limit(requests, period_millis);
            let sent = drive(&[(0, grant)], &wishes);
            for (i, &(at, _)) in sent.iter().enumerate() {
                let wished = ms(wishes[i]).max(if i == 0 { Duration::ZERO } else { sent[i - 1].0 });
                if at > wished {
                    let earlier = sent[..i]
                        .iter()
                        .filter(|(t, _)| t.saturating_add(period(grant)) > at - ms(1))
                        .count();
                    let spaced = i > 0 && at == sent[i - 1].0 + spacing(grant);
                    prop_assert!(
                        spaced || earlier >= requests as usize,
                        "held back at {:?} with {} in the window", at, earlier
                    );
                }
            }
        }
    }
}
