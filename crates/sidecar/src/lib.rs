//! The per-pod sidecar (DESIGN.md §2, §5, §6): `saleslayer-sidecar`, also
//! reachable as `saleslayer-operator proxy`.
//!
//! The workload sends its Sales Layer requests to `SALESLAYER_API_URL`
//! (this proxy); each attempt waits at the [`gate::Gate`] (bounded queue,
//! concurrency cap, pacing so that no window of the period holds more than
//! the grant), goes upstream over pooled connections, and is retried by the
//! injected policy ([`retry`]): throttling (the account's
//! `SALESLAYER_THROTTLE_STATUSES`) for every method, outages only for
//! requests that may be replayed. The grant comes from the lease, else the
//! limit file, else the env share ([`limits`], [`lease`]).
//!
//! The workload is a client like any other: only end-to-end headers cross
//! the proxy ([`end_to_end`]), a body over the limit is refused on its
//! declared length before it is read, and both of its servers (the proxy and
//! `/metrics`) close connections that do not send a request head in time and
//! serve a bounded number at once (`saleslayer_runtime::serve`), so memory
//! stays within connections × the largest body.
//!
//! May import: the pod contract (`saleslayer-contract`), the shared runtime
//! (`saleslayer-runtime`), axum, reqwest. Never: a Kubernetes client or
//! type, the operator's code. It runs in every workload pod, so it stays
//! small: `cargo tree -e normal -p saleslayer-sidecar` shows no `kube`.
#![forbid(unsafe_code)]

mod args;

pub mod gate;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod pacer;
pub mod retry;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::info;

pub use args::ProxyArgs;
use gate::Gate;
use lease::{Identity, QuotaEndpoint, Renewer};
use limits::Limits;
use metrics::{CodeLabel, ProxyMetrics};
use pacer::Limit;
use retry::{Outcome, RetryPolicy, ThrottleStatuses};
use saleslayer_runtime::clock::{Clock, SystemClock};
use saleslayer_runtime::serve::{ServeLimits, serve};

/// The header that makes a write safe to send again (the upstream applies
/// a key once).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The largest request body the proxy buffers by default (it must keep it
/// to retry). With the connection cap, it bounds the memory of bodies.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Headers that belong to one hop and are not forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{0} is not set: the proxy runs as the sidecar the operator's webhook injects (or pass --{1})"
    )]
    Missing(&'static str, &'static str),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--upstream {0:?} is not an http(s) URL")]
    Upstream(String),
    #[error("building the upstream client: {0}")]
    Client(reqwest::Error),
    #[error("SALESLAYER_THROTTLE_STATUSES: {0}")]
    ThrottleStatuses(String),
}

/// Why the sidecar stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listening on {0}: {1}")]
    Bind(std::net::SocketAddr, #[source] std::io::Error),
    #[error("serving the proxy: {0}")]
    Serve(#[source] std::io::Error),
}

/// Everything one sidecar runs with.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream: String,
    pub env_share: Limit,
    pub policy: RetryPolicy,
    pub queue: usize,
    pub upstream_timeout: Duration,
    pub limit_file: Option<PathBuf>,
    pub quota: Option<QuotaEndpoint>,
    /// The largest request body accepted (413 beyond, before it is read).
    pub max_body: usize,
    /// Header-read timeout and connection cap of the proxy's servers.
    pub serve: ServeLimits,
}

