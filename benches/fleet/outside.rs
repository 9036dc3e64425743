//! Scenario (d) of the fleet benchmark (issue 13): an outside consumer.
//!
//! Someone the cluster does not know (a person in the UI, another system)
//! starts sending 30 % of the limit with the account's key after
//! `FLEET_OUTSIDE_BEFORE` periods (default 20), keeps it up for
//! `FLEET_OUTSIDE_DURING` periods (default 60), stops, and the run goes on for
//! `FLEET_OUTSIDE_AFTER` periods (default 60). The simulator plays the
//! consumer (its admin endpoint `PUT /admin/consumers`) against the same
//! sliding window as the fleet. Four variants, one after the other on fresh
//! simulators: no coordination, the static split, leases with the account's
//! adaptation off, and leases with it on (the defaults: a throttled window
//! cuts to what got through, by at most 30 %; +1 per clean one, held below
//! the throttled level for 30 windows; never below 25 %).
//!
//! Reported per variant, from the simulator's counts once per period (a
//! window):
//! - the fleet's 429s per minute while the consumer runs;
//! - the windows from its start until the 429s stop (the first window that
//!   starts a run of [`CLEAN_RUN`] clean windows, or the rest of the phase);
//! - the share of what the consumer leaves (the limit less what it got
//!   through) that the fleet uses while it runs;
//! - the time from its stop until the fleet serves ≥ 95 % of usable again
//!   (over two windows, held for [`HELD`] windows).
//!
//! Each variant ends with a `BENCH {json}` line.

use std::time::{Duration, Instant};

use anyhow::Context;
use kube::Api;
use kube::api::{Patch, PatchParams};
use saleslayer_core::api::SalesLayerAccount;
use serde_json::json;

use super::{
    API_KEY, LIMIT, Measured, Setup, Sidecars, USABLE, env_u64, load_average, start_scenario, stats,
};

/// The consumer's share of the limit.
const OUTSIDE_PERCENT: u32 = 30;

/// Clean windows in a row that count as "the 429s stopped".
const CLEAN_RUN: usize = 10;

/// Windows a recovered rate must hold.
const HELD: usize = 3;

/// The simulator's counts at the end of each window.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    served: u64,
    throttled: u64,
    outside_served: u64,
    /// The account's `status.effective` as the window ends.
    effective: u64,
}

/// Run the four variants; their figures, one JSON object each.
pub(super) async fn run(
    setup: Setup<'_>,
    leases: &dyn Fn() -> Sidecars,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let before = env_u64("FLEET_OUTSIDE_BEFORE", 20)?.max(1);
    let during = env_u64("FLEET_OUTSIDE_DURING", 60)?.max(1);
    let after = env_u64("FLEET_OUTSIDE_AFTER", 60)?.max(1);
    let phases = Phases {
        before: usize::try_from(before).context("FLEET_OUTSIDE_BEFORE")?,
        during: usize::try_from(during).context("FLEET_OUTSIDE_DURING")?,
        after: usize::try_from(after).context("FLEET_OUTSIDE_AFTER")?,
    };
    let outside = LIMIT * OUTSIDE_PERCENT / 100;
    println!(
        "(d) outside consumer: {outside} of the limit's {LIMIT} per period with the same key, \
         from period {before} for {during} periods, then {after} periods without it"
    );
    let mut figures = Vec::new();
    let variants: [(&str, Sidecars, Option<bool>); 4] = [
        ("(d) no coordination", Sidecars::None, None),
        ("(d) static split", Sidecars::Static(None), None),
        ("(d) leases, adaptation off", leases(), Some(false)),
        ("(d) leases, adaptation on", leases(), Some(true)),
    ];
    println!(
        "| (d) variant | 429s/min while it runs | windows until 429s stop | share of what is left used | back to ≥ 95 % of usable after it stops | served ÷ usable, whole run | operator's API writes/min |"
    );
    println!("|---|---|---|---|---|---|---|");
    // FLEET_OUTSIDE_VARIANTS=4 runs the last variant alone (1-based, comma-separated).
    let chosen: Option<Vec<usize>> = std::env::var("FLEET_OUTSIDE_VARIANTS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    for (index, (name, sidecars, adaptive)) in variants.into_iter().enumerate() {
        if chosen.as_ref().is_some_and(|c| !c.contains(&(index + 1))) {
            continue;
        }
        if let Some(enabled) = adaptive {
            adapt(setup.client, enabled).await?;
        }
        let figure = variant(name, setup, sidecars, phases, outside).await?;
        figures.push(figure);
    }
    // The other scenarios measure against a fixed budget.
    adapt(setup.client, false).await?;
    println!("load average after (d): {}", load_average());
    Ok(figures)
}

