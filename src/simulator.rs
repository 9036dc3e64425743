//! `saleslayer-operator simulate`: a stand-in for the Sales Layer API
//! (DESIGN.md §2) for the demo, the tests and the benchmarks.
//!
//! It enforces what a strict upstream enforces: at most `requests` accepted
//! requests per API key (the `X-API-KEY` header) in *any* window of length
//! `period` — a true sliding window over the instants of accepted requests,
//! not fixed buckets that allow a double burst across a boundary. Beyond the
//! limit it answers 429 with `Retry-After`. It serves a fixed, deterministic
//! catalog of [`CATALOG_SIZE`] fake products at `GET /products?page=N&pageSize=M`
//! and counts every outcome at `GET /stats`.
//!
//! What it does not simulate: real catalog content or any other endpoint,
//! key validity (every non-empty key is an account), latency, TLS, or
//! throttling by any other rule than the window.
//!
//! Checks run in this order: no key → 401; malformed query → 400; over the
//! limit → 429. A malformed request is refused before the limiter and is not
//! counted against the key's quota: a 400 then depends only on the request,
//! never on timing, so a client can tell at once that retrying it is pointless
//! (DESIGN.md §1: never retry malformed requests). Throttled requests are not
//! counted as accepted either.
//!
//! [`SlidingWindowLimiter`] is the sans-IO core: time is a parameter. The HTTP
//! layer keeps it and the counters behind one `std::sync::Mutex`, held only
//! for a lookup and never across an `.await`. API keys are never logged nor
//! echoed in responses; they appear only as map keys in `/stats`, which grows
//! with the number of distinct keys seen (acceptable for a simulator).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};

/// Header that carries the API key, as Sales Layer expects it.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Number of products in the fake catalog.
pub const CATALOG_SIZE: u64 = 1000;
/// Page size when the query gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: u32 = 500;

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

/// A limit the simulator refuses to run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--requests is 0: every request would be throttled; give at least 1")]
    ZeroRequests,
    #[error("--period-seconds is 0: no window would ever hold a request; give at least 1")]
    ZeroPeriod,
}

impl ConfigError {
    /// Stable reason string for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ZeroRequests => "ZeroRequests",
            Self::ZeroPeriod => "ZeroPeriod",
        }
    }
}

/// How long a throttled client must wait before a request can be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter {
    /// Exact time until the oldest accepted request leaves the window.
    pub wait: Duration,
}

impl RetryAfter {
    /// `wait` in whole seconds for the `Retry-After` header: rounded up, so a
    /// client that obeys it is accepted, and at least 1.
    pub fn seconds(&self) -> u64 {
        let whole = self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0);
        whole.max(1)
    }
}

/// At most `requests` accepted requests per key in any window of `period`.
///
/// Time is a parameter (`now`, measured from any fixed origin), so the
/// limiter does no I/O and tests need no sleeps.
#[derive(Debug)]
pub struct SlidingWindowLimiter {
    requests: u32,
    period: Duration,
    /// Instants of the accepted requests still in each key's window, oldest first.
    accepted: HashMap<String, VecDeque<Duration>>,
    last_sweep: Duration,
}

impl SlidingWindowLimiter {
    /// A limiter with no request seen yet.
    pub fn new(requests: u32, period: Duration) -> Self {
        Self {
            requests,
            period,
            accepted: HashMap::new(),
            last_sweep: Duration::ZERO,
        }
    }

    /// Accept the request of `key` at `now` (and count it), or say how long to wait.
    ///
    /// The window at `now` holds the accepted requests after `now - period`,
    /// so a request exactly one period after an accepted one no longer sees it.
    pub fn check(&mut self, key: &str, now: Duration) -> Result<(), RetryAfter> {
        self.sweep(now);
        if self.requests == 0 {
            return Err(RetryAfter { wait: self.period });
        }
        if let Some(window) = self.accepted.get_mut(key) {
            return admit(window, self.requests, self.period, now);
        }
        // Looked up first so the common case does not allocate a key.
        self.accepted.insert(key.to_owned(), VecDeque::from([now]));
        Ok(())
    }

