//! The HTTP layer: Sales Layer's routes under [`BASE_PATH`], `/stats` and
//! the admin routes. It decodes, asks [`catalog`](crate::catalog) and the
//! limiter, counts, and encodes; it decides nothing else.
//!
//! Checks run in this order: no key → 401; unknown collection → 404;
//! malformed query or body → 400; over the limit → the throttle signal. A
//! malformed request is refused before the limiter and costs no quota: a 400
//! then depends only on the request, never on timing, so a client can tell
//! at once that retrying it is pointless (DESIGN.md §1). Throttled requests
//! are not counted as accepted either.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::catalog::{self, BASE_PATH, Collection, ValidationFailures, shown};
use crate::consumer::OutsideConsumer;
use crate::limiter::{RetryAfter, SlidingWindowLimiter};
use crate::{API_KEY_HEADER, SimulatorConfig, SimulatorStats, ThrottleSignal};
use saleslayer_runtime::clock::Clock;

/// Distinct API keys counted one by one in `/stats`; the rest under [`OTHER_KEYS`].
pub const MAX_COUNTED_KEYS: usize = 1_000;
/// The `/stats` entry of keys past [`MAX_COUNTED_KEYS`].
pub const OTHER_KEYS: &str = "(other keys)";
/// Outside consumers at once.
pub const MAX_CONSUMERS: usize = 16;
/// Longest API key accepted.
const MAX_KEY_LEN: usize = 256;
/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// The shared state of one simulator.
pub struct Simulator {
    pub clock: Arc<dyn Clock>,
    pub signal: ThrottleSignal,
    books: Mutex<Books>,
}

struct Books {
    limiter: SlidingWindowLimiter,
    stats: SimulatorStats,
    consumers: BTreeMap<String, OutsideConsumer>,
    created: u64,
}

impl Simulator {
    pub fn new(config: SimulatorConfig, signal: ThrottleSignal, clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            signal,
            books: Mutex::new(Books {
                limiter: SlidingWindowLimiter::new(config.requests, config.period),
                stats: SimulatorStats::default(),
                consumers: BTreeMap::new(),
                created: 0,
            }),
        }
    }

    /// The books, with every outside consumer's sends due by now played.
    fn books(&self) -> MutexGuard<'_, Books> {
        // Nothing panics while the lock is held; if it ever did, counters
        // are still worth serving.
        let mut books = self.books.lock().unwrap_or_else(PoisonError::into_inner);
        // Read the clock under the lock so each key sees time move forward.
        let now = self.clock.now();
        let Books {
            limiter,
            stats,
            consumers,
            ..
        } = &mut *books;
        for (key, consumer) in consumers.iter_mut() {
            for at in consumer.due(now) {
                let counter = match limiter.check(key, at) {
                    Ok(()) => &mut stats.outside.accepted,
                    Err(_) => &mut stats.outside.throttled,
                };
                *counter = counter.saturating_add(1);
            }
        }
        books
    }

    /// Start (or replace) the outside consumer of `key`; 0 requests stops it.
    pub fn set_consumer(&self, key: &str, requests: u32) -> Result<(), String> {
        let mut books = self.books();
        if requests == 0 {
            books.consumers.remove(key);
            return Ok(());
        }
        if !books.consumers.contains_key(key) && books.consumers.len() >= MAX_CONSUMERS {
            return Err(format!("at most {MAX_CONSUMERS} outside consumers"));
        }
        let (_, period) = books.limiter.limit();
        let consumer = OutsideConsumer::new(requests, period, self.clock.now());
        books.consumers.insert(key.to_owned(), consumer);
        Ok(())
    }

    /// Accept one request of `key` now, or say how long to wait; counted.
    fn admit(&self, key: &str) -> Result<(), RetryAfter> {
        let mut books = self.books();
        let now = self.clock.now();
        let verdict = books.limiter.check(key, now);
        let stats = &mut books.stats;
        let counted = if stats.by_key.contains_key(key) || stats.by_key.len() < MAX_COUNTED_KEYS {
            key
        } else {
            OTHER_KEYS
        };
        let by_key = match stats.by_key.get_mut(counted) {
            Some(by_key) => by_key,
            None => stats.by_key.entry(counted.to_owned()).or_default(),
        };
        let (total, mine) = if verdict.is_ok() {
            (&mut stats.accepted, &mut by_key.accepted)
        } else {
            (&mut stats.throttled, &mut by_key.throttled)
        };
        *total = total.saturating_add(1);
        *mine = mine.saturating_add(1);
        verdict
    }

    fn count(&self, which: fn(&mut SimulatorStats) -> &mut u64) {
        let mut books = self.books();
        let counter = which(&mut books.stats);
        *counter = counter.saturating_add(1);
    }
}