#[derive(Debug, Clone, Copy)]
struct Phases {
    before: usize,
    during: usize,
    after: usize,
}

/// Turn the account's adaptation on or off.
async fn adapt(client: &kube::Client, enabled: bool) -> anyhow::Result<()> {
    let patch = json!({"spec": {"adaptive": {"enabled": enabled}}});
    Api::<SalesLayerAccount>::all(client.clone())
        .patch("acme-prod", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("turning the account's adaptation on or off")?;
    Ok(())
}

/// One variant: run it, start and stop the consumer on time, count each window.
async fn variant(
    name: &str,
    setup: Setup<'_>,
    sidecars: Sidecars,
    phases: Phases,
    outside: u32,
) -> anyhow::Result<serde_json::Value> {
    let period = setup.period;
    let windows = phases.before + phases.during + phases.after;
    let setup = Setup {
        length: period * u32::try_from(windows).context("too many periods")?,
        ..setup
    };
    let (window, running) = start_scenario(name, setup, sidecars).await?;
    let started = Instant::now();
    let early = stats(&running.simulator).await?;
    let admin = reqwest::Client::new();
    let consumers = format!("{}/admin/consumers", running.simulator);
    let accounts = Api::<SalesLayerAccount>::all(setup.client.clone());
    let mut counts = vec![Count::default()];
    for n in 1..=windows {
        if n - 1 == phases.before || n - 1 == phases.before + phases.during {
            let requests = if n - 1 == phases.before { outside } else { 0 };
            admin
                .put(&consumers)
                .json(&json!({"key": API_KEY, "requests": requests}))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .context("setting the outside consumer")?;
        }
        let end = started + period * u32::try_from(n).context("window")?;
        tokio::time::sleep_until(end.into()).await;
        let now = stats(&running.simulator).await?;
        let effective = accounts
            .get_status("acme-prod")
            .await
            .context("reading the account's status")?
            .status
            .and_then(|status| status.effective)
            .map_or(0, |effective| u64::from(effective.requests));
        counts.push(Count {
            served: now.accepted.saturating_sub(early.accepted),
            throttled: now.throttled.saturating_sub(early.throttled),
            outside_served: now.outside.accepted.saturating_sub(early.outside.accepted),
            effective,
        });
    }
    let measured = window.measure(&running, &early, started).await?;
    running.stop();
    let figures = Figures::of(&counts, phases, period);
    // The windows shown: from two before the consumer's start, fifteen on.
    let shown = phases.before.saturating_sub(2)..(phases.before + 15).min(counts.len() - 1);
    let per_window = |what: fn(&Count) -> u64| -> Vec<u64> {
        shown
            .clone()
            .map(|i| what(&counts[i + 1]) - what(&counts[i]))
            .collect()
    };
    let effective: Vec<u64> = shown.clone().map(|i| counts[i + 1].effective).collect();
    println!(
        "  {name}: windows {}.. around the consumer's start: served {:?}, throttled {:?}, \
         the account's effective at each end {:?}",
        phases.before.saturating_sub(2),
        per_window(|c| c.served),
        per_window(|c| c.throttled),
        effective
    );
    Ok(report(&measured, &figures, period))
}

/// What one variant measured.
struct Figures {
    throttled_per_minute: f64,
    windows_until_stop: Option<usize>,
    share_of_left_used: f64,
    windows_back: Option<usize>,
}

impl Figures {
    fn of(counts: &[Count], phases: Phases, period: Duration) -> Self {
        // Per window: the difference of the counts at its two ends.
        let window = |i: usize, what: fn(&Count) -> u64| what(&counts[i + 1]) - what(&counts[i]);
        let during = phases.before..phases.before + phases.during;
        let throttled: Vec<u64> = during.clone().map(|i| window(i, |c| c.throttled)).collect();
        let minutes = period.as_secs_f64() * phases.during as f64 / 60.0;
        let throttled_per_minute = throttled.iter().sum::<u64>() as f64 / minutes;
        let windows_until_stop = (0..throttled.len()).find(|&start| {
            let run = &throttled[start..(start + CLEAN_RUN).min(throttled.len())];
            run.iter().all(|&t| t == 0)
        });
        let served: u64 = during.clone().map(|i| window(i, |c| c.served)).sum();
        let outside_served: u64 = during.map(|i| window(i, |c| c.outside_served)).sum();
        let left = (u64::from(LIMIT) * phases.during as u64).saturating_sub(outside_served);
        let share_of_left_used = served as f64 / left.max(1) as f64;
        // After the stop: served over two windows against usable, held.
        let first_after = phases.before + phases.during;
        let full = 0.95 * f64::from(USABLE);
        let recovered = |i: usize| {
            i >= 1 && (window(i - 1, |c| c.served) + window(i, |c| c.served)) as f64 / 2.0 >= full
        };
        let last = counts.len() - 2;
        let windows_back = (first_after..=last)
            .find(|&i| (i..(i + HELD).min(last + 1)).all(recovered))
            .map(|i| i - first_after);
        Self {
            throttled_per_minute,
            windows_until_stop,
            share_of_left_used,
            windows_back,
        }
    }
}

/// Print the variant's row and `BENCH` line; its JSON.
fn report(measured: &Measured, figures: &Figures, period: Duration) -> serde_json::Value {
    let usable_per_second = f64::from(USABLE) / period.as_secs_f64();
    let utilisation = measured.stats.accepted as f64 / measured.seconds / usable_per_second;
    let show = |windows: Option<usize>| {
        windows.map_or_else(
            || "not within the phase".to_owned(),
            |w| format!("{w} ({:.0} s)", period.as_secs_f64() * w as f64),
        )
    };
    println!(
        "| {} | {:.1} | {} | {:.1} % | {} | {:.1} % | {:.1} |",
        measured.name,
        figures.throttled_per_minute,
        show(figures.windows_until_stop),
        100.0 * figures.share_of_left_used,
        show(figures.windows_back),
        100.0 * utilisation,
        measured.writes_per_minute(),
    );
    let seconds = |windows: Option<usize>| windows.map(|w| period.as_secs_f64() * w as f64);
    let line = json!({
        "scenario": measured.name,
        "served": measured.stats.accepted,
        "throttled": measured.stats.throttled,
        "utilisation": utilisation,
        "throttled_per_minute_while_outside": figures.throttled_per_minute,
        "windows_until_429s_stop": figures.windows_until_stop,
        "share_of_left_used": figures.share_of_left_used,
        "windows_back_to_full_budget": figures.windows_back,
        "seconds_back_to_full_budget": seconds(figures.windows_back),
        "outside_served": measured.stats.outside.accepted,
        "outside_throttled": measured.stats.outside.throttled,
        "api_writes_per_minute": measured.writes_per_minute(),
        "api_writes_by_resource": measured.writes,
    });
    println!("BENCH {line}");
    line
}