    /// Keys that currently hold accepted requests (memory in use).
    pub fn tracked_keys(&self) -> usize {
        self.accepted.len()
    }

    /// Drop keys whose window has emptied. Runs at most once per period so
    /// its cost stays O(keys) per period, and a key idle for two periods
    /// holds no memory.
    fn sweep(&mut self, now: Duration) {
        if now.saturating_sub(self.last_sweep) < self.period {
            return;
        }
        let period = self.period;
        self.accepted.retain(|_, window| {
            window
                .back()
                .is_some_and(|&t| t.saturating_add(period) > now)
        });
        self.last_sweep = now;
    }
}

/// One key's decision; `requests` is at least 1.
fn admit(
    window: &mut VecDeque<Duration>,
    requests: u32,
    period: Duration,
    now: Duration,
) -> Result<(), RetryAfter> {
    // Time never goes backwards for a key: an earlier `now` (a caller's clock
    // stepping back) counts as the newest instant, which keeps the deque sorted.
    let now = window.back().map_or(now, |&newest| now.max(newest));
    while window
        .front()
        .is_some_and(|&oldest| oldest.saturating_add(period) <= now)
    {
        window.pop_front();
    }
    match window.front() {
        Some(&oldest) if window.len() >= requests as usize => Err(RetryAfter {
            wait: oldest.saturating_add(period) - now,
        }),
        _ => {
            window.push_back(now);
            Ok(())
        }
    }
}

/// One page of the fake catalog, as `GET /products` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogPage {
    pub page: u64,
    pub page_size: u32,
    pub total: u64,
    pub items: Vec<Product>,
}

/// One fake product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub sku: String,
    pub name: String,
    pub price: f64,
}

/// Page `page` (from 0) of `page_size` products; empty past the end.
pub fn catalog_page(page: u64, page_size: u32) -> CatalogPage {
    let start = page.saturating_mul(u64::from(page_size)).min(CATALOG_SIZE);
    let end = start.saturating_add(u64::from(page_size)).min(CATALOG_SIZE);
    CatalogPage {
        page,
        page_size,
        total: CATALOG_SIZE,
        items: (start..end).map(|index| product(index + 1)).collect(),
    }
}

fn product(id: u64) -> Product {
    const MATERIALS: [&str; 8] = [
        "Oak", "Steel", "Linen", "Walnut", "Cotton", "Ceramic", "Bamboo", "Leather",
    ];
    const THINGS: [&str; 8] = [
        "Chair", "Lamp", "Table", "Shelf", "Cushion", "Vase", "Stool", "Rug",
    ];
    // A fixed scramble: prices look varied but are the same on every run.
    let cents = 199 + (id * 7919) % 49_800;
    Product {
        id,
        sku: format!("SKU-{id:06}"),
        name: format!(
            "{} {} {id}",
            MATERIALS[(id % 8) as usize],
            THINGS[(id / 8 % 8) as usize]
        ),
        price: cents as f64 / 100.0,
    }
}

/// Counters since start, as `GET /stats` answers them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulatorStats {
    pub accepted: u64,
    pub throttled: u64,
    pub unauthorized: u64,
    pub bad_request: u64,
    pub by_key: BTreeMap<String, KeyStats>,
}

/// One API key's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    pub accepted: u64,
    pub throttled: u64,
}

/// The validated query of `GET /products`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageRequest {
    page: u64,
    page_size: u32,
}

