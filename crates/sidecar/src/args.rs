//! The sidecar's command line: every setting is a flag whose environment
//! variable is the one the operator's webhook injects (DESIGN.md §5).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// The sidecar's settings.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Local address the workload sends its Sales Layer requests to.
    #[arg(long, env = "SALESLAYER_PROXY_BIND", default_value = "127.0.0.1:8787")]
    pub bind: SocketAddr,
    /// Address of the sidecar's /metrics and /healthz.
    #[arg(
        long,
        env = "SALESLAYER_PROXY_METRICS_BIND",
        default_value = "0.0.0.0:8788"
    )]
    pub metrics_bind: SocketAddr,
    /// The Sales Layer API (or the simulator) to forward to.
    #[arg(long, env = "SALESLAYER_UPSTREAM")]
    pub upstream: Option<String>,
    /// Requests that may wait for their turn; beyond it callers get 503 at once.
    #[arg(long, env = "SALESLAYER_PROXY_QUEUE", default_value_t = 1024)]
    pub queue: usize,
    /// How long one upstream attempt may take.
    #[arg(
        long,
        env = "SALESLAYER_PROXY_UPSTREAM_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub upstream_timeout_seconds: u64,
    /// This pod's share at admission (injected).
    #[arg(long, env = "SALESLAYER_RATE_REQUESTS")]
    pub rate_requests: Option<u32>,
    /// Period of that share in milliseconds (injected).
    #[arg(long, env = "SALESLAYER_RATE_PERIOD_MS")]
    pub rate_period_ms: Option<u64>,
    /// Concurrent upstream requests (injected).
    #[arg(long, env = "SALESLAYER_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: u32,
    /// Attempts in all, the first included (injected).
    #[arg(long, env = "SALESLAYER_RETRY_MAX_ATTEMPTS", default_value_t = 4)]
    pub retry_max_attempts: u32,
    /// Backoff base in milliseconds (injected).
    #[arg(long, env = "SALESLAYER_RETRY_BASE_DELAY_MS", default_value_t = 1000)]
    pub retry_base_delay_ms: u64,
    /// Backoff ceiling in milliseconds (injected).
    #[arg(long, env = "SALESLAYER_RETRY_MAX_DELAY_MS", default_value_t = 8000)]
    pub retry_max_delay_ms: u64,
    /// The downward-API file of the pod's limit annotation (injected).
    #[arg(long, env = "SALESLAYER_LIMIT_FILE")]
    pub limit_file: Option<PathBuf>,
    /// The quota API (injected).
    #[arg(long, env = "SALESLAYER_QUOTA_URL")]
    pub quota_url: Option<String>,
    /// The pod's projected token for the quota API (injected).
    #[arg(long, env = "SALESLAYER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA of the quota API's certificate (injected).
    #[arg(long, env = "SALESLAYER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Status codes that mean "throttled" on this account, comma-separated
    /// (injected from the account's `throttleStatuses`).
    #[arg(long, env = "SALESLAYER_THROTTLE_STATUSES", default_value = "429")]
    pub throttle_statuses: String,
    /// The largest request body accepted; larger ones get 413 before they are read.
    #[arg(long, env = "SALESLAYER_PROXY_MAX_BODY_BYTES", default_value_t = crate::MAX_BODY)]
    pub max_body_bytes: usize,
    /// Connections the proxy (and its /metrics) serve at once.
    #[arg(long, env = "SALESLAYER_PROXY_MAX_CONNECTIONS", default_value_t = 64)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (idle keep-alive included).
    #[arg(
        long,
        env = "SALESLAYER_PROXY_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub header_read_timeout_seconds: u64,
    /// The integration this pod belongs to (injected).
    #[arg(long, env = "SALESLAYER_INTEGRATION")]
    pub integration: Option<String>,
    /// The job this pod runs (injected).
    #[arg(long, env = "SALESLAYER_JOB")]
    pub job: Option<String>,
    /// The pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// The pod's name (downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
}
