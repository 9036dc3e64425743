//! `saleslayer-operator simulate`: a stand-in for the Sales Layer API
//! (DESIGN.md §2) for the demo, the tests and the benchmarks. It is the one
//! simulated part of the project, so it speaks the vendor's documented shape,
//! the Catalog REST API v2:
//!
//! ```text
//! GET  /catalog/rest/Catalog/{Products,Variants,Categories}?$top&$skip&$skipToken&$count&$select
//!        → 200 {"value":[…],"@count":N,"@nextLink":"…"}
//! POST /catalog/rest/Catalog/Products → 201 + Location
//! GET  /catalog/rest/Catalog/$metadata, …/Products/$metadata
//! 401 ProblemDetails {"type","title","status","detail","instance"}
//! 400 {"validationFailures":{"field":["message"]}}
//! GET  /stats                       every outcome counted, by key
//! GET|PUT /admin/limit              the limit, changed at run time
//! GET|PUT /admin/consumers          outside consumers of a key
//! ```
//!
//! It enforces what a strict upstream enforces: at most `requests` accepted
//! requests per API key (`X-API-KEY`) in *any* window of `period`
//! ([`limiter`]). Sales Layer documents the limit but not how throttling is
//! signalled, so the signal is an option ([`ThrottleSignal`]: the status,
//! 429 by default, and whether `Retry-After` is sent). The catalog is fixed
//! and deterministic ([`catalog`]): thousands of products, never changed by
//! a POST. For issue 13 an outside consumer (someone the cluster does not
//! know, sending with the same key) and a limit that changes at run time can
//! be set by flag or admin route ([`consumer`]); the admin routes take no key
//! and are for tests, benchmarks and the demo only.
//!
//! What it does not simulate: `$filter`, `$orderby`, `$expand` (400, never a
//! silently unfiltered list), key validity (every non-empty key is an
//! account), latency, TLS. API keys are never logged nor echoed; they appear
//! only as map keys in `/stats`, the first [`api::MAX_COUNTED_KEYS`] of them.
//! Every server it runs has a header-read timeout and a connection cap
//! ([`saleslayer_runtime::serve`]); every counter saturates.
//!
//! May import: the shared runtime, axum, serde. Never: a Kubernetes client,
//! the operator's code.
#![forbid(unsafe_code)]

pub mod api;
pub mod catalog;
pub mod consumer;
pub mod limiter;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use clap::Args;
use serde::{Deserialize, Serialize};

pub use catalog::{BASE_PATH, Collection, MAX_TOP, PRODUCTS};
pub use limiter::{RetryAfter, SlidingWindowLimiter};
use saleslayer_runtime::clock::{Clock, SystemClock};
use saleslayer_runtime::serve::ServeLimits;

/// Header that carries the API key, as Sales Layer expects it.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The path of the product list.
pub const PRODUCTS_PATH: &str = "/catalog/rest/Catalog/Products";

/// The limit the simulator enforces per API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatorConfig {
    /// Requests accepted per key in any window of `period`.
    pub requests: u32,
    /// Length of the sliding window.
    pub period: Duration,
}

impl Default for SimulatorConfig {
    /// Sales Layer's documented limit: 50 requests per 10 seconds.
    fn default() -> Self {
        Self {
            requests: 50,
            period: Duration::from_secs(10),
        }
    }
}

impl SimulatorConfig {
    /// Refuse limits that would make the simulator meaningless.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.requests == 0 {
            return Err(ConfigError::ZeroRequests);
        }
        if self.period.is_zero() {
            return Err(ConfigError::ZeroPeriod);
        }
        Ok(())
    }
}

/// How the simulator says "throttled": the vendor documents no code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSignal {
    /// The status of a throttled answer (400–599).
    pub status: u16,
    /// Whether it carries `Retry-After` (whole seconds until a request fits).
    pub retry_after: bool,
}

impl Default for ThrottleSignal {
    /// 429 with `Retry-After`.
    fn default() -> Self {
        Self {
            status: 429,
            retry_after: true,
        }
    }
}

/// Everything a simulator runs with beyond its limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimulatorOptions {
    pub signal: ThrottleSignal,
    /// An outside consumer from the start: `(key, requests per period)`.
    pub outside: Option<(String, u32)>,
    /// Header-read timeout and connection cap of its server.
    pub serve: ServeLimits,
}

/// A setting the simulator refuses to run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--requests is 0: every request would be throttled; give at least 1")]
    ZeroRequests,
    #[error("--period-seconds is 0: no window would ever hold a request; give at least 1")]
    ZeroPeriod,
    #[error("--throttle-status {0} is not an error status; give one from 400 to 599")]
    ThrottleStatus(u16),
    #[error("--outside-requests is set without --outside-key (or the other way round)")]
    OutsideHalf,
}

impl ConfigError {
    /// Stable reason string for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ZeroRequests => "ZeroRequests",
            Self::ZeroPeriod => "ZeroPeriod",
            Self::ThrottleStatus(_) => "ThrottleStatus",
            Self::OutsideHalf => "OutsideHalf",
        }
    }
}

/// Counters since start, as `GET /stats` answers them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulatorStats {
    /// API requests accepted (the outside consumers' excepted).
    pub accepted: u64,
    /// API requests throttled.
    pub throttled: u64,
    pub unauthorized: u64,
    pub bad_request: u64,
    pub by_key: BTreeMap<String, KeyStats>,
    /// Products created by POST.
    #[serde(default)]
    pub created: u64,
    /// What the outside consumers sent.
    #[serde(default)]
    pub outside: KeyStats,
}