impl ProxyConfig {
    /// Check the flags and injected variables.
    pub fn from_args(args: &ProxyArgs) -> Result<Self, ConfigError> {
        let upstream = args
            .upstream
            .clone()
            .ok_or(ConfigError::Missing("SALESLAYER_UPSTREAM", "upstream"))?;
        if !(upstream.starts_with("http://") || upstream.starts_with("https://")) {
            return Err(ConfigError::Upstream(upstream));
        }
        let requests = args.rate_requests.ok_or(ConfigError::Missing(
            "SALESLAYER_RATE_REQUESTS",
            "rate-requests",
        ))?;
        let period_millis = args.rate_period_ms.ok_or(ConfigError::Missing(
            "SALESLAYER_RATE_PERIOD_MS",
            "rate-period-ms",
        ))?;
        if period_millis == 0 {
            return Err(ConfigError::Zero("SALESLAYER_RATE_PERIOD_MS"));
        }
        if args.retry_max_attempts == 0 {
            return Err(ConfigError::Zero("SALESLAYER_RETRY_MAX_ATTEMPTS"));
        }
        let identity = match (&args.namespace, &args.pod, &args.integration, &args.job) {
            (Some(namespace), Some(pod), Some(integration), Some(job)) => Some(Identity {
                namespace: namespace.clone(),
                integration: integration.clone(),
                job: job.clone(),
                pod: pod.clone(),
            }),
            _ => None,
        };
        let quota = match (&args.quota_url, &args.token_file, identity) {
            (Some(url), Some(token_file), Some(identity)) => Some(QuotaEndpoint {
                url: url.clone(),
                token_file: token_file.clone(),
                ca_file: args.ca_file.clone(),
                identity,
            }),
            _ => None,
        };
        Ok(Self {
            upstream: upstream.trim_end_matches('/').to_owned(),
            env_share: Limit {
                requests,
                period_millis,
                max_concurrency: args.max_concurrency.max(1),
            },
            policy: RetryPolicy {
                max_attempts: args.retry_max_attempts,
                base_delay: Duration::from_millis(args.retry_base_delay_ms),
                max_delay: Duration::from_millis(args.retry_max_delay_ms),
                throttle_statuses: ThrottleStatuses::parse(&args.throttle_statuses)
                    .map_err(ConfigError::ThrottleStatuses)?,
            },
            queue: args.queue,
            upstream_timeout: Duration::from_secs(args.upstream_timeout_seconds.max(1)),
            limit_file: args.limit_file.clone(),
            quota,
            max_body: args.max_body_bytes,
            serve: ServeLimits {
                header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds.max(1)),
                max_connections: args.max_connections.max(1),
                keep_alive: true,
            },
        })
    }
}

/// One sidecar: its gate, its upstream client and its retry policy.
#[derive(Debug)]
pub struct Proxy {
    pub gate: Arc<Gate>,
    pub metrics: Arc<ProxyMetrics>,
    http: reqwest::Client,
    upstream: String,
    policy: RetryPolicy,
    max_body: usize,
    clock: Arc<dyn Clock>,
    jitter: Mutex<fastrand::Rng>,
}

impl Proxy {
    /// A proxy on `clock`, its jitter drawn from `rng` (seeded in tests).
    pub fn new(
        config: &ProxyConfig,
        clock: Arc<dyn Clock>,
        rng: fastrand::Rng,
    ) -> Result<Arc<Self>, ConfigError> {
        ensure_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(config.upstream_timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(ConfigError::Client)?;
        Ok(Arc::new(Self {
            gate: Gate::new(clock.clone(), Limits::new(config.env_share), config.queue),
            metrics: Arc::new(ProxyMetrics::default()),
            http,
            upstream: config.upstream.clone(),
            policy: config.policy,
            max_body: config.max_body,
            clock,
            jitter: Mutex::new(rng),
        }))
    }

    fn unit(&self) -> f64 {
        self.jitter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .f64()
    }

    /// Forward one request, paced and retried; the caller gets the last answer.
    pub async fn forward(&self, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BodyTooLarge",
                &format!("the request body is larger than {} bytes", self.max_body),
            )
        };
        // Refused on its declared length before a byte of it is read.
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body as u64) {
            return too_large();
        }
        let Ok(body) = axum::body::to_bytes(body, self.max_body).await else {
            return too_large();
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let url = format!("{}{path}", self.upstream);
        let headers = end_to_end(&parts.headers, &[header::HOST, header::CONTENT_LENGTH]);
        let replayable = retry::replayable(
            parts.method.as_str(),
            parts.headers.contains_key(IDEMPOTENCY_KEY),
        );
        let mut attempt = 1;
        loop {
            let permit = match self.gate.acquire().await {
                Ok(permit) => permit,
                Err(full) => {
                    self.metrics.rejected.inc();
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "QueueFull",
                        &full.to_string(),
                    );
                }
            };
            let sent = self
                .http
                .request(parts.method.clone(), &url)
                .headers(headers.clone())
                .body(body.clone())
                .send()
                .await;
            let answer = match sent {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    match response.bytes().await {
                        Ok(bytes) => Ok((status, headers, bytes)),
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
            drop(permit);
            let outcome = match &answer {
                Ok((status, headers, _)) => Outcome::Answer {
                    status: status.as_u16(),
                    retry_after: headers
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry::parse_retry_after(v, SystemTime::now())),
                },
                Err(_) => Outcome::Unreachable,
            };
            self.count_attempt(outcome);
            let Some(delay) = self.wait_before_retry(attempt, outcome, replayable) else {
                return match answer {
                    Ok((status, headers, bytes)) => respond(status, &headers, bytes),
                    Err(error) => error_response_for(&error),
                };
            };
            if let Outcome::Answer { status, .. } = outcome
                && self.policy.throttled(status)
            {
                // Throttled: the whole pod waits, not only this request.
                self.gate.hold(delay);
            }
            self.gate.record_retry();
            self.metrics.retries.inc();
            self.clock.sleep(delay).await;
            attempt += 1;
        }
    }

    /// The wait before the next attempt, if there is one; the jitter is
    /// drawn only then, so a seeded generator gives the n-th retry its n-th draw.
    fn wait_before_retry(
        &self,
        attempt: u32,
        outcome: Outcome,
        replayable: bool,
    ) -> Option<Duration> {
        self.policy.next_delay(attempt, outcome, replayable, 0.0)?;
        self.policy
            .next_delay(attempt, outcome, replayable, self.unit())
    }

    /// One attempt's answer in the usage report and the metrics.
    fn count_attempt(&self, outcome: Outcome) {
        let code = match outcome {
            Outcome::Answer { status, .. } => Some(status),
            Outcome::Unreachable => None,
        };
        let throttled = code.is_some_and(|status| self.policy.throttled(status));
        self.gate.record_attempt(code, throttled);
        if throttled {
            self.metrics.throttled.inc();
        }
        self.metrics
            .requests
            .get_or_create(&CodeLabel {
                code: code.map_or_else(|| "error".to_owned(), |c| c.to_string()),
            })
            .inc();
    }
}

