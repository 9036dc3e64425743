//! `saleslayer-operator proxy`: the per-pod sidecar (DESIGN.md §2, §5, §6).
//!
//! The workload sends its Sales Layer requests to `SALESLAYER_API_URL`
//! (this proxy); each attempt waits at the [`gate::Gate`] (bounded queue,
//! concurrency cap, pacing so that no window of the period holds more than
//! the grant), goes upstream over pooled connections, and is retried by the
//! injected policy ([`retry`]). The grant comes from the lease, else the
//! limit file, else the env share ([`limits`], [`lease`]).

pub mod gate;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod pacer;
pub mod retry;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::info;

use crate::cli::ProxyArgs;
use crate::clock::{Clock, SystemClock};
use gate::Gate;
use lease::{Identity, QuotaEndpoint, Renewer};
use limits::Limits;
use metrics::{CodeLabel, ProxyMetrics};
use pacer::Limit;
use retry::{Outcome, RetryPolicy};

/// The largest request body the proxy buffers (it must keep it to retry).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// Headers that belong to one hop and are not forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
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
            },
            queue: args.queue,
            upstream_timeout: Duration::from_secs(args.upstream_timeout_seconds.max(1)),
            limit_file: args.limit_file.clone(),
            quota,
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
        let body = match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(body) => body,
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "BodyTooLarge",
                    &format!("the request body is larger than {MAX_BODY} bytes"),
                );
            }
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let url = format!("{}{path}", self.upstream);
        let headers = forwarded(&parts.headers);
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
                        .and_then(retry::parse_retry_after),
                },
                Err(_) => Outcome::Unreachable,
            };
            let code = match outcome {
                Outcome::Answer { status, .. } => Some(status),
                Outcome::Unreachable => None,
            };
            self.gate.record_attempt(code);
            self.metrics
                .requests
                .get_or_create(&CodeLabel {
                    code: code.map_or_else(|| "error".to_owned(), |c| c.to_string()),
                })
                .inc();
            let Some(delay) = self.policy.next_delay(attempt, outcome, self.unit()) else {
                return match answer {
                    Ok((status, headers, bytes)) => respond(status, &headers, bytes),
                    Err(error) => error_response_for(&error),
                };
            };
            self.gate.record_retry();
            self.metrics.retries.inc();
            self.clock.sleep(delay).await;
            attempt += 1;
        }
    }
}

/// reqwest (built without a default provider) needs the process's rustls
/// provider before a client is built; installing it twice is harmless.
pub fn ensure_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The caller's headers minus those of its hop (and `host`, which is the upstream's).
fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    for name in HOP_BY_HOP
        .iter()
        .chain([&header::HOST, &header::CONTENT_LENGTH])
    {
        kept.remove(name);
    }
    kept
}

fn respond(status: reqwest::StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let kept = response.headers_mut();
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(name) && name != header::CONTENT_LENGTH {
            kept.append(name.clone(), value.clone());
        }
    }
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
) -> anyhow::Result<()> {
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
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_bind).await?;
    let metrics_app = metrics::router(proxy.metrics.clone(), proxy.gate.clone());
    let metrics_stop = stopped();
    tokio::spawn(async move {
        axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(metrics_stop)
            .await
    });
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    info!(
        bind = %args.bind,
        metrics = %args.metrics_bind,
        upstream = %config.upstream,
        requests = config.env_share.requests,
        period_ms = config.env_share.period_millis,
        "proxying the Sales Layer API"
    );
    axum::serve(listener, router(proxy))
        .with_graceful_shutdown(stopped())
        .await?;
    Ok(())
}