/// The routes, on `simulator`.
pub fn router(simulator: Arc<Simulator>) -> Router {
    let base = BASE_PATH;
    Router::new()
        .route(
            &format!("{base}/$metadata"),
            get(metadata_all).fallback(method_not_allowed),
        )
        .route(
            &format!("{base}/{{collection}}"),
            get(list).post(create).fallback(method_not_allowed),
        )
        .route(
            &format!("{base}/{{collection}}/$metadata"),
            get(metadata_one).fallback(method_not_allowed),
        )
        .route("/stats", get(stats).fallback(method_not_allowed))
        .route(
            "/admin/limit",
            get(limit).put(set_limit).fallback(method_not_allowed),
        )
        .route(
            "/admin/consumers",
            get(consumers)
                .put(set_consumer)
                .fallback(method_not_allowed),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(simulator)
}

/// An RFC 9457 ProblemDetails answer, as Sales Layer sends its errors.
pub fn problem(status: StatusCode, detail: &str, instance: &str) -> Response {
    let kind = match status.as_u16() {
        400 => "https://tools.ietf.org/html/rfc9110#section-15.5.1",
        401 => "https://tools.ietf.org/html/rfc9110#section-15.5.2",
        404 => "https://tools.ietf.org/html/rfc9110#section-15.5.5",
        405 => "https://tools.ietf.org/html/rfc9110#section-15.5.6",
        429 => "https://tools.ietf.org/html/rfc6585#section-4",
        503 => "https://tools.ietf.org/html/rfc9110#section-15.6.4",
        _ => "about:blank",
    };
    let body = json!({
        "type": kind,
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "instance": shown(instance),
    });
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    )];
    (status, content_type, body.to_string()).into_response()
}

/// An answer that ends a request early: a 401, 404, 400 or throttle.
type Refusal = Box<Response>;

/// The vendor's 400: `{"validationFailures": {"field": ["message"]}}`.
fn validation_failed(simulator: &Simulator, failures: ValidationFailures) -> Refusal {
    simulator.count(|s| &mut s.bad_request);
    tracing::debug!(status = 400, ?failures, "malformed request");
    let body = Json(json!({ "validationFailures": failures }));
    Box::new((StatusCode::BAD_REQUEST, body).into_response())
}

/// The key of a request, or the 401 that refuses it.
fn api_key<'a>(
    simulator: &Simulator,
    headers: &'a HeaderMap,
    uri: &Uri,
) -> Result<&'a str, Refusal> {
    let key = headers
        .get(API_KEY_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty() && key.len() <= MAX_KEY_LEN);
    key.ok_or_else(|| {
        simulator.count(|s| &mut s.unauthorized);
        tracing::debug!(status = 401, "request without a usable API key");
        Box::new(problem(
            StatusCode::UNAUTHORIZED,
            &format!(
                "the X-API-KEY header is missing, empty, longer than {MAX_KEY_LEN} characters or not ASCII"
            ),
            uri.path(),
        ))
    })
}