/// reqwest (built without a default provider) needs the process's rustls
/// provider before a client is built; installing it twice is harmless.
pub fn ensure_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// At most this many names in `Connection` are honoured; a longer list is
/// hostile, and its other names are forwarded as any header.
const MAX_CONNECTION_NAMES: usize = 32;

/// `headers` without those of one hop: the hop-by-hop ones, every header
/// that `Connection` names (RFC 9110 §7.6.1), and `also` (the caller's
/// `host` is not the upstream's; lengths are set again for the body sent).
pub fn end_to_end(headers: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .take(MAX_CONNECTION_NAMES)
        .collect();
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(name) && !also.contains(name) && !named.contains(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

fn respond(status: reqwest::StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = end_to_end(headers, &[header::CONTENT_LENGTH]);
    response
}

fn error_response_for(failure: &reqwest::Error) -> Response {
    let (status, reason) = if failure.is_timeout() {
        (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout")
    } else {
        (StatusCode::BAD_GATEWAY, "UpstreamUnreachable")
    };
    // reqwest's message names the URL, which is the public upstream: no secret.
    error(
        status,
        reason,
        &format!("the upstream did not answer: {failure}"),
    )
}

fn error(status: StatusCode, reason: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": message, "reason": reason})),
    )
        .into_response()
}

/// Every path goes upstream.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .fallback(
            |State(proxy): State<Arc<Proxy>>, request: Request| async move {
                proxy.forward(request).await
            },
        )
        .with_state(proxy)
}

/// Run the sidecar until `shutdown` resolves.
pub async fn run(
    args: ProxyArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let config = ProxyConfig::from_args(&args)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let proxy = Proxy::new(&config, clock.clone(), fastrand::Rng::new())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    if config.quota.is_none() {
        info!(
            "no quota API, token file or pod identity: pacing by the limit file, else the env share"
        );
    }
    let renewer = Renewer::new(
        proxy.gate.clone(),
        config.quota.clone(),
        config.limit_file.clone(),
        proxy.metrics.clone(),
    );
    tokio::spawn(renewer.run(clock, stopped()));
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_bind)
        .await
        .map_err(|error| RunError::Bind(args.metrics_bind, error))?;
    let metrics_app = metrics::router(proxy.metrics.clone(), proxy.gate.clone());
    tokio::spawn(serve(
        metrics_listener,
        metrics_app,
        config.serve,
        stopped(),
    ));
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|error| RunError::Bind(args.bind, error))?;
    info!(
        bind = %args.bind,
        metrics = %args.metrics_bind,
        upstream = %config.upstream,
        requests = config.env_share.requests,
        period_ms = config.env_share.period_millis,
        throttle_statuses = ?config.policy.throttle_statuses.codes(),
        "proxying the Sales Layer API"
    );
    serve(listener, router(proxy), config.serve, stopped())
        .await
        .map_err(RunError::Serve)
}

#[cfg(test)]
mod tests;