/// One API key's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    pub accepted: u64,
    pub throttled: u64,
}

/// `saleslayer-operator simulate`'s flags (each also read from its
/// `SALESLAYER_SIMULATE_*` variable).
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Address to serve the simulated API on.
    #[arg(
        long,
        env = "SALESLAYER_SIMULATE_BIND",
        default_value = "127.0.0.1:8090"
    )]
    pub bind: SocketAddr,
    /// Requests allowed per API key in any window of the period.
    #[arg(long, env = "SALESLAYER_SIMULATE_REQUESTS", default_value_t = 50)]
    pub requests: u32,
    /// Length of the window in seconds.
    #[arg(long, env = "SALESLAYER_SIMULATE_PERIOD_SECONDS", default_value_t = 10)]
    pub period_seconds: u32,
    /// The status of a throttled answer (Sales Layer documents none).
    #[arg(
        long,
        env = "SALESLAYER_SIMULATE_THROTTLE_STATUS",
        default_value_t = 429
    )]
    pub throttle_status: u16,
    /// Whether a throttled answer carries `Retry-After`.
    #[arg(long, env = "SALESLAYER_SIMULATE_RETRY_AFTER", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    pub retry_after: bool,
    /// An outside consumer from the start: this API key ...
    #[arg(long, env = "SALESLAYER_SIMULATE_OUTSIDE_KEY")]
    pub outside_key: Option<String>,
    /// ... sending this many requests per period, evenly spread.
    #[arg(long, env = "SALESLAYER_SIMULATE_OUTSIDE_REQUESTS")]
    pub outside_requests: Option<u32>,
    /// Connections served at once.
    #[arg(
        long,
        env = "SALESLAYER_SIMULATE_MAX_CONNECTIONS",
        default_value_t = 256
    )]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers.
    #[arg(
        long,
        env = "SALESLAYER_SIMULATE_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    pub header_read_timeout_seconds: u64,
}

fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{text:?}: give on or off")),
    }
}

impl SimulateArgs {
    /// The limit and the options these flags ask for.
    pub fn settings(&self) -> Result<(SimulatorConfig, SimulatorOptions), ConfigError> {
        let config = SimulatorConfig {
            requests: self.requests,
            period: Duration::from_secs(self.period_seconds.into()),
        };
        config.validate()?;
        if !(400..=599).contains(&self.throttle_status) {
            return Err(ConfigError::ThrottleStatus(self.throttle_status));
        }
        let outside = match (&self.outside_key, self.outside_requests) {
            (Some(key), Some(requests)) => Some((key.clone(), requests)),
            (None, None) => None,
            _ => return Err(ConfigError::OutsideHalf),
        };
        let options = SimulatorOptions {
            signal: ThrottleSignal {
                status: self.throttle_status,
                retry_after: self.retry_after,
            },
            outside,
            serve: ServeLimits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds.max(1)),
                max_connections: self.max_connections.max(1),
                keep_alive: true,
            },
        };
        Ok((config, options))
    }
}

/// The simulated API with the default options on the real clock.
pub fn router(config: SimulatorConfig) -> Router {
    router_with_clock(config, Arc::new(SystemClock::default()))
}

/// The simulated API with its window measured on `clock` (a manual clock
/// lets tests move time instead of sleeping).
pub fn router_with_clock(config: SimulatorConfig, clock: Arc<dyn Clock>) -> Router {
    router_with(config, &SimulatorOptions::default(), clock)
}

/// The simulated API with `options`, on `clock`.
pub fn router_with(
    config: SimulatorConfig,
    options: &SimulatorOptions,
    clock: Arc<dyn Clock>,
) -> Router {
    let simulator = Arc::new(api::Simulator::new(config, options.signal, clock));
    if let Some((key, requests)) = &options.outside
        && let Err(error) = simulator.set_consumer(key, *requests)
    {
        tracing::warn!(%error, "no outside consumer");
    }
    api::router(simulator)
}

/// Serve the simulated API with the default options on `bind` until
/// `shutdown` resolves.
pub async fn serve(
    bind: SocketAddr,
    config: SimulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(bind, config, SimulatorOptions::default(), shutdown).await
}

/// Serve the simulated API with `options` on `bind` until `shutdown` resolves.
pub async fn serve_with(
    bind: SocketAddr,
    config: SimulatorConfig,
    options: SimulatorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let invalid = |error: ConfigError| std::io::Error::new(std::io::ErrorKind::InvalidInput, error);
    config.validate().map_err(invalid)?;
    if !(400..=599).contains(&options.signal.status) {
        return Err(invalid(ConfigError::ThrottleStatus(options.signal.status)));
    }
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(
        bind = %listener.local_addr()?,
        requests = config.requests,
        period_ms = config.period.as_millis() as u64,
        throttle_status = options.signal.status,
        retry_after = options.signal.retry_after,
        outside_requests = options.outside.as_ref().map(|(_, n)| *n),
        "simulating the Sales Layer Catalog REST API v2"
    );
    let app = router_with(config, &options, Arc::new(SystemClock::default()));
    saleslayer_runtime::serve::serve(listener, app, options.serve, shutdown).await
}

/// `simulate`: serve what `args` ask for until `shutdown` resolves.
pub async fn run(
    args: SimulateArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (config, options) = args
        .settings()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    serve_with(args.bind, config, options, shutdown).await
}

#[cfg(test)]
mod tests;