/// Parse `page` and `pageSize` from a raw query string; the error is the 400 message.
fn parse_page_request(query: Option<&str>) -> Result<PageRequest, String> {
    let (mut page, mut page_size) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(name) = percent_decode(raw_name) else {
            continue;
        };
        let slot = match name.as_str() {
            "page" => &mut page,
            "pageSize" => &mut page_size,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("`{name}` is given more than once"));
        }
        let value = percent_decode(raw_value)
            .ok_or_else(|| format!("`{name}` is not valid percent-encoded UTF-8"))?;
        *slot = Some(value);
    }
    let page = match page {
        None => 0,
        Some(text) => unsigned::<u64>(&text).ok_or_else(|| {
            format!(
                "`page` must be a non-negative integer, got {:?}",
                shown(&text)
            )
        })?,
    };
    let page_size = match page_size {
        None => DEFAULT_PAGE_SIZE,
        Some(text) => unsigned::<u32>(&text)
            .filter(|size| (1..=MAX_PAGE_SIZE).contains(size))
            .ok_or_else(|| {
                format!(
                    "`pageSize` must be an integer from 1 to {MAX_PAGE_SIZE}, got {:?}",
                    shown(&text)
                )
            })?,
    };
    Ok(PageRequest { page, page_size })
}

/// Digits only: Rust's integer parsing would also take a leading `+`.
fn unsigned<T: std::str::FromStr>(text: &str) -> Option<T> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// Decode `%XX` escapes and `+` (a space in a query); `None` if malformed.
fn percent_decode(raw: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'%' => {
                let [high, low, ..] = *tail else { return None };
                let digit = |b: u8| (b as char).to_digit(16);
                bytes.push((digit(high)? * 16 + digit(low)?) as u8);
                rest = &tail[2..];
            }
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// A client's value, cut short so an error body stays small.
fn shown(text: &str) -> String {
    text.chars().take(32).collect()
}

/// The shared state of one simulator.
struct Simulator {
    clock: Arc<dyn Clock>,
    books: Mutex<Books>,
}

struct Books {
    limiter: SlidingWindowLimiter,
    stats: SimulatorStats,
}

impl Simulator {
    fn books(&self) -> MutexGuard<'_, Books> {
        // Nothing panics while the lock is held; if it ever did, counters
        // are still worth serving.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    error: &'a str,
    code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = ErrorBody {
        error: message,
        code: status.as_u16(),
        retry_after_seconds: None,
    };
    (status, Json(body)).into_response()
}

/// The simulated API: `/products`, `/stats`, and JSON errors for anything else.
pub fn router(config: SimulatorConfig) -> Router {
    router_with_clock(config, Arc::new(SystemClock::default()))
}

/// The simulated API with its window measured on `clock` (a manual clock
/// lets tests move time instead of sleeping).
pub fn router_with_clock(config: SimulatorConfig, clock: Arc<dyn Clock>) -> Router {
    let simulator = Arc::new(Simulator {
        clock,
        books: Mutex::new(Books {
            limiter: SlidingWindowLimiter::new(config.requests, config.period),
            stats: SimulatorStats::default(),
        }),
    });
    Router::new()
        .route("/products", get(products).fallback(method_not_allowed))
        .route("/stats", get(stats).fallback(method_not_allowed))
        .fallback(not_found)
        .with_state(simulator)
}

/// Serve the simulated API over HTTP on `bind` until `shutdown` resolves.
pub async fn serve(
    bind: SocketAddr,
    config: SimulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(
        bind = %listener.local_addr()?,
        requests = config.requests,
        period_ms = config.period.as_millis() as u64,
        "simulating the Sales Layer API"
    );
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn products(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let key = headers
        .get(API_KEY_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty());
    let Some(key) = key else {
        simulator.books().stats.unauthorized += 1;
        tracing::debug!(status = 401, "request without an API key");
        return error_response(
            StatusCode::UNAUTHORIZED,
            "missing, empty or non-ASCII X-API-KEY header",
        );
    };
    let request = match parse_page_request(uri.query()) {
        Ok(request) => request,
        Err(message) => {
            simulator.books().stats.bad_request += 1;
            tracing::debug!(status = 400, %message, "malformed request");
            return error_response(StatusCode::BAD_REQUEST, &message);
        }
    };
    let verdict = {
        let mut books = simulator.books();
        // Read the clock under the lock so each key sees time move forward.
        let verdict = books.limiter.check(key, simulator.clock.now());
        let stats = &mut books.stats;
        let by_key = match stats.by_key.get_mut(key) {
            Some(by_key) => by_key,
            None => stats.by_key.entry(key.to_owned()).or_default(),
        };
        if verdict.is_ok() {
            stats.accepted += 1;
            by_key.accepted += 1;
        } else {
            stats.throttled += 1;
            by_key.throttled += 1;
        }
        verdict
    };
    match verdict {
        Ok(()) => Json(catalog_page(request.page, request.page_size)).into_response(),
        Err(retry) => {
            let seconds = retry.seconds();
            tracing::debug!(status = 429, retry_after_seconds = seconds, "throttled");
            let body = ErrorBody {
                error: "rate limit exceeded for this API key",
                code: 429,
                retry_after_seconds: Some(seconds),
            };
            let retry_after = [(header::RETRY_AFTER, HeaderValue::from(seconds))];
            (StatusCode::TOO_MANY_REQUESTS, retry_after, Json(body)).into_response()
        }
    }
}

async fn stats(State(simulator): State<Arc<Simulator>>) -> Json<SimulatorStats> {
    // Clone under the lock, serialize after releasing it.
    let snapshot = simulator.books().stats.clone();
    Json(snapshot)
}

async fn method_not_allowed() -> Response {
    let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

async fn not_found(uri: Uri) -> Response {
    let message = format!("no such endpoint: {}", shown(uri.path()));
    error_response(StatusCode::NOT_FOUND, &message)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    #[test]
    fn accepts_n_in_a_window_then_throttles() {
        let mut limiter = SlidingWindowLimiter::new(3, secs(10));
        for t in [0, 1, 2] {
            assert_eq!(limiter.check("k", secs(t)), Ok(()));
        }
        assert_eq!(
            limiter.check("k", secs(3)),
            Err(RetryAfter { wait: secs(7) })
        );
    }

    #[test]
    fn the_window_slides_one_request_at_a_time() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        assert!(limiter.check("k", secs(0)).is_ok());
        assert!(limiter.check("k", secs(4)).is_ok());
        assert!(limiter.check("k", ms(9_999)).is_err());
        // Exactly one period after the first accepted request, it has left.
        assert!(limiter.check("k", secs(10)).is_ok());
        // The one at 4 s is still inside until 14 s.
        assert_eq!(
            limiter.check("k", secs(13)),
            Err(RetryAfter { wait: secs(1) })
        );
        assert!(limiter.check("k", secs(14)).is_ok());
    }

    #[test]
    fn a_full_burst_is_allowed_again_after_idle() {
        let mut limiter = SlidingWindowLimiter::new(5, secs(10));
        for _ in 0..5 {
            assert!(limiter.check("k", secs(0)).is_ok());
        }
        assert!(limiter.check("k", secs(0)).is_err());
        for _ in 0..5 {
            assert!(limiter.check("k", secs(3600)).is_ok());
        }
        assert!(limiter.check("k", secs(3600)).is_err());
    }

    #[test]
    fn throttled_requests_do_not_extend_the_window() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        assert!(limiter.check("k", secs(0)).is_ok());
        assert!(limiter.check("k", secs(0)).is_ok());
        for t in 1..10 {
            assert!(limiter.check("k", secs(t)).is_err());
        }
        // Both slots free up at 10 s despite the nine throttled attempts.
        assert!(limiter.check("k", secs(10)).is_ok());
        assert!(limiter.check("k", secs(10)).is_ok());
        assert!(limiter.check("k", secs(10)).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut limiter = SlidingWindowLimiter::new(1, secs(10));
        assert!(limiter.check("a", secs(0)).is_ok());
        assert!(limiter.check("a", secs(1)).is_err());
        assert!(limiter.check("b", secs(1)).is_ok());
        assert!(limiter.check("b", secs(2)).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_at_least_one() {
        let wait = |wait| RetryAfter { wait }.seconds();
        assert_eq!(wait(secs(10)), 10);
        assert_eq!(wait(ms(9_500)), 10);
        assert_eq!(wait(ms(9_001)), 10);
        assert_eq!(wait(Duration::from_nanos(1)), 1);
        assert_eq!(wait(Duration::ZERO), 1);

        let mut limiter = SlidingWindowLimiter::new(1, ms(300));
        assert!(limiter.check("k", ms(0)).is_ok());
        let retry = limiter.check("k", ms(100)).unwrap_err();
        assert_eq!((retry.wait, retry.seconds()), (ms(200), 1));
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        for key in ["a", "b", "c"] {
            assert!(limiter.check(key, secs(0)).is_ok());
        }
        assert_eq!(limiter.tracked_keys(), 3);
        assert!(limiter.check("a", secs(25)).is_ok());
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[test]
    fn time_going_backwards_never_admits_more() {
        let mut limiter = SlidingWindowLimiter::new(2, secs(10));
        assert!(limiter.check("k", secs(5)).is_ok());
        assert!(limiter.check("k", secs(1)).is_ok());
        assert!(limiter.check("k", secs(0)).is_err());
        assert!(limiter.check("k", secs(14)).is_err());
        assert!(limiter.check("k", secs(15)).is_ok());
    }

    #[test]
    fn zero_requests_throttles_everything_without_keeping_keys() {
        let mut limiter = SlidingWindowLimiter::new(0, secs(10));
        assert_eq!(
            limiter.check("k", secs(0)),
            Err(RetryAfter { wait: secs(10) })
        );
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[test]
    fn config_rejects_zero_requests_and_zero_period() {
        assert_eq!(SimulatorConfig::default().validate(), Ok(()));
        let zero_requests = SimulatorConfig {
            requests: 0,
            ..SimulatorConfig::default()
        };
        assert_eq!(zero_requests.validate(), Err(ConfigError::ZeroRequests));
        let zero_period = SimulatorConfig {
            period: Duration::ZERO,
            ..SimulatorConfig::default()
        };
        assert_eq!(
            zero_period.validate().map_err(|e| e.reason()),
            Err("ZeroPeriod")
        );
    }

    proptest! {
        #[test]
        fn never_more_than_n_in_any_window(
            requests in 1u32..8,
            period_ms in 1u64..3_000,
            mut times in vec(0u64..10_000, 0..200),
        ) {
            times.sort_unstable();
            let n = requests as usize;
            let mut limiter = SlidingWindowLimiter::new(requests, ms(period_ms));
            let mut accepted: Vec<u64> = Vec::new();
            for &t in &times {
                // Accepted requests in (t - period, t].
                let recent = accepted.iter().filter(|&&a| a + period_ms > t).count();
                match limiter.check("k", ms(t)) {
                    Ok(()) => {
                        prop_assert!(recent < n, "accepted at {t} with {recent} in the window");
                        accepted.push(t);
                    }
                    Err(retry) => {
                        prop_assert_eq!(recent, n, "throttled at {} with {} in the window", t, recent);
                        let oldest = accepted[accepted.len() - n];
                        prop_assert_eq!(retry.wait, ms(oldest + period_ms - t));
                    }
                }
            }
            for &start in &accepted {
                let inside = accepted.iter().filter(|&&a| a >= start && a < start + period_ms).count();
                prop_assert!(inside <= n, "{inside} accepted in [{start}, {start}+{period_ms})");
            }
        }

        #[test]
        fn keys_never_affect_each_other(
            requests in 1u32..5,
            period_ms in 1u64..2_000,
            mut calls in vec((0u64..5_000, 0usize..3), 0..150),
        ) {
            calls.sort_unstable();
            let keys = ["a", "b", "c"];
            let mut shared = SlidingWindowLimiter::new(requests, ms(period_ms));
            let mut alone: Vec<_> = keys
                .iter()
                .map(|_| SlidingWindowLimiter::new(requests, ms(period_ms)))
                .collect();
            for (t, key) in calls {
                prop_assert_eq!(
                    shared.check(keys[key], ms(t)),
                    alone[key].check(keys[key], ms(t))
                );
            }
        }
    }

    #[test]
    fn pages_parse_with_defaults_and_percent_encoding() {
        let parse = parse_page_request;
        let page = |page, page_size| Ok(PageRequest { page, page_size });
        assert_eq!(parse(None), page(0, 50));
        assert_eq!(parse(Some("")), page(0, 50));
        assert_eq!(parse(Some("page=3&pageSize=20")), page(3, 20));
        assert_eq!(parse(Some("pageSize=500&other=x&&page=0")), page(0, 500));
        assert_eq!(parse(Some("pag%65=%31%32")), page(12, 50));
        assert_eq!(parse(Some("page=18446744073709551615")), page(u64::MAX, 50));
    }

    #[test]
    fn malformed_pages_are_refused() {
        for query in [
            "page=abc",
            "page=-1",
            "page=1.5",
            "page=",
            "page",
            "page=%zz",
            "page=%4",
            "page=%2B1",
            "page=1&page=2",
            "pageSize=0",
            "pageSize=501",
            "pageSize=abc",
            "pageSize=99999999999",
        ] {
            assert!(parse_page_request(Some(query)).is_err(), "{query}");
        }
        let long = format!("page={}", "x".repeat(1000));
        assert!(parse_page_request(Some(&long)).unwrap_err().len() < 100);
    }

    #[test]
    fn the_catalog_is_paginated_and_deterministic() {
        let first = catalog_page(0, 50);
        assert_eq!((first.total, first.items.len()), (1000, 50));
        assert_eq!(first.items[0].sku, "SKU-000001");
        assert_eq!(first, catalog_page(0, 50));
        let third = catalog_page(2, 10);
        let ids: Vec<u64> = third.items.iter().map(|p| p.id).collect();
        assert_eq!(ids, (21..=30).collect::<Vec<_>>());
        assert_eq!(catalog_page(6, 150).items.len(), 100);
        assert!(catalog_page(7, 150).items.is_empty());
        assert!(catalog_page(u64::MAX, 500).items.is_empty());
        let last = &catalog_page(1, 500).items[499];
        assert_eq!((last.id, last.sku.as_str()), (1000, "SKU-001000"));
        assert!(
            catalog_page(0, 500)
                .items
                .iter()
                .all(|p| p.price > 1.0 && p.price < 500.0)
        );
    }

    async fn spawn(config: SimulatorConfig) -> (String, reqwest::Client) {
        // reqwest is built without a default TLS provider; plain HTTP still needs one installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move { axum::serve(listener, router(config)).await });
        (format!("http://{addr}"), reqwest::Client::new())
    }

    async fn get(
        http: &reqwest::Client,
        url: &str,
        key: Option<&str>,
    ) -> (u16, Option<String>, serde_json::Value) {
        let mut request = http.get(url);
        if let Some(key) = key {
            request = request.header("X-API-KEY", key);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ASCII header").to_owned());
        (
            status,
            retry_after,
            response.json().await.expect("JSON body"),
        )
    }

    /// A limit no test reaches by waiting: every throttle is deterministic.
    fn hour_limit(requests: u32) -> SimulatorConfig {
        SimulatorConfig {
            requests,
            period: secs(3600),
        }
    }

    #[tokio::test]
    async fn requests_without_a_key_are_unauthorized() {
        let (base, http) = spawn(hour_limit(5)).await;
        for key in [None, Some(""), Some("   ")] {
            let (status, _, body) = get(&http, &format!("{base}/products"), key).await;
            assert_eq!(
                (status, &body["code"]),
                (401, &serde_json::json!(401)),
                "{key:?}"
            );
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("X-API-KEY"))
            );
        }
    }

    #[tokio::test]
    async fn malformed_pages_are_bad_requests() {
        let (base, http) = spawn(hour_limit(5)).await;
        for query in ["page=abc", "page=-1", "pageSize=0", "pageSize=501"] {
            let (status, _, body) =
                get(&http, &format!("{base}/products?{query}"), Some("k")).await;
            assert_eq!(
                (status, &body["code"]),
                (400, &serde_json::json!(400)),
                "{query}"
            );
        }
    }

    #[tokio::test]
    async fn products_come_back_paginated() {
        let (base, http) = spawn(hour_limit(5)).await;
        let (status, _, body) = get(
            &http,
            &format!("{base}/products?page=2&pageSize=10"),
            Some("k"),
        )
        .await;
        assert_eq!(status, 200);
        let page: CatalogPage = serde_json::from_value(body).expect("a catalog page");
        assert_eq!(page, catalog_page(2, 10));
        assert_eq!(page.items[0].sku, "SKU-000021");
        let (_, _, body) = get(&http, &format!("{base}/products"), Some("k")).await;
        assert_eq!((&body["page"], &body["pageSize"]), (&0.into(), &50.into()));
        assert_eq!(body["items"].as_array().map(Vec::len), Some(50));
        let (status, _, body) = get(&http, &format!("{base}/products?page=99"), Some("k")).await;
        assert_eq!(
            (status, body["items"].as_array().map(Vec::len)),
            (200, Some(0))
        );
    }

    #[tokio::test]
    async fn over_the_limit_is_429_with_retry_after_and_stats_count_it() {
        let (base, http) = spawn(hour_limit(3)).await;
        let products = format!("{base}/products");
        for _ in 0..3 {
            assert_eq!(get(&http, &products, Some("alpha")).await.0, 200);
        }
        let (status, retry_after, body) = get(&http, &products, Some("alpha")).await;
        assert_eq!(status, 429);
        assert_eq!(retry_after.as_deref(), Some("3600"));
        assert_eq!(
            (&body["code"], &body["retryAfterSeconds"]),
            (&429.into(), &3600.into())
        );
        // A malformed request is still a 400 when throttled, and costs nothing.
        let (status, _, _) = get(&http, &format!("{products}?page=abc"), Some("alpha")).await;
        assert_eq!(status, 400);
        // Another key has its own budget.
        assert_eq!(get(&http, &products, Some("beta")).await.0, 200);
        assert_eq!(get(&http, &products, None).await.0, 401);

        let (status, _, body) = get(&http, &format!("{base}/stats"), None).await;
        assert_eq!(status, 200);
        let stats: SimulatorStats = serde_json::from_value(body.clone()).expect("stats");
        let expected = SimulatorStats {
            accepted: 4,
            throttled: 1,
            unauthorized: 1,
            bad_request: 1,
            by_key: BTreeMap::from([
                (
                    "alpha".into(),
                    KeyStats {
                        accepted: 3,
                        throttled: 1,
                    },
                ),
                (
                    "beta".into(),
                    KeyStats {
                        accepted: 1,
                        throttled: 0,
                    },
                ),
            ]),
        };
        assert_eq!(stats, expected);
        assert_eq!(body["badRequest"], 1, "camelCase on the wire: {body}");
        assert_eq!(body["byKey"]["alpha"]["throttled"], 1, "{body}");
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_answer_json() {
        let (base, http) = spawn(hour_limit(5)).await;
        let (status, _, body) = get(&http, &format!("{base}/orders"), Some("k")).await;
        assert_eq!((status, &body["code"]), (404, &404.into()));
        let response = http
            .post(format!("{base}/products"))
            .header("X-API-KEY", "k")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 405);
        assert_eq!(response.headers()["allow"], "GET, HEAD");
        let body: serde_json::Value = response.json().await.expect("JSON body");
        assert_eq!(body["code"], 405);
    }

    #[tokio::test]
    async fn serve_stops_on_shutdown_and_refuses_a_zero_limit() {
        let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let served = tokio::time::timeout(secs(5), serve(bind, hour_limit(5), async {})).await;
        assert!(matches!(served, Ok(Ok(()))), "{served:?}");
        let refused = serve(bind, hour_limit(0), async {}).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
        assert!(refused.to_string().contains("--requests"), "{refused}");
    }
}