/// Accept one request of `key` now, or refuse it with the throttle signal:
/// the configured status, `Retry-After` when on.
fn admit(simulator: &Simulator, key: &str, uri: &Uri) -> Result<(), Refusal> {
    let Err(retry) = simulator.admit(key) else {
        return Ok(());
    };
    let status =
        StatusCode::from_u16(simulator.signal.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let seconds = retry.seconds();
    tracing::debug!(
        status = status.as_u16(),
        retry_after_seconds = seconds,
        "throttled"
    );
    let mut response = problem(
        status,
        "the rate limit of this API key is exceeded; try again later",
        uri.path(),
    );
    if simulator.signal.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    Err(Box::new(response))
}

fn collection_of(segment: &str, uri: &Uri) -> Result<Collection, Refusal> {
    Collection::from_segment(segment).ok_or_else(|| Box::new(not_found_at(uri)))
}

fn answer(handled: Result<Response, Refusal>) -> Response {
    handled.unwrap_or_else(|refusal| *refusal)
}

/// `GET .../{Products,Variants,Categories}`.
async fn list(
    State(simulator): State<Arc<Simulator>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(list_page(&simulator, &segment, &headers, &uri))
}

fn list_page(
    simulator: &Simulator,
    segment: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Response, Refusal> {
    let key = api_key(simulator, headers, uri)?;
    let collection = collection_of(segment, uri)?;
    let query = catalog::parse_list_query(collection, uri.query())
        .map_err(|failures| validation_failed(simulator, failures))?;
    admit(simulator, key, uri)?;
    let page = catalog::page(collection, &query);
    let mut body = Map::new();
    body.insert(
        "value".into(),
        Value::Array(page.items.into_iter().map(Value::Object).collect()),
    );
    if let Some(count) = page.count {
        body.insert("@count".into(), count.into());
    }
    if let Some(last) = page.more_after {
        let next = format!(
            "{}{}?{}",
            origin(headers),
            uri.path(),
            catalog::next_query(&query, last)
        );
        body.insert("@nextLink".into(), next.into());
    }
    Ok(Json(Value::Object(body)).into_response())
}

/// `http://<Host>` as the client reached us, so `@nextLink` is absolute as
/// upstream; empty (a relative link) without a usable `Host`.
fn origin(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .filter(|host| {
            !host.is_empty()
                && host.len() <= 255
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .map(|host| format!("http://{host}"))
        .unwrap_or_default()
}

/// `POST .../Products`: 201 with `Location`; nothing is stored (the
/// catalog stays fixed), but every new product gets a new id.
async fn create(
    State(simulator): State<Arc<Simulator>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    answer(create_product(&simulator, &segment, &headers, &uri, &body))
}

fn create_product(
    simulator: &Simulator,
    segment: &str,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
) -> Result<Response, Refusal> {
    let key = api_key(simulator, headers, uri)?;
    if collection_of(segment, uri)? != Collection::Products {
        return Err(Box::new(method_not_allowed_here()));
    }
    let mut product = catalog::validate_new_product(body)
        .map_err(|failures| validation_failed(simulator, failures))?;
    admit(simulator, key, uri)?;
    let id = {
        let mut books = simulator.books();
        books.created = books.created.saturating_add(1);
        books.stats.created = books.stats.created.saturating_add(1);
        catalog::PRODUCTS.saturating_add(books.created)
    };
    product.insert("prod_id".into(), id.into());
    let location = format!("{BASE_PATH}/Products({id})");
    let location = HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/"));
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(Value::Object(product)),
    )
        .into_response())
}

/// `GET .../$metadata` (every collection's schema) and `.../Products/$metadata`.
async fn metadata_all(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(metadata(&simulator, None, &headers, &uri))
}

async fn metadata_one(
    State(simulator): State<Arc<Simulator>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(metadata(&simulator, Some(&segment), &headers, &uri))
}

fn metadata(
    simulator: &Simulator,
    segment: Option<&str>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Response, Refusal> {
    let key = api_key(simulator, headers, uri)?;
    let collections = match segment {
        Some(segment) => vec![collection_of(segment, uri)?],
        None => Collection::ALL.to_vec(),
    };
    admit(simulator, key, uri)?;
    let value: Vec<Value> = collections.iter().map(|c| c.metadata()).collect();
    Ok(Json(json!({ "value": value })).into_response())
}

async fn stats(State(simulator): State<Arc<Simulator>>) -> Json<SimulatorStats> {
    // Clone under the lock, serialize after releasing it.
    let snapshot = simulator.books().stats.clone();
    Json(snapshot)
}

/// The limit at run time: `{"requests": N, "periodSeconds": S}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LimitBody {
    requests: u32,
    period_seconds: Option<u64>,
}

fn limit_json(limit: (u32, Duration)) -> Json<Value> {
    Json(json!({"requests": limit.0, "periodSeconds": limit.1.as_secs_f64()}))
}

async fn limit(State(simulator): State<Arc<Simulator>>) -> Json<Value> {
    let limit = simulator.books().limiter.limit();
    limit_json(limit)
}

/// `PUT /admin/limit`: lower or raise the limit from now on.
async fn set_limit(State(simulator): State<Arc<Simulator>>, body: Bytes) -> Response {
    let parsed = serde_json::from_slice::<LimitBody>(&body)
        .map_err(|e| e.to_string())
        .and_then(|body| match body.period_seconds {
            _ if body.requests == 0 => Err("requests must be at least 1".to_owned()),
            Some(0) => Err("periodSeconds must be at least 1".to_owned()),
            Some(seconds) if seconds > 86_400 => Err("periodSeconds is at most 86400".to_owned()),
            _ => Ok(body),
        });
    let body = match parsed {
        Ok(body) => body,
        Err(message) => return admin_error(&message),
    };
    let mut books = simulator.books();
    let (_, period) = books.limiter.limit();
    let period = body.period_seconds.map_or(period, Duration::from_secs);
    books.limiter.set_limit(body.requests, period);
    tracing::info!(
        requests = body.requests,
        period_ms = period.as_millis() as u64,
        "limit changed"
    );
    limit_json((body.requests, period)).into_response()
}

/// An outside consumer: `{"key": "...", "requests": N}` per period of the limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerBody {
    key: String,
    requests: u32,
}

async fn consumers(State(simulator): State<Arc<Simulator>>) -> Json<Value> {
    let books = simulator.books();
    let list: Vec<Value> = books
        .consumers
        .iter()
        .map(|(key, c)| json!({"key": key, "requests": c.requests()}))
        .collect();
    Json(json!({ "consumers": list }))
}

/// `PUT /admin/consumers`: start, change or (with 0 requests) stop one.
async fn set_consumer(State(simulator): State<Arc<Simulator>>, body: Bytes) -> Response {
    let body = match serde_json::from_slice::<ConsumerBody>(&body) {
        Ok(body) if !body.key.trim().is_empty() && body.key.len() <= MAX_KEY_LEN => body,
        Ok(_) => return admin_error("key must be 1 to 256 characters"),
        Err(error) => return admin_error(&error.to_string()),
    };
    match simulator.set_consumer(body.key.trim(), body.requests) {
        Ok(()) => {
            tracing::info!(requests = body.requests, "outside consumer set");
            consumers(State(simulator)).await.into_response()
        }
        Err(message) => admin_error(&message),
    }
}

fn admin_error(message: &str) -> Response {
    let mut failures = ValidationFailures::new();
    failures.insert("body".into(), vec![message.chars().take(200).collect()]);
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "validationFailures": failures })),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    method_not_allowed_here()
}

fn method_not_allowed_here() -> Response {
    let mut response = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "this method is not supported here",
        "",
    );
    response.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT"),
    );
    response
}

async fn not_found(uri: Uri) -> Response {
    not_found_at(&uri)
}

fn not_found_at(uri: &Uri) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        &format!(
            "no such endpoint; the collections are {BASE_PATH}/Products, Variants and Categories"
        ),
        uri.path(),
    )
}

#[cfg(test)]
impl Simulator {
    /// Every counter of key `k` and the totals set to `value`.
    pub(crate) fn force_counters(&self, value: u64) {
        let mut books = self.books();
        books.stats.accepted = value;
        let counters = crate::KeyStats {
            accepted: value,
            throttled: value,
        };
        books.stats.by_key.insert("k".into(), counters);
    }

    /// One request of `key`, then the counters.
    pub(crate) fn stats_after_one_request(&self, key: &str) -> SimulatorStats {
        let _ = self.admit(key);
        self.books().stats.clone()
    }
}
